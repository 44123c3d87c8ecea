"""Tests for model.discriminator (the 3D PatchGAN; its losses are tested in test_losses.py)."""

from __future__ import annotations

import pytest
import torch

from model.discriminator import PatchDiscriminator3D


def _block_outputs(disc: PatchDiscriminator3D, x: torch.Tensor) -> list[torch.Tensor]:
    """The activations after every block, (B, C_i, d_i, h_i, w_i)."""
    features = []
    for block in disc.blocks:
        x = block(x)
        features.append(x)
    return features


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_output_shape_and_block_layout(norm: str) -> None:
    disc = PatchDiscriminator3D(in_channels=1, channels=8, num_layers=3, norm=norm)
    x = torch.randn(2, 1, 32, 32, 32)
    assert disc(x).shape == (2, 1, 2, 2, 2)
    feats = _block_outputs(disc, x)
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]
    assert [f.shape[2] for f in feats] == [16, 8, 4, 3]


def test_channel_cap_and_grad() -> None:
    disc = PatchDiscriminator3D(in_channels=2, channels=4, num_layers=4)
    feats = _block_outputs(disc, torch.randn(1, 2, 64, 64, 64))
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32, 32]
    x = torch.randn(1, 2, 64, 64, 64, requires_grad=True)
    disc(x).mean().backward()
    assert torch.isfinite(x.grad).all()


def test_non_cubic_input() -> None:
    out = PatchDiscriminator3D(channels=4)(torch.randn(1, 1, 40, 48, 40))
    assert out.shape == (1, 1, 3, 4, 3)


@pytest.mark.parametrize("kwargs", [{"norm": "group"}, {"num_layers": 0}])
def test_layout_it_cannot_build_raises_without_a_config(kwargs: dict) -> None:
    """Built directly (the config checks its values first), the discriminator still refuses what it cannot build."""
    with pytest.raises(ValueError, match="num_layers >= 1 and norm in"):
        PatchDiscriminator3D(**kwargs)


def test_bad_input_rank() -> None:
    with pytest.raises(ValueError):
        PatchDiscriminator3D()(torch.randn(1, 1, 32, 32))
