"""Tests of the MAISI-style KL-VAE: shapes, gradients, checkpointing, memory format, MAISI weight equivalence."""

from __future__ import annotations

import pytest
import torch
from helpers import maisi_reference, randomise_group_norms

from model.maisi_vae import MaisiVAE, convert_maisi_state_dict

TINY = dict(channels=(8, 16, 16), latent_channels=3, num_res_blocks=(1, 2, 1), norm_num_groups=4)


def _tiny(**overrides) -> MaisiVAE:
    torch.manual_seed(0)
    return MaisiVAE(**{**TINY, **overrides})


def test_odd_input_round_trips_and_latent_shape_rule():
    model = _tiny().eval()
    x = torch.randn(2, 1, 13, 17, 11)
    with torch.no_grad():
        recon, mu, sigma = model(x)
    assert model.downsample_factor == 4
    assert recon.shape == x.shape
    assert mu.shape == sigma.shape == (2, 3, 4, 5, 3)
    assert model.latent_shape((13, 17, 11)) == (4, 5, 3)
    assert model.latent_shape((91, 109, 91)) == (23, 28, 23)
    assert model.latent_shape((16, 16, 16)) == (4, 4, 4)
    assert (sigma > 0).all()
    assert model.last_decoder_layer_weight.shape == (1, 8, 3, 3, 3)
    assert model.last_decoder_layer_weight.requires_grad
    with torch.no_grad():
        assert model.decode(mu).shape == (2, 1, 16, 20, 12)
        assert model.decode(mu, (13, 17, 11)).shape == x.shape


def test_reconstruct_is_deterministic_and_forward_samples():
    model = _tiny().eval()
    x = torch.randn(1, 1, 12, 8, 8)
    with torch.no_grad():
        a, b = model.reconstruct(x), model.reconstruct(x)
        mu, sigma = model.encode(x)
        sampled, _, _ = model(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, model.decode(mu, x.shape[2:]), rtol=0, atol=0)
    assert not torch.allclose(sampled, a)


def _loss_and_grads(model: MaisiVAE, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    recon, mu, sigma = model(x)
    loss = (recon - x).pow(2).mean() + 1e-3 * (mu.pow(2) + sigma.pow(2) - 2 * sigma.log() - 1).mean()
    loss.backward()
    return recon.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_every_parameter_gets_a_gradient():
    model = _tiny(upsample_mode="transposed")
    randomise_group_norms(model)
    _, grads = _loss_and_grads(model, torch.randn(1, 1, 9, 12, 8))
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def _reference_grads(model: MaisiVAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the same loss from a plain MONAI model with identical weights (autograd everywhere)."""
    reference = maisi_reference(
        TINY["channels"], TINY["num_res_blocks"], TINY["latent_channels"], TINY["norm_num_groups"]
    )
    ours_from_reference = convert_maisi_state_dict(reference.state_dict())
    mapping = {}
    for (ref_name, _), our_name in zip(reference.state_dict().items(), ours_from_reference, strict=True):
        mapping[our_name] = ref_name
    reference.load_state_dict({mapping[n]: t for n, t in model.state_dict().items()})
    mu, sigma = reference.encode(x)
    torch.manual_seed(1)
    z = mu + sigma * torch.randn_like(sigma)
    recon = reference.decode(z)
    loss = (recon - x).pow(2).mean() + 1e-3 * (mu.pow(2) + sigma.pow(2) - 2 * sigma.log() - 1).mean()
    loss.backward()
    return {our: dict(reference.named_parameters())[ref].grad for our, ref in mapping.items()}


def test_gradients_match_plain_autograd_reference():
    model = _tiny()
    randomise_group_norms(model)
    x = torch.randn(1, 1, 16, 12, 8)
    _, grads = _loss_and_grads(model, x)
    reference = _reference_grads(model, x)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_checkpointing_matches_plain():
    plain = _tiny()
    randomise_group_norms(plain)
    ckpt = _tiny(use_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 13, 9, 10)
    out_plain, grads_plain = _loss_and_grads(plain, x)
    out_ckpt, grads_ckpt = _loss_and_grads(ckpt, x)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=1e-6)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_torch_compile_traces_without_graph_breaks_and_matches_eager():
    """Under torch.compile the blocks trace the plain norm/act/conv composition (dynamo cannot trace the eager
    path's custom autograd function): fullgraph=True fails on any graph break, and outputs and gradients must
    equal eager. The aot_eager backend traces forward and backward like inductor but needs no C++ compiler."""
    model = _tiny()
    randomise_group_norms(model)
    x = torch.randn(1, 1, 16, 12, 8)
    out_eager, grads_eager = _loss_and_grads(model, x)
    grads_eager = {n: g.clone() for n, g in grads_eager.items()}
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    recon, mu, sigma = compiled(x)
    loss = (recon - x).pow(2).mean() + 1e-3 * (mu.pow(2) + sigma.pow(2) - 2 * sigma.log() - 1).mean()
    loss.backward()
    torch.testing.assert_close(recon.detach(), out_eager, rtol=1e-4, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, grads_eager[name], rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_input_matches_contiguous():
    model = _tiny(in_channels=2)
    randomise_group_norms(model)
    x = torch.randn(2, 2, 8, 12, 8)

    def run(inp: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        mu, sigma = model.encode(inp)
        recon = model.decode(mu, inp.shape[2:])  # deterministic: randn_like would follow the memory format
        ((recon - inp[:, :1]).pow(2).mean() + sigma.mean()).backward()
        return recon.detach(), {n: p.grad for n, p in model.named_parameters()}

    out_a, grads_a = run(x)
    out_b, grads_b = run(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_autocast_runs_and_stays_close():
    model = _tiny().eval()
    x = torch.randn(1, 1, 8, 8, 12)
    with torch.no_grad():
        ref = model.reconstruct(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.reconstruct(x)
    assert out.shape == ref.shape
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


@pytest.mark.parametrize("mode", ["trilinear", "transposed"])
@pytest.mark.parametrize("attention", [(False, False, True), (False, False, False)])
def test_attention_and_upsample_variants_run(mode, attention):
    model = _tiny(
        upsample_mode=mode,
        attention_levels=attention,
        with_encoder_nonlocal_attn=True,
        with_decoder_nonlocal_attn=not any(attention),
    )
    x = torch.randn(1, 1, 8, 9, 8)
    _, grads = _loss_and_grads(model, x)
    assert all(g is not None for g in grads.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=(8, 10)), "divisible"),
        (dict(num_res_blocks=(1, 1)), r"zip\(\) argument 2 is shorter"),
        (dict(attention_levels=(False,) * 4), r"zip\(\) argument 3 is longer"),
        (dict(upsample_mode="nearest"), "upsample_mode"),
    ],
)
def test_inconsistent_arguments_raise_without_a_config(kwargs, match):
    """Built directly (the config checks its values first), the model still refuses what it cannot build."""
    config = dict(
        channels=(8, 16, 16), num_res_blocks=(1, 1, 1), attention_levels=(False,) * 3, norm_num_groups=4
    )
    if "channels" in kwargs:
        config.update(num_res_blocks=(1, 1), attention_levels=(False, False))
    with pytest.raises(ValueError, match=match):
        MaisiVAE(**{**config, **kwargs})


@pytest.mark.parametrize(
    "channels, res_blocks, groups, shape, convtranspose",
    [
        ((8, 16, 32), (1, 1, 1), 4, (16, 16, 16), False),
        ((8, 16, 16), (2, 1, 2), 8, (24, 20, 16), False),
        ((8, 16), (1, 2), 4, (12, 8, 10), True),
    ],
)
def test_maisi_weights_give_identical_outputs(channels, res_blocks, groups, shape, convtranspose):
    maisi = maisi_reference(channels, res_blocks, 4, groups, convtranspose).eval()
    sd = {f"module.{k}": v for k, v in maisi.state_dict().items()}
    ours = MaisiVAE.from_maisi_state_dict(
        {"state_dict": sd},
        channels=channels,
        num_res_blocks=res_blocks,
        attention_levels=(False,) * len(channels),
        latent_channels=4,
        norm_num_groups=groups,
        upsample_mode="transposed" if convtranspose else "trilinear",
    ).eval()
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        mu_ref, sigma_ref = maisi.encode(x)
        mu, sigma = ours.encode(x)
        z = torch.randn_like(mu)
        dec_ref, dec = maisi.decode(z), ours.decode(z)
    assert (mu - mu_ref).abs().max() <= 1e-4
    assert (sigma - sigma_ref).abs().max() <= 1e-4
    assert dec.shape == dec_ref.shape
    assert (dec - dec_ref).abs().max() <= 1e-4


def test_mismatched_state_dict_raises_clear_error():
    maisi_sd = maisi_reference((8, 16), (1, 1), 4, 4).state_dict()
    with pytest.raises(ValueError, match="bogus.weight"):
        convert_maisi_state_dict({**maisi_sd, "bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="quant_conv_mu"):
        convert_maisi_state_dict({k: v for k, v in maisi_sd.items() if not k.startswith("quant_conv_mu")})
    with pytest.raises(RuntimeError, match="res_blocks.1"):
        MaisiVAE.from_maisi_state_dict(
            maisi_sd,
            channels=(8, 16),
            num_res_blocks=(1, 2),
            attention_levels=(False, False),
            norm_num_groups=4,
        )
