"""Training speed on a GPU in one JSON: ``train.py``'s own throughput, the model-step speed against MONAI
``AutoencoderKL`` (eager and compiled) and the time to quality.

    python -m bench.train_throughput --results DIR [--train [--config config.json] [--train_csv ...]
        [--val_csv ...] [--epochs 4] [--gan_start_epoch 2] [--set section.key=value ...]] [--dry_run]

(Re)writes ``DIR/train_throughput.json`` from what ``DIR`` holds (``bench/gpu_check.sh`` calls it after every
step; a key not measured is ``null`` with a note). ``--train`` first runs the short ``train.py`` run the
throughput keys come from (``DIR/runs/throughput_*``: epoch 0 and a stage's first epoch left out, per stage the
median of ``train/volumes_per_s``; peak memory the largest epoch's). The speed ratios (AutoencoderKL's s/step ÷
ours, > 1: ours is faster) come from ``DIR/model_eager.json`` / ``model_compile.json`` of ``bench.model_step``,
``time_to_quality`` from ``DIR/time_to_quality.json`` of ``bench.quality``, the device from ``DIR/env.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import harness
from bench.harness import IXI, REPO_ROOT

KEYS = (
    "pretrain_volumes_per_s",
    "gan_volumes_per_s",
    "peak_memory_gib",
    "model_step_eager_speed_vs_autoencoderkl",
    "model_step_compiled_speed_vs_autoencoderkl",
    "time_to_quality",
)

# the run's config.json values the JSON records: section -> keys
RUN_SETTINGS = {
    "train": ("batch_size", "amp", "compile", "channels_last", "recompute"),
    "data": ("device_cache", "num_workers", "train_csv"),
    "preprocessing": ("target_shape",),
}


def run_train(results: Path, args: argparse.Namespace) -> None:
    """The short ``train.py`` run the throughput keys come from (in this process)."""
    overrides = [
        *harness.data_overrides(args.train_csv, args.val_csv),
        f"train.num_epochs={args.epochs}",
        f"train.gan_start_epoch={args.gan_start_epoch}",
        f"train.val_every={harness.NEVER}",
        *args.overrides,
    ]
    harness.train_run(args.config, overrides, results, "throughput_" + time.strftime("%Y%m%d_%H%M%S"))


def latest_run(results: Path) -> Path | None:
    """The newest ``DIR/runs/throughput_*`` folder with a ``metrics.csv``."""
    runs = sorted(p.parent for p in (results / "runs").glob("throughput_*/metrics.csv"))
    return runs[-1] if runs else None


def throughput(run_dir: Path) -> dict[str, Any]:
    """Per-stage volumes/s (epoch 0 and a stage's first epoch left out, see the module docstring), peak GiB."""
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    per_stage: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        per_stage.setdefault(row["stage"], []).append((int(row["epoch"]), float(row["train/volumes_per_s"])))
    out: dict[str, Any] = {"epochs": {}, "used_epochs": {}}
    for stage, epochs in per_stage.items():
        out["epochs"][stage] = {epoch: value for epoch, value in epochs}
        kept = [(e, v) for e, v in epochs if e > 0]
        if len(epochs) > 1 and kept and kept[0][0] == epochs[0][0]:
            kept = kept[1:]  # the stage's first epoch (epoch 0 was already left out otherwise)
        out["used_epochs"][stage] = [e for e, _ in kept]
        out[stage] = statistics.median(v for _, v in kept) if kept else None
    out["peak_memory_gib"] = max(float(row["train/peak_memory_gb"]) for row in rows) if rows else None
    config = json.loads((run_dir / "config.json").read_text())
    out["config"] = {key: config[section][key] for section, keys in RUN_SETTINGS.items() for key in keys}
    log = run_dir / "train.log"
    if log.exists():
        keys = ("device cache", "recompute", "amp=", "train:")
        out["log"] = [
            line.split(" ", 2)[-1] for line in log.read_text().splitlines() if any(k in line for k in keys)
        ]
    return out


def speed_ratio(path: Path) -> tuple[float | None, dict[str, Any]]:
    """AutoencoderKL's s/step ÷ ours from a ``bench.model_step`` JSON, and what it was measured with."""
    data = json.loads(path.read_text())
    ours, monai = (data["results"][variant]["s_per_step"] for variant in ("ours", "monai_kl"))
    settings = data["settings"]
    details = {key: settings[key] for key in ("shape", "batch", "precision", "compile")}
    details["channels_last_3d"] = settings["inputs_and_monai_models_channels_last_3d"]
    return monai / ours, {"ours_s_per_step": ours, "autoencoderkl_s_per_step": monai, **details}


def step_status(results: Path) -> dict[str, str]:
    """``gpu_check.sh``'s ``status.txt``: step name -> its last line (exit code / skipped)."""
    path = results / "status.txt"
    if not path.exists():
        return {}
    return {line.split()[0]: line for line in path.read_text().splitlines() if line.strip()}


def machine(results: Path) -> tuple[str | None, str | None]:
    """(device name, torch version): ``env.json`` (``gpu_check.sh``'s first step), else this process."""
    env = results / "env.json"
    if env.exists():
        data = json.loads(env.read_text())
        return data.get("device"), data.get("torch")
    info = harness.machine_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return info.get("gpu", info["cpu"]), info["torch"]


def assemble(results: Path, dry_run: bool) -> dict[str, Any]:
    """The JSON from whatever ``results`` holds (missing keys null, with a note)."""
    status = step_status(results)
    notes: list[str] = []
    values: dict[str, Any] = dict.fromkeys(KEYS)
    settings: dict[str, Any] = {}

    def missing(keys: str, step: str, what: str) -> None:
        state = status.get(step, f"{step}: not run")
        notes.append(f"{keys}: null — {what} not found in {results} ({state})")

    run_dir = latest_run(results)
    if run_dir is not None:
        measured = throughput(run_dir)
        values["pretrain_volumes_per_s"] = measured.get("pretrain")
        values["gan_volumes_per_s"] = measured.get("gan")
        values["peak_memory_gib"] = measured["peak_memory_gib"]
        settings["throughput_run"] = {k: v for k, v in measured.items() if k not in ("pretrain", "gan")}
        settings["throughput_run"]["folder"] = str(run_dir)
        for stage in ("pretrain", "gan"):
            if measured.get(stage) is None:
                notes.append(
                    f"{stage}_volumes_per_s: null — the train.py run has no {stage} epoch after epoch 0"
                )
    else:
        missing(
            "pretrain_volumes_per_s, gan_volumes_per_s, peak_memory_gib", "throughput", "runs/throughput_*"
        )
    for key, name in (
        ("model_step_eager_speed_vs_autoencoderkl", "model_eager"),
        ("model_step_compiled_speed_vs_autoencoderkl", "model_compile"),
    ):
        path = results / f"{name}.json"
        if path.exists():
            values[key], settings[name] = speed_ratio(path)
        else:
            missing(key, "model", f"{name}.json")
    path = results / "time_to_quality.json"
    ttq = json.loads(path.read_text()) if path.exists() else None
    if ttq is not None and ttq.get("baseline_val_psnr_brain") is not None:
        values["time_to_quality"] = {
            k: ttq[k] for k in ("seconds", "val_psnr_brain", "val_ssim_brain", "baseline_val_psnr_brain")
        }
        settings["time_to_quality"] = {
            "baseline_val_ssim_brain": ttq["baseline_val_ssim_brain"],
            "ours_steps": ttq["ours_steps"],
            "baseline_steps": ttq["baseline_steps"],
            "ours_pretrain_volumes_per_s_median": ttq["ours"]["volumes_per_s_median_after_epoch_0"],
            "overrides": ttq["settings"]["overrides"],
            "baseline": ttq["settings"]["baseline"],
        }
    else:
        what = (
            "time_to_quality.json with both runs"
            if ttq is None
            else "the baseline half of time_to_quality.json"
        )
        missing("time_to_quality", "time_to_quality", what)
    device, torch_version = machine(results)
    out: dict[str, Any] = {"device": device, "torch": torch_version, "commit": harness.commit()}
    if dry_run:
        out["dry_run"] = True
        notes.insert(
            0, "DRY RUN on the CPU with tiny settings: the numbers test the script, they measure nothing"
        )
    out.update(values)
    out["settings"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "results": str(results),
        "steps": status,
        **settings,
    }
    out["notes"] = notes
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, required=True, help="the folder the pieces are in")
    parser.add_argument("--out", type=Path, default=None, help="default: <results>/train_throughput.json")
    parser.add_argument("--train", action="store_true", help="run the short train.py run first")
    parser.add_argument("--config", default=str(REPO_ROOT / "config.json"))
    parser.add_argument("--train_csv", default=str(IXI / "train.csv"))
    parser.add_argument("--val_csv", default=str(IXI / "val.csv"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--gan_start_epoch", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument(
        "--dry_run", action="store_true", help="mark the JSON as a dry run (numbers meaningless)"
    )
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.train:
        run_train(args.results, args)
    out = args.out or args.results / "train_throughput.json"
    result = assemble(args.results, args.dry_run)
    harness.write_json(out, result)
    summary = {k: result[k] for k in ("device", "torch", *KEYS)}
    print(f"{out}: {json.dumps(summary)}")
    for note in result["notes"]:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
