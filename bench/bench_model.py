"""Training-step benchmark: our MaisiVAE vs MONAI ``AutoencoderKlMaisi`` and ``AutoencoderKL``, side by side.

One step = forward, MSE + KL loss, backward, Adam. All variants live in one process, share the same input and
are run alternately (round-robin over the variants, one step each per round) after one warm-up step each;
reported numbers are medians over ``--steps`` rounds.

Peak memory
    cuda: ``torch.cuda.max_memory_allocated`` during the step minus the allocated memory before it.
    cpu:  the process's peak resident set size during the step minus its resident size before it, measured in
          a SEPARATE process from the times (``--measure both``, the default, runs a plain process for the
          times, then a memory process). Linux lets
          a process reset its own peak (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``), and the memory
          process runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc serves every tensor buffer of
          >= 64 KiB with its own mmap and returns it to the OS when freed: the RSS then follows the live tensor
          memory (plus oneDNN scratch buffers, which are real memory too) instead of the malloc arena high-water.
          Parameters, gradients of the previous step (set to None before each step) and Adam state exist before
          the step, so the delta is the activation + gradient + transient memory of the step.

MFU (cuda): FLOPs of one training step counted once with ``torch.utils.flop_counter.FlopCounterMode`` on our
model without checkpointing (convolutions and matmuls only; the recomputed GroupNorm/SiLU/interpolation are
not counted), divided by step time and ``--peak-tflops`` (H100/H200 SXM dense bf16: 989).

Usage: ``python bench/bench_model.py [--shape 92 112 92] [--batch 1] [--steps 3] [--device cpu|cuda]
[--compile] [--json out.json] [--compiled-json out_compiled.json] [--variants ours ours_ckpt ours_bf16 maisi
monai_kl]``
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.maisi_vae import MaisiVAE  # noqa: E402

CONFIG = dict(channels=(32, 64, 128), latent_channels=4, num_res_blocks=(1, 1, 1), norm_num_groups=32)
VARIANTS = ("ours", "ours_ckpt", "ours_bf16", "maisi", "monai_kl")
MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"


def build(variant: str) -> torch.nn.Module:
    """Instantiate the model of ``variant`` with the default config (random weights, fixed seed)."""
    torch.manual_seed(0)
    levels = len(CONFIG["channels"])
    if variant.startswith("ours"):
        return MaisiVAE(**CONFIG, use_checkpointing=variant == "ours_ckpt")
    common = dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_res_blocks=CONFIG["num_res_blocks"],
        attention_levels=(False,) * levels,
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
    if variant == "monai_kl":
        from monai.networks.nets import AutoencoderKL

        return AutoencoderKL(channels=CONFIG["channels"], **common)
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}.")


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, autocast: bool) -> float:
    """forward, MSE + 1e-6 * KL, backward, Adam; returns the loss."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        recon, mu, sigma = model(x)
    recon, mu, sigma = recon.float(), mu.float(), sigma.float()
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 2 * torch.log(sigma) - 1).sum() / x.shape[0]
    loss = F.mse_loss(recon, x) + 1e-6 * kl
    loss.backward()
    opt.step()
    return loss.item()


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(step: Callable[[], float], device: torch.device) -> tuple[float, int]:
    """Run ``step`` once; return (seconds, peak extra bytes during the step)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _proc_status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status_kib("VmHWM") * 1024
    return seconds, peak - base


def count_step_flops(x: torch.Tensor, autocast: bool) -> int:
    """Conv/matmul FLOPs of one forward + backward of our model (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = MaisiVAE(**CONFIG).to(x.device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            recon, mu, sigma = model(x)
        (F.mse_loss(recon.float(), x) + mu.float().mean() + sigma.float().mean()).backward()
    return counter.get_total_flops()


TIME_KEYS = ("s_per_step", "steps_per_s", "s_all")


def add_measure_arg(parser: argparse.ArgumentParser) -> None:
    """``--measure time|memory|both``: on CPU, time and peak memory come from separate processes."""
    parser.add_argument(
        "--measure",
        choices=("both", "time", "memory"),
        default="both",
        help="cpu: 'both' runs a plain process for the times and a second one with the glibc mmap threshold "
        "lowered for the peak memory (the lowered threshold slows allocation-heavy models); cuda: one process",
    )


def prepare_process(argv: list[str], measure: str, device: str) -> None:
    """Re-execute so that a CPU memory run has the lowered mmap threshold and a timing run has not."""
    if device != "cpu" or not sys.platform.startswith("linux"):
        return
    wanted = "65536" if measure == "memory" else None
    if os.environ.get(MALLOC_ENV) != wanted:
        env = {k: v for k, v in os.environ.items() if k != MALLOC_ENV}
        if wanted:
            env[MALLOC_ENV] = wanted
        os.execve(sys.executable, [sys.executable, *argv], env)


def run_time_and_memory_processes(argv: list[str]) -> dict[str, object]:
    """Run this script twice (``--measure time``, then ``--measure memory``) and merge their JSON: times from
    the plain process, peak memory from the one with the lowered mmap threshold."""
    outputs = {}
    with tempfile.TemporaryDirectory() as folder:
        for measure in ("time", "memory"):
            path = Path(folder) / f"{measure}.json"
            command = [sys.executable, *_without_options(argv, ("--json", "--measure"))]
            subprocess.run([*command, "--measure", measure, "--json", str(path)], check=True)
            outputs[measure] = json.loads(path.read_text())
    merged = outputs["time"]
    for variant, result in merged["results"].items():
        result["peak_mib"] = outputs["memory"]["results"][variant]["peak_mib"]
        result["peak_mib_all"] = outputs["memory"]["results"][variant].get("peak_mib_all")
    merged["settings"]["measure"] = (
        "times from a plain process; peak memory from a second process (mmap threshold 64 KiB)"
    )
    merged["settings"]["load_average_memory_run"] = outputs["memory"]["settings"].get("load_average_end")
    return merged


def _without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without ``--name value`` pairs for the given option names."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in names:
            skip = True
        elif not any(item.startswith(name + "=") for name in names):
            out.append(item)
    return out


def machine_info(device: torch.device) -> dict[str, object]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    info: dict[str, object] = {
        "cpu": cpu,
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_rounds(
    steps: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, dict[str, object]]:
    """One warm-up round, then ``rounds`` rounds of one step per variant (alternating); medians.

    Returns ``{variant: {"s_per_step", "steps_per_s", "peak_mib", "s_all", "peak_mib_all"}}``.
    """
    times: dict[str, list[float]] = {v: [] for v in steps}
    mems: dict[str, list[int]] = {v: [] for v in steps}
    for round_index in range(rounds + 1):
        for variant, step in steps.items():
            seconds, peak = measure(step, device)
            if round_index > 0:
                times[variant].append(seconds)
                mems[variant].append(peak)
            label = "warm-up" if round_index == 0 else f"round {round_index}"
            print(f"  {label:8s} {variant:15s} {seconds:7.2f} s  {peak / 2**20:8.0f} MiB", flush=True)
    return {
        variant: {
            "s_per_step": statistics.median(times[variant]),
            "steps_per_s": 1 / statistics.median(times[variant]),
            "peak_mib": statistics.median(mems[variant]) / 2**20,
            "s_all": times[variant],
            "peak_mib_all": [m / 2**20 for m in mems[variant]],
        }
        for variant in steps
    }


def print_table(results: dict[str, dict], refs: tuple[str, ...] = ("maisi", "monai_kl")) -> None:
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
            ref_mib = results[ref]["peak_mib"]  # 0 when a tiny CPU step stays inside the malloc arena
            r[f"mem_vs_{ref}"] = r["peak_mib"] / ref_mib if ref_mib else float("nan")
            line += f" {r[f'time_vs_{ref}']:10.2f} {r[f'mem_vs_{ref}']:12.2f}"
        print(line + (f" {100 * r['mfu']:6.2f}%" if "mfu" in r else ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", type=int, nargs=3, default=(92, 112, 92))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--steps", type=int, default=3, help="measured rounds (median), after one warm-up round"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (cuda section)")
    parser.add_argument(
        "--no-channels-last", action="store_true", help="cuda: keep input and MONAI models in NCDHW format"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="accelerator dense bf16 peak for MFU"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", type=Path, default=None, help="write results to this JSON file")
    parser.add_argument(
        "--compiled-json",
        type=Path,
        default=None,
        help="after the rounds, torch.compile every model (cuda) and time them again in this process, "
        "writing this JSON (saves a second process start; compile time is in the warm-up round)",
    )
    add_measure_arg(parser)
    args = parser.parse_args()
    if args.compiled_json is not None and args.device == "cpu" and args.measure == "both":
        parser.error("--compiled-json on cpu needs --measure time or memory (one process)")
    if args.device == "cpu" and args.measure == "both":
        merged = run_time_and_memory_processes(sys.argv)
        print("merged (times: plain process; memory: mmap-threshold process):")
        print_table(merged["results"])
        if args.json is not None:
            args.json.write_text(json.dumps(merged, indent=2))
        return
    prepare_process(sys.argv, args.measure, args.device)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    gpu = device.type == "cuda"
    channels_last = gpu and not args.no_channels_last
    x = torch.rand(args.batch, 1, *args.shape, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)

    models = {}
    for variant in args.variants:
        model = build(variant).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        models[variant] = (model, torch.optim.Adam(model.parameters(), lr=1e-4))
    info = machine_info(device)
    print("machine:", json.dumps(info))
    passes = [(args.compile and gpu, args.json)]
    if args.compiled_json is not None:
        passes.append((gpu, args.compiled_json))
    flops = None
    for compiled, json_path in passes:
        runs = {}
        for variant, (model, opt) in models.items():
            step_model = torch.compile(model) if compiled else model
            autocast = gpu or variant == "ours_bf16"
            runs[variant] = lambda m=step_model, o=opt, a=autocast: train_step(m, o, x, a)
        settings = {
            "device": str(device),
            "shape": list(args.shape),
            "batch": args.batch,
            "steps": args.steps,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.items()},
            "precision": "bf16 autocast (all variants)" if gpu else "fp32 (ours_bf16: bf16 autocast)",
            "inputs_and_monai_models_channels_last_3d": channels_last,
            "ours_weights_channels_last_3d": True,
            "compile": compiled,
            "measure": args.measure,
            "memory": "cuda max_memory_allocated delta"
            if gpu
            else "peak RSS delta (VmHWM reset, mmap threshold 64 KiB in the memory run)",
            "load_average_start": [round(v, 2) for v in os.getloadavg()],
        }
        print("settings:", json.dumps(settings))
        results = run_rounds(runs, args.steps, device)
        settings["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        if gpu and flops is None:
            flops = count_step_flops(x, gpu)
        if flops is not None:
            for r in results.values():
                r["mfu"] = flops / r["s_per_step"] / (args.peak_tflops * 1e12)
        print_table(results)
        if flops is not None:
            print(f"step FLOPs (conv+matmul, fwd+bwd, FlopCounterMode): {flops / 1e12:.3f} TFLOP")
        if json_path is not None:
            json_path.write_text(
                json.dumps({"machine": info, "settings": settings, "results": results}, indent=2)
            )


if __name__ == "__main__":
    main()
