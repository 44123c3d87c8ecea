"""device_data: the device cache, its batches against the DataLoader path (the same dataset.Augmentation),
replay, sizing.

Everything runs on the CPU with tiny volumes (24 x 28 x 20); the code under test is device-agnostic. With a
float32 cache the device path's batches are bitwise the DataLoader's; a float16 cache differs by its rounding
only: <= 4 x 2**-12 through every step [measured 1.03 x 2**-12 here].
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SHAPE
from torch.utils.data import DataLoader, RandomSampler

import device_data
from config import AugmentationConfig, PreprocessingConfig
from dataset import Augmentation, VolumeDataset, read_split
from device_data import (
    FLOAT16_MAX_ABS_ERROR,
    FLOAT16_MAX_REL_ERROR,
    DeviceBatches,
    DeviceVolumeCache,
    cache_bytes,
    cache_fits,
)

PREP = PreprocessingConfig(target_shape=SHAPE)
SEED = 42


def only(**settings: float) -> AugmentationConfig:
    """Every probability 0 except those given."""
    return AugmentationConfig(
        **{"affine_prob": 0.0, "bias_field_prob": 0.0, "gamma_prob": 0.0, "noise_prob": 0.0, **settings}
    )


ONE_STEP = {
    "affine": only(affine_prob=1.0, rotate_degrees=15.0, scale_fraction=0.1, translate_voxels=4.0),
    "flip": only(flip_left_right_prob=1.0),
    "bias": only(bias_field_prob=1.0),
    "gamma": only(gamma_prob=1.0),
    "noise": only(noise_prob=1.0),
}
# every step on half the time (the left-right flip too), stronger than the defaults to exercise boundaries
HALF = AugmentationConfig(
    affine_prob=0.5,
    bias_field_prob=0.5,
    gamma_prob=0.5,
    noise_prob=0.5,
    flip_left_right_prob=0.5,
    rotate_degrees=15.0,
    scale_fraction=0.1,
    translate_voxels=4.0,
)


@pytest.fixture(scope="module")
def frame(tiny_split) -> pd.DataFrame:
    return read_split(tiny_split[0])


@pytest.fixture(scope="module")
def plain_set(frame) -> VolumeDataset:
    return VolumeDataset(frame, PREP, augmentation=None, cache="memory")


@pytest.fixture(scope="module")
def cache32(plain_set) -> DeviceVolumeCache:
    """float32 storage: no rounding, so the device path must equal the DataLoader path bit for bit."""
    return DeviceVolumeCache.from_dataset(plain_set, "cpu", storage="float32")


def loader_items(frame: pd.DataFrame, aug: AugmentationConfig, epoch: int) -> list[dict]:
    """The augmented items of the DataLoader path (VolumeDataset) for ``epoch``."""
    dataset = VolumeDataset(frame, PREP, augmentation=aug, cache="memory", seed=SEED)
    dataset.set_epoch(epoch)
    return [dataset[i] for i in range(len(dataset))]


def device_batch(cache: DeviceVolumeCache, aug: AugmentationConfig, epoch: int, indices: list[int]):
    batch = cache.batch(indices)
    return Augmentation(aug, SEED)(batch["image"], batch["mask"], indices, epoch)


# ------------------------------------------------------------------------------ against VolumeDataset


@pytest.mark.parametrize("step", list(ONE_STEP))
def test_each_step_equals_volume_dataset(frame, cache32, step):
    """Both paths call dataset.Augmentation with the same (seed, epoch, index): the same output, bit for bit."""
    aug, indices = ONE_STEP[step], list(range(len(cache32)))
    for epoch in (0, 3):
        expected = loader_items(frame, aug, epoch)
        images, masks = device_batch(cache32, aug, epoch, indices)
        for i in indices:
            assert not torch.equal(expected[i]["image"], cache32.images[i]), "the step must change the image"
            assert torch.equal(images[i], expected[i]["image"]) and torch.equal(masks[i], expected[i]["mask"])


@pytest.mark.parametrize("augmented", [True, False])
def test_device_batches_replay_the_dataloader(frame, cache32, augmented):
    """Same shuffled batches and the same (augmented or plain) items as the training DataLoader over
    VolumeDataset; without augmentation the device path yielded no batch at all (configs/cpu.json)."""
    augmentation = HALF if augmented else None
    dataset = VolumeDataset(frame, PREP, augmentation=augmentation, cache="memory", seed=SEED)
    loader_generator, device_generator = torch.Generator(), torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=3,
        sampler=RandomSampler(dataset, generator=loader_generator),
        generator=loader_generator,
    )
    batches = DeviceBatches(
        cache32,
        Augmentation(HALF, SEED) if augmented else None,
        RandomSampler(dataset, generator=device_generator),
        3,
        device_generator,
    )
    assert len(batches) == len(loader) == 2
    for epoch in (0, 1):
        loader_generator.manual_seed(SEED * 1_000_003 + epoch)
        device_generator.manual_seed(SEED * 1_000_003 + epoch)
        dataset.set_epoch(epoch)
        batches.set_epoch(epoch)
        pairs = list(zip(loader, batches, strict=True))
        for expected, got in pairs:
            assert got["index"].tolist() == expected["index"].tolist()
            assert torch.equal(got["image"], expected["image"]) and torch.equal(got["mask"], expected["mask"])
    order = [b["index"].tolist() for b in batches]
    assert sorted(sum(order, [])) == list(range(len(cache32)))


# ------------------------------------------------------------------------------------------------ replay


def test_replay_is_exact_and_epochs_differ(cache32):
    indices = [3, 0, 2]
    first = device_batch(cache32, HALF, 5, indices)
    again = device_batch(cache32, HALF, 5, indices)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # an item's augmentation depends on (seed, epoch, index) only, not on its batch
    alone, _ = device_batch(cache32, HALF, 5, [2])
    assert torch.equal(alone[0], first[0][2])
    other_epochs = [device_batch(cache32, HALF, epoch, indices)[0] for epoch in (6, 7)]
    assert not any(torch.equal(first[0], other) for other in other_epochs)
    batch = cache32.batch(indices)
    other_seed, _ = Augmentation(HALF, SEED + 1)(batch["image"], batch["mask"], indices, 5)
    assert not torch.equal(first[0], other_seed)


def test_background_stays_zero_and_outputs_in_range(cache32):
    aug = only(bias_field_prob=1.0, gamma_prob=1.0, noise_prob=1.0, noise_std=0.3)
    indices = list(range(len(cache32)))
    batch = cache32.batch(indices)
    images, masks = Augmentation(aug, SEED)(batch["image"], batch["mask"], indices, 0)
    background = batch["image"] == 0
    assert background.any() and (images[background] == 0).all()
    assert images.min() >= 0 and images.max() <= 1 and images.dtype == torch.float32
    assert ((images > 0) & (images < 1)).any()
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    full = device_batch(cache32, HALF, 1, indices)
    assert full[0].min() >= 0 and full[0].max() <= 1 and set(full[1].unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------------------------------------- cache


def test_float16_cache_round_trip_bound():
    rng = np.random.default_rng(1)
    values = np.concatenate(
        [[0.0, 1.0, 2**-14, 2**-15, 0.5 - 2**-13, 1 - 2**-13], rng.uniform(0, 1, 6 * 560 - 6)]
    )
    images = torch.as_tensor(values, dtype=torch.float32).reshape(6, 1, 8, 7, 10)
    masks = (images > 0.5).to(torch.uint8)
    cache = DeviceVolumeCache(images.half(), masks)
    assert cache.nbytes == cache_bytes(6, (8, 7, 10)) == 6 * 560 * 3
    batch = cache.batch([5, 0, 2])
    original = images[[5, 0, 2]]
    error = (batch["image"] - original).abs()
    assert batch["image"].dtype == torch.float32 and error.max().item() <= FLOAT16_MAX_ABS_ERROR
    normal = original >= 2**-14
    assert (error[normal] / original[normal]).max().item() <= FLOAT16_MAX_REL_ERROR
    assert cache.batch([0])["image"].flatten()[:2].tolist() == [0.0, 1.0]  # 0 and 1 are exact
    assert torch.equal(batch["mask"], masks[[5, 0, 2]].float())
    assert batch["index"].tolist() == [5, 0, 2] and batch["index"].dtype == torch.long


def test_cache_from_dataset(plain_set, cache32):
    cache = DeviceVolumeCache.from_dataset(plain_set, "cpu")
    assert len(cache) == len(plain_set) and cache.spatial_shape == SHAPE
    assert cache.images.dtype == torch.float16 and cache.masks.dtype == torch.uint8
    for i in range(len(plain_set)):
        item = plain_set[i]
        assert torch.equal(cache32.images[i], item["image"])  # float32 storage is exact
        assert (cache.images[i].float() - item["image"]).abs().max().item() <= FLOAT16_MAX_ABS_ERROR
        assert torch.equal(cache.masks[i].float(), item["mask"])


def test_float16_cache_through_the_chain(plain_set, cache32):
    """float16 storage vs float32 through every step: the input rounding (<= 2**-12) is not amplified
    much (affine, flip, noise and the clip do not expand differences; the bias field and the gamma rescale
    do, mildly)."""
    cache16 = DeviceVolumeCache.from_dataset(plain_set, "cpu")
    aug = AugmentationConfig(affine_prob=1.0, bias_field_prob=1.0, gamma_prob=1.0, noise_prob=1.0)
    indices = list(range(len(cache32)))
    for epoch in range(3):
        exact, _ = device_batch(cache32, aug, epoch, indices)
        rounded, _ = device_batch(cache16, aug, epoch, indices)
        assert (exact - rounded).abs().max().item() <= 4 * FLOAT16_MAX_ABS_ERROR


def test_refuses_bad_inputs(frame):
    augmented = VolumeDataset(frame, PREP, augmentation=AugmentationConfig(), cache="none")
    with pytest.raises(ValueError, match="without augmentation"):
        DeviceVolumeCache.from_dataset(augmented, "cpu")
    with pytest.raises(ValueError, match="uint8 masks"):
        DeviceVolumeCache(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="one shape"):
        DeviceVolumeCache(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 3, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ sizing


def test_cache_fits_and_reason(monkeypatch):
    shape = (91, 109, 91)
    per_volume = 91 * 109 * 91 * 3
    assert cache_bytes(100, shape) == 100 * per_volume
    assert cache_bytes(100, shape, "float32") == 100 * 91 * 109 * 91 * 5

    fits, reason = cache_fits(4, SHAPE, "cpu")
    assert fits and reason.startswith("device cache on cpu: 4 volumes") and "\n" not in reason

    monkeypatch.setattr(device_data, "free_memory_bytes", lambda device: 10 * per_volume)
    fits, reason = cache_fits(5, shape, "cpu")  # exactly half of the free memory
    assert fits and "float16 image + uint8 mask, 91x109x91" in reason and "<= 50% of" in reason
    fits, reason = cache_fits(6, shape, "cpu")
    assert not fits and reason.startswith("device cache off (DataLoader path)") and "> 50% of" in reason
    assert cache_fits(6, shape, "cpu", max_fraction=0.6)[0]
    with pytest.raises(ValueError, match="max_fraction"):
        cache_fits(1, shape, "cpu", max_fraction=0.0)

    monkeypatch.setattr(device_data, "free_memory_bytes", lambda device: None)
    fits, reason = cache_fits(1, shape, "meta")
    assert not fits and "cannot be measured" in reason


def test_free_memory_bytes():
    free = device_data.free_memory_bytes("cpu")
    assert free is not None and free > 0
    assert device_data.free_memory_bytes("meta") is None
