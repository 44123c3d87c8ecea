"""Shared test fixtures: keep torch to the two CI cores and locate the optional shared IXI data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
IXI_DIR = REPO_ROOT.parent / "shared" / "data" / "ixi"

torch.set_num_threads(2)


@pytest.fixture
def ixi_dir() -> Path:
    """The shared real-data folder; the test is skipped when it is absent (e.g. outside this workplace)."""
    if not (IXI_DIR / "train.csv").is_file():
        pytest.skip(f"shared IXI data not found at {IXI_DIR}")
    return IXI_DIR


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> tuple[Path, Path]:
    """Six smooth synthetic 'heads' at 2 mm (a bright ellipsoid with texture), as train (4) / val (2) CSVs."""
    from helpers import make_tiny_split

    return make_tiny_split(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture
def one_thread():
    """torch on one thread for the test (as a subprocess started with OMP_NUM_THREADS=1), as before after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
