"""save_latent.py: resume after SIGKILL, manifest columns, reproducible sampling, failures, normalisation."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import INPUT_FAULTS, assert_failed_before_writing, faulty_inputs, make_split, tiny_checkpoint

import save_latent
from latents import denormalise_latent, normalise_latent, read_latent, write_latent
from metrics import LatentStatistics

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(checkpoint: Path, split: Path, out: Path, *extra: str) -> int:
    argv = ["--model_checkpoint", str(checkpoint), "--dataset", str(split), "--output_dir", str(out)]
    return save_latent.main([*argv, "--device", "cpu", "--num_workers", "0", *extra])


def latent_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.npy") if not p.name.startswith("."))


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, one_thread) -> None:
    """Kill -9 mid-run, rerun, and get the uninterrupted run's latents and statistics to the last digit. The
    killed run is a process of its own and the other two run here: all on one thread (a thread count changes
    the float summation order, whatever the machine's core count or the tests run before)."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt", target_shape=(48, 48, 48))
    n = 10
    split = make_split(tmp_path / "data", n, shape=(50, 50, 50))
    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "save_latent.py",
        "--model_checkpoint",
        str(checkpoint),
        "--dataset",
        str(split),
    ]
    command += ["--output_dir", str(killed), "--device", "cpu", "--num_workers", "0", "--batch_size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while len(latent_files(killed)) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    done = latent_files(killed)
    assert 3 <= len(done) < n, "the run finished before it could be killed"
    assert not (killed / "manifest.csv").exists()
    for path in done:  # never a half-written file under a final name
        assert np.load(path).shape == (2, 24, 24, 24)

    assert run(checkpoint, split, killed, "--batch_size", "2") == 0
    assert len(latent_files(killed)) == n and not list(killed.glob(".*.tmp"))
    fresh = tmp_path / "fresh"
    assert run(checkpoint, split, fresh, "--batch_size", "2") == 0

    manifests = [pd.read_csv(folder / "manifest.csv") for folder in (killed, fresh)]
    for manifest, folder in zip(manifests, (killed, fresh), strict=True):
        assert [Path(p).parent for p in manifest["latent_path"]] == [folder.resolve()] * n
    pd.testing.assert_frame_equal(*(m.drop(columns="latent_path") for m in manifests))
    stats = [json.loads((folder / "latent_stats.json").read_text()) for folder in (killed, fresh)]
    assert stats[0] == stats[1]
    assert stats[0]["num_volumes"] == n and stats[0]["latent_shape"] == [2, 24, 24, 24]
    assert stats[0]["scale_factor"] == pytest.approx(1 / stats[0]["std"])
    for a, b in zip(latent_files(killed), latent_files(fresh), strict=True):
        np.testing.assert_array_equal(np.load(a), np.load(b))


def test_manifest_columns_and_reproducible_sampling(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    split = make_split(tmp_path / "data", 3)
    runs = {
        "mean": ("--format", "nii.gz"),
        "sample_a": ("--mode", "sample", "--format", "nii.gz", "--batch_size", "3"),
        "sample_b": ("--mode", "sample", "--format", "nii.gz", "--batch_size", "3"),
    }
    for name, extra in runs.items():
        assert run(checkpoint, split, tmp_path / name, *extra) == 0

    manifest = pd.read_csv(tmp_path / "mean" / "manifest.csv")
    source = pd.read_csv(split)
    assert set(source.columns) | {"mask", "latent_path"} == set(manifest.columns)
    assert list(manifest["age"]) == list(source["age"]) and manifest["site"].isna().sum() == 2
    latents = {
        name: [read_latent(p)[0] for p in pd.read_csv(tmp_path / name / "manifest.csv")["latent_path"]]
        for name in runs
    }
    for a, b, mean in zip(latents["sample_a"], latents["sample_b"], latents["mean"], strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert not np.allclose(a.numpy(), mean.numpy())
    stats = json.loads((tmp_path / "sample_a" / "latent_stats.json").read_text())
    assert stats["mode"] == "sample" and len(stats["channel_std"]) == 2
    assert stats["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_failures_are_listed_and_written_latents_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    split = make_split(tmp_path / "data", 3)
    frame = pd.read_csv(split)
    (tmp_path / "data" / "empty.nii.gz").write_bytes(b"")
    frame.loc[len(frame)] = {"subject_id": "empty", "image": "empty.nii.gz", "age": 1.0, "site": None}
    frame.to_csv(split, index=False)
    out = tmp_path / "out"
    assert run(checkpoint, split, out, "--batch_size", "2") == 1
    assert "empty.nii.gz" in capsys.readouterr().err
    assert list(pd.read_csv(out / "manifest.csv")["subject_id"]) == ["sub00", "sub01", "sub02"]
    assert json.loads((out / "latent_stats.json").read_text())["num_volumes"] == 3
    assert run(checkpoint, split, out, "--mode", "sample") == 2  # other settings than the latents there


@pytest.mark.parametrize("fault", INPUT_FAULTS)
def test_failing_run_leaves_no_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: str
) -> None:
    """Checkpoint, split, pre-flight check and output folder are checked before anything is written."""
    checkpoint, split, out = faulty_inputs(tmp_path, fault)
    code = run(checkpoint, split, out)
    assert_failed_before_writing(tmp_path, fault, code, capsys.readouterr().err, out)


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
@pytest.mark.parametrize("latent_format", ["npy", "nii.gz", "pt"])
def test_latent_file_mode_follows_umask(tmp_path: Path, umask: int, latent_format: str) -> None:
    """Latents are written atomically but with the mode of any new file (0o666 & ~umask), not 0600."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    split = make_split(tmp_path / "data", 1)
    old = os.umask(umask)
    try:
        assert run(checkpoint, split, tmp_path / "out", "--format", latent_format) == 0
    finally:
        os.umask(old)
    latent = tmp_path / "out" / f"sub00.{latent_format}"
    assert stat.S_IMODE(latent.stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize("mode", ["none", "global", "channel"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 4, 5, 6)])
def test_normalise_then_denormalise_is_the_identity(mode: str, shape: tuple[int, ...]) -> None:
    channels = shape[-4]
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3.0 + 1.5
    stats = LatentStatistics(channels)
    stats.update(z if len(shape) == 5 else z[None])
    summary = stats.summary()
    normalised = normalise_latent(z, summary, mode)
    assert normalised.shape == z.shape and normalised.dtype == z.dtype
    assert torch.equal(normalised, z) == (mode == "none")
    torch.testing.assert_close(denormalise_latent(normalised, summary, mode), z, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", ["global", "channel"])
def test_normalisation_of_a_split_is_recorded_and_standardises_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """latent_stats.json records the mode's shift/scale; the files stay as saved; the split's normalised
    latents have std 1 (global: over all channels) or mean 0 and std 1 per channel (channel)."""
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    split = make_split(tmp_path / "data", 4)
    assert run(checkpoint, split, tmp_path / "plain") == 0
    capsys.readouterr()
    assert run(checkpoint, split, tmp_path / mode, "--normalise", mode) == 0
    printed = capsys.readouterr().out
    stats = json.loads((tmp_path / mode / "latent_stats.json").read_text())
    for channel, (mean, std) in enumerate(zip(stats["channel_mean"], stats["channel_std"], strict=True)):
        assert f"{channel:>9}{mean:>11.4g}{std:>10.4g}{1 / std:>10.4g}" in printed
    record = stats["normalisation"]
    assert record["mode"] == mode
    if mode == "channel":
        assert record["shift"] == stats["channel_mean"]
        assert record["scale"] == pytest.approx([1 / s for s in stats["channel_std"]])
    else:
        assert record["shift"] == [0.0, 0.0] and record["scale"] == [stats["scale_factor"]] * 2
    for plain, kept in zip(latent_files(tmp_path / "plain"), latent_files(tmp_path / mode), strict=True):
        np.testing.assert_array_equal(np.load(plain), np.load(kept))

    latents = torch.stack([read_latent(p)[0] for p in latent_files(tmp_path / mode)])  # (B, C, d, h, w)
    values = normalise_latent(latents, stats, mode).double().transpose(0, 1).flatten(1)  # (C, values)
    if mode == "channel":
        torch.testing.assert_close(values.mean(1), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            values.std(1, correction=0), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0
        )
        assert not torch.allclose(latents.transpose(0, 1).flatten(1).std(1), torch.ones(2), atol=0.05)
    else:
        assert float(values.std(correction=0)) == pytest.approx(1.0, abs=1e-5)


def test_constant_latent_channel_cannot_be_normalised_per_channel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "vae.pt")
    payload = torch.load(checkpoint, weights_only=True)
    payload["vae"]["mu_head.weight"][1] = 0.0  # channel 1 of the posterior mean = its bias, everywhere
    torch.save(payload, checkpoint)
    split = make_split(tmp_path / "data", 2)
    assert run(checkpoint, split, tmp_path / "out", "--normalise", "channel") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]  # no progress bars
    assert len(errors) == 1 and errors[0].startswith(
        f"ERROR: {tmp_path / 'out' / 'latent_stats.json'} not written: "
    )
    assert errors[0].endswith("has a zero; cannot normalise per channel")
    assert not (tmp_path / "out" / "latent_stats.json").exists()
    assert run(checkpoint, split, tmp_path / "out", "--normalise", "global") == 0


def test_pt_latent_of_a_batch_holds_only_its_own_values(tmp_path: Path) -> None:
    """A latent cut from a batch (B, C, d, h, w) is saved alone: torch.save of a view would store the whole
    batch's memory (a .pt file B times too large)."""
    batch = torch.randn(3, 2, 6, 7, 5)
    write_latent(batch[1], tmp_path / "one.pt", np.eye(4))
    loaded = torch.load(tmp_path / "one.pt", weights_only=True)
    torch.testing.assert_close(loaded, batch[1], rtol=0, atol=0)
    assert loaded.untyped_storage().nbytes() == batch[1].numel() * 4


def test_a_nifti_latent_written_twice_has_the_same_bytes(tmp_path, monkeypatch):
    """No write time in the gzip header (as nibabel's own .nii.gz writer): reruns give byte-identical files."""
    latent = torch.rand(4, 3, 3, 3)
    write_latent(latent, tmp_path / "a.nii.gz", np.eye(4))
    monkeypatch.setattr(gzip.time, "time", lambda: 1e9)  # another clock for the second write
    write_latent(latent, tmp_path / "b.nii.gz", np.eye(4))
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
