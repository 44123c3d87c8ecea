"""Running ``train.main`` (train.py's own code, imported) from a benchmark, and reading back what it wrote.

Shared by ``recipe.py``, ``train_throughput.py`` and ``bench_quality_time.py``: the command line of a run, the
folders it writes under an output folder, and its validated epochs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

NEVER = 10**6  # an epoch count no run reaches: "never" for num_epochs, val_every or gan_start_epoch


def run_folders(out: Path, name: str) -> tuple[Path, Path]:
    """(run folder, best-model folder) of run ``name`` writing under ``out``."""
    return out / "runs" / name, out / "best_runs" / name


def location_overrides(out: Path, name: str) -> list[str]:
    """``--set`` values naming the run ``name`` and putting its folders under ``out``."""
    runs, best_runs = (folder.parent for folder in run_folders(out, name))
    return [
        f"train.run_name={json.dumps(name)}",
        f"train.runs_dir={json.dumps(str(runs))}",
        f"train.best_runs_dir={json.dumps(str(best_runs))}",
    ]


def train_argv(config_file: str | Path, overrides: list[str]) -> list[str]:
    """train.py's command line: ``--config_file`` and one ``--set`` per override (the last one wins)."""
    return ["--config_file", str(config_file), *(item for value in overrides for item in ("--set", value))]


def validated_epochs(metrics_csv: Path) -> pd.DataFrame:
    """The validated epochs of a run's metrics.csv (rows with ``val/psnr_brain``)."""
    history = pd.read_csv(metrics_csv)
    if "val/psnr_brain" not in history:
        return history.iloc[:0]
    return history.dropna(subset=["val/psnr_brain"])
