"""Encode a split with a trained VAE into one latent file per volume, for training a latent diffusion model.

    python save_latent.py --model_checkpoint best_runs/<run>/best_model.pt --dataset data_csvs/train.csv \\
        [--output_dir latents/train] [--mode mean|sample] [--format npy|nii.gz|pt] [--batch_size 4]
        [--normalise none|global|channel]

Writes to ``--output_dir``:

* ``<subject_id>.<format>``: the latent (C, d, h, w) float32 (``nii.gz``: (d, h, w, C) with the latent affine),
  the posterior mean, or (``--mode sample``) a draw seeded per row (``--seed`` + subject id), so reruns match;
* ``manifest.csv``: every input row with ALL its columns + ``latent_path`` (rows that failed are left out);
* ``latent_stats.json``: latent shape, per-channel mean/std, global std, ``scale_factor`` = 1/std, the mode,
  the checkpoint's sha256, the number of volumes, and ``normalisation``: the per-channel ``shift``/``scale``
  with which the diffusion stage maps a latent to its units, ``z_normalised = (z - shift) * scale``
  (``--normalise``: ``none``, ``global`` = × scale_factor, ``channel`` = each channel to mean 0 / std 1;
  ``latents.normalise_latent`` / ``denormalise_latent`` apply it and its inverse). The latent files stay
  unnormalised whatever the choice (the statistics need every latent first, and resuming stays simple);
  ``infer.py --decode LATENT --denormalise MODE --latent_stats latent_stats.json`` decodes a sample made in
  normalised units.

Resumable: latents that already exist are kept (``--overwrite`` re-encodes them); each one is written atomically
(temporary file + rename); batches are fixed chunks of rows (resume with the same ``--batch_size``); the
statistics are streamed over every latent of the manifest, read back from disk in row order. So a killed and
resumed run ends with the same latents, manifest and statistics as an uninterrupted one. Files that fail the
pre-flight check or preprocessing are listed at the end (exit code 1); every other latent is still written.
The checkpoint, the split and the output folder are checked first; the folder is created only when a latent or
the manifest is to be written into it.

Model loading, encoding and latent files: ``latents.py``; preprocessing and the pre-flight check: ``dataset.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from script_args import LATENT_FORMATS, NORMALISATIONS, script_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__, output_dir="latents")
    parser.add_argument("--dataset", required=True, help="split CSV, folder of NIfTI files or one NIfTI file")
    parser.add_argument("--mode", default="mean", choices=["mean", "sample"])
    parser.add_argument("--format", default="npy", choices=LATENT_FORMATS)
    parser.add_argument("--overwrite", action="store_true", help="re-encode latents that already exist")
    parser.add_argument(
        "--normalise",
        default="none",
        choices=NORMALISATIONS,
        help="normalisation recorded in latent_stats.json for the diffusion stage (files stay unnormalised)",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before torch and MONAI load (seconds)

from tqdm import tqdm

from dataset import DataError
from latents import (
    FATAL_ERRORS,
    EncodedSubject,
    SplitEncoder,
    fatal,
    latent_normalisation,
    read_latent,
    write_latent,
)
from metrics import LatentStatistics
from utils import DeviceOutOfMemoryError

SETTINGS_FILE = ".save_latent_settings.json"


def check_settings(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume into a folder whose latents were made with another checkpoint / mode / seed."""
    path = output_dir / SETTINGS_FILE
    if path.is_file() and not overwrite:
        previous = json.loads(path.read_text())
        if previous != settings:
            raise DataError(
                f"{output_dir} holds latents made with other settings ({previous}, now {settings}); "
                "use --overwrite or another --output_dir"
            )


def open_output_dir(output_dir: Path, settings: dict[str, Any]) -> None:
    """Create the output folder (only once there is something to write) and record the run's settings."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / SETTINGS_FILE
    text = json.dumps(settings, indent=2)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def statistics_table(summary: dict[str, Any], output_dir: Path) -> str:
    """The latent statistics, one line per channel (mean, std, scale 1/std), then the global ones and the
    normalisation recorded for the diffusion stage."""
    lines = [
        f"{summary['num_volumes']} latents {summary['latent_shape']} in {output_dir}",
        f"{'channel':>9}{'mean':>11}{'std':>10}{'1/std':>10}",
    ]
    for channel, (mean, std) in enumerate(zip(summary["channel_mean"], summary["channel_std"], strict=True)):
        lines.append(f"{channel:>9}{mean:>11.4g}{std:>10.4g}{1 / std if std else math.inf:>10.4g}")
    lines.append(f"{'all':>9}{summary['mean']:>11.4g}{summary['std']:>10.4g}{summary['scale_factor']:>10.4g}")
    described = {
        "none": "none (latents as saved)",
        "global": "global (z × scale_factor)",
        "channel": "per channel ((z − mean_c) / std_c)",
    }[summary["normalisation"]["mode"]]
    lines.append(f"normalisation for the diffusion stage: {described}; see latent_stats.json")
    return "\n".join(lines)


def write_manifest_and_statistics(split: SplitEncoder, paths: list[Path], settings: dict[str, Any]) -> None:
    """manifest.csv (the good rows that have a latent, every input column + ``latent_path``) and
    latent_stats.json, streamed over those latents read back from disk in row order (resume-proof), and the
    statistics table on stdout; nothing without a latent. ValueError (DataError too) when every value, or one
    channel under ``--normalise channel``, is constant over the whole split."""
    args, written = split.args, [i for i in split.good_rows if paths[i].is_file()]
    if not written:
        return
    output_dir = Path(args.output_dir)
    open_output_dir(output_dir, settings)
    stats = LatentStatistics(split.model.vae.latent_channels)
    for i in tqdm(written, desc="statistics", unit="vol"):
        latent, _ = read_latent(paths[i])
        stats.update(latent[None])
    manifest = split.frame.iloc[written].assign(latent_path=[str(paths[i].resolve()) for i in written])
    manifest.to_csv(output_dir / "manifest.csv", index=False)
    statistics = stats.summary()
    shift, scale = latent_normalisation(statistics, args.normalise)
    summary: dict[str, Any] = {
        "latent_shape": list(latent.shape),  # of every latent
        **statistics,
        "mode": args.mode,
        "seed": args.seed if args.mode == "sample" else None,
        "format": args.format,
        "checkpoint": str(Path(args.model_checkpoint).resolve()),
        "checkpoint_sha256": settings["checkpoint_sha256"],
        "num_volumes": len(written),
    }
    summary["normalisation"] = {
        "mode": args.normalise,
        "shift": shift.tolist(),
        "scale": scale.tolist(),
        "formula": "z_normalised = (z - shift) * scale per channel; decode z_normalised / scale + shift",
    }
    (output_dir / "latent_stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(statistics_table(summary, output_dir))


def main(argv: list[str] | None = None) -> int:
    """Returns 0 when every row was encoded, 1 when some failed, 2 on a fatal error (bad checkpoint/split)."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    try:  # everything that can fail as a whole is checked before any set-up or writing
        split = SplitEncoder(args, args.dataset)
        with open(args.model_checkpoint, "rb") as file:
            checkpoint_sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        settings = {"checkpoint_sha256": checkpoint_sha256, "mode": args.mode, "seed": args.seed}
        check_settings(output_dir, settings, args.overwrite)
    except FATAL_ERRORS as error:
        return fatal(error)
    for stale in output_dir.glob(".*.tmp"):  # temporary files of a killed run
        stale.unlink()
    paths = [split.output_path(i, f".{args.format}") for i in range(len(split.frame))]
    # batches are fixed chunks of the good rows; a chunk with a missing latent is re-encoded whole, so every
    # latent comes from the same batch as in an uninterrupted run (results depend on the batch in the last bits)
    good = split.good_rows
    chunks = [good[k : k + args.batch_size] for k in range(0, len(good), args.batch_size)]
    redo = [chunk for chunk in chunks if args.overwrite or not all(paths[i].is_file() for i in chunk)]
    todo = [i for chunk in redo for i in chunk]
    print(
        f"{len(split.frame)} rows: {len(good) - len(todo)} latents kept, {len(todo)} to encode, "
        f"{len(split.failures)} failed the pre-flight check; device {split.model.device}, mode {args.mode}, "
        f"batch size {args.batch_size}"
    )

    def write(subject: EncodedSubject) -> None:
        open_output_dir(output_dir, settings)
        write_latent(subject.latent, paths[subject.row], subject.latent_affine)

    split.encode(todo, write, sample=args.mode == "sample")
    try:
        write_manifest_and_statistics(split, paths, settings)
    except ValueError as error:  # DataError too: every value, or one channel, constant over the whole split
        return fatal(f"{output_dir / 'latent_stats.json'} not written: {error}")
    return split.report_failures(" (left out of the manifest)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DeviceOutOfMemoryError as error:  # one line, no traceback; latents already written are kept
        sys.exit(fatal(error))
