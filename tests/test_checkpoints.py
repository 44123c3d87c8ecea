"""checkpoints.py: atomic save, weights_only load, clear errors, resume into a TrainState, loading a VAE."""

from __future__ import annotations

import argparse
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from utils import get_rng_state

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_checkpoint_round_trip_weights_only(tmp_path):
    payload = {"weights": torch.arange(5.0), "config": {"a": [1, 2], "b": None}, "rng": get_rng_state()}
    save_checkpoint(payload, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["weights"], payload["weights"])
    assert loaded["config"] == payload["config"]
    assert list(tmp_path.iterdir()) == [tmp_path / "c.pt"]  # no temporary file left behind


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt.*code execution"):
        load_checkpoint(path)


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)

    def disk_full(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*unchanged"):
        save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(load_checkpoint(path)["step"]) == 1
    assert list(tmp_path.iterdir()) == [path]


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    """A process killed in the middle of writing leaves the old checkpoint loadable."""
    path = tmp_path / "last.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import checkpoints
        def killed_mid_write(obj, file, *args, **kwargs):
            file.write(b"x" * 4096)
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed_mid_write
        checkpoints.save_checkpoint({{"step": torch.tensor(2)}}, {str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert int(load_checkpoint(path)["step"]) == 1


def write_bad_checkpoint(kind: str, folder: Path) -> tuple[Path, str]:
    """A file that is not a usable checkpoint; returns (path, expected message after the path)."""
    path = folder / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
        return path, f"{path} is empty (0 bytes)"
    if kind == "text":  # what torch.load used to report as IndexError: pop from empty list
        path.write_text("subject_id,image\nsub-01,sub-01.nii.gz\n")
        return path, f"{path} is not a PyTorch checkpoint (not a zip/pickle file)"
    torch.save({"format": "brain-vae3d/1", "config": argparse.Namespace(x=1), "payload": Evil()}, path)
    return path, (
        f"refusing to load {path}: it contains pickled Python objects (argparse.Namespace, posix.system) "
        "that would need code execution to load; only plain tensors and JSON-like metadata are accepted"
    )


@pytest.mark.parametrize("kind", ["empty", "text", "pickled"])
def test_bad_checkpoint_is_one_clear_line(tmp_path, kind):
    path, expected = write_bad_checkpoint(kind, tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == expected


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_checkpoint_file_mode_follows_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_checkpoint({"step": torch.tensor(1)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o666 & ~umask
