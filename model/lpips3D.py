"""A true 3D LPIPS-style perceptual distance for T1 brain MRI volumes.

Structure follows richzhang/PerceptualSimilarity (``lpips/lpips.py``, ``lpips=False`` variant): features are
taken from a frozen network at several depths, unit-normalised over channels, and the squared difference is
summed over channels, averaged over space and summed over layers. No learned linear ("lin") layers exist for
3D MRI, so every channel has weight 1 (the identity "lin").

Backbones
---------
``deepbet`` (default)
    Encoder of the pretrained deepbet brain-extraction network (TorchScript, shipped by the ``deepbet``
    package at ``deepbet.utils.DATA_PATH/models/model.pt``). It is a residual UNet trained on ~1 mm T1 heads
    resized to 256^3; encoder stages (channels, stride): ``stem`` 7^3 conv+IN+ReLU (16, /2), ``init`` =
    stem+maxpool (16, /4), ``down0`` (16, /4), ``down1`` (32, /8), ``down2`` (64, /16), ``down3`` (128, /32).
    Default taps ``down0``, ``down1``, ``down2`` at the native input scale (see below).
    Input normalisation as ``deepbet.utils.normalize``: clip to [0, 1] (inputs are already robust-scaled),
    per-volume z-score, then ``0.226 * z + 0.449``.
``medicalnet_resnet10`` / ``medicalnet_resnet50``
    MedicalNet 3D ResNets (MONAI ``resnet10``/``resnet50`` with ``conv1_t_stride=2``, shortcut "B", no
    downsample bias), weights from ``weights_path`` or ``torch.hub.get_dir()/monai_checkpoints/
    medicalnet_resnet_{10,50}_23dataset.pth``. Taps ``stem`` (conv1+BN+ReLU), ``layer1`` .. ``layer4``;
    default ``layer1-layer3``. Input normalisation: per-volume z-score, as in MedicalNet.
``random``
    Randomly initialised (seed 0) MONAI resnet10 with the MedicalNet taps. Only for ablations / tests;
    ``pretrained`` is False and ``description`` says so.

All encoders use "same"-padded convolutions whose strided branches round up identically (ceil(n / 2)), so any
spatial size works without internal padding (e.g. 91x109x91).

Choice of the default deepbet taps (``bench/lpips_backbone_probe.py``, 4 IXI subjects at MNI 2 mm,
91x109x91, scaled to [0, 1] by the 99.5th percentile; per-layer distances):

======  ====  =====  =========  =========  ========  ========  ==========  ==========  ==========
tap     C     dead   noise .01  noise .1   blur 0.5  blur 2.0  subj/noise  blur1/subj  x2: s/n
======  ====  =====  =========  =========  ========  ========  ==========  ==========  ==========
stem    16    0      0.0003     0.0300     0.0005    0.0345    223         0.12        66
init    16    0      0.0004     0.0428     0.0006    0.0349    85          0.23        23
down0   16    0      0.0002     0.0183     0.0011    0.0607    298         0.22        50
down1   32    0      0.0001     0.0099     0.0010    0.0505    326         0.26        66
down2   64    0      0.0001     0.0046     0.0006    0.0283    349         0.32        67
down3   128   0      0.0000     0.0019     0.0002    0.0134    380         0.32        80
======  ====  =====  =========  =========  ========  ========  ==========  ==========  ==========

(subj/noise: distance between different subjects / distance to a copy with N(0, 0.01) noise; blur1/subj:
distance to a sigma = 1 voxel blurred copy / between-subject distance; "x2: s/n": subj/noise when the input
is first upsampled x2 to ~1 mm.)

* No tap has dead or near-constant channels at 2 mm, and every tap grows monotonically with noise
  (0.01/0.03/0.1) and blur (sigma 0.5/1/2), at 2 mm and upsampled.
* ``down0``-``down2`` separate anatomy from imperceptible noise best among the spatially resolved taps
  (subj/noise 298-349) and register blur most strongly (blur1/subj 0.22-0.32, 2-3x ``stem``).
  ``init`` (= max-pooled ``stem``) is the most noise-sensitive (subj/noise 85) and is left out; ``down3``
  is a 3x4x3 map at 2 mm (1 voxel for a 32^3 input), nearly a global descriptor, with the same blur1/subj
  as ``down2``, so it is left out too.
* Upsampling x2 to deepbet's ~1 mm scale makes every tap 3-6x more noise-sensitive relative to anatomy
  (subj/noise 23-80), improves blur1/subj of the chosen taps only 1.1-1.3x, and costs 4-11x time
  (fwd+bwd on a 91x109x91 pair, 2 shared CPU threads: 0.3-0.9 s native vs 3.1-4.3 s upsampled, depending on
  load), so the default is the native scale (``upsample=1``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEEPBET_TAPS: tuple[str, ...] = ("stem", "init", "down0", "down1", "down2", "down3")
MEDICALNET_TAPS: tuple[str, ...] = ("stem", "layer1", "layer2", "layer3", "layer4")
_DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    "deepbet": ("down0", "down1", "down2"),
    "medicalnet_resnet10": ("layer1", "layer2", "layer3"),
    "medicalnet_resnet50": ("layer1", "layer2", "layer3"),
    "random": ("layer1", "layer2", "layer3"),
}
_MEDICALNET_DEPTHS: dict[str, int] = {"medicalnet_resnet10": 10, "medicalnet_resnet50": 50}


def medicalnet_cache_path(depth: int) -> Path:
    """Return the torch-hub cache location MONAI uses for a MedicalNet checkpoint.

    Args:
        depth: ResNet depth, 10 or 50.

    Returns:
        ``torch.hub.get_dir()/monai_checkpoints/medicalnet_resnet_{depth}_23dataset.pth`` (honours ``TORCH_HOME``).
    """
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


def _per_volume_zscore(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Z-score each sample over all of its voxels. ``x``: (B, C, D, H, W) -> same shape."""
    dims = tuple(range(1, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (std + eps)


def normalize_channels(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise a feature map over channels, as ``lpips.normalize_tensor``.

    Args:
        feat: (B, C, d, h, w) features.
        eps: added to the norm; all-zero feature vectors (e.g. ReLU background) map to 0 with zero gradient.

    Returns:
        (B, C, d, h, w) features with unit L2 norm over C (or 0).
    """
    return feat / (torch.linalg.vector_norm(feat, dim=1, keepdim=True) + eps)


class _DeepbetEncoder(nn.Module):
    """Multi-depth feature extractor calling the encoder submodules of the scripted deepbet UNet.

    The traced stages take deepbet's shared ReLU module as first argument (``stage(relu, x)``).
    """

    def __init__(self, net: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, taps: Sequence[str]) -> list[torch.Tensor]:
        """Args: x (B, 1, D, H, W) deepbet-normalised. Returns the requested taps in order of ``taps``."""
        relu = getattr(self.net.conv, "2")
        init = self.net.init
        last = max(DEEPBET_TAPS.index(t) for t in taps)
        out: dict[str, torch.Tensor] = {}
        h = torch.relu(getattr(init, "1")(getattr(init, "0")(x)))
        out["stem"] = h
        h = out["init"] = getattr(init, "3")(h)
        for name in DEEPBET_TAPS[2 : last + 1]:
            h = out[name] = getattr(self.net, name)(relu, h)
        return [out[t] for t in taps]


class _ResNetEncoder(nn.Module):
    """Multi-depth feature extractor for a MONAI ``ResNet`` (MedicalNet layout)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, taps: Sequence[str]) -> list[torch.Tensor]:
        """Args: x (B, 1, D, H, W) z-scored. Returns the requested taps in order of ``taps``."""
        net = self.net
        last = max(MEDICALNET_TAPS.index(t) for t in taps)
        out: dict[str, torch.Tensor] = {}
        h = out["stem"] = net.act(net.bn1(net.conv1(x)))
        h = net.maxpool(h)
        for name in MEDICALNET_TAPS[1 : last + 1]:
            h = out[name] = getattr(net, name)(h)
        return [out[t] for t in taps]


def _build_resnet(depth: int) -> nn.Module:
    """MONAI ResNet with MedicalNet's configuration (no classification head)."""
    from monai.networks.nets import resnet10, resnet50

    builder = {10: resnet10, 50: resnet50}[depth]
    return builder(
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
        upsample: integer factor for internal trilinear upsampling before the backbone (1 = none).
        eps: epsilon of the channel normalisation.

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
        upsample: int = 1,
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        if backbone not in _DEFAULT_LAYERS:
            raise ValueError(f"Unknown backbone {backbone!r}; choose one of {sorted(_DEFAULT_LAYERS)}.")
        if not isinstance(upsample, int) or upsample < 1:
            raise ValueError(f"upsample must be an integer >= 1, got {upsample!r}.")
        taps = DEEPBET_TAPS if backbone == "deepbet" else MEDICALNET_TAPS
        layers = tuple(layers) if layers is not None else _DEFAULT_LAYERS[backbone]
        bad = [name for name in layers if name not in taps]
        if not layers or bad:
            raise ValueError(f"layers must be a non-empty subset of {taps} for {backbone!r}, got {layers}.")

        self.backbone_name = backbone
        self.pretrained = backbone != "random"
        self.layers = layers
        self.upsample = upsample
        self.eps = eps

        if backbone == "deepbet":
            path = Path(weights_path) if weights_path is not None else _deepbet_default_path()
            if not path.is_file():
                raise FileNotFoundError(
                    f"deepbet model not found at {path}. Install the `deepbet` package (its model lives at "
                    f"deepbet.utils.DATA_PATH/models/model.pt) or pass weights_path=<path to model.pt>."
                )
            self.encoder: nn.Module = _DeepbetEncoder(torch.jit.load(str(path), map_location="cpu"))
        elif backbone == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.encoder = _ResNetEncoder(_build_resnet(10))
        else:
            self.encoder = _ResNetEncoder(_load_medicalnet(_MEDICALNET_DEPTHS[backbone], weights_path))

        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()

        scale = f", x{upsample} upsampled" if upsample > 1 else ""
        status = "" if self.pretrained else " — NOT pretrained"
        self.description = f"LPIPS3D[{backbone} {'+'.join(layers)}{scale}{status}]"

    def train(self, mode: bool = True) -> LPIPS3D:
        """Set ``self.training`` but keep the frozen backbone in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] intensities to the backbone's input distribution. (B, 1, D, H, W) -> same (or upsampled)."""
        x = x.float().clamp(0.0, 1.0)
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="trilinear", align_corners=False)
        x = _per_volume_zscore(x)
        if self.backbone_name == "deepbet":
            x = 0.226 * x + 0.449
        return x

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone features at ``self.layers``.

        Args:
            x: (B, 1, D, H, W) intensities in [0, 1].

        Returns:
            One (B, C_l, d_l, h_l, w_l) tensor per layer.
        """
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"Expected a (B, 1, D, H, W) volume, got shape {tuple(x.shape)}.")
        return self.encoder(self._prepare(x), self.layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
        """Perceptual distance between ``x`` and ``y``.

        Args:
            x: (B, 1, D, H, W) volume in [0, 1] (e.g. reconstruction).
            y: (B, 1, D, H, W) volume in [0, 1] (e.g. target), same shape as ``x``.
            per_layer: return the per-layer terms instead of their sum.

        Returns:
            (B,) distances, or (B, L) if ``per_layer``.
        """
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
        feats = self.features(torch.cat([x, y], dim=0))
        batch = x.shape[0]
        terms = []
        with torch.autocast(device_type=x.device.type, enabled=False):
            for feat in feats:
                feat = normalize_channels(feat.float(), self.eps)
                diff = (feat[:batch] - feat[batch:]).pow(2).sum(dim=1)
                terms.append(diff.mean(dim=(1, 2, 3)))
        dist = torch.stack(terms, dim=1)
        return dist if per_layer else dist.sum(dim=1)
