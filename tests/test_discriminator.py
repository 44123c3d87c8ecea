"""Tests for model.discriminator (the 3D PatchGAN; its losses are tested in test_losses.py)."""

from __future__ import annotations

import pytest
import torch

from model.discriminator import PatchDiscriminator3D


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_output_shape_and_features(norm: str) -> None:
    disc = PatchDiscriminator3D(in_channels=1, channels=8, num_layers=3, norm=norm)
    x = torch.randn(2, 1, 32, 32, 32)
    logits = disc(x)
    assert logits.shape == (2, 1, 2, 2, 2)
    logits2, feats = disc(x, return_features=True)
    assert torch.allclose(logits, logits2)
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]
    assert [f.shape[2] for f in feats] == [16, 8, 4, 3]


def test_channel_cap_and_grad() -> None:
    disc = PatchDiscriminator3D(in_channels=2, channels=4, num_layers=5, kernel_size=3)
    _, feats = disc(torch.randn(1, 2, 64, 64, 64), return_features=True)
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32, 32, 32]
    x = torch.randn(1, 2, 64, 64, 64, requires_grad=True)
    disc(x).mean().backward()
    assert torch.isfinite(x.grad).all()


def test_non_cubic_input() -> None:
    out = PatchDiscriminator3D(channels=4)(torch.randn(1, 1, 40, 48, 40))
    assert out.shape == (1, 1, 3, 4, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "group"},
        {"num_layers": 0},
        {"channels": 0},
        {"kernel_size": 1},
        {"in_channels": 1.5},
    ],
)
def test_bad_constructor_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PatchDiscriminator3D(**kwargs)


def test_bad_input_rank() -> None:
    with pytest.raises(ValueError):
        PatchDiscriminator3D()(torch.randn(1, 1, 32, 32))
