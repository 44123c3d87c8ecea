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
* ``metrics.csv``: per file, every input column (subject_id, image, mask and the CSV's extra columns), then
  MSE, PSNR, SSIM, MS-SSIM, LPIPS3D and their in-brain variants (computed on the preprocessed grid; brain =
  the CSV's mask, else the foreground), PSNR/SSIM/MAE per region (``psnr_gm``, ``ssim_wm``, ``mae_csf``, …:
  tissue classes of the input, and on the MNI grid hemispheres and cortical/deep grey matter, ``regions.py``;
  empty where a segmentation failed; ``--no_region_metrics`` leaves them out), then recon_path and
  latent_path; a mean ± std table on stdout (over the files that have the value).
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
from pathlib import Path

import nibabel as nib
import pandas as pd
import torch
from tqdm import tqdm

from checkpoints import CheckpointError
from config import ConfigError
from dataset import DataError, preflight_failures, preprocessed_batches, read_split, restore_to_input_grid
from latents import (
    LATENT_FORMATS,
    NORMALISATIONS,
    add_model_arguments,
    build_metric_lpips,
    check_output_dir,
    decode_latent_file,
    encode_batch,
    latent_affine,
    load_model,
    maisi_model_config,
    output_paths,
    read_latent_stats,
    row_seed,
    write_latent,
)
from metrics import image_metrics
from regions import batch_region_masks
from utils import autocast


def summary_table(metrics: pd.DataFrame) -> str:
    """One line per metric: mean ± std over the files."""
    lines = [f"{'metric':<16}{'mean ± std':>24}   (n = {len(metrics)})"]
    for name in metrics.columns:
        values = metrics[name].astype(float)
        lines.append(f"{name:<16}{values.mean():>14.4f} ± {values.std(ddof=0):<8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when every file was processed, 1 when some failed, 2 on a fatal error (checkpoint, input)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
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
    parser.add_argument("--output_dir", default="out")
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

    output_dir = Path(args.output_dir)
    try:  # everything that can fail as a whole is checked before any set-up or writing
        model = load_model(args.model_checkpoint, args.device, args.amp, maisi_model_config(args))
        check_output_dir(output_dir)
        if args.decode:
            stats = None if args.latent_stats is None else read_latent_stats(args.latent_stats)
            path = decode_latent_file(model, Path(args.decode), output_dir, stats, args.denormalise)
            print(f"decoded image: {path}")
            return 0
        frame = read_split(args.input_data)
        recon_paths = output_paths(frame, output_dir, "_recon.nii.gz")
        latent_paths = output_paths(frame, output_dir, f"_latent.{args.latent_format}")
    except (CheckpointError, ConfigError, DataError, ValueError, RuntimeError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    vae, prep, factor = model.vae, model.config.preprocessing, model.vae.downsample_factor
    failures = preflight_failures(frame)
    todo = [i for i in range(len(frame)) if i not in failures]
    lpips = None
    if todo and not args.no_lpips:
        lpips, warning = build_metric_lpips(model.config.perceptual)
        if warning:
            print(f"WARNING: {warning}", file=sys.stderr)
        if lpips is not None:
            lpips = lpips.to(model.device)
            print(f"LPIPS3D: {lpips.description}")

    ids = list(frame["subject_id"].astype(str))
    rows, metric_names = [], []
    batches = preprocessed_batches(frame, prep, todo, args.batch_size, args.num_workers)
    with tqdm(total=len(todo), desc="infer", unit="vol", disable=not todo) as progress:
        for batch in batches:
            failures.update({item["index"]: item["error"] for item in batch if item["error"]})
            loaded = [item for item in batch if not item["error"]]
            if loaded:
                volumes = [item["volume"] for item in loaded]
                seeds = [row_seed(args.seed, ids[item["index"]]) for item in loaded]
                latents = encode_batch(model, volumes, args.sample, seeds)  # (B, C, d, h, w)
                with torch.no_grad(), autocast(model.device, model.amp_dtype):
                    recons = vae.decode(latents.to(model.device), tuple(prep.target_shape))
                recons = recons.float().clamp(0.0, 1.0)  # (B, 1, D, H, W) on the preprocessed grid
                targets = torch.stack([v.image for v in volumes]).to(model.device)
                masks = torch.stack([v.mask for v in volumes]).to(model.device)
                regions = None  # tissue classes (+ hemispheres, cortical/deep GM on the MNI grid)
                if not args.no_region_metrics:
                    affines = [v.inverse.output_affine for v in volumes]
                    names = [ids[item["index"]] for item in loaded]
                    regions = batch_region_masks(targets, masks, affines, names)
                values = image_metrics(recons, targets, masks, lpips=lpips, regions=regions)
                metric_names = list(dict.fromkeys([*metric_names, *values]))  # a region some files lack
                output_dir.mkdir(parents=True, exist_ok=True)
                for b, (item, volume) in enumerate(zip(loaded, volumes, strict=True)):
                    recon_path, latent_path = recon_paths[item["index"]], latent_paths[item["index"]]
                    nib.save(restore_to_input_grid(recons[b], volume.inverse, args.intensity), recon_path)
                    write_latent(latents[b], latent_path, latent_affine(volume.inverse.output_affine, factor))
                    rows.append(
                        {
                            **frame.iloc[item["index"]].to_dict(),  # every input column, extras included
                            **{name: float(value[b]) for name, value in values.items()},
                            "recon_path": str(recon_path),
                            "latent_path": str(latent_path),
                        }
                    )
            progress.update(len(batch))

    if rows:
        table = pd.DataFrame(rows)
        table.to_csv(output_dir / "metrics.csv", index=False)
        print(summary_table(table[metric_names]))
        print(
            f"{len(rows)} reconstruction(s) and latent(s) in {output_dir}; per-file metrics: "
            f"{output_dir / 'metrics.csv'}"
        )
    if failures:
        lines = "\n".join(f"  {failures[i]}" for i in sorted(failures))
        print(f"ERROR: {len(failures)} of {len(frame)} file(s) failed:\n{lines}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
