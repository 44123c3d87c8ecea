"""What every benchmark shares: the machine description, the timing loop, the JSON writer, and THE one way a
benchmark runs ``train.py``'s training (:func:`train_run`) and reads back what the run wrote.

``train`` and pandas are imported where used: ``train_throughput.py`` assembles its JSON after every step of
``gpu_check.sh`` with this module and should not pay for them each time."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
IXI = REPO_ROOT.parent / "shared" / "data" / "ixi"
NEVER = 10**6  # an epoch count no run reaches: "never" for num_epochs, val_every or gan_start_epoch
# run_results key -> metrics.csv column, for the last validation
LAST_METRICS = {
    "val_psnr_brain": "val/psnr_brain",
    "val_ssim_brain": "val/ssim_brain",
    "val_lpips_brain": "val/lpips_brain",
    "val_psnr": "val/psnr",
    "val_ssim": "val/ssim",
    "latent_std": "val/latent_std",
    "latent_std_min": "val/latent_std_min",
    "latent_std_max": "val/latent_std_max",
}
# glibc's mmap threshold, at 64 KiB in a CPU memory run: freed tensor buffers go back to the OS, RSS follows
# the live memory
MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"


# ------------------------------------------------------------------------------------------- the machine


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, cores available, torch/python versions and threads, the GPU when ``device`` is one."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores_available": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> list[float]:
    """1-, 5- and 15-minute load averages (other jobs may share the machine: report them with every result)."""
    return [round(v, 2) for v in os.getloadavg()]


def commit() -> str | None:
    """``$GIT_COMMIT``, else ``git rev-parse HEAD`` (``+dirty`` when the tree has uncommitted changes)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


# ------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of ``run()``, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return time.perf_counter() - start, result


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(step: Callable[[], Any], device: torch.device) -> tuple[float, int]:
    """Run ``step`` once; (seconds, peak extra bytes during it): cuda ``max_memory_allocated`` over the memory
    allocated before, cpu the peak resident set (``VmHWM``, reset first) over the resident set before."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _proc_status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    seconds, _ = timed(step, device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status_kib("VmHWM") * 1024
    return seconds, peak - base


def run_rounds(
    steps: dict[str, Callable[[], Any]], rounds: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """One warm-up round, then ``rounds`` rounds of one step per variant (alternating, so a shared machine's
    load hits all alike); medians. ``{variant: {s_per_step, steps_per_s, peak_mib, s_all, peak_mib_all}}``."""
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


def prepare_process(module: str, argv: list[str], measure: str, device: str) -> None:
    """Re-execute ``python -m module argv`` so that a CPU memory run has the lowered mmap threshold and a
    timing run has not (the lowered threshold slows allocation-heavy models)."""
    if device != "cpu" or not sys.platform.startswith("linux"):
        return
    wanted = "65536" if measure == "memory" else None
    if os.environ.get(MALLOC_ENV) != wanted:
        env = {k: v for k, v in os.environ.items() if k != MALLOC_ENV}
        if wanted:
            env[MALLOC_ENV] = wanted
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def time_and_memory_processes(module: str, argv: list[str]) -> dict[str, Any]:
    """``python -m module argv`` twice (``--measure time``, then ``--measure memory``), their JSON merged: times
    from the plain process, peak memory from the one with the lowered mmap threshold."""
    outputs = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("time", "memory"):
            path = Path(folder) / f"{kind}.json"
            # argparse keeps an option's last value: these two replace any given in argv
            command = [sys.executable, "-m", module, *argv, "--measure", kind, "--json", str(path)]
            subprocess.run(command, check=True, cwd=REPO_ROOT)
            outputs[kind] = json.loads(path.read_text())
    merged = outputs["time"]
    for variant, result in merged["results"].items():
        result["peak_mib"] = outputs["memory"]["results"][variant]["peak_mib"]
        result["peak_mib_all"] = outputs["memory"]["results"][variant].get("peak_mib_all")
    merged["settings"]["measure"] = (
        "times from a plain process; peak memory from a second process (mmap threshold 64 KiB)"
    )
    merged["settings"]["load_average_memory_run"] = outputs["memory"]["settings"].get("load_average_end")
    return merged


def print_table(results: dict[str, dict], refs: tuple[str, ...] = ("maisi", "monai_kl")) -> None:
    """s/step, steps/s, peak MiB, ratios to each reference present (added to ``results``), MFU when known."""
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


# ------------------------------------------------------------------------------------------- output


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON, written atomically (the folder created); no-op for ``None``."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(temporary, path)


# ------------------------------------------------------------------------------------------- training runs


@dataclass(frozen=True)
class TrainRun:
    """A finished ``train.py`` run: its folder (``metrics.csv``, ``config.json``, ``train.log``), its best-model
    folder and the wall-clock seconds of the call."""

    folder: Path
    best_folder: Path
    wall_s: float

    @property
    def metrics_csv(self) -> Path:
        return self.folder / "metrics.csv"


def run_folders(out: Path, name: str) -> tuple[Path, Path]:
    """(run folder, best-model folder) of run ``name`` writing under ``out``."""
    return out / "runs" / name, out / "best_runs" / name


def data_overrides(train_csv: str | Path, val_csv: str | Path) -> list[str]:
    """``--set`` values training on ``train_csv`` and validating on ``val_csv`` (no demo cohort)."""
    return [
        f"data.train_csv={json.dumps(str(train_csv))}",
        f"data.val_csv={json.dumps(str(val_csv))}",
        "data.demo_dir=null",
    ]


def train_run(config_file: str | Path, overrides: list[str], out: Path, name: str) -> TrainRun:
    """THE one place a benchmark trains: ``train.py``'s own code on ``config_file`` + ``overrides`` (the last
    one wins), as run ``name`` under ``out`` (``out/runs/name``, ``out/best_runs/name``; a killed earlier
    attempt's folders are removed first). Exceptions of the run (e.g. ``train.NonFiniteTrainingError``) pass."""
    import train

    folder, best_folder = run_folders(out, name)
    for path in (folder, best_folder):
        shutil.rmtree(path, ignore_errors=True)
    location = [
        f"train.run_name={json.dumps(name)}",
        f"train.runs_dir={json.dumps(str(folder.parent))}",
        f"train.best_runs_dir={json.dumps(str(best_folder.parent))}",
    ]
    argv = ["--config_file", str(config_file)]
    argv += [item for value in [*overrides, *location] for item in ("--set", value)]
    print("train.py", " ".join(argv), flush=True)
    start = time.perf_counter()
    if train.main(argv) != 0:
        raise RuntimeError(f"train.py {' '.join(argv)} failed")
    return TrainRun(folder, best_folder, time.perf_counter() - start)


def run_results(metrics_csv: Path) -> dict[str, Any]:
    """A run's steps, epochs and clock from its metrics.csv, and its LAST validation's metrics (the model the
    budget bought; none when no epoch was validated)."""
    import pandas as pd

    epochs = pd.read_csv(metrics_csv)
    last_epoch = epochs.iloc[-1]
    results: dict[str, Any] = {
        "steps": int(last_epoch["global_step"]),
        "epochs": int(last_epoch["epoch"]) + 1,
        "elapsed_s": round(float(last_epoch["time/elapsed_s"]), 1),
        "stopped_by_time_budget": bool(last_epoch["stopped_by_time_budget"]),
    }
    validated = epochs.dropna(subset=["val/psnr_brain"]) if "val/psnr_brain" in epochs else epochs.iloc[:0]
    if len(validated):
        results.update({key: float(validated.iloc[-1][column]) for key, column in LAST_METRICS.items()})
    return results
