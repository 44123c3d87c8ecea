"""The built-in demo cohort: synthetic T1 "subjects" derived from the MNI152 template, so a fresh clone runs.

**Not real subjects**: each one is the nilearn MNI ICBM152 2009a template (shipped in the wheel, no
download) under a random smooth deformation, small affine, gamma, bias field, global intensity scale and
noise, brain-extracted, on the FSL MNI152 2 mm grid (91, 109, 91), int16. ``python dataset.py --make_demo
OUT_DIR`` builds it explicitly; training builds it on first use (:func:`ensure_demo_data`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from config import DataConfig

log = logging.getLogger(__name__)

MNI_2MM_AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
MNI_2MM_SHAPE = (91, 109, 91)
DEMO_SOURCE = "demo (MNI152 template-derived)"


def _load_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI ICBM152 2009a T1 (1 mm) from the nilearn wheel, its brain mask and affine (no download)."""
    from nilearn import datasets

    template = nib.load(datasets.MNI152_FILE_PATH)  # mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz
    mask = datasets.load_mni152_brain_mask(resolution=1)
    if mask.shape != template.shape or not np.allclose(mask.affine, template.affine):
        raise RuntimeError("nilearn MNI152 brain mask is not on the template grid")
    return template.get_fdata(dtype=np.float32), np.asarray(mask.dataobj) > 0, template.affine


def _demo_subject(
    template: np.ndarray, template_mask: np.ndarray, template_affine: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic subject on the FSL MNI152 2 mm grid: (image int16, mask uint8), (91, 109, 91)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in MNI_2MM_SHAPE], indexing="ij")).reshape(3, -1)
    world = MNI_2MM_AFFINE[:3, :3] @ grid + MNI_2MM_AFFINE[:3, 3:]
    # small affine: rotation (+-4 deg), per-axis scale (+-6 %), translation (+-4 mm) about the brain centre
    rotation = Rotation.from_euler("XYZ", rng.uniform(-4, 4, 3), degrees=True).as_matrix()
    linear = rotation @ np.diag(rng.uniform(0.94, 1.06, 3))
    centre = np.array([[0.0], [-18.0], [18.0]])
    world = linear @ (world - centre) + centre + rng.uniform(-4, 4, (3, 1))
    # smooth elastic displacement: coarse random field (std 2.5 mm), cubic spline to 1/4 of the grid,
    # then trilinear to the full grid
    coarse = rng.normal(0.0, 2.5, (3, 5, 6, 5))
    quarter = [ndimage.zoom(c, 4.5, order=3) for c in coarse]
    field = torch.nn.functional.interpolate(
        torch.from_numpy(np.stack(quarter))[None], size=MNI_2MM_SHAPE, mode="trilinear", align_corners=True
    )
    world += field[0].numpy().reshape(3, -1)
    voxels = np.linalg.inv(template_affine)[:3, :3] @ world + np.linalg.inv(template_affine)[:3, 3:]
    image = ndimage.map_coordinates(template, voxels, order=1, mode="constant").reshape(MNI_2MM_SHAPE)
    mask = ndimage.map_coordinates(template_mask.astype(np.float32), voxels, order=1).reshape(MNI_2MM_SHAPE)
    mask = mask > 0.5
    # contrast (gamma), smooth multiplicative bias field, global scale up to ~2x, noise; then skull-strip
    image = np.clip(image / template.max(), 0, None) ** rng.uniform(0.8, 1.25)
    unit = (grid / (np.array(MNI_2MM_SHAPE)[:, None] - 1) * 2 - 1).reshape(3, *MNI_2MM_SHAPE)
    bias = np.exp(
        sum(rng.uniform(-0.15, 0.15) * axis for axis in unit) + rng.uniform(-0.1, 0.1) * unit[0] * unit[1]
    )
    image = image * bias * rng.uniform(400, 800) + rng.normal(0.0, 6.0, MNI_2MM_SHAPE)
    image = np.where(mask, np.clip(np.round(image), 1, None), 0)
    return image.astype(np.int16), mask.astype(np.uint8)


def make_demo_cohort(
    out_dir: str | Path, n_train: int = 16, n_val: int = 4, n_test: int = 4, seed: int = 0
) -> dict[str, Path]:
    """Write a deterministic template-derived cohort (images/, masks/, train/val/test CSVs) to ``out_dir``.

    Same seed -> byte-identical files. Returns ``{"train": csv, "val": csv, "test": csv}``.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    template, template_mask, template_affine = _load_template()
    rng = np.random.default_rng(seed)
    csvs, number = {}, 0
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = []
        for _ in range(count):
            subject_id = f"demo{number:03d}"
            paths = {
                "image": f"images/{subject_id}_T1w.nii.gz",
                "mask": f"masks/{subject_id}_brainmask.nii.gz",
            }
            arrays = _demo_subject(template, template_mask, template_affine, rng)
            for path, array in zip(paths.values(), arrays, strict=True):
                nifti = nib.Nifti1Image(array, MNI_2MM_AFFINE)
                nifti.set_qform(MNI_2MM_AFFINE, code=4)
                nifti.set_sform(MNI_2MM_AFFINE, code=4)
                nib.save(nifti, out_dir / path)
            rows.append({"subject_id": subject_id, **paths, "source": DEMO_SOURCE})
            number += 1
        csvs[split] = out_dir / f"{split}.csv"
        pd.DataFrame(rows, columns=["subject_id", "image", "mask", "source"]).to_csv(csvs[split], index=False)
    return csvs


def ensure_demo_data(data: DataConfig) -> None:
    """Build the demo cohort at ``data.demo_dir`` if the train/val CSVs point inside it and are missing."""
    if data.demo_dir is None:
        return
    demo_dir = Path(data.demo_dir).resolve()
    csvs = [Path(data.train_csv).resolve(), Path(data.val_csv).resolve()]
    if all(csv.is_relative_to(demo_dir) for csv in csvs) and not all(csv.exists() for csv in csvs):
        log.info("building the demo cohort in %s", demo_dir)
        make_demo_cohort(demo_dir)
