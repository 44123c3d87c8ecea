"""What ``bench/gpu_check.sh`` needs on the lent GPU machine: packed here, unpacked and checked there.

    python -m bench.gpu_prepare pack [--ixi ../shared/data/ixi] [--wheels .whl] [--data .gpu_data]   # here
    python3 -m bench.gpu_prepare unpack [--data .gpu_data] [--to /tmp/gpu_data]                       # there
    python3 -m bench.gpu_prepare check --results DIR --train_csv T --val_csv V [--dry_run]            # there

``pack`` (in the repository root, where ``.gitignore`` ignores ``/.whl/`` and ``/.gpu_data/``):

* ``.whl/``: the wheels of MONAI, nibabel and deepbet at ``requirements.txt``'s pins for CPython 3.12 (the
  machine has torch and the rest; deepbet's wheel carries the LPIPS3D weights, ``data/models/model.pt``);
* ``.gpu_data/ixi/``: every image and mask of the IXI ``train.csv`` and ``val.csv`` as ``.nii.bz2`` (the
  NIfTI bytes of the ``.nii.gz`` files, bzip2-compressed: 26 % smaller, so that the 120 volumes, the wheels and
  the repository fit the 64 MiB a call may carry) and the two CSVs pointing at the ``.nii`` names.

Then it prints what would travel against the 64 MiB limit. ``unpack`` (what ``gpu_check.sh`` runs there)
decompresses them in parallel into ``--to`` (``.nii``, bit-identical NIfTI files) and copies the CSVs.

``check`` (``gpu_check.sh``'s first step) fails unless CUDA works (``--dry_run``: the CPU), MONAI and nibabel
import and LPIPS3D loads deepbet's weights (``$DEEPBET_MODEL``, else where ``model/lpips3D.py`` finds them: the
installed package's ``data/models/model.pt``); it writes ``DIR/env.json`` (device, versions, data, commit) and
``DIR/env.sh`` for the script: ``DEEPBET_MODEL``, ``VAL_HEAD_CSV`` (the first 2 validation rows, for runs whose
validation is not measured) and, with ``--dry_run``, ``TRAIN_CSV`` / ``VAL_CSV`` cut to 4 / 2 rows.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import json
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("monai", "nibabel", "deepbet")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
CARRY_LIMIT = 64 * 2**20
SPLITS = ("train.csv", "val.csv")


def pinned(package: str) -> str:
    """``package==version`` from ``requirements.txt``."""
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == package:
            return line.strip()
    raise SystemExit(f"{package} is not pinned in requirements.txt")


def download_wheels(folder: Path) -> None:
    """The pinned wheels (no dependencies: the machine has them) for CPython 3.12 on x86-64 Linux."""
    wanted = [pinned(p) for p in PACKAGES]
    present = {w.name.split("-")[0].lower() for w in folder.glob("*.whl")}
    todo = [w for w in wanted if w.split("==")[0] not in present]
    if not todo:
        return
    platforms = [item for p in PLATFORMS for item in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *todo]  # fmt: skip
    subprocess.run(command, check=True)


def _compress(job: tuple[Path, Path]) -> None:
    source, target = job
    target.write_bytes(bz2.compress(gzip.decompress(source.read_bytes()), 9))


def _decompress(job: tuple[Path, Path]) -> None:
    source, target = job
    target.write_bytes(bz2.decompress(source.read_bytes()))


def nii_name(path: str) -> str:
    """``images/x.nii.gz`` -> ``images/x.nii``."""
    return path[: -len(".gz")] if path.endswith(".nii.gz") else path


def pack_data(ixi: Path, folder: Path) -> None:
    """Every image and mask of the IXI splits as ``.nii.bz2`` + the CSVs pointing at the ``.nii`` names."""
    jobs = []
    for split in SPLITS:
        with open(ixi / split, newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            for column in ("image", "mask"):
                if not row.get(column):
                    continue
                if not row[column].endswith((".nii.gz", ".nii")) or Path(row[column]).is_absolute():
                    raise SystemExit(f"{ixi / split}: expected relative .nii.gz paths, got {row[column]}")
                target = folder / (nii_name(row[column]) + ".bz2")
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.exists():
                    jobs.append((ixi / row[column], target))
                row[column] = nii_name(row[column])
        with open(folder / split, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_compress, jobs))
    print(f"{folder}: {len(jobs)} files compressed")


def unpack_data(folder: Path, to: Path) -> None:
    """Decompress ``folder``'s ``.nii.bz2`` files into ``to`` (in parallel) and copy the CSVs."""
    jobs = []
    for source in folder.rglob("*.nii.bz2"):
        target = to / source.relative_to(folder).with_suffix("")
        target.parent.mkdir(parents=True, exist_ok=True)
        jobs.append((source, target))
    with ProcessPoolExecutor() as pool:
        list(pool.map(_decompress, jobs))
    for split in SPLITS:
        shutil.copy(folder / split, to / split)
    print(f"{to}: {len(jobs)} files")


def check(results: Path, train_csv: str, val_csv: str, dry_run: bool) -> int:
    """The environment on the machine (see the module docstring); 1 when it is broken."""
    import monai
    import nibabel
    import torch

    import dataset
    from bench.harness import commit, machine_info
    from model.lpips3D import LPIPS3D, _deepbet_default_path

    gpu = not dry_run
    if gpu and not torch.cuda.is_available():
        print("CUDA is not available")
        return 1
    device = torch.device("cuda" if gpu else "cpu")
    weights = Path(os.environ.get("DEEPBET_MODEL") or _deepbet_default_path())
    lpips = LPIPS3D(weights_path=weights).to(device)
    folder = results / "data"
    folder.mkdir(parents=True, exist_ok=True)
    exports = {"DEEPBET_MODEL": str(weights.resolve())}
    heads = {"VAL_HEAD_CSV": (val_csv, 2)}
    if dry_run:
        heads |= {"TRAIN_CSV": (train_csv, 4), "VAL_CSV": (val_csv, 2)}
    for name, (source, rows) in heads.items():
        path = folder / f"{name.lower().removesuffix('_csv')}.csv"
        dataset.read_split(source).head(rows).to_csv(path, index=False)
        exports[name] = str(path.resolve())
    machine = machine_info(device)
    env = {
        "device": machine.get("gpu", machine["cpu"]),
        **machine,
        "cuda": torch.version.cuda,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if gpu else None,
        "monai": monai.__version__,
        "nibabel": nibabel.__version__,
        "lpips": f"{lpips.description} from {weights}",
        "train_csv": train_csv,
        "train_volumes": len(dataset.read_split(train_csv)),
        "val_csv": val_csv,
        "val_volumes": len(dataset.read_split(val_csv)),
        "commit": commit(),
        "dry_run": dry_run,
    }
    (results / "env.json").write_text(json.dumps(env, indent=2))
    (results / "env.sh").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in exports.items()))
    print(json.dumps(env))
    return 0


def travelling_bytes(extra: list[Path]) -> int:
    """Tracked + untracked-not-ignored files of the repository, plus the ``extra`` folders."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout
    files = [REPO_ROOT / name for name in listing.decode().split("\0") if name]
    files += [p for folder in extra for p in folder.rglob("*")]
    return sum(p.stat().st_size for p in files if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("pack", "unpack", "check"))
    parser.add_argument("--ixi", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "ixi")
    parser.add_argument("--wheels", type=Path, default=REPO_ROOT / ".whl")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / ".gpu_data")
    parser.add_argument("--to", type=Path, default=Path("/tmp/gpu_data"))
    parser.add_argument("--results", type=Path, help="check: where env.json and env.sh go")
    parser.add_argument("--train_csv", help="check: the training split")
    parser.add_argument("--val_csv", help="check: the validation split")
    parser.add_argument("--dry_run", action="store_true", help="check: the CPU, splits cut to 4 / 2 rows")
    args = parser.parse_args(argv)
    if args.mode == "check":
        if None in (args.results, args.train_csv, args.val_csv):
            parser.error("check needs --results, --train_csv and --val_csv")
        return check(args.results, args.train_csv, args.val_csv, args.dry_run)
    if args.mode == "unpack":
        unpack_data(args.data / "ixi", args.to / "ixi")
        return 0
    args.wheels.mkdir(exist_ok=True)
    download_wheels(args.wheels)
    pack_data(args.ixi, args.data / "ixi")
    total = travelling_bytes([args.wheels, args.data])
    verdict = "fits" if total <= CARRY_LIMIT else "TOO LARGE"
    print(f"would travel: {total / 2**20:.1f} MiB of {CARRY_LIMIT / 2**20:.0f} MiB ({verdict}); carry: "
          f'["{args.wheels.name}", "{args.data.name}"]')  # fmt: skip
    return 0 if total <= CARRY_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
