"""Probe how the deepbet encoder's features behave on 2 mm MNI T1 volumes, to choose LPIPS3D's default taps.

For every candidate tap, at native 2 mm and after x2 trilinear upsampling (~1 mm, deepbet's training scale):

* dead: fraction of channels that are constant over all voxels of all probe subjects;
* noise s: LPIPS term between a volume and a copy with additive Gaussian noise of std s (in [0, 1] units);
* blur s: LPIPS term between a volume and a Gaussian-blurred copy (sigma s voxels);
* lowvar: fraction of channels whose std is below 1% of the largest channel std (nearly dead);
* subj/noise: mean distance between different subjects divided by the distance to the 0.01-noised copy
  (how much larger anatomy differences are than imperceptible noise);
* blur1/subj: distance to the sigma=1 blurred copy divided by the between-subject distance (how strongly
  the blur typical of VAE reconstructions registers, relative to anatomical differences).

Finally times (min and median of 5) one LPIPS forward+backward on a (1, 1, 91, 109, 91) pair for the default configuration.

Usage: ``python bench/lpips_backbone_probe.py [--data DIR] [--n 4]``
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.lpips3D import DEEPBET_TAPS, LPIPS3D  # noqa: E402

NOISE = (0.01, 0.03, 0.1)
BLUR = (0.5, 1.0, 2.0)


def load_volume(path: Path) -> torch.Tensor:
    """Load a NIfTI as (1, 1, D, H, W) float32 scaled to [0, 1] by its 99.5th percentile."""
    arr = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    arr = np.clip(arr / np.percentile(arr, 99.5), 0.0, 1.0)
    return torch.from_numpy(arr)[None, None]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 3D Gaussian blur of a (B, 1, D, H, W) tensor, sigma in voxels."""
    radius = int(np.ceil(3 * sigma))
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


@torch.no_grad()
def probe(vols: list[torch.Tensor], upsample: int) -> dict[str, dict[str, float]]:
    """Return per-tap statistics (see module docstring) for one input scale."""
    lp = LPIPS3D(layers=DEEPBET_TAPS, upsample=upsample)
    gen = torch.Generator().manual_seed(0)
    stats: dict[str, list] = {k: [] for k in ["noise", "blur", "self01"]}
    feats = [lp.features(v) for v in vols]
    for v in vols:
        noisy = [(v + s * torch.randn(v.shape, generator=gen)).clamp(0, 1) for s in NOISE]
        stats["noise"].append(torch.cat([lp(n, v, per_layer=True) for n in noisy]))
        stats["blur"].append(torch.cat([lp(gaussian_blur(v, s), v, per_layer=True) for s in BLUR]))
    noise = torch.stack(stats["noise"]).mean(0)  # (len(NOISE), L)
    blur = torch.stack(stats["blur"]).mean(0)
    pairs = [lp(a, b, per_layer=True) for a, b in itertools.combinations(vols, 2)]
    subj = torch.cat(pairs).mean(0)  # (L,)
    out = {}
    for i, tap in enumerate(DEEPBET_TAPS):
        f = torch.cat([fv[i] for fv in feats]).transpose(0, 1).flatten(1)  # (C, N)
        dead = (f.amax(1) - f.amin(1) <= 1e-6 * (f.abs().amax() + 1e-12)).float().mean().item()
        std = f.std(1)
        row = {"C": f.shape[0], "dead": dead, "lowvar": (std < 0.01 * std.max()).float().mean().item()}
        row.update({f"noise {s}": noise[j, i].item() for j, s in enumerate(NOISE)})
        row.update({f"blur {s}": blur[j, i].item() for j, s in enumerate(BLUR)})
        row["subj/noise"] = (subj[i] / noise[0, i]).item()
        row["blur1/subj"] = (blur[BLUR.index(1.0), i] / subj[i]).item()
        out[tap] = row
    return out


def time_fwd_bwd(lp: LPIPS3D, repeats: int = 5) -> tuple[float, float]:
    """(min, median) seconds of one LPIPS forward+backward on a (1, 1, 91, 109, 91) pair (grad w.r.t. input).

    The minimum is the least affected by other processes sharing the CPU.
    """
    x = torch.rand(1, 1, 91, 109, 91, requires_grad=True)
    y = torch.rand(1, 1, 91, 109, 91)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        lp(x, y).mean().backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:]), float(np.median(times[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ixi" / "images"
    parser.add_argument("--data", type=Path, default=default_data)
    parser.add_argument("--n", type=int, default=4, help="number of subjects")
    parser.add_argument("--time-only", action="store_true", help="only run the fwd+bwd timings")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.time_only:
        report_timings()
        return
    files = sorted(args.data.glob("*.nii.gz"))[: args.n]
    if len(files) < 2:
        raise SystemExit(f"need >= 2 volumes in {args.data}")
    vols = [load_volume(f) for f in files]
    print(
        f"{len(vols)} subjects from {args.data}, shape {tuple(vols[0].shape[2:])}, torch threads {torch.get_num_threads()}"
    )
    for up in (1, 2):
        res = probe(vols, up)
        cols = list(next(iter(res.values())))
        print(f"\n== deepbet taps, input x{up} ({'2 mm' if up == 1 else '~1 mm'}) ==")
        print(f"{'tap':<6}" + "".join(f"{c:>11}" for c in cols))
        for tap, row in res.items():
            cells = "".join(f"{row[c]:>11d}" if c == "C" else f"{row[c]:>11.4f}" for c in cols)
            print(f"{tap:<6}{cells}")
    print()
    report_timings()


def report_timings() -> None:
    """Print fwd+bwd times for the default taps, all spatially resolved taps, and x2 upsampling."""
    print(f"torch threads {torch.get_num_threads()}")
    for lp in (LPIPS3D(), LPIPS3D(layers=("stem", "down0", "down1", "down2", "down3")), LPIPS3D(upsample=2)):
        best, median = time_fwd_bwd(lp)
        print(f"{lp.description}: fwd+bwd (1,1,91,109,91) pair = {best:.2f} s min, {median:.2f} s median")


if __name__ == "__main__":
    main()
