"""dataset.input_warnings / warn_inputs: inputs off the model's grid, mixed grids, not skull-stripped; --strict.

One WARNING line per file pointing to prepare.py (dataset.py --check, train.py, infer.py, save_latent.py);
``--strict`` (``data.strict_input_checks`` for training) makes them errors.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from helpers import SHAPE, make_tiny_split, tiny_checkpoint, tiny_overrides

import dataset
import infer
import save_latent
import train
from config import PreprocessingConfig


def _volume(path: Path, shape: tuple[int, int, int], voxel_mm: float, full: bool = False) -> str:
    """A 'brain' ball (zero outside) or, ``full``, signal in every voxel (a head with background noise)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.5
    data = np.ones(shape, np.float32) * 5 if full else np.zeros(shape, np.float32)
    data[inside] = 300.0
    nib.save(nib.Nifti1Image(data, np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])), path)
    return str(path)


def _frame(*images: str) -> pd.DataFrame:
    return pd.DataFrame(
        {"subject_id": [Path(i).name for i in images], "image": list(images), "mask": [None] * len(images)}
    )


def test_model_ready_inputs_give_no_warning(tmp_path):
    images = [_volume(tmp_path / f"s{i}.nii.gz", SHAPE, 2.0) for i in range(2)]
    prep = PreprocessingConfig(target_shape=SHAPE)
    assert dataset.input_warnings(_frame(*images)) == []
    assert dataset.input_warnings(_frame(*images), prep) == []


def test_a_split_that_mixes_grids_names_the_odd_file(tmp_path):
    images = [_volume(tmp_path / f"s{i}.nii.gz", SHAPE, 2.0) for i in range(2)]
    odd = _volume(tmp_path / "odd.nii.gz", (30, 30, 30), 1.0)
    lines = dataset.input_warnings(_frame(*images, odd))
    assert len(lines) == 1 and lines[0].startswith(f"{odd}: grid 30x30x30 at 1x1x1 mm")
    assert "mixes grids" in lines[0] and "prepare.py" in lines[0]
    lines = dataset.input_warnings(_frame(images[0], odd))  # no grid shared: every file is named
    assert [line.split(":")[0] for line in lines] == [images[0], odd]


def test_each_warning_is_reported_once_through_the_callers_channel(tmp_path, capsys):
    """Scripts print ``WARNING:`` lines; train.py passes its logger (console + train.log), so no line is doubled."""
    images = [_volume(tmp_path / f"s{i}.nii.gz", SHAPE, 2.0) for i in range(2)]
    frame = _frame(*images, _volume(tmp_path / "odd.nii.gz", (30, 30, 30), 1.0))
    logged: list[str] = []
    assert dataset.warn_inputs(frame, emit=logged.append) == logged and len(logged) == 1
    assert capsys.readouterr().err == ""
    dataset.warn_inputs(frame)
    assert capsys.readouterr().err == f"WARNING: {logged[0]}\n"


def test_an_input_off_the_checkpoint_grid_is_named(tmp_path):
    good = _volume(tmp_path / "good.nii.gz", SHAPE, 2.0)
    off = _volume(tmp_path / "off.nii.gz", (30, 30, 30), 1.0)
    lines = dataset.input_warnings(_frame(good, off), PreprocessingConfig(target_shape=SHAPE))
    assert len(lines) == 1 and lines[0].startswith(
        f"{off}: grid 30x30x30 at 1x1x1 mm, the model was trained on"
    )


def test_the_same_field_at_another_voxel_size_is_on_the_model_grid(tmp_path):
    """A model trained at 4 mm on 2 mm MNI files: 2 mm and 1 mm files of that field are resampled to it, no
    warning (it warned for every IXI file given to the CPU preset's model); another field of view is named."""
    prep = PreprocessingConfig(target_shape=(12, 14, 10), target_spacing=(4.0, 4.0, 4.0))
    two_mm = _volume(tmp_path / "two.nii.gz", (23, 27, 19), 2.0)  # 46x54x38 mm: within one 4 mm voxel
    one_mm = _volume(tmp_path / "one.nii.gz", (48, 56, 40), 1.0)
    head = _volume(tmp_path / "head.nii.gz", (30, 30, 30), 2.0)  # 60x60x60 mm
    lines = dataset.input_warnings(_frame(two_mm, one_mm, head), prep)
    assert [line.split(":")[0] for line in lines] == [head]
    assert "grid 30x30x30 at 2x2x2 mm, the model was trained on 12x14x10 at 4x4x4 mm" in lines[0]


def test_a_full_head_does_not_look_skull_stripped(tmp_path):
    stripped = _volume(tmp_path / "brain.nii.gz", (40, 40, 40), 4.0)  # a ~1.2 l ball in a 4 l field of view
    head = _volume(tmp_path / "head.nii.gz", (40, 40, 40), 4.0, full=True)
    lines = dataset.input_warnings(_frame(stripped, head))
    assert len(lines) == 1 and lines[0].startswith(f"{head}: does not look skull-stripped (4096 ml")


def test_check_warns_and_strict_makes_it_an_error(tmp_path, capsys):
    images = [_volume(tmp_path / f"s{i}.nii.gz", SHAPE, 2.0) for i in range(2)]
    odd = _volume(tmp_path / "odd.nii.gz", (30, 30, 30), 1.0)
    pd.DataFrame({"image": [*images, odd]}).to_csv(tmp_path / "split.csv", index=False)
    assert dataset.main(["--check", str(tmp_path / "split.csv")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and odd in warnings[0]
    assert dataset.main(["--check", str(tmp_path / "split.csv"), "--strict"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("ERROR: 1 input(s) do not look model-ready") and odd in error


@pytest.mark.parametrize("script", ["infer", "save_latent"])
def test_scripts_compare_with_the_checkpoint_grid(tmp_path, script, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt", target_shape=SHAPE)
    off = _volume(tmp_path / "off.nii.gz", (30, 30, 30), 1.0)
    out = tmp_path / "out"
    argv = ["--model_checkpoint", str(checkpoint), "--output_dir", str(out), "--device", "cpu"]
    argv += ["--num_workers", "0", "--input_data" if script == "infer" else "--dataset", off]
    argv += ["--no_lpips"] if script == "infer" else []
    main = infer.main if script == "infer" else save_latent.main
    assert main([*argv, "--strict"]) == 2
    error = capsys.readouterr().err
    assert "ERROR: 1 input(s) do not look model-ready" in error and "trained on 24x28x20 at 2x2x2 mm" in error
    assert not any(out.glob("off*"))
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and off in warnings[0] and "prepare.py" in warnings[0]


def test_train_strict_refuses_a_split_that_mixes_grids(tmp_path):
    (tmp_path / "data").mkdir()
    train_csv, val_csv = make_tiny_split(tmp_path / "data")
    _volume(tmp_path / "data" / "odd.nii.gz", (30, 30, 30), 1.0)
    frame = pd.read_csv(train_csv)
    pd.concat([frame, pd.DataFrame([{"subject_id": "odd", "image": "odd.nii.gz", "age": 30}])]).to_csv(
        train_csv, index=False
    )
    with pytest.raises(dataset.DataError, match="do not look model-ready") as error:
        train.main([*tiny_overrides(tmp_path, (train_csv, val_csv)), "--strict"])
    assert "odd.nii.gz: grid 30x30x30" in str(error.value)
