"""Run-time plumbing shared by every script: device, AMP, seeding, RNG state, DDP, new-file mode.

Checkpoint files are owned by ``checkpoints.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but no CUDA GPU is available")
    return torch.device(name)


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` in {auto, bf16, fp16, none}; None means full fp32.

    ``auto``: bf16 on a GPU that supports it, else fp16 on GPU; fp32 on CPU (CPU bf16 is opt-in: it is
    supported but not faster for 3D convolutions on every CPU).
    """
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' or 'none' on CPU")
    if amp == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"auto": None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Every RNG state as tensors / plain Python values, so that ``weights_only=True`` can load it."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))  # needs tuples: a round trip may give lists
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(context: DistributedContext) -> list[dict[str, Any]]:
    """Every rank's :func:`get_rng_state`, in rank order (collective under DDP: all ranks must call it)."""
    if not context.is_distributed:
        return [get_rng_state()]
    states: list[Any] = [None] * context.world_size
    dist.all_gather_object(states, get_rng_state())
    return states


@dataclass
class DistributedContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device_name: str = "auto") -> DistributedContext:
    """Initialise DDP when launched by ``torchrun`` (NCCL + gloo on GPU, gloo on CPU); a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # on GPU, NCCL for CUDA tensors and gloo for the CPU tensors that validation reduces
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def setup_logging(context: DistributedContext, log_file: Path) -> None:
    """Log to stderr, and on rank 0 also to ``log_file``; under torchrun only rank 0 reports progress, the other
    ranks speak up only for warnings and errors (prefixed with their rank)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if context.is_main:
        handlers.append(logging.FileHandler(log_file))
    level, rank = (logging.INFO, "") if context.is_main else (logging.WARNING, f"[rank {context.rank}] ")
    logging.basicConfig(level=level, format=f"%(asctime)s {rank}%(message)s", handlers=handlers, force=True)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_process_first(context: DistributedContext) -> Iterator[None]:
    """Let rank 0 do a step (e.g. build the demo data) before the other ranks run it."""
    if context.is_distributed and not context.is_main:
        dist.barrier()
    yield
    if context.is_distributed and context.is_main:
        dist.barrier()


def verify_identical_weights(context: DistributedContext, **modules: torch.nn.Module) -> None:
    """DDP sanity check: every rank must end with the same weights of each named module (compares per-tensor
    sums); nothing to check in a single process."""
    for name, module in modules.items() if context.is_distributed else ():
        checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(context.device)
        gathered = [torch.zeros_like(checksum) for _ in range(context.world_size)]
        dist.all_gather(gathered, checksum)
        if not all(torch.equal(gathered[0], other) for other in gathered[1:]):
            raise RuntimeError(f"DDP ranks ended with different {name} weights: the run is not trustworthy")
        logging.getLogger(__name__).info("%s weights identical on all %d ranks", name, context.world_size)


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (``0o666 & ~umask``).

    For files written atomically through ``tempfile.mkstemp`` (always 0600) and renamed into place. The umask
    is read from ``/proc/self/status`` (Linux); elsewhere it is set and restored (not thread-safe).
    """
    try:
        with open("/proc/self/status") as status:
            umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with NaN/Inf losses or gradients."""


class NonFiniteGuard:
    """Counts skipped (non-finite) steps on the device; :meth:`read` synchronises once and opens a new window."""

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped, self.streak, self.longest, self.skipped_discriminator = (zero.clone() for _ in range(4))

    def record(self, generator_skipped: torch.Tensor, discriminator_skipped: torch.Tensor) -> None:
        """Add one step's flags (0-dim bool tensors); no host synchronisation."""
        skipped = generator_skipped.long()
        self.skipped += skipped
        self.streak = (self.streak + 1) * skipped
        self.longest = torch.maximum(self.longest, self.streak)
        self.skipped_discriminator += discriminator_skipped.long()

    def read(self) -> tuple[int, int, int]:
        """(generator steps skipped, longest run of consecutive skipped steps, discriminator steps skipped)
        since the last read; a run that spans reads keeps counting (the streak carries over)."""
        skipped, longest, skipped_d = torch.stack(
            [self.skipped, self.longest, self.skipped_discriminator]
        ).tolist()
        for counter in (self.skipped, self.longest, self.skipped_discriminator):
            counter.zero_()
        return skipped, longest, skipped_d

    def check(self, epoch: int, step: int, skipped_before: int, limit: int, last_checkpoint: Path) -> int:
        """:meth:`read`, log the steps skipped in ``epoch`` up to ``step`` and raise :class:`NonFiniteTrainingError`
        once a run of consecutive skipped steps reached ``limit``; returns the number of skipped steps so far
        (``skipped_before`` + those since the last read)."""
        skipped, longest, skipped_d = self.read()
        total = skipped_before + skipped
        log = logging.getLogger("train")
        if skipped:
            log.warning(
                "epoch %d up to step %d: %d non-finite loss or gradient step(s) skipped (%d in a row, %d in all)",
                epoch, step, skipped, longest, total,
            )  # fmt: skip
        if skipped_d:
            log.warning(
                "epoch %d up to step %d: %d discriminator step(s) skipped (non-finite)",
                epoch,
                step,
                skipped_d,
            )
        if longest >= limit:
            raise NonFiniteTrainingError(
                f"{longest} consecutive steps had NaN/Inf losses or gradients (epoch {epoch}, up to step {step}); "
                f"training stopped. The last good checkpoint is {last_checkpoint}. Lower the learning rate, check "
                "the data with `python dataset.py --check`, or use train.amp=none."
            )
        return total


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory; the message says with which batch and what to change (one line)."""


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@contextlib.contextmanager
def explain_out_of_memory(
    device: torch.device, batch_size: int, shape: tuple[int, ...], remedies: str
) -> Iterator[None]:
    """Turn a ``torch.OutOfMemoryError`` inside into one :class:`DeviceOutOfMemoryError` line: the batch size,
    the volume size ``shape`` (D, H, W), the peak memory and ``remedies`` (what to change); no traceback."""
    try:
        yield
    except torch.OutOfMemoryError:
        size = "×".join(str(s) for s in shape)
        raise DeviceOutOfMemoryError(
            f"out of memory on {device} with batches of {batch_size} volume(s) of {size} voxels, peak memory "
            f"{peak_memory_gb(device):.2f} GiB; {remedies}"
        ) from None
