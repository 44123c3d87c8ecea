"""The GPU data path: preprocessed volumes cached on the training device and augmented there, in batches.

Today's path runs every training volume through a DataLoader worker: CPU cache -> per-item MONAI augmentation
(:func:`dataset.build_augmentation`) -> collate -> copy to the device. This module keeps the preprocessed
volumes on the device (:class:`DeviceVolumeCache`: float16 image + uint8 mask) and applies the same
augmentation to whole batches with torch ops (:class:`BatchAugmentation`); :class:`DeviceBatches` puts both
behind the interface of the training DataLoader. :func:`cache_fits` says whether the cache fits (and why, in
one line for the log); when it does not, :func:`make_loaders` (training's choice of data path) keeps the
DataLoader path. The training memory and CPU step-time estimates live beside :func:`cache_fits`.

Seeding. Every random decision and parameter is drawn on the CPU by the MONAI transform objects of
:func:`dataset.build_augmentation` themselves, seeded per item exactly as ``VolumeDataset.__getitem__`` seeds
them (``SeedSequence([seed, epoch, index])`` -> ``Compose.set_random_state``), calling their ``randomize``
methods in the order and with the arguments their ``__call__`` uses. Both paths therefore draw the same
augmentation for an item (the tests check it), and a resumed run replays exactly on either path.

What differs from the MONAI path (measured in ``tests/test_device_data.py``): the float16 rounding of the
cached image (:data:`FLOAT16_MAX_ABS_ERROR`), float32 rounding in the affine grid (``F.affine_grid`` instead
of MONAI's centred-grid product; the sampling itself is the same ``grid_sample`` call), the bias field
evaluated in float32 instead of float64, and therefore, rarely, a mask voxel at a nearest-neighbour tie.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import monai.transforms as mt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler

import dataset
import demo_cohort
from config import AugmentationConfig, Config, TrainConfig
from dataset import VolumeDataset, _ClipUnit, _RandForegroundNoised, build_augmentation
from model.recompute import recompute
from utils import DistributedContext, autocast, main_process_first

if TYPE_CHECKING:
    from losses import VAEGANLoss

__all__ = [
    "FLOAT16_MAX_ABS_ERROR",
    "FLOAT16_MAX_REL_ERROR",
    "BatchAugmentation",
    "BatchDraw",
    "DeviceBatches",
    "DeviceVolumeCache",
    "cache_bytes",
    "cache_fits",
    "choose_recompute",
    "cpu_cost_message",
    "epoch_batches",
    "estimate_cpu_step_seconds",
    "estimate_training_bytes",
    "free_memory_bytes",
    "make_loaders",
    "steps_per_epoch",
]

log = logging.getLogger(__name__)

Storage = Literal["float16", "float32"]
STORAGE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
MASK_BYTES = 1  # the mask is stored as uint8 0/1 (exact)
# round-to-nearest float16 of a value x in [0, 1]: |error| <= 2**-12 (half an ulp of [0.5, 1); 0 and 1 are
# exact), and <= 2**-11 * x for x >= 2**-14 (normal range; below it the error is <= 2**-25)
FLOAT16_MAX_ABS_ERROR = 2.0**-12
FLOAT16_MAX_REL_ERROR = 2.0**-11
CONTRAST_EPSILON = 1e-7  # monai.transforms.AdjustContrast's epsilon


# ------------------------------------------------------------------------------------------------ sizing


def cache_bytes(n_volumes: int, spatial_shape: Sequence[int], storage: Storage = "float16") -> int:
    """Bytes of a :class:`DeviceVolumeCache` of ``n_volumes`` volumes of ``spatial_shape`` (image + mask)."""
    return n_volumes * math.prod(spatial_shape) * (STORAGE_DTYPES[storage].itemsize + MASK_BYTES)


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Bytes available for new tensors on ``device``; None where it cannot be measured.

    cuda: the driver's free memory plus what PyTorch's caching allocator holds unused; cpu: ``MemAvailable``
    of /proc/meminfo (else free pages).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def cache_fits(
    n_volumes: int,
    spatial_shape: Sequence[int],
    device: torch.device | str,
    storage: Storage = "float16",
    max_fraction: float = 0.5,
) -> tuple[bool, str]:
    """Whether a device cache of ``n_volumes`` fits in ``max_fraction`` of the memory free on ``device`` now.

    The rest is left to training (model, optimizer, activations; a few GiB at batch 2 for this model) and to
    the allocator's fragmentation. Returns (fits, one line for the log naming the sizes and the decision).
    """
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    device = torch.device(device)
    needed = cache_bytes(n_volumes, spatial_shape, storage)
    per_volume = cache_bytes(1, spatial_shape, storage)
    what = (
        f"{n_volumes} volumes x {per_volume / 2**20:.2f} MiB = {_gib(needed)} "
        f"({storage} image + uint8 mask, {'x'.join(map(str, spatial_shape))})"
    )
    free = free_memory_bytes(device)
    if free is None:
        return False, f"device cache off: {what}; free memory on {device} cannot be measured"
    budget = max_fraction * free
    if needed <= budget:
        return True, f"device cache on {device}: {what} <= {max_fraction:.0%} of {_gib(free)} free"
    return (
        False,
        f"device cache off (DataLoader path): {what} > {max_fraction:.0%} of {_gib(free)} free on {device}",
    )


def half_size(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(D, H, W) halved per axis (at least 8): where :func:`estimate_training_bytes` measures, to scale up."""
    return tuple(max(8, math.ceil(s / 2)) for s in shape)


def estimate_training_bytes(
    vae: nn.Module, shape: tuple[int, ...], batch_size: int, device: torch.device
) -> int:
    """Bytes autograd saves for a VAE forward without the recompute, measured at 1/8 of the voxels and scaled,
    times 3 for gradients, the perceptual and discriminator passes and allocator slack (a deliberate
    over-estimate; ``shape`` is (D, H, W))."""
    small = half_size(shape)
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    cuda_devices = [device] if device.type == "cuda" else []
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with recompute(False), torch.random.fork_rng(devices=cuda_devices), hooks:
        vae(torch.zeros(1, 1, *small, device=device))
    return int(3 * saved * batch_size * math.prod(shape) / math.prod(small))


def choose_recompute(
    train: TrainConfig, vae: nn.Module, shape: tuple[int, ...], device: torch.device
) -> bool:
    """``train.recompute``: ``on`` / ``off``, or ``auto``: on for CPU; on CUDA off unless the estimated training
    memory without it would exceed 80 % of the free device memory."""
    if train.recompute != "auto":
        return train.recompute == "on"
    if device.type != "cuda":
        return True
    free = free_memory_bytes(device)
    need = estimate_training_bytes(vae, shape, train.batch_size, device)
    log.info("recompute auto: ~%.1f GiB estimated without it, %.1f GiB free", need / 2**30, free / 2**30)
    return need > 0.8 * free


def estimate_cpu_step_seconds(
    vae: nn.Module,
    loss: VAEGANLoss,
    batch_size: int,
    shape: tuple[int, ...],
    amp_dtype: torch.dtype | None,
) -> float:
    """Seconds per pretraining step on this CPU: forward + backward of one full-size batch (``batch_size`` volumes
    of ``shape`` (D, H, W)), timed after a warm-up pass that pays the one-off costs (allocations, kernel
    selection; a half-size pass scaled up by the voxel count overestimated 4x, issue 17). No weight, gradient or
    random stream is changed."""
    with torch.random.fork_rng():
        images = torch.rand(batch_size, 1, *shape)
        for _ in range(2):  # the first is the warm-up
            start = time.perf_counter()
            with autocast(images.device, amp_dtype):
                recon, mu, sigma = vae(images)
                total, _ = loss.generator(images, recon, mu, sigma)
            total.backward()
            seconds = time.perf_counter() - start
    vae.zero_grad(set_to_none=True)
    return seconds


def cpu_cost_message(seconds_per_step: float, steps_left: int, time_budget_s: float | None) -> str:
    """One log line for a CPU run before its first step: the time per step (:func:`estimate_cpu_step_seconds`)
    and for the ``steps_left`` (or what ``train.time_budget_s`` allows), and the CPU preset when steps are slow."""
    total = seconds_per_step * steps_left
    if time_budget_s is not None and total > time_budget_s:
        allowed = time_budget_s / seconds_per_step
        plan = f"{steps_left} steps left, of which train.time_budget_s={time_budget_s:g} allows about {allowed:.0f}"
    else:
        plan = f"{steps_left} steps left ≈ " + (
            f"{total / 60:.0f} min" if total < 5400 else f"{total / 3600:.1f} h"
        )
    message = (
        f"CPU training: about {seconds_per_step:.1f} s per pretraining step (a rough estimate from one full-size "
        f"step; GAN-stage steps are slower), {plan}"
    )
    if seconds_per_step > 10:
        message += "; for a run that finishes in minutes on a CPU, use --config_file configs/cpu.json"
    return message


# ------------------------------------------------------------------------------------------------- cache


class DeviceVolumeCache:
    """Preprocessed volumes stacked on one device; row ``i`` is item ``i`` of the source dataset.

    ``images`` (N, 1, D, H, W) float16 (or float32), ``masks`` (N, 1, D, H, W) uint8 0/1.
    """

    def __init__(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        if images.ndim != 5 or images.shape[1] != 1 or images.shape != masks.shape:
            raise ValueError(
                f"expected images and masks of one shape (N, 1, D, H, W), got {tuple(images.shape)} and "
                f"{tuple(masks.shape)}"
            )
        if images.dtype not in STORAGE_DTYPES.values() or masks.dtype != torch.uint8:
            raise ValueError(
                f"expected float16/float32 images and uint8 masks, got {images.dtype}, {masks.dtype}"
            )
        if images.device != masks.device:
            raise ValueError(f"images on {images.device}, masks on {masks.device}")
        self.images, self.masks = images, masks

    @classmethod
    def from_dataset(
        cls,
        dataset: VolumeDataset,
        device: torch.device | str,
        storage: Storage = "float16",
        num_workers: int = 0,
    ) -> DeviceVolumeCache:
        """Copy every item of a :class:`dataset.VolumeDataset` built WITHOUT augmentation onto ``device``.

        Reads through the dataset's own cache (a ``disk``/``none`` cache preprocesses here, in ``num_workers``
        DataLoader workers); images are converted to ``storage`` on the CPU before the copy.
        """
        if dataset.augment is not None:
            raise ValueError(
                "build the device cache from a VolumeDataset without augmentation (augmentation=None)"
            )
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        dtype, device = STORAGE_DTYPES[storage], torch.device(device)
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
        images = masks = None
        for position, item in enumerate(loader):
            if int(item["index"]) != position:
                raise ValueError(f"item {position} has index {item['index']}; expected the row position")
            if images is None or masks is None:
                shape = (len(dataset), *item["image"].shape)
                images = torch.empty(shape, dtype=dtype, device=device)
                masks = torch.empty(shape, dtype=torch.uint8, device=device)
            images[position].copy_(item["image"].to(dtype))
            masks[position].copy_(item["mask"].to(torch.uint8))
        assert images is not None and masks is not None
        return cls(images, masks)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[2:])  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Bytes held on the device (images + masks)."""
        return self.images.nbytes + self.masks.nbytes

    def batch(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"image": (B, 1, D, H, W) float32, "mask": (B, 1, D, H, W) float32 0/1}`` on the cache's device,
        ``"index": (B,) long`` on the CPU (as the DataLoader collates it)."""
        index = torch.as_tensor(indices, dtype=torch.long).cpu()
        rows = index.to(self.device)
        return {
            "image": self.images.index_select(0, rows).float(),
            "mask": self.masks.index_select(0, rows).float(),
            "index": index,
        }


# ------------------------------------------------------------------------------------------ augmentation


@dataclass
class BatchDraw:
    """The augmentation of one batch, drawn on the CPU: one entry per item, None/False where a step is off."""

    spatial_shape: tuple[int, int, int]
    affine: list[torch.Tensor | None] = field(default_factory=list)  # (4, 4) MONAI matrix (see _affine_theta)
    flip: list[bool] = field(default_factory=list)
    bias: list[np.ndarray | None] = field(default_factory=list)  # (degree + 1,) * 3 Legendre coefficients
    gamma: list[float | None] = field(default_factory=list)
    noise: list[torch.Tensor | None] = field(default_factory=list)  # (1, D, H, W) float32


def _legendre_coefficients(coeff: Sequence[float], degree: int) -> np.ndarray:
    """MONAI ``RandBiasField``'s coefficient matrix: ``coeff`` over (i, j, k) with i + j + k <= degree."""
    points = [
        (i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j)
    ]
    matrix = np.zeros((degree + 1,) * 3)
    matrix[tuple(np.asarray(points).T)] = coeff
    return matrix


def _legendre_basis(size: int, degree: int, device: torch.device) -> torch.Tensor:
    """(size, degree + 1) float32: Legendre polynomials 0..degree at MONAI's float32 linspace(-1, 1, size)."""
    coords = np.linspace(-1.0, 1.0, size, dtype=np.float32).astype(np.float64)
    return torch.as_tensor(
        np.polynomial.legendre.legvander(coords, degree), dtype=torch.float32, device=device
    )


def _affine_theta(matrices: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """(n, 4, 4) MONAI affines -> (n, 3, 4) ``F.affine_grid`` thetas (``align_corners=False``).

    MONAI samples output voxel c (centred voxel coordinates, axes (d, h, w)) at input point A·c and normalises
    by 2/size per axis; grid_sample takes normalised (x, y, z) = (w, h, d). So theta = P·S·A·S⁻¹·P with
    S = diag(2/size) and P the axis reversal.
    """
    scale = torch.tensor([2.0 / s for s in spatial_shape], dtype=torch.float64)
    matrices = matrices.to(torch.float64)
    linear = matrices[:, :3, :3] * scale[:, None] / scale[None, :]
    shift = matrices[:, :3, 3] * scale
    return torch.cat([linear.flip(1, 2), shift.flip(1)[:, :, None]], dim=2).float()


class BatchAugmentation:
    """:func:`dataset.build_augmentation` on batches, on their device, seeded as ``VolumeDataset`` seeds it.

    ``__call__(images, masks, indices, epoch)`` = :meth:`apply` of :meth:`draw`; the split lets a loader draw
    the next batch on the CPU (:class:`DeviceBatches` does, in a thread) while the device works.
    """

    def __init__(self, aug: AugmentationConfig, seed: int) -> None:
        self.seed = seed
        self.compose = build_augmentation(aug)
        steps = list(self.compose.transforms)
        expected = [
            mt.RandAffined,
            mt.RandBiasFieldd,
            mt.RandAdjustContrastd,
            _RandForegroundNoised,
            _ClipUnit,
        ]
        if aug.flip_left_right_prob > 0:
            expected.insert(1, mt.RandFlipd)
        if [type(step) for step in steps] != expected:
            raise TypeError(
                f"dataset.build_augmentation has the steps {[type(s).__name__ for s in steps]}, the device "
                f"path implements {[t.__name__ for t in expected]}: update device_data.BatchAugmentation"
            )
        self._affine: mt.RandAffined = steps[0]
        self._flip: mt.RandFlipd | None = steps[1] if aug.flip_left_right_prob > 0 else None
        self._bias: mt.RandBiasFieldd = steps[-4]
        self._gamma: mt.RandAdjustContrastd = steps[-3]
        self._noise: _RandForegroundNoised = steps[-2]
        self._lock = threading.Lock()  # the MONAI transforms hold the random state: one draw at a time

    # ---- drawing (CPU, MONAI's own random streams)

    def draw(
        self,
        indices: Sequence[int] | torch.Tensor,
        epoch: int,
        spatial_shape: Sequence[int],
        pin_memory: bool = False,
    ) -> BatchDraw:
        """Every random decision and parameter for items ``indices`` of ``epoch``, as ``VolumeDataset`` draws
        them; ``pin_memory`` pins the noise tensors (for an asynchronous copy to a GPU)."""
        shape = tuple(int(s) for s in spatial_shape)
        out = BatchDraw(shape)  # type: ignore[arg-type]
        with self._lock:
            for index in indices:
                item_seed = np.random.SeedSequence([self.seed, epoch, int(index)]).generate_state(1)[0]
                self.compose.set_random_state(seed=int(item_seed))
                out.affine.append(self._draw_affine(shape))
                out.flip.append(self._draw_flip())
                out.bias.append(self._draw_bias(shape))
                out.gamma.append(self._draw_gamma())
                out.noise.append(self._draw_noise(shape, pin_memory))
        return out

    def _draw_affine(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """``RandAffined.__call__``: its prob, ``RandAffine.randomize()``, then the grid it resamples with,
        built by ``RandAffineGrid.__call__`` with ``randomize=True`` (a second draw: the one applied)."""
        step = self._affine
        step.randomize(None)
        step.rand_affine.randomize()
        if not step._do_transform:
            return None
        grid = step.rand_affine.rand_affine_grid
        grid(shape, randomize=True, lazy=True)  # lazy: the matrix only, not the (3, D, H, W) grid
        return torch.as_tensor(grid.get_transformation_matrix(), dtype=torch.float32).cpu()

    def _draw_flip(self) -> bool:
        if self._flip is None:
            return False
        self._flip.randomize(None)
        return bool(self._flip._do_transform)

    def _draw_bias(self, shape: tuple[int, ...]) -> np.ndarray | None:
        step = self._bias
        step.randomize(None)
        if not step._do_transform:
            return None
        step.rand_bias_field.randomize(img_size=shape)
        return _legendre_coefficients(step.rand_bias_field._coeff, step.rand_bias_field.degree)

    def _draw_gamma(self) -> float | None:
        step = self._gamma
        step.randomize(None)
        if not step._do_transform:
            return None
        step.adjuster.randomize(None)
        return float(step.adjuster.gamma_value)

    def _draw_noise(self, shape: tuple[int, ...], pin_memory: bool) -> torch.Tensor | None:
        """The same ``self.R.normal`` values (float64 -> float32) ``_RandForegroundNoised`` adds."""
        step = self._noise
        step.randomize(None)
        if not step._do_transform or step.std == 0:
            return None
        noise = torch.as_tensor(step.R.normal(0.0, step.std, size=(1, *shape)), dtype=torch.float32)
        return noise.pin_memory() if pin_memory else noise

    # ---- applying (batched, on the batch's device)

    def apply(
        self, images: torch.Tensor, masks: torch.Tensor, draw: BatchDraw
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images``/``masks`` (B, 1, D, H, W) float32 (mask 0/1) per ``draw``, on their device.

        Same order as :func:`dataset.build_augmentation`: affine (bilinear image, nearest mask, zero padding),
        left-right flip, bias field, gamma/contrast, foreground noise, clip. Returns new tensors.
        """
        if tuple(images.shape[2:]) != draw.spatial_shape or len(draw.flip) != images.shape[0]:
            raise ValueError(f"draw for {len(draw.flip)} x {draw.spatial_shape}, batch {tuple(images.shape)}")
        device = images.device

        def rows(flags: Sequence[object]) -> tuple[list[int], torch.Tensor]:
            chosen = [i for i, flag in enumerate(flags) if flag is not None and flag is not False]
            return chosen, torch.tensor(chosen, dtype=torch.long, device=device)

        chosen, index = rows(draw.affine)
        if chosen:
            matrices = torch.stack([draw.affine[i] for i in chosen])  # type: ignore[misc]
            theta = _affine_theta(matrices, draw.spatial_shape).to(device)
            grid = F.affine_grid(theta, [len(chosen), 1, *draw.spatial_shape], align_corners=False)
            sample = dict(grid=grid, padding_mode="zeros", align_corners=False)
            images = images.index_copy(0, index, F.grid_sample(images[index], mode="bilinear", **sample))
            masks = masks.index_copy(0, index, F.grid_sample(masks[index], mode="nearest", **sample))

        chosen, index = rows(draw.flip)
        if chosen:  # spatial axis 0 (left-right in RAS) is dim 2 of (B, 1, D, H, W)
            images = images.index_copy(0, index, images[index].flip(2))
            masks = masks.index_copy(0, index, masks[index].flip(2))

        chosen, index = rows(draw.bias)
        if chosen:
            coefficients = torch.as_tensor(
                np.stack([draw.bias[i] for i in chosen]), dtype=torch.float32, device=device
            )  # (n, i, j, k)
            degree = coefficients.shape[1] - 1
            depth, height, width = (_legendre_basis(s, degree, device) for s in draw.spatial_shape)
            bias = torch.einsum("nijk,wk->nijw", coefficients, width)
            bias = torch.einsum("nijw,hj->nihw", bias, height)
            bias = torch.einsum("nihw,di->ndhw", bias, depth)
            images = images.index_copy(0, index, images[index] * torch.exp(bias)[:, None])

        chosen, index = rows(draw.gamma)
        if chosen:  # monai AdjustContrast: per-volume min/max rescaling around the power
            values = images[index]
            low = values.amin(dim=(1, 2, 3, 4), keepdim=True)
            span = values.amax(dim=(1, 2, 3, 4), keepdim=True) - low
            gamma = torch.tensor([draw.gamma[i] for i in chosen], dtype=torch.float32, device=device)
            adjusted = ((values - low) / (span + CONTRAST_EPSILON)) ** gamma.view(-1, 1, 1, 1, 1) * span + low
            images = images.index_copy(0, index, adjusted)

        chosen, index = rows(draw.noise)
        if chosen:  # on nonzero voxels only: the background stays 0
            # copied one by one: a stack would be a new, unpinned CPU tensor (a synchronous copy)
            pieces: list[torch.Tensor] = [draw.noise[i] for i in chosen]  # type: ignore[misc]
            noise = torch.stack([piece.to(device, non_blocking=True) for piece in pieces])
            values = images[index]
            images = images.index_copy(0, index, torch.where(values > 0, values + noise, values))

        return images.clamp(0.0, 1.0), (masks > 0.5).float()

    def __call__(
        self, images: torch.Tensor, masks: torch.Tensor, indices: Sequence[int] | torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch (B, 1, D, H, W) of items ``indices`` for ``epoch`` on its device."""
        draw = self.draw(indices, epoch, images.shape[2:], pin_memory=images.is_cuda)
        return self.apply(images, masks, draw)


# ---------------------------------------------------------------------------------------------- batches


class DeviceBatches:
    """The training batches of ``DataLoader(augmented VolumeDataset, batch_size, sampler=sampler,
    generator=generator)``, from a :class:`DeviceVolumeCache` and augmented on its device.

    Same indices in the same batches (the last one short) and the same augmentation per item, so either path
    replays the other's run. Yields ``{"image", "mask"}`` (B, 1, D, H, W) float32 on the device and
    ``"index"`` (B,) long on the CPU. Draws the next batch's augmentation in a thread while the current one is
    used. Call :meth:`set_epoch` before iterating, as ``VolumeDataset.set_epoch``.
    """

    def __init__(
        self,
        cache: DeviceVolumeCache,
        augmentation: BatchAugmentation | None,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        self.cache, self.augmentation, self.sampler = cache, augmentation, sampler
        self.batch_size, self.generator = batch_size, generator
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.generator is not None:
            # a DataLoader iterator draws its workers' base seed from its generator before the sampler's first
            # index: draw it too, so a generator shared with the sampler gives the DataLoader's shuffle
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        batches = iter(BatchSampler(self.sampler, self.batch_size, drop_last=False))
        augmentation = self.augmentation
        if augmentation is None:
            yield from (self.cache.batch(indices) for indices in batches)
            return
        epoch, shape, pin = self.epoch, self.cache.spatial_shape, self.cache.device.type == "cuda"
        with ThreadPoolExecutor(max_workers=1) as pool:

            def submit(indices: list[int] | None) -> tuple[list[int], Future[BatchDraw]] | None:
                if indices is None:
                    return None
                return indices, pool.submit(augmentation.draw, indices, epoch, shape, pin)

            pending = submit(next(batches, None))
            while pending is not None:
                indices, drawn = pending
                pending = submit(next(batches, None))  # drawn on the CPU while this batch is used
                batch = self.cache.batch(indices)
                batch["image"], batch["mask"] = augmentation.apply(
                    batch["image"], batch["mask"], drawn.result()
                )
                yield batch


# ------------------------------------------------------------------------------------- training data path


def make_loaders(
    config: Config, context: DistributedContext
) -> tuple[DataLoader | DeviceBatches, VolumeDataset | DeviceVolumeCache, torch.Generator]:
    """The training batches (shuffled, augmented, sharded across ranks), the validation volumes (not augmented)
    and the generator that orders the shuffle.

    With ``data.device_cache`` on (``auto``: on CUDA when the volumes fit) both sets live on the training
    device and the augmentation runs there in batch (:class:`DeviceBatches`); otherwise a DataLoader feeds
    augmented volumes from the ``data.cache``. Both paths draw the same shuffle and augmentations.
    """
    data, train = config.data, config.train
    with main_process_first(context):
        demo_cohort.ensure_demo_data(data)
    train_frame = dataset.preflight(dataset.read_split(data.train_csv), skip_bad_files=data.skip_bad_files)
    val_frame = dataset.preflight(dataset.read_split(data.val_csv), skip_bad_files=data.skip_bad_files)
    log.info("train: %d volumes, val: %d volumes", len(train_frame), len(val_frame))
    augmentation = config.augmentation if config.augmentation.enabled else None
    cache_dir = Path(data.cache_dir)
    use_device_cache = data.device_cache == "on"
    if data.device_cache == "auto" and context.device.type == "cuda":
        shape = tuple(config.preprocessing.target_shape)
        use_device_cache, reason = cache_fits(len(train_frame) + len(val_frame), shape, context.device)
        log.info(reason)
    generator = torch.Generator()
    build = {"prep": config.preprocessing, "cache": data.cache, "cache_dir": cache_dir}
    val_set = dataset.build_dataset(val_frame, augmentation=None, **build)
    train_set = dataset.build_dataset(
        train_frame, augmentation=None if use_device_cache else augmentation, seed=train.seed, **build
    )
    if context.is_distributed:
        sampler = DistributedSampler(train_set, shuffle=True, seed=train.seed, drop_last=False)
    else:
        sampler = RandomSampler(train_set, generator=generator)
    if use_device_cache:
        with torch.random.fork_rng():  # copying through a DataLoader must not move the model's random stream
            train_cache = DeviceVolumeCache.from_dataset(
                train_set, context.device, num_workers=data.num_workers
            )
            val_cache = DeviceVolumeCache.from_dataset(val_set, context.device, num_workers=data.num_workers)
        log.info(
            "device cache: %.2f GiB on %s", (train_cache.nbytes + val_cache.nbytes) / 2**30, context.device
        )
        batch_augmentation = None if augmentation is None else BatchAugmentation(augmentation, train.seed)
        batches = DeviceBatches(train_cache, batch_augmentation, sampler, train.batch_size, generator)
        return batches, val_cache, generator
    loader = DataLoader(
        train_set,
        batch_size=train.batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        pin_memory=context.device.type == "cuda",
        persistent_workers=False,
        generator=generator,
    )
    return loader, val_set, generator


def epoch_batches(
    loader: DataLoader | DeviceBatches,
    generator: torch.Generator,
    train: TrainConfig,
    device: torch.device,
    epoch: int,
    first: int,
    last: int,
) -> Iterator[torch.Tensor]:
    """The epoch's training images (B, 1, D, H, W) on ``device``, batches ``first`` to ``last - 1``.

    The shuffle order and every augmentation are functions of (seed, epoch, index), so a resumed epoch
    replays the same batches.
    """
    generator.manual_seed(train.seed * 1_000_003 + epoch)
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    (loader if isinstance(loader, DeviceBatches) else loader.dataset).set_epoch(epoch)
    memory_format = torch.channels_last_3d if train.channels_last else torch.contiguous_format
    for batch in islice(loader, first, last):
        yield batch["image"].to(device, non_blocking=True).to(memory_format=memory_format)


def steps_per_epoch(loader: DataLoader | DeviceBatches, train: TrainConfig) -> int:
    """Batches per epoch (``len(loader)``, capped by ``train.max_steps_per_epoch``)."""
    return len(loader) if train.max_steps_per_epoch is None else min(len(loader), train.max_steps_per_epoch)
