"""Train the 3D KL-VAE: pretrain (reconstruction + β·KL + perceptual), then GAN (+ adversarial term).

    python train.py --config_file config.json [--set train.num_epochs=2 ...] [--resume [PATH]]
    torchrun --nproc_per_node 2 train.py --config_file config.json          # DDP (NCCL on GPU, gloo on CPU)

Reads top to bottom: config → distributed set-up → run folder → data → models and optimisers → resume →
loop (train step, validation, checkpoint, best model). Only rank 0 writes logs and checkpoints.

Losses (per batch): recon = mean over voxels of MSE (or L1); KL = KL(N(mu, sigma²) || N(0, 1)) summed over
latent elements, averaged over the batch (MONAI/MAISI convention, so their β values transfer); perceptual =
LPIPS3D; adversarial = PatchGAN generator loss, fixed weight or VQGAN-style adaptive weight.
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
from itertools import islice
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._functorch import config as functorch_config
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

import dataset
from config import Config, ConfigError, load_config
from metrics import LatentStatistics, image_metrics, kl_divergence
from model import (
    CHECKPOINT_FORMAT,
    build_discriminator,
    build_perceptual_loss,
    build_vae,
    inference_checkpoint,
    model_config_differences,
)
from model.discriminator import (
    adaptive_adversarial_weight,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
)
from plotting import orthogonal_slices_figure
from utils import (
    CheckpointError,
    DistributedContext,
    autocast,
    cleanup_distributed,
    get_rng_state,
    load_checkpoint,
    main_process_first,
    resolve_amp_dtype,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    setup_distributed,
)

log = logging.getLogger("train")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with NaN/Inf losses or gradients."""


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


def setup_logging(run_dir: Path | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers, force=True)


def make_loaders(
    config: Config, context: DistributedContext
) -> tuple[DataLoader, dataset.VolumeDataset, Any]:
    """Training loader (shuffled, augmented, sharded across ranks) and the validation set (not augmented)."""
    data = config.data
    with main_process_first(context):
        dataset.ensure_demo_data(data)
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


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The bare module behind DDP / torch.compile wrappers."""
    module = module.module if isinstance(module, DistributedDataParallel) else module
    return getattr(module, "_orig_mod", module)


def all_ranks_agree(flag: bool, context: DistributedContext) -> bool:
    """True only if ``flag`` is True on every rank (so that all ranks skip a step together)."""
    if not context.is_distributed:
        return flag
    tensor = torch.tensor([0.0 if flag else 1.0], device=context.device)
    dist.all_reduce(tensor)
    return float(tensor) == 0.0


def verify_identical_weights(module: torch.nn.Module, context: DistributedContext) -> None:
    """DDP sanity check: every rank must end with the same weights (compares per-tensor sums)."""
    checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(context.device)
    gathered = [torch.zeros_like(checksum) for _ in range(context.world_size)]
    dist.all_gather(gathered, checksum)
    if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
        raise RuntimeError("DDP ranks ended with different weights: the run is not trustworthy")
    log.info("weights identical on all %d ranks", context.world_size)


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # ---- config
    config = load_config(args.config_file, args.overrides)
    train = config.train

    # ---- distributed set-up, seeding, precision
    context = setup_distributed(train.device)
    device = context.device
    amp_dtype = resolve_amp_dtype(train.amp, device)
    seed_everything(train.seed + context.rank)

    # ---- run folder (a new run never overwrites an old one; --resume continues it)
    run_dir = Path(train.runs_dir) / train.run_name
    checkpoint_dir = run_dir / "checkpoints"
    last_path = checkpoint_dir / "last.pt"
    resume_path = None
    if args.resume is not None:
        resume_path = last_path if args.resume == "auto" else Path(args.resume)
        if not resume_path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {resume_path}")
    elif last_path.exists():
        raise CheckpointError(
            f"run {train.run_name!r} already has {last_path}; pass --resume to continue it, or choose another "
            "train.run_name (nothing was overwritten)"
        )
    if context.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "previews").mkdir(exist_ok=True)
    setup_logging(run_dir if context.is_main else None)
    log.info("run %s on %s (world size %d), amp=%s", train.run_name, device, context.world_size, amp_dtype)

    # ---- data
    loader, val_set, shuffle_generator = make_loaders(config, context)
    log.info("train: %d volumes, val: %d volumes", len(loader.dataset), len(val_set))

    # ---- models, losses, optimisers
    vae = build_vae(config.model, use_checkpointing=train.gradient_checkpointing).to(device)
    discriminator = build_discriminator(config.discriminator, config.model.out_channels).to(device)
    lpips = build_perceptual_loss(config.perceptual).to(device)
    log.info("perceptual loss: %s", lpips.description)
    memory_format = torch.channels_last_3d if train.channels_last else torch.contiguous_format
    vae, discriminator = vae.to(memory_format=memory_format), discriminator.to(memory_format=memory_format)
    optimizer_g = torch.optim.AdamW(vae.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    optimizer_d = torch.optim.AdamW(
        discriminator.parameters(), lr=config.discriminator.learning_rate, weight_decay=train.weight_decay
    )
    use_scaler = amp_dtype == torch.float16
    scaler_g = torch.amp.GradScaler(device.type, enabled=use_scaler)
    scaler_d = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # ---- resume
    start_epoch, step_in_epoch, global_step = 0, 0, 0
    history: list[dict[str, Any]] = []
    best_value: float | None = None
    skipped_steps = 0
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        if state.get("format") != CHECKPOINT_FORMAT or "optimizer_g" not in state:
            raise CheckpointError(
                f"{resume_path} is not a training checkpoint of this project (cannot resume)"
            )
        differences = model_config_differences(state["config"]["model"], config.to_dict()["model"])
        if differences:
            raise ConfigError(
                f"{resume_path} was trained with another model config: " + "; ".join(differences)
            )
        vae.load_state_dict(state["vae"])
        discriminator.load_state_dict(state["discriminator"])
        optimizer_g.load_state_dict(state["optimizer_g"])
        optimizer_d.load_state_dict(state["optimizer_d"])
        scaler_g.load_state_dict(state["scaler_g"])
        scaler_d.load_state_dict(state["scaler_d"])
        start_epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        history, best_value, skipped_steps = state["history"], state["best_value"], state["skipped_steps"]
        if state["world_size"] == context.world_size:
            set_rng_state(state["rng"][context.rank])
        else:
            log.warning("resuming with a different world size: RNG streams restart from the seed")
        log.info(
            "resumed %s at epoch %d, step %d (global step %d)",
            resume_path,
            start_epoch,
            step_in_epoch,
            global_step,
        )

    # ---- wrappers (compile, DDP) around the bare modules that checkpoints hold
    vae_bare, discriminator_bare = vae, discriminator
    if train.compile:
        if train.adaptive_adversarial_weight:
            # The adaptive weight differentiates the generator loss twice (retain_graph=True), which compiled
            # backward functions that donate their saved buffers refuse; keep those buffers instead.
            functorch_config.donated_buffer = False
        # Static shapes: preprocessing fixes the volume shape, so only a smaller last batch recompiles. Dynamic
        # shapes (what dynamo switches to on a second shape) failed to lower in inductor here.
        vae = torch.compile(vae, dynamic=False)
    if context.is_distributed:
        vae = DistributedDataParallel(vae, device_ids=[device.index] if device.type == "cuda" else None)
        discriminator = DistributedDataParallel(
            discriminator, device_ids=[device.index] if device.type == "cuda" else None
        )

    writer = None
    if context.is_main:
        from torch.utils.tensorboard import SummaryWriter

        # written only now, after a --resume was accepted: a refused resume leaves the run's files alone
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        # purge_step drops events a killed run logged after its last checkpoint (the x-axis is global_step)
        writer = SummaryWriter(log_dir=str(run_dir), purge_step=global_step if resume_path else None)

    def checkpoint_payload(epoch: int, step: int, stage: str, latent_stats: dict[str, Any] | None) -> dict:
        rng_states: list[Any] = [get_rng_state()]
        if context.is_distributed:
            rng_states = [None] * context.world_size
            dist.all_gather_object(rng_states, get_rng_state())
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config.to_dict(),
            "vae": vae_bare.state_dict(),
            "discriminator": discriminator_bare.state_dict(),
            "optimizer_g": optimizer_g.state_dict(),
            "optimizer_d": optimizer_d.state_dict(),
            "scaler_g": scaler_g.state_dict(),
            "scaler_d": scaler_d.state_dict(),
            "epoch": epoch,
            "step_in_epoch": step,
            "global_step": global_step,
            "stage": stage,
            "rng": rng_states,
            "world_size": context.world_size,
            "history": history,
            "best_value": best_value,
            "skipped_steps": skipped_steps,
            "latent_stats": latent_stats,
        }

    def write_checkpoint(epoch: int, step: int, stage: str) -> None:
        payload = checkpoint_payload(epoch, step, stage, history[-1].get("latent_stats") if history else None)
        if context.is_main:
            save_checkpoint(payload, last_path)

    # ---- loop
    consecutive_nonfinite = 0
    recon_criterion = F.mse_loss if train.recon_loss == "mse" else F.l1_loss
    vae.train()
    stage = "pretrain"
    for epoch in range(start_epoch, train.num_epochs):
        new_stage = "gan" if epoch >= train.gan_start_epoch else "pretrain"
        if new_stage != stage or epoch == start_epoch:
            log.info("epoch %d: stage %s", epoch, new_stage)
        stage = new_stage
        # the shuffle order is a function of (seed, epoch), so a resumed epoch replays the same batches
        shuffle_generator.manual_seed(train.seed * 1_000_003 + epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        steps_in_epoch = (
            len(loader) if train.max_steps_per_epoch is None else min(len(loader), train.max_steps_per_epoch)
        )
        first_step = step_in_epoch if epoch == start_epoch else 0
        batches = islice(loader, first_step, steps_in_epoch)
        progress = tqdm(
            batches, total=steps_in_epoch - first_step, disable=not context.is_main, desc=f"epoch {epoch}"
        )
        epoch_sums: dict[str, float] = {}
        epoch_volumes, epoch_start = 0, time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step, batch in enumerate(progress, start=first_step):
            images = batch["image"].to(device, non_blocking=True).to(memory_format=memory_format)
            # -- generator (VAE) step
            with autocast(device, amp_dtype):
                recon, mu, sigma = vae(images)
                recon_loss = recon_criterion(recon.float(), images.float())
                kl_loss = kl_divergence(mu, sigma).mean()
                perceptual_loss = (
                    lpips(recon, images).mean() if train.perceptual_weight > 0 else recon_loss.new_zeros(())
                )
                loss_g = recon_loss + train.beta * kl_loss + train.perceptual_weight * perceptual_loss
                adversarial_loss = recon_loss.new_zeros(())
                adversarial_scale = recon_loss.new_zeros(())
                if stage == "gan":
                    discriminator_bare.requires_grad_(False)
                    adversarial_loss = generator_adversarial_loss(
                        discriminator_bare(recon.float()), kind=config.discriminator.loss
                    )
                    discriminator_bare.requires_grad_(True)
                    adversarial_scale = recon_loss.new_tensor(train.adversarial_weight)
                    if train.adaptive_adversarial_weight:
                        adversarial_scale = adversarial_scale * adaptive_adversarial_weight(
                            recon_loss + train.perceptual_weight * perceptual_loss,
                            adversarial_loss,
                            vae_bare.last_decoder_layer_weight,
                        )
                    loss_g = loss_g + adversarial_scale * adversarial_loss
            optimizer_g.zero_grad(set_to_none=True)
            finite = all_ranks_agree(bool(torch.isfinite(loss_g)), context)
            if finite:
                scaler_g.scale(loss_g).backward()
                scaler_g.unscale_(optimizer_g)
                grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), train.grad_clip or math.inf)
                finite = all_ranks_agree(bool(torch.isfinite(grad_norm)), context)
            if not finite:
                consecutive_nonfinite += 1
                skipped_steps += 1
                optimizer_g.zero_grad(set_to_none=True)
                log.warning(
                    "epoch %d step %d: non-finite loss or gradient — step skipped (%d in a row, %d in all)",
                    epoch,
                    step,
                    consecutive_nonfinite,
                    skipped_steps,
                )
                if use_scaler:
                    scaler_g.update()
                if consecutive_nonfinite >= train.max_consecutive_nonfinite:
                    raise NonFiniteTrainingError(
                        f"{consecutive_nonfinite} consecutive steps had NaN/Inf losses or gradients (epoch {epoch}, "
                        f"step {step}); training stopped. The last good checkpoint is {last_path}. Lower the "
                        "learning rate, check the data with `python dataset.py --check`, or use train.amp=none."
                    )
                continue
            consecutive_nonfinite = 0
            scaler_g.step(optimizer_g)
            scaler_g.update()

            # -- discriminator step
            loss_d = recon_loss.new_zeros(())
            if stage == "gan":
                with autocast(device, amp_dtype):
                    # one pass over real and fake together: DDP reduces each parameter's gradient once
                    logits = discriminator(torch.cat([images.float(), recon.detach().float()]))
                    real_logits, fake_logits = logits.chunk(2)
                    loss_d = discriminator_adversarial_loss(
                        real_logits, fake_logits, kind=config.discriminator.loss
                    )
                optimizer_d.zero_grad(set_to_none=True)
                if all_ranks_agree(bool(torch.isfinite(loss_d)), context):
                    scaler_d.scale(loss_d).backward()
                    scaler_d.unscale_(optimizer_d)
                    torch.nn.utils.clip_grad_norm_(discriminator.parameters(), train.grad_clip or math.inf)
                    scaler_d.step(optimizer_d)
                    scaler_d.update()
                else:
                    log.warning(
                        "epoch %d step %d: non-finite discriminator loss — discriminator step skipped",
                        epoch,
                        step,
                    )

            global_step += 1
            epoch_volumes += images.shape[0] * context.world_size
            losses = {
                "loss": loss_g.item(),
                "recon": recon_loss.item(),
                "kl": kl_loss.item(),
                "perceptual": perceptual_loss.item(),
                "adversarial": adversarial_loss.item(),
                "adversarial_weight": float(adversarial_scale),
                "discriminator": loss_d.item(),
            }
            for name, value in losses.items():
                epoch_sums[name] = epoch_sums.get(name, 0.0) + value
            elapsed = time.perf_counter() - epoch_start
            progress.set_postfix(
                loss=f"{losses['loss']:.4f}",
                recon=f"{losses['recon']:.4f}",
                vol_s=f"{epoch_volumes / elapsed:.2f}",
            )
            if writer is not None and global_step % train.log_every_steps == 0:
                for name, value in losses.items():
                    writer.add_scalar(f"train_step/{name}", value, global_step)
            if (
                train.checkpoint_every_steps
                and global_step % train.checkpoint_every_steps == 0
                and step + 1 < steps_in_epoch
            ):
                write_checkpoint(epoch, step + 1, stage)

        # -- end of epoch: throughput, validation, best model, checkpoint
        elapsed = time.perf_counter() - epoch_start
        steps_done = max(1, steps_in_epoch - first_step)
        record: dict[str, Any] = {
            "epoch": epoch,
            "stage": stage,
            "global_step": global_step,
            **{f"train/{name}": value / steps_done for name, value in epoch_sums.items()},
            "train/volumes_per_s": epoch_volumes / elapsed if elapsed > 0 else 0.0,
            "train/peak_memory_gb": peak_memory_gb(device),
            "train/skipped_steps": skipped_steps,
        }
        if (epoch + 1) % train.val_every == 0 or epoch + 1 == train.num_epochs:
            val_metrics, latent_stats, preview = validate(
                vae_bare, val_set, lpips, config, context, amp_dtype
            )
            record.update(val_metrics)
            record["latent_stats"] = latent_stats
            if context.is_main:
                figure = orthogonal_slices_figure(
                    preview,
                    run_dir / "previews" / f"epoch_{epoch:04d}.png",
                    difference_of=("input", "reconstruction"),
                    title=f"{train.run_name} epoch {epoch}: PSNR {val_metrics['val/psnr']:.2f} dB",
                )
                writer.add_figure("val/preview", figure, global_step)
            if train.best_metric not in record:
                raise ConfigError(
                    f"train.best_metric {train.best_metric!r} is not a validation metric; available: "
                    f"{sorted(k for k in record if k.startswith('val/'))}"
                )
            value = record[train.best_metric]
            improved = best_value is None or (
                value > best_value if train.best_metric_mode == "max" else value < best_value
            )
            if improved:
                best_value = value
                if context.is_main:
                    best_dir = Path(train.best_runs_dir) / train.run_name
                    metrics = {k: v for k, v in record.items() if k != "latent_stats"}
                    save_checkpoint(
                        inference_checkpoint(
                            vae_bare, config, latent_stats, metrics, epoch=epoch, global_step=global_step
                        ),
                        best_dir / "best_model.pt",
                    )
                    (best_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
                    (best_dir / "metrics.json").write_text(json.dumps(record, indent=2))
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
        history.append(record)
        if context.is_main:
            for name, value in record.items():
                if isinstance(value, int | float) and name not in ("epoch", "global_step"):
                    writer.add_scalar(name, value, global_step)
        log.info(
            "epoch %d done: %.2f volumes/s, peak memory %.2f GiB, %d skipped steps",
            epoch,
            record["train/volumes_per_s"],
            record["train/peak_memory_gb"],
            skipped_steps,
        )
        write_checkpoint(epoch + 1, 0, stage)
        if context.is_main:  # after the checkpoint, from its history: a resumed run never repeats a row
            write_metrics_csv(run_dir / "metrics.csv", history)

    if context.is_distributed:
        verify_identical_weights(vae_bare, context)
        verify_identical_weights(discriminator_bare, context)
    if writer is not None:
        writer.close()
    cleanup_distributed()
    return 0


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per finished epoch (nested values such as latent statistics left out), written atomically."""
    rows = [{k: v for k, v in record.items() if not isinstance(v, dict)} for record in history]
    temporary = path.with_name(f".{path.name}.tmp")
    pd.DataFrame(rows).to_csv(temporary, index=False)
    os.replace(temporary, path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, CheckpointError, dataset.DataError, NonFiniteTrainingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
