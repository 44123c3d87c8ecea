"""losses.py on its own: the VAE-GAN loss terms, the KL convention, the adaptive weight, each term switchable."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import Config
from losses import (
    VAEGANLoss,
    adaptive_adversarial_weight,
    discriminator_adversarial_loss,
    generator_adversarial_loss,
    kl_divergence,
)
from model.discriminator import PatchDiscriminator3D


class CountingPerceptual(nn.Module):
    """A stand-in perceptual distance, (B,) = mean squared difference per sample; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (recon - target).pow(2).flatten(1).mean(1)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny decoder (one conv) whose output is the reconstruction, with targets and a posterior."""
    torch.manual_seed(seed)
    last = nn.Conv3d(2, 1, 3, padding=1)
    features = torch.randn(2, 2, 16, 16, 16)
    return {
        "last": last,
        "images": torch.rand(2, 1, 16, 16, 16),
        "recon": last(features),
        "mu": torch.randn(2, 4, 4, 4, 4),
        "sigma": torch.rand(2, 4, 4, 4, 4) + 0.5,
    }


def test_kl_is_zero_for_the_standard_normal():
    mu, sigma = torch.zeros(3, 4, 2, 3, 2), torch.ones(3, 4, 2, 3, 2)
    assert kl_divergence(mu, sigma).tolist() == [0.0, 0.0, 0.0]


def test_kl_closed_form_summed_over_elements():
    mu = torch.tensor([[[1.0, 0.0]], [[-2.0, 0.0]]])  # (B=2, C=1, 2)
    sigma = torch.tensor([[[1.0, 2.0]], [[0.5, 1.0]]])
    # 0.5 * (mu^2 + sigma^2 - ln sigma^2 - 1) per element, summed per sample
    first = 0.5 * (1 + 1 - 0 - 1) + 0.5 * (0 + 4 - math.log(4) - 1)
    second = 0.5 * (4 + 0.25 - math.log(0.25) - 1) + 0.0
    kl = kl_divergence(mu, sigma)
    assert kl.shape == (2,) and kl.dtype == torch.float32
    assert kl.tolist() == pytest.approx([first, second], rel=1e-6)
    normal = torch.distributions.Normal
    oracle = torch.distributions.kl_divergence(normal(mu, sigma), normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(kl, oracle)


def test_kl_convention_sum_over_latent_elements_mean_over_batch():
    b = _batch()
    loss = VAEGANLoss(None, perceptual_weight=0.0, beta=1e-3)
    total, logs = loss.generator(b["images"], b["recon"], b["mu"], b["sigma"])
    expected_kl = kl_divergence(b["mu"], b["sigma"]).mean()
    assert logs["kl"].item() == pytest.approx(expected_kl.item(), rel=1e-6)
    assert total.item() == pytest.approx(
        F.mse_loss(b["recon"], b["images"]).item() + 1e-3 * expected_kl.item(), rel=1e-5
    )


def test_each_generator_term_is_switchable():
    b = _batch()
    perceptual = CountingPerceptual()
    disc = PatchDiscriminator3D(channels=4, num_layers=2)
    full = VAEGANLoss(perceptual, recon_loss="l1", beta=1e-6, perceptual_weight=0.5, adaptive_weight=False)
    total, logs = full.generator(b["images"], b["recon"], b["mu"], b["sigma"], discriminator=disc)
    assert perceptual.calls == 1
    assert logs["recon"].item() == pytest.approx(F.l1_loss(b["recon"], b["images"]).item(), rel=1e-6)
    assert logs["adversarial_weight"].item() == pytest.approx(0.1)  # fixed weight: exactly the setting
    assert logs["adversarial"].item() > 0
    expected = logs["recon"] + 1e-6 * logs["kl"] + 0.5 * logs["perceptual"] + 0.1 * logs["adversarial"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(not value.requires_grad for value in logs.values())
    assert all(p.requires_grad for p in disc.parameters())  # frozen only while the generator term runs

    off = VAEGANLoss(perceptual, perceptual_weight=0.0)
    total, logs = off.generator(b["images"], b["recon"], b["mu"], b["sigma"])  # pretraining: no discriminator
    assert perceptual.calls == 1  # weight 0: the perceptual network is not run
    assert logs["perceptual"].item() == 0 and logs["adversarial"].item() == 0
    assert logs["adversarial_weight"].item() == 0
    with pytest.raises(ValueError, match="perceptual network"):
        VAEGANLoss(None, perceptual_weight=0.3)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    b = _batch()
    perceptual = CountingPerceptual()
    disc = PatchDiscriminator3D(channels=4, num_layers=2)
    loss = VAEGANLoss(perceptual, perceptual_weight=0.3, adversarial_weight=0.2, adaptive_weight=True)
    total, logs = loss.generator(
        b["images"], b["recon"], b["mu"], b["sigma"], discriminator=disc, last_layer_weight=b["last"].weight
    )
    weight = b["last"].weight
    nll = F.mse_loss(b["recon"], b["images"]) + 0.3 * perceptual(b["recon"], b["images"]).mean()
    disc.requires_grad_(False)
    adversarial = generator_adversarial_loss(disc(b["recon"]))
    (g_nll,) = torch.autograd.grad(nll, weight, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adversarial, weight, retain_graph=True)
    ratio = (g_nll.norm() / (g_adv.norm() + 1e-4)).item()
    assert logs["adversarial_weight"].item() == pytest.approx(0.2 * ratio, rel=1e-4)
    assert weight.grad is None  # computing the weight does not populate .grad
    total.backward()
    assert torch.isfinite(weight.grad).all()
    with pytest.raises(ValueError, match="last_layer_weight"):
        loss.generator(b["images"], b["recon"], b["mu"], b["sigma"], discriminator=disc)


def test_discriminator_loss_on_real_and_detached_fake():
    b = _batch()
    disc = PatchDiscriminator3D(channels=4, num_layers=2)
    loss = VAEGANLoss(None, perceptual_weight=0.0, adversarial_kind="hinge")
    value, logs = loss.discriminator(b["images"], b["recon"], disc)
    expected = discriminator_adversarial_loss(disc(b["images"]), disc(b["recon"].detach()), "hinge")
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["discriminator"].item() == pytest.approx(value.item())
    value.backward()
    assert b["last"].weight.grad is None  # no gradient reaches the VAE
    assert all(p.grad is not None for p in disc.parameters())


def test_from_config_maps_the_train_section():
    config = Config.from_dict(
        {
            "train": {
                "recon_loss": "l1",
                "beta": 1e-6,
                "perceptual_weight": 0.0,
                "adversarial_weight": 0.5,
                "adaptive_adversarial_weight": False,
            },
            "discriminator": {"loss": "hinge"},
        }
    )
    loss = VAEGANLoss.from_config(config, None)
    assert loss.recon_criterion is F.l1_loss and loss.beta == 1e-6 and loss.perceptual_weight == 0.0
    assert loss.adversarial_weight == 0.5 and not loss.adaptive_weight and loss.adversarial_kind == "hinge"


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
