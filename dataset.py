"""Data for the 3D brain VAE: split reading, pre-flight checks, THE preprocessing and its inverse, datasets.

Every script (train, infer, save_latent, notebook) preprocesses through :func:`preprocess_volume` and maps
results back with :func:`restore_to_input_grid`; nothing here is re-implemented elsewhere. The pre-flight,
the preprocessing and the in-brain metrics share one foreground: every voxel brighter than
:func:`background_value` (0 for a skull-stripped file, 10 for one stored with ``scl_inter = 10``).

CLI::

    python dataset.py --check split.csv [--skip_bad_files] [--strict]
    python dataset.py --make_demo data/demo      # the demo cohort, built by demo_cohort.py
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The CLI's arguments (``--check`` or ``--make_demo``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", metavar="SPLIT", help="pre-flight check a split CSV / folder / NIfTI file")
    action.add_argument("--make_demo", metavar="OUT_DIR", help="build the demo cohort in OUT_DIR")
    parser.add_argument("--skip_bad_files", action="store_true", help="with --check: list and drop bad files")
    parser.add_argument(
        "--strict", action="store_true", help="with --check: inputs that do not look model-ready are errors"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and argument errors answer here, before torch and MONAI load (seconds)

import monai.transforms as mt
import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.data import CacheDataset, MetaTensor, PersistentDataset
from monai.data import Dataset as MonaiDataset
from scipy import ndimage
from scipy.spatial.transform import Rotation

from config import AugmentationConfig, PreprocessingConfig
from demo_cohort import make_demo_cohort

log = logging.getLogger(__name__)

MAX_LISTED_IDS = 5  # duplicated subject ids named in full in the error message
SPACING_TOLERANCE_MM = 0.01
PIPELINE_VERSION = "2"  # bump when the preprocessing code changes, so disk caches are rebuilt
BORDER_VOXELS = 2  # thickness of the outer shell whose median is the background value
# A brain on the MNI 2 mm grid covers 25-30 % of it (IXI masks: 29 %); a raw head 60-75 % (IXI native files)
MAX_BRAIN_FRACTION = 0.5


class DataError(ValueError):
    """Bad input data; the message names the file(s) and the problem."""


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _subject_id(path: str | Path) -> str:
    """Subject id of a file: its name without ``.nii``/``.nii.gz`` and a trailing (BIDS) ``_T1w``."""
    return re.sub(r"(?<=.)_T1w$", "", re.sub(r"\.nii(\.gz)?$", "", Path(path).name, flags=re.IGNORECASE))


def _resolve(value: Any, base: Path) -> str | None:
    """Absolute path string for a CSV cell (relative to ``base``); None for an empty cell."""
    if pd.isna(value) or not str(value).strip():
        return None
    path = Path(str(value).strip()).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def read_split(source: str | Path) -> pd.DataFrame:
    """Read a split: a CSV (``image`` column required), a folder of NIfTI files, or one NIfTI file.

    Returns columns ``subject_id``, ``image`` (absolute str), ``mask`` (absolute str or None), then every
    other CSV column unchanged. ``subject_id``: the CSV's cell when given, otherwise the file name without
    ``.nii``/``.nii.gz`` and a trailing BIDS ``_T1w`` (``sub-01_T1w.nii.gz`` -> ``sub-01``,
    ``IXI014-HH-1236_T1.nii.gz`` -> ``IXI014-HH-1236_T1``). A split whose images or subject ids repeat is
    refused (:class:`DataError` naming them and their files): subject ids name every per-row output.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(
            f"{source}: split not found (expected a CSV, a folder of NIfTI files or a NIfTI file)"
        )
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and _is_nifti(p))
        if not files:
            raise DataError(f"{source}: folder holds no .nii / .nii.gz file")
        frame = pd.DataFrame({"image": [str(p.resolve()) for p in files]})
    elif _is_nifti(source):
        frame = pd.DataFrame({"image": [str(source.resolve())]})
    else:
        frame = _read_csv(source)
    frame["mask"] = frame.get("mask")  # None for a split without masks
    frame["subject_id"] = [
        str(sid).strip() if pd.notna(sid) and str(sid).strip() else _subject_id(image)
        for sid, image in zip(frame.get("subject_id", [None] * len(frame)), frame["image"], strict=True)
    ]
    duplicated = frame["image"][frame["image"].duplicated(keep=False)]
    if len(duplicated):
        raise DataError(f"{source}: duplicate rows for image(s) {sorted(set(duplicated))}")
    repeated = frame[frame["subject_id"].duplicated(keep=False)]
    if not repeated.empty:
        files = [(sid, list(images)) for sid, images in repeated.groupby("subject_id", sort=True)["image"]]
        listed = "; ".join(f"{sid!r} ({', '.join(images)})" for sid, images in files[:MAX_LISTED_IDS])
        more = f"; (+{len(files) - MAX_LISTED_IDS} more)" if len(files) > MAX_LISTED_IDS else ""
        raise DataError(
            f"{source}: subject_id must be unique (it names each row's outputs); duplicated: {listed}{more}. "
            "Give each row its own subject_id (CSV column) or rename the files"
        )
    others = [c for c in frame.columns if c not in ("subject_id", "image", "mask")]
    return frame[["subject_id", "image", "mask", *others]].reset_index(drop=True)


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype={"subject_id": str})
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty CSV (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not a readable CSV ({error})") from None
    if "image" not in frame.columns:
        raise DataError(f"{path}: CSV has no 'image' column (columns: {list(frame.columns)})")
    if frame.empty:
        raise DataError(f"{path}: CSV has a header but no rows")
    base = path.resolve().parent
    images = [_resolve(v, base) for v in frame["image"]]
    empty_rows = [i + 2 for i, v in enumerate(images) if v is None]  # +2: 1-based, after the header
    if empty_rows:
        raise DataError(f"{path}: empty 'image' cell on line(s) {empty_rows}")
    frame["image"] = images
    if "mask" in frame:
        frame["mask"] = pd.Series([_resolve(v, base) for v in frame["mask"]], dtype=object)
    return frame


def _inspect_image(path: str) -> dict[str, Any]:
    """Header + data statistics of one image; ``problem`` is '' when it is usable."""
    info: dict[str, Any] = {"readable": False, "problem": ""}
    if not Path(path).is_file():
        return {**info, "problem": "missing file"}
    try:
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            return {**info, "problem": f"not a NIfTI file ({type(image).__name__})"}
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for corrupt / truncated / foreign files
        return {**info, "problem": f"unreadable: {type(error).__name__}: {error}"}
    shape = tuple(int(s) for s in image.shape)
    info.update(
        readable=True,
        shape="x".join(map(str, shape)),
        volumes=int(np.prod(shape[3:])) if len(shape) > 3 else 1,
        voxel_size="x".join(f"{z:.3g}" for z in image.header.get_zooms()[:3]),
        orientation="".join(nib.aff2axcodes(image.affine)),
        dtype=str(image.get_data_dtype()),
    )
    has_nonfinite = data.dtype.kind == "f" and not np.isfinite(data).all()
    values = data[np.isfinite(data)] if has_nonfinite else data
    low, high = (float(values.min()), float(values.max())) if values.size else (np.nan, np.nan)
    info.update(min=low, max=high, nan_inf=has_nonfinite, constant=bool(values.size and low == high))
    problems = []
    if len(shape) < 3 or min(shape[:3]) < 2:
        problems.append(f"not a 3D volume (shape {shape})")
    if info["volumes"] > 1:
        problems.append(f"{info['volumes']} volumes (4D); give one 3D volume per file")
    if has_nonfinite:
        problems.append("NaN/Inf voxels")
    if info["constant"]:
        problems.append(f"constant image (every voxel = {low:g})")
    elif not problems:
        volume = data.reshape(shape[:3])
        problems.append(foreground_problem(volume, background_value(volume)))
    info["problem"] = "; ".join(p for p in problems if p)
    info["_spatial_shape"] = shape[:3]
    return info


def _inspect_mask(path: str, image_shape: tuple[int, ...] | None) -> str:
    """The problem with a mask file ('' when fine)."""
    if not Path(path).is_file():
        return f"mask missing: {path}"
    try:
        mask = nib.load(path)
        data = np.asanyarray(mask.dataobj)
    except Exception as error:
        return f"mask unreadable ({type(error).__name__}: {error}): {path}"
    if image_shape is not None and tuple(mask.shape[:3]) != tuple(image_shape):
        return f"mask shape {tuple(mask.shape)} != image shape {tuple(image_shape)}: {path}"
    if not np.any(data):
        return f"mask is empty (all zero): {path}"
    return ""


def check_files(frame: pd.DataFrame) -> pd.DataFrame:
    """Inspect every image (and mask) of a split frame: one row per file, ``problem`` '' when fine."""
    rows = []
    for subject_id, image, mask in zip(frame["subject_id"], frame["image"], frame["mask"], strict=True):
        info = _inspect_image(image)
        shape = info.pop("_spatial_shape", None)
        problems = [info.pop("problem"), "" if mask is None else _inspect_mask(mask, shape)]
        problem = "; ".join(p for p in problems if p)
        rows.append({"subject_id": subject_id, "image": image, **info, "mask": mask, "problem": problem})
    columns = ["subject_id", "image", "readable", "shape", "volumes", "voxel_size", "orientation", "dtype"]
    columns += ["min", "max", "nan_inf", "constant", "mask", "problem"]
    return pd.DataFrame(rows).reindex(columns=columns)


def preflight_failures(frame: pd.DataFrame) -> dict[int, str]:
    """Row index -> "<image>: <problem>" for every row that fails :func:`check_files` (as in training)."""
    report = check_files(frame)
    rows = zip(report["image"], report["problem"], strict=True)
    return {i: f"{image}: {problem}" for i, (image, problem) in enumerate(rows) if problem}


def preflight(frame: pd.DataFrame, skip_bad_files: bool = False) -> pd.DataFrame:
    """Check every file; raise :class:`DataError` listing the problems, or (``skip_bad_files``) drop them.

    Skipped files are printed and logged explicitly; the returned frame keeps the good rows only.
    """
    failures = preflight_failures(frame)
    if not failures:
        return frame
    table = "\n".join(f"  {line}" for line in failures.values())
    if not skip_bad_files:
        raise DataError(
            f"{len(failures)} of {len(frame)} file(s) failed the pre-flight check "
            f"(fix them, or set data.skip_bad_files / --skip_bad_files to drop them):\n{table}"
        )
    message = f"SKIPPING {len(failures)} of {len(frame)} file(s) that failed the pre-flight check:\n{table}"
    print(message, file=sys.stderr)
    log.warning(message)
    good = frame[[i not in failures for i in range(len(frame))]].reset_index(drop=True)
    if good.empty:
        raise DataError("every file failed the pre-flight check; nothing left to use")
    return good


def background_value(volume: np.ndarray) -> float:
    """The background intensity of a (D, H, W) volume: the median of its outer ``BORDER_VOXELS`` shell."""
    b = BORDER_VOXELS
    shell = [volume[:b], volume[-b:], volume[:, :b], volume[:, -b:], volume[:, :, :b], volume[:, :, -b:]]
    return float(np.median(np.concatenate([np.ravel(face) for face in shell])))


def foreground_problem(volume: np.ndarray, background: float) -> str:
    """'' when some voxel of (D, H, W) ``volume`` is brighter than ``background``, else the problem.

    The one rule by which both the pre-flight check and the preprocessing refuse a volume.
    """
    if np.any(volume > background):
        return ""
    return (
        f"no voxel brighter than the background ({background:g}, the median of the outer "
        f"{BORDER_VOXELS}-voxel shell): nothing to normalise (an inverted or all-background image?)"
    )


def estimate_brain_mask(volume: np.ndarray, background: float) -> np.ndarray:
    """(D, H, W) bool: the largest connected part of the voxels brighter than ``background``, holes filled.

    For a skull-stripped file this is the brain; for a raw head it is the head (:func:`brain_mask_warning`).
    """
    labels, count = ndimage.label(volume > background)
    if count == 0:
        return np.zeros(volume.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == sizes.argmax())


NON_BRAIN_VOLUME_ML = 3000.0  # more non-zero signal than this is a head, not a skull-stripped brain (~1-2 l)
GRID_DECIMALS = 2  # affines compared to 0.01 mm
PREPARE_HINT = "raw scans? run: python prepare.py --input <scans> --output_dir prepared/"


def _describe(shape: tuple[int, ...], zooms: tuple[float, ...]) -> str:
    return f"{'x'.join(map(str, shape))} at {'x'.join(f'{z:g}' for z in zooms)} mm"


def input_warnings(frame: pd.DataFrame, prep: PreprocessingConfig | None = None) -> list[str]:
    """One line per input that does not look model-ready: '<image>: <why>; <how to prepare>'.

    With ``prep`` (the checkpoint's preprocessing): a file whose field of view (shape × voxel size, in
    ``prep.orientation`` axis order) differs by more than one target voxel from ``prep.target_shape`` ×
    ``prep.target_spacing`` (a 2 mm MNI file for a 4 mm model is fine: it is resampled to the same field);
    without a target spacing, a file whose shape is not ``prep.target_shape``. Without it (a
    training split): a file whose grid (shape, affine) differs from the split's most common one. Always: a
    file with more non-zero signal than a brain. Unreadable files are left to :func:`check_files`.
    """
    grids: dict[str, tuple] = {}  # image -> (shape, voxel size, affine rounded to GRID_DECIMALS as bytes)
    reasons: dict[str, list[str]] = {}
    for image in frame["image"]:
        try:
            nifti = nib.load(image)
            nonzero = np.count_nonzero(np.asanyarray(nifti.dataobj))
        except Exception:  # unreadable: check_files reports it
            continue
        shape = tuple(int(s) for s in nifti.shape[:3])
        zooms = tuple(float(z) for z in nifti.header.get_zooms()[:3])
        volume_ml = float(nonzero) * float(np.prod(nifti.header.get_zooms()[:3])) / 1000.0
        reasons[image] = []
        if prep is not None:  # shape and voxel size in prep.orientation's axis order
            target = nib.orientations.axcodes2ornt(tuple(prep.orientation.upper()))
            ornt = nib.orientations.ornt_transform(nib.io_orientation(nifti.affine), target)
            order = [int(np.flatnonzero(ornt[:, 0] == axis)[0]) for axis in range(3)]
            shape, zooms = tuple(shape[i] for i in order), tuple(zooms[i] for i in order)
            if prep.target_spacing is None:  # no resampling: the file's grid is the model's
                off_grid = shape != tuple(prep.target_shape)
            else:  # resampled to target_spacing, then padded/cropped: the field of view must match
                field_error = np.multiply(shape, zooms) - np.multiply(prep.target_shape, prep.target_spacing)
                off_grid = bool(np.any(np.abs(field_error) > np.asarray(prep.target_spacing)))
            if off_grid:
                trained = _describe(tuple(prep.target_shape), prep.target_spacing or zooms)
                reasons[image].append(f"grid {_describe(shape, zooms)}, the model was trained on {trained}")
        affine = np.round(np.asarray(nifti.affine, dtype=np.float64), GRID_DECIMALS)
        grids[image] = (shape, zooms, affine.tobytes())
        if volume_ml > NON_BRAIN_VOLUME_ML:
            reasons[image].append(
                f"does not look skull-stripped ({volume_ml:.0f} ml of non-zero signal; "
                f"a brain is < {NON_BRAIN_VOLUME_ML:.0f} ml)"
            )
    counts = pd.Series(list(grids.values())).value_counts(sort=True)
    if prep is None and len(counts) > 1:  # a training split: one grid for all
        common = counts.index[0] if counts.iloc[0] > 1 else None  # None: no two files share a grid
        for image, key in grids.items():
            if common is None:
                why = f"grid {_describe(*key[:2])}: the split mixes grids (no two of its {len(grids)} files"
                reasons[image].insert(0, f"{why} share shape, voxel size and affine)")
            elif key != common:
                note = "" if key[:2] != common[:2] else " (same shape and voxel size, other affine)"
                reasons[image].insert(
                    0,
                    f"grid {_describe(*key[:2])}{note} differs from {counts.iloc[0]} of {len(grids)} "
                    f"files of this split ({_describe(*common[:2])}): the split mixes grids",
                )
    return [f"{image}: {'; '.join(why)}; {PREPARE_HINT}" for image, why in reasons.items() if why]


def warn_inputs(
    frame: pd.DataFrame,
    prep: PreprocessingConfig | None = None,
    strict: bool = False,
    emit: Callable[[str], None] | None = None,
) -> list[str]:
    """Report :func:`input_warnings` one line each through ``emit`` (default: a ``WARNING: …`` line on stderr,
    the scripts' way; ``train.py`` logs instead); ``strict``: raise :class:`DataError` instead."""
    lines = input_warnings(frame, prep)
    if lines and strict:
        table = "\n".join(f"  {line}" for line in lines)
        raise DataError(f"{len(lines)} input(s) do not look model-ready (strict input checks):\n{table}")
    emit = emit or (lambda line: print(f"WARNING: {line}", file=sys.stderr))
    for line in lines:
        emit(line)
    return lines


@dataclass
class InverseInfo:
    """What :func:`restore_to_input_grid` needs to undo the preprocessing of one file."""

    source: str
    input_affine: np.ndarray  # (4, 4) of the input file
    input_shape: tuple[int, int, int]  # spatial shape of the input file
    output_affine: np.ndarray  # (4, 4) of the preprocessed grid
    intensity: Literal["percentile", "minmax"]
    low: float  # input intensity mapped to 0
    high: float  # input intensity mapped to 1
    background: float = 0.0  # the input's background value (:func:`background_value`)


@dataclass
class PreprocessedVolume:
    """``image`` (1, D, H, W) float32 in [0, 1]; ``mask`` (1, D, H, W) bool; ``inverse`` to map back.

    ``mask_source``: ``csv`` (the split's mask column) or ``estimated`` (:func:`estimate_brain_mask`).
    """

    image: torch.Tensor
    mask: torch.Tensor
    inverse: InverseInfo
    mask_source: Literal["csv", "estimated"] = "estimated"


def brain_mask_warning(volume: PreprocessedVolume) -> str:
    """'' or one line naming the file when its brain mask covers more than ``MAX_BRAIN_FRACTION`` of the grid."""
    fraction = float(volume.mask.float().mean())
    if fraction <= MAX_BRAIN_FRACTION:
        return ""
    return (
        f"{volume.inverse.source}: the brain mask ({volume.mask_source}) covers {fraction:.0%} of the field of "
        "view (a skull-stripped brain on the MNI grid: ~30%): not a skull-stripped brain? Its in-brain metrics "
        "cover all of it"
    )


def _check_loaded(data: dict) -> dict:
    """Refuse anything but one 3D volume, and a mask on another grid than its image; set ``background``
    (:func:`background_value` of the image, on the input file's own grid)."""
    image, mask = data["image"], data.get("mask")
    source = image.meta.get("filename_or_obj", "?")
    if image.shape[0] != 1 or image.ndim != 4 or min(image.shape[1:]) < 2:
        raise DataError(f"{source}: expected one 3D volume, got channel-first shape {tuple(image.shape)}")
    if mask is not None and (
        mask.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-3)
    ):
        raise DataError(
            f"{mask.meta.get('filename_or_obj', '?')}: mask grid (shape {tuple(mask.shape[1:])}) "
            f"differs from its image {source} (shape {tuple(image.shape[1:])}) or their affines differ"
        )
    data["background"] = background_value(image[0].detach().cpu().numpy())
    return data


def _to_target_grid(data: dict, prep: PreprocessingConfig) -> dict:
    """The resampling, pad/crop and brain-mask steps of :func:`build_preprocessing` (image linear, mask
    nearest and padded with 0); ``mask`` -> bool: the given mask > 0, else :func:`estimate_brain_mask`."""
    pixdim = None if prep.target_spacing is None else tuple(prep.target_spacing)
    if pixdim is not None and not np.allclose(data["image"].pixdim, pixdim, atol=SPACING_TOLERANCE_MM):
        modes = ("bilinear", "nearest")
        data = mt.Spacingd(["image", "mask"], pixdim=pixdim, mode=modes, allow_missing_keys=True)(data)
    resize = mt.ResizeWithPadOrCrop(tuple(prep.target_shape))
    image = data["image"] = resize(data["image"], value=data["background"])
    if "mask" in data:
        data["mask"] = resize(data["mask"], value=0) > 0
    else:
        estimate = estimate_brain_mask(image[0].detach().cpu().numpy(), data["background"])
        data["mask"] = MetaTensor(torch.from_numpy(estimate)[None], meta=dict(image.meta))
    return data


def _scale_intensity(data: dict, prep: PreprocessingConfig) -> dict:
    """Image to [0, 1] (see :func:`build_preprocessing`; under ``percentile`` everything below ``low``, the
    background too, becomes exactly 0); low/high are stored in ``image.meta`` (``intensity_low``/``_high``)."""
    image = data["image"]
    values = image.detach().cpu().numpy()
    source = image.meta.get("filename_or_obj", "?")
    if not np.isfinite(values).all():
        raise DataError(f"{source}: NaN/Inf voxels")
    if prep.intensity == "percentile":
        problem = foreground_problem(values, data["background"])
        if problem:
            raise DataError(f"{source}: {problem} (inside the target field of view)")
        foreground = values[values > data["background"]]
        low, high = np.percentile(foreground, [prep.lower_percentile, prep.upper_percentile])
    else:
        low, high = values.min(), values.max()
    if not high > low:
        raise DataError(f"{source}: no intensity range to normalise (low = high = {float(low):g})")
    scaled = ((image - float(low)) / float(high - low)).clamp(0.0, 1.0)
    scaled.meta["intensity_low"], scaled.meta["intensity_high"] = float(low), float(high)
    data["image"] = scaled
    return data


def build_preprocessing(prep: PreprocessingConfig) -> mt.Compose:
    """The one deterministic MONAI chain: dict ``{"image": path, ["mask": path]}`` -> MetaTensors ``image``
    (1, D, H, W) float32 in [0, 1] and ``mask`` (1, D, H, W) bool, both on the target grid.

    load (nibabel) -> channel first -> reorient to ``prep.orientation`` -> resample to ``prep.target_spacing``
    (skipped when already there) -> centred pad/crop to ``prep.target_shape`` (padding with the file's
    background value) -> brain mask (the CSV's, else :func:`estimate_brain_mask`) -> intensity to [0, 1]
    (robust percentiles over the foreground, the background becoming 0; or min-max) -> optional masking.
    Every step is a MONAI ``Transform`` (``Lambda`` for ours), so the caching datasets cache them all.
    """
    keys = ["image", "mask"]
    load = {"reader": "NibabelReader", "image_only": True, "ensure_channel_first": True, "dtype": np.float32}
    labels = (("L", "R"), ("P", "A"), ("I", "S"))
    steps = [
        mt.LoadImaged(keys, **load, allow_missing_keys=True),
        mt.Lambda(_check_loaded),
        mt.Orientationd(keys, axcodes=prep.orientation.upper(), labels=labels, allow_missing_keys=True),
        mt.Lambda(functools.partial(_to_target_grid, prep=prep)),
        mt.Lambda(functools.partial(_scale_intensity, prep=prep)),
    ]
    if prep.apply_mask:
        steps.append(mt.MaskIntensityd("image", mask_key="mask"))
    return mt.Compose(steps)


def preprocess_volume(
    image_path: str | Path, prep: PreprocessingConfig, mask_path: str | Path | None = None
) -> PreprocessedVolume:
    """Preprocess one file (and its optional brain mask) with :func:`build_preprocessing`."""
    item = {"image": str(image_path)} | ({} if mask_path is None else {"mask": str(mask_path)})
    try:
        out = build_preprocessing(prep)(item)
    except RuntimeError as error:  # MONAI wraps errors raised inside a transform (ours: in its Lambda)
        if isinstance(error.__cause__, DataError):
            raise error.__cause__ from None
        raise DataError(f"{image_path}: preprocessing failed ({error})") from error
    image = out["image"]
    inverse = InverseInfo(
        source=str(image_path),
        input_affine=np.asarray(image.meta["original_affine"], dtype=np.float64),
        input_shape=tuple(int(s) for s in image.meta["spatial_shape"]),
        output_affine=np.asarray(image.affine, dtype=np.float64),
        intensity=prep.intensity,
        low=image.meta["intensity_low"],
        high=image.meta["intensity_high"],
        background=out["background"],
    )
    mask_source = "estimated" if mask_path is None else "csv"
    return PreprocessedVolume(image.as_tensor().float(), out["mask"].as_tensor().bool(), inverse, mask_source)


def restore_to_input_grid(
    volume: torch.Tensor,
    inverse: InverseInfo,
    intensity: Literal["original", "unit"] = "original",
) -> nib.Nifti1Image:
    """Map a (1, D, H, W) or (D, H, W) volume on the preprocessed grid back onto the input file's grid.

    Orientation, pad/crop and spacing are undone through the two affines (exact voxel copy when the grids
    differ by an axis permutation/flip/shift only, else linear interpolation); voxels outside the
    preprocessed field of view become 0. ``original`` also undoes the intensity scaling (under percentile
    scaling, values <= 0 become the input's background value); ``unit`` keeps [0, 1]. Returns float32 NIfTI
    with the input's affine and spatial shape.
    """
    array = volume.detach().cpu().float().numpy()
    if array.ndim == 4:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a (1, D, H, W) or (D, H, W) volume, got shape {volume.shape}")
    # input voxel -> world -> preprocessed voxel
    mapping = np.linalg.inv(inverse.output_affine) @ inverse.input_affine
    is_grid_shift = np.allclose(mapping, np.round(mapping), atol=1e-4)
    if is_grid_shift:
        mapping = np.round(mapping)
    order = 0 if is_grid_shift else 1  # outside the preprocessed field of view: 0 (mode "constant")
    restored = ndimage.affine_transform(
        array, mapping[:3, :3], offset=mapping[:3, 3], output_shape=inverse.input_shape, order=order
    )
    if intensity == "original":
        scaled = restored * np.float32(inverse.high - inverse.low) + np.float32(inverse.low)
        if inverse.intensity == "percentile":
            scaled = np.where(restored > 0, scaled, np.float32(inverse.background))
        restored = scaled
    elif intensity != "unit":
        raise ValueError(f"intensity must be 'original' or 'unit', got {intensity!r}")
    return nib.Nifti1Image(restored.astype(np.float32), inverse.input_affine)


# the log bias field: a Legendre polynomial of total degree <= 3 with coefficients uniform in [0, 0.1] (MONAI
# RandBiasField's defaults)
BIAS_FIELD_DEGREE = 3
BIAS_FIELD_MAX_COEFF = 0.1
_BIAS_FIELD_TERMS = np.indices((BIAS_FIELD_DEGREE + 1,) * 3).sum(axis=0) <= BIAS_FIELD_DEGREE  # i + j + k
CONTRAST_EPSILON = 1e-7  # monai.transforms.AdjustContrast's epsilon


@dataclass
class AugmentationDraw:
    """The augmentation of one item, drawn on the CPU; None/False where a step does not fire."""

    affine: torch.Tensor | None  # (4, 4) float64: output voxel c (centred, axes D, H, W) samples input A·c
    flip: bool
    bias: torch.Tensor | None  # (4, 4, 4) float32 Legendre coefficients of the log field over (D, H, W)
    gamma: float | None
    noise: torch.Tensor | None  # (1, D, H, W) float32


def _affine_theta(matrix: torch.Tensor, spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """(4, 4) voxel-space matrix -> (1, 3, 4) float32 ``F.affine_grid`` theta (``align_corners=False``).

    grid_sample normalises voxel coordinates by 2/size per axis and orders them (x, y, z) = (W, H, D), so
    theta = P·S·A·S⁻¹·P with S = diag(2/size) and P the axis reversal.
    """
    unit = torch.tensor([2.0 / s for s in spatial_shape], dtype=torch.float64)
    linear = matrix[:3, :3] * unit[:, None] / unit[None, :]
    return torch.cat([linear.flip(0, 1), (matrix[:3, 3] * unit).flip(0)[:, None]], dim=1)[None].float()


def _bias_field(coefficients: torch.Tensor, spatial_shape: tuple[int, ...]) -> torch.Tensor:
    """(D, H, W) float32 on the coefficients' device: sum c_ijk P_i(z) P_j(y) P_k(x), each coordinate on
    ``linspace(-1, 1, size)`` (MONAI RandBiasField's field, evaluated separably)."""
    device, degree = coefficients.device, BIAS_FIELD_DEGREE
    bases = [np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, s), degree) for s in spatial_shape]
    depth, height, width = (torch.as_tensor(b, dtype=torch.float32, device=device) for b in bases)
    return torch.einsum("ijk,di,hj,wk->dhw", coefficients, depth, height, width)


class Augmentation:
    """The training augmentation of BOTH data paths: ``VolumeDataset`` (DataLoader, one item at a time on the
    CPU) and ``device_data.DeviceBatches`` (batches on the training device) call this same code.

    Steps, in order, each firing with its ``*_prob``: affine (rotation uniform in ±``rotate_degrees`` about
    each axis, scale 1 ± ``scale_fraction`` and shift ±``translate_voxels`` per axis; image bilinear, mask
    nearest, zero padding), left-right flip (spatial axis 0, RAS), bias field (image × exp of a degree-3
    Legendre polynomial), gamma (the volume rescaled to [0, 1] by its min/max, raised to a power uniform in
    ``gamma_range``, scaled back), Gaussian noise (std ``noise_std``) on the nonzero voxels only, then the
    image clipped to [0, 1] and the mask to 0/1 — the parametrisation of MONAI's RandAffine, RandFlip,
    RandBiasField, RandAdjustContrast (``tests/test_dataset.py`` checks each step against MONAI's
    deterministic transforms).

    Seeding: every decision, parameter and noise value of item ``index`` in ``epoch`` comes from
    ``numpy.random.default_rng([seed, epoch, index])`` on the CPU, in a fixed order (the noise last), so an
    item's augmentation depends on nothing else (not its batch, worker, device or the other steps' settings)
    and a resumed run replays exactly, on either path.
    """

    def __init__(self, aug: AugmentationConfig, seed: int) -> None:
        self.aug, self.seed = aug, seed

    def draw(
        self, indices: Sequence[int] | torch.Tensor, epoch: int, spatial_shape: Sequence[int]
    ) -> list[AugmentationDraw]:
        """The augmentation of items ``indices`` in ``epoch`` for volumes of ``spatial_shape`` (D, H, W)."""
        shape, aug = tuple(int(s) for s in spatial_shape), self.aug
        draws = []
        for index in indices:
            rng = np.random.default_rng([self.seed, epoch, int(index)])
            probs = [aug.affine_prob, aug.flip_left_right_prob, aug.bias_field_prob, aug.gamma_prob]
            affine_on, flip_on, bias_on, gamma_on, noise_on = rng.uniform(size=5) < [*probs, aug.noise_prob]
            matrix = np.eye(4)
            angles = np.deg2rad(aug.rotate_degrees) * rng.uniform(-1.0, 1.0, 3)
            scales = 1.0 + aug.scale_fraction * rng.uniform(-1.0, 1.0, 3)
            matrix[:3, :3] = Rotation.from_euler("xyz", angles).as_matrix() * scales
            matrix[:3, 3] = aug.translate_voxels * rng.uniform(-1.0, 1.0, 3)
            coefficients = rng.uniform(0.0, BIAS_FIELD_MAX_COEFF, _BIAS_FIELD_TERMS.shape) * _BIAS_FIELD_TERMS
            gamma = float(rng.uniform(*aug.gamma_range))
            noise = None
            if noise_on and aug.noise_std > 0:
                noise = rng.standard_normal((1, *shape), dtype=np.float32) * np.float32(aug.noise_std)
            draws.append(
                AugmentationDraw(
                    affine=torch.from_numpy(matrix) if affine_on else None,
                    flip=bool(flip_on),
                    bias=torch.as_tensor(coefficients, dtype=torch.float32) if bias_on else None,
                    gamma=gamma if gamma_on else None,
                    noise=None if noise is None else torch.from_numpy(noise),
                )
            )
        return draws

    def apply(
        self, images: torch.Tensor, masks: torch.Tensor, draws: Sequence[AugmentationDraw]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``images``/``masks`` (B, 1, D, H, W) float32 (mask 0/1) augmented per ``draws`` (one per item), item
        by item, on their device. Returns new tensors: image in [0, 1], mask 0/1."""
        shape, device = tuple(images.shape[2:]), images.device
        out_images, out_masks = [], []
        for image, mask, draw in zip(images[:, None], masks[:, None], draws, strict=True):  # (1, 1, D, H, W)
            if draw.affine is not None:
                theta = _affine_theta(draw.affine, shape).to(device)
                grid = F.affine_grid(theta, image.shape, align_corners=False)
                sample = {"grid": grid, "padding_mode": "zeros", "align_corners": False}
                image = F.grid_sample(image, mode="bilinear", **sample)
                mask = F.grid_sample(mask, mode="nearest", **sample)
            if draw.flip:
                image, mask = image.flip(2), mask.flip(2)
            if draw.bias is not None:
                image = image * torch.exp(_bias_field(draw.bias.to(device), shape))
            if draw.gamma is not None:
                low, span = image.min(), image.max() - image.min()
                image = ((image - low) / (span + CONTRAST_EPSILON)) ** draw.gamma * span + low
            if draw.noise is not None:
                image = torch.where(image > 0, image + draw.noise.to(device), image)
            out_images.append(image.clamp(0.0, 1.0))
            out_masks.append((mask > 0.5).float())
        return torch.cat(out_images), torch.cat(out_masks)

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, indices: Sequence[int] | torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch (B, 1, D, H, W) of items ``indices`` for ``epoch``, on its device."""
        return self.apply(images, masks, self.draw(indices, epoch, images.shape[2:]))


def preprocessing_cache_dir(cache_dir: str | Path, prep: PreprocessingConfig) -> Path:
    """``cache_dir/<sha256 of the preprocessing settings + pipeline version>/``."""
    settings = json.dumps(
        {"version": PIPELINE_VERSION, **dataclasses.asdict(prep)}, sort_keys=True, default=list
    )
    return Path(cache_dir) / hashlib.sha256(settings.encode()).hexdigest()[:16]


def _file_stamp(path: str) -> str:
    """Size + mtime: part of the disk-cache key, so a file rewritten in place is preprocessed again."""
    try:
        stat = os.stat(path)
    except OSError as error:
        raise DataError(
            f"{path}: cannot stat ({error}); run the pre-flight check (dataset.preflight)"
        ) from None
    return f"{stat.st_size}-{stat.st_mtime_ns}"


class VolumeDataset(torch.utils.data.Dataset):
    """Preprocessed volumes (cached per ``cache``) with optional training augmentation after the cache
    (``augmentation=None`` for validation / inference).

    Item: ``{"image": (1, D, H, W) float32 in [0, 1], "mask": (1, D, H, W) float32 0/1, "index": int}``,
    ``index`` = row position in ``frame``. The augmentation of an item is seeded from (``seed``, epoch,
    index): the same in any worker process, so a resumed run replays exactly; call :meth:`set_epoch` at
    the start of every epoch to draw new augmentations.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        prep: PreprocessingConfig,
        augmentation: AugmentationConfig | None = None,
        cache: Literal["memory", "disk", "none"] = "memory",
        cache_dir: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        items = []
        for index, (image, mask) in enumerate(zip(frame["image"], frame["mask"], strict=True)):
            item = {"image": image, "index": index, "stamp": _file_stamp(image)}
            if mask is not None:  # "stamp_of_mask", not "mask_*": MONAI treats those keys as meta dicts
                item.update(mask=mask, stamp_of_mask=_file_stamp(mask))
            items.append(item)
        # flat list: CacheDataset / PersistentDataset cache up to the first Randomizable (a nested Compose is one)
        # cached: plain tensors (a MetaTensor would leak into the model and autograd), image float32, mask uint8
        transform = mt.Compose(
            [
                *build_preprocessing(prep).transforms,
                mt.EnsureTyped("image", dtype=torch.float32, track_meta=False),
                mt.EnsureTyped("mask", dtype=torch.uint8, track_meta=False),
                mt.SelectItemsd(["image", "mask", "index"]),
            ]
        )
        if cache == "memory":
            workers = min(4, os.cpu_count() or 1)
            self.base = CacheDataset(items, transform, progress=False, num_workers=workers, copy_cache=False)
        elif cache == "disk":  # cache and cache_dir: checked by config.py
            folder = preprocessing_cache_dir(cache_dir, prep)
            folder.mkdir(parents=True, exist_ok=True)
            self.base = PersistentDataset(items, transform, cache_dir=folder)
        else:
            self.base = MonaiDataset(items, transform)
        self.augment = Augmentation(augmentation, seed) if augmentation and augmentation.enabled else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (set before creating the epoch's loader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Items ``indices`` collated: image and mask (B, 1, D, H, W), as ``DeviceVolumeCache.batch``."""
        return torch.utils.data.default_collate([self[i] for i in indices])

    def __getitem__(self, index: int) -> dict[str, Any]:
        cached = self.base[index]  # the cache itself (no copy): never modify it in place
        image, mask = cached["image"].clone(), cached["mask"].float()
        if self.augment is not None:
            images, masks = self.augment(image[None], mask[None], [index], self.epoch)
            image, mask = images[0], masks[0]
        return {"image": image, "mask": mask, "index": cached["index"]}


def _preprocess_row(index: int, frame: pd.DataFrame, prep: PreprocessingConfig) -> dict[str, Any]:
    image = frame["image"].iloc[index]
    try:
        volume = preprocess_volume(image, prep, frame["mask"].iloc[index])
    except DataError as error:  # its message names the file already
        return {"index": index, "volume": None, "error": str(error)}
    except (OSError, ValueError, RuntimeError) as error:
        return {"index": index, "volume": None, "error": f"{image}: {error}"}
    return {"index": index, "volume": volume, "error": ""}


def preprocessed_batches(
    frame: pd.DataFrame, prep: PreprocessingConfig, indices: list[int], batch_size: int, num_workers: int
) -> Iterator[list[dict[str, Any]]]:
    """Rows ``indices`` of a split frame, preprocessed in worker processes (no cache, no augmentation), in
    batches (lists) in row order of ``{"index": row, "volume": PreprocessedVolume | None, "error": str}``.
    Preprocessing errors are returned, not raised, so one bad file does not stop a DataLoader."""
    rows = MonaiDataset(indices, functools.partial(_preprocess_row, frame=frame, prep=prep))
    yield from torch.utils.data.DataLoader(rows, batch_size, num_workers=num_workers, collate_fn=list)


def main(argv: list[str] | None = None) -> int:
    """``--check split [--skip_bad_files] [--strict]`` or ``--make_demo out_dir``; returns the exit code."""
    args = parse_args(argv)
    if args.make_demo:
        for split, csv in make_demo_cohort(args.make_demo).items():
            print(f"{split}: {csv}")
        return 0
    try:
        frame = read_split(args.check)
    except DataError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    report = check_files(frame)
    shown = report.assign(image=[Path(p).name for p in report["image"]]).drop(columns=["mask"])
    with pd.option_context("display.width", 250, "display.max_rows", None, "display.max_colwidth", 80):
        print(shown.to_string(index=False))
    good = report["problem"] == ""
    try:
        warn_inputs(frame[good.to_numpy()], strict=args.strict)
    except DataError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    if good.all():
        print(f"OK: all {len(report)} file(s) passed the pre-flight check")
        return 0
    table = "".join(f"\n  {row.image}: {row.problem}" for row in report.itertuples() if row.problem)
    failed = f"{(~good).sum()} of {len(report)} file(s)"
    if args.skip_bad_files:
        print(f"SKIPPING {failed}:{table}", file=sys.stderr)
        return 0 if good.any() else 1
    print(f"ERROR: {failed} failed the pre-flight check:{table}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
