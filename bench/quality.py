"""Reconstruction quality on real IXI brains: our recipe vs a MONAI-recipe baseline at the same budget.

    python bench/quality.py --steps 300 [--config configs/cpu.json] [--out bench/results/quality]

* Ours: ``train.py`` with ``--config`` (default: the CPU preset) on ``--train_csv`` for ``--steps`` optimiser
  steps, then ``infer.py`` on ``--val_csv`` writes the per-subject metrics table used here.
* Baseline: MONAI ``AutoencoderKL`` with the same channels / res blocks / latent channels, trained with MAISI's
  loss recipe (L1 + 1e-7·KL + 0.1·adversarial, MONAI ``PatchDiscriminator`` + least-squares
  ``PatchAdversarialLoss`` from the first step), same data, preprocessing, augmentation, batch size, optimiser,
  learning rate, precision and number of steps. MONAI's ``PerceptualLoss`` needs downloaded weights, so the
  baseline has no perceptual term. Inputs are zero-padded to a multiple of the downsampling factor and outputs
  cropped back (MONAI would otherwise return a smaller volume).
* Both are evaluated on the same preprocessed validation volumes with ``metrics.image_metrics`` (whole volume
  and in-brain, brain = the CSV's mask). Writes ``quality.json``, ``quality.md`` (table), per-subject CSVs
  and ``quality.png`` (input / ours / baseline / |differences| for one validation subject).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import dataset  # noqa: E402
import infer  # noqa: E402
import train  # noqa: E402
from checkpoints import load_vae  # noqa: E402
from config import Config, load_config  # noqa: E402
from losses import kl_divergence  # noqa: E402
from metrics import image_metrics  # noqa: E402
from model import build_perceptual_loss  # noqa: E402
from plotting import orthogonal_slices_figure  # noqa: E402
from utils import autocast, resolve_amp_dtype, seed_everything  # noqa: E402

IXI = REPO_ROOT.parent / "shared" / "data" / "ixi"
REPORTED = ("psnr", "psnr_brain", "ssim", "ssim_brain", "ms_ssim", "ms_ssim_brain", "lpips", "lpips_brain")


def padded_to(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Zero-pad (B, C, *S) at the high end of each axis to a multiple of ``factor``."""
    pads = []
    for size in reversed(x.shape[2:]):
        pads += [0, (-size) % factor]
    return F.pad(x, pads)


def train_baseline(
    config: Config,
    out_dir: Path,
    steps: int | None = None,
    time_budget_s: float | None = None,
    device: torch.device | None = None,
    num_workers: int | None = None,
) -> tuple[AutoencoderKL, float, int]:
    """MONAI AutoencoderKL + PatchDiscriminator with MAISI's loss recipe, for ``steps`` optimiser steps and/or
    ``time_budget_s`` seconds of wall clock (whichever ends first; the clock starts before the data set-up, as
    ``train.py``'s does). Returns (model in eval mode, seconds, steps done).

    ``device`` defaults to the CPU, ``num_workers`` to ``data.num_workers``. Each step logs its losses with
    ``.item()`` (one host synchronisation per step, as MONAI's tutorial loops do), so the clock is honest.
    """
    if steps is None and time_budget_s is None:
        raise ValueError("give steps, time_budget_s or both")
    start = time.perf_counter()
    seed_everything(config.train.seed)
    device = device or torch.device("cpu")
    amp_dtype = resolve_amp_dtype(config.train.amp, device)
    model_cfg = config.model
    autoencoder = AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=tuple(model_cfg.channels),
        latent_channels=model_cfg.latent_channels,
        num_res_blocks=tuple(model_cfg.num_res_blocks),
        attention_levels=tuple(model_cfg.attention_levels),
        norm_num_groups=model_cfg.norm_num_groups,
        norm_eps=model_cfg.norm_eps,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    ).to(device)
    discriminator = PatchDiscriminator(
        spatial_dims=3,
        num_layers_d=config.discriminator.num_layers,
        channels=config.discriminator.channels,
        in_channels=1,
        out_channels=1,
        norm="INSTANCE",
    ).to(device)
    adversarial = PatchAdversarialLoss(criterion="least_squares")
    optimizer_g = torch.optim.AdamW(
        autoencoder.parameters(), lr=config.train.learning_rate, weight_decay=config.train.weight_decay
    )
    optimizer_d = torch.optim.AdamW(
        discriminator.parameters(),
        lr=config.discriminator.learning_rate,
        weight_decay=config.train.weight_decay,
    )
    frame = dataset.preflight(dataset.read_split(config.data.train_csv))
    augmentation = config.augmentation if config.augmentation.enabled else None
    train_set = dataset.build_dataset(
        frame, config.preprocessing, augmentation, cache="memory", seed=config.train.seed
    )
    generator = torch.Generator().manual_seed(config.train.seed)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.train.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.data.num_workers if num_workers is None else num_workers,
        pin_memory=device.type == "cuda",
    )
    factor = 2 ** (len(model_cfg.channels) - 1)
    step, epoch = 0, 0

    def done() -> bool:
        over_time = time_budget_s is not None and time.perf_counter() - start >= time_budget_s
        return over_time or (steps is not None and step >= steps)

    log = open(out_dir / "baseline_train.log", "w")  # noqa: SIM115
    while not done():
        train_set.set_epoch(epoch)
        for batch in loader:
            images = padded_to(batch["image"].to(device, non_blocking=True), factor)
            with autocast(device, amp_dtype):
                recon, mu, sigma = autoencoder(images)
                l1 = F.l1_loss(recon.float(), images)
                kl = kl_divergence(mu, sigma).mean()
                generator_adv = adversarial(
                    discriminator(recon.float())[-1], target_is_real=True, for_discriminator=False
                )
                loss_g = l1 + 1e-7 * kl + 0.1 * generator_adv
            optimizer_g.zero_grad(set_to_none=True)
            loss_g.backward()
            torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), config.train.grad_clip or math.inf)
            optimizer_g.step()
            with autocast(device, amp_dtype):
                loss_d = 0.5 * (
                    adversarial(
                        discriminator(recon.detach().float())[-1],
                        target_is_real=False,
                        for_discriminator=True,
                    )
                    + adversarial(discriminator(images)[-1], target_is_real=True, for_discriminator=True)
                )
            optimizer_d.zero_grad(set_to_none=True)
            loss_d.backward()
            optimizer_d.step()
            step += 1
            print(
                f"baseline step {step}: l1 {l1.item():.4f} kl {kl.item():.1f} adv {generator_adv.item():.3f} "
                f"d {loss_d.item():.3f} ({time.perf_counter() - start:.1f} s)",
                file=log,
                flush=True,
            )
            if done():
                break
        epoch += 1
    log.close()
    return autoencoder.eval(), time.perf_counter() - start, step


@torch.no_grad()
def evaluate_baseline(
    autoencoder: AutoencoderKL, config: Config, val_csv: str, lpips, device: torch.device | None = None
) -> pd.DataFrame:
    """Per-subject metrics of the baseline on the preprocessed validation volumes (mean latent), computed on
    ``device`` (default: the CPU; ``autoencoder`` and ``lpips`` must live there)."""
    device = device or torch.device("cpu")
    factor = 2 ** (len(config.model.channels) - 1)
    rows = []
    frame = dataset.read_split(val_csv)
    for image, mask, subject in zip(frame["image"], frame["mask"], frame["subject_id"], strict=True):
        volume = dataset.preprocess_volume(image, config.preprocessing, mask)
        target, brain = volume.image[None].to(device), volume.mask[None].to(device)
        with autocast(device, resolve_amp_dtype(config.train.amp, device)):
            mu, _ = autoencoder.encode(padded_to(target, factor))
            recon = autoencoder.decode(mu)
        recon = recon.float()[..., : target.shape[2], : target.shape[3], : target.shape[4]]
        values = image_metrics(recon, target, brain, lpips=lpips)
        rows.append({"subject_id": subject, **{k: float(v[0]) for k, v in values.items()}})
    return pd.DataFrame(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps for each model (the budget)")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "cpu.json"))
    parser.add_argument("--train_csv", default=str(IXI / "train.csv"))
    parser.add_argument("--val_csv", default=str(IXI / "val.csv"))
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "results" / "quality"))
    parser.add_argument("--skip_ours", action="store_true", help="reuse an earlier run of ours in --out")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.train_csv={json.dumps(args.train_csv)}",
        f"data.val_csv={json.dumps(args.val_csv)}",
        "data.demo_dir=null",
    ]
    config = load_config(args.config, overrides)
    steps_per_epoch = math.ceil(len(dataset.read_split(args.train_csv)) / config.train.batch_size)
    epochs = math.ceil(args.steps / steps_per_epoch)
    gan_start = math.floor(epochs * config.train.gan_start_epoch / config.train.num_epochs)

    # ---- ours: train.py, then infer.py's per-subject table
    run_name = "quality_ours"
    checkpoint = out_dir / "best_runs" / run_name / "best_model.pt"
    ours_seconds = float("nan")
    if not args.skip_ours:
        start = time.perf_counter()
        train.main(
            [
                "--config_file",
                args.config,
                *sum((["--set", o] for o in overrides), []),
                "--set",
                f"train.run_name={run_name}",
                "--set",
                f"train.num_epochs={epochs}",
                "--set",
                f"train.gan_start_epoch={gan_start}",
                "--set",
                f"train.val_every={epochs}",
                "--set",
                f"train.max_steps_per_epoch={steps_per_epoch}",
                "--set",
                f"train.runs_dir={json.dumps(str(out_dir / 'runs'))}",
                "--set",
                f"train.best_runs_dir={json.dumps(str(out_dir / 'best_runs'))}",
            ]
        )
        ours_seconds = time.perf_counter() - start
    assert (
        infer.main(
            [
                "--model_checkpoint",
                str(checkpoint),
                "--input_data",
                args.val_csv,
                "--output_dir",
                str(out_dir / "ours_val"),
                "--amp",
                config.train.amp,
            ]
        )
        == 0
    )
    ours = pd.read_csv(out_dir / "ours_val" / "metrics.csv")

    # ---- baseline
    baseline_model, baseline_seconds, _ = train_baseline(config, out_dir, steps=epochs * steps_per_epoch)
    lpips = build_perceptual_loss(config.perceptual)
    baseline = evaluate_baseline(baseline_model, config, args.val_csv, lpips)
    baseline.to_csv(out_dir / "baseline_val_metrics.csv", index=False)

    # ---- table
    summary = {
        "settings": {
            "config": args.config,
            "steps": epochs * steps_per_epoch,
            "epochs": epochs,
            "gan_start_epoch": gan_start,
            "train_csv": args.train_csv,
            "val_csv": args.val_csv,
            "amp": config.train.amp,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"),
            "lpips": lpips.description,
        },
        "ours": {m: [float(ours[m].mean()), float(ours[m].std())] for m in REPORTED},
        "baseline": {m: [float(baseline[m].mean()), float(baseline[m].std())] for m in REPORTED},
        "seconds": {"ours": ours_seconds, "baseline": baseline_seconds},
    }
    (out_dir / "quality.json").write_text(json.dumps(summary, indent=2))
    lines = ["| metric | ours | MONAI-recipe baseline |", "|---|---|---|"]
    for m in REPORTED:
        lines.append(
            f"| {m} | {summary['ours'][m][0]:.4f} ± {summary['ours'][m][1]:.4f} "
            f"| {summary['baseline'][m][0]:.4f} ± {summary['baseline'][m][1]:.4f} |"
        )
    lines.append(f"| train wall-clock (s) | {ours_seconds:.0f} | {baseline_seconds:.0f} |")
    (out_dir / "quality.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary["settings"], indent=2))
    print("\n".join(lines))

    # ---- figure: first validation subject
    frame = dataset.read_split(args.val_csv)
    volume = dataset.preprocess_volume(frame["image"][0], config.preprocessing, frame["mask"][0])
    vae, _, _ = load_vae(checkpoint)
    factor = 2 ** (len(config.model.channels) - 1)
    with torch.no_grad():
        ours_recon = vae.reconstruct(volume.image[None]).float().clamp(0, 1)[0]
        mu, _ = baseline_model.encode(padded_to(volume.image[None], factor))
        base_recon = (
            baseline_model.decode(mu)
            .float()
            .clamp(0, 1)[0][:, : volume.image.shape[1], : volume.image.shape[2], : volume.image.shape[3]]
        )
    diff_scale = {
        "|input − ours|": (volume.image - ours_recon).abs(),
        "|input − baseline|": (volume.image - base_recon).abs(),
    }
    orthogonal_slices_figure(
        {"input": volume.image, "ours": ours_recon, "baseline": base_recon},
        out_dir / "recons.png",
        title=f"{frame['subject_id'][0]} (IXI val), {epochs * steps_per_epoch} steps each",
    )
    orthogonal_slices_figure(
        diff_scale, out_dir / "differences.png", title="absolute differences (one shared colour scale)"
    )
    print(f"figures: {out_dir / 'recons.png'}, {out_dir / 'differences.png'}")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
