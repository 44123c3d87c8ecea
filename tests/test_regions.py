"""regions.py (tissue classes, MNI-grid regions) and metrics.region_metrics on tiny synthetic volumes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from monai.metrics.regression import compute_ssim_and_cs
from scipy import ndimage

import regions
from metrics import image_metrics, region_metrics

MNI_4MM = np.array([[4.0, 0, 0, -90], [0, 4.0, 0, -126], [0, 0, 4.0, -72], [0, 0, 0, 1]])
MNI_4MM_SHAPE = (46, 55, 46)


def phantom(seed: int = 0, shape: tuple[int, int, int] = (32, 36, 30)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy three-intensity 'brain': nested ellipsoids WM (0.8) in GM (0.5) in CSF (0.2), and its mask.

    Returns (image (D, H, W) float32, truth (D, H, W) uint8: 0 outside, 1 CSF, 2 GM, 3 WM).
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.9, 0.85, 0.8])[:, None, None, None]) ** 2).sum(0))
    truth = np.select([radius < 0.5, radius < 0.75, radius < 1.0], [3, 2, 1], 0).astype(np.uint8)
    image = np.array([0.0, 0.2, 0.5, 0.8], dtype=np.float32)[truth]
    image += ndimage.gaussian_filter(rng.normal(scale=0.06, size=shape), 0.7).astype(np.float32)
    return np.where(truth > 0, image, 0.0).astype(np.float32), truth


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_phantom_classes_are_recovered_and_repeatable() -> None:
    image, truth = phantom()
    labels = regions.tissue_classes(image, truth > 0)
    for code, name in enumerate(regions.TISSUE_CLASSES, start=1):
        assert dice(labels == code, truth == code) >= 0.9, name
    assert (labels[truth == 0] == 0).all()
    np.testing.assert_array_equal(regions.tissue_classes(image, truth > 0), labels)  # fixed settings


def test_classes_are_named_by_mean_intensity_not_by_label_order() -> None:
    """Inverted contrast (WM dark): the darkest class is still called CSF."""
    image, truth = phantom(seed=1)
    inverted = np.where(truth > 0, 1.0 - image, 0.0).astype(np.float32)
    labels = regions.tissue_classes(inverted, truth > 0)
    assert dice(labels == 1, truth == 3) >= 0.9 and dice(labels == 3, truth == 1) >= 0.9


def test_failed_segmentation_gives_empty_regions_one_warning_and_nan_metrics(caplog) -> None:
    image = torch.zeros(1, 1, 16, 16, 16)
    mask = torch.zeros_like(image)
    mask[..., 4:12, 4:12, 4:12] = 1
    image[mask > 0] = 0.5  # constant brain: nothing to segment
    with caplog.at_level(logging.WARNING, logger="regions"):
        masks = regions.batch_region_masks(image, mask, names=["sub-constant"])
        masks_again = regions.batch_region_masks(image, mask, names=["sub-constant"])  # memoised: no 2nd line
    assert [r.getMessage() for r in caplog.records if "sub-constant" in r.getMessage()] == [
        "WARNING: tissue segmentation of sub-constant failed (the brain mask is (nearly) empty or its "
        "intensities are constant): its region metrics are left empty"
    ]
    assert set(masks) == set(regions.TISSUE_CLASSES) and not any(m.any() for m in masks.values())
    assert all(torch.equal(masks[name], masks_again[name]) for name in masks)
    values = image_metrics(image, image, mask, regions=masks)
    assert all(torch.isnan(values[f"{m}_gm"]).all() for m in ("psnr", "ssim", "mae"))
    assert torch.isfinite(values["psnr_brain"]).all()


def test_mni_grid_regions_hemispheres_and_deep_grey_matter() -> None:
    assert regions.on_mni_grid(MNI_4MM, MNI_4MM_SHAPE)
    assert regions.on_mni_grid(
        np.diag([2.0, 2, 2, 1]) + np.c_[np.zeros((4, 3)), [-90, -126, -72, 0]], (91, 109, 91)
    )
    assert not regions.on_mni_grid(MNI_4MM, (30, 30, 30))  # another field of view
    assert not regions.on_mni_grid(np.diag([2.0, 2, 2, 1]), (91, 109, 91))  # not the MNI origin
    zone = regions.deep_grey_zone(MNI_4MM, MNI_4MM_SHAPE)
    x_mm = MNI_4MM[0, 0] * np.arange(MNI_4MM_SHAPE[0]) + MNI_4MM[0, 3]
    assert zone.any() and (np.abs(x_mm[np.nonzero(zone)[0]]) <= regions.DEEP_GREY_MAX_ABS_X_MM).all()
    left, right = zone[x_mm < 0].sum(), zone[x_mm > 0].sum()
    assert abs(left - right) <= 0.2 * max(left, right)  # the symmetric template: both sides alike

    image, truth = phantom(shape=MNI_4MM_SHAPE)
    masks = regions.region_masks(torch.from_numpy(image)[None], torch.from_numpy(truth > 0)[None], MNI_4MM)
    assert set(masks) == {*regions.TISSUE_CLASSES, *regions.ANATOMICAL_REGIONS}
    brain = torch.from_numpy(truth > 0)[None]
    assert torch.equal(masks["left"] | masks["right"], brain) and not (masks["left"] & masks["right"]).any()
    assert masks["left"][:, : MNI_4MM_SHAPE[0] // 2].all() == brain[:, : MNI_4MM_SHAPE[0] // 2].all()
    assert not masks["left"][:, x_mm > 0].any()
    assert torch.equal(masks["cortical_gm"] | (masks["deep_gm"] & masks["gm"]), masks["gm"])
    assert masks["deep_gm"].any() and not (masks["deep_gm"] & ~brain).any()
    not_mni = regions.region_masks(torch.from_numpy(image)[None], brain, np.eye(4))
    assert set(not_mni) == set(regions.TISSUE_CLASSES)


def test_region_metrics_match_a_direct_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 18, 20, 16, generator=generator)
    recon = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    region = torch.rand(target.shape, generator=generator) > 0.6
    empty = torch.zeros_like(region)
    values = region_metrics(recon, target, {"a": region, "none": empty})
    ssim_map, _ = compute_ssim_and_cs(
        recon, target, spatial_dims=3, kernel_size=[11] * 3, kernel_sigma=[1.5] * 3, data_range=1.0
    )
    for b in range(2):
        inside = region[b, 0]
        error = (recon[b, 0] - target[b, 0])[inside].double()
        assert values["psnr_a"][b].item() == pytest.approx(
            -10 * np.log10(error.pow(2).mean().item()), rel=1e-5
        )
        assert values["mae_a"][b].item() == pytest.approx(error.abs().mean().item(), rel=1e-5)
        inner = inside[5:-5, 5:-5, 5:-5]
        assert values["ssim_a"][b].item() == pytest.approx(
            ssim_map[b, 0][inner].double().mean().item(), rel=1e-5
        )
    assert all(torch.isnan(values[f"{m}_none"]).all() for m in ("psnr", "ssim", "mae"))
    combined = image_metrics(recon, target, regions={"a": region})
    assert all(torch.equal(combined[name], values[name]) for name in ("psnr_a", "ssim_a", "mae_a"))
