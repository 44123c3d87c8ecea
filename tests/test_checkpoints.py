"""checkpoints.py: atomic save, weights_only load, clear errors, resume into a TrainState, loading a VAE."""

from __future__ import annotations

import argparse
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL, flip_byte_in_largest_tensor, tiny_checkpoint, tiny_maisi

from checkpoints import CheckpointError, init_vae_weights, load_checkpoint, load_vae, save_checkpoint
from config import Config, ConfigError, ModelConfig
from model import build_vae
from utils import get_rng_state

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_checkpoint_round_trip_weights_only(tmp_path):
    payload = {"weights": torch.arange(5.0), "config": {"a": [1, 2], "b": None}, "rng": get_rng_state()}
    save_checkpoint(payload, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["weights"], payload["weights"])
    assert loaded["config"] == payload["config"]
    assert list(tmp_path.iterdir()) == [tmp_path / "c.pt"]  # no temporary file left behind


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt.*code execution"):
        load_checkpoint(path)


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)

    def disk_full(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*unchanged"):
        save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(load_checkpoint(path)["step"]) == 1
    assert list(tmp_path.iterdir()) == [path]


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    """A process killed in the middle of writing leaves the old checkpoint loadable."""
    path = tmp_path / "last.pt"
    save_checkpoint({"step": torch.tensor(1)}, path)
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        import checkpoints
        def killed_mid_write(obj, file, *args, **kwargs):
            file.write(b"x" * 4096)
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed_mid_write
        checkpoints.save_checkpoint({{"step": torch.tensor(2)}}, {str(path)!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True)
    assert result.returncode == -signal.SIGKILL
    assert int(load_checkpoint(path)["step"]) == 1


# ------------------------------------------------------------------------------------------- train.init_from


def tiny_model(**changes) -> ModelConfig:
    return Config.from_dict({"model": {**TINY_MODEL, **changes}}).model


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "state_dict+module."])
def test_init_from_a_maisi_state_dict_gives_monais_outputs(tmp_path, wrapped):
    """MONAI's AutoencoderKlMaisi is the oracle: after init_vae_weights our VAE encodes and decodes like it."""
    maisi = tiny_maisi()
    state_dict = maisi.state_dict()
    if wrapped:  # how released checkpoints often come: under "state_dict", saved from a DDP-wrapped model
        state_dict = {"state_dict": {f"module.{key}": value for key, value in state_dict.items()}}
    torch.save(state_dict, tmp_path / "maisi.pt")
    model = tiny_model()
    torch.manual_seed(1)
    vae = build_vae(model).eval()
    assert init_vae_weights(vae, tmp_path / "maisi.pt", model) == "MAISI state dict"
    x = torch.rand(2, 1, 16, 12, 10)
    with torch.no_grad():
        mu_ref, sigma_ref = maisi.encode(x)
        mu, sigma = vae.encode(x)
        decoded_ref, decoded = maisi.decode(mu_ref), vae.decode(mu)
    assert mu.shape == (2, 2, 8, 6, 5) and decoded.shape == x.shape
    for ours, reference in ((mu, mu_ref), (sigma, sigma_ref), (decoded, decoded_ref)):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_init_from_our_checkpoint_copies_its_vae_weights(tmp_path):
    path = tiny_checkpoint(tmp_path / "best_model.pt")
    model = tiny_model()
    torch.manual_seed(1)
    vae = build_vae(model)
    assert init_vae_weights(vae, path, model) == "brain-vae3d checkpoint"
    saved = load_checkpoint(path)["vae"]
    assert vae.state_dict().keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(vae.state_dict()[name], tensor), name


def test_init_from_mismatches_are_clear_errors(tmp_path):
    ours = tiny_checkpoint(tmp_path / "best_model.pt")  # latent_channels 2
    with pytest.raises(ConfigError, match=r"train\.init_from .*best_model\.pt .*latent_channels: 2 → 3"):
        init_vae_weights(build_vae(tiny_model(latent_channels=3)), ours, tiny_model(latent_channels=3))

    torch.save(tiny_maisi(channels=(8, 32)).state_dict(), tmp_path / "wide.pt")  # the run has (8, 16)
    with pytest.raises(CheckpointError) as error:
        init_vae_weights(build_vae(tiny_model()), tmp_path / "wide.pt", tiny_model())
    message = str(error.value)
    assert "train.init_from" in message and "wide.pt (converted from the MAISI layout)" in message
    assert "shape mismatches [" in message
    assert "decoder.conv_in.weight: (32, 2, 3, 3, 3) vs model (16, 2, 3, 3, 3)" in message

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError,
        match=r"train\.init_from .*other\.pt is not a MAISI AutoencoderKlMaisi state dict: encoder",
    ):
        init_vae_weights(build_vae(tiny_model()), tmp_path / "other.pt", tiny_model())

    with pytest.raises(CheckpointError, match=r"train\.init_from: no checkpoint .* at .*nope\.pt"):
        init_vae_weights(build_vae(tiny_model()), tmp_path / "nope.pt", tiny_model())


def test_a_maisi_state_dict_the_converter_cannot_map_is_one_clear_error_for_inference_too(tmp_path):
    """load_vae (infer.py, save_latent.py) and init_vae_weights refuse it alike: CheckpointError naming the file."""
    state_dict = tiny_maisi().state_dict()
    state_dict["encoder.blocks.1.to_q.weight"] = torch.zeros(16, 16)  # an attention block: not converted
    torch.save(state_dict, tmp_path / "attention.pt")
    with pytest.raises(
        CheckpointError, match=r"attention\.pt is not a MAISI AutoencoderKlMaisi state dict: "
    ):
        load_vae(tmp_path / "attention.pt", maisi_model=tiny_model())
    with pytest.raises(
        CheckpointError, match=r"attention\.pt is not a MAISI AutoencoderKlMaisi state dict: "
    ):
        init_vae_weights(build_vae(tiny_model()), tmp_path / "attention.pt", tiny_model())


def write_bad_checkpoint(kind: str, folder: Path) -> tuple[Path, str]:
    """A file that is not a usable checkpoint; returns (path, expected message after the path)."""
    path = folder / f"{kind}.pt"
    if kind == "empty":
        path.write_bytes(b"")
        return path, f"{path} is empty (0 bytes)"
    if kind == "text":  # what torch.load used to report as IndexError: pop from empty list
        path.write_text("subject_id,image\nsub-01,sub-01.nii.gz\n")
        return path, f"{path} is not a PyTorch checkpoint (not a zip/pickle file)"
    torch.save({"format": "brain-vae3d/1", "config": argparse.Namespace(x=1), "payload": Evil()}, path)
    return path, (
        f"refusing to load {path}: it contains pickled Python objects (argparse.Namespace, posix.system) "
        "that would need code execution to load; only plain tensors and JSON-like metadata are accepted"
    )


@pytest.mark.parametrize("kind", ["empty", "text", "pickled"])
def test_bad_checkpoint_is_one_clear_line(tmp_path, kind):
    path, expected = write_bad_checkpoint(kind, tmp_path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert str(error.value) == expected


def test_checkpoint_with_a_flipped_bit_is_refused_by_every_loader(tmp_path):
    """torch.load does not check the zip's CRC-32s, so one flipped bit in a weight loaded silently. The one safe
    load refuses it for every user: load_checkpoint (train.py --resume), load_vae (infer.py, save_latent.py,
    the notebook) and init_vae_weights (train.init_from), naming the file and the record."""
    path = tiny_checkpoint(tmp_path / "vae.pt")
    record = flip_byte_in_largest_tensor(path)
    loaders = {
        "load_checkpoint": lambda: load_checkpoint(path),
        "load_vae": lambda: load_vae(path),
        "init_vae_weights": lambda: init_vae_weights(build_vae(tiny_model()), path, tiny_model()),
    }
    for name, load in loaders.items():
        with pytest.raises(CheckpointError) as error:
            load()
        assert str(error.value).startswith(f"{path} is damaged: its record {record!r} fails the CRC-32"), name


def test_checkpoint_with_a_damaged_zip_directory_is_one_clear_line(tmp_path):
    """A flipped byte in the archive's structure (a central-directory signature), which the CRC check reads
    first: still one line naming the file, no traceback."""
    path = tiny_checkpoint(tmp_path / "vae.pt")
    data = bytearray(path.read_bytes())
    data[data.rindex(b"PK\x01\x02")] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"^could not read checkpoint {path} \\(damaged\\?\\): "):
        load_checkpoint(path)


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_checkpoint_file_mode_follows_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_checkpoint({"step": torch.tensor(1)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o666 & ~umask
