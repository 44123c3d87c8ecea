"""Orthogonal-slice figures of volumes (training previews, notebook, benchmarks)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def _as_volume(volume: torch.Tensor | np.ndarray) -> np.ndarray:
    array = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    array = np.squeeze(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume (optionally with singleton axes), got shape {array.shape}")
    return array.astype(np.float32)


def orthogonal_slices_figure(
    volumes: dict[str, torch.Tensor | np.ndarray],
    path: str | Path | None = None,
    difference_of: tuple[str, str] | None = None,
    title: str | None = None,
) -> plt.Figure:
    """One row per volume, columns = sagittal, coronal, axial slices through the centre (RAS volumes).

    Args:
        volumes: name → (D, H, W) or (1, D, H, W) volume; image rows share one colour scale [0, max].
        difference_of: (a, b) adds a row |a − b| with its own colour scale.
        path: where to save the PNG (parent folders are created); None → only return the figure.
    """
    arrays = {name: _as_volume(v) for name, v in volumes.items()}
    image_max = max(float(np.max(array)) for array in arrays.values()) or 1.0
    difference_max = None
    if difference_of is not None:
        first, second = difference_of
        arrays[f"|{first} − {second}|"] = difference = np.abs(arrays[first] - arrays[second])
        difference_max = float(np.max(difference)) or 1.0
    figure, axes = plt.subplots(len(arrays), 3, figsize=(9, 3 * len(arrays)), squeeze=False)
    for row, (name, array) in enumerate(arrays.items()):
        is_difference = name not in volumes
        cx, cy, cz = (s // 2 for s in array.shape)
        slices = (array[cx, :, :].T, array[:, cy, :].T, array[:, :, cz].T)
        vmax = difference_max if is_difference else image_max
        cmap = "magma" if is_difference else "gray"
        for column, (view, label) in enumerate(zip(slices, ("sagittal", "coronal", "axial"), strict=True)):
            axis = axes[row, column]
            shown = axis.imshow(view, cmap=cmap, vmin=0.0, vmax=vmax, origin="lower")
            axis.set_axis_off()
            axis.set_title(f"{name} — {label}", fontsize=8)
        figure.colorbar(shown, ax=axes[row, :].tolist(), fraction=0.02)
    return _finish(figure, title, path)


REGION_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:cyan", "tab:olive")


def regions_figure(
    background: torch.Tensor | np.ndarray,
    filled: dict[str, torch.Tensor | np.ndarray] | None = None,
    outlined: dict[str, torch.Tensor | np.ndarray] | None = None,
    path: str | Path | None = None,
    title: str | None = None,
    background_label: str = "input",
    cmap: str = "gray",
) -> plt.Figure:
    """Sagittal, coronal and axial slices through the centre of ``background`` with regions drawn on it.

    Args:
        background: (D, H, W) or (1, D, H, W) volume (RAS), shown on [0, max] with ``cmap``.
        filled: region name → (D, H, W) mask, drawn as translucent colour; outlined: the same, as contours.
        path: where to save the PNG (parent folders are created); None → only return the figure.
    """
    image = _as_volume(background)
    layers = [(name, _as_volume(mask) > 0.5, True) for name, mask in (filled or {}).items()]
    layers += [(name, _as_volume(mask) > 0.5, False) for name, mask in (outlined or {}).items()]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4), squeeze=False)
    cx, cy, cz = (s // 2 for s in image.shape)
    views = (lambda a: a[cx, :, :].T, lambda a: a[:, cy, :].T, lambda a: a[:, :, cz].T)
    for column, (view, label) in enumerate(zip(views, ("sagittal", "coronal", "axial"), strict=True)):
        axis = axes[0, column]
        shown = axis.imshow(view(image), cmap=cmap, vmin=0.0, vmax=float(image.max()) or 1.0, origin="lower")
        for index, (_, mask, is_filled) in enumerate(layers):
            colour = REGION_COLOURS[index % len(REGION_COLOURS)]
            region = view(mask).astype(np.float32)
            if is_filled:
                rgba = np.zeros((*region.shape, 4), dtype=np.float32)
                rgba[..., :3] = matplotlib.colors.to_rgb(colour)
                rgba[..., 3] = 0.45 * region
                axis.imshow(rgba, origin="lower")
            elif region.any():
                axis.contour(region, levels=[0.5], colors=[colour], linewidths=0.8)
        axis.set_axis_off()
        axis.set_title(f"{background_label} — {label}", fontsize=8)
    figure.colorbar(shown, ax=axes[0, :].tolist(), fraction=0.02)
    handles = [
        matplotlib.patches.Patch(
            facecolor=REGION_COLOURS[i % len(REGION_COLOURS)] if is_filled else "none",
            edgecolor=REGION_COLOURS[i % len(REGION_COLOURS)],
            label=f"{name} ({'filled' if is_filled else 'outline'})",
        )
        for i, (name, _, is_filled) in enumerate(layers)
    ]
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    return _finish(figure, title, path)


def _finish(figure: plt.Figure, title: str | None, path: str | Path | None) -> plt.Figure:
    """Title the figure and save it as a PNG at ``path`` (parent folders created) when one is given."""
    if title:
        figure.suptitle(title, fontsize=9)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=90)
    return figure
