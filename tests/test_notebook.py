"""visualize_recon.ipynb: committed without outputs, and runs end to end on a tiny checkpoint (CPU)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from helpers import make_split, tiny_checkpoint
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "visualize_recon.ipynb"


def test_committed_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "clear the notebook's outputs"


def test_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel ('python3', mapped by jupyter_client to this interpreter) inherits the VAE_* variables."""
    monkeypatch.setenv("VAE_CHECKPOINT", str(tiny_checkpoint(tmp_path / "vae.pt")))
    monkeypatch.setenv("VAE_DATA", str(make_split(tmp_path / "data", 2)))
    monkeypatch.setenv("VAE_DEVICE", "cpu")
    monkeypatch.setenv("VAE_MAX_SUBJECTS", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(REPO_ROOT)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(notebook, tmp_path / "executed.ipynb")  # for a look when it fails
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= 5  # slices, error profile, latent montage, interpolation, histograms
