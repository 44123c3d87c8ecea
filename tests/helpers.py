"""Test helpers shared by several test modules (tiny checkpoints, synthetic volumes, splits, train args).

Test modules import these from here (``from helpers import ...``) instead of from each other.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from checkpoints import inference_checkpoint, save_checkpoint
from config import Config, load_config
from model import build_vae

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (24, 28, 20)  # the tiny training volumes (2 mm) and preprocessing.target_shape of the train tests
# the tiny 2-level VAE (f = 2, 2 latent channels) of tiny_checkpoint and tiny_overrides
TINY_MODEL = {
    "channels": [8, 16],
    "latent_channels": 2,
    "num_res_blocks": [1, 1],
    "attention_levels": [False, False],
    "norm_num_groups": 4,
}


def tiny_checkpoint(
    path: Path, target_shape: tuple[int, int, int] = (24, 28, 20), perceptual: dict | None = None
) -> Path:
    """A random-weight 2-level VAE (f = 2, 2 latent channels) checkpoint with a small preprocessing grid.

    ``perceptual``: the config's ``perceptual`` section (default: the ``random`` backbone).
    """
    config = Config.from_dict(
        {
            "model": TINY_MODEL,
            "preprocessing": {"target_shape": list(target_shape)},
            "perceptual": perceptual or {"backbone": "random"},
        }
    )
    torch.manual_seed(0)
    save_checkpoint(inference_checkpoint(build_vae(config.model), config, None), path)
    return path


def flip_byte_in_largest_tensor(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor record of a ``torch.save`` zip archive, in place (a
    weight changes; the record's CRC-32 no longer matches). Returns the record's name."""
    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if re.search(r"/data/\d+$", info.filename)]
    record = max(tensors, key=lambda info: info.file_size)
    with open(path, "r+b") as file:
        file.seek(record.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", file.read(4))
        offset = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        file.seek(offset)
        byte = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([byte ^ 0x10]))
    return record.filename


def randomise_group_norms(model: torch.nn.Module) -> None:
    """Give GroupNorm affines non-trivial values (MONAI and we initialise them to 1 / 0), so that equivalence
    tests exercise them."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)


def maisi_reference(
    channels: tuple[int, ...],
    num_res_blocks: tuple[int, ...],
    latent_channels: int,
    norm_num_groups: int,
    use_convtranspose: bool = False,
    seed: int = 0,
) -> torch.nn.Module:
    """A MONAI ``AutoencoderKlMaisi`` (no attention, training mode): random weights from ``seed``, GroupNorm
    affines randomised too, so that a converted copy is checked on every parameter."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    torch.manual_seed(seed)
    model = AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_res_blocks=num_res_blocks,
        num_channels=channels,
        attention_levels=(False,) * len(channels),
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        norm_eps=1e-6,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
        use_checkpointing=False,
        use_convtranspose=use_convtranspose,
        num_splits=1,
        dim_split=1,
        norm_float16=False,
        save_mem=False,
    )
    randomise_group_norms(model)
    return model


def tiny_maisi(channels: tuple[int, ...] = (8, 16), seed: int = 0) -> torch.nn.Module:
    """:func:`maisi_reference` with TINY_MODEL's layout (``channels`` aside), in eval mode."""
    return maisi_reference(
        channels,
        TINY_MODEL["num_res_blocks"],
        TINY_MODEL["latent_channels"],
        TINY_MODEL["norm_num_groups"],
        seed=seed,
    ).eval()


def write_volume(path: Path, shape: tuple[int, int, int], affine: np.ndarray, seed: int = 0) -> Path:
    """A smooth int16 ellipsoid 'brain' with noise, zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt(((grid / rng.uniform(0.6, 0.8, (3, 1, 1, 1))) ** 2).sum(0))
    image = np.where(radius < 1, 300 + 200 * np.cos(4 * radius) + rng.normal(0, 10, shape), 0)
    nib.save(nib.Nifti1Image(np.clip(image, 0, None).astype(np.int16), affine), path)
    return path


def oblique_affine() -> np.ndarray:
    """Rotated (20° and 15°), anisotropic (1.5, 1.8, 2.2 mm), LPS-ish axes, arbitrary origin."""
    a, b = np.deg2rad(20), np.deg2rad(15)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([-1.5, -1.8, 2.2])
    affine[:3, 3] = [30.0, 20.0, -25.0]
    return affine


def make_split(folder: Path, n: int, shape: tuple[int, int, int] = (26, 30, 22)) -> Path:
    """A CSV of ``n`` synthetic volumes with extra columns (one with a missing value)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [
        write_volume(folder / f"sub{i:02d}.nii.gz", shape, oblique_affine(), seed=i).name for i in range(n)
    ]
    frame = pd.DataFrame(
        {
            "subject_id": [f"sub{i:02d}" for i in range(n)],
            "image": names,
            "age": [20.5 + i for i in range(n)],
            "site": ["HH" if i % 2 else None for i in range(n)],
        }
    )
    frame.to_csv(folder / "split.csv", index=False)
    return folder / "split.csv"


def make_tiny_split(folder: Path) -> tuple[Path, Path]:
    """Six smooth synthetic 'heads' at 2 mm (a bright ellipsoid with texture), as train (4) / val (2) CSVs."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    rows = []
    for i in range(6):
        radii = rng.uniform(0.6, 0.9, size=3)
        inside = ((grid / radii[:, None, None, None]) ** 2).sum(0) < 1
        texture = ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.5)
        volume = np.where(inside, 300 + 2000 * texture + 100 * i, 0).clip(0).astype(np.int16)
        path = folder / f"sub{i}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), path)
        rows.append({"subject_id": f"sub{i}", "image": path.name, "age": 20 + i})
    pd.DataFrame(rows[:4]).to_csv(folder / "train.csv", index=False)
    pd.DataFrame(rows[4:]).to_csv(folder / "val.csv", index=False)
    return folder / "train.csv", folder / "val.csv"


def tiny_settings(
    tmp_path: Path, split: tuple[Path, Path], run_name: str = "tiny", **train_values
) -> list[str]:
    """``section.key=JSON`` overrides for a tiny 2-level model on ``split`` writing under ``tmp_path``."""
    values = {
        "data.train_csv": str(split[0]),
        "data.val_csv": str(split[1]),
        "data.demo_dir": None,
        "data.num_workers": 0,
        "data.cache": "memory",
        **{f"model.{key}": value for key, value in TINY_MODEL.items()},
        "discriminator.channels": 8,
        "discriminator.num_layers": 2,
        "preprocessing.target_shape": list(SHAPE),
        "augmentation.enabled": False,
        "train.run_name": run_name,
        "train.runs_dir": str(tmp_path / "runs"),
        "train.best_runs_dir": str(tmp_path / "best_runs"),
        "train.batch_size": 2,
        "train.num_epochs": 2,
        "train.gan_start_epoch": 1,
        "train.perceptual_weight": 0.1,
        "train.learning_rate": 1e-3,
        "train.seed": 7,
    }
    values.update({f"train.{k}": v for k, v in train_values.items()})
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def tiny_config(
    tmp_path: Path,
    split: tuple[Path, Path],
    run_name: str = "tiny",
    extra: tuple[str, ...] = (),
    **train_values,
) -> Config:
    """The ``Config`` of :func:`tiny_settings` (for ``train.fit``), plus ``extra`` ``section.key=JSON`` overrides."""
    return load_config(
        REPO_ROOT / "config.json", [*tiny_settings(tmp_path, split, run_name, **train_values), *extra]
    )


def tiny_overrides(
    tmp_path: Path, split: tuple[Path, Path], run_name: str = "tiny", **train_values
) -> list[str]:
    """train.py's command line (``--config_file`` + ``--set``) for :func:`tiny_settings`."""
    args = ["--config_file", str(REPO_ROOT / "config.json")]
    for setting in tiny_settings(tmp_path, split, run_name, **train_values):
        args += ["--set", setting]
    return args


def run_train_subprocess(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


INPUT_FAULTS = ("checkpoint", "no_input", "all_fail_preflight", "output_is_a_file")


def faulty_inputs(tmp_path: Path, fault: str) -> tuple[Path, Path, Path]:
    """(checkpoint, split, output folder) of an infer/save_latent run broken by ``fault`` (INPUT_FAULTS)."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    split = make_split(tmp_path / "data", 1)
    out = tmp_path / "new" / "out"
    if fault == "checkpoint":
        checkpoint.write_bytes(b"")
    elif fault == "no_input":
        split = tmp_path / "nowhere.csv"
    elif fault == "all_fail_preflight":
        (tmp_path / "data" / "sub00.nii.gz").write_text("not an image")
    else:
        out = tmp_path / "a_file"
        out.write_text("")
    return checkpoint, split, out


def assert_failed_before_writing(tmp_path: Path, fault: str, code: int, error: str, out: Path) -> None:
    """The run of :func:`faulty_inputs` failed with one clean error and left no output folder behind."""
    assert code == (1 if fault == "all_fail_preflight" else 2)
    assert "Traceback" not in error and "vol/s" not in error  # no progress bar either
    if fault == "output_is_a_file":
        assert error.splitlines() == [f"ERROR: {out}: output folder is a file"]
    else:
        assert not (tmp_path / "new").exists()
