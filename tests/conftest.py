"""Shared test fixtures: keep torch to the two CI cores, fail a test that leaves torch's process-wide settings
changed, and locate the optional shared IXI data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
IXI_DIR = REPO_ROOT.parent / "shared" / "data" / "ixi"

torch.set_num_threads(2)


def torch_global_settings() -> dict[str, object]:
    """torch's process-wide settings that change results or speed: a test must leave them as it found them."""
    return {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.is_deterministic_algorithms_warn_only_enabled()": (
            torch.is_deterministic_algorithms_warn_only_enabled()
        ),
        "torch.backends.cudnn.deterministic": torch.backends.cudnn.deterministic,
        "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.is_inference_mode_enabled()": torch.is_inference_mode_enabled(),
    }


def restore_torch_global_settings(settings: dict[str, object]) -> None:
    """Put back what :func:`torch_global_settings` returned."""
    torch.set_num_threads(settings["torch.get_num_threads()"])
    torch.set_default_dtype(settings["torch.get_default_dtype()"])
    torch.use_deterministic_algorithms(
        settings["torch.are_deterministic_algorithms_enabled()"],
        warn_only=settings["torch.is_deterministic_algorithms_warn_only_enabled()"],
    )
    torch.backends.cudnn.deterministic = settings["torch.backends.cudnn.deterministic"]
    torch.backends.cudnn.benchmark = settings["torch.backends.cudnn.benchmark"]
    torch.set_grad_enabled(settings["torch.is_grad_enabled()"])


@pytest.fixture(autouse=True)
def torch_settings_unchanged():
    """Fail the test (at teardown) when it, its fixtures or the code it runs leave a torch setting changed, so
    that no result depends on the order the tests run in; the settings are put back for the next test."""
    before = torch_global_settings()
    yield
    after = torch_global_settings()
    changed = [f"{name}: {before[name]} → {after[name]}" for name in before if after[name] != before[name]]
    if changed:
        restore_torch_global_settings(before)
        pytest.fail(
            "the test left torch's process-wide settings changed: " + "; ".join(changed), pytrace=False
        )


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
