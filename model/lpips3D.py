"""A true 3D LPIPS-style perceptual distance for T1 brain MRI volumes.

As richzhang/PerceptualSimilarity (``lpips/lpips.py``, ``lpips=False``): features of a frozen network at several
depths are unit-normalised over channels, and the squared difference is summed over channels, averaged over space
and summed over layers. No learned "lin" layers exist for 3D MRI, so every channel has weight 1.

Backbones (taps in depth order: ``DEEPBET_TAPS`` / ``MEDICALNET_TAPS``):

``deepbet`` (default)
    Encoder of the pretrained deepbet brain-extraction network (TorchScript shipped by the ``deepbet`` package
    at ``deepbet.utils.DATA_PATH/models/model.pt``), a residual UNet trained on ~1 mm T1 heads resized to 256^3.
    Taps (channels, stride): ``stem`` 7^3 conv+IN+ReLU (16, /2), ``init`` = stem+maxpool (16, /4), ``down0``
    (16, /4), ``down1`` (32, /8), ``down2`` (64, /16), ``down3`` (128, /32); default ``down0``-``down2`` at the
    native input scale (the measured choice: BENCHMARKS.md section 5). Input normalisation as
    ``deepbet.utils.normalize``: clip to [0, 1], per-volume z-score, then ``0.226 * z + 0.449``.
``medicalnet_resnet10`` / ``medicalnet_resnet50``
    MedicalNet 3D ResNets (MONAI ``resnet10``/``resnet50`` with ``conv1_t_stride=2``, shortcut "B", no
    downsample bias). Taps ``stem`` (conv1+BN+ReLU), ``layer1`` .. ``layer4``; default ``layer1-layer3``.
    Input normalisation: per-volume z-score, as in MedicalNet.
``random``
    Randomly initialised (seed 0) resnet10 with the MedicalNet taps; only for ablations / tests
    (``pretrained`` is False and ``description`` says so).

All backbones use "same"-padded convolutions whose strided branches round up identically (ceil(n / 2)), so any
spatial size works without internal padding (e.g. 91x109x91).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

DEEPBET_TAPS: tuple[str, ...] = ("stem", "init", "down0", "down1", "down2", "down3")
MEDICALNET_TAPS: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")
_BACKBONES = ("deepbet", "medicalnet_resnet10", "medicalnet_resnet50", "random")


def medicalnet_cache_path(depth: int) -> Path:
    """MONAI's torch-hub cache path of the MedicalNet ResNet of ``depth`` 10 or 50 (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "monai_checkpoints" / f"medicalnet_resnet_{depth}_23dataset.pth"


def _deepbet_default_path() -> Path:
    """Locate deepbet's TorchScript model, ``<site-packages>/data/models/model.pt`` (``deepbet.utils.DATA_PATH``).

    Found via the package's location without importing it: ``import deepbet`` pulls in its brain-extraction
    dependencies (fill_voids, fastremap, cc3d), which the perceptual loss does not need.
    """
    spec = importlib.util.find_spec("deepbet")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The deepbet backbone needs the `deepbet` package (pip install deepbet) or an explicit "
            "weights_path=<.../data/models/model.pt>."
        )
    return Path(spec.origin).resolve().parents[1] / "data" / "models" / "model.pt"


class _Encoder(nn.Module):
    """The frozen backbone ``net`` (deepbet's scripted UNet or a MONAI ResNet) run up to its deepest wanted tap."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, taps: Sequence[str]) -> list[torch.Tensor]:
        """(B, 1, D, H, W) normalised input -> the feature maps of ``taps``, in that order."""
        net, out = self.net, {}
        if isinstance(net, torch.jit.ScriptModule):  # deepbet: its traced stages take the shared ReLU first
            names, stage_args, init = DEEPBET_TAPS, [getattr(net.conv, "2")], net.init
            h = out["stem"] = torch.relu(getattr(init, "1")(getattr(init, "0")(x)))
            h = out["init"] = getattr(init, "3")(h)
        else:
            names, stage_args = MEDICALNET_TAPS, []
            h = out["stem"] = net.act(net.bn1(net.conv1(x)))
            h = net.maxpool(h)
        for name in names[len(out) : max(names.index(t) for t in taps) + 1]:  # the stages after those above
            h = out[name] = getattr(net, name)(*stage_args, h)
        return [out[t] for t in taps]


def _build_resnet(depth: int) -> nn.Module:
    """MONAI ResNet with MedicalNet's configuration (no classification head)."""
    from monai.networks.nets import resnet10, resnet50

    return {10: resnet10, 50: resnet50}[depth](
        spatial_dims=3,
        n_input_channels=1,
        conv1_t_stride=2,
        shortcut_type="B",
        bias_downsample=False,
        feed_forward=False,
    )


def _load_medicalnet(depth: int, weights_path: str | os.PathLike | None) -> nn.Module:
    """Build a MedicalNet ResNet and load ``{"state_dict": {"module.*": ...}}`` weights (never downloads)."""
    cache = medicalnet_cache_path(depth)
    path = Path(weights_path) if weights_path is not None else cache
    if not path.is_file():
        raise FileNotFoundError(
            f"MedicalNet resnet{depth} weights not found at {path}. Nothing is downloaded: place "
            f"MedicalNet's resnet_{depth}_23dataset.pth either at {cache} (torch-hub cache, honours "
            f"$TORCH_HOME) or anywhere and pass LPIPS3D(backbone='medicalnet_resnet{depth}', weights_path=...)."
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = _build_resnet(depth)
    expected = net.state_dict().keys()
    state = {k: v for k, v in state.items() if k in expected}  # drops MedicalNet's segmentation head
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise RuntimeError(f"{path} is not a MedicalNet resnet{depth} checkpoint; missing e.g. {missing[:5]}")
    net.load_state_dict(state, strict=False)
    return net


class LPIPS3D(nn.Module):
    """Frozen 3D LPIPS distance between two volumes.

    Args:
        backbone: ``"deepbet"`` (default), ``"medicalnet_resnet10"``, ``"medicalnet_resnet50"`` or ``"random"``.
        weights_path: explicit weights file; default: deepbet's packaged model, or MONAI's torch-hub cache
            path for MedicalNet (see :func:`medicalnet_cache_path`).
        layers: names of the taps to compare (see ``DEEPBET_TAPS`` / ``MEDICALNET_TAPS``); default per backbone.

    Attributes:
        backbone_name: the backbone key.
        pretrained: False only for ``"random"``.
        layers: the tap names in use.
        description: short human-readable summary for reports.

    Inputs ``x`` and ``y`` are (B, 1, D, H, W) intensities in [0, 1] of any spatial size; ``forward`` returns
    (B,) distances (or (B, L) per layer), differentiable w.r.t. the inputs; no gradient ever reaches the
    backbone, which stays in eval mode even after ``.train()``.
    """

    def __init__(
        self,
        backbone: str = "deepbet",
        weights_path: str | os.PathLike | None = None,
        layers: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if backbone not in _BACKBONES:
            raise ValueError(f"Unknown backbone {backbone!r}; choose one of {sorted(_BACKBONES)}.")
        taps = DEEPBET_TAPS if backbone == "deepbet" else MEDICALNET_TAPS
        layers = tuple(layers) if layers is not None else taps[-4:-1]  # the 3 before the deepest by default
        bad = [name for name in layers if name not in taps]
        if not layers or bad:
            raise ValueError(f"layers must be a non-empty subset of {taps} for {backbone!r}, got {layers}.")

        self.backbone_name = backbone
        self.pretrained = backbone != "random"
        self.layers = layers

        if backbone == "deepbet":
            path = Path(weights_path) if weights_path is not None else _deepbet_default_path()
            if not path.is_file():
                raise FileNotFoundError(
                    f"deepbet model not found at {path}. Install the `deepbet` package (its model lives at "
                    f"deepbet.utils.DATA_PATH/models/model.pt) or pass weights_path=<path to model.pt>."
                )
            net = torch.jit.load(str(path), map_location="cpu")
        elif backbone == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net = _build_resnet(10)
        else:
            net = _load_medicalnet(int(backbone.removeprefix("medicalnet_resnet")), weights_path)
        self.encoder = _Encoder(net).requires_grad_(False).eval()

        status = "" if self.pretrained else " — NOT pretrained"
        self.description = f"LPIPS3D[{backbone} {'+'.join(layers)}{status}]"

    def train(self, mode: bool = True) -> LPIPS3D:
        """Set ``self.training`` but keep the frozen backbone in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """(B,) distances between ``x`` and ``y`` (e.g. reconstruction and target, same shape; inputs as in the
        class docstring), or the (B, L) per-layer terms if ``per_layer``."""
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"Expected a (B, 1, D, H, W) volume, got shape {tuple(x.shape)}.")
        # the backbone's input distribution: clipped, z-scored per volume (+ deepbet's affine)
        h = torch.cat([x, y], dim=0).float().clamp(0.0, 1.0)
        h = (h - h.mean(dim=(1, 2, 3, 4), keepdim=True)) / (h.std(dim=(1, 2, 3, 4), keepdim=True) + 1e-6)
        if self.backbone_name == "deepbet":
            h = 0.226 * h + 0.449
        batch, features = x.shape[0], self.encoder(h, self.layers)  # under the caller's autocast
        terms = []
        with torch.autocast(device_type=x.device.type, enabled=False):
            for feat in features:
                # unit norm over channels (lpips.normalize_tensor); all-zero vectors, e.g. ReLU background, stay 0
                feat = feat.float()
                feat = feat / (torch.linalg.vector_norm(feat, dim=1, keepdim=True) + 1e-10)
                terms.append((feat[:batch] - feat[batch:]).pow(2).sum(dim=1).mean(dim=(1, 2, 3)))
        dist = torch.stack(terms, dim=1)
        return dist if per_layer else dist.sum(dim=1)
