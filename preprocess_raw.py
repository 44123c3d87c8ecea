"""Raw T1w scans -> model-ready volumes on the FSL MNI152 2 mm grid, with QC (the library behind prepare.py).

Per subject (:func:`prepare_subject`), each step done by a maintained library:

1. load with nibabel (scale factors applied), reorient to RAS (``as_closest_canonical``);
2. N4 bias-field correction (ANTsPy, fitted on an ~8 mm grid at any voxel size), unless
   ``bias_correction=False``;
3. brain mask by deepbet (its bundled weights, CPU), unless ``brain_extraction=False`` (then the input's
   ``mask`` column, or its non-zero voxels: the input is already skull-stripped);
4. registration of the brain to nilearn's MNI152 brain template (ANTsPy, ``affine`` or ``rigid``; ``none``
   keeps the input's own world coordinates), with the recipe of the shared IXI reference images: Mattes
   MI, 32 bins, 20 % regular sampling, shrink 6x4x2x1, smoothing 3x2x1x0 voxels, iterations
   2100x1200x1200x10, centre-of-mass initialisation, ANTs random seed 1, single-threaded ITK;
5. image (linear) and mask (nearest neighbour) resampled onto the FSL MNI152 2 mm grid (91x109x91,
   diag(-2, 2, 2), origin (90, -126, -72), q/sform code 4); voxels outside the mask and negative values
   set to 0; intensities stay in the input's units (float32; ``dataset.py`` normalises).

QC per subject (:data:`QC_THRESHOLDS`): NCC of the registered brain with the template inside the template
brain mask, Dice of the registered mask with the template mask, brain volume (ml, native grid), the
determinant of the affine's linear part (template -> subject: < 1 means a brain smaller than the
template) and seconds taken. A subject is ``ok`` or ``flagged:<reasons>``; an input that cannot be used
is ``error:<problem>``.

Outputs under ``output_dir`` (all written atomically: temp file + ``os.replace``)::

    images/<id>_T1w_mni2mm.nii.gz   masks/<id>_brainmask_mni2mm.nii.gz
    masks_native/<id>_brainmask_native.nii.gz (the brain mask on the input's grid, RAS voxel order)
    qc/<id>.png (three slices, template brain outline)   qc/<id>.json (QC row + provenance; written
    last, so a subject counts as done only when it exists and names outputs that exist)
    qc.csv (or qc.part-K.csv per shard)   prepared.csv   qc_overview.png   provenance.json

Process set-up: call :func:`init_worker` in every process before ANTs or deepbet run (ITK on one thread,
ANTs seed, torch on one thread): two runs on the same input then give identical bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import matplotlib
import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)

__all__ = [
    "MNI2MM_AFFINE",
    "MNI2MM_SHAPE",
    "QC_THRESHOLDS",
    "InputError",
    "PrepareOptions",
    "init_worker",
    "load_raw",
    "merge_parts",
    "mni2mm_template",
    "output_paths",
    "part_path",
    "qc_table",
    "prepare_subject",
    "prepared_table",
    "qc_flags",
    "save_overview",
    "shard_rows",
    "run_provenance",
    "write_csv_atomic",
    "write_text_atomic",
]

MNI2MM_SHAPE = (91, 109, 91)
MNI2MM_AFFINE = np.array(
    [[-2.0, 0.0, 0.0, 90.0], [0.0, 2.0, 0.0, -126.0], [0.0, 0.0, 2.0, -72.0], [0.0, 0.0, 0.0, 1.0]]
)
MNI_XFORM_CODE = 4  # NIfTI code for MNI152 space
ANTS_SEED = 1
ITK_THREADS_VARIABLE = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
_deterministic_here: bool | None = None  # set by the first init_worker() call of this process
TEMPLATE_FWHM_MM = math.sqrt(3.0)  # light smoothing of the 1 mm template before it goes to 2 mm
QC_THRESHOLDS = {"ncc_min": 0.3, "dice_min": 0.85, "det_min": 0.4, "det_max": 1.6}
MAX_OVERVIEW_SUBJECTS = 60  # the overview sheet shows the worst-NCC subjects, at most this many
N4_FIT_MM = 8.0  # N4's fitting grid in mm (see n4_shrink_factor)
PIPELINE_VERSION = "2"  # bump when the outputs of the same options change; recorded in provenance
TEMPLATE_DESCRIPTION = (
    "nilearn MNI152 2009a (mni_icbm152_t1_tal_nlin_sym_09a, 1 mm) x its brain mask, "
    "Gaussian FWHM sqrt(3) mm, linear to the FSL 2 mm grid"
)
QC_COLUMNS = ["subject_id", "status", "ncc", "dice", "brain_volume_ml", "affine_det", "seconds"]
QC_COLUMNS += ["image", "mask", "source_image", "shard"]

Registration = Literal["affine", "rigid", "none"]


class InputError(ValueError):
    """An input scan that cannot be prepared; the message names the problem (the caller names the file)."""


@dataclass(frozen=True)
class PrepareOptions:
    """Which steps run; recorded in every subject's provenance (a changed option re-prepares the subject)."""

    bias_correction: bool = True
    brain_extraction: bool = True
    registration: Registration = "affine"


# --------------------------------------------------------------------------------------------- set-up


def init_worker() -> bool:
    """Make this process deterministic: ITK on one thread, ANTs seed :data:`ANTS_SEED`, torch on one thread.

    Returns False when that cannot be guaranteed here: ANTs was imported before with ITK multi-threaded (ITK
    fixes its thread count at first use), so the work must run in a fresh process.
    """
    global _deterministic_here
    if _deterministic_here is None:  # decided at the first call: what ITK saw at its first use
        _deterministic_here = "ants" not in sys.modules or os.environ.get(ITK_THREADS_VARIABLE) == "1"
    os.environ[ITK_THREADS_VARIABLE] = "1"
    import torch
    from ants.config import set_ants_deterministic

    # on=True would refuse the non-"Repro" 'Affine' transform; on=False still passes --random-seed to ANTs
    set_ants_deterministic(False, seed_value=ANTS_SEED)
    torch.set_num_threads(1)
    return _deterministic_here


def _versions() -> dict[str, str]:
    names = ["antspyx", "deepbet", "nilearn", "nibabel", "numpy", "torch"]
    return {name: metadata.version(name) for name in names} | {"python": platform.python_version()}


# ------------------------------------------------------------------------------------------- template


@functools.cache
def mni2mm_template() -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """nilearn's MNI152 2009a brain on the FSL 2 mm grid: (brain float32, brain mask uint8), (91, 109, 91).

    The 1 mm template (bundled with nilearn) times its brain mask, smoothed (FWHM sqrt(3) mm) and
    resampled linearly; the mask by nearest neighbour. Nothing is downloaded.
    """
    from nilearn import datasets, image

    template = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    brain = image.math_img("t * m", t=template, m=mask)
    brain = image.smooth_img(brain, fwhm=TEMPLATE_FWHM_MM)
    grid = {"target_affine": MNI2MM_AFFINE, "target_shape": MNI2MM_SHAPE, "copy_header": True}
    brain_2mm = image.resample_img(brain, interpolation="linear", force_resample=True, **grid)
    mask_2mm = image.resample_img(mask, interpolation="nearest", force_resample=True, **grid)
    return (
        _mni_image(np.asarray(brain_2mm.get_fdata(), dtype=np.float32)),
        _mni_image(np.asarray(mask_2mm.get_fdata()) > 0.5),
    )


def _mni_image(array: np.ndarray, descrip: str = "") -> nib.Nifti1Image:
    """A (91, 109, 91) array as NIfTI on the FSL MNI 2 mm grid, q/sform code 4 (bool -> uint8)."""
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = nib.Nifti1Image(array, MNI2MM_AFFINE)
    image.set_qform(MNI2MM_AFFINE, code=MNI_XFORM_CODE)
    image.set_sform(MNI2MM_AFFINE, code=MNI_XFORM_CODE)
    image.header["descrip"] = descrip.encode()[:79]
    return image


# ------------------------------------------------------------------------------------------ the steps


def load_raw(path: str | Path) -> nib.Nifti1Image:
    """One 3D scan, scale factors applied, reoriented to RAS: float32 (X, Y, Z). Raises :class:`InputError`."""
    if not Path(path).is_file():
        raise InputError("missing file")
    try:
        image = nib.load(str(path))
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise InputError(f"not a NIfTI file ({type(image).__name__})")
        shape = tuple(int(s) for s in image.shape)
        if len(shape) > 3 and int(np.prod(shape[3:])) > 1:
            raise InputError(f"{int(np.prod(shape[3:]))} volumes (4D, shape {shape}); give one 3D volume")
        if len(shape) < 3 or min(shape[:3]) < 2:
            raise InputError(f"not a 3D volume (shape {shape})")
        image = nib.funcs.squeeze_image(image) if len(shape) > 3 else image
        canonical = nib.as_closest_canonical(image)
        data = canonical.get_fdata(dtype=np.float32)
    except InputError:
        raise
    except Exception as error:  # nibabel raises many types for corrupt / truncated / foreign files
        raise InputError(f"unreadable: {type(error).__name__}: {error}") from None
    if not np.isfinite(data).all():
        raise InputError("NaN/Inf voxels")
    if not np.any(data) or float(data.min()) == float(data.max()):
        raise InputError(f"empty image (every voxel = {float(data.flat[0]):g})")
    return nib.Nifti1Image(data, canonical.affine)


def _to_ants(image: nib.Nifti1Image):  # -> ants.ANTsImage
    import ants

    plain = nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine)
    plain.header.set_xyzt_units("mm", "sec")  # else ANTsPy warns that it assumes mm
    return ants.from_nibabel_nifti(plain)


def n4_shrink_factor(zooms: tuple[float, ...]) -> int:
    """N4 fits its bias field on a grid of about :data:`N4_FIT_MM` whatever the voxel size (ANTs' default
    shrink factor 4 at 2 mm), so a 1 mm and a 2 mm scan of one head get the same correction."""
    return max(1, round(N4_FIT_MM / min(zooms[:3])))


def _bias_corrected(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """N4 (ANTsPy defaults but the shrink factor, :func:`n4_shrink_factor`) in the input's intensity units."""
    import ants

    shrink = n4_shrink_factor(image.header.get_zooms())
    corrected = ants.n4_bias_field_correction(_to_ants(image), shrink_factor=shrink)
    return nib.Nifti1Image(corrected.numpy().astype(np.float32), image.affine)


@functools.cache
def _deepbet():  # -> deepbet.bet.BrainExtraction, loaded once per process
    from deepbet.bet import BrainExtraction

    return BrainExtraction(no_gpu=True)  # the weights bundled in the wheel, on the CPU


def _deepbet_mask(image: nib.Nifti1Image) -> np.ndarray:
    """deepbet's brain mask (bool, the image's RAS grid)."""
    _, mask, _ = _deepbet().run(image)
    return np.asarray(mask.dataobj) > 0


def _given_mask(image: nib.Nifti1Image, mask_path: str | None) -> np.ndarray:
    """The user's brain mask (reoriented like the image) or the image's non-zero voxels, holes filled."""
    if mask_path is None:
        return ndimage.binary_fill_holes(np.asarray(image.dataobj) > 0)
    try:
        mask = nib.as_closest_canonical(nib.load(mask_path))
        data = np.asarray(mask.dataobj) > 0
    except Exception as error:
        raise InputError(f"mask unreadable ({type(error).__name__}: {error}): {mask_path}") from None
    if data.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise InputError(f"mask grid differs from the image's: {mask_path}")
    return data


def _register(brain: nib.Nifti1Image, kind: Registration) -> tuple[list[str], np.ndarray]:
    """ANTs transform files (template -> subject) and their 3x3 linear part; ``none``: ([], identity)."""
    import ants

    if kind == "none":
        return [], np.eye(3)
    fixed = _to_ants(mni2mm_template()[0])
    result = ants.registration(
        fixed=fixed,
        moving=_to_ants(brain),
        type_of_transform={"affine": "Affine", "rigid": "Rigid"}[kind],
        aff_metric="mattes",
        aff_sampling=32,
        aff_random_sampling_rate=0.2,
        aff_iterations=(2100, 1200, 1200, 10),
        aff_shrink_factors=(6, 4, 2, 1),
        aff_smoothing_sigmas=(3, 2, 1, 0),
    )
    transforms = list(result["fwdtransforms"])
    linear = np.asarray(ants.read_transform(transforms[0]).parameters[:9], dtype=np.float64).reshape(3, 3)
    return transforms, linear


def _to_mni(image: nib.Nifti1Image, transforms: list[str], interpolator: str) -> np.ndarray:
    """``image`` resampled onto the MNI 2 mm grid through ``transforms`` (91, 109, 91) float32."""
    import ants

    fixed = _to_ants(mni2mm_template()[0])
    moved = ants.apply_transforms(
        fixed=fixed, moving=_to_ants(image), transformlist=transforms, interpolator=interpolator
    )
    return moved.numpy().astype(np.float32)


# ------------------------------------------------------------------------------------------------- QC


def qc_flags(ncc: float, dice: float, affine_det: float) -> list[str]:
    """The reasons a registration fails :data:`QC_THRESHOLDS` (empty: ``ok``)."""
    limits = QC_THRESHOLDS
    flags = []
    if not ncc >= limits["ncc_min"]:
        flags.append(f"ncc<{limits['ncc_min']}")
    if not dice >= limits["dice_min"]:
        flags.append(f"dice<{limits['dice_min']}")
    if not limits["det_min"] <= affine_det <= limits["det_max"]:
        flags.append(f"det_outside_{limits['det_min']}-{limits['det_max']}")
    return flags


def _qc_metrics(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(NCC with the template brain inside its mask, Dice of ``mask`` with the template mask)."""
    template, template_mask = (np.asarray(x.dataobj) for x in mni2mm_template())
    inside = template_mask > 0
    values, reference = image[inside].astype(np.float64), template[inside].astype(np.float64)
    ncc = float(np.corrcoef(values, reference)[0, 1]) if values.std() > 0 else 0.0
    dice = 2.0 * float((mask & inside).sum()) / float(mask.sum() + inside.sum())
    return ncc, dice


def _save_qc_png(image: np.ndarray, path: Path, title: str) -> None:
    """Three orthogonal slices through the grid centre, the template brain outline in red."""
    template_mask = np.asarray(mni2mm_template()[1].dataobj) > 0
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    _draw_slices(axes, image, template_mask)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def _draw_slices(axes: Any, image: np.ndarray, template_mask: np.ndarray) -> None:
    """Sagittal, coronal, axial slices through the grid centre (FSL voxel order: left-right as radiologists see it)."""
    centre = [s // 2 for s in image.shape]
    high = float(np.percentile(image[image > 0], 99.5)) if np.any(image > 0) else 1.0
    cuts = [(image[centre[0]], template_mask[centre[0]])]
    cuts += [
        (image[:, centre[1]], template_mask[:, centre[1]]),
        (image[:, :, centre[2]], template_mask[:, :, centre[2]]),
    ]
    for axis, (cut, outline) in zip(axes, cuts, strict=True):
        axis.imshow(cut.T, cmap="gray", origin="lower", vmin=0, vmax=high)
        axis.contour(outline.T.astype(float), levels=[0.5], colors="red", linewidths=0.6)
        axis.set_axis_off()


def save_overview(qc: pd.DataFrame, output_dir: Path) -> Path | None:
    """``qc_overview.png``: the prepared subjects, worst NCC first (at most :data:`MAX_OVERVIEW_SUBJECTS`)."""
    done = qc[qc["status"].str.startswith(("ok", "flagged"))].sort_values("ncc", kind="stable")
    done = done.head(MAX_OVERVIEW_SUBJECTS)
    if done.empty:
        return None
    template_mask = np.asarray(mni2mm_template()[1].dataobj) > 0
    fig, axes = plt.subplots(len(done), 3, figsize=(7.5, 2.6 * len(done)), squeeze=False)
    for row_axes, (_, row) in zip(axes, done.iterrows(), strict=True):
        image = np.asarray(nib.load(output_dir / row["image"]).dataobj, dtype=np.float32)
        _draw_slices(row_axes, image, template_mask)
        title = f"{row['subject_id']}  ncc {row['ncc']:.3f}  dice {row['dice']:.3f}  {row['status']}"
        row_axes[1].set_title(
            title, fontsize=8
        )  # centred over the row (a left title is hidden by the next image)
    fig.tight_layout()
    path = output_dir / "qc_overview.png"
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=70, format="png"))
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- outputs


def output_paths(subject_id: str) -> dict[str, str]:
    """Output paths of one subject, relative to the output folder."""
    return {
        "image": f"images/{subject_id}_T1w_mni2mm.nii.gz",
        "mask": f"masks/{subject_id}_brainmask_mni2mm.nii.gz",
        "native_mask": f"masks_native/{subject_id}_brainmask_native.nii.gz",
        "png": f"qc/{subject_id}.png",
        "sidecar": f"qc/{subject_id}.json",
    }


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(temp)`` then ``os.replace(temp, path)``: a killed run never leaves a half-written ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    temp = path.with_name(f".{path.name[: -len(suffix)]}.tmp-{os.getpid()}{suffix}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as CSV at ``path``, atomically."""
    _atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_text_atomic(text: str, path: Path) -> None:
    """``text`` into ``path``, atomically."""
    _atomic(path, lambda tmp: tmp.write_text(text))


def run_provenance() -> dict[str, Any]:
    """What every output of this module depends on besides the options and the input."""
    return {
        "pipeline_version": PIPELINE_VERSION,
        "versions": _versions(),
        "template": TEMPLATE_DESCRIPTION,
        "grid": {"shape": list(MNI2MM_SHAPE), "affine": MNI2MM_AFFINE.tolist(), "xform_code": MNI_XFORM_CODE},
        "ants_seed": ANTS_SEED,
        "itk_threads": 1,
        "qc_thresholds": QC_THRESHOLDS,
    }


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_stale_temps(output_dir: Path, subject_id: str) -> None:
    """Delete the temp files a killed run left for this subject (never trusted, never renamed)."""
    for relative in output_paths(subject_id).values():
        path = output_dir / relative
        stem = path.name.removesuffix(".nii.gz").removesuffix(path.suffix)
        for temp in path.parent.glob(f".{glob.escape(stem)}.tmp-*"):
            temp.unlink(missing_ok=True)


def _finished(output_dir: Path, subject_id: str, options: PrepareOptions, source: str) -> dict | None:
    """The QC row of a subject prepared before with the same options and input, else None."""
    paths = output_paths(subject_id)
    try:
        sidecar = json.loads((output_dir / paths["sidecar"]).read_text())
    except (OSError, ValueError):
        return None
    same = sidecar.get("options") == dataclasses.asdict(options) and sidecar.get("source_image") == source
    outputs_exist = all((output_dir / paths[key]).is_file() for key in ("image", "mask", "native_mask"))
    return sidecar["qc"] if same and outputs_exist and sidecar.get("qc") else None


def prepare_subject(row: dict[str, Any], output_dir: str | Path, options: PrepareOptions) -> dict[str, Any]:
    """Prepare one split row (``subject_id``, ``image``, optional ``mask``) into ``output_dir``; its QC row.

    Skips a subject whose sidecar shows the same options and input (resume). An unusable input returns
    ``status = "error:<problem>"`` and writes nothing; any other failure is reported the same way.
    """
    output_dir = Path(output_dir)
    subject_id, source = str(row["subject_id"]), str(row["image"])
    mask_source = row.get("mask") if isinstance(row.get("mask"), str) else None
    base = {"subject_id": subject_id, "source_image": source}
    done = _finished(output_dir, subject_id, options, source)
    if done is not None:
        return {**done, "resumed": True}
    _remove_stale_temps(output_dir, subject_id)
    start = time.perf_counter()
    try:
        qc, linear = _prepare(source, mask_source, output_dir, subject_id, options)
    except InputError as error:
        return {**base, "status": f"error:{error}"}
    except Exception as error:  # ANTs / deepbet failures: one line for this subject, the others go on
        return {**base, "status": f"error:{type(error).__name__}: {error}".replace("\n", " ")}
    qc["seconds"] = round(time.perf_counter() - start, 1)
    paths = output_paths(subject_id)
    sidecar = {
        "subject_id": subject_id,
        "source_image": source,
        "source_sha256": _sha256(source),
        "source_mask": mask_source,
        "options": dataclasses.asdict(options),
        **run_provenance(),
        "affine_template_to_subject": linear.tolist(),
        "qc": {**base, **qc},
    }
    _atomic(output_dir / paths["sidecar"], lambda tmp: tmp.write_text(json.dumps(sidecar, indent=1)))
    return {**base, **qc}


def _prepare(
    source: str, mask_source: str | None, output_dir: Path, subject_id: str, options: PrepareOptions
) -> tuple[dict[str, Any], np.ndarray]:
    """Steps 1-5 + QC for one scan; writes image, mask and PNG; returns the QC fields and the 3x3 affine."""
    image = load_raw(source)
    if options.bias_correction:
        image = _bias_corrected(image)
    mask = _deepbet_mask(image) if options.brain_extraction else _given_mask(image, mask_source)
    if not mask.any():
        raise InputError("empty brain mask (no brain found)")
    voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
    data = np.asarray(image.dataobj, dtype=np.float32)
    brain = nib.Nifti1Image(np.where(mask, data, np.float32(0)), image.affine)
    transforms, linear = _register(brain, options.registration)
    try:
        mask_image = nib.Nifti1Image(mask.astype(np.float32), image.affine)
        mni_mask = _to_mni(mask_image, transforms, "nearestNeighbor") > 0.5
        mni_image = _to_mni(image, transforms, "linear")
    finally:
        for transform in transforms:  # ANTs writes them to the temp folder
            Path(transform).unlink(missing_ok=True)
    mni_image = np.where(mni_mask, np.maximum(mni_image, 0.0), 0.0).astype(np.float32)
    ncc, dice = _qc_metrics(mni_image, mni_mask)
    det = float(np.linalg.det(linear))
    flags = qc_flags(ncc, dice, det)
    steps = [
        "N4" if options.bias_correction else "noN4",
        "deepbet" if options.brain_extraction else "givenmask",
    ]
    descrip = f"prepare.py v{PIPELINE_VERSION} {'+'.join(steps)}+{options.registration} MNI152 2mm"
    paths = output_paths(subject_id)
    _atomic(output_dir / paths["image"], lambda tmp: nib.save(_mni_image(mni_image, descrip), tmp))
    _atomic(output_dir / paths["mask"], lambda tmp: nib.save(_mni_image(mni_mask, descrip), tmp))
    native_mask = nib.Nifti1Image(mask.astype(np.uint8), image.affine)
    _atomic(output_dir / paths["native_mask"], lambda tmp: nib.save(native_mask, tmp))
    status = "ok" if not flags else "flagged:" + ",".join(flags)
    _save_qc_png(
        mni_image, output_dir / paths["png"], f"{subject_id}  ncc {ncc:.3f}  dice {dice:.3f}  {status}"
    )
    qc = {
        "status": status,
        "ncc": round(ncc, 4),
        "dice": round(dice, 4),
        "brain_volume_ml": round(float(mask.sum()) * voxel_ml, 1),
        "affine_det": round(det, 4),
        "image": paths["image"],
        "mask": paths["mask"],
    }
    return qc, linear


# ------------------------------------------------------------------------------------ shards and tables


def shard_rows(frame: pd.DataFrame, shard: tuple[int, int] | None) -> pd.DataFrame:
    """Rows ``k, k + n, k + 2n, ...`` of ``frame`` for shard ``(k, n)`` (0 <= k < n); all rows for None."""
    if shard is None:
        return frame
    k, n = shard
    return frame.iloc[k::n]


def qc_table(results: list[dict[str, Any]], frame: pd.DataFrame, shard: str) -> pd.DataFrame:
    """QC rows (one per input row, in input order): :data:`QC_COLUMNS`, ``source_mask``, the input's other columns."""
    qc = pd.DataFrame(results, columns=QC_COLUMNS).reindex(columns=QC_COLUMNS)
    qc["shard"] = shard
    extras = frame.drop(columns=["subject_id", "image", "mask"]).reset_index(drop=True)
    extras.insert(0, "source_mask", frame["mask"].to_numpy())
    return pd.concat([qc.reset_index(drop=True), extras], axis=1)


def prepared_table(qc: pd.DataFrame, keep_flagged: bool) -> pd.DataFrame:
    """``prepared.csv``: subject_id, image, mask (relative to the output folder), then the input's columns."""
    keep = qc["status"].eq("ok") | (keep_flagged & qc["status"].str.startswith("flagged"))
    qc_only = [c for c in QC_COLUMNS if c not in ("subject_id", "image", "mask", "source_image")]
    columns = ["subject_id", "image", "mask", "source_image"]
    columns += [c for c in qc.columns if c not in columns and c not in qc_only]
    return qc.loc[keep, columns].reset_index(drop=True)


def part_path(output_dir: str | Path, shard: tuple[int, int]) -> Path:
    """``qc.part-K.csv`` of shard ``(K, N)``."""
    return Path(output_dir) / f"qc.part-{shard[0]}.csv"


def merge_parts(output_dir: str | Path) -> pd.DataFrame:
    """Join every ``qc.part-K.csv`` of ``output_dir`` into one QC table; all ``N`` shards must be there."""
    output_dir = Path(output_dir)
    parts = sorted(output_dir.glob("qc.part-*.csv"))
    if not parts:
        raise InputError(f"{output_dir}: no qc.part-K.csv to merge")
    tables = [pd.read_csv(p, dtype={"subject_id": str, "shard": str}) for p in parts]
    qc = pd.concat(tables, ignore_index=True)
    counts = {int(s.split("/")[1]) for s in qc["shard"]}
    if len(counts) != 1:
        raise InputError(
            f"{output_dir}: parts from {len(counts)} shard counts {sorted(counts)}; remove stale parts"
        )
    n_shards = counts.pop()
    present = {int(p.name.removeprefix("qc.part-").removesuffix(".csv")) for p in parts}  # empty shards too
    missing = sorted(set(range(n_shards)) - present)
    if missing:
        raise InputError(
            f"{output_dir}: shard(s) {missing} of {n_shards} missing (run them, then merge again)"
        )
    return qc
