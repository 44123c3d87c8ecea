"""Does train.py's CPU time estimate match the run it announces? (issue 17: "≈ 28 min" for an 8 min run)

    python -m bench.cpu_estimate [--config_file configs/cpu.json] [--set section.key=value ...]
        [--out_dir bench/results/cpu_estimate]

Runs ``train.main`` (train.py's own code, through :func:`bench.harness.train_run`) on the preset into a
temporary folder, records the estimate it announces before the first step (``train.estimate_cpu_step_seconds``,
train.py's own function, wrapped only to read its return value) and compares the announced total (seconds per
step × the run's steps) with the measured wall-clock time of the whole ``train.main`` call (set-up,
validations, checkpoints and the slower GAN-stage steps included, as the user sees it) and with the training
epochs alone. Prints the machine, the settings and the 1-minute load average before and after (on a shared
machine the absolute times are inflated; the ratio is what matters), and writes ``--out_dir/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from unittest import mock

import pandas as pd
import torch

import train
from bench import harness
from config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config_file", default="configs/cpu.json", help="the preset to run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out_dir", default="bench/results/cpu_estimate", help="where summary.json goes")
    args = parser.parse_args(argv)

    estimate, estimates = train.estimate_cpu_step_seconds, []

    def recording(*arguments: object) -> float:
        estimates.append(estimate(*arguments))
        return estimates[-1]

    load_before = harness.load_average()[0]
    with tempfile.TemporaryDirectory(prefix="cpu_estimate_") as work:
        with mock.patch.object(train, "estimate_cpu_step_seconds", recording):
            overrides = [*args.overrides, 'train.device="cpu"']
            run = harness.train_run(args.config_file, overrides, Path(work), "cpu_estimate")
        history = pd.read_csv(run.metrics_csv)
    load_after = harness.load_average()[0]
    if len(estimates) != 1:
        raise RuntimeError(f"expected one CPU estimate from train.main, got {len(estimates)}")
    steps, step_s = int(history["global_step"].iloc[-1]), estimates[0]
    batch_size = load_config(args.config_file, args.overrides).train.batch_size
    seconds_per_step = batch_size / history["train/volumes_per_s"]  # per epoch
    steps_per_epoch = history["global_step"].diff().fillna(history["global_step"])
    summary = {
        "command": "python -m bench.cpu_estimate "
        + " ".join([f"--config_file {args.config_file}", *(f"--set {o}" for o in args.overrides)]),
        "machine": harness.machine_info(torch.device("cpu")),
        "load_1min_before": load_before,
        "load_1min_after": load_after,
        "steps": steps,
        "epochs": len(history),
        "estimated_step_s": round(step_s, 4),
        "estimated_run_s": round(step_s * steps, 1),
        "measured_run_s": round(run.wall_s, 1),
        "measured_training_epochs_s": round(float((seconds_per_step * steps_per_epoch).sum()), 1),
        "measured_over_estimated": round(run.wall_s / (step_s * steps), 3),
        "pretrain_step_s": round(float(seconds_per_step[history["stage"] == "pretrain"].mean()), 4),
        "gan_step_s": round(float(seconds_per_step[history["stage"] == "gan"].mean()), 4),
    }
    harness.write_json(Path(args.out_dir) / "summary.json", summary)
    print(json.dumps(summary, indent=2))
    print(
        f"estimate {summary['estimated_run_s'] / 60:.1f} min ({step_s:.3f} s/step × {steps} steps), measured "
        f"{run.wall_s / 60:.1f} min end to end: measured/estimated = {summary['measured_over_estimated']:.2f} "
        f"(load {load_before:.1f} → {load_after:.1f} on {summary['machine']['cpu_cores_available']} cores)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
