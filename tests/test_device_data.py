"""device_data: the device cache, the batched augmentation against MONAI's per-item path, replay, sizing.

Everything runs on the CPU with tiny volumes (24 x 28 x 20); the code under test is device-agnostic.

Tolerances; in brackets the maxima measured over 8 epochs here, then on 6 real IXI volumes (91 x 109 x 91, 3
epochs), float32 cache:
* flip, gamma, noise: the same float32 operations as MONAI -> 1e-6 [0; -];
* bias field: float32 exp(field) vs MONAI's float64 -> 1e-6 [6e-8; -];
* affine: the same grid_sample call, but the grid comes from F.affine_grid instead of MONAI's centred-grid
  product; float32 rounding of coordinates (~1e-6 voxel at |coords| ~ 15, ~5e-6 at ~45) times the image
  gradient (<= 1 per voxel for values in [0, 1]) -> 1e-5 [2.4e-6; 9.4e-6]; a nearest-neighbour tie in the
  mask may resolve differently, so masks may differ in <= 0.1 % of voxels [0; 2 of 16.2 M voxels];
* full chain: as the affine, except that a voxel bilinear-interpolated to exactly 0 on one path and ~1e-9 on
  the other gets foreground noise on one path only: <= 0.01 % of voxels may exceed 1e-5 [none; 2 of 16.2 M
  voxels, by 1.4e-3, with every step always on].
* float16 cache vs float32 cache through every step: <= 4 x 2**-12 [float16 cache vs the MONAI path: 1.34 x
  2**-12; 1.21 x 2**-12 (HALF)].
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
from dataset import VolumeDataset, build_augmentation, read_split
from device_data import (
    FLOAT16_MAX_ABS_ERROR,
    FLOAT16_MAX_REL_ERROR,
    BatchAugmentation,
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
IMAGE_TOLERANCE = {"affine": 1e-5, "flip": 1e-6, "bias": 1e-6, "gamma": 1e-6, "noise": 1e-6}
CHAIN_TOLERANCE = 1e-5
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
    """float32 storage: isolates the augmentation's differences from the float16 rounding."""
    return DeviceVolumeCache.from_dataset(plain_set, "cpu", storage="float32")


def monai_items(frame: pd.DataFrame, aug: AugmentationConfig, epoch: int) -> list[dict]:
    """The augmented items of today's path (VolumeDataset + per-item MONAI) for ``epoch``."""
    dataset = VolumeDataset(frame, PREP, augmentation=aug, cache="memory", seed=SEED)
    dataset.set_epoch(epoch)
    return [dataset[i] for i in range(len(dataset))]


def device_batch(cache: DeviceVolumeCache, aug: AugmentationConfig, epoch: int, indices: list[int]):
    batch = cache.batch(indices)
    return BatchAugmentation(aug, SEED)(batch["image"], batch["mask"], indices, epoch)


def mask_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).float().mean().item()


# -------------------------------------------------------------------------------------- random streams


def test_draws_match_monai_for_many_triples():
    """Decisions and parameters drawn by BatchAugmentation == what MONAI's own __call__ drew and applied
    (the noise values are checked through the outputs in test_each_step_matches_volume_dataset[noise])."""
    shape = (6, 7, 5)
    fired = np.zeros(5, dtype=int)  # affine, flip, bias, gamma, noise
    triples = [
        (seed, epoch, index) for seed in (0, 42, 2**31 + 5) for epoch in range(5) for index in range(10)
    ]
    ours = {seed: BatchAugmentation(HALF, seed) for seed in (0, 42, 2**31 + 5)}
    for seed, epoch, index in triples:
        draw = ours[seed].draw([index], epoch, shape)
        compose = build_augmentation(HALF)
        compose.set_random_state(seed=int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0]))
        out = compose({"image": torch.rand(1, *shape), "mask": torch.ones(1, *shape), "index": index})
        affine, flip, bias, gamma, noise = compose.transforms[:5]

        assert (draw.affine[0] is not None) == bool(affine._do_transform)
        if affine._do_transform:
            applied = out["image"].applied_operations[0]["extra_info"]["extra_info"]["affine"]
            torch.testing.assert_close(draw.affine[0], applied.float(), rtol=0, atol=0)
        assert draw.flip[0] == bool(flip._do_transform)
        assert (draw.bias[0] is not None) == bool(bias._do_transform)
        if bias._do_transform:
            np.testing.assert_array_equal(
                draw.bias[0], device_data._legendre_coefficients(bias.rand_bias_field._coeff, 3)
            )
        assert (draw.gamma[0] is not None) == bool(gamma._do_transform)
        if gamma._do_transform:
            assert draw.gamma[0] == gamma.adjuster.gamma_value
        assert (draw.noise[0] is not None) == bool(noise._do_transform)
        fired += [
            draw.affine[0] is not None,
            draw.flip[0],
            draw.bias[0] is not None,
            draw.gamma[0] is not None,
            draw.noise[0] is not None,
        ]
    assert all(0 < n < len(triples) for n in fired), fired  # every step both fired and did not


def test_bias_field_matches_monai_polynomial():
    """Our separable Legendre evaluation == MONAI's leggrid3d field, for the same coefficients."""
    rng = np.random.default_rng(0)
    coeff = rng.uniform(0.0, 0.1, 20).tolist()
    reference = build_augmentation(ONE_STEP["bias"]).transforms[1].rand_bias_field
    expected = reference._generate_random_field(SHAPE, 3, coeff)
    coefficients = device_data._legendre_coefficients(coeff, 3)
    draw = device_data.BatchDraw(
        SHAPE, affine=[None], flip=[False], bias=[coefficients], gamma=[None], noise=[None]
    )
    ones = torch.full((1, 1, *SHAPE), 0.25)
    image, _ = BatchAugmentation(ONE_STEP["bias"], 0).apply(ones, torch.ones_like(ones), draw)
    torch.testing.assert_close(image[0, 0], torch.as_tensor(0.25 * np.exp(expected), dtype=torch.float32))


# ------------------------------------------------------------------------------ against VolumeDataset


@pytest.mark.parametrize("step", list(ONE_STEP))
def test_each_step_matches_volume_dataset(frame, cache32, step):
    aug, indices = ONE_STEP[step], list(range(len(cache32)))
    for epoch in (0, 3):
        expected = monai_items(frame, aug, epoch)
        images, masks = device_batch(cache32, aug, epoch, indices)
        for i in indices:
            assert not torch.equal(expected[i]["image"], cache32.images[i]), "the step must change the image"
            torch.testing.assert_close(images[i], expected[i]["image"], rtol=0, atol=IMAGE_TOLERANCE[step])
            assert mask_mismatch(masks[i], expected[i]["mask"]) <= 1e-3


def test_full_chain_matches_volume_dataset(frame, cache32):
    indices = list(range(len(cache32)))
    for epoch in range(4):
        expected = monai_items(frame, HALF, epoch)
        images, masks = device_batch(cache32, HALF, epoch, indices)
        for i in indices:
            beyond = (images[i] - expected[i]["image"]).abs() > CHAIN_TOLERANCE
            assert beyond.float().mean().item() <= 1e-4
            assert mask_mismatch(masks[i], expected[i]["mask"]) <= 1e-3


def test_device_batches_replay_the_dataloader(frame, cache32):
    """Same shuffled batches and the same augmented items as the training DataLoader over VolumeDataset."""
    dataset = VolumeDataset(frame, PREP, augmentation=HALF, cache="memory", seed=SEED)
    loader_generator, device_generator = torch.Generator(), torch.Generator()
    loader = DataLoader(
        dataset,
        batch_size=3,
        sampler=RandomSampler(dataset, generator=loader_generator),
        generator=loader_generator,
    )
    batches = DeviceBatches(
        cache32,
        BatchAugmentation(HALF, SEED),
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
            beyond = (got["image"] - expected["image"]).abs() > CHAIN_TOLERANCE
            assert beyond.float().mean().item() <= 1e-4
            assert mask_mismatch(got["mask"], expected["mask"]) <= 1e-3
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
    torch.testing.assert_close(alone[0], first[0][2], rtol=0, atol=1e-6)
    other_epochs = [device_batch(cache32, HALF, epoch, indices)[0] for epoch in (6, 7)]
    assert not any(torch.equal(first[0], other) for other in other_epochs)
    batch = cache32.batch(indices)
    other_seed, _ = BatchAugmentation(HALF, SEED + 1)(batch["image"], batch["mask"], indices, 5)
    assert not torch.equal(first[0], other_seed)


def test_background_stays_zero_and_outputs_in_range(cache32):
    aug = only(bias_field_prob=1.0, gamma_prob=1.0, noise_prob=1.0, noise_std=0.3)
    indices = list(range(len(cache32)))
    batch = cache32.batch(indices)
    images, masks = BatchAugmentation(aug, SEED)(batch["image"], batch["mask"], indices, 0)
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
    do, mildly) [measured 1.2 x 2**-12]."""
    cache16 = DeviceVolumeCache.from_dataset(plain_set, "cpu")
    aug = AugmentationConfig(affine_prob=1.0, bias_field_prob=1.0, gamma_prob=1.0, noise_prob=1.0)
    indices = list(range(len(cache32)))
    for epoch in range(3):
        exact, _ = device_batch(cache32, aug, epoch, indices)
        rounded, _ = device_batch(cache16, aug, epoch, indices)
        assert (exact - rounded).abs().max().item() <= 4 * FLOAT16_MAX_ABS_ERROR


def test_refuses_bad_inputs(frame, monkeypatch):
    augmented = VolumeDataset(frame, PREP, augmentation=AugmentationConfig(), cache="none")
    with pytest.raises(ValueError, match="without augmentation"):
        DeviceVolumeCache.from_dataset(augmented, "cpu")
    with pytest.raises(ValueError, match="uint8 masks"):
        DeviceVolumeCache(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="one shape"):
        DeviceVolumeCache(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 3, dtype=torch.uint8))

    def with_extra_step(aug):
        compose = build_augmentation(aug)
        compose.transforms = (*compose.transforms, compose.transforms[-1])
        return compose

    monkeypatch.setattr(device_data, "build_augmentation", with_extra_step)
    with pytest.raises(TypeError, match="update device_data.BatchAugmentation"):
        BatchAugmentation(AugmentationConfig(), 0)


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
