"""Time to quality: ``train.py`` for S seconds of wall clock vs the MONAI-recipe baseline for the same S seconds.

    python bench/bench_quality_time.py [--seconds 180] [--config config.json] [--set train.x=...]
        [--train_csv ../shared/data/ixi/train.csv] [--val_csv ../shared/data/ixi/val.csv]
        [--device auto|cpu|cuda] [--baseline_workers N] [--out bench/results/time_to_quality]

* Ours: ``train.main`` with ``--config`` (default: the seed config, ``config.json``), the two splits and
  ``train.time_budget_s=S``; ``train.val_every`` is set beyond the run (a ``--set`` can change it), so the budget
  goes to training and the one validation runs after it, as the baseline's evaluation does. Its clock starts
  before the data set-up (``train.Run``). Quality = the last validation row of its ``metrics.csv``.
* Baseline: ``bench/quality.py``'s ``train_baseline`` (MONAI ``AutoencoderKL`` + ``PatchDiscriminator``,
  L1 + 1e-7·KL + 0.1·adversarial, same data, preprocessing, augmentation, batch, optimiser, precision) for S
  seconds on the same device, its clock also starting before its data set-up; then ``evaluate_baseline``
  (``metrics.image_metrics``, in-brain = the CSV's masks) on the validation split.

Writes ``--json`` (default ``<out>/time_to_quality.json``) after each of the two runs: seconds,
``val_psnr_brain`` / ``val_ssim_brain`` (ours), ``baseline_val_psnr_brain`` / ``baseline_val_ssim_brain``,
steps and wall-clock of each, settings and machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_model  # noqa: E402
import quality  # noqa: E402
from train_runs import NEVER, location_overrides, run_folders, train_argv  # noqa: E402

import train  # noqa: E402
from config import load_config  # noqa: E402
from model import build_perceptual_loss  # noqa: E402
from utils import resolve_device  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_ours(config_file: str, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """``train.main`` with ``overrides``; the quality, steps and timing of its last validation."""
    run_name = f"ttq_ours_{time.strftime('%Y%m%d_%H%M%S')}"
    argv = train_argv(config_file, [*overrides, *location_overrides(out_dir, run_name)])
    start = time.perf_counter()
    if train.main(argv) != 0:
        raise RuntimeError(f"train.main {argv} failed")
    wall = time.perf_counter() - start
    metrics_csv = run_folders(out_dir, run_name)[0] / "metrics.csv"
    history = pd.read_csv(metrics_csv)
    validated = history.dropna(subset=["val/psnr_brain"])
    if validated.empty:
        raise RuntimeError(f"{metrics_csv} has no validation row")
    last = validated.iloc[-1]
    later_epochs = history[history["epoch"] > 0]["train/volumes_per_s"]
    return {
        "val_psnr_brain": float(last["val/psnr_brain"]),
        "val_ssim_brain": float(last["val/ssim_brain"]),
        "val_psnr": float(last["val/psnr"]),
        "steps": int(last["global_step"]),
        "epochs": int(last["epoch"]) + 1,
        "train_s": float(last["time/elapsed_s"]),
        "wall_s": wall,
        "volumes_per_s_median_after_epoch_0": float(later_epochs.median()) if len(later_epochs) else None,
        "stages": sorted(set(history["stage"])),
        "metrics_csv": str(metrics_csv),
    }


def run_baseline(
    config_file: str,
    overrides: list[str],
    seconds: float,
    device: torch.device,
    workers: int | None,
    out: Path,
) -> dict[str, Any]:
    """``quality.train_baseline`` for ``seconds``, then ``quality.evaluate_baseline`` on the validation split."""
    config = load_config(config_file, overrides)
    start = time.perf_counter()
    model, train_s, steps = quality.train_baseline(
        config, out, time_budget_s=seconds, device=device, num_workers=workers
    )
    lpips = build_perceptual_loss(config.perceptual).to(device)
    table = quality.evaluate_baseline(model, config, config.data.val_csv, lpips, device)
    table.to_csv(out / "baseline_val_metrics.csv", index=False)
    return {
        "val_psnr_brain": float(table["psnr_brain"].mean()),
        "val_ssim_brain": float(table["ssim_brain"].mean()),
        "val_psnr": float(table["psnr"].mean()),
        "steps": steps,
        "train_s": train_s,
        "wall_s": time.perf_counter() - start,
        "num_workers": config.data.num_workers if workers is None else workers,
    }


def summary(seconds: float, ours: dict | None, baseline: dict | None, settings: dict) -> dict[str, Any]:
    """The result JSON; a run not (yet) done leaves its keys null."""
    ours, baseline = ours or {}, baseline or {}
    return {
        "seconds": seconds,
        "val_psnr_brain": ours.get("val_psnr_brain"),
        "val_ssim_brain": ours.get("val_ssim_brain"),
        "baseline_val_psnr_brain": baseline.get("val_psnr_brain"),
        "baseline_val_ssim_brain": baseline.get("val_ssim_brain"),
        "ours_steps": ours.get("steps"),
        "baseline_steps": baseline.get("steps"),
        "ours": ours or None,
        "baseline": baseline or None,
        "settings": settings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=180.0, help="wall-clock budget of each run")
    parser.add_argument(
        "--config", default=str(REPO_ROOT / "config.json"), help="ours (and the baseline's data)"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="config override for both runs (after this script's own), e.g. perceptual.weights_path=...",
    )  # fmt: skip
    parser.add_argument("--train_csv", default=str(quality.IXI / "train.csv"))
    parser.add_argument("--val_csv", default=str(quality.IXI / "val.csv"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--baseline_workers",
        type=int,
        default=None,
        help="baseline DataLoader workers (default data.num_workers)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "time_to_quality")
    parser.add_argument("--json", type=Path, default=None, help="default: <out>/time_to_quality.json")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out / "time_to_quality.json"
    device = resolve_device(args.device)
    overrides = [
        f"data.train_csv={json.dumps(args.train_csv)}",
        f"data.val_csv={json.dumps(args.val_csv)}",
        "data.demo_dir=null",
        f"train.device={json.dumps(device.type)}",
        f"train.time_budget_s={args.seconds}",
        f"train.val_every={NEVER}",
        *args.overrides,
    ]
    settings = {
        "config": args.config,
        "overrides": overrides,
        "device": str(device),
        "machine": bench_model.machine_info(device),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "baseline": "MONAI AutoencoderKL + PatchDiscriminator, L1 + 1e-7*KL + 0.1*LSGAN (bench/quality.py)",
    }
    print("settings:", json.dumps(settings))

    def write(ours: dict | None, baseline: dict | None) -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary(args.seconds, ours, baseline, settings), indent=2))

    ours = run_ours(args.config, overrides, args.out)
    write(ours, None)
    print(f"ours: {json.dumps(ours)}", flush=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    baseline = run_baseline(args.config, overrides, args.seconds, device, args.baseline_workers, args.out)
    write(ours, baseline)
    print(f"baseline: {json.dumps(baseline)}")
    print(
        f"time to quality ({args.seconds:.0f} s each, {device}): in-brain PSNR ours {ours['val_psnr_brain']:.2f} dB "
        f"({ours['steps']} steps) vs MONAI-recipe baseline {baseline['val_psnr_brain']:.2f} dB "
        f"({baseline['steps']} steps); in-brain SSIM {ours['val_ssim_brain']:.4f} vs {baseline['val_ssim_brain']:.4f}"
    )
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
