"""Encode a split with a trained VAE into one latent file per volume, for training a latent diffusion model.

    python save_latent.py --model_checkpoint best_runs/<run>/best_model.pt --dataset data_csvs/train.csv \\
        [--output_dir latents/train] [--mode mean|sample] [--format npy|nii.gz|pt] [--batch_size 4]

Writes to ``--output_dir``:

* ``<subject_id>.<format>``: the latent (C, d, h, w) float32 (``nii.gz``: (d, h, w, C) with the latent affine),
  the posterior mean, or (``--mode sample``) a draw seeded per row (``--seed`` + subject id), so reruns match;
* ``manifest.csv``: every input row with ALL its columns + ``latent_path`` (rows that failed are left out);
* ``latent_stats.json``: latent shape, per-channel mean/std, global std, ``scale_factor`` = 1/std, the mode,
  the checkpoint's sha256 and the number of volumes.

Resumable: latents that already exist are kept (``--overwrite`` re-encodes them); each one is written atomically
(temporary file + rename); batches are fixed chunks of rows (resume with the same ``--batch_size``); the
statistics are streamed over every latent of the manifest, read back from disk in row order. So a killed and
resumed run ends with the same latents, manifest and statistics as an uninterrupted one. Files that fail the pre-flight check or preprocessing are listed at the end (exit code 1); every other
latent is still written.

The helpers in the "shared with infer.py" section (model flags and loading, the worker-process data loader,
seeded sampling, latent files and their affine) are the one implementation that ``infer.py`` imports.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from config import Config, ConfigError, ModelConfig, PreprocessingConfig
from dataset import DataError, PreprocessedVolume, check_files, preprocess_volume, read_split
from metrics import LatentStatistics
from model import MaisiVAE, load_vae
from utils import CheckpointError, autocast, resolve_amp_dtype, resolve_device

LATENT_FORMATS = ("npy", "nii.gz", "pt")
SETTINGS_FILE = ".save_latent_settings.json"

# ------------------------------------------------------------------------------------- shared with infer.py


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Checkpoint, MAISI model flags, device, AMP, batch size and loader workers."""
    parser.add_argument(
        "--model_checkpoint", required=True, help="best_model.pt / last.pt, or a MAISI state dict"
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    parser.add_argument("--batch_size", type=positive_int, default=2, help="volumes per forward pass")
    parser.add_argument(
        "--num_workers", type=int, default=2, help="DataLoader processes that preprocess volumes"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed of sampled latents")
    maisi = parser.add_argument_group("MAISI state dict (a bare state dict carries no config)")
    maisi.add_argument("--maisi_channels", type=int, nargs="+", help="e.g. 64 128 256")
    maisi.add_argument("--maisi_num_res_blocks", type=int, nargs="+", help="e.g. 2 2 2")
    maisi.add_argument("--maisi_latent_channels", type=int, default=4)
    maisi.add_argument("--maisi_norm_num_groups", type=int, default=32)
    maisi.add_argument("--maisi_attention_levels", type=int, nargs="+", help="0/1 per level (default all 0)")


def maisi_model_config(args: argparse.Namespace) -> ModelConfig | None:
    """The ModelConfig given by the ``--maisi_*`` flags, or None when ``--maisi_channels`` is absent."""
    if args.maisi_channels is None:
        return None
    levels = len(args.maisi_channels)
    model = ModelConfig(
        channels=tuple(args.maisi_channels),
        num_res_blocks=tuple(args.maisi_num_res_blocks or [1] * levels),
        attention_levels=tuple(bool(a) for a in (args.maisi_attention_levels or [0] * levels)),
        latent_channels=args.maisi_latent_channels,
        norm_num_groups=args.maisi_norm_num_groups,
    )
    model.validate()
    return model


def preflight_failures(frame: pd.DataFrame) -> dict[int, str]:
    """Row index -> "<image>: <problem>" for every row that fails ``dataset.check_files`` (as in training)."""
    report = check_files(frame)
    return {
        i: f"{image}: {problem}"
        for i, (image, problem) in enumerate(zip(report["image"], report["problem"], strict=True))
        if problem
    }


def output_paths(frame: pd.DataFrame, output_dir: Path, suffix: str) -> list[Path]:
    """One path ``<output_dir>/<subject_id><suffix>`` per row (subject ids must be unique)."""
    ids = frame["subject_id"].astype(str)
    duplicated = sorted(set(ids[ids.duplicated()]))
    if duplicated:
        raise DataError(f"subject_id must be unique to name the output files; duplicated: {duplicated}")
    return [output_dir / f"{sid.replace(os.sep, '_')}{suffix}" for sid in ids]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class LoadedModel:
    vae: MaisiVAE
    config: Config
    checkpoint: dict[str, Any]
    device: torch.device
    amp_dtype: torch.dtype | None


def load_model(args: argparse.Namespace) -> LoadedModel:
    """``model.load_vae`` (weights_only) on ``--device``; raises CheckpointError / ConfigError naming the file."""
    device = resolve_device(args.device)
    vae, config, checkpoint = load_vae(args.model_checkpoint, device, maisi_model_config(args))
    return LoadedModel(vae, config, checkpoint, device, resolve_amp_dtype(args.amp, device))


class PreprocessedRows(Dataset):
    """Row ``i`` of a split frame -> ``{"index": i, "volume": PreprocessedVolume | None, "error": str}``.

    Preprocessing errors are returned, not raised, so one bad file does not stop a DataLoader.
    """

    def __init__(self, frame: pd.DataFrame, prep: PreprocessingConfig, indices: list[int]) -> None:
        self.images, self.masks = list(frame["image"]), list(frame["mask"])
        self.prep, self.indices = prep, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        try:
            volume = preprocess_volume(self.images[index], self.prep, self.masks[index])
        except (DataError, OSError, ValueError, RuntimeError) as error:
            return {"index": index, "volume": None, "error": f"{self.images[index]}: {error}"}
        return {"index": index, "volume": volume, "error": ""}


def preprocessed_batches(
    frame: pd.DataFrame, prep: PreprocessingConfig, indices: list[int], batch_size: int, num_workers: int
) -> Iterator[list[dict[str, Any]]]:
    """Batches (lists) of :class:`PreprocessedRows` items in row order, preprocessed in worker processes."""
    loader = DataLoader(
        PreprocessedRows(frame, prep, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader


def row_seed(seed: int, subject_id: str) -> int:
    """A per-row seed from the base seed and the subject id (independent of row order and batching)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()[:8], "little") >> 1


@torch.no_grad()
def encode_batch(
    model: LoadedModel, volumes: list[PreprocessedVolume], sample: bool, seeds: list[int]
) -> torch.Tensor:
    """Latents (B, C, d, h, w) float32 on the CPU: ``mu``, or ``mu + sigma * eps`` with eps drawn per row on the
    CPU from ``seeds`` (so a draw is the same on every device and in every batch)."""
    images = torch.stack([v.image for v in volumes]).to(model.device)
    with autocast(model.device, model.amp_dtype):
        mu, sigma = model.vae.encode(images)
    latents = mu.float().cpu()
    if sample:
        noise = torch.stack(
            [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
        )
        latents = latents + sigma.float().cpu() * noise
    return latents


def latent_affine(preprocessed_affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the latent grid: latent voxel i is the centre of preprocessed voxels [f·i, f·i + f)."""
    block = np.diag([factor, factor, factor, 1.0])
    block[:3, 3] = (factor - 1) / 2
    return np.asarray(preprocessed_affine, dtype=np.float64) @ block


def preprocessed_affine_from_latent(affine: np.ndarray, factor: int) -> np.ndarray:
    """Inverse of :func:`latent_affine`."""
    return np.asarray(affine, dtype=np.float64) @ np.linalg.inv(latent_affine(np.eye(4), factor))


def latent_suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    for suffix in LATENT_FORMATS:
        if name.endswith("." + suffix):
            return suffix
    raise ValueError(f"{path}: unknown latent format (expected .{', .'.join(LATENT_FORMATS)})")


def write_latent(latent: torch.Tensor, path: str | Path, affine: np.ndarray) -> None:
    """Write a latent (C, d, h, w) atomically (temporary file + rename) as .npy, .pt or .nii.gz (d, h, w, C)."""
    path = Path(path)
    suffix = latent_suffix(path)
    array = latent.detach().float().cpu().contiguous()
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix="." + suffix, dir=path.parent)
    os.close(handle)
    try:
        if suffix == "npy":
            np.save(temp, array.numpy())
        elif suffix == "pt":
            torch.save(array, temp)
        else:
            nib.save(nib.Nifti1Image(np.moveaxis(array.numpy(), 0, -1), affine), temp)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def read_latent(path: str | Path) -> tuple[torch.Tensor, np.ndarray | None]:
    """(latent (C, d, h, w) float32, affine or None for .npy/.pt) of a file written by :func:`write_latent`."""
    suffix = latent_suffix(path)
    if suffix == "npy":
        return torch.from_numpy(np.load(path, allow_pickle=False)).float(), None
    if suffix == "pt":
        return torch.load(path, map_location="cpu", weights_only=True).float(), None
    image = nib.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.ndim == 3:
        data = data[..., None]
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0))), np.asarray(image.affine)


# --------------------------------------------------------------------------------------------------- main


def check_settings(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume into a folder whose latents were made with another checkpoint / mode / seed."""
    path = output_dir / SETTINGS_FILE
    if path.is_file() and not overwrite:
        previous = json.loads(path.read_text())
        if previous != settings:
            raise DataError(
                f"{output_dir} holds latents made with other settings ({previous}, now {settings}); "
                "use --overwrite or another --output_dir"
            )
    path.write_text(json.dumps(settings, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when every row was encoded, 1 when some failed, 2 on a fatal error (bad checkpoint/split)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, help="split CSV, folder of NIfTI files or one NIfTI file")
    parser.add_argument("--output_dir", default="latents")
    parser.add_argument("--mode", default="mean", choices=["mean", "sample"])
    parser.add_argument("--format", default="npy", choices=LATENT_FORMATS)
    parser.add_argument("--overwrite", action="store_true", help="re-encode latents that already exist")
    args = parser.parse_args(argv)

    try:
        model = load_model(args)
        frame = read_split(args.dataset)
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = output_paths(frame, output_dir, f".{args.format}")
        checkpoint_sha256 = sha256_file(args.model_checkpoint)
        settings = {"checkpoint_sha256": checkpoint_sha256, "mode": args.mode, "seed": args.seed}
        check_settings(output_dir, settings, args.overwrite)
    except (CheckpointError, ConfigError, DataError, ValueError, RuntimeError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    for stale in output_dir.glob(".*.partial-*"):  # temporary files of a killed run
        stale.unlink()
    factor = model.vae.downsample_factor

    # pre-flight: the same per-file check as training; bad rows are reported at the end
    failures = preflight_failures(frame)
    # batches are fixed chunks of the good rows; a chunk with a missing latent is re-encoded whole, so every
    # latent comes from the same batch as in an uninterrupted run (results depend on the batch in the last bits)
    good = [i for i in range(len(frame)) if i not in failures]
    chunks = [good[k : k + args.batch_size] for k in range(0, len(good), args.batch_size)]
    todo = [
        i for chunk in chunks if args.overwrite or not all(paths[i].is_file() for i in chunk) for i in chunk
    ]
    print(
        f"{len(frame)} rows: {len(good) - len(todo)} latents kept, {len(todo)} to encode, {len(failures)} failed "
        f"the pre-flight check; device {model.device}, mode {args.mode}, batch size {args.batch_size}"
    )
    ids = list(frame["subject_id"].astype(str))
    batches = preprocessed_batches(frame, model.config.preprocessing, todo, args.batch_size, args.num_workers)
    with tqdm(total=len(todo), desc="encode", unit="vol") as progress:
        for batch in batches:
            failures.update({item["index"]: item["error"] for item in batch if item["error"]})
            loaded = [item for item in batch if not item["error"]]
            if loaded:
                seeds = [row_seed(args.seed, ids[item["index"]]) for item in loaded]
                volumes = [item["volume"] for item in loaded]
                latents = encode_batch(model, volumes, args.mode == "sample", seeds)
                for item, volume, latent in zip(loaded, volumes, latents, strict=True):
                    affine = latent_affine(volume.inverse.output_affine, factor)
                    write_latent(latent, paths[item["index"]], affine)
            progress.update(len(batch))

    # statistics over every latent of the manifest, in row order, read back from disk (resume-proof)
    written = [i for i in range(len(frame)) if i not in failures and paths[i].is_file()]
    stats = LatentStatistics(model.vae.latent_channels)
    latent_shape: list[int] | None = None
    for i in tqdm(written, desc="statistics", unit="vol"):
        latent, _ = read_latent(paths[i])
        latent_shape = list(latent.shape)
        stats.update(latent[None])
    manifest = frame.iloc[written].assign(latent_path=[str(paths[i].resolve()) for i in written])
    manifest.to_csv(output_dir / "manifest.csv", index=False)
    if written:
        summary = {
            "latent_shape": latent_shape,
            **stats.summary(),
            "mode": args.mode,
            "seed": args.seed if args.mode == "sample" else None,
            "format": args.format,
            "checkpoint": str(Path(args.model_checkpoint).resolve()),
            "checkpoint_sha256": checkpoint_sha256,
            "num_volumes": len(written),
        }
        (output_dir / "latent_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"{len(written)} latents {latent_shape} in {output_dir}; std {summary['std']:.4g}, "
            f"scale_factor {summary['scale_factor']:.4g}"
        )
    if failures:
        lines = "\n".join(f"  {failures[i]}" for i in sorted(failures))
        print(
            f"ERROR: {len(failures)} of {len(frame)} file(s) failed (left out of the manifest):\n{lines}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
