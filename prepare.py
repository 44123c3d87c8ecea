"""Raw T1w scans -> model-ready volumes: N4, deepbet brain extraction, affine to MNI152 on the FSL 2 mm grid, QC.

    python prepare.py --input raw/ --output_dir prepared/ [--jobs 2]
    python prepare.py --input cohort.csv --output_dir prepared/ --shard $SLURM_ARRAY_TASK_ID/100   # 0..99
    python prepare.py --merge prepared/

Writes images/, masks/, qc/ (a PNG and a provenance JSON per subject), qc.csv, prepared.csv (the split that
dataset.py --check, train.py, infer.py and save_latent.py take; flagged subjects left out unless
--keep_flagged), qc_overview.png (worst NCC first) and provenance.json. A shard writes qc.part-K.csv;
--merge joins the parts. Subjects already prepared with the same options are skipped (resume). QC
thresholds: NCC >= 0.3, Dice >= 0.85, affine determinant in 0.4-1.6 (preprocess_raw.QC_THRESHOLDS).
Exit code: 0 done, 1 some inputs could not be prepared (one line each), 2 bad arguments or split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd

import preprocess_raw as pr
from dataset import DataError, read_split


def _shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N (0 <= K < N), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 0 <= K < N, got {text!r}")
    return k, n


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--input", help="a folder of NIfTI scans, a split CSV (image column) or one NIfTI file"
    )
    action.add_argument("--merge", metavar="OUTPUT_DIR", help="join the qc.part-K.csv of OUTPUT_DIR")
    parser.add_argument("--output_dir", help="where images/, masks/, qc/ and the CSVs go")
    parser.add_argument("--jobs", type=int, default=1, help="subjects prepared in parallel processes")
    parser.add_argument("--shard", type=_shard, help="K/N: prepare rows K, K+N, K+2N, ... (0-based K)")
    parser.add_argument(
        "--keep_flagged", action="store_true", help="keep QC-flagged subjects in prepared.csv"
    )
    parser.add_argument("--skip_bias_correction", action="store_true", help="no N4 (already corrected)")
    parser.add_argument(
        "--skip_brain_extraction",
        action="store_true",
        help="input already skull-stripped: brain mask = the CSV's mask column, else the non-zero voxels",
    )
    parser.add_argument("--registration", choices=["affine", "rigid", "none"], default="affine")
    return parser


def _run(rows: list[dict[str, Any]], output_dir: Path, options: pr.PrepareOptions, jobs: int) -> list[dict]:
    """QC rows in input order; one progress line per subject as it finishes."""
    results: list[dict | None] = [None] * len(rows)

    def report(index: int, result: dict) -> None:
        results[index] = result
        done = sum(r is not None for r in results)
        status = result["status"]
        if status.startswith("error:"):
            line = f"ERROR: {rows[index]['image']}: {status.removeprefix('error:')}"
        else:
            resumed = " (done before, skipped)" if result.get("resumed") else f" {result['seconds']} s"
            line = (
                f"{result['subject_id']}: {status} ncc {result['ncc']:.3f} dice {result['dice']:.3f}{resumed}"
            )
        print(f"[{done}/{len(rows)}] {line}", flush=True)

    if jobs <= 1 and pr.init_worker():  # else ITK is already multi-threaded here: a fresh worker process
        for i, row in enumerate(rows):
            report(i, pr.prepare_subject(row, output_dir, options))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max(jobs, 1), mp_context=context, initializer=pr.init_worker) as pool:
            futures = {
                pool.submit(pr.prepare_subject, row, output_dir, options): i for i, row in enumerate(rows)
            }
            for future in as_completed(futures):
                index = futures[future]
                try:
                    result = future.result()
                except Exception as error:  # a worker process that died (e.g. out of memory)
                    result = {
                        "subject_id": rows[index]["subject_id"],
                        "source_image": rows[index]["image"],
                        "status": f"error:worker failed: {type(error).__name__}: {error}",
                    }
                report(index, result)
    return [r for r in results if r is not None]


def _finish(qc: pd.DataFrame, output_dir: Path, keep_flagged: bool) -> int:
    """Write qc.csv, prepared.csv, the overview sheet; print the summary; the exit code."""
    pr.write_csv_atomic(qc, output_dir / "qc.csv")
    prepared = pr.prepared_table(qc, keep_flagged)
    pr.write_csv_atomic(prepared, output_dir / "prepared.csv")
    overview = pr.save_overview(qc, output_dir)
    return _summary(qc, f"{len(prepared)} subject(s) in {output_dir / 'prepared.csv'}", overview)


def _summary(qc: pd.DataFrame, written: str, overview: Path | None) -> int:
    errors = qc[qc["status"].str.startswith("error:")]
    flagged = qc[qc["status"].str.startswith("flagged")]
    ok = int(qc["status"].eq("ok").sum())
    print(f"\n{ok} ok, {len(flagged)} flagged, {len(errors)} error(s) of {len(qc)}; {written}")
    if overview is not None:
        print(f"QC overview (worst NCC first): {overview}")
    for _, row in flagged.iterrows():
        print(
            f"FLAGGED: {row['subject_id']}: {row['status'].removeprefix('flagged:')} (ncc {row['ncc']:.3f}, "
            f"dice {row['dice']:.3f}, det {row['affine_det']:.3f}); see qc/{row['subject_id']}.png"
        )
    for _, row in errors.iterrows():
        print(f"ERROR: {row['source_image']}: {row['status'].removeprefix('error:')}")
    return 1 if len(errors) else 0


def main(argv: list[str] | None = None) -> int:
    """Prepare (a shard of) a split, or merge shard parts; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.merge:
        output_dir = Path(args.merge)
        try:
            qc = pr.merge_parts(output_dir)
        except (pr.InputError, OSError, ValueError) as error:
            print(f"ERROR: {error}", file=sys.stderr)
            return 2
        return _finish(qc, output_dir, args.keep_flagged)
    if not args.output_dir:
        parser.error("--input needs --output_dir")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    try:
        frame = read_split(args.input)
    except DataError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    options = pr.PrepareOptions(
        bias_correction=not args.skip_bias_correction,
        brain_extraction=not args.skip_brain_extraction,
        registration=args.registration,
    )
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    provenance = {"input": str(Path(args.input).resolve()), "options": dataclasses.asdict(options)}
    provenance |= pr.run_provenance()
    pr.write_text_atomic(json.dumps(provenance, indent=1), output_dir / "provenance.json")
    shard = pr.shard_rows(frame, args.shard)
    rows = shard.to_dict("records")
    results = _run(rows, output_dir, options, args.jobs)
    label = f"{args.shard[0]}/{args.shard[1]}" if args.shard else "0/1"
    qc = pr.qc_table(results, shard, label)
    if args.shard is None:
        return _finish(qc, output_dir, args.keep_flagged)
    part = pr.part_path(output_dir, args.shard)
    pr.write_csv_atomic(qc, part)
    return _summary(qc, f"{part} (join the shards with: python prepare.py --merge {output_dir})", None)


if __name__ == "__main__":
    sys.exit(main())
