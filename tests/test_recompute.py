"""Tests of the recompute unit (model/recompute.py) on its own: exact gradients, the on/off switch, autocast."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from model.maisi_vae import MaisiVAE
from model.recompute import norm_act_conv, recompute, recompute_enabled, recomputed_input_conv
from model.resnet_blocks import Downsample, ResBlock, Upsample

RECOMPUTED = "_RecomputedInputConvBackward"


def _randomise_norms(module: nn.Module) -> None:
    """Non-trivial GroupNorm affine parameters, so their gradients and use are exercised."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


class _NormActConv(nn.Module):
    """``norm_act_conv`` with its GroupNorm(2, 4) and 3x3x3 conv 4 -> 3 registered as parameters."""

    def __init__(self, act: bool) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv3d(4, 3, kernel_size=3, padding=1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 4, *S) -> (B, 3, *S)."""
        return norm_act_conv(x, self.norm, self.conv, act=self.act)


class _PrologueConv(nn.Module):
    """``recomputed_input_conv(prologue, False, conv, x)`` with ``conv``'s parameters registered here."""

    def __init__(self, prologue: Callable[[torch.Tensor], torch.Tensor], conv: nn.Conv3d) -> None:
        super().__init__()
        self.prologue = prologue
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, *S) -> (B, C_out, *S_out)."""
        return recomputed_input_conv(self.prologue, False, self.conv, x)


def _pad_high(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 1) * (x.dim() - 2))


def _upsample_x2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="trilinear")


def _gradcheck_in_float64(module: nn.Module, x_shape: tuple[int, ...]) -> None:
    """``gradcheck`` in float64 of ``module`` w.r.t. its (B, C, *S) input and all its parameters."""
    torch.manual_seed(0)
    module = module.double()
    _randomise_norms(module)
    names = [name for name, _ in module.named_parameters()]

    def run(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return functional_call(module, dict(zip(names, params, strict=True)), (x,))

    inputs = (
        torch.randn(x_shape, dtype=torch.float64, requires_grad=True),
        *(p.detach().clone().requires_grad_() for p in module.parameters()),
    )
    out = run(*inputs)
    assert out.dtype == torch.float64
    assert type(out.grad_fn).__name__ == RECOMPUTED
    assert gradcheck(run, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("act", [True, False])
def test_norm_act_conv_gradcheck(act: bool) -> None:
    _gradcheck_in_float64(_NormActConv(act), (2, 4, 5, 6, 4))


def test_zero_pad_prologue_stride2_conv_without_bias_gradcheck() -> None:
    conv = nn.Conv3d(4, 3, kernel_size=3, stride=2, padding=0, bias=False)
    _gradcheck_in_float64(_PrologueConv(_pad_high, conv), (2, 4, 5, 6, 4))


def test_trilinear_upsample_prologue_gradcheck() -> None:
    conv = nn.Conv3d(3, 2, kernel_size=3, padding=1)
    _gradcheck_in_float64(_PrologueConv(_upsample_x2, conv), (2, 3, 2, 3, 2))


def _tiny_vae() -> MaisiVAE:
    return MaisiVAE(
        channels=(8, 16),
        latent_channels=2,
        num_res_blocks=(1, 1),
        attention_levels=(False, False),
        norm_num_groups=4,
    )


MODULES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resblock": (lambda: ResBlock(8, 16, norm_num_groups=4, norm_eps=1e-6), (2, 8, 6, 7, 5)),
    "downsample": (lambda: Downsample(8), (2, 8, 6, 8, 4)),
    "upsample": (lambda: Upsample(8), (2, 8, 3, 4, 3)),
    "maisi_vae": (_tiny_vae, (1, 1, 16, 16, 16)),
}


def _outputs_and_grads(
    module: nn.Module, x: torch.Tensor, enabled: bool, autocast: bool = False
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Forward outputs and the gradients (input and parameters) of a fixed random projection of them."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(1)  # MaisiVAE samples its latent
    with recompute(enabled), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    outputs = list(out) if isinstance(out, tuple) else [out]
    generator = torch.Generator().manual_seed(2)
    loss = sum((o.float() * torch.randn(o.shape, generator=generator)).sum() for o in outputs)
    loss.backward()
    grads = {"input": x.grad, **{name: p.grad for name, p in module.named_parameters()}}
    return [o.detach() for o in outputs], grads


def _module_and_input(name: str) -> tuple[nn.Module, torch.Tensor]:
    build, x_shape = MODULES[name]
    torch.manual_seed(0)
    module = build()
    _randomise_norms(module)
    return module, torch.randn(x_shape)


@pytest.mark.parametrize("name", list(MODULES))
def test_recompute_on_and_off_agree_in_fp32(name: str) -> None:
    module, x = _module_and_input(name)
    outputs_on, grads_on = _outputs_and_grads(module, x, enabled=True)
    outputs_off, grads_off = _outputs_and_grads(module, x, enabled=False)
    for on, off in zip(outputs_on, outputs_off, strict=True):
        torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-6)
    assert grads_on.keys() == grads_off.keys()
    for key, grad in grads_on.items():
        assert grad is not None and grad.abs().sum() > 0, key
        torch.testing.assert_close(grad, grads_off[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ["resblock", "maisi_vae"])
def test_recompute_on_and_off_agree_under_bf16_autocast(name: str) -> None:
    module, x = _module_and_input(name)
    outputs_on, grads_on = _outputs_and_grads(module, x, enabled=True, autocast=True)
    outputs_off, grads_off = _outputs_and_grads(module, x, enabled=False, autocast=True)
    for on, off in zip(outputs_on, outputs_off, strict=True):
        assert on.dtype == off.dtype
        torch.testing.assert_close(on, off, rtol=2e-2, atol=2e-2 * off.abs().max().item())
    for key, grad in grads_on.items():
        torch.testing.assert_close(
            grad, grads_off[key], rtol=2e-2, atol=2e-2 * grads_off[key].abs().max().item()
        )


def test_switch_selects_the_custom_function() -> None:
    unit = _NormActConv(act=True)
    pad_unit = _PrologueConv(_pad_high, nn.Conv3d(4, 3, kernel_size=3, stride=2))
    x = torch.randn(1, 4, 4, 4, 4, requires_grad=True)
    assert recompute_enabled()
    assert type(unit(x).grad_fn).__name__ == RECOMPUTED
    assert type(pad_unit(x).grad_fn).__name__ == RECOMPUTED
    with recompute(False):
        assert not recompute_enabled()
        assert type(unit(x).grad_fn).__name__ == "ConvolutionBackward0"
        assert type(pad_unit(x).grad_fn).__name__ == "ConvolutionBackward0"
    assert recompute_enabled()
    assert type(unit(x).grad_fn).__name__ == RECOMPUTED


def _stored_activations(module: nn.Module, x: torch.Tensor) -> int:
    """Distinct full-resolution tensors autograd saves for backward in ``module(x)`` (parameters excluded)."""
    storages: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == x.dim() and t.shape[2:] == x.shape[2:]:
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return len(storages)


def test_recompute_stores_only_the_prologue_inputs_of_a_resblock() -> None:
    """On: the block input and conv1's output. Off: per GroupNorm -> SiLU -> conv unit its input, the GroupNorm
    output and the SiLU output (the three tensors the module docstring counts)."""
    block = ResBlock(8, 8, norm_num_groups=4, norm_eps=1e-6)
    x = torch.randn(1, 8, 8, 8, 8, requires_grad=True)
    assert _stored_activations(block, x) == 2
    with recompute(False):
        assert _stored_activations(block, x) == 6


def test_context_manager_restores_the_previous_value_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), recompute(False):
        assert not recompute_enabled()
        raise RuntimeError("boom")
    assert recompute_enabled()
    with recompute(False):
        with recompute(True):
            assert recompute_enabled()
        assert not recompute_enabled()
    assert recompute_enabled()
