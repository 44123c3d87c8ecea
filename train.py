"""Train the 3D KL-VAE: pretrain (reconstruction + β·KL + perceptual), then GAN (+ adversarial term).

    python train.py --config_file config.json [--set train.num_epochs=2 ...] [--resume [PATH]]
    torchrun --nproc_per_node 2 train.py --config_file config.json          # DDP (NCCL on GPU, gloo on CPU)

Only rank 0 writes logs and checkpoints. The hot loop does not wait for the device: losses, skipped-step
flags and the non-finite guard live on the device and are read every ``train.log_every_steps`` steps (and at
the end of an epoch). A step whose loss or gradient is not finite changes no weight (the fused AdamW skips it
on the device).
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config_file", default="config.json", help="JSON config (see config.py)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.num_epochs=2 (repeatable; VALUE is JSON)",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue a run: without a value, from runs/<run_name>/checkpoints/last.pt",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="inputs of mixed grids or not skull-stripped are errors (= --set data.strict_input_checks=true)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before torch and MONAI load (seconds)

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch._functorch import config as functorch_config
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import dataset
from checkpoints import (
    CheckpointError,
    atomic_write,
    check_init_from,
    init_vae_weights,
    save_best_model,
    save_checkpoint,
    save_json,
    training_checkpoint,
)
from checkpoints import resume as restore_checkpoint
from config import Config, ConfigError, TrainConfig, load_config
from device_data import (
    DeviceVolumeCache,
    choose_recompute,
    cpu_cost_message,
    epoch_batches,
    estimate_cpu_step_seconds,
    make_loaders,
    steps_per_epoch,
)
from losses import VAEGANLoss
from metrics import validate
from model import MaisiVAE, PatchDiscriminator3D, build_discriminator, build_perceptual_loss, build_vae
from model.recompute import recompute
from plotting import orthogonal_slices_figure
from utils import (
    DeviceOutOfMemoryError,
    DistributedContext,
    NonFiniteGuard,
    NonFiniteTrainingError,
    autocast,
    cleanup_distributed,
    explain_out_of_memory,
    peak_memory_gb,
    resolve_amp_dtype,
    seed_everything,
    setup_distributed,
    setup_logging,
    verify_identical_weights,
)

log = logging.getLogger("train")

SINGLE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LOG_NAMES = ("loss", "recon", "kl", "perceptual", "adversarial", "adversarial_weight", "discriminator")
FATAL_ERRORS = (
    ConfigError,
    CheckpointError,
    dataset.DataError,
    NonFiniteTrainingError,
    DeviceOutOfMemoryError,
)
RUNTIME_ONLY = {"checkpoint": False}  # field metadata: a TrainState field that checkpoints do not hold


@dataclass
class TrainState:
    """Everything a training checkpoint holds, plus the modules the step calls.

    ``vae`` / ``discriminator`` are the bare modules (what checkpoints hold); ``vae_step`` /
    ``discriminator_step`` are what the step calls: the same modules, or their torch.compile / DDP wrappers.
    ``vae_ema`` is the moving average of the VAE weights (``train.ema_decay``), or None.
    ``epoch`` / ``step_in_epoch`` point at the next batch to train on; ``global_step`` counts batches.
    The fields are the checkpoint's list (:meth:`state_dict`), except those marked :data:`RUNTIME_ONLY`.
    """

    vae: MaisiVAE
    discriminator: PatchDiscriminator3D
    optimizer_g: torch.optim.Optimizer
    optimizer_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    vae_ema: MaisiVAE | None = None
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    skipped_steps: int = 0
    vae_step: nn.Module | None = field(default=None, metadata=RUNTIME_ONLY)
    discriminator_step: nn.Module | None = field(default=None, metadata=RUNTIME_ONLY)
    guard: NonFiniteGuard | None = field(default=None, metadata=RUNTIME_ONLY)

    def __post_init__(self) -> None:
        self.vae_step = self.vae_step or self.vae
        self.discriminator_step = self.discriminator_step or self.discriminator
        self.guard = self.guard or NonFiniteGuard(next(self.vae.parameters()).device)

    @property
    def eval_vae(self) -> MaisiVAE:
        """The weights that are validated and saved as the best model: the EMA when there is one."""
        return self.vae if self.vae_ema is None else self.vae_ema

    def _saved_fields(self) -> list[str]:
        return [f.name for f in fields(self) if f.metadata.get("checkpoint", True)]

    def state_dict(self) -> dict[str, Any]:
        """Every saved field by name: modules, optimisers and scalers as their ``state_dict()``, counters and
        history as they are; no ``vae_ema`` key without an EMA."""
        saved = {}
        for name in self._saved_fields():
            value = getattr(self, name)
            if hasattr(value, "state_dict"):
                saved[name] = value.state_dict()
            elif name != "vae_ema":
                saved[name] = value
        return saved

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore every saved field from ``saved`` (a :meth:`state_dict`); an EMA switched on at resume starts
        from the saved VAE weights."""
        for name in self._saved_fields():
            value = getattr(self, name)
            if name == "vae_ema":
                if value is not None:
                    value.load_state_dict(saved.get("vae_ema", saved["vae"]))
            elif hasattr(value, "load_state_dict"):
                value.load_state_dict(saved[name])
            else:
                setattr(self, name, saved[name])


@dataclass
class Run:
    """Where and how this process trains: config, ranks, precision, output folders, TensorBoard, clock."""

    config: Config
    context: DistributedContext
    amp_dtype: torch.dtype | None
    run_dir: Path  # runs_dir/run_name: config.json, train.log, metrics.csv, previews/, TensorBoard events
    last_path: Path  # run_dir/checkpoints/last.pt
    best_dir: Path  # best_runs_dir/run_name: best_model.pt, config.json, metrics.json
    resume_path: Path | None = None
    writer: Any = None
    start_time: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Wall-clock seconds since this process started the run."""
        return time.perf_counter() - self.start_time

    def out_of_time(self) -> bool:
        """True once ``train.time_budget_s`` is spent (rank 0's clock decides for every rank)."""
        budget = self.config.train.time_budget_s
        if budget is None:
            return False
        over = self.elapsed() >= budget
        if self.context.is_distributed:
            flag = torch.tensor([float(over)], device=self.context.device)
            dist.broadcast(flag, src=0)
            over = bool(flag.item())
        return over


def open_run(config: Config, context: DistributedContext, resume: str | Path | None) -> Run:
    """The run folder and logging; a new run never overwrites an old one (``resume`` continues it: a
    checkpoint, or ``"auto"`` for the run's own ``last.pt``)."""
    train = config.train
    amp_dtype = resolve_amp_dtype(train.amp, context.device)
    run_dir = Path(train.runs_dir) / train.run_name
    best_dir = Path(train.best_runs_dir) / train.run_name
    run = Run(config, context, amp_dtype, run_dir, run_dir / "checkpoints" / "last.pt", best_dir)
    if resume is not None:
        run.resume_path = run.last_path if resume == "auto" else Path(resume)
        if not run.resume_path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {run.resume_path}")
    elif run.last_path.exists():
        raise CheckpointError(
            f"run {train.run_name!r} already has {run.last_path}; pass --resume to continue it, or choose "
            "another train.run_name, e.g. --set train.run_name=my_run_2 (nothing was overwritten)"
        )
    if context.is_main:
        (run.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run.run_dir / "previews").mkdir(exist_ok=True)
    setup_logging(context, run.run_dir / "train.log")
    log.info(
        "run %s on %s (world size %d), amp=%s", train.run_name, context.device, context.world_size, amp_dtype
    )
    return run


def build_state(config: Config, device: torch.device) -> TrainState:
    """The config's fresh models, fused AdamW optimisers, gradient scalers (fp16 only) and EMA, on ``device``."""
    train = config.train
    vae = build_vae(config.model, use_checkpointing=train.gradient_checkpointing)
    discriminator = build_discriminator(config.discriminator, config.model.out_channels)
    # without train.channels_last each weight keeps its layout (the VAE's channels-last weights stay so)
    layout = torch.channels_last_3d if train.channels_last else torch.preserve_format
    vae, discriminator = vae.to(device, memory_format=layout), discriminator.to(device, memory_format=layout)
    use_scaler = resolve_amp_dtype(train.amp, device) == torch.float16
    # fused: one kernel per step, and it skips a step on the device when told the gradients are not finite
    adamw = functools.partial(torch.optim.AdamW, weight_decay=train.weight_decay, fused=True)
    return TrainState(
        vae=vae,
        discriminator=discriminator,
        optimizer_g=adamw(vae.parameters(), lr=train.learning_rate),
        optimizer_d=adamw(discriminator.parameters(), lr=config.discriminator.learning_rate),
        scaler_g=torch.amp.GradScaler(device.type, enabled=use_scaler),
        scaler_d=torch.amp.GradScaler(device.type, enabled=use_scaler),
        vae_ema=None if train.ema_decay is None else copy.deepcopy(vae).requires_grad_(False),
    )


def wrap_for_training(state: TrainState, train: TrainConfig, context: DistributedContext) -> None:
    """Set ``state.vae_step`` / ``discriminator_step``: torch.compile (``train.compile``) and DDP wrappers."""
    vae: nn.Module = state.vae
    if train.compile:
        if train.adaptive_adversarial_weight:
            # The adaptive weight differentiates the generator loss twice (retain_graph=True), which compiled
            # backward functions that donate their saved buffers refuse; keep those buffers instead.
            functorch_config.donated_buffer = False
        # Static shapes: preprocessing fixes the volume shape, so only a smaller last batch recompiles. Dynamic
        # shapes (what dynamo switches to on a second shape) failed to lower in inductor here.
        mode = None if train.compile_mode == "default" else train.compile_mode
        vae = torch.compile(vae, dynamic=False, mode=mode)
    discriminator: nn.Module = state.discriminator
    if context.is_distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        vae = DistributedDataParallel(vae, device_ids=device_ids)
        discriminator = DistributedDataParallel(discriminator, device_ids=device_ids)
    state.vae_step, state.discriminator_step = vae, discriminator


def guarded_update(
    loss: torch.Tensor,
    parameters: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
    context: DistributedContext,
) -> torch.Tensor:
    """Backward, unscale, clip, and a fused-AdamW step that the device skips unless the loss and the gradient
    norm are finite on every rank. No host synchronisation. Returns that finite flag (0-dim bool)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip or math.inf)
    nonfinite = (~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))).float()
    if context.is_distributed:
        dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
    if scaler.is_enabled():  # the scaler passes its own inf/NaN flag (which covers these) to the fused step
        scaler.step(optimizer)
    else:
        optimizer.found_inf = nonfinite  # read by the fused AdamW kernel: no update where it is 1
        optimizer.step()
        del optimizer.found_inf
    scaler.update()
    return nonfinite == 0


@torch.no_grad()
def update_ema(state: TrainState, decay: float) -> None:
    """``ema ← ema + (1 − d)(w − ema)`` with ``d = min(decay, (1 + n) / (10 + n))`` (warm-up), n = global step."""
    d = min(decay, (1 + state.global_step) / (10 + state.global_step))
    ema, live = list(state.vae_ema.parameters()), list(state.vae.parameters())
    torch._foreach_lerp_(ema, live, 1.0 - d)


def learning_rate(train: TrainConfig, step: int, total_steps: int, elapsed_s: float) -> float:
    """The generator's learning rate at ``step``: linear warm-up, then constant or cosine to
    ``min_lr_fraction`` × ``learning_rate`` (progress = steps done, or time spent of ``time_budget_s``)."""
    if step < train.warmup_steps:
        return train.learning_rate * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return train.learning_rate
    progress = (step - train.warmup_steps) / max(1, total_steps - train.warmup_steps)
    if train.time_budget_s is not None:
        progress = max(progress, elapsed_s / train.time_budget_s)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return train.learning_rate * (train.min_lr_fraction + (1.0 - train.min_lr_fraction) * cosine)


def train_step(
    state: TrainState,
    loss: VAEGANLoss,
    images: torch.Tensor,
    gan: bool,
    train: TrainConfig,
    amp_dtype: torch.dtype | None,
    context: DistributedContext = SINGLE_PROCESS,
) -> dict[str, torch.Tensor]:
    """One VAE update and, in the GAN stage, one discriminator update on ``images`` (B, 1, D, H, W).

    A non-finite loss or gradient changes no weight: that update is skipped on the device and counted in
    ``state.guard``. Returns the step's losses and ``skipped`` (1 when the VAE update was skipped) as detached
    0-dim tensors on the device — nothing here waits for the device.
    """
    with autocast(images.device, amp_dtype):
        recon, mu, sigma = state.vae_step(images)
        loss_g, logs = loss.generator(
            images,
            recon,
            mu,
            sigma,
            discriminator=state.discriminator if gan else None,
            last_layer_weight=state.vae.last_decoder_layer_weight,
        )
    parameters = list(state.vae_step.parameters())
    finite_g = guarded_update(loss_g, parameters, state.optimizer_g, state.scaler_g, train.grad_clip, context)
    finite_d = torch.ones_like(finite_g)
    logs["discriminator"] = torch.zeros_like(logs["loss"])
    if gan:
        with autocast(images.device, amp_dtype):
            loss_d, logs_d = loss.discriminator(images, recon, state.discriminator_step)
        parameters = list(state.discriminator_step.parameters())
        finite_d = guarded_update(
            loss_d, parameters, state.optimizer_d, state.scaler_d, train.grad_clip, context
        )
        logs.update(logs_d)
    if state.vae_ema is not None:
        update_ema(state, train.ema_decay)
    state.guard.record(~finite_g, ~finite_d)
    state.global_step += 1
    logs["skipped"] = (~finite_g).float()
    return logs


def train_epoch(
    state: TrainState, run: Run, loss: VAEGANLoss, batches: Iterator[torch.Tensor], total: int, stage: str
) -> dict[str, Any]:
    """Train on ``batches`` (``total`` of them, the rest of epoch ``state.epoch``) or until the time budget
    is spent; returns the epoch's training record."""
    train, context, device = run.config.train, run.context, run.context.device
    epoch, first_step = state.epoch, state.step_in_epoch
    total_steps = train.num_epochs * (first_step + total)  # for the cosine schedule
    progress = tqdm(batches, total=total, disable=not context.is_main, desc=f"epoch {epoch}")
    sums = torch.zeros(len(LOG_NAMES), dtype=torch.float64, device=device)
    volumes, start, done, stopped = 0, time.perf_counter(), 0, False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step, images in enumerate(progress, start=first_step):
        lr = learning_rate(train, state.global_step, total_steps, run.elapsed())
        for group in state.optimizer_g.param_groups:
            group["lr"] = lr
        logs = train_step(state, loss, images, stage == "gan", train, run.amp_dtype, context)
        state.step_in_epoch, done = step + 1, done + 1
        values = torch.stack([logs[name] for name in LOG_NAMES]).double()
        sums += torch.where(logs["skipped"] > 0, torch.zeros_like(values), values)
        volumes += images.shape[0] * context.world_size
        every = train.checkpoint_every_steps
        at_checkpoint = bool(every) and state.global_step % every == 0 and done < total
        at_log = state.global_step % train.log_every_steps == 0
        if at_log or at_checkpoint:  # read this step's losses, then the guard: one synchronisation each
            step_values = dict(zip(LOG_NAMES, values.tolist(), strict=True))
            check_guard(state, run, epoch, step)
            progress.set_postfix(loss=f"{step_values['loss']:.4f}", recon=f"{step_values['recon']:.4f}")
            if run.writer is not None:
                for name, value in {**step_values, "lr": lr}.items():
                    run.writer.add_scalar(f"train_step/{name}", value, state.global_step)
        if at_checkpoint:
            write_checkpoint(state, run, stage)
        # every step alone; under DDP only at the log points (the ranks must agree, which costs a sync)
        if (not context.is_distributed or at_log) and run.out_of_time():
            stopped = True
            break
    if stopped:
        log.info("epoch %d step %d: train.time_budget_s spent (%.0f s); stopping", epoch, step, run.elapsed())
    check_guard(state, run, epoch, state.step_in_epoch - 1)
    elapsed = time.perf_counter() - start
    return {
        "epoch": epoch,
        "stage": stage,
        "global_step": state.global_step,
        **{f"train/{n}": v / max(1, done) for n, v in zip(LOG_NAMES, sums.tolist(), strict=True)},
        "train/lr": state.optimizer_g.param_groups[0]["lr"],
        "train/volumes_per_s": volumes / elapsed if elapsed > 0 else 0.0,
        "train/peak_memory_gb": peak_memory_gb(device),
        "train/skipped_steps": state.skipped_steps,
        "time/elapsed_s": run.elapsed(),
        "stopped_by_time_budget": stopped,
    }


def check_guard(state: TrainState, run: Run, epoch: int, step: int) -> None:
    """Read the non-finite guard (one synchronisation) into ``state.skipped_steps``; see :meth:`NonFiniteGuard.check`."""
    limit = run.config.train.max_consecutive_nonfinite
    state.skipped_steps = state.guard.check(epoch, step, state.skipped_steps, limit, run.last_path)


def write_checkpoint(state: TrainState, run: Run, stage: str) -> None:
    """``last.pt`` from ``state`` (collective under DDP; rank 0 writes)."""
    latent_stats = state.history[-1].get("latent_stats") if state.history else None
    payload = training_checkpoint(state, run.config, run.context, stage, latent_stats)
    if run.context.is_main:
        save_checkpoint(payload, run.last_path)


def end_of_epoch(
    state: TrainState,
    run: Run,
    record: dict[str, Any],
    val_set: dataset.VolumeDataset | DeviceVolumeCache,
    lpips: nn.Module,
) -> None:
    """Validate (every ``val_every`` epochs and at the end), keep the best model, log, checkpoint, metrics.csv."""
    train, context, epoch = run.config.train, run.context, record["epoch"]
    last_epoch = epoch + 1 == train.num_epochs or record["stopped_by_time_budget"]
    if (epoch + 1) % train.val_every == 0 or last_epoch:
        val_metrics, latent_stats, preview = validate(
            state.eval_vae, val_set, lpips, run.config, context, run.amp_dtype
        )
        record.update(val_metrics, latent_stats=latent_stats)
        if context.is_main:
            path = run.run_dir / "previews" / f"epoch_{epoch:04d}.png"
            title = f"{train.run_name} epoch {epoch}: PSNR {val_metrics['val/psnr']:.2f} dB"
            figure = orthogonal_slices_figure(
                preview, path, difference_of=("input", "reconstruction"), title=title
            )
            run.writer.add_figure("val/preview", figure, state.global_step)
        value, best = record[train.best_metric], state.best_value
        improved = best is None or (value > best if train.best_metric_mode == "max" else value < best)
        if improved:
            state.best_value = value
            if context.is_main:
                save_best_model(
                    run.best_dir, state.eval_vae, run.config, record, global_step=state.global_step
                )
        channel_std = "/".join(f"{s:.2f}" for s in latent_stats["channel_std"])
        log.info(
            "epoch %d: val PSNR %.2f dB (brain %.2f), SSIM %.4f (brain %.4f), latent std %.3f (per channel %s)%s",
            epoch, record["val/psnr"], record["val/psnr_brain"], record["val/ssim"], record["val/ssim_brain"],
            record["val/latent_std"], channel_std, " — new best" if improved else "",
        )  # fmt: skip
    state.history.append(record)
    if context.is_main:
        for name, value in record.items():
            if isinstance(value, int | float) and name not in ("epoch", "global_step"):
                run.writer.add_scalar(name, value, state.global_step)
    log.info(
        "epoch %d done: %.2f volumes/s, peak memory %.2f GiB, %d skipped steps",
        epoch, record["train/volumes_per_s"], record["train/peak_memory_gb"], state.skipped_steps,
    )  # fmt: skip
    state.epoch, state.step_in_epoch = epoch + 1, 0
    write_checkpoint(state, run, record["stage"])
    # metrics.csv, one row per finished epoch (nested values such as latent statistics left out), written
    # atomically after the checkpoint, from its history: a resumed run never repeats a row
    if context.is_main:
        rows = pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in state.history])
        atomic_write(run.run_dir / "metrics.csv", lambda f: rows.to_csv(f, index=False), kind="metrics file")


@dataclass
class FitResult:
    """What :func:`fit` returns on every rank (only rank 0, ``is_main``, wrote the files)."""

    run_dir: Path  # config.json, train.log, metrics.csv, checkpoints/last.pt, previews/, TensorBoard events
    best_model: Path
    best_metric: str
    best_value: float | None
    history: list[dict[str, Any]]  # one record per finished epoch: metrics.csv's rows + latent statistics
    elapsed_s: float
    is_main: bool

    @classmethod
    def of(cls, state: TrainState, run: Run) -> FitResult:
        best_model = run.best_dir / "best_model.pt"
        best_metric, is_main = run.config.train.best_metric, run.context.is_main
        return cls(
            run.run_dir, best_model, best_metric, state.best_value, state.history, run.elapsed(), is_main
        )

    def summary(self) -> str:
        """Where the results are: the best epoch and its metric, best_model.pt, metrics.csv, TensorBoard."""
        last = self.history[-1]  # fit trains (and validates) at least one epoch, or resumes a run that did
        best = [r["epoch"] for r in self.history if r.get(self.best_metric) == self.best_value]
        return (
            f"training finished: {last['epoch'] + 1} epoch(s), {last['global_step']} steps, "
            f"{last['train/skipped_steps']} skipped, {self.elapsed_s / 60:.1f} min; best {self.best_metric} "
            f"{self.best_value:.4f}{f' at epoch {best[-1]}' if best else ''}\n"
            f"  best model:  {self.best_model}\n"
            f"  metrics:     {self.run_dir / 'metrics.csv'}\n"
            f"  TensorBoard: tensorboard --logdir {self.run_dir}"
        )


def fit(config: Config, resume: str | Path | None = None) -> FitResult:
    """Train ``config``'s VAE: a new run, or with ``resume`` (a ``last.pt``, or ``"auto"`` for this run's own)
    the continuation of one. Under torchrun every rank calls it; only rank 0 writes files.

    Raises ConfigError, CheckpointError, dataset.DataError, NonFiniteTrainingError or DeviceOutOfMemoryError
    (one-line messages; ``main`` prints them).
    """
    train, init_from = config.train, config.train.init_from
    if init_from is not None and resume is None:
        check_init_from(init_from, config.model)  # a wrong or misfit file fails before any set-up
    context = setup_distributed(train.device)
    seed_everything(train.seed + context.rank)
    run = open_run(config, context, resume)
    loader, val_set, shuffle_generator = make_loaders(config, context)
    state = build_state(config, context.device)
    if init_from is not None and resume is None:  # the EMA starts from the same weights
        kind = init_vae_weights(state.vae, init_from, config.model)
        if state.vae_ema is not None:
            state.vae_ema.load_state_dict(state.vae.state_dict())
        log.info("initialised the VAE from %s (%s)", init_from, kind)
    elif init_from is not None:
        log.info(
            "train.init_from %s not applied: --resume continues with its checkpoint's weights", init_from
        )
    lpips = build_perceptual_loss(config.perceptual).to(context.device)
    log.info("perceptual loss: %s", lpips.description)
    loss = VAEGANLoss.from_config(config, lpips)
    shape = tuple(config.preprocessing.target_shape)
    use_recompute = choose_recompute(train, state.vae, shape, context.device)
    log.info(
        "memory-saving recompute: %s (train.recompute=%s)", "on" if use_recompute else "off", train.recompute
    )

    if run.resume_path is not None:
        if not restore_checkpoint(state, run.resume_path, config, context):
            log.warning("resuming with a different world size: RNG streams restart from the seed")
        log.info(
            "resumed %s at epoch %d, step %d (global step %d)",
            run.resume_path, state.epoch, state.step_in_epoch, state.global_step,
        )  # fmt: skip
        if state.epoch >= train.num_epochs:
            log.info(
                "run %s is finished: all %d epochs are done, nothing to train. To train it further, resume "
                "with more epochs, e.g. --resume --set train.num_epochs=%d",
                train.run_name, train.num_epochs, state.epoch + max(1, train.num_epochs // 2),
            )  # fmt: skip
            cleanup_distributed()
            return FitResult.of(state, run)
    wrap_for_training(state, train, context)
    if context.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # written only now, after a resume was accepted: a refused resume leaves the run's files alone
        save_json(config.to_dict(), run.run_dir / "config.json")
        # purge_step drops events a killed run logged after its last checkpoint (the x-axis is global_step)
        run.writer = SummaryWriter(
            str(run.run_dir), purge_step=state.global_step if run.resume_path else None
        )
    per_epoch = steps_per_epoch(loader, train)
    if context.device.type == "cpu" and context.is_main:
        seconds = estimate_cpu_step_seconds(state.vae, loss, train.batch_size, shape, run.amp_dtype)
        steps_left = per_epoch * (train.num_epochs - state.epoch) - state.step_in_epoch
        log.info(cpu_cost_message(seconds, steps_left, train.time_budget_s))

    state.vae_step.train()
    stage = None  # logged when it changes
    remedies = (
        f"lower train.batch_size (now {train.batch_size}), set train.recompute=on (now "
        f"{'on' if use_recompute else 'off'}) or train.amp=bf16 (now {train.amp}), e.g. --resume --set "
        f"train.batch_size={max(1, train.batch_size // 2)}; the last checkpoint, {run.last_path}, is intact"
    )
    with recompute(use_recompute), explain_out_of_memory(context.device, train.batch_size, shape, remedies):
        while state.epoch < train.num_epochs:
            stage, previous = "gan" if state.epoch >= train.gan_start_epoch else "pretrain", stage
            if stage != previous:
                log.info("epoch %d: stage %s", state.epoch, stage)
            batches = epoch_batches(
                loader, shuffle_generator, train, context.device, state.epoch, state.step_in_epoch, per_epoch
            )
            record = train_epoch(state, run, loss, batches, per_epoch - state.step_in_epoch, stage)
            end_of_epoch(state, run, record, val_set, lpips)
            if record["stopped_by_time_budget"]:
                break

    verify_identical_weights(context, VAE=state.vae, discriminator=state.discriminator)
    if run.writer is not None:
        run.writer.close()
    cleanup_distributed()
    return FitResult.of(state, run)


def main(argv: list[str] | None = None) -> int:
    """The command line: arguments → config → :func:`fit` → where the results are (rank 0 prints it)."""
    args = parse_args(argv)
    strict = ["data.strict_input_checks=true"] if args.strict else []
    result = fit(load_config(args.config_file, [*args.overrides, *strict]), resume=args.resume)
    if result.is_main:
        print(result.summary())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FATAL_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
