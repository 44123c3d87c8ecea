"""Data-loading throughput: volumes/s per cache mode and worker count, first vs second epoch.

    python bench/bench_data.py [--split /work/shared/data/ixi/train.csv] [--limit 40] [--augment]
        [--workers 0 2]

Uses the IXI train split when present, else the demo cohort (built under data/demo on first use). The
memory cache is filled when the dataset is built (timed as "build"); the disk cache is filled during the
first epoch (fresh temporary cache folder per run).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import AugmentationConfig, DataConfig, PreprocessingConfig  # noqa: E402
from dataset import build_dataset, read_split  # noqa: E402
from demo_cohort import ensure_demo_data  # noqa: E402

IXI_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "ixi" / "train.csv"


def epoch_seconds(loader: DataLoader) -> float:
    """Seconds to iterate ``loader`` once."""
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--split", default=str(IXI_TRAIN) if IXI_TRAIN.is_file() else None)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--augment", action="store_true", help="apply the default training augmentation")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    args = parser.parse_args()
    if args.split is None:
        data = DataConfig()
        ensure_demo_data(data)
        args.split = data.train_csv
    frame = read_split(args.split)
    if args.limit:
        frame = frame.head(args.limit)
    prep = PreprocessingConfig()
    augmentation = AugmentationConfig() if args.augment else None

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__} (threads {torch.get_num_threads()}), python {platform.python_version()}"
    )
    print(
        f"split: {args.split} ({len(frame)} volumes), target shape {prep.target_shape}, "
        f"batch {args.batch_size}, augmentation {'default' if augmentation else 'off'}"
    )
    print(
        f"{'cache':<7}{'workers':>8}{'build s':>9}{'epoch1 s':>10}{'epoch1 vol/s':>14}{'epoch2 s':>10}"
        f"{'epoch2 vol/s':>14}"
    )
    for cache in ("none", "memory", "disk"):
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as cache_dir:
                start = time.perf_counter()
                dataset = build_dataset(frame, prep, augmentation, cache=cache, cache_dir=Path(cache_dir))
                build = time.perf_counter() - start
                loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers)
                first, second = epoch_seconds(loader), epoch_seconds(loader)
            n = len(dataset)
            print(
                f"{cache:<7}{workers:>8}{build:>9.2f}{first:>10.2f}{n / first:>14.1f}{second:>10.2f}"
                f"{n / second:>14.1f}"
            )


if __name__ == "__main__":
    main()
