"""Model-only training step, ours vs MONAI ``AutoencoderKlMaisi(num_splits=1)`` and ``AutoencoderKL``.

    python -m bench.model_step [--shape 92 112 92] [--batch_size 1] [--steps 3] [--device cpu|cuda]
        [--variants ours ours_ckpt ours_bf16 maisi monai_kl] [--no_channels_last]
        [--peak_tflops 989] [--measure both|time|memory] [--json out.json] [--compiled_json out.json]

One step = forward, MSE + 1e-6·KL, backward, Adam, on our ``MaisiVAE`` (``_ckpt``: activation checkpointing,
``_bf16``: bf16 autocast) and the MONAI VAEs with the same seed config; on cuda every variant runs under bf16
autocast, with channels_last_3d unless ``--no_channels_last``. The variants share one input and alternate
(:func:`bench.harness.run_rounds`). Peak memory: cuda ``max_memory_allocated`` delta; CPU peak-RSS delta from a
second process with glibc's mmap threshold at 64 KiB (``--measure both`` runs the plain timing process, then
that one). MFU (cuda) = conv/matmul FLOPs of ours (``FlopCounterMode``) ÷ time ÷ ``--peak_tflops``.
``--compiled_json``: ``torch.compile``'d models timed after the eager rounds, in the same process (cuda).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench import harness
from losses import kl_divergence
from model.maisi_vae import MaisiVAE
from utils import resolve_device

MODULE = "bench.model_step"
CONFIG = dict(channels=(32, 64, 128), latent_channels=4, num_res_blocks=(1, 1, 1), norm_num_groups=32)
VARIANTS = ("ours", "ours_ckpt", "ours_bf16", "maisi", "monai_kl")


def build_vae(variant: str) -> nn.Module:
    """The VAE of ``variant`` with the seed config (random weights, fixed seed)."""
    torch.manual_seed(0)
    if variant.startswith("ours"):
        return MaisiVAE(**CONFIG, use_checkpointing=variant == "ours_ckpt")
    common = dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_res_blocks=CONFIG["num_res_blocks"],
        attention_levels=(False,) * len(CONFIG["channels"]),
        latent_channels=CONFIG["latent_channels"],
        norm_num_groups=CONFIG["norm_num_groups"],
        norm_eps=1e-6,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    if variant == "maisi":
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

        return AutoencoderKlMaisi(
            num_channels=CONFIG["channels"],
            num_splits=1,
            dim_split=1,
            norm_float16=False,
            save_mem=False,
            **common,
        )
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(channels=CONFIG["channels"], **common)


def model_step(variant: str, x: torch.Tensor, compiled: bool) -> Callable[[], float]:
    """One model-only step of ``variant`` on ``x``: forward, MSE + 1e-6·KL, backward, Adam."""
    model = build_vae(variant).to(x.device)
    if x.is_contiguous(memory_format=torch.channels_last_3d):
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model
    bf16 = x.device.type == "cuda" or variant == "ours_bf16"

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            recon, mu, sigma = forward(x)
        loss = F.mse_loss(recon.float(), x) + 1e-6 * kl_divergence(mu.float(), sigma.float()).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def step_flops(step: Callable[[], object]) -> int:
    """Conv/matmul FLOPs of one call of ``step`` (``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(92, 112, 92))
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=3, help="measured rounds (median), after one warm-up round"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no_channels_last", action="store_true", help="cuda: keep inputs in NCDHW format")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="dense bf16 peak for MFU (cuda)")
    parser.add_argument(
        "--measure", choices=("both", "time", "memory"), default="both", help="cpu: see above"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--compiled_json", type=Path, default=None, help="then compiled, into this JSON (cuda)"
    )
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.device == "cpu" and args.measure == "both":
        if args.compiled_json is not None:
            parser.error("--compiled_json on cpu needs --measure time or memory (one process)")
        merged = harness.time_and_memory_processes(MODULE, argv)
        print("merged (times: plain process; memory: mmap-threshold process):")
        harness.print_table(merged["results"])
        harness.write_json(args.json, merged)
        return 0
    harness.prepare_process(MODULE, argv, args.measure, args.device)

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    channels_last = gpu and not args.no_channels_last
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 1, *args.shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    info = harness.machine_info(device)
    print("machine:", json.dumps(info))
    passes = [(False, args.json)] + ([(gpu, args.compiled_json)] if args.compiled_json else [])
    flops = step_flops(model_step("ours", x, False)) if gpu else None
    for compiled, json_path in passes:
        steps = {variant: model_step(variant, x, compiled) for variant in args.variants}
        settings = {
            "device": str(device),
            "shape": list(args.shape),
            "batch": args.batch_size,
            "steps": args.steps,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.items()},
            "precision": "bf16 autocast (all variants)" if gpu else "fp32 (ours_bf16: bf16 autocast)",
            "inputs_and_monai_models_channels_last_3d": channels_last,
            "compile": compiled,
            "measure": args.measure,
            "memory": "cuda max_memory_allocated delta" if gpu else "peak RSS delta (VmHWM reset)",
            "load_average_start": harness.load_average(),
        }
        print("settings:", json.dumps(settings))
        results = harness.run_rounds(steps, args.steps, device)
        settings["load_average_end"] = harness.load_average()
        if flops is not None:
            print(f"step FLOPs of ours (conv+matmul, FlopCounterMode): {flops / 1e12:.3f} TFLOP")
            for r in results.values():
                r["mfu"] = flops / r["s_per_step"] / (args.peak_tflops * 1e12)
        harness.print_table(results)
        harness.write_json(json_path, {"machine": info, "settings": settings, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
