"""The model package: the VAE, the discriminator and the 3D perceptual loss, built from a config.

This module is the one place that turns config sections into networks and checkpoints into a ready VAE.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from config import Config, ConfigError, DiscriminatorConfig, ModelConfig, PerceptualConfig
from model.discriminator import PatchDiscriminator3D
from model.lpips3D import LPIPS3D
from model.maisi_vae import MaisiVAE, convert_maisi_state_dict
from utils import CheckpointError, load_checkpoint

__all__ = [
    "CHECKPOINT_FORMAT",
    "LPIPS3D",
    "MaisiVAE",
    "PatchDiscriminator3D",
    "build_discriminator",
    "build_perceptual_loss",
    "build_vae",
    "inference_checkpoint",
    "load_vae",
    "model_config_differences",
]

CHECKPOINT_FORMAT = "brain-vae3d/1"


def build_vae(model: ModelConfig, use_checkpointing: bool = False) -> MaisiVAE:
    """The VAE described by the config's ``model`` section (activation checkpointing is a training choice)."""
    return MaisiVAE(
        spatial_dims=model.spatial_dims,
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


def inference_checkpoint(
    vae: MaisiVAE,
    config: Config,
    latent_stats: dict[str, Any] | None,
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The self-contained checkpoint that ``infer.py`` and ``save_latent.py`` need (``best_model.pt``).

    Holds the VAE weights, the effective config (model + preprocessing), the latent statistics
    (per-channel mean/std, ``scale_factor``) and metrics; loads with ``torch.load(weights_only=True)``.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "vae": vae.state_dict(),
        "latent_stats": latent_stats,
        "metrics": metrics or {},
        **extra,
    }


def model_config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable ``key: saved → current`` lines for every model key that differs."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{key}: {saved.get(key)!r} → {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


def _load_state(vae: MaisiVAE, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` with an error that names the missing, unexpected and mis-shaped keys."""
    own = vae.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{key}: {tuple(state_dict[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state_dict))
        if own[key].shape != state_dict[key].shape
    ]
    if missing or unexpected or mismatched:

        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" … (+{len(items) - 8} more)" if len(items) > 8 else "")

        raise CheckpointError(
            f"{source} does not fit the model config: "
            + "; ".join(
                part
                for part in (
                    f"missing keys [{head(missing)}]" if missing else "",
                    f"unexpected keys [{head(unexpected)}]" if unexpected else "",
                    f"shape mismatches [{head(mismatched)}]" if mismatched else "",
                )
                if part
            )
        )
    vae.load_state_dict(state_dict)


def load_vae(
    path: str | Path,
    device: torch.device | str = "cpu",
    maisi_model: ModelConfig | None = None,
) -> tuple[MaisiVAE, Config, dict[str, Any]]:
    """Load a VAE for inference from one of our checkpoints, or from a MAISI state dict.

    Args:
        path: our checkpoint (``last.pt`` or ``best_model.pt``: weights + config + latent statistics), or a
            MONAI ``AutoencoderKlMaisi`` state dict (e.g. NVIDIA's ``autoencoder_v1.pt``).
        maisi_model: the model config of a MAISI state dict (it carries none); ignored for our checkpoints.
    Returns:
        (vae in eval mode on ``device``, the effective config, the raw checkpoint dict).
    """
    checkpoint = load_checkpoint(path)
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        config = Config.from_dict(checkpoint["config"])
        vae = build_vae(config.model)
        _load_state(vae, checkpoint["vae"], str(path))
    elif all(isinstance(value, torch.Tensor) for value in checkpoint.values()) or "state_dict" in checkpoint:
        if maisi_model is None:
            raise ConfigError(
                f"{path} is a bare state dict (MAISI layout?): give its model config "
                "(e.g. infer.py --maisi_channels 64 128 256 --maisi_num_res_blocks 2 2 2)"
            )
        config = Config(model=maisi_model)
        vae = build_vae(maisi_model)
        _load_state(vae, convert_maisi_state_dict(checkpoint), f"{path} (converted from the MAISI layout)")
    else:
        raise CheckpointError(
            f"{path} is neither a brain-vae3d checkpoint (format {CHECKPOINT_FORMAT!r}) nor a state dict"
        )
    return vae.to(device).eval(), config, checkpoint
