"""Data for the 3D brain VAE: split reading, pre-flight checks, THE preprocessing, datasets.

Every script (train, infer, save_latent, notebook) preprocesses through :func:`preprocess_volume` /
:func:`build_preprocessing` and maps results back with :func:`restore_to_input_grid`; nothing here is
re-implemented elsewhere.

Splits (:func:`read_split`): a CSV, a folder of NIfTI files or one NIfTI file. Every row gets a
``subject_id``, by one rule: the CSV's ``subject_id`` cell when given, otherwise the file name without
``.nii``/``.nii.gz`` and without a trailing BIDS ``_T1w`` (``sub-01_T1w.nii.gz`` -> ``sub-01``,
``IXI014-HH-1236_T1.nii.gz`` -> ``IXI014-HH-1236_T1``). Subject ids must be unique within a split: they name
every per-row output (reconstructions, latents, metrics rows).

Preprocessing (MONAI transforms on a channel-first MetaTensor that carries the affine):
load (nibabel) -> channel first -> reorient to ``prep.orientation`` -> resample to ``prep.target_spacing``
(skipped when already there) -> centred pad/crop to ``prep.target_shape`` -> intensity to [0, 1]
(robust percentiles over the foreground (voxels > 0), background stays 0; or min-max) -> optional masking.

CLI::

    python dataset.py --check split.csv [--skip_bad_files] [--strict]
    python dataset.py --make_demo data/demo      # the demo cohort, built by demo_cohort.py
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import monai.transforms as mt
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.data import CacheDataset, MetaTensor, PersistentDataset
from monai.data import Dataset as MonaiDataset
from scipy import ndimage

from config import AugmentationConfig, PreprocessingConfig
from demo_cohort import (
    make_demo_cohort,
)

__all__ = [
    "DataError",
    "InverseInfo",
    "PreprocessedRows",
    "PreprocessedVolume",
    "VolumeDataset",
    "build_augmentation",
    "build_dataset",
    "build_preprocessing",
    "check_files",
    "input_warnings",
    "preflight",
    "preflight_failures",
    "preprocessed_batches",
    "preprocess_volume",
    "preprocessing_cache_dir",
    "read_split",
    "restore_to_input_grid",
    "warn_inputs",
]

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
BIDS_T1W_SUFFIX = "_T1w"  # dropped from file names when deriving subject ids
MAX_LISTED_IDS = 5  # duplicated subject ids named in full in the error message
SPACING_TOLERANCE_MM = 0.01
PIPELINE_VERSION = "1"  # bump when the preprocessing code changes, so disk caches are rebuilt


class DataError(ValueError):
    """Bad input data; the message names the file(s) and the problem."""


# ----------------------------------------------------------------------------------------------- splits


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _subject_id(path: str | Path) -> str:
    """Subject id of a file: its name without ``.nii``/``.nii.gz`` and a trailing ``_T1w``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith(BIDS_T1W_SUFFIX) and len(name) > len(BIDS_T1W_SUFFIX):
        name = name[: -len(BIDS_T1W_SUFFIX)]
    return name


def _resolve(value: Any, base: Path) -> str | None:
    """Absolute path string for a CSV cell (relative to ``base``); None for an empty cell."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == "":
        return None
    path = Path(str(value).strip()).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def read_split(source: str | Path) -> pd.DataFrame:
    """Read a split: a CSV (``image`` column required), a folder of NIfTI files, or one NIfTI file.

    Returns columns ``subject_id``, ``image`` (absolute str), ``mask`` (absolute str or None), then every
    other CSV column unchanged. ``subject_id`` follows the rule in the module docstring; a split whose
    images or subject ids repeat is refused (:class:`DataError` naming them and their files).
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
    if "mask" not in frame:
        frame["mask"] = None
    if "subject_id" not in frame:
        frame["subject_id"] = None
    frame["subject_id"] = [
        str(sid).strip() if pd.notna(sid) and str(sid).strip() else _subject_id(image)
        for sid, image in zip(frame["subject_id"], frame["image"], strict=True)
    ]
    duplicated = frame["image"][frame["image"].duplicated(keep=False)]
    if len(duplicated):
        raise DataError(f"{source}: duplicate rows for image(s) {sorted(set(duplicated))}")
    _refuse_duplicate_ids(frame, source)
    others = [c for c in frame.columns if c not in ("subject_id", "image", "mask")]
    return frame[["subject_id", "image", "mask", *others]].reset_index(drop=True)


def _refuse_duplicate_ids(frame: pd.DataFrame, source: Path) -> None:
    """Raise :class:`DataError` naming every repeated subject id with its files (they name the outputs)."""
    repeated = frame[frame["subject_id"].duplicated(keep=False)]
    if repeated.empty:
        return
    files = [(sid, list(images)) for sid, images in repeated.groupby("subject_id", sort=True)["image"]]
    listed = "; ".join(f"{sid!r} ({', '.join(images)})" for sid, images in files[:MAX_LISTED_IDS])
    more = f"; (+{len(files) - MAX_LISTED_IDS} more)" if len(files) > MAX_LISTED_IDS else ""
    raise DataError(
        f"{source}: subject_id must be unique (it names each row's outputs); duplicated: {listed}{more}. "
        "Give each row its own subject_id (CSV column) or rename the files"
    )


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


# ------------------------------------------------------------------------------------------- pre-flight


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
    zooms = image.header.get_zooms()[:3]
    info.update(
        readable=True,
        shape="x".join(map(str, shape)),
        volumes=int(np.prod(shape[3:])) if len(shape) > 3 else 1,
        voxel_size="x".join(f"{z:.3g}" for z in zooms),
        orientation="".join(nib.aff2axcodes(image.affine)),
        dtype=str(image.get_data_dtype()),
    )
    finite = np.isfinite(data) if data.dtype.kind == "f" else None
    has_nonfinite = finite is not None and not bool(finite.all())
    values = data[finite] if has_nonfinite else data
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
    info["problem"] = "; ".join(problems)
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
    """Inspect every image (and mask) of a split frame; one row per file, ``problem`` '' when fine.

    Columns: subject_id, image, readable, shape, volumes, voxel_size, orientation, dtype, min, max,
    nan_inf, constant, mask, problem.
    """
    rows = []
    for subject_id, image, mask in zip(frame["subject_id"], frame["image"], frame["mask"], strict=True):
        info = _inspect_image(image)
        spatial_shape = info.pop("_spatial_shape", None)
        problems = [info.pop("problem")] if info["problem"] else []
        if mask is not None:
            mask_problem = _inspect_mask(mask, spatial_shape)
            if mask_problem:
                problems.append(mask_problem)
        rows.append(
            {"subject_id": subject_id, "image": image, **info, "mask": mask, "problem": "; ".join(problems)}
        )
    columns = ["subject_id", "image", "readable", "shape", "volumes", "voxel_size", "orientation", "dtype"]
    columns += ["min", "max", "nan_inf", "constant", "mask", "problem"]
    return pd.DataFrame(rows).reindex(columns=columns)


def _problem_table(report: pd.DataFrame) -> str:
    bad = report[report["problem"] != ""]
    return "\n".join(
        f"  {image}: {problem}" for image, problem in zip(bad["image"], bad["problem"], strict=True)
    )


def preflight(frame: pd.DataFrame, skip_bad_files: bool = False) -> pd.DataFrame:
    """Check every file; raise :class:`DataError` listing the problems, or (``skip_bad_files``) drop them.

    Skipped files are printed and logged explicitly; the returned frame keeps the good rows only.
    """
    report = check_files(frame)
    bad = (report["problem"] != "").to_numpy()
    if not bad.any():
        return frame
    table = _problem_table(report)
    if not skip_bad_files:
        raise DataError(
            f"{int(bad.sum())} of {len(frame)} file(s) failed the pre-flight check "
            f"(fix them, or set data.skip_bad_files / --skip_bad_files to drop them):\n{table}"
        )
    message = f"SKIPPING {int(bad.sum())} of {len(frame)} file(s) that failed the pre-flight check:\n{table}"
    print(message, file=sys.stderr)
    log.warning(message)
    good = frame[~bad].reset_index(drop=True)
    if good.empty:
        raise DataError("every file failed the pre-flight check; nothing left to use")
    return good


# -------------------------------------------------------------------------------------- input warnings

NON_BRAIN_VOLUME_ML = 3000.0  # more non-zero signal than this is a head, not a skull-stripped brain (~1-2 l)
GRID_DECIMALS = 2  # affines compared to 0.01 mm
PREPARE_HINT = "raw scans? run: python prepare.py --input <scans> --output_dir prepared/"


def _grid(path: str, orientation: str | None) -> tuple[tuple[int, ...], tuple[float, ...], np.ndarray]:
    """(spatial shape, voxel size) in ``orientation``'s axis order (the file's own when None), and affine."""
    header = nib.load(path)
    shape, zooms = (
        tuple(int(s) for s in header.shape[:3]),
        tuple(float(z) for z in header.header.get_zooms()[:3]),
    )
    if orientation is not None:
        ornt = nib.orientations.ornt_transform(
            nib.io_orientation(header.affine), nib.orientations.axcodes2ornt(tuple(orientation.upper()))
        )
        order = [int(np.flatnonzero(ornt[:, 0] == axis)[0]) for axis in range(3)]
        shape, zooms = tuple(shape[i] for i in order), tuple(zooms[i] for i in order)
    return shape, zooms, np.round(np.asarray(header.affine, dtype=np.float64), GRID_DECIMALS)


def _describe(shape: tuple[int, ...], zooms: tuple[float, ...]) -> str:
    return f"{'x'.join(map(str, shape))} at {'x'.join(f'{z:g}' for z in zooms)} mm"


def _non_brain_warning(path: str) -> str:
    """'' when the image could be skull-stripped, else what says it is not (too much non-zero signal)."""
    image = nib.load(path)
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    volume_ml = float(np.count_nonzero(np.asanyarray(image.dataobj))) * voxel_ml
    if volume_ml <= NON_BRAIN_VOLUME_ML:
        return ""
    return f"does not look skull-stripped ({volume_ml:.0f} ml of non-zero signal; a brain is < {NON_BRAIN_VOLUME_ML:.0f} ml)"


def input_warnings(frame: pd.DataFrame, prep: PreprocessingConfig | None = None) -> list[str]:
    """One line per input that does not look model-ready: '<image>: <why>; <how to prepare>'.

    With ``prep`` (the checkpoint's preprocessing): a file whose grid (shape and voxel size, in
    ``prep.orientation`` axis order) is not ``prep.target_shape`` / ``prep.target_spacing``. Without it (a
    training split): a file whose grid (shape, affine) differs from the split's most common one. Always: a
    file with more non-zero signal than a brain. Unreadable files are left to :func:`check_files`.
    """
    grids: dict[str, tuple] = {}
    reasons: dict[str, list[str]] = {}
    for image in frame["image"]:
        try:
            grids[image] = _grid(image, None if prep is None else prep.orientation)
            skull = _non_brain_warning(image)
        except Exception:  # unreadable: check_files reports it
            continue
        reasons[image] = [skull] if skull else []
    if prep is not None:
        expected_spacing = None if prep.target_spacing is None else tuple(prep.target_spacing)
        for image, (shape, zooms, _) in grids.items():
            spacing_differs = expected_spacing is not None and not np.allclose(
                zooms, expected_spacing, atol=SPACING_TOLERANCE_MM
            )
            if shape != tuple(prep.target_shape) or spacing_differs:
                trained = _describe(tuple(prep.target_shape), expected_spacing or zooms)
                reasons[image].insert(
                    0, f"grid {_describe(shape, zooms)}, the model was trained on {trained}"
                )
    elif grids:
        keys = {image: (shape, zooms, affine.tobytes()) for image, (shape, zooms, affine) in grids.items()}
        counts = pd.Series(list(keys.values())).value_counts(sort=True)
        if len(counts) > 1:
            common = counts.index[0] if counts.iloc[0] > 1 else None  # None: no two files share a grid
            for image, key in keys.items():
                if common is None:
                    why = f"grid {_describe(key[0], key[1])}: the split mixes grids (no two of its {len(keys)} files"
                    reasons[image].insert(0, f"{why} share shape, voxel size and affine)")
                elif key != common:
                    note = "" if key[:2] != common[:2] else " (same shape and voxel size, other affine)"
                    reasons[image].insert(
                        0,
                        f"grid {_describe(key[0], key[1])}{note} differs from {counts.iloc[0]} of {len(keys)} "
                        f"files of this split ({_describe(common[0], common[1])}): the split mixes grids",
                    )
    return [f"{image}: {'; '.join(why)}; {PREPARE_HINT}" for image, why in reasons.items() if why]


def warn_inputs(
    frame: pd.DataFrame, prep: PreprocessingConfig | None = None, strict: bool = False
) -> list[str]:
    """Print (stderr) and log :func:`input_warnings` as ``WARNING:`` lines; ``strict``: raise :class:`DataError`."""
    lines = input_warnings(frame, prep)
    if lines and strict:
        table = "\n".join(f"  {line}" for line in lines)
        raise DataError(f"{len(lines)} input(s) do not look model-ready (strict input checks):\n{table}")
    for line in lines:
        print(f"WARNING: {line}", file=sys.stderr)
        log.warning(line)
    return lines


# ---------------------------------------------------------------------------------------- preprocessing


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


@dataclass
class PreprocessedVolume:
    """``image`` (1, D, H, W) float32 in [0, 1]; ``mask`` (1, D, H, W) bool; ``inverse`` to map back."""

    image: torch.Tensor
    mask: torch.Tensor
    inverse: InverseInfo


def _spacing(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


class _CheckLoaded(mt.MapTransform):
    """Refuse anything but one 3D volume, and a mask on another grid than its image."""

    def __call__(self, data: dict) -> dict:
        image = data["image"]
        source = image.meta.get("filename_or_obj", "?")
        if image.shape[0] != 1 or image.ndim != 4 or min(image.shape[1:]) < 2:
            raise DataError(f"{source}: expected one 3D volume, got channel-first shape {tuple(image.shape)}")
        if "mask" in data:
            mask = data["mask"]
            if mask.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
                raise DataError(
                    f"{mask.meta.get('filename_or_obj', '?')}: mask grid (shape {tuple(mask.shape[1:])}) "
                    f"differs from its image {source} (shape {tuple(image.shape[1:])}) or their affines differ"
                )
        return data


class _ResampleIfNeeded(mt.MapTransform):
    """``Spacingd`` (linear for the image, nearest for the mask), skipped when the spacing already fits."""

    def __init__(self, pixdim: tuple[float, float, float]) -> None:
        super().__init__(["image", "mask"], allow_missing_keys=True)
        self.pixdim = np.asarray(pixdim, dtype=np.float64)
        self.spacing = mt.Spacingd(
            ["image", "mask"], pixdim=pixdim, mode=("bilinear", "nearest"), allow_missing_keys=True
        )

    def __call__(self, data: dict) -> dict:
        if np.allclose(_spacing(data["image"].affine), self.pixdim, atol=SPACING_TOLERANCE_MM):
            return data
        return self.spacing(data)


class _ScaleIntensity(mt.Transform):
    """Image to [0, 1]; low/high are stored in ``image.meta`` (``intensity_low`` / ``intensity_high``).

    ``percentile``: low/high = percentiles over the foreground (voxels > 0), clip to [0, 1]; the background
    (voxels <= 0) becomes exactly 0.
    ``minmax``: low/high = min/max over the whole volume.
    """

    def __init__(self, prep: PreprocessingConfig) -> None:
        self.prep = prep

    def __call__(self, data: dict) -> dict:
        image = data["image"]
        values = image.detach().cpu().numpy()
        source = image.meta.get("filename_or_obj", "?")
        if not np.isfinite(values).all():
            raise DataError(f"{source}: NaN/Inf voxels")
        if self.prep.intensity == "percentile":
            foreground = values[values > 0]
            if foreground.size == 0:
                raise DataError(f"{source}: no positive voxel inside the target field of view")
            low, high = np.percentile(foreground, [self.prep.lower_percentile, self.prep.upper_percentile])
        else:
            low, high = values.min(), values.max()
        if not high > low:
            raise DataError(f"{source}: no intensity range to normalise (low = high = {float(low):g})")
        scaled = ((image - float(low)) / float(high - low)).clamp(0.0, 1.0)
        if self.prep.intensity == "percentile":
            scaled = torch.where(image > 0, scaled, torch.zeros_like(scaled))
        scaled.meta["intensity_low"], scaled.meta["intensity_high"] = float(low), float(high)
        data["image"] = scaled
        return data


class _MakeMask(mt.Transform):
    """``mask`` -> bool: the given mask > 0, else the image foreground (input intensity > 0)."""

    def __call__(self, data: dict) -> dict:
        data["mask"] = data["mask"] > 0 if "mask" in data else data["image"] > 0
        return data


class _ApplyMask(mt.Transform):
    """Zero the image outside the mask when ``apply_mask``."""

    def __init__(self, apply_mask: bool) -> None:
        self.apply_mask = apply_mask

    def __call__(self, data: dict) -> dict:
        if self.apply_mask:
            data["image"] = data["image"] * data["mask"]
        return data


def build_preprocessing(prep: PreprocessingConfig) -> mt.Compose:
    """The one deterministic MONAI chain: dict ``{"image": path, ["mask": path]}`` -> MetaTensors.

    Output ``image`` (1, D, H, W) float32 in [0, 1], ``mask`` (1, D, H, W) bool, both on the target grid.
    """
    keys = ["image", "mask"]
    steps: list = [
        mt.LoadImaged(
            keys,
            reader="NibabelReader",
            image_only=True,
            ensure_channel_first=True,
            dtype=np.float32,
            allow_missing_keys=True,
        ),
        _CheckLoaded(keys, allow_missing_keys=True),
        mt.Orientationd(
            keys,
            axcodes=prep.orientation.upper(),
            labels=(("L", "R"), ("P", "A"), ("I", "S")),
            allow_missing_keys=True,
        ),
    ]
    if prep.target_spacing is not None:
        steps.append(_ResampleIfNeeded(tuple(prep.target_spacing)))
    steps += [
        mt.ResizeWithPadOrCropd(keys, spatial_size=tuple(prep.target_shape), allow_missing_keys=True),
        _MakeMask(),
        _ScaleIntensity(prep),
        _ApplyMask(prep.apply_mask),
    ]
    return mt.Compose(steps)


def preprocess_volume(
    image_path: str | Path, prep: PreprocessingConfig, mask_path: str | Path | None = None
) -> PreprocessedVolume:
    """Preprocess one file (and its optional brain mask) with :func:`build_preprocessing`."""
    item = {"image": str(image_path)}
    if mask_path is not None:
        item["mask"] = str(mask_path)
    try:
        out = build_preprocessing(prep)(item)
    except RuntimeError as error:  # MONAI wraps errors raised inside a transform
        cause = error.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__
        if isinstance(cause, DataError):
            raise cause from None
        raise DataError(f"{image_path}: preprocessing failed ({error})") from error
    image = out["image"]
    header_image = nib.load(str(image_path))
    inverse = InverseInfo(
        source=str(image_path),
        input_affine=np.asarray(header_image.affine, dtype=np.float64),
        input_shape=tuple(int(s) for s in header_image.shape[:3]),
        output_affine=np.asarray(image.affine, dtype=np.float64),
        intensity=prep.intensity,
        low=image.meta["intensity_low"],
        high=image.meta["intensity_high"],
    )
    return PreprocessedVolume(
        image=image.as_tensor().float(), mask=out["mask"].as_tensor().bool(), inverse=inverse
    )


def restore_to_input_grid(
    volume: np.ndarray | torch.Tensor,
    inverse: InverseInfo,
    intensity: Literal["original", "unit"] = "original",
) -> nib.Nifti1Image:
    """Map a (1, D, H, W) or (D, H, W) volume on the preprocessed grid back onto the input file's grid.

    Orientation, pad/crop and spacing are undone through the two affines (exact voxel copy when the grids
    differ by an axis permutation/flip/shift only, else linear interpolation); voxels outside the
    preprocessed field of view become 0. ``original`` also undoes the intensity scaling (values <= 0 stay
    0 under percentile scaling: the background); ``unit`` keeps [0, 1]. Returns float32 NIfTI with the
    input's affine and spatial shape.
    """
    array = volume.detach().cpu().float().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 4:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a (1, D, H, W) or (D, H, W) volume, got shape {volume.shape}")
    # input voxel -> world -> preprocessed voxel
    mapping = np.linalg.inv(inverse.output_affine) @ inverse.input_affine
    is_grid_shift = np.allclose(mapping, np.round(mapping), atol=1e-4)
    if is_grid_shift:
        mapping = np.round(mapping)
    restored = ndimage.affine_transform(
        array,
        mapping[:3, :3],
        offset=mapping[:3, 3],
        output_shape=inverse.input_shape,
        order=0 if is_grid_shift else 1,
        mode="constant",
        cval=0.0,
    )
    if intensity == "original":
        scaled = restored * np.float32(inverse.high - inverse.low) + np.float32(inverse.low)
        if inverse.intensity == "percentile":
            scaled = np.where(restored > 0, scaled, np.float32(0))
        restored = scaled
    elif intensity != "unit":
        raise ValueError(f"intensity must be 'original' or 'unit', got {intensity!r}")
    return nib.Nifti1Image(restored.astype(np.float32), inverse.input_affine)


# ------------------------------------------------------------------------------------------ augmentation


class _RandForegroundNoised(mt.RandomizableTransform, mt.MapTransform):
    """Gaussian noise on the nonzero voxels of ``image`` only (the background stays 0)."""

    def __init__(self, prob: float, std: float) -> None:
        mt.RandomizableTransform.__init__(self, prob)
        mt.MapTransform.__init__(self, ["image"])
        self.std = std

    def __call__(self, data: dict) -> dict:
        self.randomize(None)
        if not self._do_transform or self.std == 0:
            return data
        image = data["image"]
        noise = torch.as_tensor(self.R.normal(0.0, self.std, size=image.shape), dtype=image.dtype)
        data["image"] = torch.where(image > 0, image + noise, image)
        return data


class _ClipUnit(mt.Transform):
    """Clip ``image`` to [0, 1] and ``mask`` to 0/1."""

    def __call__(self, data: dict) -> dict:
        data["image"] = data["image"].clamp(0.0, 1.0)
        data["mask"] = (data["mask"] > 0.5).float()
        return data


def build_augmentation(aug: AugmentationConfig) -> mt.Compose:
    """Training-only random transforms on dict items with ``image``/``mask`` (1, D, H, W) float32."""
    radians = float(np.deg2rad(aug.rotate_degrees))
    steps: list = [
        mt.RandAffined(
            ["image", "mask"],
            prob=aug.affine_prob,
            rotate_range=(radians,) * 3,
            scale_range=(aug.scale_fraction,) * 3,
            translate_range=(aug.translate_voxels,) * 3,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
    ]
    if aug.flip_left_right_prob > 0:  # axis 0 is left-right in the RAS preprocessed grid
        steps.append(mt.RandFlipd(["image", "mask"], prob=aug.flip_left_right_prob, spatial_axis=0))
    steps += [
        mt.RandBiasFieldd(["image"], prob=aug.bias_field_prob, coeff_range=(0.0, 0.1)),
        mt.RandAdjustContrastd(["image"], prob=aug.gamma_prob, gamma=tuple(aug.gamma_range)),
        _RandForegroundNoised(prob=aug.noise_prob, std=aug.noise_std),
        _ClipUnit(),
    ]
    return mt.Compose(steps)


# ---------------------------------------------------------------------------------------------- datasets


class _ToCacheable(mt.Transform):
    """Plain tensors (not MetaTensors) for caching: ``image`` float32, ``mask`` uint8; keeps ``index``."""

    def __call__(self, data: dict) -> dict:
        return {
            "image": _plain_tensor(data["image"]).float().contiguous(),
            "mask": _plain_tensor(data["mask"]).to(torch.uint8).contiguous(),
            "index": data["index"],
        }


def _plain_tensor(value: Any) -> torch.Tensor:
    """A bare ``torch.Tensor``: MONAI's MetaTensor subclass would leak into the model and autograd."""
    return value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)


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
    """Preprocessed volumes (cached per ``cache``) with optional training augmentation after the cache.

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
            if mask is not None:
                item["mask"], item["stamp_of_mask"] = (
                    mask,
                    _file_stamp(mask),
                )  # not "mask_*": MONAI treats those as meta dicts
            items.append(item)
        # flat list: CacheDataset / PersistentDataset cache up to the first Randomizable (a nested Compose is one)
        transform = mt.Compose([*build_preprocessing(prep).transforms, _ToCacheable()])
        if cache == "memory":
            workers = min(4, os.cpu_count() or 1)
            self.base = CacheDataset(items, transform, progress=False, num_workers=workers, copy_cache=False)
        elif cache == "disk":
            if cache_dir is None:
                raise ValueError("cache='disk' needs a cache_dir")
            folder = preprocessing_cache_dir(cache_dir, prep)
            folder.mkdir(parents=True, exist_ok=True)
            self.base = PersistentDataset(items, transform, cache_dir=folder)
        elif cache == "none":
            self.base = MonaiDataset(items, transform)
        else:
            raise ValueError(f"cache must be 'memory', 'disk' or 'none', got {cache!r}")
        use_augmentation = augmentation is not None and augmentation.enabled
        self.augment = build_augmentation(augmentation) if use_augmentation else None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (set before creating the epoch's loader iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cached = self.base[index]  # the cache itself (no copy): never modify it in place
        item = {"image": cached["image"].clone(), "mask": cached["mask"].float(), "index": cached["index"]}
        if self.augment is None:
            return item
        item_seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0]
        self.augment.set_random_state(seed=int(item_seed))
        item = self.augment(item)
        return {
            "image": _plain_tensor(item["image"]).float(),
            "mask": _plain_tensor(item["mask"]).float(),
            "index": item["index"],
        }


def build_dataset(
    frame: pd.DataFrame,
    prep: PreprocessingConfig,
    augmentation: AugmentationConfig | None,
    cache: Literal["memory", "disk", "none"] = "memory",
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> VolumeDataset:
    """A :class:`VolumeDataset`; pass ``augmentation=None`` for validation / inference."""
    return VolumeDataset(frame, prep, augmentation, cache, cache_dir, seed)


def preflight_failures(frame: pd.DataFrame) -> dict[int, str]:
    """Row index -> "<image>: <problem>" for every row that fails :func:`check_files` (as in training)."""
    report = check_files(frame)
    return {
        i: f"{image}: {problem}"
        for i, (image, problem) in enumerate(zip(report["image"], report["problem"], strict=True))
        if problem
    }


class PreprocessedRows(torch.utils.data.Dataset):
    """Row ``i`` of a split frame -> ``{"index": i, "volume": PreprocessedVolume | None, "error": str}``.

    For inference and latent saving (no cache, no augmentation). Preprocessing errors are returned, not
    raised, so one bad file does not stop a DataLoader.
    """

    def __init__(self, frame: pd.DataFrame, prep: PreprocessingConfig, indices: list[int]) -> None:
        self.images, self.masks = list(frame["image"]), list(frame["mask"])
        self.prep, self.indices = prep, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        try:
            volume = preprocess_volume(self.images[index], self.prep, self.masks[index])
        except (DataError, OSError, ValueError, RuntimeError) as error:
            return {"index": index, "volume": None, "error": f"{self.images[index]}: {error}"}
        return {"index": index, "volume": volume, "error": ""}


def preprocessed_batches(
    frame: pd.DataFrame, prep: PreprocessingConfig, indices: list[int], batch_size: int, num_workers: int
) -> Iterator[list[dict[str, Any]]]:
    """Batches (lists) of :class:`PreprocessedRows` items in row order, preprocessed in worker processes."""
    loader = torch.utils.data.DataLoader(
        PreprocessedRows(frame, prep, indices),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``--check split [--skip_bad_files]`` or ``--make_demo out_dir``; returns the exit code."""
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
    args = parser.parse_args(argv)
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
    n_bad = int((report["problem"] != "").sum())
    try:
        warn_inputs(frame[(report["problem"] == "").to_numpy()], strict=args.strict)
    except DataError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    if n_bad == 0:
        print(f"OK: all {len(report)} file(s) passed the pre-flight check")
        return 0
    table = _problem_table(report)
    if args.skip_bad_files:
        print(f"SKIPPING {n_bad} of {len(report)} file(s):\n{table}", file=sys.stderr)
        return 0 if n_bad < len(report) else 1
    print(f"ERROR: {n_bad} of {len(report)} file(s) failed the pre-flight check:\n{table}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
