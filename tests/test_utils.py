"""Run-time plumbing: RNG state round trip (through a checkpoint file), AMP resolution."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import load_checkpoint, save_checkpoint
from utils import get_rng_state, resolve_amp_dtype, set_rng_state

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_rng_state_round_trip_through_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint({"rng": get_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_amp_resolution():
    cpu = torch.device("cpu")
    assert resolve_amp_dtype("auto", cpu) is None
    assert resolve_amp_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_amp_dtype("none", cpu) is None
    with pytest.raises(ValueError, match="fp16"):
        resolve_amp_dtype("fp16", cpu)
