"""Step time and peak memory vs volume and batch size: ours vs MONAI AutoencoderKlMaisi / AutoencoderKL.

The step is ``bench_model``'s model-only training step (forward, MSE + KL, backward, Adam) with its models
(seed config: channels 32, 64, 128; res blocks 1, 1, 1; latent 4; 32 norm groups) and its memory measurement
(cpu: peak-RSS delta with a 64 KiB mmap threshold; cuda: ``max_memory_allocated`` delta).

Grid: batch 1 at 64^3, 92x112x92, 128^3, 160x192x160; then batch 2 and 4 at 64^3 and 92x112x92 (by
increasing voxels x batch). Every (model, size, batch) runs in its own subprocess (isolated peak memory), the
models of one configuration one after the other (side by side in time); on cuda every run is in-process
(the allocator's peak statistics isolate it, and a CUDA start per run would cost more than the run) and an
out-of-memory error is recorded as ``"out of memory"``. A run is

* ``"skipped (memory)"`` when its memory, extrapolated linearly in voxels x batch from the largest finished
  run of the same model (+ the process baseline), exceeds ``--max-gib`` (default 18 GiB; cuda: 90% of the
  device memory);
* ``"skipped (time)"`` when the extrapolated time of its warm-up + timed steps exceeds the per-run timeout
  or a smaller run of the model timed out; ``"skipped (time budget)"`` once ``--budget-s`` is spent;
* ``"timeout"`` when it was killed after ``--timeout-s`` (cpu); ``"failed"`` when the subprocess failed.

The JSON is rewritten after every run, so a run killed from outside keeps what it measured.

Runs with >= 128^3 voxels x batch use 1 warm-up + 2 timed steps, smaller ones 1 + ``--steps``; medians.
Writes ``--json`` (default ``bench/results/scaling_<device>.json``) and ``--plot`` (default
``bench/scaling.png``: time and memory vs voxels on log scales, one line per model, and a batch panel).

Usage: ``python bench/bench_scaling.py [--device cpu|cuda] [--steps 3] [--timeout-s 240] [--budget-s 1500]
[--models ours maisi monai_kl] [--plot-only results.json]``
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_model  # noqa: E402
from bench_train_step import (  # noqa: E402
    add_common_args,
    load_average,
    reexec_with_mmap_threshold,
    resolve_device,
    write_json,
)

BENCH_DIR = Path(__file__).resolve().parent
MODELS = ("ours", "maisi", "monai_kl")
SIZES = ((64, 64, 64), (92, 112, 92), (128, 128, 128), (160, 192, 160))
BATCH_SIZES = (2, 4)
BATCH_SHAPES = ((64, 64, 64), (92, 112, 92))
BIG_VOXELS = 128**3
COLORS = {"ours": "tab:blue", "maisi": "tab:orange", "monai_kl": "tab:green"}


def grid() -> list[tuple[tuple[int, int, int], int]]:
    """(shape, batch) configurations: batch 1 by increasing size first (the headline curve), then the
    batch sizes by increasing voxels x batch (a slow machine spends its time budget on the sizes first)."""
    sizes = sorted(((s, 1) for s in SIZES), key=lambda c: math.prod(c[0]))
    batches = sorted(
        ((s, b) for s in BATCH_SHAPES for b in BATCH_SIZES), key=lambda c: math.prod(c[0]) * c[1]
    )
    return sizes + batches


# ----------------------------------------------------------------------------------------------- worker


def measure_config(
    variant: str, shape: tuple[int, int, int], batch: int, steps: int, device: torch.device
) -> dict[str, object]:
    """Run one configuration in this process; returns ``{"s_per_step", "s_all", "peak_mib", "baseline_mib"}``."""
    gpu = device.type == "cuda"
    model = bench_model.build(variant).to(device)
    x = torch.rand(batch, 1, *shape, device=device)
    if gpu:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times, mems = [], []
    for index in range(steps + 1):
        seconds, peak = bench_model.measure(lambda: bench_model.train_step(model, opt, x, gpu), device)
        print(f"    step {index} ({'warm-up' if index == 0 else 'timed'}): {seconds:.2f} s", flush=True)
        if index > 0:
            times.append(seconds)
            mems.append(peak)
    base = (
        torch.cuda.memory_allocated() if gpu else bench_model._proc_status_kib("VmRSS") * 1024  # noqa: SLF001 (bench_model's helper)
    )
    return {
        "s_per_step": statistics.median(times),
        "s_all": times,
        "peak_mib": statistics.median(mems) / 2**20,
        "baseline_mib": base / 2**20,
    }


def run_in_process(variant: str, shape: tuple[int, ...], batch: int, steps: int) -> dict[str, object]:
    """cuda: run one configuration in this process (the allocator's peak statistics isolate it; a CUDA
    process start per run would cost more than the runs). Frees the model's memory afterwards."""
    start = time.perf_counter()
    try:
        result = measure_config(variant, shape, batch, steps, torch.device("cuda"))
    except torch.cuda.OutOfMemoryError as err:
        return {"status": "out of memory", "error": str(err).splitlines()[0]}
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return {"status": "ok", "wall_s": time.perf_counter() - start, **result}


# ----------------------------------------------------------------------------------------------- driver


def run_in_subprocess(
    variant: str, shape: tuple[int, ...], batch: int, steps: int, device: str, timeout_s: float
) -> dict[str, object]:
    """cpu: run ``measure_config`` in a subprocess (own peak RSS; killed after ``timeout_s``); returns its
    result or a status."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--device", device]
    cmd += ["--shape", *map(str, shape), "--batch", str(batch), "--steps", str(steps)]
    env = {**os.environ, bench_model.MALLOC_ENV: "65536"}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"status": "failed", "returncode": proc.returncode, "stderr_tail": proc.stderr[-2000:]}
    return {"status": "ok", "wall_s": wall, **json.loads(lines[-1].removeprefix("RESULT "))}


def predict(done: list[dict[str, object]], voxels: int) -> tuple[float | None, float | None]:
    """Extrapolate (MiB incl. baseline, s/step) linearly in voxels x batch from the largest finished run."""
    ok = [r for r in done if r["status"] == "ok"]
    if not ok:
        return None, None
    ref = max(ok, key=lambda r: r["voxels_x_batch"])
    scale = voxels / ref["voxels_x_batch"]
    return ref["baseline_mib"] + ref["peak_mib"] * scale, ref["s_per_step"] * scale


def run_grid(
    args: argparse.Namespace, save: Callable[[list[dict[str, object]]], None]
) -> list[dict[str, object]]:
    """Run every (size, batch, model) of the grid, with the skip rules of the module docstring; calls
    ``save(records)`` after each record (a killed run keeps what it measured)."""
    max_mib = args.max_gib * 1024
    start = time.perf_counter()
    records: list[dict[str, object]] = []
    for shape, batch in grid():
        voxels = math.prod(shape) * batch
        steps = 2 if voxels >= BIG_VOXELS else args.steps
        for model in args.models:
            record: dict[str, object] = {
                "model": model,
                "shape": list(shape),
                "batch": batch,
                "voxels_x_batch": voxels,
                "steps": steps,
                "load_average": load_average(),
            }
            mine = [r for r in records if r["model"] == model]
            pred_mib, pred_s = predict(mine, voxels)
            record["predicted_mib"], record["predicted_s_per_step"] = pred_mib, pred_s
            spent = time.perf_counter() - start
            if pred_mib is not None and pred_mib > max_mib:
                record["status"] = "skipped (memory)"
            elif any(r["status"] == "timeout" and r["voxels_x_batch"] <= voxels for r in mine) or (
                pred_s is not None and pred_s * (steps + 1) > args.timeout_s
            ):
                record["status"] = "skipped (time)"
            elif spent > args.budget_s:
                record["status"] = "skipped (time budget)"
            else:
                print(f"{model:9s} {shape} x{batch}: running ({steps} timed steps) ...", flush=True)
                if args.device == "cuda":
                    record.update(run_in_process(model, shape, batch, steps))
                else:
                    record.update(run_in_subprocess(model, shape, batch, steps, args.device, args.timeout_s))
            line = f"{model:9s} {str(tuple(shape)):16s} x{batch}: {record['status']}"
            if record["status"] == "ok":
                line += f"  {record['s_per_step']:.2f} s/step  {record['peak_mib']:.0f} MiB"
            print(line + f"  (load {record['load_average']})", flush=True)
            records.append(record)
            save(records)
    return records


def print_tables(records: list[dict[str, object]], models: list[str]) -> None:
    """Markdown tables: s/step and peak MiB per configuration, one column per model, + ratios to ours."""

    def cell(r: dict[str, object] | None, key: str, fmt: str) -> str:
        if r is None:
            return "-"
        return format(r[key], fmt) if r["status"] == "ok" else str(r["status"])

    configs = sorted({(tuple(r["shape"]), r["batch"]) for r in records}, key=lambda c: math.prod(c[0]) * c[1])
    refs = [m for m in models if m != "ours"]
    for key, fmt, title in (("s_per_step", ".2f", "s/step"), ("peak_mib", ".0f", "peak MiB")):
        print(f"\n{title}")
        ratio_cols = [f"{r}/ours" for r in refs] if "ours" in models else []
        print("| shape | batch | " + " | ".join(models + ratio_cols) + " |")
        print("|---" * (2 + len(models) + len(ratio_cols)) + "|")
        for shape, batch in configs:
            row = {r["model"]: r for r in records if tuple(r["shape"]) == shape and r["batch"] == batch}
            cells = [cell(row.get(m), key, fmt) for m in models]
            for ref in refs if ratio_cols else []:
                a, b = row.get(ref), row.get("ours")
                ok = a is not None and b is not None and a["status"] == b["status"] == "ok"
                cells.append(f"{a[key] / b[key]:.2f}" if ok else "-")
            print(f"| {'x'.join(map(str, shape))} | {batch} | " + " | ".join(cells) + " |")


def plot(payload: dict[str, object], path: Path) -> None:
    """Time and memory vs voxels (batch 1) and vs batch size, log scales, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    records = [r for r in payload["records"] if r["status"] == "ok"]
    batch_shapes = sorted({tuple(r["shape"]) for r in records if r["batch"] > 1}, key=math.prod)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for model in payload["settings"]["models"]:
        mine = [r for r in records if r["model"] == model]
        single = sorted((r for r in mine if r["batch"] == 1), key=lambda r: r["voxels_x_batch"])
        for row, key in enumerate(("s_per_step", "peak_mib")):
            axes[row, 0].plot(
                [r["voxels_x_batch"] for r in single],
                [r[key] for r in single],
                "o-",
                color=COLORS.get(model),
                label=model,
            )
            for style, shape in zip(("o-", "s--", "^:"), batch_shapes, strict=False):
                pts = sorted((r for r in mine if tuple(r["shape"]) == shape), key=lambda r: r["batch"])
                axes[row, 1].plot(
                    [r["batch"] for r in pts],
                    [r[key] for r in pts],
                    style,
                    color=COLORS.get(model),
                    label=f"{model} {'x'.join(map(str, shape))}",
                )
    for row, label in enumerate(("seconds / training step", "peak memory (MiB)")):
        axes[row, 0].set(xlabel="voxels (batch 1)", ylabel=label)
        axes[row, 1].set(xlabel="batch size", ylabel=label)
        for ax in axes[row]:
            if ax.has_data():  # log scales need data
                ax.set(xscale="log", yscale="log")
                ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
        axes[row, 0].xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap
        if axes[row, 1].has_data():
            axes[row, 1].set_xticks([1, 2, 4], labels=["1", "2", "4"])
            axes[row, 1].xaxis.set_minor_formatter(NullFormatter())
    machine, settings = payload["machine"], payload["settings"]
    hardware = machine.get("gpu") or machine["cpu"]
    fig.suptitle(
        f"VAE training step (fwd + MSE/KL + bwd + Adam) on {settings['device']} — {hardware}, "
        f"{machine['torch_threads']} threads, torch {machine['torch']}; "
        f"load avg {settings['load_average_start']}\n"
        "missing points: timeout / skipped (time or memory), see the JSON records",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=3, help="timed steps below 128^3 voxels x batch")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="per-run limit (subprocess killed)")
    parser.add_argument("--budget-s", type=float, default=1500.0, help="start no run after this many seconds")
    parser.add_argument(
        "--max-gib",
        type=float,
        default=None,
        help="skip runs predicted above this (cpu 18, cuda 90%% of device)",
    )
    parser.add_argument("--plot", type=Path, default=BENCH_DIR / "scaling.png")
    parser.add_argument("--plot-only", type=Path, default=None, help="re-plot an existing JSON result")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    add_common_args(parser, cuda_options=False)  # cuda: always bf16 autocast + channels_last_3d
    args = parser.parse_args()

    if args.worker is not None:
        result = measure_config(
            args.worker, tuple(args.shape), args.batch, args.steps, resolve_device(args.device)
        )
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.plot_only is not None:
        plot(json.loads(args.plot_only.read_text()), args.plot)
        return
    device = resolve_device(args.device)
    if args.max_gib is None:
        args.max_gib = (
            0.9 * torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else 18.0
        )
    json_path = args.json or BENCH_DIR / "results" / f"scaling_{device.type}.json"
    info = bench_model.machine_info(device)
    settings = {
        "device": device.type,
        "models": args.models,
        "step": "bench_model.train_step: forward, MSE + 1e-6*KL, backward, Adam",
        "vae_config": {k: list(v) if isinstance(v, tuple) else v for k, v in bench_model.CONFIG.items()},
        "precision": "bf16 autocast, channels_last_3d" if device.type == "cuda" else "fp32",
        "steps": f"1 warm-up + {args.steps} timed (>= 128^3 voxels x batch: 1 + 2); median",
        "timeout_s": args.timeout_s,
        "budget_s": args.budget_s,
        "max_gib": args.max_gib,
        "memory": "cuda max_memory_allocated delta"
        if device.type == "cuda"
        else "peak RSS delta (VmHWM reset, mmap threshold 64 KiB)",
        "load_average_start": load_average(),
    }
    print("machine:", json.dumps(info))
    print("settings:", json.dumps(settings))
    records = run_grid(
        args, lambda done: write_json(json_path, {"machine": info, "settings": settings, "records": done})
    )
    settings["load_average_end"] = load_average()
    payload = {"machine": info, "settings": settings, "records": records}
    write_json(json_path, payload)
    print_tables(records, args.models)
    print("load average (start -> end):", settings["load_average_start"], "->", settings["load_average_end"])
    plot(payload, args.plot)


if __name__ == "__main__":
    reexec_with_mmap_threshold()
    main()
