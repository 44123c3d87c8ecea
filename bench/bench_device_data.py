"""Augmented training batches per second: today's DataLoader path vs the device path (device_data.py).

    python bench/bench_device_data.py [--device cpu|cuda] [--n 8] [--batch_size 2] [--shape 91 109 91]
        [--probs default|all] [--workers 0] [--epochs 2] [--split CSV] [--json out.json]

Both paths are ``train.py``'s own, built by ``device_data.make_loaders`` and iterated by ``device_data.epoch_batches``
(shuffle seeding, ``set_epoch``, copy to ``--device``) exactly as training does, so both deliver the same
batches (same shuffle, same per-item augmentation):
* ``monai`` (``data.device_cache=off``): DataLoader over ``VolumeDataset`` (memory cache, per-item MONAI
  augmentation in ``--workers`` workers), collate, copy to the device (pinned when cuda);
* ``device`` (``data.device_cache=on``): ``DeviceBatches`` over a float16 ``DeviceVolumeCache`` on the device,
  augmentation drawn on the CPU (a thread, one batch ahead) and applied batched with torch ops.
Also timed alone: ``draw``, the CPU part of the device path (MONAI's random streams, incl. the noise values).
Volumes are synthetic heads at the target shape (written to a temporary folder) unless ``--split`` is given;
the validation set is the same volumes (``make_loaders`` builds both; its time is the ``set-up`` column).
One untimed epoch, then ``--epochs`` timed ones, the paths alternating epoch by epoch (a shared machine's load
hits both alike); medians; cuda synchronised. ``--probs all`` sets every augmentation probability to 1 (the
worst case), ``default`` keeps config.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from torch.utils.data import BatchSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from config import AugmentationConfig, Config  # noqa: E402
from dataset import read_split  # noqa: E402
from device_data import DeviceBatches, cache_fits, epoch_batches, make_loaders  # noqa: E402
from utils import DistributedContext  # noqa: E402

SEED = 0
PATHS = {"monai": "off", "device": "on"}  # name -> data.device_cache


def synthetic_split(folder: Path, n: int, shape: tuple[int, int, int]) -> pd.DataFrame:
    """``n`` textured ellipsoid 'heads' (int16, 2 mm, zero background) as a split frame."""
    rng = np.random.default_rng(SEED)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    paths = []
    for i in range(n):
        inside = ((grid / rng.uniform(0.7, 0.9, (3, 1, 1, 1))) ** 2).sum(0) < 1
        texture = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), 2.0)
        volume = np.where(inside, 400 + 3000 * texture, 0).clip(0).astype(np.int16)
        paths.append(folder / f"sub{i:03d}.nii.gz")
        nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), paths[-1])
    return pd.DataFrame(
        {"subject_id": [p.stem for p in paths], "image": [str(p) for p in paths], "mask": None}
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_batches(
    csv: Path, args: argparse.Namespace, aug: AugmentationConfig, device_cache: str, device: torch.device
) -> tuple[train.Run, object, torch.Generator, float]:
    """``device_data.make_loaders`` of a config with ``data.device_cache=device_cache``: (run, training batches,
    shuffle generator, set-up seconds)."""
    config = Config.from_dict(
        {
            "data": {
                "train_csv": str(csv),
                "val_csv": str(csv),
                "demo_dir": None,
                "cache": "memory",
                "num_workers": args.workers,
                "device_cache": device_cache,
            },
            "preprocessing": {"target_shape": list(args.shape)},
            "augmentation": dataclasses.asdict(aug),
            "train": {"batch_size": args.batch_size, "seed": SEED, "device": device.type},
        }
    )
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    start = time.perf_counter()
    batches, _, generator = make_loaders(config, context)
    setup_s = time.perf_counter() - start
    return train.Run(config, context, None, csv.parent), batches, generator, setup_s


def epoch_rate(run: train.Run, batches, generator: torch.Generator, epoch: int) -> float:
    """Volumes/s of one epoch of ``device_data.epoch_batches`` (the images training gets, on the run's device)."""
    device = run.context.device
    synchronize(device)
    start, count = time.perf_counter(), 0
    for images in epoch_batches(batches, generator, run.config.train, device, epoch, 0, len(batches)):
        count += images.shape[0]
    synchronize(device)
    return count / (time.perf_counter() - start)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    text = f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} (threads {torch.get_num_threads()})"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return f"{text}, python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=8, help="volumes (first N rows of --split)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs=3, default=[91, 109, 91])
    parser.add_argument("--probs", choices=["default", "all"], default="default")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the monai path")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one untimed)")
    parser.add_argument("--split", default=None, help="a split CSV instead of synthetic volumes")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    aug = AugmentationConfig()
    if args.probs == "all":
        aug = dataclasses.replace(
            aug,
            affine_prob=1.0,
            bias_field_prob=1.0,
            gamma_prob=1.0,
            noise_prob=1.0,
            flip_left_right_prob=1.0,
        )

    with tempfile.TemporaryDirectory() as folder:
        if args.split:
            frame = read_split(args.split).head(args.n)
        else:
            frame = synthetic_split(Path(folder), args.n, tuple(args.shape))
        csv = Path(folder) / "split.csv"
        frame.to_csv(csv, index=False)
        paths = {mode: training_batches(csv, args, aug, state, device) for mode, state in PATHS.items()}
    _, fit_reason = cache_fits(len(frame), tuple(args.shape), device)
    device_batches: DeviceBatches = paths["device"][1]
    cache = device_batches.cache

    print(f"machine: {machine(device)}")
    print(
        f"settings: device {device}, {len(frame)} volumes of {'x'.join(map(str, args.shape))}, batch "
        f"{args.batch_size}, augmentation probs {args.probs}, monai workers {args.workers}, "
        f"{args.epochs} timed epochs"
    )
    setup = {mode: round(entry[3], 2) for mode, entry in paths.items()}
    print(
        f"set-up (make_loaders, train + val) s: {setup}; device cache {cache.nbytes / 2**20:.1f} MiB; {fit_reason}"
    )

    def draw_rate(epoch: int) -> float:
        """Volumes/s of the CPU part of the device path alone (augmentation.draw of every batch)."""
        start = time.perf_counter()
        for indices in BatchSampler(range(len(frame)), args.batch_size, drop_last=False):
            device_batches.augmentation.draw(indices, epoch, tuple(args.shape))
        return len(frame) / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {"monai": [], "device": [], "draw_only": []}
    for epoch in range(args.epochs + 1):
        epoch_rates = {
            mode: epoch_rate(run, batches, gen, epoch) for mode, (run, batches, gen, _) in paths.items()
        }
        epoch_rates["draw_only"] = draw_rate(epoch)
        if epoch > 0:  # the first epoch warms up
            for name, rate in epoch_rates.items():
                rates[name].append(rate)
    median = {name: float(np.median(values)) for name, values in rates.items()}

    results = {
        "machine": machine(device),
        "settings": {**vars(args), "n": len(frame), "augmentation": dataclasses.asdict(aug)},
        "cache_bytes": cache.nbytes,
        "setup_s": setup,
        "fit_reason": fit_reason,
        "volumes_per_s": median,
        "volumes_per_s_per_epoch": rates,
    }
    print(f"{'path':<10}{'volumes/s':>12}{'ms/volume':>12}")
    for name, rate in results["volumes_per_s"].items():
        print(f"{name:<10}{rate:>12.2f}{1000 / rate:>12.1f}")
    print(f"device / monai: {median['device'] / median['monai']:.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
