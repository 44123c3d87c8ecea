"""Reconstruct T1 volumes with a trained VAE, save their latents, and decode latents back to images.

    python infer.py --model_checkpoint best_runs/<run>/best_model.pt --input_data sub-01_T1w.nii.gz [--output_dir out/]
    python infer.py --model_checkpoint best_runs/<run>/best_model.pt --input_data data_csvs/test.csv   # or a folder
    python infer.py --model_checkpoint best_runs/<run>/best_model.pt --decode out/sub-01_T1w_latent.nii.gz
    python infer.py --model_checkpoint best_runs/<run>/best_model.pt --decode sample.nii.gz \
        --denormalise channel --latent_stats latents/train/latent_stats.json     # a diffusion sample

Per input file, into ``--output_dir``:

* ``<subject_id>_recon.nii.gz``: the reconstruction on the input file's own grid and affine (orientation,
  pad/crop and resampling undone by ``dataset.restore_to_input_grid``), in the input's intensity units
  (``--intensity original``) or in [0, 1] (``--intensity unit``);
* ``<subject_id>_latent.<nii.gz|npy|pt>``: the latent (posterior mean; ``--sample`` for a draw seeded by
  ``--seed`` and the subject id) (C, d, h, w); as NIfTI (d, h, w, C) with the latent affine = preprocessed-grid
  affine @ [[f,0,0,(f-1)/2],[0,f,0,(f-1)/2],[0,0,f,(f-1)/2],[0,0,0,1]] (latent voxel = centre of its f-block);
* ``metrics.csv``: per file, every input column (subject_id, image, mask and the CSV's extra columns),
  ``mask_source`` (``csv``: the brain is the CSV's mask; ``estimated``: ``dataset.estimate_brain_mask``),
  then MSE, PSNR, SSIM, MS-SSIM, LPIPS3D and their in-brain variants (computed on the preprocessed grid),
  PSNR/SSIM/MAE per region (``psnr_gm``, ``ssim_wm``, ``mae_csf``, …: tissue classes of the input, and on
  the MNI grid hemispheres and cortical/deep grey matter, ``regions.py``; empty where a segmentation failed;
  ``--no_region_metrics`` leaves them out), then recon_path and latent_path; a mean ± std table on stdout
  (over the files that have the value). A brain mask covering more than half the field of view (a raw head,
  not a skull-stripped brain) gets a ``WARNING:`` line naming the file.
  LPIPS3D uses the checkpoint's backbone, with its default weights when the checkpoint's
  ``perceptual.weights_path`` is not on this machine; without any weights (or with ``--no_lpips``) the
  lpips columns are left out, with a warning.

The reconstruction is the decoded saved latent, so ``--decode`` of that latent gives the same image (on the
preprocessed grid: affine recovered from the latent's affine, shape = the config's preprocessing.target_shape,
values in [0, 1]). A latent in the diffusion model's normalised units (``save_latent.py --normalise``) is
mapped back first with ``--denormalise global|channel --latent_stats latent_stats.json``
(``latents.denormalise_latent``: ``z = z_normalised / scale + shift`` per channel). Files that fail the
pre-flight check or preprocessing are listed at the end (exit code 1); the others are processed. A checkpoint
that needs code execution to load is refused (exit code 2). The checkpoint, the input and the output folder
are checked first; the output folder is created only when there is something to write into it.
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
    parser.add_argument("--intensity", default="original", choices=["original", "unit"])
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
    decode_batch,
    decode_latent_file,
    fatal,
    load_model,
    read_latent_stats,
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
    metrics.csv row: every input column (extras included), mask_source, the metrics (on the preprocessed
    grid; with ``regions``, per region of this subject's input too), then the two paths. A head-sized brain
    mask gets a ``WARNING:`` line naming the file."""
    volume, device, args = subject.volume, split.model.device, split.args
    if warning := brain_mask_warning(volume):
        tqdm.write(f"WARNING: {warning}", file=sys.stderr)
    recon = decode_batch(split.model, subject.latent[None])  # (1, 1, D, H, W), as --decode gives it
    target, mask = volume.image[None].to(device), volume.mask[None].to(device)  # (1, 1, D, H, W)
    masks = None  # tissue classes of the input (+ hemispheres, cortical/deep GM on the MNI grid)
    if regions:
        name = str(split.frame.iloc[subject.row]["subject_id"])
        masks = batch_region_masks(target, mask, [volume.inverse.output_affine], [name])
    values = image_metrics(recon, target, mask, lpips=lpips, regions=masks)
    recon_path = split.output_path(subject.row, "_recon.nii.gz")
    latent_path = split.output_path(subject.row, f"_latent.{args.latent_format}")
    recon_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(restore_to_input_grid(recon[0], volume.inverse, args.intensity), recon_path)
    write_latent(subject.latent, latent_path, subject.latent_affine)
    return {
        **split.frame.iloc[subject.row].to_dict(),
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
    table[first + list(metrics.columns) + last].to_csv(
        path, index=False
    )  # a region first seen late: not last
    print(f"{'metric':<16}{'mean ± std':>24}   (n = {len(metrics)})")
    for name in metrics.columns:
        values = metrics[name].astype(float)
        print(f"{name:<16}{values.mean():>14.4f} ± {values.std(ddof=0):<8.4f}")
    print(f"{len(rows)} reconstruction(s) and latent(s) in {path.parent}; per-file metrics: {path}")


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when every file was processed, 1 when some failed, 2 on a fatal error (checkpoint, input)."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    try:  # everything that can fail as a whole is checked before any set-up or writing
        if args.decode:
            model = load_model(args)
            stats = None if args.latent_stats is None else read_latent_stats(args.latent_stats)
            path = decode_latent_file(model, Path(args.decode), output_dir, stats, args.denormalise)
            print(f"decoded image: {path}")
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
