"""train.py end to end on tiny models and volumes: stages, checkpoints, resume, faults, AMP, DDP."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict

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
    tiny_config,
    tiny_maisi,
    tiny_overrides,
)
from torch._functorch import config as functorch_config
from torch.utils._python_dispatch import TorchDispatchMode

import device_data
import metrics
import regions
import train
from checkpoints import (
    CheckpointError,
    init_vae_weights,
    load_checkpoint,
    resume,
    save_checkpoint,
    training_checkpoint,
)
from config import Config, ConfigError, load_config
from device_data import (
    choose_recompute,
    epoch_batches,
    estimate_cpu_step_seconds,
    estimate_training_bytes,
    make_loaders,
)
from losses import VAEGANLoss
from model import build_vae
from model.maisi_vae import convert_maisi_state_dict
from regions import tissue_classes
from utils import DistributedContext


def test_two_epochs_cross_the_gan_stage(tmp_path, tiny_split, monkeypatch):
    segmented = []  # each validation subject is segmented once, at the first validation, and reused
    monkeypatch.setattr(regions, "_segmentations", OrderedDict())
    monkeypatch.setattr(regions, "tissue_classes", lambda *a: segmented.append(1) or tissue_classes(*a))
    train.fit(tiny_config(tmp_path, tiny_split))
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
        train.main(tiny_overrides(tmp_path, tiny_split))  # the CLI refuses it too


def test_resume_continues_in_the_right_stage(tmp_path, tiny_split):
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1))
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=3), resume="auto")
    last = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    assert [record["stage"] for record in last["history"]] == ["pretrain", "gan", "gan"]
    assert [record["epoch"] for record in last["history"]] == [0, 1, 2]


def test_resume_refuses_another_model_config(tmp_path, tiny_split):
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1))
    config = tiny_config(tmp_path, tiny_split, extra=("model.latent_channels=3",))
    with pytest.raises(ConfigError, match="latent_channels: 2 → 3"):
        train.fit(config, resume="auto")


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

    train.fit(tiny_config(tmp_path / "b", tiny_split, **common), resume="auto")
    train.fit(tiny_config(tmp_path / "a", tiny_split, **common))
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
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1, amp="bf16", gan_start_epoch=0))
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
    console = process.stderr.splitlines()  # both ranks write to it; only rank 0 logs below WARNING
    for line in ("VAE weights identical on all 2 ranks", "discriminator weights identical on all 2 ranks"):
        assert sum(text.endswith(line) for text in console) == 1, process.stderr[-3000:]
    assert sum("run tiny on cpu (world size 2)" in text for text in console) == 1, process.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.pt"]
    assert len(list(run_dir.glob("events.out.tfevents*"))) == 1
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["world_size"] == 2 and len(last["rng"]) == 2
    assert last["global_step"] == 2  # 4 volumes / (2 ranks × batch 2) = 1 step per epoch


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_logs_below_warning(tmp_path, tiny_split, capsys, rank):
    """Under torchrun every rank shares the console: rank 1 (faked here) says nothing below WARNING and marks
    what it does say; rank 0 logs everything, to the console and to train.log."""
    config = tiny_config(tmp_path, tiny_split)
    context = DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
    train.open_run(config, context, None)
    train.log.info("progress for the user")
    train.log.warning("something to look at")
    console = capsys.readouterr().err.splitlines()
    if rank == 0:
        assert [line.split(" ", 2)[2] for line in console[-2:]] == [
            "progress for the user",
            "something to look at",
        ]
        assert "progress for the user" in (tmp_path / "runs" / "tiny" / "train.log").read_text()
    else:
        assert len(console) == 1 and console[0].endswith("[rank 1] something to look at"), console


def test_adversarial_weight_fixed_or_adaptive(tmp_path, tiny_split):
    """Fixed: exactly train.adversarial_weight; adaptive (default): scaled by the VQGAN gradient-norm ratio."""
    fixed = tiny_config(
        tmp_path,
        tiny_split,
        run_name="fixed",
        num_epochs=1,
        gan_start_epoch=0,
        adaptive_adversarial_weight=False,
    )
    adaptive = tiny_config(tmp_path, tiny_split, run_name="adaptive", num_epochs=1, gan_start_epoch=0)
    train.fit(fixed)
    train.fit(adaptive)
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
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=2, gan_start_epoch=1, compile=True))
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
    config = tiny_config(
        tmp_path,
        tiny_split,
        run_name="from_maisi",
        num_epochs=1,
        max_steps_per_epoch=1,
        init_from=str(tmp_path / "maisi.pt"),
    )
    train.fit(config)
    run_dir = tmp_path / "runs" / "from_maisi"
    log_text = (run_dir / "train.log").read_text()
    assert f"initialised the VAE from {tmp_path / 'maisi.pt'} (MAISI state dict)" in log_text
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["global_step"] == 1 and last["config"]["train"]["init_from"] == str(tmp_path / "maisi.pt")
    # fresh MaisiVAE weights are far from MONAI's (e.g. GroupNorm affines 1 / 0 here, randomised there)
    assert_one_adamw_step_from(last["vae"], convert_maisi_state_dict(maisi.state_dict()))


def test_init_from_a_project_checkpoint_keeps_only_its_weights(tmp_path, tiny_split):
    # 2 steps from another seed than the new run's, so that the new run's own initial weights are far from these
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1, seed=3))
    best = tmp_path / "best_runs" / "tiny" / "best_model.pt"
    model = Config.from_dict({"model": TINY_MODEL}).model
    for path in (best, tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"):
        vae = build_vae(model)  # before any step, the new VAE holds exactly the checkpoint's weights
        assert init_vae_weights(vae, path, model) == "brain-vae3d checkpoint"
        for name, tensor in load_checkpoint(path)["vae"].items():
            assert torch.equal(vae.state_dict()[name], tensor), name

    train.fit(
        tiny_config(
            tmp_path,
            tiny_split,
            run_name="finetuned",
            num_epochs=1,
            max_steps_per_epoch=1,
            init_from=str(best),
        )
    )
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
    missing = tiny_config(tmp_path, tiny_split, run_name="missing", init_from=str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError) as refusal:
        train.fit(missing)
    assert (
        str(refusal.value) == f"train.init_from: no checkpoint or MAISI state dict at {tmp_path / 'nope.pt'}"
    )
    assert not (tmp_path / "runs" / "missing").exists()  # refused before any set-up

    torch.save(tiny_maisi(channels=(8, 32)).state_dict(), tmp_path / "wide.pt")  # the run has (8, 16)
    wide = tiny_config(tmp_path, tiny_split, run_name="wide", init_from=str(tmp_path / "wide.pt"))
    with pytest.raises(CheckpointError) as refusal:
        train.fit(wide)
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith(f"train.init_from {tmp_path / 'wide.pt'} (converted from the MAISI layout)")
    assert "shape mismatches [" in message and "decoder.conv_in.weight: (32, 2, 3, 3, 3)" in message

    ours = tiny_checkpoint(tmp_path / "best_model.pt")  # latent_channels 2
    config = tiny_config(tmp_path, tiny_split, init_from=str(ours), extra=("model.latent_channels=3",))
    with pytest.raises(ConfigError, match=r"train\.init_from .*best_model\.pt .*latent_channels: 2 → 3"):
        train.fit(config)
    # every refusal before any set-up: no run folder whose train.log would lack the error (FAULTS.md row 22)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "best_runs").exists()


def test_resume_does_not_apply_init_from(tmp_path, tiny_split):
    source = tiny_checkpoint(tmp_path / "source.pt")
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1, init_from=str(source)))
    source.unlink()  # re-initialising (or even checking the file) would now fail
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=2, init_from=str(source)), resume="auto")
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


def test_train_state_saves_and_restores_every_field(tmp_path):
    """``TrainState.state_dict()`` is last.pt's field list: the on-disk keys stay those of format brain-vae3d/1
    (a last.pt from before the state saved itself resumes), and ``resume`` restores each into a fresh state."""
    state, loss, config = tiny_state(ema_decay=0.9)
    train.train_step(state, loss, torch.rand(2, 1, *SHAPE), True, config.train, None)
    state.epoch, state.step_in_epoch, state.best_value, state.skipped_steps = 1, 3, 30.5, 2
    state.history.append({"epoch": 0, "val/psnr": 30.5})
    payload = training_checkpoint(state, config, train.SINGLE_PROCESS, "gan", None)
    assert set(payload) == {
        *("format", "config", "vae", "discriminator", "optimizer_g", "optimizer_d", "scaler_g", "scaler_d"),
        *("epoch", "step_in_epoch", "global_step", "stage", "rng", "world_size", "history", "best_value"),
        *("skipped_steps", "latent_stats", "vae_ema"),
    }
    save_checkpoint(payload, tmp_path / "last.pt")
    fresh, _, _ = tiny_state(ema_decay=0.9)
    assert resume(fresh, tmp_path / "last.pt", config, train.SINGLE_PROCESS)
    restored, trained = weights_and_optimiser_state(fresh), weights_and_optimiser_state(state)
    assert all(torch.equal(a, b) for a, b in zip(restored, trained, strict=True))
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.vae_ema.parameters(), state.vae_ema.parameters(), strict=True)
    )
    assert (fresh.epoch, fresh.step_in_epoch, fresh.global_step) == (1, 3, 1)
    assert (fresh.best_value, fresh.skipped_steps, fresh.history) == (30.5, 2, state.history)
    # without an EMA there is no vae_ema key; a run that switches the EMA on at resume starts it from the VAE
    no_ema, _, plain = tiny_state(ema_decay=None)
    assert "vae_ema" not in no_ema.state_dict()
    save_checkpoint(
        training_checkpoint(no_ema, plain, train.SINGLE_PROCESS, "pretrain", None), tmp_path / "a.pt"
    )
    assert resume(fresh, tmp_path / "a.pt", config, train.SINGLE_PROCESS)
    assert all(
        torch.equal(a, b) for a, b in zip(fresh.vae_ema.parameters(), no_ema.vae.parameters(), strict=True)
    )


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
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1, ema_decay=0.99))
    last = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp_path / "best_runs" / "tiny" / "best_model.pt")
    assert all(torch.equal(best["vae"][k], last["vae_ema"][k]) for k in last["vae_ema"])
    assert not all(torch.equal(last["vae"][k], last["vae_ema"][k]) for k in last["vae"])
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=2, ema_decay=0.99), resume="auto")


def test_ema_is_on_by_default_and_null_switches_it_off(tmp_path, tiny_split):
    """The default recipe (and the CPU preset) validates and saves the EMA; ``train.ema_decay=null`` trains
    without one: no ``vae_ema`` in last.pt and best_model.pt holds the live weights."""
    for path in (REPO_ROOT / "config.json", REPO_ROOT / "configs" / "cpu.json"):
        assert load_config(path).train.ema_decay == 0.999
    assert tiny_state()[0].vae_ema is not None
    state, _, _ = tiny_state(ema_decay=None)
    assert state.vae_ema is None and state.eval_vae is state.vae
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1, ema_decay=None))
    last = load_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt")
    best = load_checkpoint(tmp_path / "best_runs" / "tiny" / "best_model.pt")
    assert "vae_ema" not in last and last["config"]["train"]["ema_decay"] is None
    assert all(torch.equal(best["vae"][k], last["vae"][k]) for k in last["vae"])


def test_time_budget_stops_validates_and_reports(tmp_path, tiny_split, capsys):
    args = tiny_overrides(tmp_path, tiny_split, num_epochs=1000, time_budget_s=0.01, val_every=50)
    assert train.main(args) == 0  # the CLI prints fit's summary
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
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=2))
    log = (tmp_path / "runs" / "tiny" / "train.log").read_text()
    announce = log.index("CPU training: about 60.0 s per pretraining step")
    assert "4 steps left" in log[announce:] and "configs/cpu.json" in log[announce:].splitlines()[0]
    assert announce < log.index("epoch 0 done")


def test_cpu_cost_under_a_time_budget_says_what_the_budget_allows(tmp_path, tiny_split, monkeypatch):
    monkeypatch.setattr(train, "estimate_cpu_step_seconds", lambda *args: 0.5)
    train.fit(tiny_config(tmp_path, tiny_split, num_epochs=1000, time_budget_s=2))
    log = (tmp_path / "runs" / "tiny" / "train.log").read_text()
    assert "2000 steps left, of which train.time_budget_s=2 allows about 4\n" in log


def test_cpu_step_estimate_leaves_weights_and_random_streams_alone():
    state, loss, config = tiny_state()
    before = weights_and_optimiser_state(state)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    assert estimate_cpu_step_seconds(state.vae, loss, 2, SHAPE, None) > 0
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(before, weights_and_optimiser_state(state), strict=True))
    assert all(p.grad is None for p in state.vae.parameters())


def test_cpu_step_estimate_times_a_full_size_step_after_a_warm_up(monkeypatch):
    """The first pass pays one-off costs (it took 41 s of a 6 s epoch in issue 17): the estimate is the second
    pass, at the full volume size (a half-size pass scaled by the voxel count overestimated 4x)."""
    state, loss, config = tiny_state()
    clock, seen = [0.0], []

    def tick(module, args):  # a fake clock: the warm-up pass "takes" 10 s, the next one 1 s
        seen.append(tuple(args[0].shape))
        clock[0] += 10.0 if len(seen) == 1 else 1.0

    state.vae.register_forward_pre_hook(tick)
    monkeypatch.setattr(device_data.time, "perf_counter", lambda: clock[0])
    assert estimate_cpu_step_seconds(state.vae, loss, config.train.batch_size, (16, 20, 16), None) == 1.0
    assert seen == [(config.train.batch_size, 1, 16, 20, 16)] * 2


def test_resuming_a_finished_run_says_so_and_how_to_extend_it(tmp_path, tiny_split):
    args = tiny_overrides(tmp_path, tiny_split, num_epochs=1, max_steps_per_epoch=1)
    assert train.main(args) == 0
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"
    before = last.read_bytes()
    assert train.main([*args, "--resume"]) == 0  # the CLI's --resume without a value: the run's last.pt
    log = (tmp_path / "runs" / "tiny" / "train.log").read_text()
    assert "run tiny is finished: all 1 epochs are done" in log and "--set train.num_epochs=2" in log
    assert last.read_bytes() == before and log.count("epoch 0 done") == 1


def test_validation_shows_a_progress_bar_on_rank_0_only(monkeypatch):
    """Validation (28 s at 2 mm on a CPU) gets a tqdm bar over its batches: rank 0 only, and only on a terminal
    (``disable=None``), so non-interactive logs get no progress lines."""
    state, _, config = tiny_state(val_batch_size=2)
    volumes = device_data.DeviceVolumeCache(
        torch.rand(3, 1, *SHAPE), torch.ones(3, 1, *SHAPE, dtype=torch.uint8)
    )
    bars = []

    def recording_tqdm(iterable, **kwargs):
        bars.append(kwargs)
        return iterable

    monkeypatch.setattr(metrics, "tqdm", recording_tqdm)
    metrics.validate(state.eval_vae, volumes, None, config, train.SINGLE_PROCESS, None)
    assert [(bar["desc"], bar["disable"]) for bar in bars] == [("validation", None)]
    other_rank = dataclasses.replace(train.SINGLE_PROCESS, rank=1)  # world size 1: no collective is called
    metrics.validate(state.eval_vae, volumes, None, config, other_rank, None)
    assert bars[-1]["disable"] is True


def test_recompute_setting():
    on, _, config = tiny_state(recompute="auto")
    assert choose_recompute(config.train, on.vae, SHAPE, torch.device("cpu"))  # auto: on for CPU
    assert not choose_recompute(Config.from_dict({"train": {"recompute": "off"}}).train, on.vae, SHAPE, None)
    small = estimate_training_bytes(on.vae, (16, 16, 16), 1, torch.device("cpu"))
    large = estimate_training_bytes(on.vae, (32, 32, 32), 2, torch.device("cpu"))
    assert small > 0 and 8 * small < large < 32 * small  # linear in voxels × batch (16×), up to padding


def test_device_cache_path_trains_like_the_dataloader_path(tmp_path, tiny_split):
    """data.device_cache=on (here on the CPU): volumes cached on the device, augmented there in batch; the same
    shuffle and augmentation draws as the DataLoader path, so the runs agree up to the float16 cache rounding
    and float32 interpolation differences."""
    losses = {}
    for mode in ("off", "on"):
        extra = ("augmentation.enabled=true", f"data.device_cache={json.dumps(mode)}")
        train.fit(tiny_config(tmp_path / mode, tiny_split, num_epochs=2, gan_start_epoch=1, extra=extra))
        log = (tmp_path / mode / "runs" / "tiny" / "train.log").read_text()
        assert ("device cache:" in log) == (mode == "on")
        losses[mode] = pd.read_csv(tmp_path / mode / "runs" / "tiny" / "metrics.csv")
    for column in ("train/recon", "val/psnr"):
        np.testing.assert_allclose(losses["on"][column], losses["off"][column], rtol=2e-2)


@pytest.mark.parametrize("device_cache", ["off", "on"])
def test_a_resumed_epoch_replays_its_augmented_batches(tiny_split, device_cache):
    """Resuming mid-epoch (fresh loaders, as a new process builds them) gives the batches the uninterrupted
    run got, augmentation included: the shuffle and every draw are functions of (seed, epoch, index)."""
    config = Config.from_dict(
        {
            "data": {
                "train_csv": str(tiny_split[0]),
                "val_csv": str(tiny_split[1]),
                "demo_dir": None,
                "num_workers": 0,
                "device_cache": device_cache,
            },
            "preprocessing": {"target_shape": list(SHAPE)},
            "augmentation": {"enabled": True, "noise_prob": 1.0, "flip_left_right_prob": 0.5},
            "train": {"batch_size": 1, "seed": 7},
        }
    )
    cpu = torch.device("cpu")
    loader, _, generator = make_loaders(config, train.SINGLE_PROCESS)
    whole = [
        list(epoch_batches(loader, generator, config.train, cpu, epoch, 0, len(loader))) for epoch in (0, 1)
    ]
    loader, _, generator = make_loaders(config, train.SINGLE_PROCESS)
    resumed = list(epoch_batches(loader, generator, config.train, cpu, 1, 2, len(loader)))
    assert len(resumed) == len(whole[1]) - 2 == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[1][2:], strict=True))
    assert not any(torch.equal(a, b) for a in whole[0] for b in whole[1])  # a new draw every epoch
