"""Recompute the cheap prologue of a convolution in backward instead of storing its output.

A MAISI/MONAI ``GroupNorm -> SiLU -> Conv`` unit makes autograd keep three full-size tensors (the GroupNorm
input, its output and the SiLU output). Every such "cheap prologue followed by a convolution" unit (also the
zero pad before a stride-2 convolution and the trilinear upsampling before one) runs here through
:class:`_RecomputedInputConv`, which stores only the prologue's *input* and recomputes the prologue in backward.
The convolution is never recomputed and its backward is the native ``aten.convolution_backward``, so results
equal the plain PyTorch composition within fp32 rounding. :func:`recompute` switches the trick off in eager
mode (the plain composition then runs, e.g. to compare or to measure what it saves); ``torch.compile`` always
traces the plain composition (see :func:`recomputed_input_conv`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

_recompute_enabled = True


def recompute_enabled() -> bool:
    """Whether eager-mode units recompute their prologue in backward (on by default; see :func:`recompute`)."""
    return _recompute_enabled


@contextmanager
def recompute(enabled: bool) -> Iterator[None]:
    """Inside: the recomputing autograd function (``True``) or the plain composition in eager mode; the previous
    setting is restored on exit."""
    global _recompute_enabled
    previous, _recompute_enabled = _recompute_enabled, enabled
    try:
        yield
    finally:
        _recompute_enabled = previous


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
        conv: nn.Conv3d,
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
            out = F.conv3d(
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
        # Unpacked in the order of forward's arguments; the strict zip below catches a count mismatch.
        _, _, _, x_needs_grad, weight_needs_grad, bias_needs_grad, *param_needs_grad = ctx.needs_input_grad
        conv: nn.Conv3d = ctx.conv
        with torch.autocast(x.device.type, enabled=False):
            with torch.enable_grad():
                x_leaf = x.detach().requires_grad_(x_needs_grad)
                param_leaves = [
                    p.detach().requires_grad_(needs_grad)
                    for p, needs_grad in zip(prologue_params, param_needs_grad, strict=True)
                ]
                pre_act = ctx.prologue(x_leaf, *param_leaves)
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
                [0, 0, 0],
                conv.groups,
                [True, weight_needs_grad, bias_needs_grad],
            )
            del conv_input
            grad_input = grad_input.to(pre_act.dtype)
            if ctx.act:
                grad_input = torch.ops.aten.silu_backward(grad_input, pre_act.detach())
            leaves = [t for t in (x_leaf, *param_leaves) if t.requires_grad]
            leaf_grads = iter(torch.autograd.grad(pre_act, leaves, grad_input) if leaves else ())
        grad_x = next(leaf_grads) if x_needs_grad else None
        grad_params = [next(leaf_grads) if needs_grad else None for needs_grad in param_needs_grad]
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return None, None, None, grad_x, grad_weight, grad_bias, *grad_params


def recomputed_input_conv(
    prologue: Callable[..., torch.Tensor],
    act: bool,
    conv: nn.Conv3d,
    x: torch.Tensor,
    *prologue_params: torch.Tensor,
) -> torch.Tensor:
    """``conv(silu?(prologue(x, *prologue_params)))`` storing only ``x`` for backward when recompute is on.

    The plain composition runs instead when recompute is off (:func:`recompute`) and is always traced under
    ``torch.compile``: dynamo cannot trace the custom autograd function (it takes a closure and a module), and the
    compiler's own partitioner already recomputes cheap pointwise prologues in the backward pass instead of
    storing them. The plain composition runs the prologue as written by the caller and ``conv`` under whatever
    autocast is active.

    ``prologue`` is a cheap function of ``x`` (normalisation, padding, upsampling), computed in fp32 by the
    caller; ``prologue_params`` are tensors it takes after ``x`` (e.g. GroupNorm weight and bias).
    (B, C_in, D, H, W) -> (B, C_out, D', H', W').
    """
    if torch.compiler.is_compiling() or not recompute_enabled():
        conv_input = prologue(x, *prologue_params)
        return conv(F.silu(conv_input) if act else conv_input)
    return _RecomputedInputConv.apply(prologue, act, conv, x, conv.weight, conv.bias, *prologue_params)


def _upcast_half(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 if it is fp16/bf16, else unchanged (fp32 stays fp32, fp64 stays fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def norm_act_conv(x: torch.Tensor, norm: nn.GroupNorm, conv: nn.Conv3d, act: bool = True) -> torch.Tensor:
    """``conv(silu(norm(x)))`` (``conv(norm(x))`` when ``act`` is False) keeping only ``x`` for backward.

    The GroupNorm runs in at least fp32 (half-precision ``x`` and parameters are upcast).
    (B, C_in, D, H, W) -> (B, C_out, D', H', W').
    """

    def prologue(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            _upcast_half(t), norm.num_groups, _upcast_half(weight), _upcast_half(bias), norm.eps
        )

    return recomputed_input_conv(prologue, act, conv, x, norm.weight, norm.bias)
