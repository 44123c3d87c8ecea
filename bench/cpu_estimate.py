"""Does train.py's CPU time estimate match the run it announces? (issue 17: "≈ 28 min" for an 8 min run)

    python -m bench.cpu_estimate [--config_file configs/cpu.json] [--set section.key=value ...]
        [--out_dir bench/results/cpu_estimate]

Runs ``train.fit`` (train.py's own code, imported) on the preset into a temporary folder, records the
estimate it announces before the first step (``device_data.estimate_cpu_step_seconds`` through the
name train.py calls, wrapped only to read its return value) and compares the announced total (seconds per step × the run's steps)
with the measured wall-clock time of the whole ``train.fit`` call (set-up, validations, checkpoints and the
slower GAN-stage steps included, as the user sees it) and with the training epochs alone. Prints the
machine, the settings and the 1-minute load average before and after (on a shared machine the absolute
times are inflated; the ratio is what matters), and writes ``--out_dir/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

import train
from bench import harness
from config import load_config


@contextmanager
def recorded_estimates() -> Iterator[list[float]]:
    """While open, every value ``train.estimate_cpu_step_seconds`` returns is appended to the yielded list."""
    original, seen = train.estimate_cpu_step_seconds, []

    def recording(*args: object) -> float:
        seconds = original(*args)
        seen.append(seconds)
        return seconds

    train.estimate_cpu_step_seconds = recording
    try:
        yield seen
    finally:
        train.estimate_cpu_step_seconds = original


def machine() -> dict[str, object]:
    """CPU model, cores this process may use, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config_file", default="configs/cpu.json", help="the preset to run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out_dir", default="bench/results/cpu_estimate", help="where summary.json goes")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="cpu_estimate_") as work:
        overrides = [*args.overrides, 'train.device="cpu"']
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        with recorded_estimates() as estimates:
            run = harness.train_run(args.config_file, overrides, Path(work), "cpu_estimate")
        measured_s = time.perf_counter() - start
        load_after = os.getloadavg()[0]
        history = pd.read_csv(run.metrics_csv)
    if len(estimates) != 1:
        raise RuntimeError(f"expected one CPU estimate from train.fit, got {len(estimates)}")
    steps = int(history["global_step"].iloc[-1])
    step_s = estimates[0]
    batch_size = load_config(args.config_file, args.overrides).train.batch_size
    seconds_per_step = batch_size / history["train/volumes_per_s"]  # per epoch
    steps_per_epoch = history["global_step"].diff().fillna(history["global_step"])
    training_s = float((seconds_per_step * steps_per_epoch).sum())
    summary = {
        "command": "python -m bench.cpu_estimate "
        + " ".join([f"--config_file {args.config_file}", *(f"--set {o}" for o in args.overrides)]),
        "machine": machine(),
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(load_after, 2),
        "steps": steps,
        "epochs": len(history),
        "estimated_step_s": round(step_s, 4),
        "estimated_run_s": round(step_s * steps, 1),
        "measured_run_s": round(measured_s, 1),
        "measured_training_epochs_s": round(training_s, 1),
        "measured_over_estimated": round(measured_s / (step_s * steps), 3),
        "pretrain_step_s": round(float(seconds_per_step[history["stage"] == "pretrain"].mean()), 4),
        "gan_step_s": round(float(seconds_per_step[history["stage"] == "gan"].mean()), 4),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(
        f"estimate {summary['estimated_run_s'] / 60:.1f} min ({step_s:.3f} s/step × {steps} steps), measured "
        f"{measured_s / 60:.1f} min end to end: measured/estimated = {summary['measured_over_estimated']:.2f} "
        f"(load {load_before:.1f} → {load_after:.1f} on {summary['machine']['cpu_cores_available']} cores)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
