"""Tissue classes on real brains and the cost of per-region metrics (regions.py, metrics.region_metrics).

    python -m bench.regions --output_dir /tmp/regions [--val_csv ../shared/data/ixi/val.csv] [--limit N]
    python -m bench.regions --output_dir /tmp/regions --validation_timing configs/cpu.json [--limit 4] \
        [--set preprocessing.target_spacing=[2,2,2] ...]

Tissue mode (default): every row of the split is preprocessed with the default settings (2 mm, 91×109×91)
and segmented by ``regions.region_masks`` (the code infer.py and validation call; the memo is cleared so
every volume is really segmented). Per subject it writes the CSF/GM/WM fractions of the brain mask, whether
GM (0.35–0.60) and WM (0.30–0.55) lie in the published adult ranges, the volumes of the MNI-grid regions,
the seconds of the segmentation, of ``metrics.image_metrics`` without regions and the extra seconds of
``image_metrics(..., regions=…)`` over it (the region metrics), on a stand-in reconstruction (the input
blurred with a Gaussian of 1 voxel; the cost does not depend on the values). Writes ``tissue.csv``,
``summary.json`` and ``classes.png`` (the classes over the first subject) into ``--output_dir``.

Validation mode (``--validation_timing CONFIG``): ``metrics.validate`` itself, on the first ``--limit`` rows of
the split preprocessed by the config, with a fresh (untrained) VAE and the config's LPIPS3D: after one untimed
warm-up call, once with ``train.region_metrics=false``, then twice with it on (the first call segments every
subject), then three alternating pairs without / with (the memo serving the segmentation, as in every later
epoch); increases against the median call without. Writes ``validation_timing_<shape>.json``.

Every result records the load average before and after (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

import dataset
import regions
from config import PreprocessingConfig, load_config
from metrics import image_metrics, validate
from model import build_perceptual_loss, build_vae
from plotting import regions_figure
from utils import DistributedContext, resolve_amp_dtype

REPO_ROOT = Path(__file__).resolve().parents[1]
IXI_VAL = REPO_ROOT.parent / "shared" / "data" / "ixi" / "val.csv"
GM_RANGE, WM_RANGE = (0.35, 0.60), (0.30, 0.55)


def machine() -> dict[str, object]:
    """Where and under what load it ran."""
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def tissue_mode(frame: pd.DataFrame, output_dir: Path) -> None:
    """Fractions, ranges and per-volume costs over the split; the figure of the first subject."""
    prep = PreprocessingConfig()
    rows = []
    for index, row in frame.iterrows():
        volume = dataset.preprocess_volume(row["image"], prep, row["mask"])
        target, mask = volume.image[None], volume.mask[None]  # (1, 1, D, H, W)
        regions._segmentations.clear()  # really segment (the memo would serve a repeated volume)
        start = time.perf_counter()
        masks = regions.batch_region_masks(target, mask, [volume.inverse.output_affine], [row["subject_id"]])
        segmentation_s = time.perf_counter() - start
        recon = torch.from_numpy(ndimage.gaussian_filter(target.numpy(), (0, 0, 1, 1, 1)))
        start = time.perf_counter()
        image_metrics(recon, target, mask)
        whole_metrics_s = time.perf_counter() - start
        start = time.perf_counter()
        image_metrics(recon, target, mask, regions=masks)
        region_metrics_s = time.perf_counter() - start - whole_metrics_s
        brain = float(mask.sum())
        fractions = {f"{name}_fraction": float(masks[name].sum()) / brain for name in regions.TISSUE_CLASSES}
        rows.append(
            {
                "subject_id": row["subject_id"],
                "brain_ml": brain * 8e-3,
                **fractions,
                "gm_in_range": GM_RANGE[0] <= fractions["gm_fraction"] <= GM_RANGE[1],
                "wm_in_range": WM_RANGE[0] <= fractions["wm_fraction"] <= WM_RANGE[1],
                **{
                    f"{name}_voxels": int(masks[name].sum())
                    for name in regions.ANATOMICAL_REGIONS
                    if name in masks
                },
                "segmentation_s": segmentation_s,
                "region_metrics_s": region_metrics_s,
                "image_metrics_s": whole_metrics_s,
                "load_average_1min": os.getloadavg()[0],
            }
        )
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
        if index == frame.index[0]:
            regions_figure(
                target[0],
                filled={name: masks[name][0] for name in regions.TISSUE_CLASSES},
                outlined={name: masks[name][0] for name in ("deep_gm", "left") if name in masks},
                path=output_dir / "classes.png",
                title=f"{row['subject_id']}: tissue classes (Atropos, {regions.SEGMENTATION_SETTINGS['mrf']}"
                " MRF) filled; deep GM (template zone) and the left hemisphere outlined",
            )
    table = pd.DataFrame(rows)
    table.to_csv(output_dir / "tissue.csv", index=False)
    numeric = table.drop(columns=["subject_id"]).astype(float)
    summary = {
        "split": str(frame.attrs.get("source", "")),
        "subjects": len(table),
        "preprocessing": "default: 2 mm, 91x109x91, percentile intensity",
        "segmentation_settings": regions.SEGMENTATION_SETTINGS,
        "published_ranges": {"gm_fraction": GM_RANGE, "wm_fraction": WM_RANGE},
        "all_in_range": bool(table["gm_in_range"].all() and table["wm_in_range"].all()),
        "mean": numeric.mean().to_dict(),
        "min": numeric.min().to_dict(),
        "max": numeric.max().to_dict(),
        "machine": machine(),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("subjects", "all_in_range", "mean", "min", "max")}, indent=1))


def validation_mode(frame: pd.DataFrame, config_file: str, overrides: list[str], output_dir: Path) -> None:
    """metrics.validate without, then twice with, region metrics; seconds and load for each call."""
    config = load_config(config_file, overrides)
    configs = {enabled: load_config(config_file, [*overrides, f"train.region_metrics={str(enabled).lower()}"])
               for enabled in (False, True)}  # fmt: skip
    val_set = dataset.VolumeDataset(frame, config.preprocessing, augmentation=None, cache="memory")
    for i in range(len(val_set)):  # fill the cache: preprocessing is not validation time
        val_set[i]
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    vae = build_vae(config.model)
    lpips = build_perceptual_loss(config.perceptual)
    amp = resolve_amp_dtype(config.train.amp, context.device)
    validate(vae, val_set, lpips, configs[False], context, amp)  # warm-up (first-call set-up), untimed
    results = []
    calls = [("without", False), ("with_first", True)] + [("without", False), ("with_cached", True)] * 3
    for label, enabled in calls:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        metrics, _, _ = validate(vae, val_set, lpips, configs[enabled], context, amp)
        seconds = time.perf_counter() - start
        results.append({"call": label, "seconds": seconds, "load_before": load_before,
                        "load_after": os.getloadavg()[0], "has_psnr_gm": "val/psnr_gm" in metrics})  # fmt: skip
        print(results[-1], flush=True)

    def median(label: str) -> float:
        return float(np.median([r["seconds"] for r in results if r["call"] == label]))

    without = median("without")
    report = {
        "config_file": config_file,
        "overrides": overrides,
        "subjects": len(frame),
        "target_shape": list(config.preprocessing.target_shape),
        "calls": results,
        "median_without_s": without,
        "increase_first": median("with_first") / without - 1,
        "increase_cached": median("with_cached") / without - 1,
        "machine": machine(),
    }
    name = f"validation_timing_{'x'.join(map(str, config.preprocessing.target_shape))}.json"
    (output_dir / name).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("increase_first", "increase_cached")}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--val_csv", default=str(IXI_VAL))
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows of the split")
    parser.add_argument("--validation_timing", metavar="CONFIG", help="time validate() under this config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    args = parser.parse_args(argv)
    frame = dataset.read_split(args.val_csv).head(args.limit)
    frame.attrs["source"] = args.val_csv
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}", flush=True)
    if args.validation_timing:
        validation_mode(frame, args.validation_timing, args.overrides, args.output_dir)
    else:
        tissue_mode(frame, args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
