"""Checkpoint files: the format, atomic save, safe load, resume, and the inference checkpoint.

Two kinds of file share one format tag (:data:`CHECKPOINT_FORMAT`): the training checkpoint
``runs/<run>/checkpoints/last.pt`` and the inference checkpoint ``best_runs/<run>/best_model.pt``. Either, or a
MAISI state dict, can seed a new run's VAE (``train.init_from``). Every file is written atomically (temporary
file in the same folder, fsync, ``os.replace``) and read only with ``torch.load(weights_only=True)``: a file
that needs code execution to load is refused, and so is one whose zip records fail their CRC-32 (a damaged
file; ``torch.load`` does not check them).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import nn

from config import Config, ConfigError, ModelConfig
from model import build_vae
from model.maisi_vae import MaisiVAE, convert_maisi_state_dict
from utils import DistributedContext, gather_rng_states, new_file_mode, set_rng_state

if TYPE_CHECKING:
    from train import TrainState

CHECKPOINT_FORMAT = "brain-vae3d/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or safely read."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], kind: str = "file") -> None:
    """Write ``path`` atomically: ``write`` fills a temporary file in the same folder, which is fsynced and
    renamed over ``path``, so a kill or a full disk at any moment leaves the old file (if any) intact.

    The file gets the mode of any new file under the process umask (e.g. 0644), not mkstemp's 0600.

    Raises CheckpointError (naming the ``kind`` of file, the path and the cause) when the write fails; the
    partial temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, new_file_mode())  # mkstemp makes it 0600; give it the mode of any new file
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(
                f"could not write {kind} {path}: {error.strerror or error}; the previous file (if any) "
                "is unchanged"
            ) from error
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """``torch.save(payload)`` to ``path`` with :func:`atomic_write`."""
    atomic_write(path, lambda file: torch.save(payload, file), kind="checkpoint")


def save_json(data: Any, path: str | Path) -> None:
    """``data`` as indented JSON in ``path``, with :func:`atomic_write`."""
    atomic_write(path, lambda file: file.write(json.dumps(data, indent=2).encode()), kind="JSON file")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; refuse anything that needs code execution.

    Every problem is a CheckpointError of one line naming the file: missing, empty, not a zip/pickle file,
    pickled Python objects (named by type; never unpickled), or damaged (every zip record's CRC-32 is checked
    first; a legacy non-zip file has none to check).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as file:
        head = file.read(4)
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save: a zip archive, or a pickle (legacy)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (not a zip/pickle file)")
    if head == b"PK\x03\x04":
        check_archive_crcs(path)
    try:
        with warnings.catch_warnings():  # torch's warnings about odd files would add lines to the one message
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        try:  # every refused type, read from the pickle's opcodes without executing them (zip format)
            objects = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # legacy or damaged file: the type torch's unpickler stopped at, if any
            objects = re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]
        if not objects:
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint (torch.load(weights_only=True) cannot read its pickle data)"
            ) from None
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled Python objects ({', '.join(objects)}) that would "
            "need code execution to load; only plain tensors and JSON-like metadata are accepted"
        ) from None
    except Exception as error:  # a damaged file can make torch.load raise almost anything
        raise _unreadable(path, error) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary")
    return payload


def check_archive_crcs(path: Path) -> None:
    """CheckpointError when a record of the zip archive ``torch.save`` wrote fails its CRC-32 (the file changed
    after it was written: a flipped bit, a bad copy); ``torch.load`` itself does not check them.

    Reads the whole file once more; BENCHMARKS.md (fault handling) gives the cost for the default model.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except Exception as error:  # a damaged directory or header: BadZipFile, struct.error, EOFError, …
        raise _unreadable(path, error) from None
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged: its record {damaged!r} fails the CRC-32 check of the zip archive (the file "
            "changed after it was saved); use another copy or an earlier checkpoint"
        )


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """One line naming ``path`` and the first sentence of ``error`` (no ANSI codes, no C++ source locations)."""
    lines = re.sub(r"\x1b\[[0-9;]*m|\[enforce fail at [^\]]*\][\s.]*", "", str(error)).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0].split('. ')[0]}" if lines else type(error).__name__
    return CheckpointError(f"could not read checkpoint {path} (damaged?): {reason}")


def training_checkpoint(
    state: TrainState,
    config: Config,
    context: DistributedContext,
    stage: str,
    latent_stats: dict[str, Any] | None,
) -> dict[str, Any]:
    """The payload of ``last.pt``: ``state.state_dict()`` plus the format, config, stage, every rank's RNG state
    and the latent statistics (collective under DDP: every rank must call it; rank 0 saves it)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        **state.state_dict(),
        "stage": stage,
        "rng": gather_rng_states(context),
        "world_size": context.world_size,
        "latent_stats": latent_stats,
    }


def resume(state: TrainState, path: Path, config: Config, context: DistributedContext) -> bool:
    """Restore ``state`` (weights, optimisers, scalers, counters, history) and this rank's RNG from ``path``.

    Returns whether the RNG streams were restored (only when the world size is unchanged). Raises
    CheckpointError for a file that is not a training checkpoint, ConfigError when its model config differs.
    """
    checkpoint = load_checkpoint(path)
    if checkpoint.get("format") != CHECKPOINT_FORMAT or "optimizer_g" not in checkpoint:
        raise CheckpointError(f"{path} is not a training checkpoint of this project (cannot resume)")
    _check_same_model(checkpoint, config.model, f"{path} was trained with another model config")
    state.load_state_dict(checkpoint)
    if checkpoint["world_size"] != context.world_size:
        return False
    set_rng_state(checkpoint["rng"][context.rank])
    return True


def inference_checkpoint(
    vae: MaisiVAE,
    config: Config,
    latent_stats: dict[str, Any] | None,
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The self-contained checkpoint that ``infer.py`` and ``save_latent.py`` need (``best_model.pt``).

    Holds the VAE weights, the effective config (model + preprocessing), the latent statistics
    (per-channel mean/std, ``scale_factor``) and metrics; loads with ``torch.load(weights_only=True)``.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "vae": vae.state_dict(),
        "latent_stats": latent_stats,
        "metrics": metrics or {},
        **extra,
    }


def save_best_model(
    best_dir: Path, vae: MaisiVAE, config: Config, record: dict[str, Any], global_step: int
) -> None:
    """``best_dir``/best_model.pt (:func:`inference_checkpoint` with the epoch's metrics and latent statistics),
    its config.json and metrics.json (the epoch's record), each written atomically."""
    metrics = {k: v for k, v in record.items() if k != "latent_stats"}
    payload = inference_checkpoint(
        vae, config, record["latent_stats"], metrics, epoch=record["epoch"], global_step=global_step
    )
    save_checkpoint(payload, best_dir / "best_model.pt")
    save_json(config.to_dict(), best_dir / "config.json")
    save_json(record, best_dir / "metrics.json")


def _check_same_model(checkpoint: dict[str, Any], model: ModelConfig, refusal: str) -> None:
    """ConfigError ``refusal: key: saved → current; …`` when ``checkpoint`` was saved with another model config."""
    saved, current = checkpoint["config"]["model"], Config(model=model).to_dict()["model"]
    differences = [
        f"{key}: {saved.get(key)!r} → {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise ConfigError(f"{refusal}: " + "; ".join(differences))


def check_state_dict_fits(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """CheckpointError naming ``source`` and the missing, unexpected and mis-shaped keys of ``state_dict`` for
    ``module`` (which may live on the meta device: only shapes are compared)."""
    own = module.state_dict()
    problems = {
        "missing keys": sorted(set(own) - set(state_dict)),
        "unexpected keys": sorted(set(state_dict) - set(own)),
        "shape mismatches": [
            f"{key}: {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
            for key in sorted(set(own) & set(state_dict))
            if own[key].shape != state_dict[key].shape
        ],
    }
    parts = [
        f"{kind} [{', '.join(items[:8])}{f' … (+{len(items) - 8} more)' if len(items) > 8 else ''}]"
        for kind, items in problems.items()
        if items
    ]
    if parts:
        raise CheckpointError(f"{source} does not fit the model config: " + "; ".join(parts))


def _is_state_dict(checkpoint: dict[str, Any]) -> bool:
    """A bare state dict (tensors only) or one wrapped under ``"state_dict"``, e.g. a MAISI release."""
    return all(isinstance(value, torch.Tensor) for value in checkpoint.values()) or "state_dict" in checkpoint


def _vae_weights(checkpoint: dict[str, Any], source: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """(the VAE weights in our layout, the kind of file, how errors name it) of one of our checkpoints or of a
    MAISI ``AutoencoderKlMaisi`` state dict (converted); CheckpointError naming ``source`` when it is neither
    (or a state dict the converter cannot map)."""
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        return checkpoint["vae"], "brain-vae3d checkpoint", source
    if not _is_state_dict(checkpoint):
        raise CheckpointError(
            f"{source} is neither a brain-vae3d checkpoint (format {CHECKPOINT_FORMAT!r}) nor a state dict"
        )
    try:
        converted = convert_maisi_state_dict(checkpoint)
    except (ValueError, NotImplementedError) as error:
        raise CheckpointError(f"{source} is not a MAISI AutoencoderKlMaisi state dict: {error}") from None
    return converted, "MAISI state dict", f"{source} (converted from the MAISI layout)"


def load_vae(
    path: str | Path,
    device: torch.device | str = "cpu",
    maisi_model: ModelConfig | None = None,
) -> tuple[MaisiVAE, Config, dict[str, Any]]:
    """Load a VAE for inference from one of our checkpoints, or from a MAISI state dict.

    Args:
        path: our checkpoint (``last.pt`` or ``best_model.pt``: weights + config + latent statistics), or a
            MONAI ``AutoencoderKlMaisi`` state dict (e.g. NVIDIA's ``autoencoder_v1.pt``).
        maisi_model: the model config of a MAISI state dict (it carries none); ignored for our checkpoints.
    Returns:
        (vae in eval mode on ``device``, the effective config, the raw checkpoint dict).
    """
    checkpoint = load_checkpoint(path)
    ours = checkpoint.get("format") == CHECKPOINT_FORMAT
    if not ours and maisi_model is None and _is_state_dict(checkpoint):
        raise ConfigError(
            f"{path} is a bare state dict (MAISI layout?): give its model config "
            "(e.g. infer.py --maisi_channels 64 128 256 --maisi_num_res_blocks 2 2 2)"
        )
    config = Config.from_dict(checkpoint["config"]) if ours else Config(model=maisi_model)
    weights, _, source = _vae_weights(checkpoint, str(path))
    vae = build_vae(config.model)
    check_state_dict_fits(vae, weights, source)
    vae.load_state_dict(weights)
    return vae.to(device).eval(), config, checkpoint


def check_init_from(path: str | Path, model_config: ModelConfig) -> None:
    """Everything :func:`init_vae_weights` would refuse, before a run sets anything up (no run folder is left by
    a refusal): the file exists, loads, and its weights fit ``model_config``'s VAE (built on the meta device:
    no memory, no draw from the RNG). Raises CheckpointError / ConfigError as :func:`init_vae_weights`."""
    with torch.device("meta"):
        vae = build_vae(model_config)
    _init_from_weights(vae, path, model_config)


def init_vae_weights(vae: nn.Module, path: str | Path, model_config: ModelConfig) -> str:
    """Load the weights of ``train.init_from`` into ``vae`` (built from ``model_config``) to start a new run.

    Args:
        vae: the run's fresh VAE; only its parameters change (optimisers, counters, discriminator are not here).
        path: one of our checkpoints (``best_model.pt`` / ``last.pt``: its VAE weights only; its model config
            must equal ``model_config``), or a MONAI ``AutoencoderKlMaisi`` state dict (NVIDIA's MAISI VAE
            layout; bare or under ``"state_dict"``, ``"module."`` prefixes allowed), converted to our layout.
    Returns:
        the kind of file: ``"brain-vae3d checkpoint"`` or ``"MAISI state dict"``.
    Raises:
        CheckpointError for a missing, unreadable or damaged file or weights that do not fit ``vae`` (naming the
        keys); ConfigError for one of our checkpoints trained with another model config (naming the keys).
    """
    weights, kind = _init_from_weights(vae, path, model_config)
    vae.load_state_dict(weights)
    return kind


def _init_from_weights(
    vae: nn.Module, path: str | Path, model_config: ModelConfig
) -> tuple[dict[str, torch.Tensor], str]:
    """(weights, kind) of :func:`_vae_weights` for a ``train.init_from`` file, checked to fit ``vae``; refused
    when it is one of our checkpoints saved with another model config than ``model_config``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"train.init_from: no checkpoint or MAISI state dict at {path}")
    checkpoint = load_checkpoint(path)
    source = f"train.init_from {path}"
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        refusal = f"{source} was trained with another model config (saved → this run)"
        _check_same_model(checkpoint, model_config, refusal)
    weights, kind, source = _vae_weights(checkpoint, source)
    check_state_dict_fits(vae, weights, source)
    return weights, kind
