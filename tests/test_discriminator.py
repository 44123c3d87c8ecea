"""Tests for model.discriminator (PatchGAN, adversarial losses, adaptive weight)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.discriminator import (
    PatchDiscriminator3D,
    adaptive_adversarial_weight,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
)


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


def test_least_squares_losses() -> None:
    ones, zeros = torch.ones(2, 1, 3, 3, 3), torch.zeros(2, 1, 3, 3, 3)
    assert discriminator_adversarial_loss(ones, zeros, "least_squares").item() == 0.0
    assert discriminator_adversarial_loss(zeros, ones, "least_squares").item() == pytest.approx(1.0)
    assert generator_adversarial_loss(ones, "least_squares").item() == 0.0
    assert generator_adversarial_loss(zeros, "least_squares").item() == pytest.approx(1.0)
    fake = torch.tensor([0.0, 2.0])
    assert generator_adversarial_loss(fake).item() == pytest.approx(1.0)  # mean((-1)^2, 1^2)


def test_hinge_losses() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.5)
    assert discriminator_adversarial_loss(real, fake, "hinge").item() == pytest.approx(0.375)
    assert discriminator_adversarial_loss(torch.ones(4), -torch.ones(4), "hinge").item() == 0.0
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx(1.5)


def test_bad_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        generator_adversarial_loss(torch.zeros(1), "bce")
    with pytest.raises(ValueError, match="kind"):
        discriminator_adversarial_loss(torch.zeros(1), torch.zeros(1), "wgan")


def _tiny_decoder_losses() -> tuple[nn.Conv3d, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    body, last = nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(4, 1, 3, padding=1)
    disc = PatchDiscriminator3D(channels=4, num_layers=2)
    z, target = torch.randn(1, 2, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    recon = last(torch.relu(body(z)))
    recon_loss = (recon - target).abs().mean()
    adv_loss = generator_adversarial_loss(disc(recon), "hinge")
    return last, recon_loss, adv_loss


def test_adaptive_weight_matches_manual_ratio() -> None:
    last, recon_loss, adv_loss = _tiny_decoder_losses()
    w = adaptive_adversarial_weight(recon_loss, adv_loss, last.weight)
    assert w.ndim == 0 and not w.requires_grad and torch.isfinite(w) and w > 0
    g_rec = torch.autograd.grad(recon_loss, last.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last.weight, retain_graph=True)[0]
    assert w.item() == pytest.approx((g_rec.norm() / (g_adv.norm() + 1e-4)).item(), rel=1e-5)
    assert last.weight.grad is None  # the weight computation must not accumulate .grad
    (recon_loss + w * adv_loss).backward()  # graph still usable afterwards
    assert torch.isfinite(last.weight.grad).all()


def test_adaptive_weight_clamped() -> None:
    last, recon_loss, adv_loss = _tiny_decoder_losses()
    assert (
        adaptive_adversarial_weight(recon_loss, 1e-12 * adv_loss, last.weight, max_weight=3.0).item() == 3.0
    )


def test_adaptive_weight_bad_args() -> None:
    last, recon_loss, adv_loss = _tiny_decoder_losses()
    with pytest.raises(ValueError, match="max_weight"):
        adaptive_adversarial_weight(recon_loss, adv_loss, last.weight, max_weight=0)
    with pytest.raises(ValueError, match="require grad"):
        adaptive_adversarial_weight(recon_loss.detach(), adv_loss, last.weight)
    with pytest.raises(ValueError, match="scalar"):
        adaptive_adversarial_weight(recon_loss.expand(2), adv_loss, last.weight)
    with pytest.raises(ValueError, match="depend"):
        adaptive_adversarial_weight(recon_loss, adv_loss, nn.Conv3d(1, 1, 1).weight)
