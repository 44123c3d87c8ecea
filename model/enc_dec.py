"""Encoder and decoder of the MAISI-style KL-VAE (same layer order as MONAI's ``MaisiEncoder``/``MaisiDecoder``)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

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


class Tower(nn.Module):
    """The encoder (``upsample_mode`` None) or the decoder of the VAE, layer for layer MAISI's.

    ``conv_in`` -> per level i: ``num_res_blocks[i]`` ResBlocks (+ attention if ``attention_levels[i]``) and,
    on all levels but the last, a stride-2 :class:`~model.resnet_blocks.Downsample` (encoder) or a x2
    :class:`~model.resnet_blocks.Upsample` (decoder, whose levels run from the deepest) -> GroupNorm -> 3x3x3
    conv to ``out_channels``. The optional non-local block (ResBlock -> attention -> ResBlock, MAISI
    ``with_nonlocal_attn``) runs at the lowest resolution: after the encoder's levels, before the decoder's.
    As in MAISI there is no SiLU between the final GroupNorm and convolution, and no output activation.
    ``channels``, ``num_res_blocks`` and ``attention_levels`` have one entry per level (a mismatch raises).

    Maps (B, in_channels, *S) with S divisible by 2**(L-1) to (B, out_channels, *S / 2**(L-1)) (encoder), or
    (B, in_channels, *s) to (B, out_channels, *s * 2**(L-1)) (decoder).
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
        upsample_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.use_checkpointing = use_checkpointing
        self.is_decoder = upsample_mode is not None
        levels = list(zip(channels, num_res_blocks, attention_levels, strict=True))
        levels = levels[::-1] if self.is_decoder else levels  # the decoder's levels run from the deepest
        resampler = partial(Upsample, mode=upsample_mode) if self.is_decoder else Downsample
        deepest, norm = channels[-1], (norm_num_groups, norm_eps)
        self.conv_in = nn.Conv3d(in_channels, levels[0][0], kernel_size=3, padding=1)

        def nonlocal_block() -> nn.Sequential | None:
            if not with_nonlocal_attn:
                return None
            return nn.Sequential(
                ResBlock(deepest, deepest, *norm),
                SpatialAttention(deepest, *norm),
                ResBlock(deepest, deepest, *norm),
            )

        # built in layer order (the decoder's non-local block first): the initial weights depend on it
        if self.is_decoder:
            self.nonlocal_block = nonlocal_block()
        self.levels = nn.ModuleList()
        ch_in = levels[0][0]
        for i, (ch_out, n_res, attention) in enumerate(levels):
            resample = None if i == len(levels) - 1 else resampler(ch_out)
            self.levels.append(_Level(ch_in, ch_out, n_res, attention, *norm, resample))
            ch_in = ch_out
        if not self.is_decoder:
            self.nonlocal_block = nonlocal_block()
        self.norm_out = nn.GroupNorm(norm_num_groups, ch_in, eps=norm_eps, affine=True)
        self.conv_out = nn.Conv3d(ch_in, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *S) -> (B, C_out, *S / 2**(L-1)) (encoder) or (B, C_out, *S * 2**(L-1)) (decoder)."""
        h = self.conv_in(x)
        if self.is_decoder and self.nonlocal_block is not None:
            h = _run(self.nonlocal_block, h, self.use_checkpointing)
        for level in self.levels:
            h = level(h, self.use_checkpointing)
        if not self.is_decoder and self.nonlocal_block is not None:
            h = _run(self.nonlocal_block, h, self.use_checkpointing)
        return norm_act_conv(h, self.norm_out, self.conv_out, act=False)
