"""Full GAN training-step benchmark: ours vs MONAI-built equivalents, side by side.

One step is ``train.py``'s GAN-stage step:

* generator: VAE forward; recon (MSE or L1) + beta * KL + perceptual_weight * LPIPS3D + adversarial_weight *
  generator adversarial loss (discriminator frozen for this term); backward; grad-norm clip; AdamW step;
* discriminator: forward on ``cat([real, fake.detach()])``; least-squares loss; backward; clip; AdamW step.

Loss weights, learning rates, weight decay, clip and the discriminator layout are the defaults of
``config.TrainConfig`` / ``config.DiscriminatorConfig``; the VAE is ``bench_model``'s seed config
(channels 32, 64, 128; res blocks 1, 1, 1; latent 4; 32 norm groups).

Variants (``<model>[_ckpt][_bf16]``):

* ``ours``: our ``MaisiVAE`` + ``PatchDiscriminator3D`` (instance norm) + ``LPIPS3D`` (deepbet backbone);
  ``_ckpt`` turns on our activation checkpointing;
* ``maisi``: MONAI ``AutoencoderKlMaisi(num_splits=1)``; ``monai_kl``: MONAI ``AutoencoderKL``; both with
  MONAI ``PatchDiscriminator`` (same layers, channels, kernel 4, padding 1, affine instance norm);
* ``_bf16``: bf16 autocast around the forward passes (on cuda every variant runs under bf16 autocast).

The perceptual network is the same for all variants (our frozen ``LPIPS3D`` on the deepbet encoder):
MONAI's ``PerceptualLoss`` downloads its 3D networks (MedicalNet via torch.hub) and this benchmark must not
download anything. Timing, alternation and peak-memory measurement are ``bench_model``'s (see its
docstring): one warm-up round, then ``--steps`` rounds, one step of each variant per round; medians.

Usage: ``python bench/bench_train_step.py [--shape 92 112 92] [--batch 1] [--steps 3] [--device cpu|cuda]
[--compile] [--recon mse|l1] [--json out.json] [--variants ours ours_ckpt ours_bf16 maisi monai_kl]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_model  # noqa: E402

from config import DiscriminatorConfig, TrainConfig  # noqa: E402
from metrics import kl_divergence  # noqa: E402
from model.discriminator import (  # noqa: E402
    PatchDiscriminator3D,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
)
from model.lpips3D import LPIPS3D  # noqa: E402

MODELS = ("ours", "maisi", "monai_kl")
VARIANTS = (
    "ours",
    "ours_ckpt",
    "ours_bf16",
    "ours_ckpt_bf16",
    "maisi",
    "maisi_bf16",
    "monai_kl",
    "monai_kl_bf16",
)
DEFAULT_VARIANTS = ("ours", "ours_ckpt", "ours_bf16", "maisi", "monai_kl")


# ----------------------------------------------------------------------------------------------- helpers
# (shared with bench_scaling.py)


def reexec_with_mmap_threshold() -> None:
    """Re-execute this script with glibc's mmap threshold at 64 KiB (see ``bench_model``'s docstring).

    Makes the peak-RSS memory measurement follow the live tensor memory on CPU; a no-op when already set.
    """
    if sys.platform.startswith("linux") and bench_model.MALLOC_ENV not in os.environ:
        env = {**os.environ, bench_model.MALLOC_ENV: "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages (other jobs share this machine: report them with every result)."""
    return [round(v, 2) for v in os.getloadavg()]


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``; exits with a message when cuda is asked for but unavailable."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return torch.device(name)


def add_common_args(parser: argparse.ArgumentParser, cuda_options: bool = True) -> None:
    """Arguments shared by the step benchmarks: device, JSON output (+ compile and memory format)."""
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    if cuda_options:
        parser.add_argument("--compile", action="store_true", help="torch.compile the VAEs (cuda only)")
        parser.add_argument(
            "--no-channels-last", action="store_true", help="cuda: keep inputs and models in NCDHW format"
        )


def write_json(path: Path | None, payload: dict[str, object]) -> None:
    """Write ``payload`` as indented JSON (creating the folder); no-op for ``None``."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))


# ----------------------------------------------------------------------------------------------- models


class _LogitsOnly(nn.Module):
    """Adapter: MONAI's ``PatchDiscriminator`` returns all intermediate maps; the loss needs the last."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


def build_discriminator(model: str, disc: DiscriminatorConfig) -> nn.Module:
    """Our ``PatchDiscriminator3D`` or the equivalent MONAI ``PatchDiscriminator`` (same layer layout)."""
    torch.manual_seed(1)
    if model == "ours":
        return PatchDiscriminator3D(in_channels=1, channels=disc.channels, num_layers=disc.num_layers)
    from monai.networks.nets import PatchDiscriminator

    return _LogitsOnly(
        PatchDiscriminator(
            spatial_dims=3,
            channels=disc.channels,
            in_channels=1,
            out_channels=1,
            num_layers_d=disc.num_layers,
            kernel_size=4,
            padding=1,
            norm=("INSTANCE", {"affine": True}),
        )
    )


def parse_variant(variant: str) -> tuple[str, bool, bool]:
    """``"ours_ckpt_bf16"`` -> (model ``"ours"``, checkpointing ``True``, bf16 ``True``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    base = variant.removesuffix("_bf16")
    return base.removesuffix("_ckpt"), base.endswith("_ckpt"), variant.endswith("_bf16")


@dataclass
class GanParts:
    """Everything one GAN training step touches."""

    vae: nn.Module  # possibly torch.compile'd
    discriminator: nn.Module
    lpips: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    autocast: bool


def build_parts(
    variant: str, lpips: nn.Module, device: torch.device, channels_last: bool, compile_vae: bool
) -> GanParts:
    """VAE + discriminator + AdamW optimisers of ``variant`` (``lpips`` is shared: it is frozen)."""
    model, checkpointing, bf16 = parse_variant(variant)
    train, disc = TrainConfig(), DiscriminatorConfig()
    vae = bench_model.build("ours_ckpt" if checkpointing else model).to(device)
    discriminator = build_discriminator(model, disc).to(device)
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last_3d)
        discriminator = discriminator.to(memory_format=torch.channels_last_3d)
    opt_g = torch.optim.AdamW(vae.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    opt_d = torch.optim.AdamW(
        discriminator.parameters(), lr=disc.learning_rate, weight_decay=train.weight_decay
    )
    return GanParts(
        vae=torch.compile(vae) if compile_vae else vae,
        discriminator=discriminator,
        lpips=lpips,
        opt_g=opt_g,
        opt_d=opt_d,
        autocast=bf16 or device.type == "cuda",
    )


def gan_train_step(parts: GanParts, x: torch.Tensor, recon_kind: str = "mse") -> float:
    """One GAN-stage step as in ``train.py`` (generator, then discriminator); returns the generator loss."""
    train = TrainConfig()
    clip = train.grad_clip or math.inf
    recon_criterion = F.mse_loss if recon_kind == "mse" else F.l1_loss
    amp = dict(device_type=x.device.type, dtype=torch.bfloat16, enabled=parts.autocast)

    with torch.autocast(**amp):
        recon, mu, sigma = parts.vae(x)
        recon_loss = recon_criterion(recon.float(), x.float())
        kl_loss = kl_divergence(mu, sigma).mean()
        perceptual_loss = parts.lpips(recon, x).mean()
        parts.discriminator.requires_grad_(False)
        adversarial_loss = generator_adversarial_loss(parts.discriminator(recon.float()))
        parts.discriminator.requires_grad_(True)
        loss_g = (
            recon_loss
            + train.beta * kl_loss
            + train.perceptual_weight * perceptual_loss
            + train.adversarial_weight * adversarial_loss
        )
    parts.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    torch.nn.utils.clip_grad_norm_(parts.vae.parameters(), clip)
    parts.opt_g.step()

    with torch.autocast(**amp):
        logits = parts.discriminator(torch.cat([x.float(), recon.detach().float()]))
        real_logits, fake_logits = logits.chunk(2)
        loss_d = discriminator_adversarial_loss(real_logits, fake_logits)
    parts.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    torch.nn.utils.clip_grad_norm_(parts.discriminator.parameters(), clip)
    parts.opt_d.step()
    return loss_g.item()


def count_gan_step_flops(x: torch.Tensor, lpips: nn.Module, autocast: bool, recon_kind: str) -> int:
    """Conv/matmul FLOPs of one full GAN step with ``ours`` (no checkpointing), by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    parts = build_parts("ours", lpips, x.device, channels_last=False, compile_vae=False)
    parts.autocast = autocast
    with FlopCounterMode(display=False) as counter:
        gan_train_step(parts, x, recon_kind)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------------------------- running


def run_rounds(
    steps: dict[str, Callable[[], float]], rounds: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """One warm-up round, then ``rounds`` rounds of one step per variant (alternating); medians.

    Returns ``{variant: {"s_per_step", "steps_per_s", "peak_mib", "s_all"}}``.
    """
    times: dict[str, list[float]] = {v: [] for v in steps}
    mems: dict[str, list[int]] = {v: [] for v in steps}
    for round_index in range(rounds + 1):
        for variant, step in steps.items():
            seconds, peak = bench_model.measure(step, device)
            if round_index > 0:
                times[variant].append(seconds)
                mems[variant].append(peak)
            label = "warm-up" if round_index == 0 else f"round {round_index}"
            print(f"  {label:8s} {variant:15s} {seconds:7.2f} s  {peak / 2**20:8.0f} MiB", flush=True)
    results = {}
    for variant in steps:
        sec = statistics.median(times[variant])
        results[variant] = {
            "s_per_step": sec,
            "steps_per_s": 1 / sec,
            "peak_mib": statistics.median(mems[variant]) / 2**20,
            "s_all": times[variant],
        }
    return results


def print_table(results: dict[str, dict[str, float]], refs: tuple[str, ...] = ("maisi", "monai_kl")) -> None:
    """Print s/step, steps/s, peak MiB, ratios to each reference present, MFU when known (adds the ratios)."""
    refs = tuple(r for r in refs if r in results)
    has_mfu = any("mfu" in r for r in results.values())
    header = f"{'variant':15s} {'s/step':>8s} {'steps/s':>8s} {'peak MiB':>9s}"
    header += "".join(f" {'t/' + r:>10s} {'mem/' + r:>12s}" for r in refs)
    print(header + (f" {'MFU':>7s}" if has_mfu else ""))
    for variant, r in results.items():
        line = f"{variant:15s} {r['s_per_step']:8.3f} {r['steps_per_s']:8.3f} {r['peak_mib']:9.0f}"
        for ref in refs:
            r[f"time_vs_{ref}"] = r["s_per_step"] / results[ref]["s_per_step"]
            r[f"mem_vs_{ref}"] = r["peak_mib"] / results[ref]["peak_mib"]
            line += f" {r[f'time_vs_{ref}']:10.2f} {r[f'mem_vs_{ref}']:12.2f}"
        print(line + (f" {100 * r['mfu']:6.2f}%" if "mfu" in r else ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(92, 112, 92))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured rounds (median), after one warm-up")
    parser.add_argument("--recon", choices=("mse", "l1"), default=TrainConfig().recon_loss)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (cuda)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    add_common_args(parser)
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    channels_last = gpu and not args.no_channels_last
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, *args.shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    lpips = LPIPS3D(backbone="deepbet").to(device).eval()

    steps: dict[str, Callable[[], float]] = {}
    for variant in args.variants:
        parts = build_parts(variant, lpips, device, channels_last, compile_vae=args.compile and gpu)
        steps[variant] = lambda p=parts: gan_train_step(p, x, args.recon)

    train, disc = TrainConfig(), DiscriminatorConfig()
    settings = {
        "device": str(device),
        "shape": list(args.shape),
        "batch": args.batch,
        "steps": args.steps,
        "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in bench_model.CONFIG.items()},
        "discriminator": {"channels": disc.channels, "num_layers": disc.num_layers, "norm": "instance"},
        "perceptual": lpips.description + " (shared by all variants; MONAI PerceptualLoss would download)",
        "losses": f"{args.recon} + {train.beta}*KL + {train.perceptual_weight}*LPIPS "
        f"+ {train.adversarial_weight}*LSGAN; AdamW, clip {train.grad_clip}",
        "precision": "bf16 autocast (all variants)" if gpu else "fp32 (*_bf16: bf16 autocast)",
        "channels_last_3d": channels_last,
        "compile": args.compile and gpu,
        "memory": "cuda max_memory_allocated delta"
        if gpu
        else "peak RSS delta (VmHWM reset, mmap threshold 64 KiB)",
        "load_average_start": load_average(),
    }
    info = bench_model.machine_info(device)
    print("machine:", json.dumps(info))
    print("settings:", json.dumps(settings))

    results = run_rounds(steps, args.steps, device)
    settings["load_average_end"] = load_average()
    flops = count_gan_step_flops(x, lpips, gpu, args.recon) if gpu else None
    if flops is not None:
        for r in results.values():
            r["mfu"] = flops / r["s_per_step"] / (args.peak_tflops * 1e12)
    print_table(results)
    if flops is not None:
        print(f"GAN step FLOPs (conv+matmul, FlopCounterMode, ours): {flops / 1e12:.3f} TFLOP")
    print("load average (start -> end):", settings["load_average_start"], "->", settings["load_average_end"])
    write_json(
        args.json,
        {"machine": info, "settings": settings, "results": results, "step_tflop": flops and flops / 1e12},
    )


if __name__ == "__main__":
    reexec_with_mmap_threshold()
    main()
