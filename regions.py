"""Brain regions of an evaluated volume, for reconstruction quality per region (``metrics.image_metrics``).

* **Tissue classes, per subject** (every input): CSF, grey matter (GM) and white matter (WM) from a 3-class
  segmentation of the *input* volume (never the reconstruction) inside its brain mask, with ANTsPy's Atropos
  (``ants.atropos``: ANTs' EM tissue segmentation with an MRF prior, the one behind ``antsAtroposN4``; ANTsPy
  is already a project dependency for ``prepare.py``; it needs no atlas prior, runs on the preprocessed grid
  and is a maintained library rather than a hand-written k-means). Settings, fixed and recorded in :data:`SEGMENTATION_SETTINGS`:
  k-means initialisation with 3 classes, MRF smoothing 0.1 over the 1×1×1 neighbourhood, 5 iterations, the
  constant internal random seed (``r=0``) and single-threaded ITK, so the same input always gives the same
  labels (without ``r=0``, two runs on one IXI volume differed in ~300 of 275k brain voxels). Classes are named by their mean intensity (T1: CSF < GM < WM).
* **Coarse anatomical regions, on the MNI grid only** (:func:`on_mni_grid`: the volume's world box is the FSL
  MNI152 box): left/right hemisphere of the brain mask by the sign of the voxel's world x coordinate (RAS:
  x < 0 is left), and cortical vs deep grey matter: ``cortical_gm`` = the subject's GM outside, ``deep_gm`` =
  the brain inside the deep-grey-matter zone of the MNI152 2009 GM template that ships inside ``nilearn``
  (:func:`deep_grey_zone`; never downloaded). ``deep_gm`` is the template's zone, not the subject's GM label:
  on T1 at 2 mm Atropos labels most of the thalamus and pallidum WM (seen on IXI), so their intersection
  was only the partial-volume rim of the lateral ventricles.
* A volume whose segmentation fails gets empty (all-False) tissue masks and one ``WARNING:`` line; its
  region metrics are then NaN (empty CSV cells in ``infer.py``; in validation that region's epoch mean is
  NaN too, as the mean includes every subject), never a crash.

The segmentation of an input is memoised by the content of (image, mask): validation segments each subject
once and reuses it every epoch (its input never changes).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from functools import lru_cache
from importlib.metadata import version

import numpy as np
import torch

__all__ = [
    "ANATOMICAL_REGIONS",
    "SEGMENTATION_SETTINGS",
    "TISSUE_CLASSES",
    "SegmentationError",
    "batch_region_masks",
    "deep_grey_zone",
    "on_mni_grid",
    "region_masks",
    "tissue_classes",
]

log = logging.getLogger(__name__)

TISSUE_CLASSES = ("csf", "gm", "wm")  # labels 1, 2, 3 (0 = outside the brain mask)
ANATOMICAL_REGIONS = ("left", "right", "cortical_gm", "deep_gm")
SEGMENTATION_SETTINGS = {
    "library": f"antspyx {version('antspyx')}: ants.atropos",
    "classes": 3,
    "initialisation": "Kmeans[3]",
    "mrf": "[0.1,1x1x1]",
    "convergence": "[5,0]",
    "random_seed": "constant (r=0)",
    "itk_threads": 1,
    "class_order": "by mean intensity: csf < gm < wm",
}
MNI_FIRST_VOXEL_MM = np.array([-90.0, -126.0, -72.0])  # FSL MNI152 2 mm grid (91×109×91) in RAS order
MNI_LAST_VOXEL_MM = np.array([90.0, 90.0, 108.0])
DEEP_GREY_MAX_ABS_X_MM = 32.0  # lateral edge of the putamen; the insula lies beyond
DEEP_GREY_Y_MM = (-40.0, 28.0)  # pulvinar to the head of the caudate: leaves out the cingulate's ends
DEEP_GREY_Z_MM = (-14.0, 24.0)  # below the corpus callosum's body, above the amygdala
DEEP_GREY_MIN_DEPTH_MM = 20.0  # distance from the template brain's outer surface
TEMPLATE_GM_THRESHOLD = 0.5
CACHE_SIZE = 1024  # segmentations kept (uint8 labels: 0.9 MB per 91×109×91 volume)


class SegmentationError(RuntimeError):
    """The tissue segmentation of a volume failed or gave fewer than three classes."""


def tissue_classes(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """3-class Atropos segmentation of ``image`` inside ``mask`` (:data:`SEGMENTATION_SETTINGS`).

    Args:
        image: (D, H, W) intensities; mask: (D, H, W), nonzero = brain.
    Returns:
        (D, H, W) uint8: 0 outside the mask, 1 CSF, 2 GM, 3 WM (ordered by mean intensity).
    Raises:
        SegmentationError: empty/constant brain, Atropos failing, or an empty class.
    """
    brain = np.asarray(mask) > 0
    values = np.asarray(image, dtype=np.float32)
    if brain.sum() < 27 or np.ptp(values[brain]) == 0:
        raise SegmentationError("the brain mask is (nearly) empty or its intensities are constant")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"  # before ITK starts: deterministic Atropos
    import ants  # here, not at the top: config.py imports the region names (via metrics.py) without ANTs

    try:
        result = ants.atropos(
            a=ants.from_numpy(np.ascontiguousarray(values)),
            x=ants.from_numpy(brain.astype(np.float32)),
            i=SEGMENTATION_SETTINGS["initialisation"],
            m=SEGMENTATION_SETTINGS["mrf"],
            c=SEGMENTATION_SETTINGS["convergence"],
            r=0,
        )
    except Exception as error:  # ANTs raises bare Exceptions
        raise SegmentationError(f"Atropos failed: {error}") from error
    raw = result["segmentation"].numpy().astype(np.uint8)
    raw[~brain] = 0
    means = []
    for label in (1, 2, 3):
        voxels = values[raw == label]
        if voxels.size == 0:
            raise SegmentationError(f"class {label} of 3 is empty")
        means.append(float(voxels.mean()))
    lookup = np.zeros(4, dtype=np.uint8)
    lookup[1 + np.argsort(means)] = (1, 2, 3)
    return lookup[raw]


def on_mni_grid(affine: np.ndarray, shape: tuple[int, int, int]) -> bool:
    """Whether a RAS-aligned grid covers the FSL MNI152 box (first/last voxel centres within one voxel)."""
    affine = np.asarray(affine, dtype=np.float64)
    rotation = affine[:3, :3]
    if not np.allclose(rotation, np.diag(np.diag(rotation)), atol=1e-3) or (np.diag(rotation) <= 0).any():
        return False
    spacing = np.diag(rotation)
    first = affine[:3, 3]
    last = first + spacing * (np.asarray(shape) - 1)
    tolerance = spacing.max()
    return bool(
        np.abs(first - MNI_FIRST_VOXEL_MM).max() <= tolerance
        and np.abs(last - MNI_LAST_VOXEL_MM).max() <= tolerance
    )


@lru_cache(maxsize=8)
def _deep_grey_zone(affine_bytes: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    from nilearn import datasets, image
    from scipy import ndimage

    affine = np.frombuffer(affine_bytes).reshape(4, 4)
    grey = datasets.load_mni152_gm_template(resolution=2)  # shipped in the nilearn wheel
    brain = datasets.load_mni152_brain_mask(resolution=2)  # thresholded from the shipped T1 template
    spacing = np.abs(np.diag(brain.affine)[:3])
    depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(brain.get_fdata() > 0), sampling=spacing)
    world = brain.affine @ np.c_[np.indices(brain.shape).reshape(3, -1).T, np.ones(depth.size)].T
    x_mm, y_mm, z_mm = (axis.reshape(depth.shape) for axis in world[:3])
    zone = (
        (grey.get_fdata() > TEMPLATE_GM_THRESHOLD)
        & (depth >= DEEP_GREY_MIN_DEPTH_MM)
        & (np.abs(x_mm) <= DEEP_GREY_MAX_ABS_X_MM)
        & (DEEP_GREY_Y_MM[0] <= y_mm) & (y_mm <= DEEP_GREY_Y_MM[1])
        & (DEEP_GREY_Z_MM[0] <= z_mm) & (z_mm <= DEEP_GREY_Z_MM[1])
    )  # fmt: skip
    zone_image = image.new_img_like(brain, zone.astype(np.float32))
    target = image.resample_img(
        zone_image, target_affine=affine, target_shape=shape, interpolation="nearest", copy_header=True
    )
    return np.asarray(target.get_fdata() > 0.5)


def deep_grey_zone(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """(D, H, W) bool on the given MNI grid: the template's deep grey matter (basal ganglia, thalamus).

    MNI152 2009 GM probability > 0.5, at least :data:`DEEP_GREY_MIN_DEPTH_MM` from the outer surface of the
    template's brain mask, within :data:`DEEP_GREY_MAX_ABS_X_MM` of the midline (leaving out the insula) and
    inside the box :data:`DEEP_GREY_Y_MM` × :data:`DEEP_GREY_Z_MM` around the striatum and thalamus (the depth
    alone keeps the medial cortex: the template's mask fills the interhemispheric fissure). A coarse, fixed
    zone: nilearn ships no subcortical atlas offline.
    """
    return _deep_grey_zone(np.asarray(affine, dtype=np.float64).tobytes(), tuple(int(s) for s in shape))


_segmentations: OrderedDict[str, np.ndarray | None] = OrderedDict()


def _cached_tissue_classes(image: np.ndarray, brain: np.ndarray, name: str) -> np.ndarray | None:
    """:func:`tissue_classes`, memoised by the content of (image, mask); None (and one warning) on failure."""
    key = hashlib.blake2b(image.tobytes() + np.packbits(brain).tobytes(), digest_size=16).hexdigest()
    if key in _segmentations:
        _segmentations.move_to_end(key)
        return _segmentations[key]
    try:
        labels = tissue_classes(image, brain)
    except SegmentationError as error:
        log.warning(
            "WARNING: tissue segmentation of %s failed (%s): its region metrics are left empty", name, error
        )
        labels = None
    _segmentations[key] = labels
    if len(_segmentations) > CACHE_SIZE:
        _segmentations.popitem(last=False)
    return labels


def region_masks(
    image: torch.Tensor, mask: torch.Tensor, affine: np.ndarray | None = None, name: str = "volume"
) -> dict[str, torch.Tensor]:
    """Region masks of one volume: tissue classes always, anatomical regions when ``affine`` is on the MNI grid.

    Args:
        image: (1, D, H, W) the input (not the reconstruction); mask: (1, D, H, W) brain mask (nonzero = brain).
        affine: (4, 4) voxel-to-world (RAS) affine of the grid, or None (tissue classes only).
        name: how a segmentation warning names the volume.
    Returns:
        region name → (1, D, H, W) bool on the CPU: csf, gm, wm [, left, right, cortical_gm, deep_gm];
        all False where the segmentation failed.
    """
    volume = image.detach().float().cpu().numpy()[0]
    brain = mask.detach().cpu().numpy()[0] > 0.5
    labels = _cached_tissue_classes(volume, brain, name)
    regions = {
        tissue: torch.from_numpy(labels == code)
        if labels is not None
        else torch.zeros(brain.shape, dtype=bool)
        for code, tissue in enumerate(TISSUE_CLASSES, start=1)
    }
    if affine is not None and on_mni_grid(affine, brain.shape):
        x_mm = np.asarray(affine, dtype=np.float64)[0, 0] * np.arange(brain.shape[0]) + affine[0, 3]
        left = torch.from_numpy(brain & (x_mm < 0)[:, None, None])
        deep = torch.from_numpy(deep_grey_zone(affine, brain.shape))
        regions.update(
            left=left,
            right=torch.from_numpy(brain) & ~left,
            cortical_gm=regions["gm"] & ~deep,
            deep_gm=torch.from_numpy(brain) & deep,
        )
    return {region: value[None] for region, value in regions.items()}


def batch_region_masks(
    images: torch.Tensor,
    masks: torch.Tensor,
    affines: list[np.ndarray] | None = None,
    names: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`region_masks` of each volume of a batch, stacked on the batch's device.

    Args:
        images, masks: (B, 1, D, H, W); affines / names: one per volume, or None.
    Returns:
        region name → (B, 1, D, H, W) bool; a region some volumes lack (not on the MNI grid) is all False there.
    """
    per_volume = [
        region_masks(
            images[b],
            masks[b],
            None if affines is None else affines[b],
            f"volume {b}" if names is None else names[b],
        )
        for b in range(images.shape[0])
    ]
    names_in_batch = list(dict.fromkeys(region for regions in per_volume for region in regions))
    empty = torch.zeros(images.shape[1:], dtype=torch.bool)
    return {
        region: torch.stack([regions.get(region, empty) for regions in per_volume]).to(images.device)
        for region in names_in_batch
    }
