"""prepare.py / preprocess_raw.py: raw scans -> MNI 2 mm volumes, QC, resume, bad inputs, shards, determinism.

The synthetic heads are nilearn's MNI152 brain (4 mm, shifted and rotated through their affine) inside a
bright shell, so ANTs and the QC see a brain. Most tests skip N4, deepbet and registration to stay fast;
one runs N4 + affine twice (determinism), one runs deepbet + affine on a native IXI head (skipped without
the shared data).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

import prepare
import preprocess_raw as pr

FAST = ["--skip_bias_correction", "--skip_brain_extraction", "--registration", "none"]


def _grid_4mm() -> np.ndarray:
    affine = pr.MNI2MM_AFFINE.copy()
    affine[:3, :3] *= 2.0
    return affine


def _moved(degrees: tuple[float, float, float], shift_mm: tuple[float, float, float]) -> np.ndarray:
    """A rigid world-space move: the same voxels seen at another position and angle."""
    move = np.eye(4)
    move[:3, :3] = Rotation.from_euler("xyz", degrees, degrees=True).as_matrix()
    move[:3, 3] = shift_mm
    return move


@pytest.fixture(scope="module")
def brain_4mm() -> tuple[np.ndarray, np.ndarray]:
    """The template brain (scaled to scanner-like units) and its mask, zoomed to 4 mm (46, 54, 46)."""
    brain, mask = pr.mni2mm_template()
    image = ndimage.zoom(np.asarray(brain.dataobj, dtype=np.float32), 0.5, order=1) * 500.0
    mask = ndimage.zoom(np.asarray(mask.dataobj, dtype=np.float32), 0.5, order=1) > 0.5
    return np.where(mask, image, 0.0).astype(np.float32), mask


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _head(brain: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The brain inside a bright 'skull' shell two voxels out."""
    shell = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_dilation(mask, iterations=1)
    return brain + np.float32(300.0) * shell


def _stripped_split(folder: Path, brain_4mm, n: int) -> Path:
    """``n`` skull-stripped, MNI-aligned scans (registration none is enough) in a CSV with an age column."""
    brain, _ = brain_4mm
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image = _save(folder / f"sub-{i:02d}_T1w.nii.gz", brain * np.float32(1 + 0.1 * i), _grid_4mm())
        rows.append({"image": image, "age": 20 + i})
    pd.DataFrame(rows).to_csv(folder / "split.csv", index=False)
    return folder / "split.csv"


def _main(args: list[str], capsys) -> tuple[int, str]:
    """``prepare.main(args)`` -> (exit code, its printed text); torch's thread count as it was before."""
    threads = torch.get_num_threads()
    try:
        code = prepare.main(args)
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_affine_recovers_a_moved_head_and_two_runs_give_identical_bytes(tmp_path, brain_4mm, capsys):
    brain, mask = brain_4mm
    moved = _moved((8.0, -5.0, 10.0), (6.0, -10.0, 8.0)) @ _grid_4mm()
    image = _save(tmp_path / "head.nii.gz", _head(brain, mask), moved)
    mask_path = _save(tmp_path / "head_mask.nii.gz", mask.astype(np.uint8), moved)
    pd.DataFrame({"subject_id": ["s1"], "image": [image], "mask": [mask_path]}).to_csv(
        tmp_path / "in.csv", index=False
    )
    outputs = []
    for run in ("a", "b"):
        code, text = _main(
            ["--input", str(tmp_path / "in.csv"), "--output_dir", str(tmp_path / run)]
            + ["--skip_brain_extraction"],
            capsys,
        )
        assert code == 0, text
        outputs.append(tmp_path / run)
    qc = pd.read_csv(outputs[0] / "qc.csv")
    assert qc.loc[0, "status"] == "ok" and qc.loc[0, "ncc"] > 0.6 and qc.loc[0, "dice"] > 0.9, qc
    assert 0.9 < qc.loc[0, "affine_det"] < 1.1
    paths = pr.output_paths("s1")
    for key in ("image", "mask", "native_mask"):
        assert (outputs[0] / paths[key]).read_bytes() == (outputs[1] / paths[key]).read_bytes(), key
    result = nib.load(outputs[0] / paths["image"])
    assert result.shape == pr.MNI2MM_SHAPE and np.allclose(result.affine, pr.MNI2MM_AFFINE)
    assert int(result.header["qform_code"]) == int(result.header["sform_code"]) == 4
    data = np.asarray(result.dataobj)
    registered_mask = np.asarray(nib.load(outputs[0] / paths["mask"]).dataobj) > 0
    assert not data[~registered_mask].any() and data.min() >= 0  # skull and background gone
    assert (outputs[0] / paths["png"]).is_file() and (outputs[0] / "qc_overview.png").is_file()
    prepared = pd.read_csv(outputs[0] / "prepared.csv")
    assert list(prepared.columns[:3]) == ["subject_id", "image", "mask"]
    sidecar = (outputs[0] / paths["sidecar"]).read_text()
    assert '"bias_correction": true' in sidecar and '"brain_extraction": false' in sidecar


def test_bad_inputs_get_one_line_each_and_the_others_go_on(tmp_path, brain_4mm, capsys):
    brain, _ = brain_4mm
    folder = tmp_path / "raw"
    folder.mkdir()
    _save(folder / "good_T1w.nii.gz", brain, _grid_4mm())
    _save(folder / "flat.nii.gz", brain[:, :, 20], _grid_4mm())
    _save(folder / "twovolumes.nii.gz", np.stack([brain, brain], axis=-1), _grid_4mm())
    _save(folder / "empty.nii.gz", np.zeros_like(brain), _grid_4mm())
    (folder / "garbage.nii.gz").write_bytes(b"not a nifti at all" * 10)
    code, text = _main(["--input", str(folder), "--output_dir", str(tmp_path / "out"), *FAST], capsys)
    assert code == 1
    assert "Traceback" not in text
    qc = pd.read_csv(tmp_path / "out" / "qc.csv").set_index("subject_id")
    assert qc.loc["good", "status"] == "ok"
    expected = {
        "flat": "not a 3D volume",
        "twovolumes": "2 volumes",
        "empty": "empty image",
        "garbage": "unreadable",
    }
    for subject, problem in expected.items():
        assert qc.loc[subject, "status"].startswith("error:") and problem in qc.loc[subject, "status"]
        summary_lines = [line for line in text.splitlines() if "ERROR:" in line and subject in line]
        assert len(summary_lines) == 2, summary_lines  # as it happens, and in the summary at the end
    assert list(pd.read_csv(tmp_path / "out" / "prepared.csv")["subject_id"]) == ["good"]


def test_resume_trusts_finished_subjects_only(tmp_path, brain_4mm, capsys):
    split = _stripped_split(tmp_path / "raw", brain_4mm, 2)
    out = tmp_path / "out"
    assert _main(["--input", str(split), "--output_dir", str(out), *FAST], capsys)[0] == 0
    first, second = (pr.output_paths(f"sub-{i:02d}") for i in range(2))
    kept_bytes = (out / second["image"]).read_bytes()
    finished_mtime = os.stat(out / first["image"]).st_mtime_ns
    # a run killed while writing sub-01: no sidecar yet, a half-written image, a temp file left behind
    (out / second["sidecar"]).unlink()
    (out / second["image"]).write_bytes(kept_bytes[: len(kept_bytes) // 2])
    stale = out / "images" / ".sub-01_T1w_mni2mm.tmp-12345.nii.gz"
    stale.write_bytes(b"partial")
    code, text = _main(["--input", str(split), "--output_dir", str(out), *FAST], capsys)
    assert code == 0, text
    assert "sub-00: ok" in text and "done before, skipped" in text.split("sub-00: ok")[1].splitlines()[0]
    assert os.stat(out / first["image"]).st_mtime_ns == finished_mtime
    assert (out / second["image"]).read_bytes() == kept_bytes  # redone, not trusted
    assert not stale.exists()
    assert len(pd.read_csv(out / "prepared.csv")) == 2


def test_shards_write_parts_and_merge_joins_them(tmp_path, brain_4mm, capsys):
    split = _stripped_split(tmp_path / "raw", brain_4mm, 3)
    out = tmp_path / "sharded"
    assert _main(["--input", str(split), "--output_dir", str(out), "--shard", "0/2", *FAST], capsys)[0] == 0
    assert not (out / "prepared.csv").exists()
    assert list(pd.read_csv(out / "qc.part-0.csv")["subject_id"]) == ["sub-00", "sub-02"]
    code, text = _main(["--merge", str(out)], capsys)
    assert code == 2 and "ERROR:" in text and "[1]" in text  # shard 1 missing
    assert _main(["--input", str(split), "--output_dir", str(out), "--shard", "1/2", *FAST], capsys)[0] == 0
    assert _main(["--merge", str(out)], capsys)[0] == 0
    whole = tmp_path / "whole"
    assert _main(["--input", str(split), "--output_dir", str(whole), *FAST], capsys)[0] == 0
    merged = pd.read_csv(out / "prepared.csv").sort_values("subject_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(merged, pd.read_csv(whole / "prepared.csv"))
    assert list(merged.columns) == ["subject_id", "image", "mask", "source_image", "source_mask", "age"]
    assert len(pd.read_csv(out / "qc.csv")) == 3


@pytest.mark.parametrize("bad", [["--shard", "2/2"], ["--shard", "x"], ["--jobs", "0"]])
def test_bad_arguments_exit_2(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(["--input", str(tmp_path), "--output_dir", str(tmp_path / "out"), *bad])
    assert exit_info.value.code == 2


def test_missing_split_is_one_error_line(tmp_path, capsys):
    code, text = _main(
        ["--input", str(tmp_path / "nothing.csv"), "--output_dir", str(tmp_path / "out")], capsys
    )
    assert code == 2 and text.startswith("ERROR:") and "Traceback" not in text


def test_qc_flags_follow_the_documented_thresholds():
    assert pr.qc_flags(0.5, 0.9, 1.0) == []
    assert pr.qc_flags(0.29, 0.9, 1.0) == ["ncc<0.3"]
    assert pr.qc_flags(0.5, 0.84, 1.0) == ["dice<0.85"]
    assert pr.qc_flags(0.5, 0.9, 1.7) == pr.qc_flags(0.5, 0.9, 0.3) == ["det_outside_0.4-1.6"]
    assert pr.qc_flags(float("nan"), 0.9, 1.0) == ["ncc<0.3"]


def test_native_ixi_head_deepbet_and_affine_match_the_reference(ixi_dir, tmp_path, capsys):
    native = pd.read_csv(ixi_dir / "native" / "native.csv").iloc[[0]]
    row = native.iloc[0]
    native.assign(image=[str(ixi_dir / "native" / row["image"])])[["subject_id", "image"]].to_csv(
        tmp_path / "in.csv", index=False
    )
    # N4 is covered by the synthetic test; here deepbet + affine on a real full head
    code, text = _main(
        [
            "--input",
            str(tmp_path / "in.csv"),
            "--output_dir",
            str(tmp_path / "out"),
            "--skip_bias_correction",
        ],
        capsys,
    )
    assert code == 0, text
    paths = pr.output_paths(row["subject_id"])
    ours = np.asarray(nib.as_closest_canonical(nib.load(tmp_path / "out" / paths["native_mask"])).dataobj) > 0
    reference = nib.as_closest_canonical(nib.load(ixi_dir / "native" / row["reference_mask"]))
    reference = np.asarray(reference.dataobj) > 0
    assert 2 * (ours & reference).sum() / (ours.sum() + reference.sum()) > 0.9
    registered = np.asarray(nib.load(tmp_path / "out" / paths["mask"]).dataobj) > 0
    reference_mni = np.asarray(nib.load(ixi_dir / "native" / row["reference_mni2mm_mask"]).dataobj) > 0
    assert 2 * (registered & reference_mni).sum() / (registered.sum() + reference_mni.sum()) > 0.85
    assert pd.read_csv(tmp_path / "out" / "qc.csv").loc[0, "status"] == "ok"


def test_init_worker_refuses_a_process_where_itk_may_already_run_multithreaded(monkeypatch, one_thread):
    """ITK fixes its thread count at first use: prepare.py then runs the subjects in a fresh process.

    ``one_thread``: init_worker sets torch to one thread, as in a worker; the fixture puts the count back.
    """
    import ants  # noqa: F401  (ANTs imported "before", as a caller's own code may have done)

    monkeypatch.setattr(pr, "_deterministic_here", None)  # as in a process that never called it
    monkeypatch.delenv(pr.ITK_THREADS_VARIABLE, raising=False)
    assert pr.init_worker() is False
    assert pr.init_worker() is False  # still: setting the variable now does not change a running ITK


def test_n4_corrects_a_head_alike_at_two_voxel_sizes():
    """N4 fits on the same physical grid at 2 mm and at 1 mm: the bias fields it removes agree (with ANTs'
    fixed shrink factor 4 at both sizes they differ by 5.9 % at the 95th percentile; fitted alike, 4.3 %)."""
    brain, mask = (np.asarray(image.dataobj) for image in pr.mni2mm_template())
    mask = mask > 0
    head = _head(np.where(mask, brain * np.float32(500.0), 0.0).astype(np.float32), mask)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in head.shape), indexing="ij")
    biased = {2.0: (head * (1.0 + 0.3 * x + 0.2 * z * y)).astype(np.float32)}
    biased[1.0] = ndimage.zoom(biased[2.0], 2.0, order=1, grid_mode=True, mode="grid-constant")
    fields = {}
    for mm, data in biased.items():
        affine = np.diag([mm, mm, mm, 1.0])
        affine[:3, 3] = (mm - 2.0) / 2  # 1 mm voxels 2i and 2i + 1 split 2 mm voxel i
        corrected = np.asarray(pr._bias_corrected(nib.Nifti1Image(data, affine)).dataobj)
        fields[mm] = data / np.maximum(corrected, 1e-3)
    d, h, w = head.shape
    fields[1.0] = fields[1.0].reshape(d, 2, h, 2, w, 2).mean(axis=(1, 3, 5))  # back onto the 2 mm grid
    ratio = fields[1.0][mask] / fields[2.0][mask]
    assert np.percentile(np.abs(ratio / np.median(ratio) - 1.0), 95) < 0.05
