"""User-facing fault suite: every fault goes through the real entry points (CLI or ``main(argv)``).

Each test injects one fault and asserts on what the user sees (exit code, a message naming the file and the
problem, no Python traceback where the scripts promise a clean error) and that nothing already written is
lost or corrupted. Faults inside a run are injected into a CLI subprocess by a small prelude that patches one
function (``torch.save``, ``numpy.save``, ``MaisiVAE.forward``) and then runs the script as ``__main__``
(``runpy``), so the script's own error handling and exit codes are exercised. Kills never depend on timing:
either the kill is issued from inside the patched write, or the test polls for a file and then kills.

See FAULTS.md for the table of faults, messages and what each test guards.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    REPO_ROOT,
    SHAPE,
    flip_byte_in_largest_tensor,
    oblique_affine,
    run_train_subprocess,
    tiny_checkpoint,
    tiny_config,
    tiny_overrides,
    write_volume,
)

import dataset
import infer
import save_latent
import train
from checkpoints import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, save_checkpoint
from dataset import DataError
from model.maisi_vae import MaisiVAE

FAST = {"perceptual_weight": 0.0}


# ------------------------------------------------------------------------------------------------ helpers


def run_script(
    script: str, args: list[str], prelude: str = "", timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python <script> <args>``; with a ``prelude``, that code runs first and the script then runs as __main__."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
    if not prelude:
        command = [sys.executable, script, *args]
    else:
        code = (
            f"import runpy, sys\n{prelude}\n"  # the repository root is sys.path[0]: the cwd of ``-c``
            f"sys.argv = [{script!r}, *{args!r}]\nrunpy.run_path({script!r}, run_name='__main__')\n"
        )
        command = [sys.executable, "-c", code]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """Exit ``code``, every fragment in stderr, no traceback."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in:\n{result.stderr[-3000:]}"


def run_dir_of(base: Path) -> Path:
    return base / "runs" / "tiny"


def last_pt(base: Path) -> Path:
    return run_dir_of(base) / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_split) -> Path:
    """A finished one-epoch tiny run (runs/tiny/checkpoints/last.pt, best_runs/tiny/best_model.pt)."""
    base = tmp_path_factory.mktemp("trained")
    train.fit(tiny_config(base, tiny_split, num_epochs=1, **FAST))
    return base


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of ``trained_run`` to resume or damage."""
    for name in ("runs", "best_runs"):
        shutil.copytree(trained_run / name, tmp_path / name)
    return tmp_path


class PickledCode:
    """Unpickling this runs a shell command (creates ``marker``): a checkpoint that needs code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------------- train.py: SIGKILL


def test_train_sigkill_mid_epoch_then_resume(tmp_path, tiny_split):
    """kill -9 in the middle of an epoch: last.pt is a complete mid-epoch checkpoint; --resume finishes."""
    args = tiny_overrides(tmp_path, tiny_split, num_epochs=1, checkpoint_every_steps=1, **FAST)
    victim = run_train_subprocess(args)
    path = last_pt(tmp_path)
    deadline = time.monotonic() + 240
    while not path.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    output = victim.communicate(timeout=60)[0]
    assert victim.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{output}"
    killed = load_checkpoint(path)  # complete, loadable (atomic write)
    assert (killed["epoch"], killed["step_in_epoch"], killed["global_step"]) == (0, 1, 1)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]

    train.fit(
        tiny_config(tmp_path, tiny_split, num_epochs=1, checkpoint_every_steps=1, **FAST), resume="auto"
    )
    last = load_checkpoint(path)
    assert last["global_step"] == 2 and [r["epoch"] for r in last["history"]] == [0]
    assert all(torch.isfinite(t).all() for t in last["vae"].values())
    assert "resumed" in (run_dir_of(tmp_path) / "train.log").read_text()


KILL_IN_SAVE = """
import io, os, signal, torch
_save = torch.save
def save(obj, file, *args, **kwargs):
    if isinstance(obj, dict) and "optimizer_g" in obj and obj["epoch"] == 1 and obj["step_in_epoch"] == 0:
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half the checkpoint on disk ...
        file.flush()
        os.fsync(file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies mid-write
    return _save(obj, file, *args, **kwargs)
torch.save = save
"""


@pytest.fixture(scope="module")
def killed_in_save(tmp_path_factory, tiny_split) -> dict:
    """Run that is SIGKILLed half-way through writing last.pt at the end of epoch 0, then resumed."""
    base = tmp_path_factory.mktemp("killed_in_save")
    args = tiny_overrides(base, tiny_split, num_epochs=1, checkpoint_every_steps=1, **FAST)
    result = run_script("train.py", args, prelude=KILL_IN_SAVE)
    path = last_pt(base)
    state = {
        "returncode": result.returncode,
        "output": result.stderr[-3000:],
        "after_kill": load_checkpoint(path),
        "files_after_kill": sorted(p.name for p in path.parent.iterdir()),
        "best_after_kill": load_checkpoint(base / "best_runs" / "tiny" / "best_model.pt"),
    }
    state["resume_code"] = train.main([*args, "--resume"])
    state["last"] = load_checkpoint(path)
    state["files_after_resume"] = sorted(p.name for p in path.parent.iterdir())
    state["metrics"] = pd.read_csv(run_dir_of(base) / "metrics.csv")
    return state


def test_train_sigkill_during_checkpoint_save_keeps_previous(killed_in_save):
    """The half-written temporary file never replaces last.pt: the previous (mid-epoch) one loads; resume works."""
    assert killed_in_save["returncode"] == -signal.SIGKILL, killed_in_save["output"]
    before = killed_in_save["after_kill"]
    assert (before["epoch"], before["step_in_epoch"], before["global_step"]) == (0, 1, 1)
    assert "last.pt" in killed_in_save["files_after_kill"]
    assert killed_in_save["best_after_kill"]["epoch"] == 0  # written before the kill, complete
    assert killed_in_save["resume_code"] == 0
    last = killed_in_save["last"]
    assert last["global_step"] == 2 and [r["epoch"] for r in last["history"]] == [0]


def test_train_sigkill_during_checkpoint_save_no_duplicate_metrics_rows(killed_in_save):
    assert list(killed_in_save["metrics"]["epoch"]) == [0]


def test_train_sigkill_during_checkpoint_save_leaves_no_temp_file(killed_in_save):
    assert killed_in_save["files_after_resume"] == ["last.pt"]


# ------------------------------------------------------------------------------- train.py: NaN / Inf


def poison_training_items(monkeypatch: pytest.MonkeyPatch, values: dict[int, float]) -> None:
    """Training item number n (1-based, in loading order) gets ``values[n]`` (NaN/Inf) in every voxel."""
    original = train.make_loaders
    calls = {"n": 0}

    def make_loaders(config, context):
        loader, val_set, generator = original(config, context)

        class Poisoned(type(loader.dataset)):
            def __getitem__(self, index):
                item = super().__getitem__(index)
                calls["n"] += 1
                if calls["n"] in values:
                    item = {**item, "image": torch.full_like(item["image"], values[calls["n"]])}
                return item

        loader.dataset.__class__ = Poisoned  # the training set only: validation stays clean
        return loader, val_set, generator

    monkeypatch.setattr(train, "make_loaders", make_loaders)


def test_train_nan_and_inf_batches_are_skipped_and_logged(tmp_path, tiny_split, monkeypatch):
    """Batch 0 holds a NaN volume, batch 1 an Inf volume: both steps are skipped, logged and counted."""
    poison_training_items(monkeypatch, {1: float("nan"), 3: float("inf")})
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1, **FAST))
    log = (run_dir_of(tmp_path) / "train.log").read_text()
    assert "epoch 0 up to step 1: 2 non-finite loss or gradient step(s) skipped (2 in a row, 2 in all)" in log
    last = load_checkpoint(last_pt(tmp_path))
    # global_step counts batches; both were skipped
    assert last["global_step"] == 2 and last["history"][-1]["train/skipped_steps"] == 2
    assert all(torch.isfinite(t).all() for t in last["vae"].values())
    assert np.isfinite(pd.read_csv(run_dir_of(tmp_path) / "metrics.csv")["val/psnr"]).all()


def test_train_inf_gradient_is_skipped_and_logged(tmp_path, tiny_split, monkeypatch):
    original = MaisiVAE.forward
    calls = {"n": 0}

    def forward(self, x):
        recon, mu, sigma = original(self, x)
        calls["n"] += 1
        if calls["n"] == 1 and recon.requires_grad:  # finite loss, Inf gradient
            recon.register_hook(lambda grad: grad * float("inf"))
        return recon, mu, sigma

    monkeypatch.setattr(MaisiVAE, "forward", forward)
    monkeypatch.setattr(train, "estimate_cpu_step_seconds", lambda *args: 1.0)  # its forward would be call 1
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1, **FAST))
    assert "1 non-finite loss or gradient step(s) skipped" in (run_dir_of(tmp_path) / "train.log").read_text()
    last = load_checkpoint(last_pt(tmp_path))
    assert last["history"][-1]["train/skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in last["vae"].values())


ALWAYS_NAN = """
from model.maisi_vae import MaisiVAE
_forward = MaisiVAE.forward
def forward(self, x):
    recon, mu, sigma = _forward(self, x)
    return recon * float("nan"), mu, sigma
MaisiVAE.forward = forward
"""


def test_train_persistent_nan_stops_cleanly_keeping_checkpoint(run_copy, tiny_split):
    path = last_pt(run_copy)
    before = digest(path)
    args = tiny_overrides(run_copy, tiny_split, num_epochs=2, max_consecutive_nonfinite=2, **FAST)
    result = run_script("train.py", [*args, "--resume"], prelude=ALWAYS_NAN)
    assert_clean_error(
        result,
        2,
        "error: 2 consecutive steps had NaN/Inf losses or gradients (epoch 1, up to step 1); training stopped. "
        f"The last good checkpoint is {path}.",
    )
    assert digest(path) == before


# ------------------------------------------------------------------------------- train.py: full disk


def test_train_disk_full_during_checkpoint_save(run_copy, tiny_split, monkeypatch):
    """ENOSPC in the middle of writing last.pt (inside train.fit): a clear CheckpointError (train.py's CLI
    prints it as ``error: <message>``, exit 2), the previous last.pt byte-identical, no temporary file left."""
    path = last_pt(run_copy)
    before = digest(path)
    original = torch.save

    def disk_full(obj, file, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer_g" in obj and obj["epoch"] == 2:
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            file.write(buffer.getvalue()[:4096])
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    config = tiny_config(run_copy, tiny_split, num_epochs=2, **FAST)
    with pytest.raises(CheckpointError) as error:
        train.fit(config, resume="auto")
    assert str(error.value) == (
        f"could not write checkpoint {path}: No space left on device; the previous file (if any) is unchanged"
    )
    assert digest(path) == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert load_checkpoint(run_copy / "best_runs" / "tiny" / "best_model.pt")["format"] == CHECKPOINT_FORMAT


# ------------------------------------------------------------------------ checkpoints that do not fit


def test_train_resume_with_another_model_config_is_refused(run_copy, tiny_split):
    path = last_pt(run_copy)
    before = digest(path)
    args = tiny_overrides(run_copy, tiny_split, **FAST)
    args += ["--set", "model.latent_channels=3", "--set", "model.channels=[8, 32]", "--resume"]
    result = run_script("train.py", args)
    assert_clean_error(
        result,
        2,
        f"error: {path} was trained with another model config: channels: [8, 16] → [8, 32]; "
        "latent_channels: 2 → 3",
    )
    assert digest(path) == before


def test_train_resume_from_a_damaged_checkpoint_is_refused(run_copy, tiny_split):
    """One flipped bit inside a weight of last.pt: torch.load accepted it and the run went on with the changed
    weight; now the zip's CRC-32 check refuses it, one line, and the file is left as it is."""
    path = last_pt(run_copy)
    record = flip_byte_in_largest_tensor(path)
    before = digest(path)
    args = [*tiny_overrides(run_copy, tiny_split, **FAST), "--set", "train.num_epochs=2", "--resume"]
    result = run_script("train.py", args)
    assert_clean_error(result, 2, f"error: {path} is damaged: its record {record!r} fails the CRC-32 check")
    assert digest(path) == before


def test_train_refused_resume_keeps_run_config(run_copy, tiny_split):
    config_path = run_dir_of(run_copy) / "config.json"
    before = config_path.read_text()
    config = tiny_config(run_copy, tiny_split, extra=("model.latent_channels=3",), **FAST)
    with pytest.raises(Exception, match="another model config"):
        train.fit(config, resume="auto")
    assert config_path.read_text() == before


def misfit_checkpoint(kind: str, tmp_path: Path) -> tuple[Path, list[str], str]:
    """(checkpoint, extra flags, expected message fragment) for a checkpoint whose weights do not fit."""
    if kind == "config":  # our format; its config says 3 latent channels, its weights have 2
        state = load_checkpoint(tiny_checkpoint(tmp_path / "vae.pt"))
        state["config"]["model"]["latent_channels"] = 3
        save_checkpoint(state, tmp_path / "misfit.pt")
        return tmp_path / "misfit.pt", [], "misfit.pt does not fit the model config: shape mismatches ["
    # a bare MAISI state dict given with the wrong --maisi_* flags (4 latent channels; it has 2)
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

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
    torch.save(maisi.state_dict(), tmp_path / "maisi.pt")
    flags = [
        "--maisi_channels",
        "8",
        "16",
        "--maisi_num_res_blocks",
        "1",
        "1",
        "--maisi_norm_num_groups",
        "4",
    ]
    return tmp_path / "maisi.pt", flags, "(converted from the MAISI layout) does not fit the model config"


@pytest.mark.parametrize("kind", ["config", "maisi"])
@pytest.mark.parametrize("script", ["infer", "save_latent"])
def test_checkpoint_that_does_not_fit_the_model(tmp_path, capsys, kind, script):
    checkpoint, flags, expected = misfit_checkpoint(kind, tmp_path)
    image = write_volume(tmp_path / "a.nii.gz", SHAPE, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = tmp_path / "out"
    common = ["--model_checkpoint", str(checkpoint), "--output_dir", str(out), "--device", "cpu", *flags]
    if script == "infer":
        code = infer.main([*common, "--input_data", str(image), "--num_workers", "0", "--no_lpips"])
    else:
        code = save_latent.main([*common, "--dataset", str(image), "--num_workers", "0"])
    error = capsys.readouterr().err
    assert code == 2
    assert expected in error and str(checkpoint) in error
    assert "shape mismatches [decoder.conv_in.weight: (16, 2, 3, 3, 3) vs model" in error  # keys named
    assert not out.exists() or not any(out.iterdir())


# ----------------------------------------------------------------------- checkpoints with pickled code


@pytest.mark.parametrize("script", ["train", "infer", "save_latent"])
def test_checkpoint_with_pickled_code_is_refused(tmp_path, tiny_split, capsys, script):
    marker = tmp_path / "code_was_executed"
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "vae": {}, "payload": PickledCode(marker)}, evil)
    image = write_volume(tmp_path / "a.nii.gz", SHAPE, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = tmp_path / "out"
    common = ["--model_checkpoint", str(evil), "--output_dir", str(out), "--device", "cpu"]
    if script == "train":
        result = run_script(
            "train.py", [*tiny_overrides(tmp_path, tiny_split, **FAST), "--resume", str(evil)]
        )
        assert_clean_error(result, 2, f"error: refusing to load {evil}", "code execution")
        assert not last_pt(tmp_path).exists()
    else:
        if script == "infer":
            code = infer.main([*common, "--input_data", str(image), "--num_workers", "0", "--no_lpips"])
        else:
            code = save_latent.main([*common, "--dataset", str(image), "--num_workers", "0"])
        error = capsys.readouterr().err
        assert code == 2
        assert f"ERROR: refusing to load {evil}" in error and "code execution" in error
        assert not out.exists() or not any(out.iterdir())
    assert not marker.exists(), "the checkpoint's code was executed"


GARBAGE_CHECKPOINTS = {
    "empty": (b"", "is empty (0 bytes)"),
    "text": (
        b"subject_id,image\nsub-01,sub-01.nii.gz\n",
        "is not a PyTorch checkpoint (not a zip/pickle file)",
    ),
}


@pytest.mark.parametrize("kind", ["empty", "text", "pickled", "flipped"])
@pytest.mark.parametrize("script", ["infer", "save_latent"])
def test_garbage_checkpoint_is_one_clear_line(tmp_path, capsys, script, kind):
    """An empty file, a text file, pickled objects or a checkpoint with one flipped bit in a weight (torch.load
    accepted it, and infer.py wrote outputs with the changed weight) as --model_checkpoint: one line naming
    the file and the problem."""
    checkpoint = tmp_path / f"{kind}.pt"
    if kind == "flipped":
        record = flip_byte_in_largest_tensor(tiny_checkpoint(checkpoint))
        expected = (
            f"ERROR: {checkpoint} is damaged: its record {record!r} fails the CRC-32 check of the zip archive "
            "(the file changed after it was saved); use another copy or an earlier checkpoint"
        )
    elif kind == "pickled":
        torch.save({"format": CHECKPOINT_FORMAT, "payload": PickledCode(tmp_path / "marker")}, checkpoint)
        expected = (
            f"ERROR: refusing to load {checkpoint}: it contains pickled Python objects (posix.system) that "
            "would need code execution to load; only plain tensors and JSON-like metadata are accepted"
        )
    else:
        content, problem = GARBAGE_CHECKPOINTS[kind]
        checkpoint.write_bytes(content)
        expected = f"ERROR: {checkpoint} {problem}"
    image = write_volume(tmp_path / "a.nii.gz", SHAPE, np.diag([2.0, 2.0, 2.0, 1.0]))
    out = tmp_path / "out"
    common = ["--model_checkpoint", str(checkpoint), "--output_dir", str(out), "--device", "cpu"]
    if script == "infer":
        code = infer.main([*common, "--input_data", str(image), "--num_workers", "0"])
    else:
        code = save_latent.main([*common, "--dataset", str(image), "--num_workers", "0"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.splitlines() == [expected]
    assert "Traceback" not in error and "\x1b[" not in error
    assert not out.exists()


# ----------------------------------------------------------------------------- save_latent.py: SIGKILL

KILL_IN_LATENT_WRITE = """
import io, os, signal, numpy
_save = numpy.save
_calls = [0]
def save(file, array, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == 4:  # the 4th latent: half of it on disk, then the process dies
        buffer = io.BytesIO()
        _save(buffer, array, *args, **kwargs)
        file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # the temporary file of atomic_write
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(file, array, *args, **kwargs)
numpy.save = save
"""


def test_save_latent_sigkill_mid_write_then_resume_is_identical(tmp_path):
    from helpers import make_split

    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    split = make_split(tmp_path / "data", 6)
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    common = ["--model_checkpoint", str(checkpoint), "--dataset", str(split), "--device", "cpu"]
    common += ["--num_workers", "0", "--batch_size", "2"]
    result = run_script(
        "save_latent.py", [*common, "--output_dir", str(killed)], prelude=KILL_IN_LATENT_WRITE
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    done = sorted(p.name for p in killed.glob("*.npy") if not p.name.startswith("."))
    assert done == ["sub00.npy", "sub01.npy", "sub02.npy"]  # never a half-written file under a final name
    for name in done:
        assert np.load(killed / name).shape == (2, 12, 14, 10)
    assert len(list(killed.glob(".sub03.npy.*.tmp"))) == 1 and not (killed / "manifest.csv").exists()

    assert save_latent.main([*common, "--output_dir", str(killed)]) == 0
    assert save_latent.main([*common, "--output_dir", str(fresh)]) == 0
    assert not list(killed.glob(".*.tmp"))
    for name in [f"sub{i:02d}.npy" for i in range(6)]:
        np.testing.assert_array_equal(np.load(killed / name), np.load(fresh / name))
    manifests = [
        pd.read_csv(folder / "manifest.csv").drop(columns="latent_path") for folder in (killed, fresh)
    ]
    pd.testing.assert_frame_equal(*manifests)
    stats = [json.loads((folder / "latent_stats.json").read_text()) for folder in (killed, fresh)]
    assert stats[0] == stats[1] and stats[0]["num_volumes"] == 6


# ------------------------------------------------------------------------------------- bad input files


def good_array(shape=SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return np.where((grid**2).sum(0) < 0.6, 100 + 50 * grid[2] + rng.uniform(0, 20, shape), 0).astype(
        np.float32
    )


def write_nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def make_bad_file(kind: str, folder: Path) -> tuple[str, str]:
    """Write one broken file of ``kind`` into ``folder``; returns (file name, expected problem text)."""
    if kind == "missing":
        return "missing.nii.gz", "missing.nii.gz: missing file"
    if kind == "truncated":
        whole = write_nifti(folder / "whole.nii.gz", good_array()).read_bytes()
        (folder / "whole.nii.gz").unlink()
        (folder / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
        return "truncated.nii.gz", "truncated.nii.gz: unreadable: "
    if kind == "not_nifti":
        (folder / "notes.nii").write_text("this is not an image\n" * 30)
        return "notes.nii", "notes.nii: unreadable: "
    if kind == "not_nifti_gz":
        (folder / "notes_gz.nii.gz").write_bytes(gzip.compress(b"not an image either" * 40))
        return "notes_gz.nii.gz", "notes_gz.nii.gz: unreadable: "
    if kind == "4d":
        write_nifti(folder / "multi.nii.gz", np.stack([good_array()] * 3, axis=-1))
        return "multi.nii.gz", "multi.nii.gz: 3 volumes (4D); give one 3D volume per file"
    if kind == "2d":
        write_nifti(folder / "slice.nii.gz", good_array()[:, :, 10])
        return "slice.nii.gz", "slice.nii.gz: not a 3D volume (shape (24, 28))"
    if kind == "constant":
        write_nifti(folder / "constant.nii.gz", np.full(SHAPE, 7.0, np.float32))
        return "constant.nii.gz", "constant.nii.gz: constant image (every voxel = 7)"
    if kind == "nan":
        data = good_array()
        data[5, 5, 5] = np.nan
        data[6, 6, 6] = np.inf
        write_nifti(folder / "nan.nii.gz", data)
        return "nan.nii.gz", "nan.nii.gz: NaN/Inf voxels"
    if kind == "inverted":  # all negative, the brain darker than its background: nothing to normalise
        write_nifti(folder / "inverted.nii.gz", -good_array() - 1.0)
        return "inverted.nii.gz", "inverted.nii.gz: no voxel brighter than the background (-1, "
    raise ValueError(kind)


BAD_KINDS = ["missing", "truncated", "not_nifti", "not_nifti_gz", "4d", "2d", "constant", "nan", "inverted"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_in_infer_and_save_latent(tmp_path, capsys, kind):
    """One bad file among good ones: it is listed with its problem (exit 1), the good ones are written."""
    data = tmp_path / "data"
    data.mkdir()
    good = [write_volume(data / f"good{i}.nii.gz", (26, 30, 22), oblique_affine(), seed=i) for i in range(2)]
    bad_name, problem = make_bad_file(kind, data)
    pd.DataFrame({"image": [good[0].name, bad_name, good[1].name]}).to_csv(data / "split.csv", index=False)
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    common = ["--model_checkpoint", str(checkpoint), "--device", "cpu", "--num_workers", "0"]

    code = infer.main(
        [
            *common,
            "--input_data",
            str(data / "split.csv"),
            "--output_dir",
            str(tmp_path / "infer"),
            "--no_lpips",
        ]
    )
    error = capsys.readouterr().err
    assert code == 1, error
    assert "ERROR: 1 of 3 file(s) failed:" in error and problem in error
    assert error.count(f"{bad_name}: ") == 1  # the file is named once
    assert sorted(p.name for p in (tmp_path / "infer").glob("*_recon.nii.gz")) == [
        "good0_recon.nii.gz",
        "good1_recon.nii.gz",
    ]
    assert list(pd.read_csv(tmp_path / "infer" / "metrics.csv")["subject_id"]) == ["good0", "good1"]

    latents = tmp_path / "latents"
    code = save_latent.main([*common, "--dataset", str(data / "split.csv"), "--output_dir", str(latents)])
    error = capsys.readouterr().err
    assert code == 1, error
    assert "ERROR: 1 of 3 file(s) failed (left out of the manifest):" in error and problem in error
    assert list(pd.read_csv(latents / "manifest.csv")["subject_id"]) == ["good0", "good1"]
    assert json.loads((latents / "latent_stats.json").read_text())["num_volumes"] == 2


@pytest.fixture
def broken_split(tmp_path) -> tuple[Path, dict[str, str]]:
    """A CSV with one good file and one of each kind of bad file; returns (csv, {name: problem})."""
    data = tmp_path / "data"
    data.mkdir()
    write_nifti(data / "good.nii.gz", good_array())
    problems = dict(make_bad_file(kind, data) for kind in BAD_KINDS)
    pd.DataFrame({"image": ["good.nii.gz", *problems]}).to_csv(data / "broken.csv", index=False)
    return data / "broken.csv", problems


def test_dataset_check_lists_every_bad_file(broken_split, capsys):
    csv, problems = broken_split
    result = run_script("dataset.py", ["--check", str(csv)])
    assert_clean_error(result, 1, "ERROR: 9 of 10 file(s) failed the pre-flight check:", *problems.values())
    assert dataset.main(["--check", str(csv), "--skip_bad_files"]) == 0
    assert "SKIPPING 9 of 10 file(s):" in capsys.readouterr().err


def test_train_refuses_bad_files_then_skips_them_on_request(tmp_path, tiny_split, broken_split):
    csv, problems = broken_split
    args = [
        *tiny_overrides(tmp_path, tiny_split, num_epochs=1, **FAST),
        "--set",
        f"data.train_csv={json.dumps(str(csv))}",
    ]
    result = run_script("train.py", args)
    assert_clean_error(
        result,
        2,
        "error: 9 of 10 file(s) failed the pre-flight check (fix them, or set data.skip_bad_files / "
        "--skip_bad_files to drop them):",
        *problems.values(),
    )
    assert not last_pt(tmp_path).exists()
    extra = (f"data.train_csv={json.dumps(str(csv))}", "data.skip_bad_files=true")
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1, extra=extra, **FAST))
    log = (run_dir_of(tmp_path) / "train.log").read_text()
    assert "SKIPPING 9 of 10 file(s) that failed the pre-flight check" in log
    assert all(problem in log for problem in problems.values())
    assert load_checkpoint(last_pt(tmp_path))["global_step"] == 1  # the one good volume


@pytest.mark.parametrize("script", ["dataset", "train", "infer", "save_latent"])
def test_csv_without_image_column(tmp_path, tiny_split, capsys, script):
    csv = tmp_path / "no_image.csv"
    pd.DataFrame({"path": ["a.nii.gz"], "age": [30]}).to_csv(csv, index=False)
    expected = f"{csv}: CSV has no 'image' column (columns: ['path', 'age'])"
    if script == "train":
        config = tiny_config(tmp_path, tiny_split, extra=(f"data.train_csv={json.dumps(str(csv))}",), **FAST)
        with pytest.raises(DataError) as error:
            train.fit(config)
        assert str(error.value) == expected  # train.py's CLI prints it as "error: <message>", exit 2
        assert not last_pt(tmp_path).exists()
        return
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    common = ["--model_checkpoint", str(checkpoint), "--device", "cpu", "--output_dir", str(tmp_path / "out")]
    if script == "dataset":
        code = dataset.main(["--check", str(csv)])
    elif script == "infer":
        code = infer.main([*common, "--input_data", str(csv)])
    else:
        code = save_latent.main([*common, "--dataset", str(csv)])
    assert code == 2
    assert f"ERROR: {expected}" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ out of memory


def out_of_memory_on_call(target: str, call: int) -> str:
    """A prelude making ``target`` (``module:Class.method``) raise a CUDA-style OutOfMemoryError on call
    number ``call`` (1-based)."""
    module, attribute = target.split(":")
    owner, method = attribute.split(".")
    return f"""
import torch
from {module} import {owner}
_original, _calls = {owner}.{method}, []
def _patched(*args, **kwargs):
    _calls.append(1)
    if len(_calls) == {call}:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return _original(*args, **kwargs)
{owner}.{method} = _patched
"""


def assert_one_out_of_memory_line(result: subprocess.CompletedProcess, prefix: str, *fragments: str) -> None:
    assert_clean_error(result, 2, *fragments)
    lines = [line for line in result.stderr.splitlines() if "out of memory" in line]
    assert (
        len(lines) == 1 and lines[0].startswith(prefix) and lines[0] == result.stderr.strip().splitlines()[-1]
    )


def test_train_out_of_memory_is_one_line_keeping_the_checkpoint(run_copy, tiny_split):
    path = last_pt(run_copy)
    before = digest(path)
    args = [*tiny_overrides(run_copy, tiny_split, num_epochs=2, **FAST), "--resume"]
    result = run_script("train.py", args, prelude=out_of_memory_on_call("torch.optim:AdamW.step", 1))
    size = "×".join(map(str, SHAPE))
    assert_one_out_of_memory_line(
        result,
        "error: out of memory on cpu with batches of 2 volume(s) of " + size,
        "peak memory",
        "lower train.batch_size (now 2)",
        "train.recompute=on",
        "train.amp=bf16 (now auto)",
        f"the last checkpoint, {path}, is intact",
    )
    assert digest(path) == before


@pytest.mark.parametrize("script", ["infer.py", "save_latent.py"])
def test_infer_and_save_latent_out_of_memory_is_one_line(tmp_path, script):
    from helpers import make_split

    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    split = make_split(tmp_path / "data", 4)
    out = tmp_path / "out"
    source = "--input_data" if script == "infer.py" else "--dataset"
    args = ["--model_checkpoint", str(checkpoint), source, str(split), "--output_dir", str(out)]
    args += ["--device", "cpu", "--num_workers", "0", "--batch_size", "2"]
    prelude = out_of_memory_on_call("model.maisi_vae:MaisiVAE.encode", 2)  # the second batch
    result = run_script(script, [*args, *(["--no_lpips"] if script == "infer.py" else [])], prelude=prelude)
    assert_one_out_of_memory_line(
        result,
        "ERROR: out of memory on cpu with batches of 2 volume(s) of ",
        "peak memory",
        "lower --batch_size (now 2)",
        "--amp bf16",
    )
    if script == "save_latent.py":  # the first batch's latents are kept, complete
        assert sorted(p.name for p in out.glob("sub*.npy")) == ["sub00.npy", "sub01.npy"]
        assert all(np.load(p).shape == (2, 12, 14, 10) for p in out.glob("sub*.npy"))


# ------------------------------------------------------------------------------- --help answers at once


@pytest.mark.parametrize("script", ["train.py", "infer.py", "save_latent.py", "dataset.py"])
@pytest.mark.parametrize("args", [["--help"], ["--no_such_flag"]], ids=["help", "argument_error"])
def test_help_and_argument_errors_answer_before_torch_and_monai_load(script, args):
    """``--help`` and argparse errors come before the heavy imports (MONAI took ~10 s): the subprocess's
    import log (``python -X importtime``) names no torch or monai module."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", script, *args], cwd=REPO_ROOT, capture_output=True, text=True
    )
    imported = [
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "import time:" in line
    ]
    assert "argparse" in imported  # the import log is there: the check below can fail
    heavy = sorted({name.split(".")[0] for name in imported} & {"torch", "monai", "numpy", "pandas"})
    assert heavy == [], f"{script} {args[0]} imported {heavy}"
    if args == ["--help"]:
        assert result.returncode == 0 and "usage:" in result.stdout
    else:
        assert result.returncode == 2 and f"{script}: error: " in result.stderr  # argparse's message
