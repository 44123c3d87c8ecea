"""Train the 3D KL-VAE: pretrain (reconstruction + β·KL + perceptual), then GAN (+ adversarial term).

    python train.py --config_file config.json [--set train.num_epochs=2 ...] [--resume [PATH]]
    torchrun --nproc_per_node 2 train.py --config_file config.json          # DDP (NCCL on GPU, gloo on CPU)

``main`` reads top to bottom: config → set-up (run folder, data, models, loss) → state/resume → loop over
epochs (:func:`train_epoch`: :func:`train_step` per batch; then :func:`end_of_epoch`: validation, best model,
checkpoint) → summary. Only rank 0 writes logs and checkpoints. The loss is ``losses.VAEGANLoss``; checkpoint
files are ``checkpoints.py``'s; :func:`train_step` and :func:`validate` are importable (``bench/`` times them).

The hot loop does not wait for the device: losses, skipped-step flags and the non-finite guard live on the
device and are read every ``train.log_every_steps`` steps (and at the end of an epoch). A step whose loss or
gradient is not finite changes no weight (the fused AdamW skips it on the device).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
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
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

import dataset
import demo_cohort
from checkpoints import (
    CheckpointError,
    check_init_from,
    inference_checkpoint,
    init_vae_weights,
    resume,
    save_checkpoint,
    training_checkpoint,
)
from config import Config, ConfigError, TrainConfig, load_config
from device_data import DeviceBatches, DeviceVolumeCache, cache_fits, free_memory_bytes
from losses import VAEGANLoss, kl_divergence
from metrics import LatentStatistics, image_metrics
from model import MaisiVAE, PatchDiscriminator3D, build_discriminator, build_perceptual_loss, build_vae
from model.recompute import recompute
from plotting import orthogonal_slices_figure
from utils import (
    DeviceOutOfMemoryError,
    DistributedContext,
    autocast,
    cleanup_distributed,
    explain_out_of_memory,
    main_process_first,
    peak_memory_gb,
    resolve_amp_dtype,
    seed_everything,
    setup_distributed,
)

log = logging.getLogger("train")

SINGLE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LOG_NAMES = ("loss", "recon", "kl", "perceptual", "adversarial", "adversarial_weight", "discriminator")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with NaN/Inf losses or gradients."""


class NonFiniteGuard:
    """Counts skipped (non-finite) steps on the device; :meth:`read` synchronises once and opens a new window."""

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped, self.streak, self.longest, self.skipped_discriminator = (zero.clone() for _ in range(4))

    def record(self, generator_skipped: torch.Tensor, discriminator_skipped: torch.Tensor) -> None:
        """Add one step's flags (0-dim bool tensors); no host synchronisation."""
        skipped = generator_skipped.long()
        self.skipped += skipped
        self.streak = (self.streak + 1) * skipped
        self.longest = torch.maximum(self.longest, self.streak)
        self.skipped_discriminator += discriminator_skipped.long()

    def read(self) -> tuple[int, int, int]:
        """(generator steps skipped, longest run of consecutive skipped steps, discriminator steps skipped)
        since the last read; a run that spans reads keeps counting (the streak carries over)."""
        skipped, longest, skipped_d = torch.stack(
            [self.skipped, self.longest, self.skipped_discriminator]
        ).tolist()
        for counter in (self.skipped, self.longest, self.skipped_discriminator):
            counter.zero_()
        return skipped, longest, skipped_d


@dataclass
class TrainState:
    """Everything a training checkpoint holds, plus the modules the step calls.

    ``vae`` / ``discriminator`` are the bare modules (what checkpoints hold); ``vae_step`` /
    ``discriminator_step`` are what the step calls: the same modules, or their torch.compile / DDP wrappers.
    ``vae_ema`` is the moving average of the VAE weights (``train.ema_decay``), or None.
    ``epoch`` / ``step_in_epoch`` point at the next batch to train on; ``global_step`` counts batches.
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
    vae_step: nn.Module | None = None
    discriminator_step: nn.Module | None = None
    guard: NonFiniteGuard | None = None

    def __post_init__(self) -> None:
        self.vae_step = self.vae_step or self.vae
        self.discriminator_step = self.discriminator_step or self.discriminator
        self.guard = self.guard or NonFiniteGuard(next(self.vae.parameters()).device)

    @property
    def eval_vae(self) -> MaisiVAE:
        """The weights that are validated and saved as the best model: the EMA when there is one."""
        return self.vae if self.vae_ema is None else self.vae_ema


@dataclass
class Run:
    """Where and how this process trains: config, ranks, precision, output folders, TensorBoard, clock."""

    config: Config
    context: DistributedContext
    amp_dtype: torch.dtype | None
    run_dir: Path
    resume_path: Path | None = None
    writer: Any = None
    start_time: float = field(default_factory=time.perf_counter)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best_dir(self) -> Path:
        return Path(self.config.train.best_runs_dir) / self.config.train.run_name

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


# ------------------------------------------------------------------------------------------- set-up


def open_run(config: Config, context: DistributedContext, resume_arg: str | None) -> Run:
    """The run folder and logging; a new run never overwrites an old one (``--resume`` continues it)."""
    train = config.train
    amp_dtype = resolve_amp_dtype(train.amp, context.device)
    run = Run(config, context, amp_dtype, Path(train.runs_dir) / train.run_name)
    if resume_arg is not None:
        run.resume_path = run.last_path if resume_arg == "auto" else Path(resume_arg)
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
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if context.is_main:
        handlers.append(logging.FileHandler(run.run_dir / "train.log"))
    # under torchrun only rank 0 reports progress; the other ranks speak up only for warnings and errors
    level, rank = (logging.INFO, "") if context.is_main else (logging.WARNING, f"[rank {context.rank}] ")
    logging.basicConfig(level=level, format=f"%(asctime)s {rank}%(message)s", handlers=handlers, force=True)
    log.info(
        "run %s on %s (world size %d), amp=%s", train.run_name, context.device, context.world_size, amp_dtype
    )
    return run


def make_loaders(
    config: Config, context: DistributedContext
) -> tuple[DataLoader | DeviceBatches, dataset.VolumeDataset | DeviceVolumeCache, torch.Generator]:
    """The training batches (shuffled, augmented, sharded across ranks), the validation volumes (not augmented)
    and the generator that orders the shuffle.

    With ``data.device_cache`` on (``auto``: on CUDA when the volumes fit) both sets live on the training
    device and the augmentation runs there in batch (``device_data.py``); otherwise a DataLoader feeds
    augmented volumes from the ``data.cache``. Both paths draw the same shuffle and augmentations.
    """
    data, train = config.data, config.train
    with main_process_first(context):
        demo_cohort.ensure_demo_data(data)
    train_frame = dataset.preflight(dataset.read_split(data.train_csv), skip_bad_files=data.skip_bad_files)
    val_frame = dataset.preflight(dataset.read_split(data.val_csv), skip_bad_files=data.skip_bad_files)
    dataset.warn_inputs(
        pd.concat([train_frame, val_frame]), strict=data.strict_input_checks, emit=log.warning
    )
    log.info("train: %d volumes, val: %d volumes", len(train_frame), len(val_frame))
    augmentation = config.augmentation if config.augmentation.enabled else None
    cache_dir = Path(data.cache_dir)
    use_device_cache = data.device_cache == "on"
    if data.device_cache == "auto" and context.device.type == "cuda":
        shape = tuple(config.preprocessing.target_shape)
        use_device_cache, reason = cache_fits(len(train_frame) + len(val_frame), shape, context.device)
        log.info(reason)
    generator = torch.Generator()
    build = {"prep": config.preprocessing, "cache": data.cache, "cache_dir": cache_dir}
    val_set = dataset.build_dataset(val_frame, augmentation=None, **build)
    train_set = dataset.build_dataset(
        train_frame, augmentation=None if use_device_cache else augmentation, seed=train.seed, **build
    )
    if context.is_distributed:
        sampler = DistributedSampler(train_set, shuffle=True, seed=train.seed, drop_last=False)
    else:
        sampler = RandomSampler(train_set, generator=generator)
    if use_device_cache:
        with torch.random.fork_rng():  # copying through a DataLoader must not move the model's random stream
            train_cache = DeviceVolumeCache.from_dataset(
                train_set, context.device, num_workers=data.num_workers
            )
            val_cache = DeviceVolumeCache.from_dataset(val_set, context.device, num_workers=data.num_workers)
        log.info(
            "device cache: %.2f GiB on %s", (train_cache.nbytes + val_cache.nbytes) / 2**30, context.device
        )
        batch_augmentation = None if augmentation is None else dataset.Augmentation(augmentation, train.seed)
        batches = DeviceBatches(train_cache, batch_augmentation, sampler, train.batch_size, generator)
        return batches, val_cache, generator
    loader = DataLoader(
        train_set,
        batch_size=train.batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        pin_memory=context.device.type == "cuda",
        persistent_workers=False,
        generator=generator,
    )
    return loader, val_set, generator


def build_state(
    config: Config,
    device: torch.device,
    vae: nn.Module | None = None,
    discriminator: nn.Module | None = None,
) -> TrainState:
    """Fresh models (or the given ones), fused AdamW optimisers, gradient scalers (fp16 only), EMA, on ``device``.

    ``vae`` / ``discriminator`` default to the config's; another VAE must map (B, C, *S) to
    (recon, mu, sigma) and expose ``last_decoder_layer_weight`` (``bench/`` passes MONAI's models).
    """
    train = config.train
    if vae is None:
        vae = build_vae(config.model, use_checkpointing=train.gradient_checkpointing)
    if discriminator is None:
        discriminator = build_discriminator(config.discriminator, config.model.out_channels)
    vae, discriminator = vae.to(device), discriminator.to(device)  # the VAE keeps its channels-last weights
    if train.channels_last:
        vae = vae.to(memory_format=torch.channels_last_3d)
        discriminator = discriminator.to(memory_format=torch.channels_last_3d)
    use_scaler = resolve_amp_dtype(train.amp, device) == torch.float16
    return TrainState(
        vae=vae,
        discriminator=discriminator,
        # fused: one kernel per step, and it skips a step on the device when told the gradients are not finite
        optimizer_g=torch.optim.AdamW(
            vae.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay, fused=True
        ),
        optimizer_d=torch.optim.AdamW(
            discriminator.parameters(),
            lr=config.discriminator.learning_rate,
            weight_decay=train.weight_decay,
            fused=True,
        ),
        scaler_g=torch.amp.GradScaler(device.type, enabled=use_scaler),
        scaler_d=torch.amp.GradScaler(device.type, enabled=use_scaler),
        vae_ema=None if train.ema_decay is None else copy.deepcopy(vae).requires_grad_(False),
    )


def choose_recompute(
    train: TrainConfig, vae: nn.Module, shape: tuple[int, ...], device: torch.device
) -> bool:
    """``train.recompute``: ``on`` / ``off``, or ``auto``: on for CPU; on CUDA off unless the estimated training
    memory without it would exceed 80 % of the free device memory."""
    if train.recompute != "auto":
        return train.recompute == "on"
    if device.type != "cuda":
        return True
    free = free_memory_bytes(device)
    need = estimate_training_bytes(vae, shape, train.batch_size, device)
    log.info("recompute auto: ~%.1f GiB estimated without it, %.1f GiB free", need / 2**30, free / 2**30)
    return need > 0.8 * free


def estimate_training_bytes(
    vae: nn.Module, shape: tuple[int, ...], batch_size: int, device: torch.device
) -> int:
    """Bytes autograd saves for a VAE forward without the recompute, measured at 1/8 of the voxels and scaled,
    times 3 for gradients, the perceptual and discriminator passes and allocator slack (a deliberate
    over-estimate; ``shape`` is (D, H, W))."""
    small = half_size(shape)
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    cuda_devices = [device] if device.type == "cuda" else []
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with recompute(False), torch.random.fork_rng(devices=cuda_devices), hooks:
        vae(torch.zeros(1, 1, *small, device=device))
    return int(3 * saved * batch_size * math.prod(shape) / math.prod(small))


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


def half_size(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(D, H, W) halved per axis (at least 8): where :func:`estimate_training_bytes` measures, to scale up."""
    return tuple(max(8, math.ceil(s / 2)) for s in shape)


def estimate_cpu_step_seconds(state: TrainState, loss: VAEGANLoss, run: Run) -> float:
    """Seconds per pretraining step on this CPU: forward + backward of one full-size batch, timed after a
    warm-up pass that pays the one-off costs (allocations, kernel selection; a half-size pass scaled up by
    the voxel count overestimated 4x, issue 17). No weight, gradient or random stream is changed."""
    shape = tuple(run.config.preprocessing.target_shape)
    with torch.random.fork_rng():
        images = torch.rand(run.config.train.batch_size, 1, *shape)
        for _ in range(2):  # the first is the warm-up
            start = time.perf_counter()
            with autocast(images.device, run.amp_dtype):
                recon, mu, sigma = state.vae(images)
                total, _ = loss.generator(images, recon, mu, sigma)
            total.backward()
            seconds = time.perf_counter() - start
    state.vae.zero_grad(set_to_none=True)
    return seconds


# ------------------------------------------------------------------------------------------- one step


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


# ------------------------------------------------------------------------------------------- epochs


def epoch_batches(
    loader: DataLoader | DeviceBatches,
    generator: torch.Generator,
    run: Run,
    epoch: int,
    first: int,
    last: int,
) -> Iterator[torch.Tensor]:
    """The epoch's training images (B, 1, D, H, W) on the device, batches ``first`` to ``last - 1``.

    The shuffle order and every augmentation are functions of (seed, epoch, index), so a resumed epoch
    replays the same batches.
    """
    train, device = run.config.train, run.context.device
    generator.manual_seed(train.seed * 1_000_003 + epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    (loader if isinstance(loader, DeviceBatches) else loader.dataset).set_epoch(epoch)
    memory_format = torch.channels_last_3d if train.channels_last else torch.contiguous_format
    for batch in islice(loader, first, last):
        yield batch["image"].to(device, non_blocking=True).to(memory_format=memory_format)


def steps_per_epoch(loader: DataLoader | DeviceBatches, train: TrainConfig) -> int:
    """Batches per epoch (``len(loader)``, capped by ``train.max_steps_per_epoch``)."""
    return len(loader) if train.max_steps_per_epoch is None else min(len(loader), train.max_steps_per_epoch)


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
        if state.global_step % train.log_every_steps == 0 or at_checkpoint:
            report_progress(state, run, logs, progress, lr, epoch, step)
        if at_checkpoint:
            write_checkpoint(state, run, stage)
        # every step alone; under DDP only at the log points (the ranks must agree, which costs a sync)
        if not context.is_distributed or state.global_step % train.log_every_steps == 0:
            stopped = run.out_of_time()
            if stopped:
                log.info(
                    "epoch %d step %d: train.time_budget_s spent (%.0f s); stopping",
                    epoch,
                    step,
                    run.elapsed(),
                )
                break
    check_guard(state, run, epoch, state.step_in_epoch - 1)
    elapsed = time.perf_counter() - start
    record = {"epoch": epoch, "stage": stage, "global_step": state.global_step}
    record.update({f"train/{n}": v / max(1, done) for n, v in zip(LOG_NAMES, sums.tolist(), strict=True)})
    record.update(
        {
            "train/lr": state.optimizer_g.param_groups[0]["lr"],
            "train/volumes_per_s": volumes / elapsed if elapsed > 0 else 0.0,
            "train/peak_memory_gb": peak_memory_gb(device),
            "train/skipped_steps": state.skipped_steps,
            "time/elapsed_s": run.elapsed(),
            "stopped_by_time_budget": stopped,
        }
    )
    return record


def check_guard(state: TrainState, run: Run, epoch: int, step: int) -> None:
    """Read the non-finite guard (one synchronisation): count and log skipped steps; raise when a run of
    consecutive skipped steps reached ``train.max_consecutive_nonfinite``."""
    skipped, longest, skipped_d = state.guard.read()
    state.skipped_steps += skipped
    if skipped:
        log.warning(
            "epoch %d up to step %d: %d non-finite loss or gradient step(s) skipped (%d in a row, %d in all)",
            epoch, step, skipped, longest, state.skipped_steps,
        )  # fmt: skip
    if skipped_d:
        log.warning(
            "epoch %d up to step %d: %d discriminator step(s) skipped (non-finite)", epoch, step, skipped_d
        )
    if longest >= run.config.train.max_consecutive_nonfinite:
        raise NonFiniteTrainingError(
            f"{longest} consecutive steps had NaN/Inf losses or gradients (epoch {epoch}, up to step {step}); "
            f"training stopped. The last good checkpoint is {run.last_path}. Lower the learning rate, check the "
            "data with `python dataset.py --check`, or use train.amp=none."
        )


def report_progress(
    state: TrainState,
    run: Run,
    logs: dict[str, torch.Tensor],
    progress: tqdm,
    lr: float,
    epoch: int,
    step: int,
) -> None:
    """Every ``log_every_steps``: read this step's losses (one synchronisation), check the guard, log."""
    values = dict(zip(LOG_NAMES, torch.stack([logs[n] for n in LOG_NAMES]).tolist(), strict=True))
    check_guard(state, run, epoch, step)
    progress.set_postfix(loss=f"{values['loss']:.4f}", recon=f"{values['recon']:.4f}")
    if run.writer is not None:
        for name, value in values.items():
            run.writer.add_scalar(f"train_step/{name}", value, state.global_step)
        run.writer.add_scalar("train_step/lr", lr, state.global_step)


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
        record.update(val_metrics)
        record["latent_stats"] = latent_stats
        if context.is_main:
            figure = orthogonal_slices_figure(
                preview,
                run.run_dir / "previews" / f"epoch_{epoch:04d}.png",
                difference_of=("input", "reconstruction"),
                title=f"{train.run_name} epoch {epoch}: PSNR {val_metrics['val/psnr']:.2f} dB",
            )
            run.writer.add_figure("val/preview", figure, state.global_step)
        if train.best_metric not in record:
            raise ConfigError(
                f"train.best_metric {train.best_metric!r} is not a validation metric; available: "
                f"{sorted(k for k in record if k.startswith('val/'))}"
            )
        value = record[train.best_metric]
        improved = state.best_value is None or (
            value > state.best_value if train.best_metric_mode == "max" else value < state.best_value
        )
        if improved:
            state.best_value = value
            if context.is_main:
                metrics = {k: v for k, v in record.items() if k != "latent_stats"}
                save_checkpoint(
                    inference_checkpoint(
                        state.eval_vae,
                        run.config,
                        latent_stats,
                        metrics,
                        epoch=epoch,
                        global_step=state.global_step,
                    ),
                    run.best_dir / "best_model.pt",
                )
                (run.best_dir / "config.json").write_text(json.dumps(run.config.to_dict(), indent=2))
                (run.best_dir / "metrics.json").write_text(json.dumps(record, indent=2))
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
    if context.is_main:  # after the checkpoint, from its history: a resumed run never repeats a row
        write_metrics_csv(run.run_dir / "metrics.csv", state.history)


@torch.no_grad()
def validate(
    vae: torch.nn.Module,
    val_set: dataset.VolumeDataset | DeviceVolumeCache,
    lpips: torch.nn.Module,
    config: Config,
    context: DistributedContext,
    amp_dtype: torch.dtype | None,
) -> tuple[dict[str, float], dict[str, Any], dict[str, torch.Tensor]]:
    """Full-volume validation in batches of ``train.val_batch_size``, under AMP, sharded across ranks and
    reduced.

    Returns:
        (mean metrics named ``val/<metric>``, latent statistics of mu, one preview {input, reconstruction}).
    """
    vae.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(1, dtype=torch.float64)
    latent_stats = LatentStatistics(config.model.latent_channels)
    preview: dict[str, torch.Tensor] = {}
    indices = list(range(context.rank, len(val_set), context.world_size))
    batch_size = config.train.val_batch_size or config.train.batch_size
    starts = range(0, len(indices), batch_size)
    # rank 0 only, and only on a terminal (disable=None): no progress lines in non-interactive logs
    for start in tqdm(
        starts, desc="validation", unit="batch", leave=False, disable=None if context.is_main else True
    ):
        chunk = indices[start : start + batch_size]
        if isinstance(val_set, DeviceVolumeCache):
            batch = val_set.batch(chunk)
        else:
            batch = torch.utils.data.default_collate([val_set[i] for i in chunk])
        images, masks = batch["image"].to(context.device), batch["mask"].to(context.device)
        with autocast(context.device, amp_dtype):
            mu, sigma = vae.encode(images)
            recon = vae.decode(mu, spatial_shape=tuple(images.shape[2:]))
        values = image_metrics(recon, images, masks, lpips=lpips)
        values["kl"] = kl_divergence(mu, sigma).cpu()
        for name, value in values.items():
            sums[name] = sums.get(name, torch.zeros(1, dtype=torch.float64)) + value.double().sum()
        count += len(chunk)
        latent_stats.update(mu)
        if not preview:
            preview = {"input": images[0].float().cpu(), "reconstruction": recon[0].float().clamp(0, 1).cpu()}
    names = sorted(sums) if sums else []
    if context.is_distributed:
        names_list = [names]
        dist.broadcast_object_list(names_list, src=0)
        names = names_list[0]
        packed = torch.stack(
            [sums.get(n, torch.zeros(1, dtype=torch.float64)) for n in names] + [count]
        ).flatten()
        dist.all_reduce(packed)
        sums = {n: packed[i : i + 1] for i, n in enumerate(names)}
        count = packed[-1:]
    latent_stats.all_reduce()
    means = {f"val/{name}": float(sums[name] / count) for name in names}
    summary = latent_stats.summary()
    means["val/latent_std"] = summary["std"]
    means["val/latent_std_min"] = min(summary["channel_std"])
    means["val/latent_std_max"] = max(summary["channel_std"])
    means["val/scale_factor"] = summary["scale_factor"]
    vae.train()
    return means, summary, preview


# ------------------------------------------------------------------------------------------- reporting


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per finished epoch (nested values such as latent statistics left out), written atomically."""
    rows = [{k: v for k, v in record.items() if not isinstance(v, dict)} for record in history]
    temporary = path.with_name(f".{path.name}.tmp")
    pd.DataFrame(rows).to_csv(temporary, index=False)
    os.replace(temporary, path)


def verify_identical_weights(module: torch.nn.Module, name: str, context: DistributedContext) -> None:
    """DDP sanity check: every rank must end with the same weights of ``module`` (compares per-tensor sums)."""
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(context.device)
    gathered = [torch.zeros_like(checksum) for _ in range(context.world_size)]
    dist.all_gather(gathered, checksum)
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError(f"DDP ranks ended with different {name} weights: the run is not trustworthy")
    log.info("%s weights identical on all %d ranks", name, context.world_size)


def announce_cpu_cost(state: TrainState, loss: VAEGANLoss, run: Run, steps_left: int) -> None:
    """On a CPU, before the first step: the estimated time per step and for the run, and the CPU preset."""
    seconds = estimate_cpu_step_seconds(state, loss, run)
    total = seconds * steps_left
    budget = run.config.train.time_budget_s
    if budget is not None and total > budget:
        plan = f"{steps_left} steps left, of which train.time_budget_s={budget:g} allows about {budget / seconds:.0f}"
    else:
        plan = f"{steps_left} steps left ≈ " + (
            f"{total / 60:.0f} min" if total < 5400 else f"{total / 3600:.1f} h"
        )
    message = (
        f"CPU training: about {seconds:.1f} s per pretraining step (a rough estimate from a half-size step; "
        f"GAN-stage steps are slower), {plan}"
    )
    if seconds > 10:
        message += "; for a run that finishes in minutes on a CPU, use --config_file configs/cpu.json"
    log.info(message)


def summarise(state: TrainState, run: Run) -> None:
    """Print where the results are: the best epoch and its metric, best_model.pt, metrics.csv, TensorBoard."""
    train = run.config.train
    best = [r for r in state.history if r.get(train.best_metric) == state.best_value]
    best_text = (
        f"best {train.best_metric} {state.best_value:.4f} at epoch {best[-1]['epoch']}"
        if best
        else "no validation"
    )
    print(
        f"training finished: {state.epoch} epoch(s), {state.global_step} steps, {state.skipped_steps} skipped, "
        f"{run.elapsed() / 60:.1f} min; {best_text}\n"
        f"  best model:  {run.best_dir / 'best_model.pt'}\n"
        f"  metrics:     {run.run_dir / 'metrics.csv'}\n"
        f"  TensorBoard: tensorboard --logdir {run.run_dir}"
    )


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    strict = ["data.strict_input_checks=true"] if args.strict else []
    config = load_config(args.config_file, [*args.overrides, *strict])
    train = config.train
    if train.init_from is not None and args.resume is None:
        check_init_from(train.init_from, config.model)  # a wrong or misfit file fails before any set-up
    context = setup_distributed(train.device)
    seed_everything(train.seed + context.rank)
    run = open_run(config, context, args.resume)

    loader, val_set, shuffle_generator = make_loaders(config, context)
    state = build_state(config, context.device)
    if train.init_from is not None and run.resume_path is None:
        kind = init_vae_weights(state.vae, train.init_from, config.model)
        if state.vae_ema is not None:
            state.vae_ema.load_state_dict(state.vae.state_dict())
        log.info("initialised the VAE from %s (%s)", train.init_from, kind)
    elif train.init_from is not None:
        log.info(
            "train.init_from %s not applied: --resume continues with its checkpoint's weights",
            train.init_from,
        )
    lpips = build_perceptual_loss(config.perceptual).to(context.device)
    log.info("perceptual loss: %s", lpips.description)
    loss = VAEGANLoss.from_config(config, lpips)
    use_recompute = choose_recompute(
        train, state.vae, tuple(config.preprocessing.target_shape), context.device
    )
    log.info(
        "memory-saving recompute: %s (train.recompute=%s)", "on" if use_recompute else "off", train.recompute
    )

    if run.resume_path is not None:
        if not resume(state, run.resume_path, config, context):
            log.warning("resuming with a different world size: RNG streams restart from the seed")
        log.info(
            "resumed %s at epoch %d, step %d (global step %d)",
            run.resume_path, state.epoch, state.step_in_epoch, state.global_step,
        )  # fmt: skip
        if state.epoch >= train.num_epochs:
            log.info(
                "run %s is finished: all %d epochs are done, nothing to train. To train it further, resume with "
                "more epochs, e.g. --resume --set train.num_epochs=%d",
                train.run_name, train.num_epochs, state.epoch + max(1, train.num_epochs // 2),
            )  # fmt: skip
            cleanup_distributed()
            return 0
    wrap_for_training(state, train, context)
    if context.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # written only now, after a --resume was accepted: a refused resume leaves the run's files alone
        (run.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        # purge_step drops events a killed run logged after its last checkpoint (the x-axis is global_step)
        run.writer = SummaryWriter(
            str(run.run_dir), purge_step=state.global_step if run.resume_path else None
        )
    per_epoch = steps_per_epoch(loader, train)
    if context.device.type == "cpu" and context.is_main:
        announce_cpu_cost(
            state, loss, run, per_epoch * (train.num_epochs - state.epoch) - state.step_in_epoch
        )

    state.vae_step.train()
    stage = None
    remedies = (
        f"lower train.batch_size (now {train.batch_size}), set train.recompute=on (now "
        f"{'on' if use_recompute else 'off'}) or train.amp=bf16 (now {train.amp}), e.g. --resume --set "
        f"train.batch_size={max(1, train.batch_size // 2)}; the last checkpoint, {run.last_path}, is intact"
    )
    shape = tuple(config.preprocessing.target_shape)
    with recompute(use_recompute), explain_out_of_memory(context.device, train.batch_size, shape, remedies):
        while state.epoch < train.num_epochs:
            new_stage = "gan" if state.epoch >= train.gan_start_epoch else "pretrain"
            if new_stage != stage:
                log.info("epoch %d: stage %s", state.epoch, new_stage)
            stage = new_stage
            batches = epoch_batches(
                loader, shuffle_generator, run, state.epoch, state.step_in_epoch, per_epoch
            )
            record = train_epoch(state, run, loss, batches, per_epoch - state.step_in_epoch, stage)
            end_of_epoch(state, run, record, val_set, lpips)
            if record["stopped_by_time_budget"]:
                break

    if context.is_distributed:
        verify_identical_weights(state.vae, "VAE", context)
        verify_identical_weights(state.discriminator, "discriminator", context)
    if run.writer is not None:
        run.writer.close()
    if context.is_main:
        summarise(state, run)
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (
        ConfigError,
        CheckpointError,
        dataset.DataError,
        NonFiniteTrainingError,
        DeviceOutOfMemoryError,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
