"""Encoder and decoder of the MAISI-style KL-VAE (same layer order as MONAI's ``MaisiEncoder``/``MaisiDecoder``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from model.recompute import norm_act_conv
from model.resnet_blocks import Downsample, ResBlock, SpatialAttention, Upsample


def _run(block: nn.Module, x: torch.Tensor, use_checkpointing: bool) -> torch.Tensor:
    """Apply ``block``, under non-reentrant activation checkpointing when requested and grads are on."""
    if use_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class _Level(nn.Module):
    """One resolution level: ResNet blocks (each optionally followed by attention) and an optional resampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention: bool,
        norm_num_groups: int,
        norm_eps: float,
        resample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList()
        self.attentions = nn.ModuleList()
        for j in range(num_res_blocks):
            ch_in = in_channels if j == 0 else out_channels
            self.res_blocks.append(ResBlock(ch_in, out_channels, norm_num_groups, norm_eps))
            if attention:
                self.attentions.append(SpatialAttention(out_channels, norm_num_groups, norm_eps))
        self.resample = resample

    def forward(self, x: torch.Tensor, use_checkpointing: bool) -> torch.Tensor:
        for j, res_block in enumerate(self.res_blocks):
            x = _run(res_block, x, use_checkpointing)
            if self.attentions:
                x = _run(self.attentions[j], x, use_checkpointing)
        if self.resample is not None:
            x = _run(self.resample, x, use_checkpointing)
        return x


def _nonlocal_block(channels: int, norm_num_groups: int, norm_eps: float) -> nn.Sequential:
    """ResBlock -> spatial self-attention -> ResBlock at the lowest resolution (MAISI ``with_nonlocal_attn``)."""
    return nn.Sequential(
        ResBlock(channels, channels, norm_num_groups, norm_eps),
        SpatialAttention(channels, norm_num_groups, norm_eps),
        ResBlock(channels, channels, norm_num_groups, norm_eps),
    )


class Encoder(nn.Module):
    """Downsampling convolutional encoder.

    ``conv_in`` -> per level i: ``num_res_blocks[i]`` ResBlocks (+ attention if ``attention_levels[i]``) and a
    stride-2 downsampling on all levels but the last -> optional non-local block -> GroupNorm -> 3x3x3 conv to
    ``out_channels``. As in MAISI there is no SiLU between the final GroupNorm and convolution.
    ``channels``, ``num_res_blocks`` and ``attention_levels`` have one entry per level (a mismatch raises).

    Maps (B, in_channels, *S) with S divisible by 2**(len(channels)-1) to (B, out_channels, *S / 2**(L-1)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        num_res_blocks: Sequence[int],
        attention_levels: Sequence[bool],
        norm_num_groups: int,
        norm_eps: float,
        use_checkpointing: bool,
        with_nonlocal_attn: bool,
    ) -> None:
        super().__init__()
        self.use_checkpointing = use_checkpointing
        self.conv_in = nn.Conv3d(in_channels, channels[0], kernel_size=3, padding=1)
        self.levels = nn.ModuleList()
        ch_in = channels[0]
        for i, (ch_out, n_res, attention) in enumerate(
            zip(channels, num_res_blocks, attention_levels, strict=True)
        ):
            resample = None if i == len(channels) - 1 else Downsample(ch_out)
            self.levels.append(_Level(ch_in, ch_out, n_res, attention, norm_num_groups, norm_eps, resample))
            ch_in = ch_out
        self.nonlocal_block = (
            _nonlocal_block(channels[-1], norm_num_groups, norm_eps) if with_nonlocal_attn else None
        )
        self.norm_out = nn.GroupNorm(norm_num_groups, channels[-1], eps=norm_eps, affine=True)
        self.conv_out = nn.Conv3d(channels[-1], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *S) -> (B, C_out, *S / 2**(L-1))."""
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h, self.use_checkpointing)
        if self.nonlocal_block is not None:
            h = _run(self.nonlocal_block, h, self.use_checkpointing)
        return norm_act_conv(h, self.norm_out, self.conv_out, act=False)


class Decoder(nn.Module):
    """Upsampling convolutional decoder mirroring :class:`Encoder`.

    ``conv_in`` -> optional non-local block -> per level i (channels reversed): ``num_res_blocks`` ResBlocks
    (+ attention) and a x2 :class:`~model.resnet_blocks.Upsample` on all levels but the last -> GroupNorm ->
    3x3x3 conv to ``out_channels``. No SiLU before the output conv and no output activation (like MAISI).

    Maps (B, in_channels, *s) to (B, out_channels, *s * 2**(L-1)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        num_res_blocks: Sequence[int],
        attention_levels: Sequence[bool],
        norm_num_groups: int,
        norm_eps: float,
        use_checkpointing: bool,
        with_nonlocal_attn: bool,
        upsample_mode: str,
    ) -> None:
        super().__init__()
        self.use_checkpointing = use_checkpointing
        self.conv_in = nn.Conv3d(in_channels, channels[-1], kernel_size=3, padding=1)
        self.nonlocal_block = (
            _nonlocal_block(channels[-1], norm_num_groups, norm_eps) if with_nonlocal_attn else None
        )
        self.levels = nn.ModuleList()
        ch_in = channels[-1]
        for i, (ch_out, n_res, attention) in enumerate(
            zip(channels[::-1], num_res_blocks[::-1], attention_levels[::-1], strict=True)
        ):
            resample = None if i == len(channels) - 1 else Upsample(ch_out, upsample_mode)
            self.levels.append(_Level(ch_in, ch_out, n_res, attention, norm_num_groups, norm_eps, resample))
            ch_in = ch_out
        self.norm_out = nn.GroupNorm(norm_num_groups, channels[0], eps=norm_eps, affine=True)
        self.conv_out = nn.Conv3d(channels[0], out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C_latent, *s) -> (B, C_out, *s * 2**(L-1))."""
        h = self.conv_in(z)
        if self.nonlocal_block is not None:
            h = _run(self.nonlocal_block, h, self.use_checkpointing)
        for level in self.levels:
            h = level(h, self.use_checkpointing)
        return norm_act_conv(h, self.norm_out, self.conv_out, act=False)
