"""Throughput (volumes/s) of save_latent.py's encode path, I/O included, for a few batch sizes / worker counts.

    python bench/bench_encode.py [--csv ../shared/data/ixi/train.csv] [--rows 8] [--batch_sizes 1 2 4]
        [--num_workers 0 2] [--device auto] [--amp auto]

The model is the default config's VAE with random weights (a checkpoint written on the fly to a temp dir); each
setting runs ``save_latent.main`` end to end (model load, pre-flight, preprocessing in DataLoader workers,
encoding, atomic latent writes, statistics, manifest) on the first ``--rows`` rows, after a one-volume warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import save_latent  # noqa: E402
from checkpoints import inference_checkpoint, save_checkpoint  # noqa: E402
from config import Config  # noqa: E402
from dataset import read_split  # noqa: E402
from model import build_vae  # noqa: E402
from utils import resolve_device  # noqa: E402


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def timed_run(argv: list[str]) -> float:
    """Seconds for one quiet ``save_latent.main(argv)``; raises if it fails."""
    sink = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            code = save_latent.main(argv)
        except SystemExit as exit_:  # a usage error
            code = exit_.code
    if code != 0:
        raise RuntimeError(f"save_latent failed (exit {code}):\n{sink.getvalue()[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--csv", default=str(REPO_ROOT.parent / "shared" / "data" / "ixi" / "train.csv"))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--num_workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    args = parser.parse_args()

    device = resolve_device(args.device)
    config = Config()
    with tempfile.TemporaryDirectory() as temp:
        temp_dir = Path(temp)
        frame = read_split(args.csv).head(args.rows)  # absolute paths
        split, warmup_split = temp_dir / "split.csv", temp_dir / "warmup.csv"
        frame.to_csv(split, index=False)
        frame.head(1).to_csv(warmup_split, index=False)
        torch.manual_seed(0)
        checkpoint = temp_dir / "random_vae.pt"
        save_checkpoint(inference_checkpoint(build_vae(config.model), config, None), checkpoint)
        common = ["--model_checkpoint", str(checkpoint), "--device", args.device, "--amp", args.amp]
        common += ["--overwrite", "--dataset"]

        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
        print(
            f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, device {device} (GPU: {gpu}), amp {args.amp}"
        )
        print(
            f"data: first {len(frame)} rows of {args.csv}; model: default config, channels "
            f"{list(config.model.channels)}, latent {config.model.latent_channels} channels, input "
            f"{tuple(config.preprocessing.target_shape)}"
        )
        timed_run(
            [*common, str(warmup_split), "--output_dir", str(temp_dir / "warmup"), "--num_workers", "0"]
        )
        print(f"{'batch_size':>10} {'num_workers':>11} {'seconds':>8} {'volumes/s':>9}")
        for batch_size in args.batch_sizes:
            for workers in args.num_workers:
                out = temp_dir / f"b{batch_size}_w{workers}"
                setting = ["--batch_size", str(batch_size), "--num_workers", str(workers)]
                seconds = timed_run([*common, str(split), "--output_dir", str(out), *setting])
                print(
                    f"{batch_size:>10} {workers:>11} {seconds:>8.2f} {len(frame) / seconds:>9.2f}", flush=True
                )


if __name__ == "__main__":
    main()
