"""prepare.py against the shared IXI references: brain masks, registration, 2 mm vs 1 mm inputs, time, --jobs.

    python -m bench.prepare_accuracy --output_dir /tmp/prepare_bench          # from the repository root

Runs ``prepare.main`` (the code users run, imported) on the 8 native IXI heads listed in
``../shared/data/ixi/native/native.csv`` and on 1 mm versions of them (resampled linearly with ANTs into
``--output_dir``), and compares with the references of that folder's README:

* ``masks_native`` (deepbet on the N4-corrected scan) vs ``reference_mask`` (native grid; a 1 mm mask is
  brought back onto the native 2 mm grid by linear interpolation, > 0.5): Dice;
* the registered image vs ``reference_mni2mm``: Pearson r inside the reference mask;
* the registered mask vs ``reference_mni2mm_mask``: Dice.

Runs: 2 mm with ``--jobs 1`` and ``--jobs 2`` (scaling; the two must give identical bytes), 1 mm with
``--jobs 2``; each also with ``--skip_bias_correction`` (the references had no N4, so r is only comparable
there). Writes per-run folders under ``--output_dir`` (not committed) and ``summary.json``,
``subjects.csv`` and the 2 mm QC overview sheet into ``--results_dir``. The machine load (``os.getloadavg``)
is recorded beside every timing: measured on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.processing import resample_to_output

import prepare
import preprocess_raw

REPO_ROOT = Path(__file__).resolve().parents[1]
NATIVE_CSV = REPO_ROOT.parent / "shared" / "data" / "ixi" / "native" / "native.csv"
FLOORS = {
    "mask_dice_median": 0.94,
    "mask_dice_worst": 0.90,
    "pearson_r_median": 0.90,
    "mni_dice_median": 0.90,
}
ONE_MM_TOLERANCE = 0.02


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _canonical(path: str | Path) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.load(str(path)))


def make_1mm_inputs(native: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """The native scans resampled to 1 mm isotropic (nibabel, linear); the same CSV with their paths.

    nibabel, not ANTs: ANTs used in this process before ``prepare.main`` would fix ITK's thread count.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for _, row in native.iterrows():
        target = folder / f"{row['subject_id']}_T1_1mm.nii.gz"
        if not target.is_file():
            scan = nib.load(row["image"])
            scan = nib.Nifti1Image(scan.get_fdata(dtype=np.float32), scan.affine)
            nib.save(resample_to_output(scan, voxel_sizes=(1.0, 1.0, 1.0), order=1), target)
        rows.append({**row, "image": str(target)})
    return pd.DataFrame(rows)


def _native(native_csv: Path) -> pd.DataFrame:
    frame = pd.read_csv(native_csv, dtype={"subject_id": str})
    for column in ("image", "reference_mask", "reference_mni2mm", "reference_mni2mm_mask"):
        frame[column] = [str((native_csv.parent / p).resolve()) for p in frame[column]]
    return frame


def run_prepare(frame: pd.DataFrame, run_dir: Path, jobs: int, extra: list[str]) -> dict:
    """``prepare.main`` on ``frame`` (written as the input CSV) into ``run_dir``: wall time and load."""
    run_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(run_dir / "input.csv", index=False)
    load_before = os.getloadavg()
    start = time.perf_counter()
    code = prepare.main(
        [
            "--input",
            str(run_dir / "input.csv"),
            "--output_dir",
            str(run_dir / "out"),
            "--jobs",
            str(jobs),
            *extra,
        ]
    )
    wall = time.perf_counter() - start
    return {
        "exit_code": code,
        "jobs": jobs,
        "flags": extra,
        "wall_s": round(wall, 1),
        "wall_s_per_subject": round(wall / len(frame), 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def score(frame: pd.DataFrame, out: Path) -> pd.DataFrame:
    """Per subject: mask Dice (native grid), Pearson r and mask Dice vs the MNI references, QC, seconds."""
    qc = pd.read_csv(out / "qc.csv", dtype={"subject_id": str}).set_index("subject_id")
    rows = []
    for _, row in frame.iterrows():
        sid = row["subject_id"]
        paths = preprocess_raw.output_paths(sid)
        reference = _canonical(row["reference_mask"])
        ours = _canonical(out / paths["native_mask"])
        ours_on_reference = _resample_like(ours, reference)
        image = np.asarray(nib.load(out / paths["image"]).dataobj, dtype=np.float64)
        mask = np.asarray(nib.load(out / paths["mask"]).dataobj) > 0
        ref_image = np.asarray(nib.load(row["reference_mni2mm"]).dataobj, dtype=np.float64)
        ref_mask = np.asarray(nib.load(row["reference_mni2mm_mask"]).dataobj) > 0
        rows.append(
            {
                "subject_id": sid,
                "mask_dice_native": round(_dice(ours_on_reference, np.asarray(reference.dataobj) > 0), 4),
                "pearson_r_mni": round(float(np.corrcoef(image[ref_mask], ref_image[ref_mask])[0, 1]), 4),
                "mask_dice_mni": round(_dice(mask, ref_mask), 4),
                "qc_status": qc.loc[sid, "status"],
                "qc_ncc": qc.loc[sid, "ncc"],
                "seconds": qc.loc[sid, "seconds"],
            }
        )
    return pd.DataFrame(rows)


def _resample_like(mask: nib.Nifti1Image, reference: nib.Nifti1Image) -> np.ndarray:
    """``mask`` on ``reference``'s grid (identity when equal; else linear interpolation, > 0.5)."""
    if mask.shape == reference.shape and np.allclose(mask.affine, reference.affine, atol=1e-3):
        return np.asarray(mask.dataobj) > 0
    from nilearn.image import resample_to_img

    fraction = resample_to_img(
        nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.float32), mask.affine),
        reference,
        interpolation="linear",
        force_resample=True,
        copy_header=True,
    )
    return np.asarray(fraction.dataobj) > 0.5


def _aggregate(scores: pd.DataFrame) -> dict:
    return {
        "mask_dice_median": round(float(scores["mask_dice_native"].median()), 4),
        "mask_dice_worst": round(float(scores["mask_dice_native"].min()), 4),
        "pearson_r_median": round(float(scores["pearson_r_mni"].median()), 4),
        "mni_dice_median": round(float(scores["mask_dice_mni"].median()), 4),
        "seconds_median": round(float(scores["seconds"].median()), 1),
        "qc_ok": int((scores["qc_status"] == "ok").sum()),
    }


def _identical_outputs(a: Path, b: Path, frame: pd.DataFrame) -> int:
    """Subjects whose image and mask files are byte-identical in two runs."""
    same = 0
    for sid in frame["subject_id"]:
        paths = preprocess_raw.output_paths(sid)
        same += all((a / paths[k]).read_bytes() == (b / paths[k]).read_bytes() for k in ("image", "mask"))
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", required=True, help="per-run folders (large; do not commit)")
    parser.add_argument("--native_csv", default=str(NATIVE_CSV))
    parser.add_argument("--results_dir", default=str(REPO_ROOT / "bench" / "results" / "prepare"))
    parser.add_argument("--subjects", type=int, default=None, help="only the first N subjects (a quick look)")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["2mm_jobs1", "2mm_jobs2", "2mm_noN4_jobs2", "1mm_jobs2", "1mm_noN4_jobs2"],
        help="runs to do (a run with a result.json in --output_dir is reused; the summary covers all present)",
    )
    args = parser.parse_args(argv)
    output_dir, results_dir = Path(args.output_dir), Path(args.results_dir)
    native = _native(Path(args.native_csv))
    if args.subjects:
        native = native.head(args.subjects)
    one_mm = make_1mm_inputs(native, output_dir / "inputs_1mm")
    runs = {  # name: (inputs, jobs, flags)
        "2mm_jobs1": (native, 1, []),
        "2mm_jobs2": (native, 2, []),
        "2mm_noN4_jobs2": (native, 2, ["--skip_bias_correction"]),
        "1mm_jobs2": (one_mm, 2, []),
        "1mm_noN4_jobs2": (one_mm, 2, ["--skip_bias_correction"]),
    }
    summary: dict = {"machine": f"{platform.node()}, {os.cpu_count()} CPU cores, shared", "runs": {}}
    all_scores = []
    for name, (frame, jobs, flags) in runs.items():
        result_path = output_dir / name / "result.json"
        if name in args.runs and not result_path.is_file():  # a finished run is reused, not timed again
            result_path.parent.mkdir(parents=True, exist_ok=True)
            result_path.write_text(json.dumps(run_prepare(frame, output_dir / name, jobs, flags)))
        if not result_path.is_file():
            continue
        scores = score(frame, output_dir / name / "out").assign(run=name)
        all_scores.append(scores)
        summary["runs"][name] = {**json.loads(result_path.read_text()), **_aggregate(scores)}
        print(json.dumps({name: summary["runs"][name]}), flush=True)
    runs_out = summary["runs"]
    if {"2mm_jobs1", "2mm_jobs2"} <= set(runs_out):
        summary["identical_bytes_jobs1_vs_jobs2"] = _identical_outputs(
            output_dir / "2mm_jobs1" / "out", output_dir / "2mm_jobs2" / "out", native
        )
    summary["floors"] = FLOORS
    summary["floors_met"] = {
        run: {key: runs_out[run][key] >= floor for key, floor in FLOORS.items()} for run in runs_out
    }
    summary["one_mm_minus_two_mm"] = {
        f"{one}_vs_{two}": {key: round(runs_out[one][key] - runs_out[two][key], 4) for key in FLOORS}
        for one, two in (("1mm_jobs2", "2mm_jobs2"), ("1mm_noN4_jobs2", "2mm_noN4_jobs2"))
        if {one, two} <= set(runs_out)
    }
    summary["one_mm_tolerance"] = ONE_MM_TOLERANCE
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    pd.concat(all_scores).to_csv(results_dir / "subjects.csv", index=False)
    overview = output_dir / "2mm_jobs2" / "out" / "qc_overview.png"
    if overview.is_file():
        shutil.copyfile(overview, results_dir / "qc_overview_2mm.png")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
