"""Train the 3D KL-VAE: pretrain (reconstruction + β·KL + perceptual), then GAN (+ adversarial term).

    python train.py --config_file config.json [--set train.num_epochs=2 ...] [--resume [PATH]]
    torchrun --nproc_per_node 2 train.py --config_file config.json          # DDP (NCCL on GPU, gloo on CPU)

``main`` reads top to bottom: config → set-up (run folder, data, models, loss) → state/resume → loop over
epochs (:func:`train_step` per batch, then :func:`end_of_epoch`: validation, best model, checkpoint) →
teardown. Only rank 0 writes logs and checkpoints. The loss is ``losses.VAEGANLoss``; checkpoint files are
``checkpoints.py``'s; :func:`train_step` and :func:`validate` are importable (``bench/`` times them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

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
from losses import VAEGANLoss, kl_divergence
from metrics import LatentStatistics, image_metrics
from model import MaisiVAE, PatchDiscriminator3D, build_discriminator, build_perceptual_loss, build_vae
from plotting import orthogonal_slices_figure
from utils import (
    DistributedContext,
    autocast,
    cleanup_distributed,
    main_process_first,
    resolve_amp_dtype,
    seed_everything,
    setup_distributed,
)

log = logging.getLogger("train")

SINGLE_PROCESS = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with NaN/Inf losses or gradients."""


@dataclass
class TrainState:
    """Everything a training checkpoint holds, plus the modules the step calls.

    ``vae`` / ``discriminator`` are the bare modules (what checkpoints hold); ``vae_step`` /
    ``discriminator_step`` are what the step calls: the same modules, or their torch.compile / DDP wrappers.
    ``epoch`` / ``step_in_epoch`` point at the next batch to train on.
    """

    vae: MaisiVAE
    discriminator: PatchDiscriminator3D
    optimizer_g: torch.optim.Optimizer
    optimizer_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    vae_step: nn.Module | None = None
    discriminator_step: nn.Module | None = None

    def __post_init__(self) -> None:
        self.vae_step = self.vae_step or self.vae
        self.discriminator_step = self.discriminator_step or self.discriminator


@dataclass
class Run:
    """Where and how this process trains: config, ranks, precision, output folders, TensorBoard."""

    config: Config
    context: DistributedContext
    amp_dtype: torch.dtype | None
    run_dir: Path
    resume_path: Path | None
    writer: Any = None

    @property
    def last_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def best_dir(self) -> Path:
        return Path(self.config.train.best_runs_dir) / self.config.train.run_name


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
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- set-up


def open_run(config: Config, context: DistributedContext, resume_arg: str | None) -> Run:
    """The run folder and logging; a new run never overwrites an old one (``--resume`` continues it)."""
    train = config.train
    run = Run(
        config,
        context,
        resolve_amp_dtype(train.amp, context.device),
        Path(train.runs_dir) / train.run_name,
        None,
    )
    if resume_arg is not None:
        run.resume_path = run.last_path if resume_arg == "auto" else Path(resume_arg)
        if not run.resume_path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {run.resume_path}")
    elif run.last_path.exists():
        raise CheckpointError(
            f"run {train.run_name!r} already has {run.last_path}; pass --resume to continue it, or choose another "
            "train.run_name (nothing was overwritten)"
        )
    if context.is_main:
        (run.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run.run_dir / "previews").mkdir(exist_ok=True)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if context.is_main:
        handlers.append(logging.FileHandler(run.run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers, force=True)
    log.info(
        "run %s on %s (world size %d), amp=%s",
        train.run_name,
        context.device,
        context.world_size,
        run.amp_dtype,
    )
    return run


def make_loaders(
    config: Config, context: DistributedContext
) -> tuple[DataLoader, dataset.VolumeDataset, torch.Generator]:
    """Training loader (shuffled, augmented, sharded across ranks), the validation set (not augmented) and the
    generator that orders the shuffle."""
    data = config.data
    with main_process_first(context):
        demo_cohort.ensure_demo_data(data)
    train_frame = dataset.preflight(dataset.read_split(data.train_csv), skip_bad_files=data.skip_bad_files)
    val_frame = dataset.preflight(dataset.read_split(data.val_csv), skip_bad_files=data.skip_bad_files)
    augmentation = config.augmentation if config.augmentation.enabled else None
    cache_dir = Path(data.cache_dir)
    train_set = dataset.build_dataset(
        train_frame,
        config.preprocessing,
        augmentation,
        cache=data.cache,
        cache_dir=cache_dir,
        seed=config.train.seed,
    )
    val_set = dataset.build_dataset(
        val_frame, config.preprocessing, None, cache=data.cache, cache_dir=cache_dir
    )
    generator = torch.Generator()
    if context.is_distributed:
        sampler = DistributedSampler(train_set, shuffle=True, seed=config.train.seed, drop_last=False)
    else:
        sampler = RandomSampler(train_set, generator=generator)
    loader = DataLoader(
        train_set,
        batch_size=config.train.batch_size,
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
    """Fresh models (or the given ones), AdamW optimisers and gradient scalers (fp16 only) on ``device``.

    ``vae`` / ``discriminator`` default to the config's; another VAE must map (B, C, *S) to
    (recon, mu, sigma) and expose ``last_decoder_layer_weight`` (``bench/`` passes MONAI's models).
    """
    train = config.train
    if vae is None:
        vae = build_vae(config.model, use_checkpointing=train.gradient_checkpointing)
    if discriminator is None:
        discriminator = build_discriminator(config.discriminator, config.model.out_channels)
    vae, discriminator = vae.to(device), discriminator.to(device)
    memory_format = torch.channels_last_3d if train.channels_last else torch.contiguous_format
    vae, discriminator = vae.to(memory_format=memory_format), discriminator.to(memory_format=memory_format)
    use_scaler = resolve_amp_dtype(train.amp, device) == torch.float16
    return TrainState(
        vae=vae,
        discriminator=discriminator,
        optimizer_g=torch.optim.AdamW(
            vae.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay
        ),
        optimizer_d=torch.optim.AdamW(
            discriminator.parameters(), lr=config.discriminator.learning_rate, weight_decay=train.weight_decay
        ),
        scaler_g=torch.amp.GradScaler(device.type, enabled=use_scaler),
        scaler_d=torch.amp.GradScaler(device.type, enabled=use_scaler),
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
        vae = torch.compile(vae, dynamic=False)
    discriminator: nn.Module = state.discriminator
    if context.is_distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        vae = DistributedDataParallel(vae, device_ids=device_ids)
        discriminator = DistributedDataParallel(discriminator, device_ids=device_ids)
    state.vae_step, state.discriminator_step = vae, discriminator


# ------------------------------------------------------------------------------------------- one step


def all_ranks_agree(flag: bool, context: DistributedContext) -> bool:
    """True only if ``flag`` is True on every rank (so that all ranks skip a step together)."""
    if not context.is_distributed:
        return flag
    tensor = torch.tensor([0.0 if flag else 1.0], device=context.device)
    dist.all_reduce(tensor)
    return float(tensor) == 0.0


def optimizer_update(
    loss: torch.Tensor,
    parameters: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
    context: DistributedContext,
) -> bool:
    """Backward, unscale, clip and step — only when the loss and the gradient norm are finite on every rank.

    Returns False (weights, optimiser state and gradients untouched) for a non-finite loss or gradient.
    """
    optimizer.zero_grad(set_to_none=True)
    finite = all_ranks_agree(bool(torch.isfinite(loss)), context)
    if finite:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip or math.inf)
        finite = all_ranks_agree(bool(torch.isfinite(grad_norm)), context)
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scaler.update()
        return False
    scaler.step(optimizer)
    scaler.update()
    return True


def train_step(
    state: TrainState,
    loss: VAEGANLoss,
    images: torch.Tensor,
    gan: bool,
    train: TrainConfig,
    amp_dtype: torch.dtype | None,
    context: DistributedContext = SINGLE_PROCESS,
) -> dict[str, torch.Tensor] | None:
    """One VAE update and, in the GAN stage, one discriminator update on ``images`` (B, 1, D, H, W).

    A non-finite loss or gradient changes no weight: the step is skipped and counted in ``state``.
    Returns the step's losses (detached 0-dim tensors), or None for a skipped step.
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
    if not optimizer_update(
        loss_g, list(state.vae_step.parameters()), state.optimizer_g, state.scaler_g, train.grad_clip, context
    ):
        state.skipped_steps += 1
        state.consecutive_nonfinite += 1
        return None
    state.consecutive_nonfinite = 0
    logs["discriminator"] = loss_g.new_zeros(()).detach()
    if gan:
        with autocast(images.device, amp_dtype):
            loss_d, logs_d = loss.discriminator(images, recon, state.discriminator_step)
        if not optimizer_update(
            loss_d,
            list(state.discriminator_step.parameters()),
            state.optimizer_d,
            state.scaler_d,
            train.grad_clip,
            context,
        ):
            log.warning(
                "step %d: non-finite discriminator loss or gradient — discriminator step skipped",
                state.global_step,
            )
        logs.update(logs_d)
    state.global_step += 1
    return logs


# ------------------------------------------------------------------------------------------- epochs


def train_epoch(
    state: TrainState, run: Run, loss: VAEGANLoss, loader: DataLoader, stage: str
) -> dict[str, Any]:
    """Train from ``state.step_in_epoch`` to the end of epoch ``state.epoch``; returns its training record."""
    train, context, device = run.config.train, run.context, run.context.device
    epoch = state.epoch
    memory_format = torch.channels_last_3d if train.channels_last else torch.contiguous_format
    steps_in_epoch = (
        len(loader) if train.max_steps_per_epoch is None else min(len(loader), train.max_steps_per_epoch)
    )
    first_step = state.step_in_epoch
    progress = tqdm(
        islice(loader, first_step, steps_in_epoch),
        total=steps_in_epoch - first_step,
        disable=not context.is_main,
        desc=f"epoch {epoch}",
    )
    sums: dict[str, float] = {}
    volumes, start = 0, time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step, batch in enumerate(progress, start=first_step):
        images = batch["image"].to(device, non_blocking=True).to(memory_format=memory_format)
        logs = train_step(state, loss, images, stage == "gan", train, run.amp_dtype, context)
        state.step_in_epoch = step + 1
        if logs is None:
            log.warning(
                "epoch %d step %d: non-finite loss or gradient — step skipped (%d in a row, %d in all)",
                epoch,
                step,
                state.consecutive_nonfinite,
                state.skipped_steps,
            )
            if state.consecutive_nonfinite >= train.max_consecutive_nonfinite:
                raise NonFiniteTrainingError(
                    f"{state.consecutive_nonfinite} consecutive steps had NaN/Inf losses or gradients (epoch "
                    f"{epoch}, step {step}); training stopped. The last good checkpoint is {run.last_path}. Lower "
                    "the learning rate, check the data with `python dataset.py --check`, or use train.amp=none."
                )
            continue
        values = {name: value.item() for name, value in logs.items()}
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value
        volumes += images.shape[0] * context.world_size
        progress.set_postfix(
            loss=f"{values['loss']:.4f}",
            recon=f"{values['recon']:.4f}",
            vol_s=f"{volumes / (time.perf_counter() - start):.2f}",
        )
        if run.writer is not None and state.global_step % train.log_every_steps == 0:
            for name, value in values.items():
                run.writer.add_scalar(f"train_step/{name}", value, state.global_step)
        every = train.checkpoint_every_steps
        if every and state.global_step % every == 0 and step + 1 < steps_in_epoch:
            write_checkpoint(state, run, stage)
    elapsed = time.perf_counter() - start
    steps_done = max(1, steps_in_epoch - first_step)
    return {
        "epoch": epoch,
        "stage": stage,
        "global_step": state.global_step,
        **{f"train/{name}": value / steps_done for name, value in sums.items()},
        "train/volumes_per_s": volumes / elapsed if elapsed > 0 else 0.0,
        "train/peak_memory_gb": peak_memory_gb(device),
        "train/skipped_steps": state.skipped_steps,
    }


def write_checkpoint(state: TrainState, run: Run, stage: str) -> None:
    """``last.pt`` from ``state`` (collective under DDP; rank 0 writes)."""
    latent_stats = state.history[-1].get("latent_stats") if state.history else None
    payload = training_checkpoint(state, run.config, run.context, stage, latent_stats)
    if run.context.is_main:
        save_checkpoint(payload, run.last_path)


def end_of_epoch(
    state: TrainState, run: Run, record: dict[str, Any], val_set: dataset.VolumeDataset, lpips: nn.Module
) -> None:
    """Validate (every ``val_every`` epochs and at the end), keep the best model, log, checkpoint, metrics.csv."""
    train, context, epoch = run.config.train, run.context, record["epoch"]
    if (epoch + 1) % train.val_every == 0 or epoch + 1 == train.num_epochs:
        val_metrics, latent_stats, preview = validate(
            state.vae, val_set, lpips, run.config, context, run.amp_dtype
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
                        state.vae,
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
        log.info(
            "epoch %d: val PSNR %.2f dB (brain %.2f), SSIM %.4f (brain %.4f), latent std %.3f%s",
            epoch,
            record["val/psnr"],
            record["val/psnr_brain"],
            record["val/ssim"],
            record["val/ssim_brain"],
            record["val/latent_std"],
            " — new best" if improved else "",
        )
    state.history.append(record)
    if context.is_main:
        for name, value in record.items():
            if isinstance(value, int | float) and name not in ("epoch", "global_step"):
                run.writer.add_scalar(name, value, state.global_step)
    log.info(
        "epoch %d done: %.2f volumes/s, peak memory %.2f GiB, %d skipped steps",
        epoch,
        record["train/volumes_per_s"],
        record["train/peak_memory_gb"],
        state.skipped_steps,
    )
    state.epoch, state.step_in_epoch = epoch + 1, 0
    write_checkpoint(state, run, record["stage"])
    if context.is_main:  # after the checkpoint, from its history: a resumed run never repeats a row
        write_metrics_csv(run.run_dir / "metrics.csv", state.history)


@torch.no_grad()
def validate(
    vae: torch.nn.Module,
    val_set: dataset.VolumeDataset,
    lpips: torch.nn.Module,
    config: Config,
    context: DistributedContext,
    amp_dtype: torch.dtype | None,
) -> tuple[dict[str, float], dict[str, Any], dict[str, torch.Tensor]]:
    """Full-volume validation, sharded across ranks and reduced.

    Returns:
        (mean metrics named ``val/<metric>``, latent statistics of mu, one preview {input, reconstruction}).
    """
    vae.eval()
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros(1, dtype=torch.float64)
    latent_stats = LatentStatistics(config.model.latent_channels)
    preview: dict[str, torch.Tensor] = {}
    indices = list(range(context.rank, len(val_set), context.world_size))
    for start in range(0, len(indices), config.train.batch_size):
        items = [val_set[i] for i in indices[start : start + config.train.batch_size]]
        images = torch.stack([item["image"] for item in items]).to(context.device)
        masks = torch.stack([item["mask"] for item in items]).to(context.device)
        with autocast(context.device, amp_dtype):
            mu, sigma = vae.encode(images)
            recon = vae.decode(mu, spatial_shape=tuple(images.shape[2:]))
        values = image_metrics(recon, images, masks, lpips=lpips)
        values["kl"] = kl_divergence(mu, sigma).cpu()
        for name, value in values.items():
            sums[name] = sums.get(name, torch.zeros(1, dtype=torch.float64)) + value.double().sum()
        count += len(items)
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
    means["val/scale_factor"] = summary["scale_factor"]
    vae.train()
    return means, summary, preview


# ------------------------------------------------------------------------------------------- reporting


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per finished epoch (nested values such as latent statistics left out), written atomically."""
    rows = [{k: v for k, v in record.items() if not isinstance(v, dict)} for record in history]
    temporary = path.with_name(f".{path.name}.tmp")
    pd.DataFrame(rows).to_csv(temporary, index=False)
    os.replace(temporary, path)


def verify_identical_weights(module: torch.nn.Module, context: DistributedContext) -> None:
    """DDP sanity check: every rank must end with the same weights (compares per-tensor sums)."""
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(context.device)
    gathered = [torch.zeros_like(checksum) for _ in range(context.world_size)]
    dist.all_gather(gathered, checksum)
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError("DDP ranks ended with different weights: the run is not trustworthy")
    log.info("weights identical on all %d ranks", context.world_size)


# ------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config_file, args.overrides)
    train = config.train
    if train.init_from is not None and args.resume is None:
        check_init_from(train.init_from)  # a mistyped path fails before any set-up
    context = setup_distributed(train.device)
    seed_everything(train.seed + context.rank)
    run = open_run(config, context, args.resume)

    loader, val_set, shuffle_generator = make_loaders(config, context)
    log.info("train: %d volumes, val: %d volumes", len(loader.dataset), len(val_set))
    state = build_state(config, context.device)
    if train.init_from is not None and run.resume_path is None:
        kind = init_vae_weights(state.vae, train.init_from, config.model)
        log.info("initialised the VAE from %s (%s)", train.init_from, kind)
    elif train.init_from is not None:
        log.info(
            "train.init_from %s not applied: --resume continues with the weights of its checkpoint",
            train.init_from,
        )
    lpips = build_perceptual_loss(config.perceptual).to(context.device)
    log.info("perceptual loss: %s", lpips.description)
    loss = VAEGANLoss.from_config(config, lpips)

    if run.resume_path is not None:
        if not resume(state, run.resume_path, config, context):
            log.warning("resuming with a different world size: RNG streams restart from the seed")
        log.info(
            "resumed %s at epoch %d, step %d (global step %d)",
            run.resume_path,
            state.epoch,
            state.step_in_epoch,
            state.global_step,
        )
    wrap_for_training(state, train, context)
    if context.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # written only now, after a --resume was accepted: a refused resume leaves the run's files alone
        (run.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        # purge_step drops events a killed run logged after its last checkpoint (the x-axis is global_step)
        run.writer = SummaryWriter(
            str(run.run_dir), purge_step=state.global_step if run.resume_path else None
        )

    state.vae_step.train()
    stage = None
    while state.epoch < train.num_epochs:
        new_stage = "gan" if state.epoch >= train.gan_start_epoch else "pretrain"
        if new_stage != stage:
            log.info("epoch %d: stage %s", state.epoch, new_stage)
        stage = new_stage
        # the shuffle order is a function of (seed, epoch), so a resumed epoch replays the same batches
        shuffle_generator.manual_seed(train.seed * 1_000_003 + state.epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(state.epoch)
        loader.dataset.set_epoch(state.epoch)
        record = train_epoch(state, run, loss, loader, stage)
        end_of_epoch(state, run, record, val_set, lpips)

    if context.is_distributed:
        verify_identical_weights(state.vae, context)
        verify_identical_weights(state.discriminator, context)
    if run.writer is not None:
        run.writer.close()
    cleanup_distributed()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, CheckpointError, dataset.DataError, NonFiniteTrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
