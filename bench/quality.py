"""Time to quality: ``train.py`` for S seconds of wall clock vs a MONAI-recipe baseline for the same S seconds.

    python -m bench.quality [--seconds 180] [--config config.json] [--set section.key=value ...]
        [--train_csv ...] [--val_csv ...] [--device auto|cpu|cuda] [--baseline_workers N] [--out DIR] [--json PATH]

* Ours: ``train.py`` (:func:`bench.harness.train_run`) with ``--config`` on the two splits and
  ``train.time_budget_s=S``; ``train.val_every`` is set beyond the run (a ``--set`` can change it), so the budget
  goes to training and the one validation (the last row of its ``metrics.csv``) comes after it, as the
  baseline's evaluation does. Its clock starts before the data set-up.
* Baseline (:func:`train_baseline`): MONAI ``AutoencoderKL`` with the same channels / res blocks / latent
  channels, trained with MAISI's loss recipe (L1 + 1e-7·KL + 0.1·adversarial, MONAI ``PatchDiscriminator`` +
  least-squares ``PatchAdversarialLoss`` from the first step), same data, preprocessing, augmentation, batch
  size, optimiser, learning rate and precision, for S seconds on the same device, its clock also starting
  before its data set-up. MONAI's ``PerceptualLoss`` needs downloaded weights, so the baseline has no
  perceptual term. Inputs are zero-padded to a multiple of the downsampling factor and outputs cropped back.
  Evaluated by :func:`evaluate_baseline` (``metrics.image_metrics``, in-brain = the CSV's masks) on the
  validation split.

Writes ``--json`` (default ``<out>/time_to_quality.json``) after each of the two runs: seconds,
``val_psnr_brain`` / ``val_ssim_brain`` (ours), ``baseline_val_psnr_brain`` / ``baseline_val_ssim_brain``,
steps and wall clock of each, settings and machine. The step-budget study of BENCHMARKS.md §7 (ours evaluated
by ``infer.py``, figures) was this script's ``--steps`` mode, retired: see bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

import dataset
from bench import harness
from config import Config, load_config
from losses import kl_divergence
from metrics import image_metrics
from model import build_perceptual_loss
from utils import autocast, resolve_amp_dtype, resolve_device, seed_everything

BASELINE = "MONAI AutoencoderKL + PatchDiscriminator, L1 + 1e-7*KL + 0.1*LSGAN (bench/quality.py)"


def padded_to(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Zero-pad (B, C, *S) at the high end of each axis to a multiple of ``factor``."""
    pads = []
    for size in reversed(x.shape[2:]):
        pads += [0, (-size) % factor]
    return F.pad(x, pads)


def train_baseline(
    config: Config, out_dir: Path, time_budget_s: float, device: torch.device, num_workers: int | None
) -> tuple[AutoencoderKL, float, int]:
    """MONAI AutoencoderKL + PatchDiscriminator with MAISI's loss recipe on ``device`` for ``time_budget_s``
    seconds of wall clock (the clock starts before the data set-up, as ``train.py``'s does), ``num_workers``
    DataLoader workers (None: ``data.num_workers``). Returns (model in eval mode, seconds, steps done).

    Each step logs its losses with ``.item()`` to ``out_dir/baseline_train.log`` (one host synchronisation per
    step, as MONAI's tutorial loops do), so the clock is honest.
    """
    start = time.perf_counter()
    seed_everything(config.train.seed)
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
    least_squares = PatchAdversarialLoss(criterion="least_squares")

    def adversarial(volume: torch.Tensor, real: bool, for_discriminator: bool) -> torch.Tensor:
        """LSGAN loss of the discriminator's last output on ``volume`` (B, 1, D, H, W), target real or fake."""
        return least_squares(
            discriminator(volume)[-1], target_is_real=real, for_discriminator=for_discriminator
        )

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
    train_set = dataset.VolumeDataset(
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
        return time.perf_counter() - start >= time_budget_s

    log = open(out_dir / "baseline_train.log", "w")  # noqa: SIM115
    while not done():
        train_set.set_epoch(epoch)
        for batch in loader:
            images = padded_to(batch["image"].to(device, non_blocking=True), factor)
            with autocast(device, amp_dtype):
                recon, mu, sigma = autoencoder(images)
                l1 = F.l1_loss(recon.float(), images)
                kl = kl_divergence(mu, sigma).mean()
                generator_adv = adversarial(recon.float(), real=True, for_discriminator=False)
                loss_g = l1 + 1e-7 * kl + 0.1 * generator_adv
            optimizer_g.zero_grad(set_to_none=True)
            loss_g.backward()
            torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), config.train.grad_clip or math.inf)
            optimizer_g.step()
            with autocast(device, amp_dtype):
                fake = adversarial(recon.detach().float(), real=False, for_discriminator=True)
                loss_d = 0.5 * (fake + adversarial(images, real=True, for_discriminator=True))
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
    autoencoder: AutoencoderKL, config: Config, val_csv: str, lpips: torch.nn.Module, device: torch.device
) -> pd.DataFrame:
    """Per-subject metrics of the baseline on the preprocessed validation volumes (mean latent), computed on
    ``device`` (where ``autoencoder`` and ``lpips`` live)."""
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


def time_to_quality(args: argparse.Namespace) -> int:
    """Ours, then the baseline, for ``--seconds`` of wall clock each; ``--json`` rewritten after each."""
    device = resolve_device(args.device)
    json_path = args.json or args.out / "time_to_quality.json"
    overrides = [
        *harness.data_overrides(args.train_csv, args.val_csv),
        f"train.device={json.dumps(device.type)}",
        f"train.time_budget_s={args.seconds}",
        f"train.val_every={harness.NEVER}",
        *args.overrides,  # the caller's last: they may change val_every
    ]
    settings = {
        "config": args.config,
        "overrides": overrides,
        "device": str(device),
        "machine": harness.machine_info(device),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "baseline": BASELINE,
    }
    print("settings:", json.dumps(settings))
    result: dict[str, Any] = {"seconds": args.seconds, "ours": None, "baseline": None, "settings": settings}

    def write(name: str, values: dict[str, Any]) -> None:
        """Record run ``name`` (ours: ``val_*``, baseline: ``baseline_val_*``) and rewrite the JSON."""
        prefix = "" if name == "ours" else "baseline_"
        result.update({name: values, f"{name}_steps": values["steps"]})
        result.update({prefix + key: values[key] for key in ("val_psnr_brain", "val_ssim_brain")})
        harness.write_json(json_path, result)
        print(f"{name}: {json.dumps(values)}", flush=True)

    run = harness.train_run(args.config, overrides, args.out, f"ttq_ours_{time.strftime('%Y%m%d_%H%M%S')}")
    ours = harness.run_results(run.metrics_csv)  # the one validation: after the budget
    if "val_psnr_brain" not in ours:
        raise RuntimeError(f"{run.metrics_csv} has no validation row")
    history = pd.read_csv(run.metrics_csv)
    later_epochs = history[history["epoch"] > 0]["train/volumes_per_s"]
    ours.update(
        wall_s=run.wall_s,
        volumes_per_s_median_after_epoch_0=float(later_epochs.median()) if len(later_epochs) else None,
        stages=sorted(set(history["stage"])),
        metrics_csv=str(run.metrics_csv),
    )
    write("ours", ours)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    config = load_config(args.config, overrides)
    start = time.perf_counter()
    model, train_s, steps = train_baseline(config, args.out, args.seconds, device, args.baseline_workers)
    lpips = build_perceptual_loss(config.perceptual).to(device)
    table = evaluate_baseline(model, config, config.data.val_csv, lpips, device)
    table.to_csv(args.out / "baseline_val_metrics.csv", index=False)
    baseline = {
        **{f"val_{metric}": float(table[metric].mean()) for metric in ("psnr_brain", "ssim_brain", "psnr")},
        "steps": steps,
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
        "num_workers": config.data.num_workers if args.baseline_workers is None else args.baseline_workers,
    }
    write("baseline", baseline)
    print(
        f"time to quality ({args.seconds:.0f} s each, {device}): in-brain PSNR ours {ours['val_psnr_brain']:.2f} "
        f"dB ({ours['steps']} steps) vs MONAI-recipe baseline {baseline['val_psnr_brain']:.2f} dB "
        f"({baseline['steps']} steps); in-brain SSIM {ours['val_ssim_brain']:.4f} vs "
        f"{baseline['val_ssim_brain']:.4f}\nwrote {json_path}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=180.0, help="wall-clock budget of each run")
    parser.add_argument("--config", default=str(harness.REPO_ROOT / "config.json"), help="ours and the data")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="config override for both runs (after this script's own), e.g. perceptual.weights_path=...",
    )  # fmt: skip
    parser.add_argument("--train_csv", default=str(harness.IXI / "train.csv"))
    parser.add_argument("--val_csv", default=str(harness.IXI / "val.csv"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--baseline_workers", type=int, help="baseline DataLoader workers (data.num_workers)")
    parser.add_argument(
        "--out", type=Path, default=harness.REPO_ROOT / "bench" / "results" / "time_to_quality"
    )
    parser.add_argument("--json", type=Path, default=None, help="default: <out>/time_to_quality.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    return time_to_quality(args)


if __name__ == "__main__":
    sys.exit(main())
