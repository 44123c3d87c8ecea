"""Building blocks of the MAISI-style KL-VAE: ResNet block, down/upsampling and spatial attention.

The cheap prologue of each convolution (GroupNorm/SiLU, zero pad, trilinear upsampling) runs through
:mod:`model.recompute`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.recompute import norm_act_conv, recomputed_input_conv


class ResBlock(nn.Module):
    """MAISI/MONAI ResNet block: ``x + conv2(silu(gn2(conv1(silu(gn1(x))))))``.

    A 1x1 convolution maps the shortcut when ``in_channels != out_channels``. Parameter names
    (``norm1``, ``conv1``, ``norm2``, ``conv2``, ``shortcut``) are those of MONAI's ``AEKLResBlock`` with the
    ``Convolution`` wrappers stripped. ``norm_num_groups`` must divide C_in = ``in_channels`` and
    C_out = ``out_channels``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps, affine=True)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps, affine=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (
            nn.Conv3d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, C_out, D, H, W)."""
        h = norm_act_conv(x, self.norm1, self.conv1)
        h = norm_act_conv(h, self.norm2, self.conv2)
        # conv2's output is not saved by any backward, so the residual sum may reuse its buffer.
        return h.add_(self.shortcut(x))


def _pad_high(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad one voxel at the high end of each of the three spatial axes (MONAI ``AsymmetricPad``)."""
    return F.pad(x, (0, 1) * 3)


class Downsample(nn.Module):
    """Stride-2 3x3x3 convolution after a one-voxel zero pad at the high end (MAISI ``MaisiDownsample``).

    Maps (B, C, *S) with even S to (B, C, *S/2); the padded copy is recomputed in backward instead of stored.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *ceil((S - 1) / 2))."""
        return recomputed_input_conv(_pad_high, False, self.conv, x)


def _upsample_x2(x: torch.Tensor) -> torch.Tensor:
    """x2 trilinear interpolation with ``align_corners=False`` (MAISI ``MaisiUpsample``)."""
    return F.interpolate(x, scale_factor=2.0, mode="trilinear")


class Upsample(nn.Module):
    """x2 upsampling: trilinear interpolation + 3x3x3 conv (``mode="trilinear"``, MAISI's default; the
    upsampled tensor is recomputed in backward instead of stored), or a stride-2 transposed convolution
    (``mode="transposed"``, kernel 3, padding 1, output padding 1 like MONAI).

    Maps (B, C, *S) to (B, C, *2S).
    """

    def __init__(self, channels: int, mode: str = "trilinear") -> None:
        super().__init__()
        if mode == "trilinear":
            self.conv: nn.Module = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        elif mode == "transposed":
            self.conv = nn.ConvTranspose3d(
                channels, channels, kernel_size=3, stride=2, padding=1, output_padding=1
            )
        else:
            raise ValueError(f"upsample_mode must be 'trilinear' or 'transposed', got {mode!r}.")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *2S)."""
        if self.mode == "transposed":
            return self.conv(x)
        return recomputed_input_conv(_upsample_x2, False, self.conv, x)


class SpatialAttention(nn.Module):
    """Single-head self-attention over all voxels with a residual connection (MONAI ``SpatialAttentionBlock``
    with ``include_fc=False`` semantics): ``x + proj(softmax(q k^T / sqrt(C)) v)`` on GroupNorm(x).

    Uses ``F.scaled_dot_product_attention`` (memory-efficient kernels). Maps (B, C, *S) to (B, C, *S).
    """

    def __init__(self, channels: int, norm_num_groups: int, norm_eps: float) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=norm_eps, affine=True)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *S)."""
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attended = self.proj(F.scaled_dot_product_attention(q, k, v))
        return x + attended.transpose(1, 2).reshape(x.shape)
