"""Full GAN training-step benchmark: ``train.train_step`` itself, on our model and on MONAI-built equivalents.

One step is exactly what ``train.py`` runs in its GAN stage (``train.train_step``): VAE forward, the loss of
``losses.VAEGANLoss`` (MSE + β·KL + 0.3·LPIPS3D + 0.1 × VQGAN adaptive weight × adversarial), the
non-finite guard, GradScaler calls, grad-norm clip, AdamW; then the discriminator update. Config: the schema
defaults (``config.Config()``: seed model 32/64/128, discriminator, loss weights, optimisers); the state is
built by ``train.build_state`` (so the memory format is ``train.py``'s too).

Variants (``<model>[_ckpt][_bf16]``):

* ``ours``: our ``MaisiVAE`` + ``PatchDiscriminator3D``; ``_ckpt`` turns on activation checkpointing;
* ``maisi``: MONAI ``AutoencoderKlMaisi(num_splits=1)``; ``monai_kl``: MONAI ``AutoencoderKL``; both with
  MONAI ``PatchDiscriminator`` (same layers, channels, kernel 4, padding 1, affine instance norm), passed to
  the same ``train_step`` through ``train.build_state(vae=..., discriminator=...)``;
* ``_bf16``: ``train.amp=bf16`` (on cuda every variant runs under bf16 autocast).

The perceptual network is the same for all variants (our frozen ``LPIPS3D`` on the deepbet encoder): MONAI's
``PerceptualLoss`` downloads its 3D networks and this benchmark must not download anything. Timing and
alternation are ``bench_model``'s: one warm-up round, then ``--steps`` rounds, one step of each variant per
round; medians. On CPU, times and peak memory come from two separate processes (``--measure both``).

Usage: ``python bench/bench_train_step.py [--shape 92 112 92] [--batch 1] [--steps 3] [--device cpu|cuda]
[--compile] [--json out.json] [--variants ours ours_ckpt ours_bf16 maisi monai_kl]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_model  # noqa: E402

import train  # noqa: E402
from config import Config  # noqa: E402
from losses import VAEGANLoss  # noqa: E402
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


class _MonaiVAE(nn.Module):
    """Adapter: a MONAI autoencoder with the one attribute ``train_step`` needs beyond ``forward``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.net(x)

    @property
    def last_decoder_layer_weight(self) -> torch.Tensor:
        return [m for m in self.net.decoder.modules() if isinstance(m, nn.Conv3d)][-1].weight


def monai_discriminator(config: Config) -> nn.Module:
    """MONAI ``PatchDiscriminator`` with the layout of our default ``PatchDiscriminator3D``."""
    from monai.networks.nets import PatchDiscriminator

    return _LogitsOnly(
        PatchDiscriminator(
            spatial_dims=3,
            channels=config.discriminator.channels,
            in_channels=1,
            out_channels=1,
            num_layers_d=config.discriminator.num_layers,
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


def variant_config(
    variant: str, device: torch.device, channels_last: bool, compile_vae: bool = False
) -> Config:
    """The default config with the variant's precision, checkpointing, memory format and ``train.compile``."""
    _, checkpointing, bf16 = parse_variant(variant)
    amp = "bf16" if bf16 or device.type == "cuda" else "none"
    return Config.from_dict(
        {
            "train": {
                "device": device.type,
                "amp": amp,
                "gradient_checkpointing": checkpointing,
                "channels_last": channels_last,
                "compile": compile_vae,
            }
        }
    )


def build_step(
    variant: str, lpips: nn.Module, x: torch.Tensor, compile_vae: bool
) -> tuple[train.TrainState, callable]:
    """``(state, step)``: a fresh ``train.TrainState`` of ``variant`` and a closure running one GAN step."""
    model, _, _ = parse_variant(variant)
    channels_last = x.is_contiguous(memory_format=torch.channels_last_3d)
    config = variant_config(variant, x.device, channels_last, compile_vae)
    torch.manual_seed(0)
    if model == "ours":
        state = train.build_state(config, x.device)
    else:
        vae = _MonaiVAE(bench_model.build(model))
        torch.manual_seed(1)
        state = train.build_state(config, x.device, vae=vae, discriminator=monai_discriminator(config))
    train.wrap_for_training(state, config.train, train.SINGLE_PROCESS)  # train.compile exactly as train.py
    loss = VAEGANLoss.from_config(config, lpips)
    amp_dtype = train.resolve_amp_dtype(config.train.amp, x.device)

    def step() -> dict[str, torch.Tensor]:
        return train.train_step(state, loss, x, True, config.train, amp_dtype)

    return state, step


def count_gan_step_flops(x: torch.Tensor, lpips: nn.Module) -> int:
    """Conv/matmul FLOPs of one full GAN step of ``ours`` (``train.train_step``), by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    _, step = build_step("ours", lpips, x, compile_vae=False)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(92, 112, 92))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured rounds (median), after one warm-up")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (cuda)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    add_common_args(parser)
    bench_model.add_measure_arg(parser)
    args = parser.parse_args()
    if args.device == "cpu" and args.measure == "both":
        merged = bench_model.run_time_and_memory_processes(sys.argv)
        print("merged (times: plain process; memory: mmap-threshold process):")
        bench_model.print_table(merged["results"])
        write_json(args.json, merged)
        return
    bench_model.prepare_process(sys.argv, args.measure, args.device)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    channels_last = gpu and not args.no_channels_last
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, *args.shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    lpips = LPIPS3D(backbone="deepbet").to(device).eval()
    steps = {v: build_step(v, lpips, x, compile_vae=args.compile and gpu)[1] for v in args.variants}

    defaults = Config()
    settings = {
        "device": str(device),
        "shape": list(args.shape),
        "batch": args.batch,
        "steps": args.steps,
        "step": "train.train_step (GAN stage) with losses.VAEGANLoss, state from train.build_state",
        "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in bench_model.CONFIG.items()},
        "discriminator": {
            "channels": defaults.discriminator.channels,
            "layers": defaults.discriminator.num_layers,
        },
        "perceptual": lpips.description + " (shared by all variants; MONAI PerceptualLoss would download)",
        "losses": f"{defaults.train.recon_loss} + {defaults.train.beta}*KL + {defaults.train.perceptual_weight}*LPIPS "
        f"+ {defaults.train.adversarial_weight}*adaptive*LSGAN; AdamW, clip {defaults.train.grad_clip}",
        "precision": "bf16 autocast (all variants)" if gpu else "fp32 (*_bf16: bf16 autocast)",
        "channels_last_3d": channels_last,
        "compile": args.compile and gpu,
        "measure": args.measure,
        "memory": "cuda max_memory_allocated delta"
        if gpu
        else "peak RSS delta (VmHWM reset, mmap threshold 64 KiB in the memory run)",
        "load_average_start": load_average(),
    }
    info = bench_model.machine_info(device)
    print("machine:", json.dumps(info))
    print("settings:", json.dumps(settings))

    results = bench_model.run_rounds(steps, args.steps, device)
    settings["load_average_end"] = load_average()
    flops = count_gan_step_flops(x, lpips) if gpu else None
    if flops is not None:
        for r in results.values():
            r["mfu"] = flops / r["s_per_step"] / (args.peak_tflops * 1e12)
    bench_model.print_table(results)
    if flops is not None:
        print(f"GAN step FLOPs (conv+matmul, FlopCounterMode, ours): {flops / 1e12:.3f} TFLOP")
    print("load average (start -> end):", settings["load_average_start"], "->", settings["load_average_end"])
    write_json(
        args.json,
        {"machine": info, "settings": settings, "results": results, "step_tflop": flops and flops / 1e12},
    )


if __name__ == "__main__":
    main()
