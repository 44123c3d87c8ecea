"""The whole VAE-GAN training loss in one module (after taming-transformers' ``LPIPSWithDiscriminator``).

Generator (VAE) loss per batch::

    recon + beta * KL + perceptual_weight * LPIPS3D  [+ adversarial_weight * lambda * adversarial]

* recon: mean over voxels of MSE (or L1);
* KL: :func:`kl_divergence` — KL(N(mu, sigma²) || N(0, 1)) **summed over latent elements**, averaged over the
  batch (the MONAI/MAISI convention, so their ``kl_weight`` values mean the same here);
* LPIPS3D: the frozen 3D perceptual distance (``model/lpips3D.py``), skipped when its weight is 0;
* adversarial (GAN stage only, i.e. when a discriminator is passed): the PatchGAN generator loss; ``lambda`` = 1
  or, with ``adaptive_weight``, the VQGAN adaptive weight :func:`adaptive_adversarial_weight`.

Discriminator loss: least-squares or hinge on the logits of real and (detached) reconstructed volumes.
Both :meth:`VAEGANLoss.generator` and :meth:`VAEGANLoss.discriminator` return ``(loss, logs)`` where ``logs``
are detached 0-dim tensors (no host synchronisation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from config import Config  # config.py imports metrics.py, which imports this module

AdversarialKind = Literal["least_squares", "hinge"]
_KINDS = ("least_squares", "hinge")


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) || N(0, 1)) per sample, summed over all latent elements.

    Args:
        mu, sigma: (B, C, *spatial).
    Returns:
        (B,) float32.
    """
    mu, sigma = mu.float(), sigma.float()
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 2.0 * torch.log(sigma) - 1.0)
    return kl.flatten(1).sum(1)


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")


def generator_adversarial_loss(
    fake_logits: torch.Tensor, kind: AdversarialKind = "least_squares"
) -> torch.Tensor:
    """Generator's adversarial loss on the discriminator's logits for generated volumes.

    Args:
        fake_logits: (B, 1, d, h, w) discriminator logits of reconstructions (any shape works).
        kind: ``"least_squares"`` (LSGAN, mean((fake - 1)^2)) or ``"hinge"`` (-mean(fake)).

    Returns:
        Scalar loss.
    """
    _check_kind(kind)
    if kind == "least_squares":
        return (fake_logits - 1.0).pow(2).mean()
    return -fake_logits.mean()


def discriminator_adversarial_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: AdversarialKind = "least_squares"
) -> torch.Tensor:
    """Discriminator loss, averaged over the real and fake terms.

    Args:
        real_logits: (B, 1, d, h, w) logits of real volumes.
        fake_logits: (B, 1, d, h, w) logits of generated volumes (detach them from the generator).
        kind: ``"least_squares"``: 0.5 (mean((real - 1)^2) + mean(fake^2));
            ``"hinge"``: 0.5 (mean(relu(1 - real)) + mean(relu(1 + fake))).

    Returns:
        Scalar loss; 0 for a perfect discriminator (LS: real = 1, fake = 0; hinge: real >= 1, fake <= -1).
    """
    _check_kind(kind)
    if kind == "least_squares":
        return 0.5 * ((real_logits - 1.0).pow(2).mean() + fake_logits.pow(2).mean())
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_adversarial_weight(
    recon_loss: torch.Tensor,
    adversarial_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """VQGAN adaptive weight balancing the adversarial against the reconstruction gradient.

    ``||d recon / d w|| / (||d adv / d w|| + 1e-4)``, clamped to [0, max_weight], where ``w`` is the
    decoder's last convolution weight. Both gradients are taken with ``retain_graph=True`` and do not
    populate ``.grad``, so the caller can still back-propagate the weighted total loss.

    Args:
        recon_loss: scalar reconstruction (e.g. MSE + perceptual) loss, connected to ``last_layer_weight``.
        adversarial_loss: scalar generator adversarial loss, connected to ``last_layer_weight``.
        last_layer_weight: the decoder's output-conv weight tensor (a leaf with requires_grad).
        max_weight: upper clamp (> 0).

    Returns:
        Detached 0-dim tensor.
    """
    if max_weight <= 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}.")
    if not last_layer_weight.requires_grad:
        raise ValueError("last_layer_weight must require grad.")
    norms = []
    for name, loss in (("recon_loss", recon_loss), ("adversarial_loss", adversarial_loss)):
        if loss.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(loss.shape)}.")
        if not loss.requires_grad:
            raise ValueError(f"{name} does not require grad (computed under no_grad or detached?).")
        (grad,) = torch.autograd.grad(loss, last_layer_weight, retain_graph=True, allow_unused=True)
        if grad is None:
            raise ValueError(f"{name} does not depend on last_layer_weight.")
        norms.append(torch.linalg.vector_norm(grad))
    weight = norms[0] / (norms[1] + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class VAEGANLoss(nn.Module):
    """Reconstruction + β·KL + perceptual (+ adversarial with a fixed or adaptive weight), and the GAN loss.

    Args:
        perceptual: frozen 3D perceptual network ``(recon, target) -> (B,)``; ignored when its weight is 0.
        recon_loss: ``"mse"`` or ``"l1"`` (mean over voxels).
        beta: weight of the KL term (KL summed over latent elements).
        perceptual_weight: weight of the perceptual term (0 switches it off).
        adversarial_weight: weight of the adversarial term in the GAN stage.
        adaptive_weight: multiply ``adversarial_weight`` by the VQGAN adaptive weight.
        adversarial_kind: ``"least_squares"`` or ``"hinge"``.
    """

    def __init__(
        self,
        perceptual: nn.Module | None,
        recon_loss: Literal["mse", "l1"] = "mse",
        beta: float = 1e-7,
        perceptual_weight: float = 0.3,
        adversarial_weight: float = 0.1,
        adaptive_weight: bool = True,
        adversarial_kind: AdversarialKind = "least_squares",
    ) -> None:
        super().__init__()
        if recon_loss not in ("mse", "l1"):
            raise ValueError(f"recon_loss must be 'mse' or 'l1', got {recon_loss!r}.")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual network.")
        _check_kind(adversarial_kind)
        self.perceptual = perceptual
        self.recon_criterion = F.mse_loss if recon_loss == "mse" else F.l1_loss
        self.beta = beta
        self.perceptual_weight = perceptual_weight
        self.adversarial_weight = adversarial_weight
        self.adaptive_weight = adaptive_weight
        self.adversarial_kind = adversarial_kind

    @classmethod
    def from_config(cls, config: Config, perceptual: nn.Module | None) -> VAEGANLoss:
        """The loss described by the config's ``train`` and ``discriminator`` sections."""
        train = config.train
        return cls(
            perceptual,
            recon_loss=train.recon_loss,
            beta=train.beta,
            perceptual_weight=train.perceptual_weight,
            adversarial_weight=train.adversarial_weight,
            adaptive_weight=train.adaptive_adversarial_weight,
            adversarial_kind=config.discriminator.loss,
        )

    def generator(
        self,
        images: torch.Tensor,
        recon: torch.Tensor,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        discriminator: nn.Module | None = None,
        last_layer_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The VAE's loss; the adversarial term only when ``discriminator`` is given (GAN stage).

        Args:
            images, recon: (B, C, D, H, W) targets and reconstructions.
            mu, sigma: (B, C_latent, d, h, w) posterior parameters.
            discriminator: the bare (not DDP-wrapped) discriminator; its parameters get no gradient here.
            last_layer_weight: the decoder's last conv weight (needed by the adaptive weight).
        Returns:
            (scalar loss, logs: recon, kl, perceptual, adversarial, adversarial_weight, loss — detached 0-dim).
        """
        recon_loss = self.recon_criterion(recon.float(), images.float())
        kl_loss = kl_divergence(mu, sigma).mean()
        perceptual_loss = (
            self.perceptual(recon, images).mean() if self.perceptual_weight > 0 else recon_loss.new_zeros(())
        )
        loss = recon_loss + self.beta * kl_loss + self.perceptual_weight * perceptual_loss
        adversarial_loss = adversarial_scale = recon_loss.new_zeros(())
        if discriminator is not None:
            discriminator.requires_grad_(False)
            adversarial_loss = generator_adversarial_loss(discriminator(recon.float()), self.adversarial_kind)
            discriminator.requires_grad_(True)
            adversarial_scale = recon_loss.new_tensor(self.adversarial_weight)
            if self.adaptive_weight:
                if last_layer_weight is None:
                    raise ValueError("the adaptive adversarial weight needs last_layer_weight.")
                adversarial_scale = adversarial_scale * adaptive_adversarial_weight(
                    recon_loss + self.perceptual_weight * perceptual_loss, adversarial_loss, last_layer_weight
                )
            loss = loss + adversarial_scale * adversarial_loss
        logs = {
            "loss": loss,
            "recon": recon_loss,
            "kl": kl_loss,
            "perceptual": perceptual_loss,
            "adversarial": adversarial_loss,
            "adversarial_weight": adversarial_scale,
        }
        return loss, {name: value.detach() for name, value in logs.items()}

    def discriminator(
        self, images: torch.Tensor, recon: torch.Tensor, discriminator: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss on real ``images`` and detached ``recon`` (B, C, D, H, W).

        One pass over real and fake together, so DDP reduces each parameter's gradient once.
        Returns (scalar loss, {"discriminator": detached loss}).
        """
        logits = discriminator(torch.cat([images.float(), recon.detach().float()]))
        real_logits, fake_logits = logits.chunk(2)
        loss = discriminator_adversarial_loss(real_logits, fake_logits, self.adversarial_kind)
        return loss, {"discriminator": loss.detach()}
