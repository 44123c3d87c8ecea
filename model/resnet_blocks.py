"""Memory-lean building blocks of the MAISI-style KL-VAE.

The expensive part of a convolutional VAE's training memory is not the weights but the activations autograd
keeps for the backward pass. A MAISI/MONAI ResNet block ``GroupNorm -> SiLU -> Conv`` stores, per unit, the
GroupNorm input, the GroupNorm output (for SiLU) and the SiLU output (for the convolution): three full-size
tensors. Here every such "cheap prologue followed by a convolution" unit runs through
:class:`_RecomputedInputConv`, which stores only the prologue's *input* and recomputes the prologue
(normalisation, activation, zero padding or trilinear upsampling, all cheap next to a 3x3x3 convolution) in the
backward pass. The convolution itself is never recomputed, and its backward is the native
``aten.convolution_backward``, so results equal the plain PyTorch composition within fp32 rounding. Under
``torch.compile`` the plain composition is traced instead (see :func:`recomputed_input_conv`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ResBlock",
    "Downsample",
    "Upsample",
    "SpatialAttention",
    "conv_nd",
    "norm_act_conv",
    "recomputed_input_conv",
]


def conv_nd(spatial_dims: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    """Return ``nn.Conv2d`` or ``nn.Conv3d`` for ``spatial_dims`` in {2, 3}."""
    if spatial_dims == 3:
        return nn.Conv3d
    if spatial_dims == 2:
        return nn.Conv2d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")


class _RecomputedInputConv(torch.autograd.Function):
    """``conv(act(prologue(x, *prologue_params)))`` that saves ``x`` instead of the convolution input.

    ``act`` (SiLU or identity) is applied outside autograd, in place in forward and with ``aten.silu_backward`` in
    backward, so the backward pass holds at most the pre-activation, the activation and their gradient at once.
    Under autocast the prologue runs with autocast disabled (it upcasts to fp32 where it normalises) and its
    result is cast to the autocast dtype for the convolution, like autocast would do for a plain ``nn.Conv``.
    """

    @staticmethod
    def forward(
        ctx,
        prologue: Callable[..., torch.Tensor],
        act: bool,
        conv: nn.Conv2d | nn.Conv3d,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        *prologue_params: torch.Tensor,
    ) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            conv_input = prologue(x, *prologue_params)
            if act:
                conv_input = F.silu(conv_input, inplace=True)
            conv_input = conv_input.to(dtype)
            out = F.conv3d if x.dim() == 5 else F.conv2d
            out = out(
                conv_input,
                weight.to(dtype),
                None if bias is None else bias.to(dtype),
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
            )
        ctx.save_for_backward(x, weight, bias, *prologue_params)
        ctx.prologue, ctx.act, ctx.conv, ctx.dtype = prologue, act, conv, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, *prologue_params = ctx.saved_tensors
        conv: nn.Conv2d | nn.Conv3d = ctx.conv
        needs = ctx.needs_input_grad[1:]  # aligned with forward's arguments after ``prologue``
        with torch.autocast(x.device.type, enabled=False):
            with torch.enable_grad():
                x_ = x.detach().requires_grad_(needs[2])
                params_ = [p.detach().requires_grad_(needs[5 + i]) for i, p in enumerate(prologue_params)]
                pre_act = ctx.prologue(x_, *params_)
            conv_input = (F.silu(pre_act.detach()) if ctx.act else pre_act.detach()).to(ctx.dtype)
            grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out.to(ctx.dtype),
                conv_input,
                weight.to(ctx.dtype),
                None if bias is None else [bias.shape[0]],
                conv.stride,
                conv.padding,
                conv.dilation,
                False,
                [0] * (x.dim() - 2),
                conv.groups,
                [True, needs[3], bias is not None and needs[4]],
            )
            del conv_input
            grad_input = grad_input.to(pre_act.dtype)
            if ctx.act:
                grad_input = torch.ops.aten.silu_backward(grad_input, pre_act.detach())
            leaves = [t for t in (x_, *params_) if t.requires_grad]
            leaf_grads = iter(torch.autograd.grad(pre_act, leaves, grad_input) if leaves else ())
        grad_x = next(leaf_grads) if needs[2] else None
        grad_params = [next(leaf_grads) if needs[5 + i] else None for i in range(len(prologue_params))]
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return None, None, None, grad_x, grad_weight, grad_bias, *grad_params


def recomputed_input_conv(
    prologue: Callable[..., torch.Tensor],
    act: bool,
    conv: nn.Conv2d | nn.Conv3d,
    x: torch.Tensor,
    *prologue_params: torch.Tensor,
) -> torch.Tensor:
    """``conv(silu?(prologue(x, *prologue_params)))`` storing only ``x`` for backward (eager mode).

    Under ``torch.compile`` the plain composition is traced instead: dynamo cannot trace the custom autograd
    function (it takes a closure and a module), and the compiler's own partitioner already recomputes cheap
    pointwise prologues in the backward pass instead of storing them.

    Args:
        prologue: cheap function of ``x`` (normalisation, padding, upsampling); computed in fp32 by the caller.
        act: apply SiLU after the prologue.
        conv: the convolution (its weight and bias are used).
        x: (B, C_in, *spatial) input.
        prologue_params: tensors passed to ``prologue`` after ``x`` (e.g. GroupNorm weight and bias).

    Returns:
        (B, C_out, *spatial_out) tensor.
    """
    if torch.compiler.is_compiling():
        conv_input = prologue(x, *prologue_params)
        return conv(F.silu(conv_input) if act else conv_input)
    return _RecomputedInputConv.apply(prologue, act, conv, x, conv.weight, conv.bias, *prologue_params)


def norm_act_conv(
    x: torch.Tensor, norm: nn.GroupNorm, conv: nn.Conv2d | nn.Conv3d, act: bool = True
) -> torch.Tensor:
    """``conv(silu(norm(x)))`` (``conv(norm(x))`` when ``act`` is False) keeping only ``x`` for backward.

    Args:
        x: (B, C_in, *spatial) input.
        norm: GroupNorm over C_in channels (its ``num_groups``, ``eps``, ``weight`` and ``bias`` are used).
        conv: convolution C_in -> C_out.
        act: apply SiLU between normalisation and convolution.

    Returns:
        (B, C_out, *spatial_out) tensor.
    """

    def prologue(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.group_norm(t.float(), norm.num_groups, weight.float(), bias.float(), norm.eps)

    return recomputed_input_conv(prologue, act, conv, x, norm.weight, norm.bias)


class ResBlock(nn.Module):
    """MAISI/MONAI ResNet block: ``x + conv2(silu(gn2(conv1(silu(gn1(x))))))``.

    A 1x1 convolution maps the shortcut when ``in_channels != out_channels``. Parameter names
    (``norm1``, ``conv1``, ``norm2``, ``conv2``, ``shortcut``) are those of MONAI's ``AEKLResBlock`` with the
    ``Convolution`` wrappers stripped.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels C_in.
        out_channels: output channels C_out.
        norm_num_groups: GroupNorm groups (must divide C_in and C_out).
        norm_eps: GroupNorm epsilon.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, norm_num_groups: int, norm_eps: float
    ) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps, affine=True)
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps, affine=True)
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (
            conv(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *spatial) -> (B, C_out, *spatial)."""
        h = norm_act_conv(x, self.norm1, self.conv1)
        h = norm_act_conv(h, self.norm2, self.conv2)
        # conv2's output is not saved by any backward, so the residual sum may reuse its buffer.
        return h.add_(self.shortcut(x))


def _pad_high(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad one voxel at the high end of every spatial axis (MONAI ``AsymmetricPad``)."""
    return F.pad(x, (0, 1) * (x.dim() - 2))


class Downsample(nn.Module):
    """Stride-2 3x3(x3) convolution after a one-voxel zero pad at the high end (MAISI ``MaisiDownsample``).

    Maps (B, C, *S) with even S to (B, C, *S/2); the padded copy is recomputed in backward instead of stored.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.conv = conv_nd(spatial_dims)(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B, C, *ceil((S - 1) / 2))."""
        return recomputed_input_conv(_pad_high, False, self.conv, x)


def _upsample_x2(x: torch.Tensor) -> torch.Tensor:
    """x2 (bi/tri)linear interpolation with ``align_corners=False`` (MAISI ``MaisiUpsample``)."""
    return F.interpolate(x, scale_factor=2.0, mode="trilinear" if x.dim() == 5 else "bilinear")


class Upsample(nn.Module):
    """x2 upsampling: (tri)linear interpolation + 3x3(x3) conv (``mode="trilinear"``, MAISI's default; the
    upsampled tensor is recomputed in backward instead of stored), or a stride-2 transposed convolution
    (``mode="transposed"``, kernel 3, padding 1, output padding 1 like MONAI).

    Maps (B, C, *S) to (B, C, *2S).
    """

    def __init__(self, spatial_dims: int, channels: int, mode: str = "trilinear") -> None:
        super().__init__()
        if mode == "trilinear":
            self.conv: nn.Module = conv_nd(spatial_dims)(channels, channels, kernel_size=3, padding=1)
        elif mode == "transposed":
            transposed = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
            self.conv = transposed(channels, channels, kernel_size=3, stride=2, padding=1, output_padding=1)
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
