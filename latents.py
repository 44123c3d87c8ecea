"""Using a trained VAE, for ``infer.py``, ``save_latent.py`` and the notebook (scripts never import each other):
load it, encode a split (:class:`SplitEncoder`), decode latents, normalise them for the diffusion stage, and
read/write latent files (C, d, h, w): ``.npy``, ``.pt``, or ``.nii.gz`` (d, h, w, C) with :func:`latent_affine`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from checkpoints import CheckpointError, atomic_write, load_vae
from config import ConfigError, ModelConfig, PerceptualConfig
from dataset import (
    DataError,
    PreprocessedVolume,
    preflight_failures,
    preprocessed_batches,
    read_split,
    warn_inputs,
)
from model import LPIPS3D, build_perceptual_loss
from script_args import LATENT_FORMATS, NORMALISATIONS
from utils import autocast, explain_out_of_memory, resolve_amp_dtype, resolve_device


class LoadedModel:
    """A VAE ready for inference: ``vae``, the ``config`` it was trained with, and where/how it runs (``device``,
    ``amp_dtype``)."""

    def __init__(self, args: argparse.Namespace) -> None:
        """``checkpoints.load_vae`` (weights_only) of the scripts' flags: ``--model_checkpoint`` (a bare MAISI
        state dict with the model given by ``--maisi_*`` when ``--maisi_channels`` is there), ``--device``,
        ``--amp``; raises CheckpointError / ConfigError naming the file."""
        maisi = None
        if args.maisi_channels is not None:
            levels = len(args.maisi_channels)
            maisi = ModelConfig(
                channels=tuple(args.maisi_channels),
                num_res_blocks=tuple(args.maisi_num_res_blocks or [1] * levels),
                attention_levels=tuple(bool(a) for a in (args.maisi_attention_levels or [0] * levels)),
                latent_channels=args.maisi_latent_channels,
                norm_num_groups=args.maisi_norm_num_groups,
            )
            maisi.validate()
        self.device = resolve_device(args.device)
        self.vae, self.config, _ = load_vae(args.model_checkpoint, self.device, maisi)
        self.amp_dtype = resolve_amp_dtype(args.amp, self.device)

    @torch.no_grad()
    def encode(self, volumes: list[PreprocessedVolume], sample: bool, seeds: list[int]) -> torch.Tensor:
        """Latents (B, C, d, h, w) float32 on the CPU: ``mu``, or ``mu + sigma * eps`` with eps drawn per row on
        the CPU from ``seeds`` (so a draw is the same on every device and in every batch)."""
        images = torch.stack([v.image for v in volumes]).to(self.device)
        with autocast(self.device, self.amp_dtype):
            mu, sigma = self.vae.encode(images)
        latents = mu.float().cpu()
        if sample:
            noise = torch.stack(
                [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
            )
            latents = latents + sigma.float().cpu() * noise
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, D, H, W) in [0, 1] on the model's device, on the preprocessed grid (the config's
        ``preprocessing.target_shape``), from latents (B, C, d, h, w)."""
        with autocast(self.device, self.amp_dtype):
            images = self.vae.decode(latents.to(self.device), tuple(self.config.preprocessing.target_shape))
        return images.float().clamp(0.0, 1.0)


def build_metric_lpips(perceptual: PerceptualConfig, device: torch.device) -> LPIPS3D | None:
    """The checkpoint's LPIPS3D on ``device`` for reporting metrics, on a machine that may lack the training
    machine's files; prints which network it is (``LPIPS3D: ...``).

    When ``perceptual.weights_path`` does not exist here, the backbone's default weights are used (deepbet: the
    model of the installed ``deepbet`` package; MedicalNet: the torch-hub cache), with a ``WARNING:`` line on
    stderr; None (with a warning) when no weights load.
    """
    configured, missing = perceptual.weights_path, ""
    if configured is not None and not Path(configured).is_file():  # it could only fail to load
        missing = f"the checkpoint's perceptual.weights_path {configured} is not on this machine"
        perceptual = replace(perceptual, weights_path=None)
    try:
        lpips = build_perceptual_loss(perceptual)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
        problem = str(error).strip().split(". ")[0].rstrip(".")  # the first sentence; then advice for the API
        problem = f"{missing}, and {problem}" if missing else problem
        print(
            f"WARNING: LPIPS3D metrics not computed (no lpips/lpips_brain columns): {problem}",
            file=sys.stderr,
        )
        return None
    if missing:
        print(
            f"WARNING: {missing}; LPIPS3D uses the default {perceptual.backbone} weights instead",
            file=sys.stderr,
        )
    print(f"LPIPS3D: {lpips.description}")
    return lpips.to(device)


def row_seed(seed: int, subject_id: str) -> int:
    """A per-row seed from the base seed and the subject id (independent of row order and batching)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()[:8], "little") >> 1


def decode_latent_file(args: argparse.Namespace) -> Path:
    """Decode ``--decode`` (a latent .nii.gz, in normalised units with ``--denormalise``) with the model of the
    scripts' flags into ``<output_dir>/<name>_decoded.nii.gz`` on the preprocessed grid, values in [0, 1].
    Everything is checked before the folder is created (:func:`check_output_dir`) and the image written."""
    model, output_dir, latent_path = LoadedModel(args), Path(args.output_dir), Path(args.decode)
    stats = None if args.latent_stats is None else read_latent_stats(args.latent_stats)
    check_output_dir(output_dir)
    latent, affine = read_latent(latent_path)
    if affine is None:
        raise DataError(f"{latent_path}: --decode needs a .nii.gz latent (its affine locates the image)")
    target_shape = tuple(model.config.preprocessing.target_shape)
    expected = (model.vae.latent_channels, *model.vae.latent_shape(target_shape))
    if tuple(latent.shape) != expected:
        raise DataError(
            f"{latent_path}: latent shape (C, d, h, w) {tuple(latent.shape)} does not fit this model and "
            f"preprocessing.target_shape {target_shape} (expected {expected})"
        )
    if args.denormalise != "none":
        latent = denormalise_latent(latent, stats, args.denormalise)
    image = model.decode(latent[None])[0, 0].cpu().numpy()
    affine = affine @ np.linalg.inv(latent_affine(np.eye(4), model.vae.downsample_factor))
    path = output_dir / f"{latent_path.name[: -len('.nii.gz')]}_decoded.nii.gz"
    output_dir.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


FATAL_ERRORS = (CheckpointError, ConfigError, DataError, ValueError, RuntimeError)
T = TypeVar("T")


def fatal(error: BaseException | str) -> int:
    """Print what stops a script (``FATAL_ERRORS`` before any work) as one ``ERROR:`` line on stderr, no
    traceback; returns its exit code, 2."""
    print(f"ERROR: {error}", file=sys.stderr)
    return 2


class EncodedSubject(NamedTuple):
    """One subject of :meth:`SplitEncoder.encode`, as the callback gets it."""

    row: int  # in the split
    volume: PreprocessedVolume
    latent: torch.Tensor  # (C, d, h, w) float32 on the CPU
    latent_affine: np.ndarray  # (4, 4): :func:`latent_affine` of the volume's preprocessed grid


class SplitEncoder:
    """A split to encode with the flags of infer.py / save_latent.py (``script_args``: model, batching, seed,
    ``--output_dir``) and its failed files."""

    def __init__(self, args: argparse.Namespace, source: str) -> None:
        """Load the model, check ``--output_dir`` (creating nothing), read the split ``source``, pre-flight check
        its files and warn about inputs off the checkpoint's grid or not skull-stripped (``dataset.warn_inputs``;
        with ``--strict`` an error); raises one of :data:`FATAL_ERRORS`, naming the file."""
        self.args, self.model = args, LoadedModel(args)
        check_output_dir(Path(args.output_dir))
        self.frame = read_split(source)
        self.failures = preflight_failures(self.frame)  # row -> "<image>: <problem>"; preprocessing adds more
        warn_inputs(self.frame.drop(index=list(self.failures)), self.model.config.preprocessing, args.strict)

    @property
    def good_rows(self) -> list[int]:
        """The rows that have not failed (so far), in order."""
        return [i for i in range(len(self.frame)) if i not in self.failures]

    def output_path(self, row: int, suffix: str) -> Path:
        """``<output_dir>/<subject_id><suffix>`` of a row (``dataset.read_split`` makes ids unique)."""
        name = str(self.frame["subject_id"].iloc[row]).replace(os.sep, "_")
        return Path(self.args.output_dir) / f"{name}{suffix}"

    def encode(self, rows: list[int], callback: Callable[[EncodedSubject], T], sample: bool) -> list[T]:
        """Preprocess ``rows`` in batches (worker processes, row order), encode each batch (:meth:`LoadedModel.encode`:
        the mean, or with ``sample`` a draw seeded by :func:`row_seed`) and call ``callback`` per subject;
        returns what it returned, in row order. Files that fail preprocessing join ``failures``; running out of
        device memory (in the callback too) raises one ``utils.DeviceOutOfMemoryError`` line naming the batch
        size and what to change."""
        args, prep = self.args, self.model.config.preprocessing
        ids = list(self.frame["subject_id"].astype(str))
        remedies = f"lower --batch_size (now {args.batch_size}), or use --amp bf16 (now {args.amp})"
        memory = explain_out_of_memory(self.model.device, args.batch_size, tuple(prep.target_shape), remedies)
        batches = preprocessed_batches(self.frame, prep, rows, args.batch_size, args.num_workers)
        results: list[T] = []
        with tqdm(total=len(rows), desc="encode", unit="vol", disable=not rows) as progress, memory:
            for batch in batches:
                self.failures.update({item["index"]: item["error"] for item in batch if item["error"]})
                loaded = [(item["index"], item["volume"]) for item in batch if not item["error"]]
                if loaded:
                    seeds = [row_seed(args.seed, ids[row]) for row, _ in loaded]
                    latents = self.model.encode([volume for _, volume in loaded], sample, seeds)
                    for (row, volume), latent in zip(loaded, latents, strict=True):
                        affine = latent_affine(volume.inverse.output_affine, self.model.vae.downsample_factor)
                        results.append(callback(EncodedSubject(row, volume, latent, affine)))
                progress.update(len(batch))
        return results

    def report_failures(self, note: str = "") -> int:
        """0, or 1 after listing every failed file on stderr (``note`` follows "failed")."""
        if not self.failures:
            return 0
        lines = "".join(f"\n  {self.failures[i]}" for i in sorted(self.failures))
        count = f"{len(self.failures)} of {len(self.frame)} file(s)"
        print(f"ERROR: {count} failed{note}:{lines}", file=sys.stderr)
        return 1


def read_latent_stats(path: str | Path) -> dict[str, Any]:
    """``latent_stats.json`` of ``save_latent.py``; DataError (one line naming the file) when it is missing or
    lacks the per-channel statistics."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: latent statistics file not found (save_latent.py writes it)")
    try:
        stats = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a JSON file ({error})") from None
    if not isinstance(stats, dict):
        raise DataError(f"{path}: not a latent_stats.json (a JSON object is expected)")
    missing = [key for key in ("channel_mean", "channel_std", "scale_factor") if key not in stats]
    if missing:
        raise DataError(f"{path}: not a latent_stats.json (missing {', '.join(missing)})")
    return stats


def latent_normalisation(stats: dict[str, Any], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (shift, scale), each (C,) float64, of ``z_normalised = (z - shift) * scale``.

    ``none``: (0, 1); ``global``: (0, scale_factor), MAISI's convention (1/std over all channels, no shift);
    ``channel``: (channel_mean, 1/channel_std), every channel to mean 0 and std 1 over the encoded split.
    ``stats``: ``latent_stats.json`` (``metrics.LatentStatistics.summary``).
    """
    mean = torch.tensor(stats["channel_mean"], dtype=torch.float64)
    std = torch.tensor(stats["channel_std"], dtype=torch.float64)
    if mode == "none":
        return torch.zeros_like(mean), torch.ones_like(mean)
    if mode == "global":
        return torch.zeros_like(mean), torch.full_like(mean, float(stats["scale_factor"]))
    if mode == "channel":
        if not bool((std > 0).all()):
            raise DataError(
                f"latent statistics: channel std {std.tolist()} has a zero; cannot normalise per channel"
            )
        return mean, 1.0 / std
    raise ValueError(f"unknown latent normalisation {mode!r}; expected one of {', '.join(NORMALISATIONS)}")


def _per_channel(z: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (C,) shaped to broadcast over ``z`` (C, *S) or (B, C, *S); DataError when C differs."""
    if z.ndim not in (4, 5) or z.shape[-4] != len(values):
        raise DataError(
            f"latent of shape {tuple(z.shape)} does not fit statistics of {len(values)} channels "
            "(expected (C, d, h, w) or (B, C, d, h, w))"
        )
    return values.to(z.device, z.dtype)[:, None, None, None]


def normalise_latent(z: torch.Tensor, stats: dict[str, Any], mode: str) -> torch.Tensor:
    """Saved latent(s) (C, d, h, w) or (B, C, d, h, w) -> the diffusion model's units, ``(z - shift) * scale``
    (:func:`latent_normalisation`)."""
    shift, scale = latent_normalisation(stats, mode)
    return (z - _per_channel(z, shift)) * _per_channel(z, scale)


def denormalise_latent(z: torch.Tensor, stats: dict[str, Any], mode: str) -> torch.Tensor:
    """Inverse of :func:`normalise_latent`: a diffusion sample (C, d, h, w) or (B, C, d, h, w) -> a latent the
    VAE decodes, ``z / scale + shift``."""
    shift, scale = latent_normalisation(stats, mode)
    return z / _per_channel(z, scale) + _per_channel(z, shift)


def check_output_dir(path: Path) -> None:
    """Raise ValueError when ``path`` cannot be (or become) a folder to write into; creates nothing.

    The scripts check their output folder before any work and create it only when they have something to
    write, so a failed run leaves no empty folder behind.
    """
    existing = next(folder for folder in (path, *path.parents) if folder.exists())  # the nearest one above
    if existing == path and not path.is_dir():
        raise ValueError(f"{path}: output folder is a file")
    if not existing.is_dir():
        raise ValueError(f"{path}: cannot create the output folder ({existing} is a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: no permission to write in {existing}")


def latent_affine(preprocessed_affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the latent grid: latent voxel i is the centre of preprocessed voxels [f·i, f·i + f)."""
    block = np.diag([factor, factor, factor, 1.0])
    block[:3, 3] = (factor - 1) / 2
    return np.asarray(preprocessed_affine, dtype=np.float64) @ block


def latent_suffix(path: str | Path) -> str:
    """The latent format of a file name (one of :data:`LATENT_FORMATS`); ValueError for anything else."""
    name = Path(path).name.lower()
    for suffix in LATENT_FORMATS:
        if name.endswith("." + suffix):
            return suffix
    raise ValueError(f"{path}: unknown latent format (expected .{', .'.join(LATENT_FORMATS)})")


def write_latent(latent: torch.Tensor, path: str | Path, affine: np.ndarray) -> None:
    """Write a latent (C, d, h, w) with ``checkpoints.atomic_write`` (temporary file + rename; the mode of any
    new file) as .npy, .pt or .nii.gz (d, h, w, C) with ``affine``."""
    suffix = latent_suffix(path)
    # a copy: torch.save of a view (one latent of a batch) stores the whole batch it was cut from
    array = latent.detach().float().cpu().clone(memory_format=torch.contiguous_format)
    if suffix == "npy":
        atomic_write(path, lambda file: np.save(file, array.numpy()), kind="latent")
    elif suffix == "pt":
        atomic_write(path, lambda file: torch.save(array, file), kind="latent")
    else:
        image = nib.Nifti1Image(np.moveaxis(array.numpy(), 0, -1), affine)
        data = gzip.compress(
            image.to_bytes(), 1, mtime=0
        )  # no timestamp: the same latent gives the same bytes
        atomic_write(path, lambda file: file.write(data), kind="latent")


def read_latent(path: str | Path) -> tuple[torch.Tensor, np.ndarray | None]:
    """(latent (C, d, h, w) float32, affine or None for .npy/.pt) of a file written by :func:`write_latent`;
    DataError when there is no such file."""
    if not Path(path).is_file():
        raise DataError(f"{path}: latent file not found")
    suffix = latent_suffix(path)
    if suffix == "npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float(), None
    if suffix == "pt":
        return torch.load(path, map_location="cpu", weights_only=True).float(), None
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32).reshape(*image.shape[:3], -1)  # a 3-D file: C = 1
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0))), np.asarray(image.affine)
