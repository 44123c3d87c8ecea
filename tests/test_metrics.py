"""Tests for metrics.py with known answers: image metrics (whole volume and in-brain), KL, latent statistics."""

from __future__ import annotations

import pytest
import torch

from metrics import LatentStatistics, image_metrics, ms_ssim_scales

SHAPE = (16, 18, 14)  # smallest axis 14: two MS-SSIM scales


def textured(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> torch.Tensor:
    """(1, 1, *shape) in [0.2, 0.8]: smooth gradient plus noise."""
    generator = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.6, shape[0]).view(-1, *([1] * (len(shape) - 1)))
    return (ramp + 0.2 * torch.rand(shape, generator=generator))[None, None]


def centre_mask(shape: tuple[int, ...] = SHAPE, margin: int = 4) -> torch.Tensor:
    """(1, 1, *shape) bool, True inside a box ``margin`` voxels from every face."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tuple(slice(margin, size - margin) for size in shape)] = True
    return mask[None, None]


class RecordingLPIPS:
    """Stand-in for LPIPS3D: mean |x - y| per sample; remembers the shapes it was given."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return (x - y).abs().flatten(1).mean(1)


# ------------------------------------------------------------------------------------------ image metrics


def test_identical_volumes_are_perfect():
    target = textured()
    values = image_metrics(target.clone(), target, lpips=RecordingLPIPS())
    for name in ("mse", "mse_brain", "lpips", "lpips_brain"):
        assert values[name].item() == 0.0, name
    for name in ("ssim", "ssim_brain", "ms_ssim", "ms_ssim_brain"):
        assert values[name].item() == pytest.approx(1.0, abs=1e-5), name
    assert values["psnr"].item() == pytest.approx(100.0)  # MSE floored at 1e-10


def test_psnr_of_a_known_mse():
    target = torch.full((1, 1, *SHAPE), 0.5)
    values = image_metrics(target + 0.1, target)  # every voxel off by 0.1: MSE 0.01, PSNR 20 dB
    assert values["mse"].item() == pytest.approx(0.01, rel=1e-5)
    assert values["psnr"].item() == pytest.approx(20.0, abs=1e-4)
    assert values["psnr_brain"].item() == pytest.approx(20.0, abs=1e-4)  # no mask: the foreground, everywhere
    batch = torch.cat([target, target])
    values = image_metrics(torch.cat([target + 0.1, target + 0.01]), batch)  # per sample: 20 dB and 40 dB
    assert values["psnr"].tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    assert values["psnr"].shape == (2,) and values["psnr"].dtype == torch.float32


def test_recon_is_clipped_to_unit_range():
    target = torch.full((1, 1, *SHAPE), 0.9)
    values = image_metrics(target + 5.0, target)  # clipped to 1.0: error 0.1
    assert values["mse"].item() == pytest.approx(0.01, rel=1e-5)


def test_in_brain_metrics_ignore_errors_outside_the_mask():
    shape = (24, 24, 24)
    target = textured(shape)
    mask = centre_mask(shape, margin=6)
    recon = torch.where(mask, target, 1.0 - target)  # exact inside the brain, wrong everywhere else
    lpips = RecordingLPIPS()
    values = image_metrics(recon, target, brain_mask=mask, lpips=lpips)
    assert values["mse_brain"].item() == 0.0 and values["psnr_brain"].item() == pytest.approx(100.0)
    assert values["ms_ssim_brain"].item() == pytest.approx(1.0, abs=1e-5)
    assert values["lpips_brain"].item() == 0.0
    assert values["mse"].item() > 0.01 and values["lpips"].item() > 0.05
    assert values["ms_ssim"].item() < 0.9 and values["ssim_brain"].item() > values["ssim"].item()
    # the in-brain LPIPS / MS-SSIM crop: the mask's bounding box grown to 28 voxels, here the whole volume
    assert lpips.shapes == [(1, 1, *shape), (1, 1, *shape)]


def test_in_brain_crop_is_the_grown_bounding_box():
    shape = (40, 40, 40)
    target = textured(shape)
    mask = torch.zeros((1, 1, *shape), dtype=torch.bool)
    mask[0, 0, 5:15, 10:40, 12:22] = True  # 10 x 30 x 10 box, grown to at least 28 per axis
    lpips = RecordingLPIPS()
    values = image_metrics(target, target, brain_mask=mask, lpips=lpips)
    assert lpips.shapes[1] == (1, 1, 28, 30, 28)
    assert values["ms_ssim_brain"].item() == pytest.approx(1.0, abs=1e-5)


def test_default_mask_is_the_target_foreground():
    target = textured() * centre_mask()  # zero background
    recon = torch.where(target > 0, target, torch.full_like(target, 0.5))
    values = image_metrics(recon, target)
    assert values["mse_brain"].item() == 0.0 and values["mse"].item() > 0.0


# ---------------------------------------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize(
    ("shape", "scales"),
    [
        ((7, 7, 7), 1),
        ((13, 13, 13), 1),  # the second scale (6 voxels) would be smaller than the 7-voxel window
        ((14, 14, 14), 2),
        ((27, 40, 40), 2),
        ((28, 28, 28), 3),
        ((62, 62, 62), 3),
        ((63, 63, 63), 4),
        ((91, 109, 91), 4),
        ((46, 55, 46), 3),
        ((91, 109, 20), 2),
    ],
)
def test_ms_ssim_scales(shape, scales):
    assert ms_ssim_scales(shape) == scales


def test_ms_ssim_scales_refuses_a_too_small_volume():
    with pytest.raises(ValueError, match="too small for MS-SSIM"):
        ms_ssim_scales((6, 50, 50))


@pytest.mark.parametrize("size", [11, 12, 13, 14, 27, 28])
def test_image_metrics_run_on_every_small_size(size):
    """MS-SSIM uses as many scales as fit: near the boundaries the computation itself must work."""
    target = textured((size, size + 1, size))
    values = image_metrics(target, target)
    assert values["ms_ssim"].item() == pytest.approx(1.0, abs=1e-5)
    assert values["ms_ssim_brain"].item() == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------------- latent statistics


def test_latent_statistics_streaming_equals_the_concatenation():
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0.0, 3.0, -1.0]).view(1, 3, 1, 1, 1)
    scales = torch.tensor([1.0, 0.5, 2.0]).view(1, 3, 1, 1, 1)
    batches = [torch.randn(batch, 3, 2, 3, 2, generator=generator) * scales + offsets for batch in (2, 1, 3)]
    stats = LatentStatistics(3)
    for batch in batches:
        stats.update(batch)
    stats.all_reduce()  # not distributed: no-op
    summary = stats.summary()
    everything = torch.cat(batches).double()
    per_channel = everything.transpose(0, 1).flatten(1)
    assert summary["channel_mean"] == pytest.approx(per_channel.mean(1).tolist(), rel=1e-9, abs=1e-12)
    assert summary["channel_std"] == pytest.approx(per_channel.std(1, correction=0).tolist(), rel=1e-9)
    assert summary["mean"] == pytest.approx(everything.mean().item(), rel=1e-9, abs=1e-12)
    assert summary["std"] == pytest.approx(everything.std(correction=0).item(), rel=1e-9)
    assert summary["scale_factor"] == pytest.approx(1.0 / summary["std"], rel=1e-12)
    assert summary["num_elements"] == everything.numel()


def test_latent_statistics_refuse_no_data_and_zero_std():
    with pytest.raises(ValueError, match="no latents"):
        LatentStatistics(2).summary()
    constant = LatentStatistics(2)
    constant.update(torch.full((2, 2, 3, 3, 3), 0.7))
    with pytest.raises(ValueError, match="std 0"):
        constant.summary()
