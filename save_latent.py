"""Encode a split with a trained VAE into one latent file per volume, for training a latent diffusion model.

    python save_latent.py --model_checkpoint best_runs/<run>/best_model.pt --dataset data_csvs/train.csv \\
        [--output_dir latents/train] [--mode mean|sample] [--format npy|nii.gz|pt] [--batch_size 4]
        [--normalise none|global|channel]

Writes to ``--output_dir``: ``<subject_id>.<format>``, the latent (C, d, h, w) float32 (``nii.gz``: (d, h, w, C)
with the latent affine), the posterior mean or a draw seeded by ``--seed`` and the subject id, always
unnormalised; ``manifest.csv``, every input row that has a latent with all its columns + ``latent_path``;
``latent_stats.json``: latent shape, per-channel and global mean/std, ``scale_factor`` = 1/std, mode, the
checkpoint's sha256, number of volumes, and the ``--normalise`` choice as per-channel ``shift``/``scale`` of
``z_normalised = (z - shift) * scale`` (``infer.py --decode --denormalise`` inverts it).

Resumable: existing latents are kept (``--overwrite`` re-encodes them), each written atomically; batches are fixed
chunks of rows (resume with the same ``--batch_size``) and the statistics are read back from every latent of the
manifest, so a killed and resumed run ends as an uninterrupted one. Exit code 1: some files failed (listed at the
end; every other latent is written); 2: the checkpoint, split or output folder is unusable (checked first).
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

from checkpoints import save_json
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
    if path.is_file() and not overwrite and (previous := json.loads(path.read_text())) != settings:
        raise DataError(
            f"{output_dir} holds latents made with other settings ({previous}, now {settings}); "
            "use --overwrite or another --output_dir"
        )


def open_output_dir(output_dir: Path, settings: dict[str, Any]) -> None:
    """Create the output folder (only once there is something to write) and record the run's settings."""
    path = output_dir / SETTINGS_FILE
    if not path.is_file() or path.read_text() != json.dumps(settings, indent=2):
        save_json(settings, path)  # atomic_write: creates the folder


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
        "normalisation": {
            "mode": args.normalise,
            "shift": shift.tolist(),
            "scale": scale.tolist(),
            "formula": "z_normalised = (z - shift) * scale per channel; decode z_normalised / scale + shift",
        },
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
