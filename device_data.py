"""The training data: :func:`make_loaders` takes the DataLoader path (``dataset.VolumeDataset`` augments one
item at a time in workers) or, when :func:`cache_fits`, the GPU path (:class:`DeviceVolumeCache` holds the
preprocessed volumes on the device, :class:`DeviceBatches` augments whole batches there with the same
``dataset.Augmentation``; MONAI's random transforms work per item, keep their draws inside the transform
objects, and RandBiasField has no torch backend). The training memory and CPU step-time estimates live here.

The paths differ only by the float16 rounding of the cached image (:data:`FLOAT16_MAX_ABS_ERROR`); with a
float32 cache a batch is bitwise the DataLoader's (``tests/test_device_data.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Literal

import pandas as pd
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Sampler

import dataset
import demo_cohort
from config import Config, TrainConfig
from dataset import Augmentation, VolumeDataset
from model.recompute import recompute
from utils import DistributedContext, autocast, main_process_first

if TYPE_CHECKING:
    from losses import VAEGANLoss


log = logging.getLogger(__name__)

Storage = Literal["float16", "float32"]
STORAGE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}
# round-to-nearest float16 of a value x in [0, 1]: |error| <= 2**-12 (half an ulp of [0.5, 1); 0 and 1 are
# exact), and <= 2**-11 * x for x >= 2**-14 (normal range; below it the error is <= 2**-25)
FLOAT16_MAX_ABS_ERROR = 2.0**-12
FLOAT16_MAX_REL_ERROR = 2.0**-11


def cache_bytes(n_volumes: int, spatial_shape: Sequence[int], storage: Storage = "float16") -> int:
    """Bytes of a :class:`DeviceVolumeCache` of ``n_volumes`` volumes of ``spatial_shape`` (image + uint8 mask)."""
    return n_volumes * math.prod(spatial_shape) * (STORAGE_DTYPES[storage].itemsize + 1)


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
        with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def cache_fits(
    n_volumes: int,
    spatial_shape: Sequence[int],
    device: torch.device | str,
    max_fraction: float = 0.5,
) -> tuple[bool, str]:
    """Whether a device cache of ``n_volumes`` fits in ``max_fraction`` of the memory free on ``device`` now.

    The rest is left to training (model, optimizer, activations; a few GiB at batch 2 for this model) and to
    the allocator's fragmentation. Returns (fits, one line for the log naming the sizes and the decision).
    """
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    needed = cache_bytes(n_volumes, spatial_shape)
    what = (
        f"{n_volumes} volumes x {cache_bytes(1, spatial_shape) / 2**20:.2f} MiB = {_gib(needed)} "
        f"(float16 image + uint8 mask, {'x'.join(map(str, spatial_shape))})"
    )
    free = free_memory_bytes(device)
    if free is None:
        return False, f"device cache off: {what}; free memory on {device} cannot be measured"
    if needed <= max_fraction * free:
        return True, f"device cache on {device}: {what} <= {max_fraction:.0%} of {_gib(free)} free"
    return (
        False,
        f"device cache off (DataLoader path): {what} > {max_fraction:.0%} of {_gib(free)} free on {device}",
    )


def estimate_training_bytes(
    vae: nn.Module, shape: tuple[int, ...], batch_size: int, device: torch.device
) -> int:
    """Bytes autograd saves for a VAE forward without the recompute, measured at 1/8 of the voxels and scaled,
    times 3 for gradients, the perceptual and discriminator passes and allocator slack (a deliberate
    over-estimate; ``shape`` is (D, H, W))."""
    small = tuple(max(8, math.ceil(s / 2)) for s in shape)  # halved per axis, at least 8
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
        duration = f"{total / 60:.0f} min" if total < 5400 else f"{total / 3600:.1f} h"
        plan = f"{steps_left} steps left ≈ {duration}"
    message = (
        f"CPU training: about {seconds_per_step:.1f} s per pretraining step (a rough estimate from one full-size "
        f"step; GAN-stage steps are slower), {plan}"
    )
    if seconds_per_step > 10:
        message += "; for a run that finishes in minutes on a CPU, use --config_file configs/cpu.json"
    return message


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
        dtype = STORAGE_DTYPES[storage]
        for position, item in enumerate(DataLoader(dataset, batch_size=None, num_workers=num_workers)):
            if position == 0:
                shape = (len(dataset), *item["image"].shape)
                images = torch.empty(shape, dtype=dtype, device=device)
                masks = torch.empty(shape, dtype=torch.uint8, device=device)
            images[position].copy_(item["image"].to(dtype))
            masks[position].copy_(item["mask"].to(torch.uint8))
        return cls(images, masks)

    def __len__(self) -> int:
        return self.images.shape[0]

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
        rows = index.to(self.images.device)
        return {
            "image": self.images.index_select(0, rows).float(),
            "mask": self.masks.index_select(0, rows).float(),
            "index": index,
        }


class DeviceBatches:
    """The training batches of ``DataLoader(augmented VolumeDataset, batch_size, sampler=sampler,
    generator=generator)``, from a :class:`DeviceVolumeCache` and augmented on its device.

    Same indices in the same batches (the last one short) and the same :class:`dataset.Augmentation` per item,
    so either path replays the other's run. Yields ``{"image", "mask"}`` (B, 1, D, H, W) float32 on the device
    and ``"index"`` (B,) long on the CPU. Call :meth:`set_epoch` before iterating, as
    ``VolumeDataset.set_epoch``.
    """

    def __init__(
        self,
        cache: DeviceVolumeCache,
        augmentation: Augmentation | None,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        generator: torch.Generator,
    ) -> None:
        self.cache, self.augmentation, self.generator = cache, augmentation, generator
        self.sampler, self.batches = sampler, BatchSampler(sampler, batch_size, drop_last=False)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # a DataLoader iterator draws its workers' base seed from its generator before the sampler's first
        # index: draw it too, so a generator shared with the sampler gives the DataLoader's shuffle
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        for indices in self.batches:
            batch = self.cache.batch(indices)
            if self.augmentation is not None:
                batch["image"], batch["mask"] = self.augmentation(
                    batch["image"], batch["mask"], indices, self.epoch
                )
            yield batch


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
    dataset.warn_inputs(
        pd.concat([train_frame, val_frame]), strict=data.strict_input_checks, emit=log.warning
    )
    log.info("train: %d volumes, val: %d volumes", len(train_frame), len(val_frame))
    use_device_cache = data.device_cache == "on"
    if data.device_cache == "auto" and context.device.type == "cuda":
        shape = tuple(config.preprocessing.target_shape)
        use_device_cache, reason = cache_fits(len(train_frame) + len(val_frame), shape, context.device)
        log.info(reason)
    generator = torch.Generator()
    build = {"prep": config.preprocessing, "cache": data.cache, "cache_dir": data.cache_dir}
    val_set = VolumeDataset(val_frame, **build)
    train_set = VolumeDataset(
        train_frame, augmentation=None if use_device_cache else config.augmentation, seed=train.seed, **build
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
        augmentation = Augmentation(config.augmentation, train.seed) if config.augmentation.enabled else None
        batches = DeviceBatches(train_cache, augmentation, sampler, train.batch_size, generator)
        return batches, val_cache, generator
    loader = DataLoader(
        train_set,
        batch_size=train.batch_size,
        sampler=sampler,
        num_workers=data.num_workers,
        pin_memory=context.device.type == "cuda",
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
