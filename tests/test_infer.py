"""infer.py: exact grid/affine round trips, latent affine, --decode (+ --denormalise), checkpoint refusal,
partial CSV failures."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    INPUT_FAULTS,
    assert_failed_before_writing,
    faulty_inputs,
    make_split,
    oblique_affine,
    tiny_checkpoint,
    write_volume,
)

import infer
from checkpoints import CHECKPOINT_FORMAT
from config import Config
from dataset import preprocess_volume
from latents import normalise_latent, read_latent, write_latent


def assert_same_grid(recon_path: Path, input_path: Path) -> None:
    recon, source = nib.load(recon_path), nib.load(input_path)
    assert recon.shape == source.shape[:3]
    np.testing.assert_allclose(recon.affine, source.affine, atol=1e-5)


def test_native_ixi_round_trip(ixi_dir: Path, tmp_path: Path) -> None:
    """Full-head native P,S,R 120x120x90 files: reconstruction on exactly the input's grid and affine."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt", target_shape=(91, 109, 91))
    native = pd.read_csv(ixi_dir / "native" / "native.csv").head(2)
    native["image"] = [str(ixi_dir / "native" / p) for p in native["image"]]
    native.to_csv(tmp_path / "native.csv", index=False)
    out = tmp_path / "out"
    argv = ["--model_checkpoint", str(checkpoint), "--input_data", str(tmp_path / "native.csv")]
    assert (
        infer.main(
            [*argv, "--output_dir", str(out), "--device", "cpu", "--num_workers", "0", "--no_lpips"]
            + ["--no_region_metrics"]  # two 2 mm segmentations would add minutes; regions tested below
        )
        == 0
    )
    for subject_id, image in zip(native["subject_id"], native["image"], strict=True):
        assert_same_grid(out / f"{subject_id}_recon.nii.gz", Path(image))
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 2 and {"psnr", "ssim_brain", "ms_ssim", "mse_brain"} <= set(metrics.columns)


def test_oblique_round_trip_and_latent_affine(tmp_path: Path) -> None:
    """Oblique anisotropic input: exact input grid back; latent voxel centres = centres of their 2-blocks."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    image = write_volume(tmp_path / "oblique.nii.gz", (30, 26, 22), oblique_affine())
    out = tmp_path / "out"
    argv = ["--model_checkpoint", str(checkpoint), "--input_data", str(image), "--output_dir", str(out)]
    assert infer.main([*argv, "--device", "cpu", "--num_workers", "0", "--no_lpips"]) == 0
    recon = nib.load(out / "oblique_recon.nii.gz")
    assert_same_grid(out / "oblique_recon.nii.gz", image)
    assert np.asarray(recon.dataobj).max() > 0

    factor = 2
    latent = nib.load(out / "oblique_latent.nii.gz")
    assert latent.shape == (12, 14, 10, 2)  # ceil((24, 28, 20) / 2), channels last
    grid = preprocess_volume(
        image, Config.from_dict({"preprocessing": {"target_shape": [24, 28, 20]}}).preprocessing
    )
    preprocessed_affine = grid.inverse.output_affine
    for ijk in [(0, 0, 0), (5, 3, 7), (11, 13, 9)]:
        block = np.stack(np.meshgrid(*[factor * i + np.arange(factor) for i in ijk], indexing="ij")).reshape(
            3, -1
        )
        block_world = (preprocessed_affine[:3, :3] @ block + preprocessed_affine[:3, 3:]).mean(1)
        latent_world = latent.affine[:3, :3] @ np.array(ijk) + latent.affine[:3, 3]
        np.testing.assert_allclose(latent_world, block_world, atol=1e-4)


def test_decode_gives_the_reconstruction(tmp_path: Path) -> None:
    """An input already on the preprocessed grid: --decode of the mean latent == the unit reconstruction."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-23.0, -27.0, -19.0]
    image = write_volume(tmp_path / "ras.nii.gz", (24, 28, 20), affine)
    out = tmp_path / "out"
    common = ["--model_checkpoint", str(checkpoint), "--output_dir", str(out), "--device", "cpu"]
    assert (
        infer.main(
            [*common, "--input_data", str(image), "--intensity", "unit", "--num_workers", "0", "--no_lpips"]
        )
        == 0
    )
    assert infer.main([*common, "--decode", str(out / "ras_latent.nii.gz")]) == 0
    decoded, recon = nib.load(out / "ras_latent_decoded.nii.gz"), nib.load(out / "ras_recon.nii.gz")
    assert decoded.shape == (24, 28, 20)
    np.testing.assert_allclose(decoded.affine, affine, atol=1e-5)
    np.testing.assert_allclose(decoded.get_fdata(), recon.get_fdata(), atol=1e-6)
    assert decoded.get_fdata().min() >= 0.0 and decoded.get_fdata().max() <= 1.0


def test_refuses_checkpoint_with_pickled_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": argparse.Namespace(x=1)}, bad)
    image = write_volume(tmp_path / "a.nii.gz", (24, 28, 20), np.diag([2.0, 2.0, 2.0, 1.0]))
    code = infer.main(
        ["--model_checkpoint", str(bad), "--input_data", str(image), "--output_dir", str(tmp_path)]
    )
    error = capsys.readouterr().err
    assert code != 0
    assert "refusing to load" in error and str(bad) in error
    assert not (tmp_path / "a_recon.nii.gz").exists()


def test_csv_with_one_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Good files are processed (with LPIPS3D), the broken one is listed, the exit code is non-zero."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    good = [
        write_volume(tmp_path / f"good{i}.nii.gz", (26, 30, 22), oblique_affine(), seed=i) for i in range(2)
    ]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    pd.DataFrame({"image": [good[0].name, broken.name, good[1].name], "age": [30, 40, 50]}).to_csv(
        tmp_path / "split.csv", index=False
    )
    out = tmp_path / "out"
    argv = ["--model_checkpoint", str(checkpoint), "--input_data", str(tmp_path / "split.csv")]
    code = infer.main(
        [*argv, "--output_dir", str(out), "--device", "cpu", "--num_workers", "0", "--batch_size", "2"]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.nii.gz" in captured.err and "1 of 3" in captured.err
    for path in good:
        assert_same_grid(out / f"{path.name[:-7]}_recon.nii.gz", path)
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["subject_id"]) == ["good0", "good1"]
    assert {"lpips", "lpips_brain", "psnr_brain"} <= set(metrics.columns)
    assert "psnr" in captured.out and "±" in captured.out


def test_maisi_state_dict_with_model_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bare MONAI AutoencoderKlMaisi state dict loads with --maisi_* flags (preprocessing: config defaults)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

    torch.manual_seed(0)
    maisi = AutoencoderKlMaisi(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_res_blocks=(1, 1),
        num_channels=(8, 16),
        attention_levels=(False, False),
        latent_channels=2,
        norm_num_groups=4,
        num_splits=1,
        norm_float16=False,
    )
    weights = tmp_path / "autoencoder_maisi.pt"
    torch.save(maisi.state_dict(), weights)
    image = write_volume(tmp_path / "a.nii.gz", (30, 26, 22), oblique_affine())
    argv = [
        "--model_checkpoint",
        str(weights),
        "--input_data",
        str(image),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    argv += ["--device", "cpu", "--num_workers", "0", "--no_lpips"]
    assert infer.main(argv) == 2
    assert "--maisi_channels" in capsys.readouterr().err
    flags = [
        "--maisi_channels",
        "8",
        "16",
        "--maisi_num_res_blocks",
        "1",
        "1",
        "--maisi_latent_channels",
        "2",
    ]
    assert infer.main([*argv, *flags, "--maisi_norm_num_groups", "4"]) == 0
    assert_same_grid(tmp_path / "out" / "a_recon.nii.gz", image)
    assert nib.load(tmp_path / "out" / "a_latent.nii.gz").shape == (46, 55, 46, 2)  # ceil((91, 109, 91) / 2)


def run_infer(checkpoint: Path, source: Path, out: Path, *extra: str) -> int:
    argv = ["--model_checkpoint", str(checkpoint), "--input_data", str(source), "--output_dir", str(out)]
    return infer.main([*argv, "--device", "cpu", "--num_workers", "0", *extra])


def infer_with_lpips_weights_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backbone: str, file_name: str
) -> tuple[str, pd.DataFrame]:
    """infer.py with a checkpoint whose perceptual.weights_path (a path on the training machine) is missing
    here: it succeeds with exactly one warning naming that path and no traceback. Returns (warning, metrics)."""
    missing = tmp_path / "training_machine" / file_name
    perceptual = {"backbone": backbone, "weights_path": str(missing)}
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt", perceptual=perceptual)
    assert run_infer(checkpoint, make_split(tmp_path / "data", 1), tmp_path / "out") == 0
    error = capsys.readouterr().err
    # the input (oblique, off the checkpoint's grid) draws its own pre-flight warning, pointing to prepare.py
    warnings = [
        line for line in error.splitlines() if line.startswith("WARNING") and "prepare.py" not in line
    ]
    assert len(warnings) == 1 and str(missing) in warnings[0]
    assert "Traceback" not in error
    return warnings[0], pd.read_csv(tmp_path / "out" / "metrics.csv")


@pytest.mark.skipif(
    importlib.util.find_spec("deepbet") is None, reason="the deepbet package is not installed"
)
def test_lpips_weights_of_the_training_machine_fall_back_to_installed_deepbet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """perceptual.weights_path is a path on the training machine: the installed deepbet model is used."""
    warning, metrics = infer_with_lpips_weights_missing(tmp_path, capsys, "deepbet", "model.pt")
    assert "deepbet" in warning
    assert metrics[["lpips", "lpips_brain"]].notna().all().all()


def test_lpips_without_weights_is_not_computed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """MedicalNet weights neither at the checkpoint's path nor in the torch-hub cache: one warning, no LPIPS."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    warning, metrics = infer_with_lpips_weights_missing(
        tmp_path, capsys, "medicalnet_resnet10", "resnet_10_23dataset.pth"
    )
    assert "not computed" in warning
    assert "psnr" in metrics.columns and not {"lpips", "lpips_brain"} & set(metrics.columns)


@pytest.mark.parametrize("fault", INPUT_FAULTS)
def test_failing_run_leaves_no_output_folder_and_builds_no_lpips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """Checkpoint, split, pre-flight check and output folder are checked before any set-up or writing."""
    built = []
    monkeypatch.setattr(infer, "build_metric_lpips", lambda *args: built.append(args))
    checkpoint, source, out = faulty_inputs(tmp_path, fault)
    code = run_infer(checkpoint, source, out)
    assert_failed_before_writing(tmp_path, fault, code, capsys.readouterr().err, out)
    assert built == []


def test_metrics_csv_carries_every_input_column(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    split = make_split(tmp_path / "data", 3)
    assert run_infer(checkpoint, split, tmp_path / "out", "--no_lpips") == 0
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    source = pd.read_csv(split)
    columns = list(metrics.columns)
    assert columns[:5] == ["subject_id", "image", "mask", "age", "site"]
    assert columns[-2:] == ["recon_path", "latent_path"] and "psnr" in columns[5:-2]
    assert list(metrics["subject_id"]) == list(source["subject_id"])
    assert list(metrics["age"]) == list(source["age"]) and metrics["site"].isna().sum() == 2


def test_decode_of_a_missing_latent_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    missing, out = tmp_path / "sub01_latent.nii.gz", tmp_path / "new" / "out"
    argv = ["--model_checkpoint", str(checkpoint), "--decode", str(missing), "--output_dir", str(out)]
    assert infer.main([*argv, "--device", "cpu"]) == 2
    assert capsys.readouterr().err.splitlines() == [f"ERROR: {missing}: latent file not found"]
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("mode", ["global", "channel"])
def test_decode_denormalises_a_latent_in_normalised_units(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """``--decode`` of a normalised latent with ``--denormalise`` gives the image ``--decode`` gives for the
    latent as saved; without it, another image."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    image = write_volume(tmp_path / "a.nii.gz", (24, 28, 20), np.diag([2.0, 2.0, 2.0, 1.0]))
    common = ["--model_checkpoint", str(checkpoint), "--device", "cpu"]
    raw_dir, sample_dir = tmp_path / "raw", tmp_path / "sample"
    assert infer.main([*common, "--input_data", str(image), "--output_dir", str(raw_dir), "--no_lpips"]) == 0
    stats = {"channel_mean": [0.3, -0.2], "channel_std": [0.5, 2.0], "scale_factor": 0.8}
    stats_path = tmp_path / "latent_stats.json"
    stats_path.write_text(json.dumps(stats))
    latent, affine = read_latent(raw_dir / "a_latent.nii.gz")
    sample_dir.mkdir()
    write_latent(normalise_latent(latent, stats, mode), sample_dir / "a_latent.nii.gz", affine)

    assert (
        infer.main([*common, "--decode", str(raw_dir / "a_latent.nii.gz"), "--output_dir", str(raw_dir)]) == 0
    )
    denormalised = [*common, "--decode", str(sample_dir / "a_latent.nii.gz"), "--output_dir", str(sample_dir)]
    assert infer.main([*denormalised, "--denormalise", mode, "--latent_stats", str(stats_path)]) == 0
    expected = nib.load(raw_dir / "a_latent_decoded.nii.gz").get_fdata()
    np.testing.assert_allclose(
        nib.load(sample_dir / "a_latent_decoded.nii.gz").get_fdata(), expected, atol=1e-5
    )
    assert infer.main(denormalised) == 0
    assert not np.allclose(nib.load(sample_dir / "a_latent_decoded.nii.gz").get_fdata(), expected, atol=1e-3)
    capsys.readouterr()

    assert (
        infer.main([*denormalised, "--denormalise", mode, "--latent_stats", str(tmp_path / "no.json")]) == 2
    )
    error = capsys.readouterr().err.splitlines()
    assert error == [
        f"ERROR: {tmp_path / 'no.json'}: latent statistics file not found (save_latent.py writes it)"
    ]
    with pytest.raises(SystemExit):
        infer.main([*denormalised, "--denormalise", mode])  # no --latent_stats
    assert "--denormalise needs --decode and --latent_stats" in capsys.readouterr().err


def test_in_brain_metrics_mask_source_and_background_of_offset_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """int16 files with scl_inter = 10 (background 10): without a mask column the in-brain metrics cover the
    estimated brain, not the whole volume (mask_source 'estimated'); with one, that mask ('csv'). The
    background comes back in --intensity original output (the input is larger than the model's grid, so its
    rim lies outside it). A head-sized mask gets one warning naming its file."""
    data = tmp_path / "data"
    data.mkdir()
    shape, affine = (28, 32, 24), np.diag([2.0, 2.0, 2.0, 1.0])  # the tiny checkpoint's grid: 24x28x20, 2 mm
    brain = np.asarray(nib.load(write_volume(data / "brain.nii.gz", shape, affine)).dataobj)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, size) for size in shape], indexing="ij"))
    head = np.where(brain > 0, brain, np.where((grid**2).sum(0) < 0.9, 60, 0))  # 63 % of the model's grid
    for name, values in [("offset", brain), ("masked", brain), ("head", head)]:
        image = nib.Nifti1Image(values.astype(np.int16), affine)
        image.header.set_slope_inter(1.0, 10.0)
        nib.save(image, data / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image((brain > 0).astype(np.uint8), affine), data / "mask.nii.gz")
    rows = {"image": ["offset.nii.gz", "masked.nii.gz", "head.nii.gz"], "mask": ["", "mask.nii.gz", ""]}
    pd.DataFrame(rows).to_csv(data / "split.csv", index=False)

    out = tmp_path / "out"
    assert run_infer(tiny_checkpoint(tmp_path / "vae.pt"), data / "split.csv", out, "--no_lpips") == 0
    error = capsys.readouterr().err
    metrics = pd.read_csv(out / "metrics.csv").set_index("subject_id")
    assert list(metrics["mask_source"]) == ["estimated", "csv", "estimated"]
    for name in ("offset", "masked"):
        assert metrics.loc[name, "psnr_brain"] != metrics.loc[name, "psnr"]
        assert metrics.loc[name, "mse_brain"] != metrics.loc[name, "mse"]
    mask_warnings = [line for line in error.splitlines() if "the brain mask" in line]  # not the grid warnings
    assert len(mask_warnings) == 1 and mask_warnings[0].startswith(
        f"WARNING: {data / 'head.nii.gz'}: the brain mask"
    )

    recon = np.asarray(nib.load(out / "offset_recon.nii.gz").dataobj)
    rim = np.ones(shape, bool)
    rim[2:-2, 2:-2, 2:-2] = False  # outside the centred 24x28x20 grid
    assert np.all(recon[rim] == 10.0) and recon.min() >= 10.0


def test_metrics_csv_has_region_columns_unless_switched_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """psnr/ssim/mae per tissue class in metrics.csv and the mean ± std table; none with --no_region_metrics."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    split = make_split(tmp_path / "data", 2)
    assert run_infer(checkpoint, split, tmp_path / "out", "--no_lpips") == 0
    metrics = pd.read_csv(tmp_path / "out" / "metrics.csv")
    region_columns = [f"{m}_{r}" for r in ("csf", "gm", "wm") for m in ("psnr", "ssim", "mae")]
    assert set(region_columns) <= set(metrics.columns)
    assert np.isfinite(metrics[region_columns].to_numpy()).all()  # oblique synthetic input: no MNI regions
    assert not {"psnr_left", "psnr_deep_gm"} & set(metrics.columns)
    assert (metrics["mae_gm"] > 0).all() and (metrics["ssim_wm"] <= 1).all()
    assert "psnr_gm" in capsys.readouterr().out
    assert run_infer(checkpoint, split, tmp_path / "plain", "--no_lpips", "--no_region_metrics") == 0
    plain = pd.read_csv(tmp_path / "plain" / "metrics.csv")
    assert not set(region_columns) & set(plain.columns)
    assert np.allclose(plain["psnr_brain"], metrics["psnr_brain"])
