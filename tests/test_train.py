"""train.py end to end on tiny models and volumes: stages, checkpoints, resume, faults, AMP, DDP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import (
    REPO_ROOT,
    SHAPE,
    TINY_MODEL,
    run_train_subprocess,
    tiny_checkpoint,
    tiny_maisi,
    tiny_overrides,
)
from torch._functorch import config as functorch_config
from torch.utils._python_dispatch import TorchDispatchMode

import regions
import train
from checkpoints import CheckpointError, init_vae_weights, load_checkpoint
from config import Config, ConfigError
from losses import VAEGANLoss
from model import build_vae
from model.maisi_vae import convert_maisi_state_dict
from regions import tissue_classes


def test_two_epochs_cross_the_gan_stage(tmp_path, tiny_split, monkeypatch):
    segmented = []  # each validation subject is segmented once, at the first validation, and reused
    monkeypatch.setattr(regions, "_segmentations", OrderedDict())
    monkeypatch.setattr(regions, "tissue_classes", lambda *a: segmented.append(1) or tissue_classes(*a))
    assert train.main(tiny_overrides(tmp_path, tiny_split)) == 0
    assert len(segmented) == 2
    run_dir = tmp_path / "runs" / "tiny"
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["epoch"] == 2 and last["stage"] == "gan" and last["global_step"] == 4
    assert [record["stage"] for record in last["history"]] == ["pretrain", "gan"]
    gan_epoch = last["history"][1]
    assert gan_epoch["train/discriminator"] > 0 and gan_epoch["train/adversarial"] > 0
    assert last["history"][0]["train/discriminator"] == 0
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics["epoch"]) == [0, 1]
    for column in (
        "val/psnr",
        "val/psnr_brain",
        "val/ssim",
        "val/ms_ssim",
        "val/lpips",
        "val/kl",
        "val/scale_factor",
        "val/psnr_gm",
        "val/ssim_wm",
        "val/mae_csf",
    ):
        assert np.isfinite(metrics[column]).all(), column
    assert sorted(p.name for p in (run_dir / "previews").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
    assert any(p.name.startswith("events.out.tfevents") for p in run_dir.iterdir())
    best_dir = tmp_path / "best_runs" / "tiny"
    best = load_checkpoint(best_dir / "best_model.pt")
    assert best["latent_stats"]["scale_factor"] > 0 and len(best["latent_stats"]["channel_std"]) == 2
    assert json.loads((best_dir / "config.json").read_text())["model"]["channels"] == [8, 16]
    assert "val/psnr_brain" in json.loads((best_dir / "metrics.json").read_text())
    # a second start with the same run name must not overwrite it
    with pytest.raises(CheckpointError, match="pass --resume"):
        train.main(tiny_overrides(tmp_path, tiny_split))


def test_resume_continues_in_the_right_stage(tmp_path, tiny_split):
    assert train.main(tiny_overrides(tmp_path, tiny_split, num_epochs=1)) == 0
    assert train.main([*tiny_overrides(tmp_path, tiny_split, num_epochs=3), "--resume"]) == 0
    last = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    assert [record["stage"] for record in last["history"]] == ["pretrain", "gan", "gan"]
    assert [record["epoch"] for record in last["history"]] == [0, 1, 2]


def test_resume_refuses_another_model_config(tmp_path, tiny_split):
    assert train.main(tiny_overrides(tmp_path, tiny_split, num_epochs=1)) == 0
    args = [*tiny_overrides(tmp_path, tiny_split), "--set", "model.latent_channels=3", "--resume"]
    with pytest.raises(ConfigError, match="latent_channels: 2 → 3"):
        train.main(args)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_split, one_thread):
    """Kill -9 mid-run (checkpoint every step), resume, and land on the uninterrupted run's weights. The killed
    run is a process of its own; the uninterrupted and the resumed run run here, on one thread like it."""
    common = {"num_epochs": 3, "checkpoint_every_steps": 1, "perceptual_weight": 0.0}
    victim = run_train_subprocess(tiny_overrides(tmp_path / "b", tiny_split, **common))
    last_path = tmp_path / "b" / "runs" / "tiny" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last_path.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = load_checkpoint(last_path)["global_step"]
    assert 0 < killed_at < 6

    assert train.main([*tiny_overrides(tmp_path / "b", tiny_split, **common), "--resume"]) == 0
    assert train.main(tiny_overrides(tmp_path / "a", tiny_split, **common)) == 0
    expected = load_checkpoint(tmp_path / "a" / "runs" / "tiny" / "checkpoints" / "last.pt")
    actual = load_checkpoint(last_path)
    assert actual["global_step"] == expected["global_step"] == 6
    for name, tensor in expected["vae"].items():
        torch.testing.assert_close(actual["vae"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in expected["discriminator"].items():
        torch.testing.assert_close(actual["discriminator"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_config_errors_are_clear(tmp_path, tiny_split):
    with pytest.raises(ConfigError, match="train.amp: 'fp8' is not allowed"):
        train.main([*tiny_overrides(tmp_path, tiny_split), "--set", "train.amp=fp8"])
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            *tiny_overrides(tmp_path, tiny_split),
            "--set",
            "train.epochs=1",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "unknown key(s) ['epochs'] in section 'train'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bf16_autocast_on_cpu(tmp_path, tiny_split):
    assert train.main(tiny_overrides(tmp_path, tiny_split, num_epochs=1, amp="bf16", gan_start_epoch=0)) == 0
    last = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    assert last["history"][0]["train/skipped_steps"] == 0
    assert np.isfinite(last["history"][0]["val/psnr"])


def test_ddp_two_gloo_processes(tmp_path, tiny_split):
    args = tiny_overrides(tmp_path, tiny_split, num_epochs=2, perceptual_weight=0.0)
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29571",
            str(REPO_ROOT / "train.py"),
            *args,
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert "weights identical on all 2 ranks" in process.stderr
    run_dir = tmp_path / "runs" / "tiny"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.pt"]
    assert len(list(run_dir.glob("events.out.tfevents*"))) == 1
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["world_size"] == 2 and len(last["rng"]) == 2
    assert last["global_step"] == 2  # 4 volumes / (2 ranks × batch 2) = 1 step per epoch


def test_adversarial_weight_fixed_or_adaptive(tmp_path, tiny_split):
    """Fixed: exactly train.adversarial_weight; adaptive (default): scaled by the VQGAN gradient-norm ratio."""
    fixed = tiny_overrides(
        tmp_path,
        tiny_split,
        run_name="fixed",
        num_epochs=1,
        gan_start_epoch=0,
        adaptive_adversarial_weight=False,
    )
    adaptive = tiny_overrides(tmp_path, tiny_split, run_name="adaptive", num_epochs=1, gan_start_epoch=0)
    assert train.main(fixed) == 0 and train.main(adaptive) == 0
    runs = tmp_path / "runs"
    fixed_weight = load_checkpoint(runs / "fixed" / "checkpoints" / "last.pt")["history"][0][
        "train/adversarial_weight"
    ]
    adaptive_weight = load_checkpoint(runs / "adaptive" / "checkpoints" / "last.pt")["history"][0][
        "train/adversarial_weight"
    ]
    assert fixed_weight == pytest.approx(0.1)
    assert np.isfinite(adaptive_weight) and adaptive_weight > 0 and adaptive_weight != pytest.approx(0.1)


@pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile (inductor) needs a C++ compiler"
)
def test_compiled_vae_trains_through_the_adaptive_gan_stage(tmp_path, tiny_split, monkeypatch):
    """train.compile=true from pretraining into the GAN stage, whose adaptive adversarial weight differentiates
    the generator loss twice: the compiled backward must allow it (it failed with "donated buffers" before), and
    the checkpoint holds the bare model's weights. Inductor, with its cache under tmp_path; one batch shape (the
    smaller last batch's recompile is test_compile_keeps_shapes_static_for_a_smaller_last_batch)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))
    monkeypatch.setattr(functorch_config, "donated_buffer", True)  # train.py changes it; restored afterwards
    args = tiny_overrides(tmp_path, tiny_split, num_epochs=2, gan_start_epoch=1, compile=True)
    assert train.main(args) == 0
    last = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    assert [record["stage"] for record in last["history"]] == ["pretrain", "gan"]
    assert last["history"][1]["train/adversarial_weight"] > 0
    assert not any(key.startswith("_orig_mod") for key in last["vae"])


def test_compile_keeps_shapes_static_for_a_smaller_last_batch(monkeypatch):
    """A smaller last batch recompiles the VAE for its own shape instead of switching dynamo to dynamic shapes
    (which inductor failed to lower). A backend that records what it is given stands in for inductor: dynamic
    shapes would reach it as symbolic sizes."""
    graphs: list[list[object]] = []

    def recording_backend(graph_module: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(
            [node.meta.get("example_value") for node in graph_module.graph.find_nodes(op="placeholder")]
        )
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda model, **kw: real_compile(model, **kw, backend=recording_backend)
    )
    config = Config.from_dict({"model": TINY_MODEL, "train": {"compile": True, "compile_mode": "default"}})
    state = train.build_state(config, torch.device("cpu"))
    torch._dynamo.reset()
    try:
        train.wrap_for_training(state, config.train, train.SINGLE_PROCESS)
        for batch_size in (4, 2, 4):  # a last batch of 2, not 1: dynamo specialises size 1 anyway
            recon, _, _ = state.vae_step(torch.rand(batch_size, 1, 16, 16, 16))
            assert recon.shape == (batch_size, 1, 16, 16, 16)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 2  # one graph per batch size, the first reused for the third call
    for values in graphs:
        for value in values:
            assert not isinstance(value, torch.SymInt), "dynamic shapes reached the backend"
            if isinstance(value, torch.Tensor):
                assert all(isinstance(size, int) for size in value.shape), value.shape


# ------------------------------------------------------------------------------------------- train.init_from


def assert_one_adamw_step_from(weights: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    """After one AdamW step (lr 1e-3) every weight is within ~lr of where it started: the run started there."""
    assert weights.keys() == initial.keys()
    for name, tensor in initial.items():
        assert (weights[name] - tensor).abs().max() <= 1.01e-3, name


def test_init_from_a_maisi_state_dict_starts_a_new_run(tmp_path, tiny_split):
    maisi = tiny_maisi()
    torch.save(maisi.state_dict(), tmp_path / "maisi.pt")
    args = tiny_overrides(
        tmp_path,
        tiny_split,
        run_name="from_maisi",
        num_epochs=1,
        max_steps_per_epoch=1,
        init_from=str(tmp_path / "maisi.pt"),
    )
    assert train.main(args) == 0
    run_dir = tmp_path / "runs" / "from_maisi"
    log_text = (run_dir / "train.log").read_text()
    assert f"initialised the VAE from {tmp_path / 'maisi.pt'} (MAISI state dict)" in log_text
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["global_step"] == 1 and last["config"]["train"]["init_from"] == str(tmp_path / "maisi.pt")
    # fresh MaisiVAE weights are far from MONAI's (e.g. GroupNorm affines 1 / 0 here, randomised there)
    assert_one_adamw_step_from(last["vae"], convert_maisi_state_dict(maisi.state_dict()))


def test_init_from_a_project_checkpoint_keeps_only_its_weights(tmp_path, tiny_split):
    # 2 steps from another seed than the new run's, so that the new run's own initial weights are far from these
    assert train.main(tiny_overrides(tmp_path, tiny_split, num_epochs=1, seed=3)) == 0
    best = tmp_path / "best_runs" / "tiny" / "best_model.pt"
    model = Config.from_dict({"model": TINY_MODEL}).model
    for path in (best, tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"):
        vae = build_vae(model)  # before any step, the new VAE holds exactly the checkpoint's weights
        assert init_vae_weights(vae, path, model) == "brain-vae3d checkpoint"
        for name, tensor in load_checkpoint(path)["vae"].items():
            assert torch.equal(vae.state_dict()[name], tensor), name

    args = tiny_overrides(
        tmp_path, tiny_split, run_name="finetuned", num_epochs=1, max_steps_per_epoch=1, init_from=str(best)
    )
    assert train.main(args) == 0
    run_dir = tmp_path / "runs" / "finetuned"
    assert f"initialised the VAE from {best} (brain-vae3d checkpoint)" in (run_dir / "train.log").read_text()
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["global_step"] == 1 and [record["epoch"] for record in last["history"]] == [0]
    # fresh optimisers: one step of state each (the source run's had 2), the discriminator not yet trained
    assert {int(state["step"]) for state in last["optimizer_g"]["state"].values()} == {1}
    assert last["optimizer_d"]["state"] == {}
    assert_one_adamw_step_from(last["vae"], load_checkpoint(best)["vae"])


def test_init_from_errors_are_clear(tmp_path, tiny_split):
    """Each refusal is one message naming the file and what is wrong (train.py prints it as one line, as
    test_config_errors_are_clear shows for the CLI), raised before any set-up."""
    missing = tiny_overrides(tmp_path, tiny_split, run_name="missing", init_from=str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError) as refusal:
        train.main(missing)
    assert (
        str(refusal.value) == f"train.init_from: no checkpoint or MAISI state dict at {tmp_path / 'nope.pt'}"
    )
    assert not (tmp_path / "runs" / "missing").exists()  # refused before any set-up

    torch.save(tiny_maisi(channels=(8, 32)).state_dict(), tmp_path / "wide.pt")  # the run has (8, 16)
    wide = tiny_overrides(tmp_path, tiny_split, run_name="wide", init_from=str(tmp_path / "wide.pt"))
    with pytest.raises(CheckpointError) as refusal:
        train.main(wide)
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith(f"train.init_from {tmp_path / 'wide.pt'} (converted from the MAISI layout)")
    assert "shape mismatches [" in message and "decoder.conv_in.weight: (32, 2, 3, 3, 3)" in message

    ours = tiny_checkpoint(tmp_path / "best_model.pt")  # latent_channels 2
    args = [*tiny_overrides(tmp_path, tiny_split, init_from=str(ours)), "--set", "model.latent_channels=3"]
    with pytest.raises(ConfigError, match=r"train\.init_from .*best_model\.pt .*latent_channels: 2 → 3"):
        train.main(args)


def test_resume_does_not_apply_init_from(tmp_path, tiny_split):
    source = tiny_checkpoint(tmp_path / "source.pt")
    assert train.main(tiny_overrides(tmp_path, tiny_split, num_epochs=1, init_from=str(source))) == 0
    source.unlink()  # re-initialising (or even checking the file) would now fail
    args = [*tiny_overrides(tmp_path, tiny_split, num_epochs=2, init_from=str(source)), "--resume"]
    assert train.main(args) == 0
    run_dir = tmp_path / "runs" / "tiny"
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["global_step"] == 4 and [record["epoch"] for record in last["history"]] == [0, 1]
    log_text = (run_dir / "train.log").read_text()
    assert log_text.count("initialised the VAE from") == 1
    assert f"train.init_from {source} not applied: --resume continues" in log_text


# ------------------------------------------------------------------------------- train_step on its own


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for a tensor's value (``.item()``, ``bool(t)``, ``float(t)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def tiny_state(**train_values) -> tuple[train.TrainState, VAEGANLoss, Config]:
    """A tiny model's TrainState and loss on the CPU (no perceptual network)."""
    config = Config.from_dict(
        {
            "model": TINY_MODEL,
            "discriminator": {"channels": 8, "num_layers": 2},
            "train": {"perceptual_weight": 0.0, "learning_rate": 1e-3, **train_values},
        }
    )
    torch.manual_seed(0)
    state = train.build_state(config, torch.device("cpu"))
    return state, VAEGANLoss.from_config(config, None), config


def weights_and_optimiser_state(state: train.TrainState) -> list[torch.Tensor]:
    tensors = [*state.vae.state_dict().values(), *state.discriminator.state_dict().values()]
    for optimizer in (state.optimizer_g, state.optimizer_d):
        tensors += [v for s in optimizer.state.values() for v in s.values()]
    return [t.detach().clone() for t in tensors]


def test_train_step_waits_for_no_value_and_a_nonfinite_step_changes_nothing():
    state, loss, config = tiny_state()
    images = torch.rand(2, 1, *SHAPE)
    with HostSyncCounter() as counter:
        assert float(images.sum()) > 0  # the counter sees a host sync: it can fail
    assert counter.count == 1
    train.train_step(state, loss, images, True, config.train, None)  # creates the optimiser states
    before = weights_and_optimiser_state(state)
    with HostSyncCounter() as counter:
        logs = train.train_step(state, loss, images * float("nan"), True, config.train, None)
    assert counter.count == 0
    after = weights_and_optimiser_state(state)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert logs["skipped"].item() == 1 and state.global_step == 2
    assert state.guard.read() == (1, 1, 1)  # skipped VAE steps, longest streak, skipped discriminator steps
    with HostSyncCounter() as counter:
        logs = train.train_step(state, loss, images, True, config.train, None)
    assert counter.count == 0 and logs["skipped"].item() == 0
    changed = weights_and_optimiser_state(state)
    assert not torch.equal(changed[0], after[0])
    assert state.guard.read() == (0, 0, 0)


def test_train_step_with_fp16_scaler_skips_inf_gradients():
    """GradScaler path (fp16 needs CUDA; enabled scalers work on CPU too): the scaler's own inf check skips."""
    state, loss, config = tiny_state()
    state.scaler_g = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**8)
    state.scaler_d = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**8)
    images = torch.rand(2, 1, *SHAPE)
    train.train_step(state, loss, images, True, config.train, None)
    before = weights_and_optimiser_state(state)
    logs = train.train_step(state, loss, images * float("inf"), True, config.train, None)
    assert logs["skipped"].item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, weights_and_optimiser_state(state), strict=True))
    assert state.scaler_g.get_scale() == 2.0**7  # backed off after the inf step


def test_learning_rate_schedule():
    flat = Config.from_dict({"train": {"learning_rate": 1e-3, "warmup_steps": 10}}).train
    assert train.learning_rate(flat, 0, 100, 0.0) == pytest.approx(1e-4)
    assert train.learning_rate(flat, 9, 100, 0.0) == pytest.approx(1e-3)
    assert train.learning_rate(flat, 99, 100, 0.0) == pytest.approx(1e-3)
    cosine = Config.from_dict(
        {
            "train": {
                "learning_rate": 1e-3,
                "lr_schedule": "cosine",
                "warmup_steps": 10,
                "min_lr_fraction": 0.1,
            }
        }
    ).train
    assert train.learning_rate(cosine, 10, 110, 0.0) == pytest.approx(1e-3)
    assert train.learning_rate(cosine, 60, 110, 0.0) == pytest.approx(0.55e-3)
    assert train.learning_rate(cosine, 110, 110, 0.0) == pytest.approx(1e-4)
    timed = Config.from_dict(
        {
            "train": {
                "learning_rate": 1e-3,
                "lr_schedule": "cosine",
                "time_budget_s": 100.0,
                "min_lr_fraction": 0,
            }
        }
    ).train
    assert train.learning_rate(timed, 1, 10_000, 50.0) == pytest.approx(0.5e-3)  # half the budget spent


def test_ema_tracks_the_weights_and_is_what_validation_and_the_best_model_use(tmp_path, tiny_split):
    state, loss, config = tiny_state(ema_decay=0.9)
    assert state.eval_vae is state.vae_ema and not any(p.requires_grad for p in state.vae_ema.parameters())
    start = [p.detach().clone() for p in state.vae.parameters()]
    train.train_step(state, loss, torch.rand(2, 1, *SHAPE), False, config.train, None)
    d = min(0.9, 1 / 10)  # warm-up decay at step 0
    for ema, live, old in zip(state.vae_ema.parameters(), state.vae.parameters(), start, strict=True):
        torch.testing.assert_close(ema, old + (1 - d) * (live - old))
    # end to end: last.pt holds the EMA, best_model.pt holds the EMA's weights, resume restores it
    assert train.main(tiny_overrides(tmp_path, tiny_split, num_epochs=1, ema_decay=0.99)) == 0
    last = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp_path / "best_runs" / "tiny" / "best_model.pt")
    assert all(torch.equal(best["vae"][k], last["vae_ema"][k]) for k in last["vae_ema"])
    assert not all(torch.equal(last["vae"][k], last["vae_ema"][k]) for k in last["vae"])
    assert train.main([*tiny_overrides(tmp_path, tiny_split, num_epochs=2, ema_decay=0.99), "--resume"]) == 0


def test_time_budget_stops_validates_and_reports(tmp_path, tiny_split, capsys):
    args = tiny_overrides(tmp_path, tiny_split, num_epochs=1000, time_budget_s=0.01, val_every=50)
    assert train.main(args) == 0
    metrics = pd.read_csv(tmp_path / "runs" / "tiny" / "metrics.csv")
    assert len(metrics) == 1 and bool(metrics["stopped_by_time_budget"].iloc[0])
    assert np.isfinite(metrics["val/psnr_brain"].iloc[0]) and metrics["time/elapsed_s"].iloc[0] > 0
    assert metrics["global_step"].iloc[0] == 1  # stopped after the first step
    out = capsys.readouterr().out
    assert "training finished: 1 epoch(s), 1 steps" in out and "best val/psnr_brain" in out
    assert str(tmp_path / "best_runs" / "tiny" / "best_model.pt") in out
    assert str(tmp_path / "runs" / "tiny" / "metrics.csv") in out and "tensorboard --logdir" in out


def test_cpu_cost_is_announced_before_the_first_step(tmp_path, tiny_split, monkeypatch):
    monkeypatch.setattr(train, "estimate_cpu_step_seconds", lambda *args: 60.0)
    assert train.main(tiny_overrides(tmp_path, tiny_split, num_epochs=2)) == 0
    log = (tmp_path / "runs" / "tiny" / "train.log").read_text()
    announce = log.index("CPU training: about 60.0 s per pretraining step")
    assert "4 steps left" in log[announce:] and "configs/cpu.json" in log[announce:].splitlines()[0]
    assert announce < log.index("epoch 0 done")


def test_cpu_cost_under_a_time_budget_says_what_the_budget_allows(tmp_path, tiny_split, monkeypatch):
    monkeypatch.setattr(train, "estimate_cpu_step_seconds", lambda *args: 0.5)
    assert train.main(tiny_overrides(tmp_path, tiny_split, num_epochs=1000, time_budget_s=2)) == 0
    log = (tmp_path / "runs" / "tiny" / "train.log").read_text()
    assert "2000 steps left, of which train.time_budget_s=2 allows about 4\n" in log


def test_cpu_step_estimate_leaves_weights_and_random_streams_alone():
    state, loss, config = tiny_state()
    run = train.Run(config, train.SINGLE_PROCESS, None, Path("unused"))
    before = weights_and_optimiser_state(state)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert train.estimate_cpu_step_seconds(state, loss, run) > 0
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(before, weights_and_optimiser_state(state), strict=True))
    assert all(p.grad is None for p in state.vae.parameters())


def test_recompute_setting():
    on, _, config = tiny_state(recompute="auto")
    assert train.choose_recompute(config.train, on.vae, SHAPE, torch.device("cpu"))  # auto: on for CPU
    assert not train.choose_recompute(
        Config.from_dict({"train": {"recompute": "off"}}).train, on.vae, SHAPE, None
    )
    small = train.estimate_training_bytes(on.vae, (16, 16, 16), 1, torch.device("cpu"))
    large = train.estimate_training_bytes(on.vae, (32, 32, 32), 2, torch.device("cpu"))
    assert small > 0 and 8 * small < large < 32 * small  # linear in voxels × batch (16×), up to padding


def test_device_cache_path_trains_like_the_dataloader_path(tmp_path, tiny_split):
    """data.device_cache=on (here on the CPU): volumes cached on the device, augmented there in batch; the same
    shuffle and augmentation draws as the DataLoader path, so the runs agree up to the float16 cache rounding
    and float32 interpolation differences."""
    losses = {}
    for mode in ("off", "on"):
        args = tiny_overrides(tmp_path / mode, tiny_split, num_epochs=2, gan_start_epoch=1)
        args += ["--set", "augmentation.enabled=true", "--set", f"data.device_cache={json.dumps(mode)}"]
        assert train.main(args) == 0
        log = (tmp_path / mode / "runs" / "tiny" / "train.log").read_text()
        assert ("device cache:" in log) == (mode == "on")
        losses[mode] = pd.read_csv(tmp_path / mode / "runs" / "tiny" / "metrics.csv")
    for column in ("train/recon", "val/psnr"):
        np.testing.assert_allclose(losses["on"][column], losses["off"][column], rtol=2e-2)
