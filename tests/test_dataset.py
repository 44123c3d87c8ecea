"""Tests for dataset.py: split reading, pre-flight checks, preprocessing + inverse, datasets."""

from __future__ import annotations

import dataclasses
import gzip
import subprocess
import sys
from pathlib import Path

import monai.transforms as mt
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.transform import Rotation

from config import AugmentationConfig, PreprocessingConfig
from dataset import (
    MAX_BRAIN_FRACTION,
    Augmentation,
    AugmentationDraw,
    DataError,
    VolumeDataset,
    background_value,
    brain_mask_warning,
    check_files,
    estimate_brain_mask,
    preflight,
    preprocess_volume,
    preprocessed_batches,
    preprocessing_cache_dir,
    read_split,
    restore_to_input_grid,
)
from dataset import main as dataset_main
from demo_cohort import make_demo_cohort

REPO = Path(__file__).resolve().parents[1]
IXI = REPO.parent / "shared" / "data" / "ixi"
needs_ixi = pytest.mark.skipif(not (IXI / "train.csv").is_file(), reason=f"IXI data not found at {IXI}")

SMALL_SHAPE = (16, 18, 14)
SMALL_PREP = PreprocessingConfig(target_shape=SMALL_SHAPE)


def brain_like(shape=SMALL_SHAPE, seed: int = 0) -> np.ndarray:
    """A positive ellipsoid 'brain' with texture on a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.6
    return np.where(inside, 100 + 50 * grid[2] + rng.uniform(0, 20, shape), 0).astype(np.float32)


def write(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------------------ read_split


def test_read_split_csv_relative_paths_and_extra_columns(tmp_path):
    (tmp_path / "img").mkdir()
    write(tmp_path / "img" / "a.nii.gz", brain_like())
    write(tmp_path / "img" / "b.nii.gz", brain_like())
    csv = tmp_path / "split.csv"
    csv.write_text("image,subject_id,age,sex\nimg/a.nii.gz,,40.5,F\nimg/b.nii.gz,0017,,\n")
    frame = read_split(csv)
    assert frame.loc[1, "subject_id"] == "0017"
    assert list(frame.columns[:3]) == ["subject_id", "image", "mask"]
    assert frame.loc[0, "image"] == str((tmp_path / "img" / "a.nii.gz").resolve())
    assert frame.loc[0, "subject_id"] == "a" and frame.loc[0, "mask"] is None
    assert frame.loc[0, "age"] == 40.5 and frame.loc[0, "sex"] == "F"


def test_read_split_folder_and_single_file(tmp_path):
    write(tmp_path / "b.nii", brain_like())
    write(tmp_path / "a.nii.gz", brain_like())
    (tmp_path / "notes.txt").write_text("x")
    assert list(read_split(tmp_path)["subject_id"]) == ["a", "b"]
    assert len(read_split(tmp_path / "b.nii")) == 1


def test_subject_id_rule_for_folder_file_and_csv(tmp_path):
    """subject_id cell when given, else the file name without .nii/.nii.gz and a trailing BIDS ``_T1w``."""
    names = ["sub-01_T1w.nii.gz", "IXI014-HH-1236_T1.nii.gz", "x_T1w.nii", "plain.NII.GZ"]
    expected = ["sub-01", "IXI014-HH-1236_T1", "x", "plain"]
    for name in names:
        write(tmp_path / name, brain_like())
    assert sorted(read_split(tmp_path)["subject_id"]) == sorted(expected)
    for name, subject_id in zip(names, expected, strict=True):
        assert list(read_split(tmp_path / name)["subject_id"]) == [subject_id]
    no_id_column = write_csv(tmp_path / "split.csv", [{"image": name} for name in names])
    assert list(read_split(no_id_column)["subject_id"]) == expected
    with_ids = write_csv(
        tmp_path / "ids.csv",
        [{"subject_id": "given", "image": names[0]}, {"subject_id": None, "image": names[2]}],
    )
    assert list(read_split(with_ids)["subject_id"]) == ["given", "x"]


def test_demo_file_has_one_subject_id_as_file_folder_and_csv_row(tmp_path):
    csv = make_demo_cohort(tmp_path, n_train=1, n_val=0, n_test=0)["train"]
    row = read_split(csv)
    image = Path(row.loc[0, "image"])
    assert image.name == "demo000_T1w.nii.gz"
    bare_csv = write_csv(tmp_path / "bare.csv", [{"image": str(image)}])
    ids = {
        "csv row": row.loc[0, "subject_id"],
        "file": read_split(image).loc[0, "subject_id"],
        "folder": read_split(image.parent).loc[0, "subject_id"],
        "csv row without subject_id": read_split(bare_csv).loc[0, "subject_id"],
    }
    assert set(ids.values()) == {"demo000"}, ids


def test_duplicate_subject_ids_are_refused_naming_the_files(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    write(folder / "a.nii", brain_like())
    write(folder / "a.nii.gz", brain_like())
    write(folder / "b.nii.gz", brain_like())
    with pytest.raises(DataError) as error:
        read_split(folder)
    message = str(error.value)
    assert "\n" not in message and "subject_id" in message and "'a'" in message
    folder = folder.resolve()
    assert f"'a' ({folder / 'a.nii'}, {folder / 'a.nii.gz'})" in message
    assert "b.nii.gz" not in message
    csv = write_csv(
        tmp_path / "split.csv",
        [{"subject_id": "s1", "image": "folder/a.nii"}, {"subject_id": "s1", "image": "folder/b.nii.gz"}],
    )
    with pytest.raises(DataError, match=r"split.csv: .*'s1'.*a\.nii.*b\.nii\.gz"):
        read_split(csv)


def test_cli_check_refuses_duplicate_subject_ids(tmp_path, capsys):
    write(tmp_path / "a.nii", brain_like())
    write(tmp_path / "a.nii.gz", brain_like())
    assert dataset_main(["--check", str(tmp_path)]) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and "Traceback" not in captured.err
    folder = tmp_path.resolve()
    assert f"'a' ({folder / 'a.nii'}, {folder / 'a.nii.gz'})" in lines[0]


def test_csv_without_image_column(tmp_path):
    csv = write_csv(tmp_path / "split.csv", [{"path": "a.nii.gz"}])
    with pytest.raises(DataError, match="no 'image' column"):
        read_split(csv)


def test_empty_csv(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("subject_id,image\n")
    with pytest.raises(DataError, match="empty CSV"):
        read_split(tmp_path / "empty.csv")
    with pytest.raises(DataError, match="no rows"):
        read_split(tmp_path / "header.csv")


def test_duplicate_rows(tmp_path):
    csv = write_csv(tmp_path / "split.csv", [{"image": "a.nii.gz"}, {"image": "./a.nii.gz"}])
    with pytest.raises(DataError, match="duplicate"):
        read_split(csv)


def test_folder_without_nifti_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="no .nii"):
        read_split(tmp_path)
    with pytest.raises(DataError, match="not found"):
        read_split(tmp_path / "nope.csv")


# --------------------------------------------------------------------------------------- check_files


def problem_of(path: Path, mask: Path | None = None) -> str:
    frame = pd.DataFrame(
        {"subject_id": ["s"], "image": [str(path)], "mask": [None if mask is None else str(mask)]}
    )
    return check_files(frame).loc[0, "problem"]


def test_good_file_and_4d_single_volume_pass(tmp_path):
    assert problem_of(write(tmp_path / "good.nii.gz", brain_like())) == ""
    single = write(tmp_path / "single.nii.gz", brain_like()[..., None])
    assert problem_of(single) == ""
    assert preprocess_volume(single, SMALL_PREP).image.shape == (1, *SMALL_SHAPE)


def test_missing_file(tmp_path):
    assert problem_of(tmp_path / "missing.nii.gz") == "missing file"


def test_truncated_gz(tmp_path):
    good = write(tmp_path / "good.nii.gz", brain_like())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "unreadable" in problem_of(truncated)


def test_non_nifti_with_nii_name(tmp_path):
    fake = tmp_path / "fake.nii"
    fake.write_text("this is not an image\n" * 30)
    assert "unreadable" in problem_of(fake)
    fake_gz = tmp_path / "fake.nii.gz"
    fake_gz.write_bytes(gzip.compress(b"not an image either" * 40))
    assert "unreadable" in problem_of(fake_gz)


def test_4d_multi_volume(tmp_path):
    path = write(tmp_path / "4d.nii.gz", np.stack([brain_like()] * 3, axis=-1))
    assert "3 volumes" in problem_of(path)


def test_2d_image(tmp_path):
    assert "not a 3D volume" in problem_of(write(tmp_path / "2d.nii.gz", brain_like()[:, :, 5]))
    assert "not a 3D volume" in problem_of(write(tmp_path / "slab.nii.gz", brain_like()[:, :, 5:6]))


def test_constant_image(tmp_path):
    assert "constant image" in problem_of(write(tmp_path / "zero.nii.gz", np.zeros(SMALL_SHAPE, np.float32)))


def test_nan_inf(tmp_path):
    for bad in (np.nan, np.inf):
        data = brain_like()
        data[3, 3, 3] = bad
        assert "NaN/Inf" in problem_of(write(tmp_path / f"bad{bad}.nii.gz", data))


def test_bad_masks(tmp_path):
    image = write(tmp_path / "img.nii.gz", brain_like())
    assert "mask missing" in problem_of(image, tmp_path / "nomask.nii.gz")
    broken = tmp_path / "broken_mask.nii"
    broken.write_text("garbage")
    assert "mask unreadable" in problem_of(image, broken)
    small = write(tmp_path / "small_mask.nii.gz", np.ones((4, 4, 4), np.uint8))
    assert "mask shape" in problem_of(image, small)
    assert problem_of(image, write(tmp_path / "ok_mask.nii.gz", (brain_like() > 0).astype(np.uint8))) == ""


def broken_split(tmp_path: Path) -> tuple[Path, list[str]]:
    """A CSV with one good file and one of each kind of broken file; returns (csv, bad file names)."""
    good = write(tmp_path / "good.nii.gz", brain_like())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:200])
    (tmp_path / "fake.nii").write_text("not nifti")
    nan = brain_like()
    nan[1, 1, 1] = np.nan
    bad = {
        "missing.nii.gz": None,
        "truncated.nii.gz": truncated,
        "fake.nii": tmp_path / "fake.nii",
        "4d.nii.gz": write(tmp_path / "4d.nii.gz", np.stack([brain_like()] * 2, axis=-1)),
        "2d.nii.gz": write(tmp_path / "2d.nii.gz", brain_like()[:, :, 0]),
        "zero.nii.gz": write(tmp_path / "zero.nii.gz", np.zeros(SMALL_SHAPE, np.float32)),
        "nan.nii.gz": write(tmp_path / "nan.nii.gz", nan),
    }
    csv = write_csv(tmp_path / "split.csv", [{"image": name} for name in ["good.nii.gz", *bad]])
    return csv, list(bad)


def test_preflight_raises_or_skips_listing_files(tmp_path, capsys):
    csv, bad = broken_split(tmp_path)
    frame = read_split(csv)
    with pytest.raises(DataError) as error:
        preflight(frame)
    assert all(name in str(error.value) for name in bad)
    good = preflight(frame, skip_bad_files=True)
    assert list(good["subject_id"]) == ["good"]
    skipped = capsys.readouterr().err
    assert "SKIPPING 7" in skipped and all(name in skipped for name in bad)


def test_cli_check(tmp_path):
    csv, bad = broken_split(tmp_path)
    command = [sys.executable, str(REPO / "dataset.py"), "--check"]
    result = subprocess.run([*command, str(csv)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    assert all(name in result.stderr for name in bad)


def test_check_passes_a_good_split(tmp_path, capsys):
    write(tmp_path / "good.nii.gz", brain_like())
    good_csv = write_csv(tmp_path / "good.csv", [{"image": "good.nii.gz"}])
    assert dataset_main(["--check", str(good_csv)]) == 0
    assert "OK" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- preprocessing


def test_orientation_of_psr_file_with_marker(tmp_path):
    """Voxel order P,S,R; a bright blob at the right-anterior-superior corner must land at high x, y, z."""
    n_p, n_s, n_r = 18, 16, 14
    data = np.zeros((n_p, n_s, n_r), np.float32)
    data[2:14, 2:14, 2:12] = 50.0  # "head"
    data[2:5, 10:14, 8:12] = 500.0  # anterior (low P index), superior (high S), right (high R)
    affine = np.array([[0, 0, 2.0, -10], [-2.0, 0, 0, 20], [0, 2.0, 0, -5], [0, 0, 0, 1]])
    assert nib.aff2axcodes(affine) == ("P", "S", "R")
    path = write(tmp_path / "psr.nii.gz", data, affine)
    out = preprocess_volume(path, PreprocessingConfig(target_shape=(n_r, n_p, n_s)))
    blob = np.argwhere(out.image[0].numpy() == 1.0).mean(0)
    assert blob[0] > n_r * 0.6 and blob[1] > n_p * 0.6 and blob[2] > n_s * 0.6
    assert nib.aff2axcodes(out.inverse.output_affine) == ("R", "A", "S")


@needs_ixi
def test_native_ixi_upright_ras():
    frame = read_split(IXI / "native" / "native.csv")
    out = preprocess_volume(frame.loc[0, "image"], PreprocessingConfig())
    image = out.image[0].numpy()
    assert out.image.shape == (1, 91, 109, 91) and out.image.dtype == torch.float32
    assert image.min() == 0.0 and image.max() == 1.0
    assert nib.aff2axcodes(out.inverse.output_affine) == ("R", "A", "S")
    # head top at high z: the top slices are nearly empty, the neck/bottom and the middle are not
    per_slice = (image > 0.1).mean(axis=(0, 1))
    assert per_slice[-3:].mean() < 0.5 * per_slice[40:60].mean()
    # left-right symmetric-ish, unlike the A-P or S-I profile: x is the left-right axis
    x_profile = (image > 0.1).mean(axis=(1, 2))
    assert abs(np.argmax(x_profile) - 45) < 15


@needs_ixi
def test_mni_ixi_passes_through_without_resampling():
    frame = read_split(IXI / "train.csv")
    path, mask = frame.loc[0, "image"], frame.loc[0, "mask"]
    out = preprocess_volume(path, PreprocessingConfig(), mask)
    source = nib.load(path).get_fdata()[::-1]  # LAS -> RAS: flip x only
    low, high = out.inverse.low, out.inverse.high
    expected = np.where(source > 0, np.clip((source - low) / (high - low), 0, 1), 0)
    np.testing.assert_allclose(out.image[0].numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(out.mask[0].numpy(), nib.load(mask).get_fdata()[::-1] > 0)


@needs_ixi
def test_restore_exact_without_resampling():
    for path in (
        read_split(IXI / "train.csv").loc[0, "image"],
        read_split(IXI / "native" / "native.csv").loc[0, "image"],
    ):
        source = nib.load(path)
        out = preprocess_volume(path, PreprocessingConfig())
        restored = restore_to_input_grid(out.image, out.inverse)
        assert restored.shape == source.shape and np.allclose(restored.affine, source.affine)
        kept = (
            restore_to_input_grid(torch.ones_like(out.image), out.inverse, intensity="unit").get_fdata() > 0
        )
        values, original = restored.get_fdata()[kept], source.get_fdata()[kept]
        low, high = out.inverse.low, out.inverse.high
        expected = np.where(original > low, np.minimum(original, high), 0)
        np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-3)


def test_restore_resampled_file(tmp_path):
    """A 1.5 mm LPS file: resampled to 2 mm, then mapped back onto its own grid and affine."""
    shape = (40, 36, 32)
    affine = np.array([[-1.5, 0, 0, 30], [0, -1.5, 0, 27], [0, 0, 1.5, -24], [0, 0, 0, 1]])
    path = write(tmp_path / "lps.nii.gz", brain_like(shape) * 7, affine)
    out = preprocess_volume(path, PreprocessingConfig(target_shape=(32, 30, 26)))
    assert np.allclose(np.abs(np.diag(out.inverse.output_affine))[:3], 2.0)
    restored = restore_to_input_grid(out.image, out.inverse)
    assert restored.shape == shape and np.allclose(restored.affine, affine)
    original = nib.load(path).get_fdata()
    interior = (original > 0) & (restored.get_fdata() > 0)
    assert interior.mean() > 0.5 * (original > 0).mean()
    error = np.abs(restored.get_fdata() - np.minimum(original, out.inverse.high))[interior]
    assert np.median(error) < 0.05 * out.inverse.high


def test_percentile_scaling_robust_and_background_zero(tmp_path):
    data = brain_like()
    data[5, 5, 5] = 1e6  # a hot voxel must not squash the image
    first = preprocess_volume(write(tmp_path / "a.nii.gz", data), SMALL_PREP)
    second = preprocess_volume(write(tmp_path / "b.nii.gz", data * 3), SMALL_PREP)
    torch.testing.assert_close(first.image, second.image)
    assert float(first.image[first.image > 0].median()) > 0.3
    background = torch.from_numpy(data == 0)[None]
    assert torch.all(first.image[background] == 0) and torch.equal(first.mask, ~background)
    minmax = preprocess_volume(
        tmp_path / "a.nii.gz", PreprocessingConfig(target_shape=SMALL_SHAPE, intensity="minmax")
    )
    assert float(minmax.image.max()) == 1.0 and float(minmax.image[minmax.image > 0].median()) < 0.01


def test_preprocess_refuses_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="one 3D volume"):
        preprocess_volume(write(tmp_path / "4d.nii.gz", np.stack([brain_like()] * 2, axis=-1)), SMALL_PREP)
    nan = brain_like()
    nan[2, 2, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        preprocess_volume(write(tmp_path / "nan.nii.gz", nan), SMALL_PREP)
    image = write(tmp_path / "img.nii.gz", brain_like())
    with pytest.raises(DataError, match="mask grid"):
        preprocess_volume(image, SMALL_PREP, write(tmp_path / "mask.nii.gz", np.ones((4, 4, 4), np.uint8)))


def test_apply_mask_with_given_mask(tmp_path):
    data = brain_like()
    mask = np.zeros(SMALL_SHAPE, np.uint8)
    mask[:8] = 1
    out = preprocess_volume(
        write(tmp_path / "img.nii.gz", data),
        PreprocessingConfig(target_shape=SMALL_SHAPE, apply_mask=True),
        write(tmp_path / "mask.nii.gz", mask),
    )
    assert torch.equal(out.mask[0], torch.from_numpy(mask > 0))
    assert torch.all(out.image[0, 8:] == 0) and torch.any(out.image[0, :8] > 0)


# -------------------------------------------------------------------------- background, foreground, brain


def write_offset(path: Path, data: np.ndarray, offset: float) -> Path:
    """``data`` as int16 with ``scl_inter = offset``: the file's values are ``data + offset``."""
    image = nib.Nifti1Image(np.round(data).astype(np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    image.header.set_slope_inter(1.0, offset)
    nib.save(image, path)
    return path


def test_background_offset_changes_neither_mask_nor_scaling_and_comes_back(tmp_path):
    """scl_inter = 10: the brain mask is the brain (not the whole volume), the [0, 1] image is the one of
    the same data stored without offset, and --intensity original gives the background 10 back."""
    data = np.round(brain_like())
    plain = preprocess_volume(write_offset(tmp_path / "plain.nii.gz", data, 0.0), SMALL_PREP)
    offset_file = write_offset(tmp_path / "offset.nii.gz", data, 10.0)
    offset = preprocess_volume(offset_file, SMALL_PREP)
    brain = torch.from_numpy(data > 0)[None]
    assert torch.equal(offset.mask, brain) and torch.equal(plain.mask, brain)
    assert offset.mask_source == "estimated" and 0.1 < float(offset.mask.float().mean()) < 0.5
    torch.testing.assert_close(offset.image, plain.image)
    assert offset.inverse.background == 10.0 and plain.inverse.background == 0.0

    restored = restore_to_input_grid(offset.image, offset.inverse, "original").get_fdata()
    source = nib.load(offset_file).get_fdata()
    assert np.all(restored[data == 0] == 10.0)
    unit = offset.image[0].numpy()
    inside = (unit > 0) & (unit < 1)  # the voxels between the low and high percentiles: exact inverse
    np.testing.assert_allclose(restored[inside], source[inside], rtol=1e-4)
    with_mask = preprocess_volume(
        offset_file, SMALL_PREP, write(tmp_path / "m.nii.gz", (data > 0).astype(np.uint8))
    )
    assert with_mask.mask_source == "csv" and torch.equal(with_mask.mask, brain)


def test_validation_items_carry_the_estimated_brain_mask(tmp_path):
    """train.py's validation reads its masks from the dataset items: an offset file gets the brain there too."""
    data = np.round(brain_like())
    frame = read_split(write_offset(tmp_path / "offset.nii.gz", data, 10.0))
    item = VolumeDataset(frame, SMALL_PREP, None, cache="none")[0]
    assert torch.equal(item["mask"], torch.from_numpy(data > 0)[None].float())


def test_estimated_brain_mask_is_the_largest_component_with_holes_filled():
    volume = np.full(SMALL_SHAPE, 5.0, np.float32)  # background 5
    volume[3:13, 3:15, 3:11] = 50.0
    volume[7, 8, 6] = 5.0  # a hole inside the brain
    volume[0, 0, 0] = 80.0  # a bright speck in a corner
    assert background_value(volume) == 5.0
    expected = np.zeros(SMALL_SHAPE, bool)
    expected[3:13, 3:15, 3:11] = True
    np.testing.assert_array_equal(estimate_brain_mask(volume, 5.0), expected)


def test_a_mask_covering_most_of_the_field_of_view_is_named(tmp_path):
    head = np.round(brain_like())
    head[1:-1, 1:-1, 1:-1] = np.maximum(head[1:-1, 1:-1, 1:-1], 30.0)  # "scalp" all round the brain
    volume = preprocess_volume(write(tmp_path / "head.nii.gz", head), SMALL_PREP)
    assert float(volume.mask.float().mean()) > MAX_BRAIN_FRACTION
    warning = brain_mask_warning(volume)
    assert warning.startswith(f"{tmp_path / 'head.nii.gz'}: the brain mask (estimated) covers ")
    assert (
        brain_mask_warning(preprocess_volume(write(tmp_path / "brain.nii.gz", brain_like()), SMALL_PREP))
        == ""
    )


def test_preflight_and_preprocessing_refuse_the_same_volumes(tmp_path):
    """One foreground rule: an all-negative inverted image is refused by both with one message; an
    all-negative image brighter than its background passes both."""
    inverted = write(tmp_path / "inverted.nii.gz", -brain_like() - 1.0)
    problem = problem_of(inverted)
    assert problem.startswith("no voxel brighter than the background (-1, ")
    with pytest.raises(DataError) as refused:
        preprocess_volume(inverted, SMALL_PREP)
    assert str(refused.value).startswith(f"{inverted}: {problem}")

    shifted = write(tmp_path / "shifted.nii.gz", brain_like() - 1000.0)
    assert problem_of(shifted) == ""
    out = preprocess_volume(shifted, SMALL_PREP)
    assert torch.equal(out.mask, torch.from_numpy(brain_like() > 0)[None])
    torch.testing.assert_close(
        out.image, preprocess_volume(write(tmp_path / "b.nii.gz", brain_like()), SMALL_PREP).image
    )


def test_a_preprocessing_error_names_the_file_once(tmp_path):
    """Foreground outside the target field of view: the pre-flight passes, the preprocessing refuses it."""
    data = np.zeros((40, 18, 14), np.float32)
    data[2:6, 6:12, 5:9] = 100.0  # cropped away by the centred 16-voxel crop
    path = write(tmp_path / "offcentre.nii.gz", data)
    frame = read_split(path)
    assert check_files(frame).loc[0, "problem"] == ""
    [[row]] = preprocessed_batches(frame, SMALL_PREP, [0], batch_size=1, num_workers=0)
    error = row["error"]
    assert error.count(str(path)) == 1 and "inside the target field of view" in error


# ------------------------------------------------------------------------------------------- datasets


def small_frame(tmp_path: Path, n: int = 3) -> pd.DataFrame:
    rows = [{"image": str(write(tmp_path / f"s{i}.nii.gz", brain_like(seed=i)))} for i in range(n)]
    return read_split(write_csv(tmp_path / "split.csv", rows))


def test_dataset_items_and_collate(tmp_path):
    dataset = VolumeDataset(small_frame(tmp_path), SMALL_PREP, None, cache="memory")
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 1, *SMALL_SHAPE) and batch["image"].dtype == torch.float32
    assert batch["mask"].dtype == torch.float32 and set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["index"].tolist() == [0, 1, 2]
    torch.testing.assert_close(dataset[1]["image"], dataset[1]["image"])  # no augmentation: deterministic


def test_disk_cache_keyed_by_settings(tmp_path):
    frame = small_frame(tmp_path, n=2)
    cache = tmp_path / "cache"
    plain = VolumeDataset(frame, SMALL_PREP, None, cache="disk", cache_dir=cache)[0]["image"]
    cached = list(preprocessing_cache_dir(cache, SMALL_PREP).glob("*.pt"))
    assert len(cached) == 1  # the preprocessed tensors, not the file paths, are cached
    assert torch.load(cached[0], weights_only=True)["image"].shape == (1, *SMALL_SHAPE)
    other_prep = PreprocessingConfig(target_shape=SMALL_SHAPE, upper_percentile=50.0)
    assert preprocessing_cache_dir(cache, other_prep) != preprocessing_cache_dir(cache, SMALL_PREP)
    changed = VolumeDataset(frame, other_prep, None, cache="disk", cache_dir=cache)[0]["image"]
    assert not torch.allclose(plain, changed)  # not served from the first cache
    expected = preprocess_volume(frame.loc[0, "image"], other_prep).image
    torch.testing.assert_close(changed, expected)
    again = VolumeDataset(frame, SMALL_PREP, None, cache="disk", cache_dir=cache)[0]["image"]
    torch.testing.assert_close(again, plain)


def test_augmentation_on_stays_in_unit_range(tmp_path):
    aug = AugmentationConfig(
        affine_prob=1.0,
        bias_field_prob=1.0,
        gamma_prob=1.0,
        noise_prob=1.0,
        noise_std=0.2,
        flip_left_right_prob=0.5,
    )
    dataset = VolumeDataset(small_frame(tmp_path, n=1), SMALL_PREP, aug, cache="none", seed=3)
    items = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        items.append(dataset[0])
    for item in items:
        assert item["image"].shape == (1, *SMALL_SHAPE)
        assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert not torch.allclose(items[0]["image"], items[1]["image"])  # a new draw every epoch
    dataset.set_epoch(1)
    torch.testing.assert_close(dataset[0]["image"], items[1]["image"])  # replayable: (seed, epoch, index)
    off = VolumeDataset(
        small_frame(tmp_path, n=1), SMALL_PREP, AugmentationConfig(enabled=False), cache="none"
    )
    torch.testing.assert_close(off[0]["image"], off[0]["image"])
    torch.testing.assert_close(off[0]["image"], preprocess_volume(tmp_path / "s0.nii.gz", SMALL_PREP).image)


STRONG = AugmentationConfig(
    affine_prob=1.0,
    flip_left_right_prob=1.0,
    bias_field_prob=1.0,
    gamma_prob=1.0,
    noise_prob=1.0,
    rotate_degrees=15.0,
    scale_fraction=0.1,
    translate_voxels=4.0,
)


def test_augmentation_steps_match_monai():
    """Each step, with the parameters it drew, against MONAI's deterministic transform (MONAI's random ones
    drew from these parameters before): affine (float32 grid rounding: <= 1e-5, a nearest-neighbour tie in the
    mask), flip, bias field (MONAI's leggrid3d formula, float64), gamma (AdjustContrast)."""
    shape = (24, 28, 20)
    image = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
    mask = (image > 0.5).float()
    augmentation, off = Augmentation(STRONG, seed=0), AugmentationDraw(None, False, None, None, None)

    def alone(**step) -> tuple[torch.Tensor, torch.Tensor]:
        images, masks = augmentation.apply(image[None], mask[None], [dataclasses.replace(off, **step)])
        return images[0], masks[0]

    for draw in augmentation.draw(range(4), 0, shape):
        got, got_mask = alone(affine=draw.affine)
        expected = mt.Affine(affine=draw.affine, mode="bilinear", padding_mode="zeros", image_only=True)(
            image
        )
        torch.testing.assert_close(got, expected.as_tensor(), rtol=0, atol=1e-5)
        expected = mt.Affine(affine=draw.affine, mode="nearest", padding_mode="zeros", image_only=True)(mask)
        assert (got_mask != expected.as_tensor()).float().mean() <= 1e-3

        assert torch.equal(alone(flip=True)[0], mt.Flip(spatial_axis=0)(image).as_tensor())
        coordinates = [np.linspace(-1.0, 1.0, size) for size in shape]
        field = np.polynomial.legendre.leggrid3d(*coordinates, draw.bias.double().numpy())
        expected = (image.double() * np.exp(field)).clamp(0, 1).float()
        torch.testing.assert_close(alone(bias=draw.bias)[0], expected, rtol=0, atol=1e-6)
        expected = mt.AdjustContrast(gamma=draw.gamma)(image).as_tensor()
        torch.testing.assert_close(alone(gamma=draw.gamma)[0], expected, rtol=0, atol=1e-6)


def test_augmentation_draws_follow_the_config():
    """Every key keeps its meaning: each step fires with its probability; rotation within ±rotate_degrees
    about each axis, scale 1 ± scale_fraction, shift ±translate_voxels, gamma in gamma_range, noise
    N(0, noise_std); bias coefficients in [0, 0.1] for total degree <= 3. A step's draw does not depend on
    the other steps' settings."""
    config = AugmentationConfig(
        affine_prob=0.3,
        flip_left_right_prob=0.5,
        bias_field_prob=0.2,
        gamma_prob=0.7,
        noise_prob=0.4,
        noise_std=0.05,
        rotate_degrees=10.0,
        scale_fraction=0.1,
        translate_voxels=3.0,
        gamma_range=(0.8, 1.25),
    )
    n, shape = 2000, (4, 5, 3)
    draws = Augmentation(config, seed=1).draw(range(n), 0, shape)
    fired = {
        "affine_prob": [d.affine is not None for d in draws],
        "flip_left_right_prob": [d.flip for d in draws],
        "bias_field_prob": [d.bias is not None for d in draws],
        "gamma_prob": [d.gamma is not None for d in draws],
        "noise_prob": [d.noise is not None for d in draws],
    }
    for name, flags in fired.items():
        prob = getattr(config, name)
        assert abs(np.mean(flags) - prob) < 4 * np.sqrt(prob * (1 - prob) / n), name

    affines = np.stack([d.affine.numpy() for d in draws if d.affine is not None])
    left, scales, right = np.linalg.svd(affines[:, :3, :3])  # A = R·diag(s): singular values = scales
    assert 0.9 <= scales.min() < 0.91 and 1.09 < scales.max() <= 1.1
    angles = np.abs(Rotation.from_matrix(left @ right).as_euler("xyz", degrees=True))
    assert 9.9 < angles.max() <= 10.0 + 1e-9
    shifts = np.abs(affines[:, :3, 3])
    assert 2.95 < shifts.max() <= 3.0 and np.all(affines[:, 3] == [0, 0, 0, 1])

    gammas = np.array([d.gamma for d in draws if d.gamma is not None])
    assert 0.8 <= gammas.min() < 0.81 and 1.24 < gammas.max() <= 1.25
    coefficients = np.stack([d.bias.numpy() for d in draws if d.bias is not None])
    terms = np.indices((4, 4, 4)).sum(axis=0) <= 3
    assert np.all(coefficients[:, ~terms] == 0) and np.all((coefficients >= 0) & (coefficients <= 0.1))
    assert coefficients[:, terms].max() > 0.099
    noise = np.concatenate([d.noise.numpy().ravel() for d in draws if d.noise is not None])
    assert noise.shape[0] % np.prod(shape) == 0
    assert abs(noise.mean()) < 0.002 and abs(noise.std() - 0.05) < 0.002

    others_off = dataclasses.replace(config, flip_left_right_prob=0.0, gamma_prob=0.0, noise_prob=0.0)
    for draw, again in zip(
        draws[:50], Augmentation(others_off, seed=1).draw(range(50), 0, shape), strict=True
    ):
        assert (draw.affine is None) == (again.affine is None)
        assert draw.affine is None or torch.equal(draw.affine, again.affine)


def test_dataset_with_masks_and_resampling(tmp_path):
    """Masks travel with the image through resampling (a MONAI meta-key clash once broke this)."""
    rows = []
    for i in range(2):
        volume = brain_like(seed=i)
        image = write(tmp_path / f"img{i}.nii.gz", volume)
        mask = write(tmp_path / f"mask{i}.nii.gz", (volume > 0).astype(np.uint8))
        rows.append({"image": str(image), "mask": str(mask)})
    frame = read_split(write_csv(tmp_path / "split.csv", rows))
    prep = PreprocessingConfig(target_spacing=(4.0, 4.0, 4.0), target_shape=(8, 9, 7))
    for cache in ("none", "memory", "disk"):
        item = VolumeDataset(frame, prep, None, cache=cache, cache_dir=tmp_path / "cache")[1]
        assert item["image"].shape == item["mask"].shape == (1, 8, 9, 7)
        assert float(item["mask"].sum()) > 0
        inside, outside = item["image"][item["mask"] > 0], item["image"][item["mask"] == 0]
        assert float(inside.mean()) > 10 * float(outside.mean())  # the mask still covers the brain
