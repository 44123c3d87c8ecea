"""Tests for demo_cohort.py: the synthetic template-derived demo cohort and its on-demand build."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from config import DataConfig
from dataset import preflight, read_split
from demo_cohort import DEMO_SOURCE, ensure_demo_data, make_demo_cohort


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_demo_cohort_deterministic_and_quick(tmp_path):
    start = time.perf_counter()
    csvs = make_demo_cohort(tmp_path / "a", n_train=2, n_val=1, n_test=1, seed=3)
    assert time.perf_counter() - start < 30
    make_demo_cohort(tmp_path / "b", n_train=2, n_val=1, n_test=1, seed=3)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    train = read_split(csvs["train"])
    assert len(train) == 2 and set(train["source"]) == {DEMO_SOURCE}
    assert preflight(train).equals(train)
    first, second = (nib.load(p) for p in train["image"])
    assert first.shape == (91, 109, 91) and np.allclose(
        first.affine, [[-2, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]]
    )
    assert not np.array_equal(first.get_fdata(), second.get_fdata())


def test_ensure_demo_data_only_inside_demo_dir(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("demo_cohort.make_demo_cohort", lambda out_dir: calls.append(Path(out_dir)))
    demo = tmp_path / "demo"
    ensure_demo_data(
        DataConfig(train_csv=str(demo / "train.csv"), val_csv=str(demo / "val.csv"), demo_dir=str(demo))
    )
    assert calls == [demo.resolve()]
    ensure_demo_data(
        DataConfig(train_csv=str(tmp_path / "x.csv"), val_csv=str(demo / "val.csv"), demo_dir=str(demo))
    )
    ensure_demo_data(DataConfig(demo_dir=None))
    assert len(calls) == 1
