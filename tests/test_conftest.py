"""tests/conftest.py's guard: a test that leaves a process-wide torch setting changed fails, and the next test
runs with the settings put back (so no result depends on the order the tests run in)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

LEAKY_TESTS = """
import torch


def test_leaves_threads_changed():
    torch.set_num_threads(3)


def test_leaves_deterministic_algorithms_on():
    torch.use_deterministic_algorithms(True, warn_only=True)


def test_leaves_grad_off_and_double_default():
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)


def test_restores_what_it_changes():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_num_threads(threads)


def test_runs_with_the_settings_put_back():
    assert torch.get_num_threads() == 2 and torch.is_grad_enabled()
    assert torch.get_default_dtype() == torch.float32 and not torch.are_deterministic_algorithms_enabled()
"""


def test_a_test_that_leaves_torch_settings_changed_fails(tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY_TESTS)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            "/dev/null",
            "--rootdir",
            ".",
            "test_leaky.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "5 passed, 3 errors" in output, output  # an error at teardown of each leaky test
    for message in (
        "ERROR at teardown of test_leaves_threads_changed",
        "torch.get_num_threads(): 2 → 3",
        "ERROR at teardown of test_leaves_deterministic_algorithms_on",
        "torch.are_deterministic_algorithms_enabled(): False → True",
        "torch.is_deterministic_algorithms_warn_only_enabled(): False → True",
        "ERROR at teardown of test_leaves_grad_off_and_double_default",
        "torch.get_default_dtype(): torch.float32 → torch.float64",
        "torch.is_grad_enabled(): True → False",
    ):
        assert message in output, output
