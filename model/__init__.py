"""The model package: the VAE, the discriminator and the 3D perceptual loss, built from a config.

This module is the one place that turns config sections into networks (checkpoint files: ``checkpoints.py``).
"""

from __future__ import annotations

from config import DiscriminatorConfig, ModelConfig, PerceptualConfig
from model.discriminator import PatchDiscriminator3D
from model.lpips3D import LPIPS3D
from model.maisi_vae import MaisiVAE

__all__ = [
    "LPIPS3D",
    "MaisiVAE",
    "PatchDiscriminator3D",
    "build_discriminator",
    "build_perceptual_loss",
    "build_vae",
]


def build_vae(model: ModelConfig, use_checkpointing: bool = False) -> MaisiVAE:
    """The VAE described by the config's ``model`` section (activation checkpointing is a training choice)."""
    return MaisiVAE(
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        channels=tuple(model.channels),
        latent_channels=model.latent_channels,
        num_res_blocks=tuple(model.num_res_blocks),
        attention_levels=tuple(model.attention_levels),
        norm_num_groups=model.norm_num_groups,
        norm_eps=model.norm_eps,
        with_encoder_nonlocal_attn=model.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=model.with_decoder_nonlocal_attn,
        use_checkpointing=use_checkpointing,
        upsample_mode=model.upsample_mode,
    )


def build_discriminator(discriminator: DiscriminatorConfig, in_channels: int) -> PatchDiscriminator3D:
    """The 3D PatchGAN described by the config's ``discriminator`` section."""
    return PatchDiscriminator3D(
        in_channels=in_channels,
        channels=discriminator.channels,
        num_layers=discriminator.num_layers,
        norm=discriminator.norm,
    )


def build_perceptual_loss(perceptual: PerceptualConfig) -> LPIPS3D:
    """The frozen 3D LPIPS described by the config's ``perceptual`` section (never downloads anything)."""
    return LPIPS3D(backbone=perceptual.backbone, weights_path=perceptual.weights_path)
