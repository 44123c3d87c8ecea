"""Tests for model.lpips3D.LPIPS3D (tiny volumes; real IXI data only if the shared data folder exists)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.lpips3D import LPIPS3D, _build_resnet, medicalnet_cache_path

IXI_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ixi"


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (B, 1, D, H, W) tensor."""
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x


def _phantom(shape: tuple[int, int, int] = (32, 32, 32)) -> torch.Tensor:
    """Smooth brain-like phantom in [0, 1]: textured ellipsoid on a zero background, (1, 1, *shape)."""
    grids = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = sum((g / a) ** 2 for g, a in zip(grids, (0.8, 0.9, 0.7), strict=True))
    gen = torch.Generator().manual_seed(0)
    texture = _blur(torch.rand(1, 1, *shape, generator=gen), 1.5)[0, 0]
    inner = 0.5 + 0.5 * (texture - texture.min()) / (texture.max() - texture.min())
    tissue = torch.where(r < 0.4, 1.0, 0.6) * inner  # brighter core, darker rim
    return torch.where(r < 1, tissue, 0.0).view(1, 1, *shape)


def _noisy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def _ixi_volume() -> torch.Tensor:
    files = sorted((IXI_DIR / "images").glob("*.nii.gz"))
    if not files:
        pytest.skip(f"IXI data not found under {IXI_DIR}")
    import nibabel as nib

    arr = np.asarray(nib.load(files[0]).dataobj, dtype=np.float32)
    arr = np.clip(arr / np.percentile(arr, 99.5), 0, 1)
    return torch.from_numpy(arr)[None, None]


@pytest.fixture(scope="module")
def lpips() -> LPIPS3D:
    return LPIPS3D()


def _fake_medicalnet_checkpoint(path: Path, depth: int = 10) -> dict[str, torch.Tensor]:
    """Save a random-init MedicalNet-layout checkpoint ({"state_dict": {"module.*"}}, plus a seg head)."""
    state = {
        k: v for k, v in _build_resnet(depth).state_dict().items() if not k.endswith("num_batches_tracked")
    }
    ckpt = {f"module.{k}": v for k, v in state.items()}
    ckpt["module.conv_seg.0.weight"] = torch.zeros(2, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": ckpt}, path)
    return state


def test_deepbet_default(lpips: LPIPS3D) -> None:
    assert lpips.backbone_name == "deepbet" and lpips.pretrained
    assert lpips.layers == ("down0", "down1", "down2")
    assert "deepbet" in lpips.description and "NOT" not in lpips.description


def test_identical_is_zero_and_shape(lpips: LPIPS3D) -> None:
    x = torch.cat([_phantom(), _noisy(_phantom(), 0.05)])
    d = lpips(x, x.clone())
    assert d.shape == (2,)
    assert torch.allclose(d, torch.zeros(2), atol=1e-6)
    assert lpips(x, x, per_layer=True).shape == (2, 3)


def test_odd_spatial_size(lpips: LPIPS3D) -> None:
    x = _phantom((27, 30, 25))
    assert torch.isfinite(lpips(x, _noisy(x, 0.05))).all()


def test_monotonic_phantom(lpips: LPIPS3D) -> None:
    x = _phantom()
    noise = [lpips(_noisy(x, s), x).item() for s in (0.01, 0.03, 0.1)]
    blur = [lpips(_blur(x, s), x).item() for s in (0.5, 1.0, 2.0)]
    assert 0 < noise[0] < noise[1] < noise[2]
    assert 0 < blur[0] < blur[1] < blur[2]


def test_monotonic_ixi(lpips: LPIPS3D) -> None:
    x = _ixi_volume()
    noise = [lpips(_noisy(x, s), x).item() for s in (0.01, 0.03, 0.1)]
    blur = [lpips(_blur(x, s), x).item() for s in (0.5, 1.0, 2.0)]
    assert 0 < noise[0] < noise[1] < noise[2]
    assert 0 < blur[0] < blur[1] < blur[2]


def test_gradient_finite_and_backbone_frozen(lpips: LPIPS3D) -> None:
    y = _phantom()  # zero background -> all-zero feature vectors must not give NaN gradients
    x = _noisy(y, 0.05).requires_grad_(True)
    lpips(x, y).mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in lpips.parameters())


def test_bf16_autocast(lpips: LPIPS3D) -> None:
    y = _phantom()
    x = _noisy(y, 0.05).requires_grad_(True)
    ref = lpips(x, y).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = lpips(x, y)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    assert torch.allclose(d, ref, rtol=0.2)
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    # the backbone runs under the caller's autocast (bf16 features); only the distance is taken in float32
    dtypes = []
    hook = lpips.encoder.register_forward_hook(lambda m, i, out: dtypes.extend(f.dtype for f in out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lpips(x, y)
    hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_train_keeps_backbone_eval(lpips: LPIPS3D) -> None:
    lpips.train()
    assert lpips.training
    assert not any(m.training for m in lpips.encoder.modules())
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.eval()


def test_medicalnet_explicit_path(tmp_path: Path) -> None:
    path = tmp_path / "resnet_10_23dataset.pth"
    state = _fake_medicalnet_checkpoint(path)
    lp = LPIPS3D("medicalnet_resnet10", weights_path=path)
    loaded = lp.encoder.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert lp.pretrained and lp.layers == ("layer1", "layer2", "layer3")
    x = _phantom((24, 24, 24))
    assert lp(x, x).abs().max() < 1e-6 and lp(_noisy(x, 0.1), x).item() > 0


def test_medicalnet_torch_home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "monai_checkpoints" / "medicalnet_resnet_10_23dataset.pth"
    assert medicalnet_cache_path(10) == cache
    _fake_medicalnet_checkpoint(cache)
    lp = LPIPS3D("medicalnet_resnet10", layers=("stem", "layer1"))
    x = _phantom((24, 24, 24))
    assert lp(x, _noisy(x, 0.1)).shape == (1,)


@pytest.mark.parametrize("depth", [10, 50])
def test_medicalnet_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: int) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "monai_checkpoints" / f"medicalnet_resnet_{depth}_23dataset.pth"
    with pytest.raises(FileNotFoundError, match="weights_path") as err:
        LPIPS3D(f"medicalnet_resnet{depth}")
    assert str(cache) in str(err.value)
    explicit = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as err:
        LPIPS3D(f"medicalnet_resnet{depth}", weights_path=explicit)
    assert str(explicit) in str(err.value) and str(cache) in str(err.value)


def test_deepbet_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.pt"):
        LPIPS3D(weights_path=tmp_path / "model.pt")


def test_random_backbone_flagged() -> None:
    a, b = LPIPS3D("random"), LPIPS3D("random")
    assert not a.pretrained and "NOT pretrained" in a.description
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [{"backbone": "vgg"}, {"layers": ("layer1",)}, {"layers": ()}],
)
def test_bad_args(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LPIPS3D(**kwargs)


def test_bad_inputs(lpips: LPIPS3D) -> None:
    with pytest.raises(ValueError):
        lpips(torch.zeros(1, 1, 24, 24, 24), torch.zeros(1, 1, 24, 24, 32))
    with pytest.raises(ValueError):
        lpips(torch.zeros(1, 2, 24, 24, 24), torch.zeros(1, 2, 24, 24, 24))
