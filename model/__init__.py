"""The model package: the VAE, the discriminator and the 3D perceptual loss, built from a config.

This module is the one place that turns config sections into networks (checkpoint files: ``checkpoints.py``).
"""

from __future__ import annotations

from dataclasses import asdict

from config import DiscriminatorConfig, ModelConfig, PerceptualConfig
from model.discriminator import PatchDiscriminator3D
from model.lpips3D import LPIPS3D
from model.maisi_vae import MaisiVAE


def build_vae(model: ModelConfig, use_checkpointing: bool = False) -> MaisiVAE:
    """The VAE described by the config's ``model`` section (activation checkpointing is a training choice)."""
    arguments = {k: v for k, v in asdict(model).items() if k != "spatial_dims"}  # the model is 3-D only
    return MaisiVAE(**arguments, use_checkpointing=use_checkpointing)


def build_discriminator(discriminator: DiscriminatorConfig, in_channels: int) -> PatchDiscriminator3D:
    """The 3D PatchGAN described by the config's ``discriminator`` section."""
    return PatchDiscriminator3D(
        in_channels, discriminator.channels, discriminator.num_layers, discriminator.norm
    )


def build_perceptual_loss(perceptual: PerceptualConfig) -> LPIPS3D:
    """The frozen 3D LPIPS described by the config's ``perceptual`` section (never downloads anything)."""
    return LPIPS3D(backbone=perceptual.backbone, weights_path=perceptual.weights_path)
