"""Cost of the CRC-32 check in ``checkpoints.load_checkpoint`` for the default model's training checkpoint.

    python -m bench.checkpoint_load [--config_file config.json] [--repeats 5] [--dir /tmp]

Builds the config's training state (``train.build_state``: VAE, discriminator, fused AdamW), gives both
optimisers their moments (one step on zero gradients), writes ``last.pt`` through ``checkpoints.save_checkpoint``
(``training_checkpoint``) into a temporary folder under ``--dir``, then times ``load_checkpoint`` as users run
it and the same function with the CRC check switched off, interleaved, file in the page cache (a cold read adds
the disk's read time to both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

import checkpoints
import train
from bench import harness
from config import load_config


def write_training_checkpoint(config_file: str, path: Path) -> None:
    """``last.pt`` of the config's model with optimiser moments, as ``train.py`` writes it."""
    config = load_config(config_file, [])
    state = train.build_state(config, torch.device("cpu"))
    for optimizer in (state.optimizer_g, state.optimizer_d):
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
    payload = checkpoints.training_checkpoint(state, config, train.SINGLE_PROCESS, "pretrain", None)
    checkpoints.save_checkpoint(payload, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", default="config.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary checkpoint goes")
    args = parser.parse_args(argv)
    cpu = torch.device("cpu")
    print("machine:", json.dumps(harness.machine_info(cpu)))
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "last.pt"
        write_training_checkpoint(args.config_file, path)
        checkpoints.load_checkpoint(path)  # warm-up: the file in the page cache
        seconds: dict[str, list[float]] = {"with the CRC check": [], "without": []}
        for _ in range(args.repeats):
            for name in seconds:
                check = checkpoints.check_archive_crcs if name == "with the CRC check" else lambda path: None
                with mock.patch.object(checkpoints, "check_archive_crcs", check):
                    seconds[name].append(harness.timed(lambda: checkpoints.load_checkpoint(path), cpu)[0])
        size = path.stat().st_size
    with_check, without = (statistics.median(values) for values in seconds.values())
    print(
        f"{args.config_file}: last.pt {size / 2**20:.1f} MiB; load_checkpoint median of {args.repeats}: "
        f"{with_check * 1e3:.0f} ms with the CRC check, {without * 1e3:.0f} ms without "
        f"(+{(with_check - without) * 1e3:.0f} ms, {with_check / without:.2f}x); load {harness.load_average()}"
    )
    for name, values in seconds.items():
        print(f"  {name}: " + ", ".join(f"{value * 1e3:.0f}" for value in values) + " ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
