"""MAISI-style 3D KL-VAE that accepts any input size, loads MONAI/NVIDIA MAISI weights, and trains leaner."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.enc_dec import Tower


class MaisiVAE(nn.Module):
    """KL-regularised autoencoder with the architecture of MONAI's ``AutoencoderKlMaisi``.

    Layer for layer the same network as MAISI (``num_splits=1``, fp32 GroupNorm), so released MAISI weights load
    through :func:`convert_maisi_state_dict`; the GroupNorm/SiLU/resampling prologues of every convolution are
    recomputed in backward instead of stored (see :mod:`model.recompute`), which lowers training memory.

    Size rule: with ``f = downsample_factor = 2 ** (len(channels) - 1)``, an input of spatial shape ``S`` is
    zero-padded at the END (high side) of each spatial axis to ``ceil(S / f) * f`` inside the model; the latent has
    shape ``ceil(S / f)`` per axis (``latent_shape``) and the decoded output is cropped back to ``S``. E.g. with
    3 levels, 91x109x91 -> latent 23x28x23 -> 91x109x91. (MONAI instead silently returns 88x108x88.)

    Convolution weights are stored channels-last (``channels_last_3d``), so activations run in that memory format
    whatever the input's layout (outputs come back in it; values are unaffected): oneDNN/cuDNN then convolve
    without layout reorders, which on CPU measured ~15% faster and ~15% leaner per training step than NCDHW.

    As in MONAI, the log-sigma head predicts a log-variance: ``sigma = exp(clamp(logvar, -30, 20) / 2)``.

    Argument values are checked where they come from, the ``model`` section of the config (``config.py``);
    built directly, per-level lists of the wrong length, channels that ``norm_num_groups`` does not divide and
    (with two or more levels) an unknown ``upsample_mode`` still raise ``ValueError``, from the layers using them.

    Args:
        channels: feature channels per level; each must be divisible by ``norm_num_groups``.
        num_res_blocks: ResNet blocks per level (each >= 1).
        attention_levels: spatial self-attention after each ResNet block of a level.
        with_encoder_nonlocal_attn: ResBlock + attention + ResBlock at the end of the encoder.
        with_decoder_nonlocal_attn: ResBlock + attention + ResBlock at the start of the decoder.
        use_checkpointing: activation checkpointing per ResNet block / attention / resampling layer.
        upsample_mode: "trilinear" (interpolation + conv, MAISI's default) or "transposed" (transposed conv).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        latent_channels: int = 4,
        num_res_blocks: Sequence[int] = (1, 1, 1),
        attention_levels: Sequence[bool] = (False, False, False),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        with_encoder_nonlocal_attn: bool = False,
        with_decoder_nonlocal_attn: bool = False,
        use_checkpointing: bool = False,
        upsample_mode: str = "trilinear",
    ) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channels) - 1)
        levels = (channels, num_res_blocks, attention_levels, norm_num_groups, norm_eps, use_checkpointing)
        self.encoder = Tower(in_channels, latent_channels, *levels, with_encoder_nonlocal_attn)
        self.mu_head = nn.Conv3d(latent_channels, latent_channels, kernel_size=1)
        self.logvar_head = nn.Conv3d(latent_channels, latent_channels, kernel_size=1)
        self.post_quant_conv = nn.Conv3d(latent_channels, latent_channels, kernel_size=1)
        self.decoder = Tower(
            latent_channels, out_channels, *levels, with_decoder_nonlocal_attn, upsample_mode
        )
        self.to(memory_format=torch.channels_last_3d)

    @property
    def last_decoder_layer_weight(self) -> torch.Tensor:
        """Weight of the final output convolution (for the VQGAN adaptive adversarial weight)."""
        return self.decoder.conv_out.weight

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Latent spatial shape ``ceil(s / downsample_factor)`` per axis for an input of ``spatial_shape``."""
        return tuple(math.ceil(s / self.downsample_factor) for s in spatial_shape)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode (B, C_in, D, H, W) into ``mu`` and ``sigma``, each (B, latent_channels, *latent_shape((D, H, W)))."""
        if x.dim() != 5:
            raise ValueError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}.")
        pad = [-s % self.downsample_factor for s in x.shape[2:]]  # up to a multiple of the factor
        if any(pad):
            x = F.pad(x, [amount for p in reversed(pad) for amount in (0, p)])
        h = self.encoder(x)
        mu = self.mu_head(h)
        logvar = torch.clamp(self.logvar_head(h), -30.0, 20.0)
        return mu, torch.exp(logvar / 2)

    @staticmethod
    def sample(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Reparameterised sample ``mu + sigma * eps``, ``eps ~ N(0, I)``; same shape as ``mu``."""
        return mu + sigma * torch.randn_like(sigma)

    def decode(self, z: torch.Tensor, spatial_shape: Sequence[int] | None = None) -> torch.Tensor:
        """Decode (B, latent_channels, d, h, w) into (B, C_out, *(d, h, w) * downsample_factor).

        If ``spatial_shape`` is given, the output is cropped to it (the inverse of the padding in :meth:`encode`).
        """
        out = self.decoder(self.post_quant_conv(z))
        if spatial_shape is not None:
            if any(t > s for t, s in zip(spatial_shape, out.shape[2:], strict=True)):
                raise ValueError(
                    f"spatial_shape {tuple(spatial_shape)} exceeds decoded shape {tuple(out.shape[2:])}."
                )
            out = out[(..., *(slice(0, s) for s in spatial_shape))]
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, C_in, *S) -> (reconstruction (B, C_out, *S) from a sampled z, mu, sigma); S = (D, H, W)."""
        mu, sigma = self.encode(x)
        return self.decode(self.sample(mu, sigma), x.shape[2:]), mu, sigma

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction ``decode(mu)``, (B, C_out, *S)."""
        mu, _ = self.encode(x)
        return self.decode(mu, x.shape[2:])

    @classmethod
    def from_maisi_state_dict(cls, state_dict: Mapping[str, Any], **config: Any) -> MaisiVAE:
        """Build a model with ``config`` and load a MONAI ``AutoencoderKlMaisi`` state dict (strictly)."""
        model = cls(**config)
        model.load_state_dict(convert_maisi_state_dict(state_dict))
        return model


# MAISI's kinds of block: (a key prefix that marks the kind, the pattern every key of the block must match),
# in the order they are told apart. MAISI wraps every conv in MaisiConvolution(Convolution(nn.Conv)):
# ".conv.conv." before weight/bias.
_BLOCK_KINDS = {
    "res": ("norm1", r"(norm1|norm2|conv1|conv2|nin_shortcut)\.(?:conv\.conv\.)?(weight|bias)"),
    "resample": ("conv.conv.conv.", r"conv\.conv\.conv\.(weight|bias)"),
    "conv": ("conv.conv.", r"conv\.conv\.(weight|bias)"),
    "norm": ("", r"(weight|bias)"),
}
_WRAPPERS = re.compile(r"(conv\.)+(?=(weight|bias)$)")  # conv1.conv.conv.weight -> conv1.weight


def _block_kind(block: Mapping[str, torch.Tensor], where: str) -> str:
    keys = list(block)
    if any(re.match(r"^(to_q|to_k|to_v|proj_attn|attn|qkv|out_proj)", k) or ".attn" in k for k in keys):
        raise NotImplementedError(
            f"{where}: converting MAISI attention blocks is not supported (keys {keys})."
        )
    if any(k.startswith("norm1") for k in keys) and any(k.startswith("conv1.conv.weight") for k in keys):
        raise NotImplementedError(
            f"{where}: converting MAISI non-local (AEKLResBlock) blocks is not supported."
        )
    kind = next(kind for kind, (prefix, _) in _BLOCK_KINDS.items() if any(k.startswith(prefix) for k in keys))
    unknown = [k for k in keys if not re.fullmatch(_BLOCK_KINDS[kind][1], k)]
    if unknown:
        raise ValueError(f"{where}: unexpected keys for a MAISI {kind} block: {unknown}.")
    return kind


def _convert_tower(state_dict: Mapping[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """Map ``encoder.blocks.*`` / ``decoder.blocks.*`` (MAISI's flat block list) to our nested names."""
    numbered: dict[int, dict[str, torch.Tensor]] = {}  # i -> {rest: tensor} of <tower>.blocks.<i>.<rest>
    for key, value in state_dict.items():
        if match := re.match(rf"^{tower}\.blocks\.(\d+)\.(.+)$", key):
            numbered.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if sorted(numbered) != list(range(len(numbered))):
        raise ValueError(f"{tower}.blocks indices are not contiguous: {sorted(numbered)}.")
    blocks = [numbered[i] for i in range(len(numbered))]
    kinds = [_block_kind(b, f"{tower}.blocks.{i}") for i, b in enumerate(blocks)]
    if len(kinds) < 4 or kinds[0] != "conv" or kinds[-2:] != ["norm", "conv"]:
        raise ValueError(f"{tower}: unexpected MAISI block layout {kinds}.")
    names, level, res_index = [f"{tower}.conv_in"], 0, 0
    for i, kind in enumerate(kinds[1:-2], start=1):
        if kind == "res":
            names.append(f"{tower}.levels.{level}.res_blocks.{res_index}")
            res_index += 1
        elif kind == "resample":
            names.append(f"{tower}.levels.{level}.resample.conv")
            level, res_index = level + 1, 0
        else:
            raise ValueError(f"{tower}.blocks.{i}: unexpected {kind} block inside the levels ({kinds}).")
    names += [f"{tower}.norm_out", f"{tower}.conv_out"]
    return {
        f"{name}.{_WRAPPERS.sub('', key).replace('nin_shortcut', 'shortcut')}": value
        for name, block in zip(names, blocks, strict=True)
        for key, value in block.items()
    }


def convert_maisi_state_dict(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Convert a MONAI ``AutoencoderKlMaisi`` state dict (e.g. NVIDIA's ``autoencoder_v1.pt``) to :class:`MaisiVAE`.

    Accepts a bare state dict or one wrapped under ``"state_dict"`` / ``"unet_state_dict"``, and strips
    ``"module."`` (DataParallel/DDP) prefixes. The model configuration is implied by the keys (levels, blocks
    per level, channels); build ``MaisiVAE`` with the matching configuration and ``load_state_dict`` the result
    (strict loading then names any mismatch). MAISI attention / non-local blocks raise ``NotImplementedError``.

    Raises:
        ValueError: naming keys that are not part of a MAISI autoencoder layout.
    """
    for wrapper in ("state_dict", "unet_state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    out = {**_convert_tower(state_dict, "encoder"), **_convert_tower(state_dict, "decoder")}
    heads = {
        "quant_conv_mu": "mu_head",
        "quant_conv_log_sigma": "logvar_head",
        "post_quant_conv": "post_quant_conv",
    }
    unknown = []
    for key, value in state_dict.items():
        if key.startswith(("encoder.blocks.", "decoder.blocks.")):
            continue
        match = re.match(r"^(\w+)\.conv\.(weight|bias)$", key)
        if match and match.group(1) in heads:
            out[f"{heads[match.group(1)]}.{match.group(2)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys not in a MAISI AutoencoderKlMaisi layout: {unknown}.")
    missing = [f"{h}.conv.weight" for h in heads if f"{heads[h]}.weight" not in out]
    if missing:
        raise ValueError(f"MAISI state dict is missing keys: {missing}.")
    return out
