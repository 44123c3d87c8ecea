"""Every number the project reports about a reconstruction or a latent space, computed in one place.

Used by training validation (:func:`validate`: their means over the validation set, across DDP ranks),
``infer.py``, ``save_latent.py``, the notebook and ``bench/``.

* Image metrics (inputs in [0, 1], data range 1): MSE, PSNR, SSIM (Gaussian window 11, sigma 1.5),
  MS-SSIM (Gaussian window 7, sigma 1.5, up to 4 scales — 5 scales do not fit 91×109×91) and LPIPS3D,
  over the whole volume and inside the brain mask (``*_brain``).
  In-brain definitions: MSE/PSNR over mask voxels; SSIM = mean of the SSIM map over mask voxels;
  MS-SSIM and LPIPS3D on both volumes multiplied by the mask, cropped to the mask's bounding box.
* Per region (``regions.py``: tissue classes csf/gm/wm, and on the MNI grid left/right hemisphere and
  cortical/deep grey matter): ``psnr_<region>``, ``ssim_<region>``, ``mae_<region>``
  (:func:`region_metrics`): PSNR and MAE over the region's voxels, SSIM = the same SSIM map averaged over
  the region's voxels; NaN for a region with no voxels (e.g. a failed segmentation). No LPIPS3D per region:
  its deep features see tens of voxels around each voxel, so a thin region (cortical ribbon, CSF) cannot be
  scored apart from its surroundings, and masking the volumes to the region adds edges that dominate it.
* KL divergence of N(mu, sigma²) from N(0, 1): ``losses.kl_divergence`` (one definition for loss and report).
* Latent statistics, streamed (never holding all latents): :class:`LatentStatistics`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs
from tqdm import tqdm

from losses import kl_divergence
from regions import TISSUE_CLASSES, batch_region_masks
from utils import DistributedContext, autocast

if TYPE_CHECKING:
    from config import Config
    from dataset import VolumeDataset
    from device_data import DeviceVolumeCache
    from model.lpips3D import LPIPS3D

SSIM_KERNEL = 11
MS_SSIM_KERNEL = 7
KERNEL_SIGMA = 1.5
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363)
# what :func:`image_metrics` returns (with an LPIPS module), whole volume and in-brain
IMAGE_METRICS = tuple(
    f"{name}{where}" for name in ("mse", "psnr", "ssim", "ms_ssim", "lpips") for where in ("", "_brain")
)
# the KL divergence and the :class:`LatentStatistics` summary values that training validation reports too
LATENT_METRICS = ("kl", "latent_std", "latent_std_min", "latent_std_max", "scale_factor")
# what :func:`region_metrics` reports per region: ``<kind>_<region>``
REGION_METRIC_KINDS = ("psnr", "ssim", "mae")
# every number :func:`validate` reports (the choices of ``train.best_metric``)
VALIDATION_METRICS = tuple(f"val/{name}" for name in IMAGE_METRICS + LATENT_METRICS)
# and with ``train.region_metrics`` (validation segments tissue classes only: no affine, no MNI regions)
VALIDATION_REGION_METRICS = tuple(
    f"val/{kind}_{region}" for region in TISSUE_CLASSES for kind in REGION_METRIC_KINDS
)


def ms_ssim_scales(spatial_shape: tuple[int, ...]) -> int:
    """How many MS-SSIM scales (at most 4) fit a volume.

    Both MONAI's size check (``size // max(1, scales - 1) ** 2 > kernel - 1``) and the computation itself
    (the coarsest scale, halved ``scales - 1`` times, still at least the kernel size) must pass: MONAI's
    check alone allows 2 scales for 7-13 voxels, whose second scale is smaller than the window.
    """
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        divisor = max(1, scales - 1) ** 2
        passes_monai_check = all(size // divisor > MS_SSIM_KERNEL - 1 for size in spatial_shape)
        coarsest_fits = all(size // 2 ** (scales - 1) >= MS_SSIM_KERNEL for size in spatial_shape)
        if passes_monai_check and coarsest_fits:
            return scales
    raise ValueError(f"volume {tuple(spatial_shape)} is too small for MS-SSIM (need > {MS_SSIM_KERNEL - 1})")


def _ms_ssim(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    scales = ms_ssim_scales(tuple(target.shape[2:]))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales])
    weights = (weights / weights.sum()).tolist()
    value = compute_ms_ssim(
        recon,
        target,
        spatial_dims=3,
        data_range=1.0,
        kernel_size=MS_SSIM_KERNEL,
        kernel_sigma=KERNEL_SIGMA,
        weights=weights,
    )
    return value.flatten(1).mean(1)


def _bounding_box(mask: torch.Tensor, min_size: int) -> tuple[slice, ...]:
    """Slices of the mask's bounding box, grown (within the volume) to at least ``min_size`` per axis."""
    slices = []
    for axis, size in enumerate(mask.shape):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        present = torch.nonzero(mask.any(dim=other_axes)).flatten()
        low, high = (int(present.min()), int(present.max()) + 1) if len(present) else (0, size)
        missing = max(0, min(min_size, size) - (high - low))
        low = max(0, low - (missing + 1) // 2)
        high = min(size, max(high + missing // 2, low + min(min_size, size)))
        slices.append(slice(low, high))
    return tuple(slices)


def _ssim_map(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI's SSIM map (Gaussian window 11, sigma 1.5, data range 1) of (B, 1, D, H, W) volumes, window
    borders cropped: (B, 1, D - 10, H - 10, W - 10)."""
    ssim_map, _ = compute_ssim_and_cs(
        recon,
        target,
        spatial_dims=3,
        kernel_size=[SSIM_KERNEL] * 3,
        kernel_sigma=[KERNEL_SIGMA] * 3,
        data_range=1.0,
    )
    return ssim_map


def _ssim_support(mask: torch.Tensor) -> torch.Tensor:
    """The part of a (B, 1, D, H, W) mask that MONAI's SSIM map covers (the window's border cropped)."""
    border = SSIM_KERNEL // 2
    return mask[..., border:-border, border:-border, border:-border]


def _region_mean(values: torch.Tensor, region: torch.Tensor, min_count: float = 0.0) -> torch.Tensor:
    """(B,) mean of ``values`` over each sample's ``region`` voxels (the voxel count clamped to at least
    ``min_count``): NaN where the region is empty, or 0 with ``min_count=1``."""
    region = region.to(values.dtype)
    return (values * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(min_count)


@torch.no_grad()
def region_metrics(
    recon: torch.Tensor,
    target: torch.Tensor,
    regions: dict[str, torch.Tensor],
    ssim_map: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """PSNR, SSIM and MAE inside each region.

    Args:
        recon, target: (B, 1, D, H, W) in [0, 1] (``recon`` is clipped to [0, 1] first).
        regions: region name → (B, 1, D, H, W) bool.
        ssim_map: the SSIM map of (recon, target) when already computed (``image_metrics``), else None.
    Returns:
        ``psnr_<region>``, ``ssim_<region>``, ``mae_<region>`` → (B,) float32 on the CPU; NaN for an empty region.
    """
    recon = recon.float().clamp(0.0, 1.0)
    target = target.float()
    if ssim_map is None:
        ssim_map = _ssim_map(recon, target)
    error = recon - target
    out: dict[str, torch.Tensor] = {}
    for name, region in regions.items():
        region = region.to(recon.device)
        mse = _region_mean(error.pow(2), region)
        values = {
            "psnr": -10.0 * torch.log10(mse.clamp_min(1e-10)),
            "ssim": _region_mean(ssim_map, _ssim_support(region)),
            "mae": _region_mean(error.abs(), region),
        }
        out.update({f"{kind}_{name}": values[kind] for kind in REGION_METRIC_KINDS})
    return {name: value.detach().float().cpu() for name, value in out.items()}


@torch.no_grad()
def image_metrics(
    recon: torch.Tensor,
    target: torch.Tensor,
    brain_mask: torch.Tensor | None = None,
    lpips: LPIPS3D | None = None,
    regions: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample reconstruction metrics, whole volume, in-brain and per region.

    Args:
        recon, target: (B, 1, D, H, W), intensities in [0, 1] (``recon`` is clipped to [0, 1] first).
        brain_mask: (B, 1, D, H, W) bool/0-1; None → the nonzero foreground of ``target``.
        lpips: a 3D LPIPS module; its metrics are left out when None.
        regions: region name → (B, 1, D, H, W) bool (``regions.batch_region_masks``), or None.
    Returns:
        name → (B,) float32 tensor on the CPU: mse, psnr, ssim, ms_ssim, [lpips], and the same + ``_brain``;
        with ``regions``, :func:`region_metrics` too.
    """
    recon = recon.float().clamp(0.0, 1.0)
    target = target.float()
    mask = (target > 0) if brain_mask is None else (brain_mask > 0.5)
    mask = mask.float()
    out: dict[str, torch.Tensor] = {}

    squared_error = (recon - target).pow(2)
    out["mse"] = squared_error.flatten(1).mean(1)
    out["mse_brain"] = _region_mean(squared_error, mask, min_count=1.0)
    for name in ("mse", "mse_brain"):
        out[name.replace("mse", "psnr")] = -10.0 * torch.log10(out[name].clamp_min(1e-10))

    ssim_map = _ssim_map(recon, target)
    out["ssim"] = ssim_map.flatten(1).mean(1)
    out["ssim_brain"] = _region_mean(ssim_map, _ssim_support(mask), min_count=1.0)

    out["ms_ssim"] = _ms_ssim(recon, target)
    if lpips is not None:
        out["lpips"] = lpips(recon, target).float()

    brain_ms_ssim, brain_lpips = [], []
    for i in range(recon.shape[0]):
        box = (slice(i, i + 1), slice(None), *_bounding_box(mask[i, 0] > 0, min_size=4 * MS_SSIM_KERNEL))
        masked_recon, masked_target = (recon * mask)[box], (target * mask)[box]
        brain_ms_ssim.append(_ms_ssim(masked_recon, masked_target))
        if lpips is not None:
            brain_lpips.append(lpips(masked_recon, masked_target).float())
    out["ms_ssim_brain"] = torch.cat(brain_ms_ssim)
    if lpips is not None:
        out["lpips_brain"] = torch.cat(brain_lpips)
    if regions:
        out.update(region_metrics(recon, target, regions, ssim_map))
    return {name: value.detach().float().cpu() for name, value in out.items()}


class LatentStatistics:
    """Streaming per-channel mean/std of latents (float64 sums), mergeable across DDP ranks.

    ``scale_factor`` = 1 / global std: multiply latents by it to give the diffusion model unit variance.
    """

    def __init__(self, channels: int) -> None:
        self.count = torch.zeros(channels, dtype=torch.float64)
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_squares = torch.zeros(channels, dtype=torch.float64)

    def update(self, latents: torch.Tensor) -> None:
        """Add a batch of latents (B, C, *spatial)."""
        values = latents.detach().to(torch.float64).cpu().transpose(0, 1).flatten(1)
        self.count += values.shape[1]
        self.sum += values.sum(1)
        self.sum_squares += values.pow(2).sum(1)

    def all_reduce(self) -> None:
        """Sum the statistics of every DDP rank (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():
            for tensor in (self.count, self.sum, self.sum_squares):
                dist.all_reduce(tensor)

    def summary(self) -> dict[str, float | list[float]]:
        """JSON-able: per-channel mean/std, global mean/std, scale_factor, number of latent elements."""
        if float(self.count.sum()) == 0:
            raise ValueError("no latents were added")
        mean = self.sum / self.count
        variance = (self.sum_squares / self.count - mean.pow(2)).clamp_min(0.0)
        total = self.count.sum()
        global_mean = self.sum.sum() / total
        global_variance = max(float(self.sum_squares.sum() / total - global_mean.pow(2)), 0.0)
        global_std = math.sqrt(global_variance)
        if global_std == 0:
            raise ValueError("every latent value is the same (std 0): no scale factor can be derived")
        return {
            "channel_mean": mean.tolist(),
            "channel_std": variance.sqrt().tolist(),
            "mean": float(global_mean),
            "std": global_std,
            "scale_factor": 1.0 / global_std,
            "num_elements": int(total),
        }


@torch.no_grad()
def validate(
    vae: torch.nn.Module,
    val_set: VolumeDataset | DeviceVolumeCache,
    lpips: LPIPS3D | None,
    config: Config,
    context: DistributedContext,
    amp_dtype: torch.dtype | None,
) -> tuple[dict[str, float], dict[str, Any], dict[str, torch.Tensor]]:
    """Training validation of ``vae`` on every volume of ``val_set``: full volumes in batches of
    ``train.val_batch_size``, under AMP, sharded across ranks and reduced.

    Returns:
        (mean metrics named ``val/<metric>`` — :data:`VALIDATION_METRICS`, and with ``train.region_metrics``
        :data:`VALIDATION_REGION_METRICS` —, latent statistics of mu, one preview {input, reconstruction}).
    """
    vae.eval()
    sums: dict[str, float] = {}  # metric → sum over this rank's volumes (float64)
    latent_stats = LatentStatistics(config.model.latent_channels)
    preview: dict[str, torch.Tensor] = {}
    indices = list(range(context.rank, len(val_set), context.world_size))
    batch_size = config.train.val_batch_size or config.train.batch_size
    starts = range(0, len(indices), batch_size)
    # rank 0 only, and only on a terminal (disable=None): no progress lines in non-interactive logs
    for start in tqdm(
        starts, desc="validation", unit="batch", leave=False, disable=None if context.is_main else True
    ):
        chunk = indices[start : start + batch_size]
        batch = val_set.batch(chunk)
        images, masks = batch["image"].to(context.device), batch["mask"].to(context.device)
        with autocast(context.device, amp_dtype):
            mu, sigma = vae.encode(images)
            recon = vae.decode(mu, spatial_shape=tuple(images.shape[2:]))
        regions = None  # tissue classes of each input, segmented once per subject (memoised in regions.py)
        if config.train.region_metrics:
            regions = batch_region_masks(images, masks, names=[f"validation volume {i}" for i in chunk])
        values = image_metrics(recon, images, masks, lpips=lpips, regions=regions)
        values["kl"] = kl_divergence(mu, sigma).cpu()
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + float(value.double().sum())
        latent_stats.update(mu)
        if not preview:
            preview = {"input": images[0].float().cpu(), "reconstruction": recon[0].float().clamp(0, 1).cpu()}
    names = sorted(sums)
    if context.is_distributed:  # rank 0's names (a rank without volumes has none), sums over all ranks
        shared = [names]
        dist.broadcast_object_list(shared, src=0)
        names = shared[0]
        packed = torch.tensor([sums.get(name, 0.0) for name in names], dtype=torch.float64)
        dist.all_reduce(packed)
        sums = dict(zip(names, packed.tolist(), strict=True))
    latent_stats.all_reduce()
    means = {f"val/{name}": sums[name] / len(val_set) for name in names}  # every volume is on one rank
    summary = latent_stats.summary()
    means["val/latent_std"] = summary["std"]
    means["val/latent_std_min"] = min(summary["channel_std"])
    means["val/latent_std_max"] = max(summary["channel_std"])
    means["val/scale_factor"] = summary["scale_factor"]
    vae.train()
    return means, summary, preview
