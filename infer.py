"""Reconstruct T1 volumes with a trained VAE, save their latents, and decode latents back to images.

    python infer.py --model_checkpoint best_runs/<run>/best_model.pt --input_data sub-01_T1w.nii.gz [--output_dir out/]
    python infer.py --model_checkpoint best_runs/<run>/best_model.pt --input_data data_csvs/test.csv   # or a folder
    python infer.py --model_checkpoint best_runs/<run>/best_model.pt --decode out/sub-01_T1w_latent.nii.gz
    python infer.py --model_checkpoint best_runs/<run>/best_model.pt --decode sample.nii.gz \\
        --denormalise channel --latent_stats latents/train/latent_stats.json     # a diffusion sample

Per input file, into ``--output_dir``: ``<subject_id>_recon.nii.gz`` on the input file's own grid and affine;
``<subject_id>_latent.<format>`` (C, d, h, w), as NIfTI (d, h, w, C) with the latent affine (latent voxel = the
centre of its f-block of preprocessed voxels); a ``metrics.csv`` row: every input column, ``mask_source``
(``csv`` or ``estimated``), MSE, PSNR, SSIM, MS-SSIM, LPIPS3D, their in-brain variants and PSNR/SSIM/MAE per
region (``regions.py``; empty where a segmentation failed), all on the preprocessed grid, then recon_path and
latent_path; mean ± std on stdout. A brain mask over half the field of view gets a ``WARNING:`` line. LPIPS3D
uses the backbone's default weights when the checkpoint's ``perceptual.weights_path`` is not on this machine.

``--decode`` of a saved latent gives the reconstruction on the preprocessed grid, values in [0, 1]. Exit code 1:
some files failed (listed at the end; the others are processed); 2: the checkpoint (one that needs code
execution to load is refused), input or output folder is unusable (all checked before anything is written).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

from script_args import LATENT_FORMATS, NORMALISATIONS, script_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__, output_dir="out")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input_data", help="a NIfTI file, a folder of them, or a split CSV")
    source.add_argument(
        "--decode",
        metavar="LATENT",
        help="decode a latent .nii.gz (as saved, or in normalised units with --denormalise)",
    )
    parser.add_argument(
        "--denormalise",
        default="none",
        choices=NORMALISATIONS,
        help="with --decode: the latent is in these normalised units (needs --latent_stats)",
    )
    parser.add_argument("--latent_stats", help="latent_stats.json of save_latent.py, for --denormalise")
    parser.add_argument(
        "--intensity", default="original", choices=["original", "unit"], help="recon: input's units or [0, 1]"
    )
    parser.add_argument("--sample", action="store_true", help="save/decode a posterior draw, not the mean")
    parser.add_argument("--latent_format", default="nii.gz", choices=LATENT_FORMATS)
    parser.add_argument("--no_lpips", action="store_true", help="leave out the LPIPS3D metrics")
    parser.add_argument(
        "--no_region_metrics", action="store_true", help="leave out the per-region metrics (psnr_gm, …)"
    )
    args = parser.parse_args(argv)
    if args.denormalise != "none" and (args.decode is None or args.latent_stats is None):
        parser.error(
            "--denormalise needs --decode and --latent_stats (the latent_stats.json of save_latent.py)"
        )
    return args


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before torch and MONAI load (seconds)

import nibabel as nib
import pandas as pd
from tqdm import tqdm

from dataset import brain_mask_warning, restore_to_input_grid
from latents import (
    FATAL_ERRORS,
    EncodedSubject,
    SplitEncoder,
    build_metric_lpips,
    decode_latent_file,
    fatal,
    write_latent,
)
from metrics import image_metrics
from model import LPIPS3D
from regions import batch_region_masks
from utils import DeviceOutOfMemoryError


def reconstruct(
    subject: EncodedSubject, split: SplitEncoder, lpips: LPIPS3D | None, regions: bool
) -> dict[str, Any]:
    """Write one subject's reconstruction (on its input grid, ``--intensity`` units) and latent; returns its
    metrics.csv row (metrics on the preprocessed grid; with ``regions``, per region of its input too)."""
    volume, device, args, row = subject.volume, split.model.device, split.args, split.frame.iloc[subject.row]
    if warning := brain_mask_warning(volume):
        tqdm.write(f"WARNING: {warning}", file=sys.stderr)
    recon = split.model.decode(subject.latent[None])  # (1, 1, D, H, W), as --decode gives it
    target, mask = volume.image[None].to(device), volume.mask[None].to(device)  # (1, 1, D, H, W)
    masks = None  # tissue classes of the input (+ hemispheres, cortical/deep GM on the MNI grid)
    if regions:
        masks = batch_region_masks(target, mask, [volume.inverse.output_affine], [str(row["subject_id"])])
    values = image_metrics(recon, target, mask, lpips=lpips, regions=masks)
    recon_path = split.output_path(subject.row, "_recon.nii.gz")
    latent_path = split.output_path(subject.row, f"_latent.{args.latent_format}")
    write_latent(subject.latent, latent_path, subject.latent_affine)  # creates the output folder
    nib.save(restore_to_input_grid(recon[0], volume.inverse, args.intensity), recon_path)
    return {
        **row.to_dict(),
        "mask_source": volume.mask_source,
        **{name: float(value[0]) for name, value in values.items()},
        "recon_path": str(recon_path),
        "latent_path": str(latent_path),
    }


def write_metrics(rows: list[dict[str, Any]], split: SplitEncoder) -> None:
    """metrics.csv, one row per file, and on stdout one line per metric: mean ± std over the files that have
    it (a region only on the MNI grid, a failed segmentation: empty cells)."""
    table, path = pd.DataFrame(rows), Path(split.args.output_dir) / "metrics.csv"
    first, last = [*split.frame.columns, "mask_source"], ["recon_path", "latent_path"]
    metrics = table.drop(columns=first + last)
    table[first + list(metrics.columns) + last].to_csv(path, index=False)  # a region seen late: not last
    print(f"{'metric':<16}{'mean ± std':>24}   (n = {len(metrics)})")
    for name in metrics.columns:
        values = metrics[name].astype(float)
        print(f"{name:<16}{values.mean():>14.4f} ± {values.std(ddof=0):<8.4f}")
    print(f"{len(rows)} reconstruction(s) and latent(s) in {path.parent}; per-file metrics: {path}")


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when every file was processed, 1 when some failed, 2 on a fatal error (checkpoint, input)."""
    args = parse_args(argv)
    try:  # everything that can fail as a whole is checked before any set-up or writing
        if args.decode:
            print(f"decoded image: {decode_latent_file(args)}")
            return 0
        split = SplitEncoder(args, args.input_data)
    except FATAL_ERRORS as error:
        return fatal(error)
    lpips = None  # built only when there is something to do
    if split.good_rows and not args.no_lpips:
        lpips = build_metric_lpips(split.model.config.perceptual, split.model.device)
    reconstruct_one = partial(reconstruct, split=split, lpips=lpips, regions=not args.no_region_metrics)
    rows = split.encode(split.good_rows, reconstruct_one, args.sample)
    if rows:
        write_metrics(rows, split)
    return split.report_failures()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DeviceOutOfMemoryError as error:  # one line, no traceback; latents already written are kept
        sys.exit(fatal(error))
