"""3D PatchGAN discriminator (its losses and the VQGAN adaptive weight live in ``losses.py``).

The discriminator is the pix2pix / taming-transformers ``NLayerDiscriminator`` in 3D: every output logit
judges one overlapping receptive-field patch of the input volume (realness of local texture), which is what
a VAE's adversarial term should sharpen.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN discriminator.

    Layout (``num_layers`` = n): conv(stride 2) to ``channels`` + LeakyReLU(0.2); n - 1 blocks conv(stride 2)
    + norm + LeakyReLU(0.2) doubling the channels (capped at 8 x ``channels``); one conv(stride 1) + norm +
    LeakyReLU block; a final stride-1 conv to one channel of logits (no activation). All convolutions have
    cubic kernels of 4 with padding 1; those followed by a norm have no bias; weights are initialised
    N(0, 0.02) as in pix2pix. ``norm``: ``"instance"`` (affine InstanceNorm3d, batch-size independent) or
    ``"batch"``. The ``discriminator`` section of the config checks the values; built directly,
    ``num_layers`` < 1 and an unknown ``norm`` raise ``ValueError``.

    Shapes:
        input (B, in_channels, D, H, W) -> logits (B, 1, d, h, w) with d = D / 2**num_layers - 2
        (e.g. 32^3 -> 2^3 for 3 layers; 91x109x91 -> 9x11x9). Instance norm needs > 1 voxel in each
        normalised map, i.e. inputs of at least ~2**(num_layers + 1) voxels per side.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 32,
        num_layers: int = 3,
        norm: Literal["instance", "batch"] = "instance",
    ) -> None:
        super().__init__()
        norms = {"instance": lambda c: nn.InstanceNorm3d(c, affine=True), "batch": nn.BatchNorm3d}
        if num_layers < 1 or norm not in norms:
            raise ValueError(f"need num_layers >= 1 and norm in {sorted(norms)}, got {num_layers}, {norm!r}.")

        def block(c_in: int, c_out: int, stride: int, normed: bool) -> nn.Sequential:
            layers: list[nn.Module] = [nn.Conv3d(c_in, c_out, 4, stride, 1, bias=not normed)]
            if normed:
                layers.append(norms[norm](c_out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return nn.Sequential(*layers)

        widths = [channels * min(2**i, 8) for i in range(num_layers + 1)]
        blocks = [block(in_channels, widths[0], 2, normed=False)]
        blocks += [block(widths[i - 1], widths[i], 2, normed=True) for i in range(1, num_layers)]
        blocks.append(block(widths[-2], widths[-1], 1, normed=True))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv3d(widths[-1], 1, 4, 1, 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """pix2pix initialisation: conv N(0, 0.02); norm scale N(1, 0.02), shift 0."""
        if isinstance(module, nn.Conv3d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.InstanceNorm3d | nn.BatchNorm3d):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits (B, 1, d, h, w) for a (B, in_channels, D, H, W) volume."""
        if x.ndim != 5:
            raise ValueError(f"Expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}.")
        return self.head(self.blocks(x))
