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


def _show_row(
    figure: plt.Figure, axes: np.ndarray, array: np.ndarray, label: str, cmap: str, vmax: float
) -> None:
    """The sagittal, coronal and axial slices through the centre of ``array`` (RAS) on [0, ``vmax``] in a row
    of three ``axes``, with a colour bar."""
    views = [np.take(array, size // 2, axis=i).T for i, size in enumerate(array.shape)]
    for axis, view, name in zip(axes, views, ("sagittal", "coronal", "axial"), strict=True):
        shown = axis.imshow(view, cmap=cmap, vmin=0.0, vmax=vmax, origin="lower")
        axis.set_axis_off()
        axis.set_title(f"{label} — {name}", fontsize=8)
    figure.colorbar(shown, ax=list(axes), fraction=0.02)


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
    if difference_of is not None:
        first, second = difference_of
        arrays[f"|{first} − {second}|"] = np.abs(arrays[first] - arrays[second])
    image_max = max(float(np.max(arrays[name])) for name in volumes) or 1.0
    figure, axes = plt.subplots(len(arrays), 3, figsize=(9, 3 * len(arrays)), squeeze=False)
    for row, (name, array) in enumerate(arrays.items()):
        image = name in volumes  # else the difference row
        vmax = image_max if image else float(np.max(array)) or 1.0
        _show_row(figure, axes[row], array, name, "gray" if image else "magma", vmax)
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
    layers = [(name, mask, True) for name, mask in (filled or {}).items()]
    layers += [(name, mask, False) for name, mask in (outlined or {}).items()]
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.4), squeeze=False)
    _show_row(figure, axes[0], image, background_label, cmap, float(image.max()) or 1.0)
    handles = []
    for index, (name, mask, is_filled) in enumerate(layers):
        colour = REGION_COLOURS[index % len(REGION_COLOURS)]
        region = (_as_volume(mask) > 0.5).astype(np.float32)
        for i, axis in enumerate(axes[0]):  # the slices of _show_row
            view = np.take(region, image.shape[i] // 2, axis=i).T
            if is_filled:
                rgba = np.zeros((*view.shape, 4), dtype=np.float32)
                rgba[..., :3] = matplotlib.colors.to_rgb(colour)
                rgba[..., 3] = 0.45 * view
                axis.imshow(rgba, origin="lower")
            elif view.any():
                axis.contour(view, levels=[0.5], colors=[colour], linewidths=0.8)
        label = f"{name} ({'filled' if is_filled else 'outline'})"
        handles.append(
            matplotlib.patches.Patch(facecolor=colour if is_filled else "none", edgecolor=colour, label=label)
        )
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
