"""Where the time of a training step goes: ``train.train_step`` itself under ``torch.profiler``.

    python -m bench.profile_step [--config config.json] [--set section.key=value ...] [--device cpu|cuda]
        [--shape D H W] [--batch_size B] [--warmup 2] [--steps 5] [--stages pretrain gan]
        [--data loader|device|both] [--data_limit 16] [--trace trace.json] [--json profile.json]

What ``train.py`` runs (``train.build_state``, ``losses.VAEGANLoss.from_config`` with
``model.build_perceptual_loss``, ``device_data.choose_recompute``, ``train.wrap_for_training``), unchanged: the ranges
are put AROUND its calls by hooks (:class:`Ranges`); backward time is attributed through the profiler's sequence
numbers. Per stage, after ``--warmup`` steps: ``--steps`` timed steps, then ``--steps`` profiled ones (after one
the profiler warms up on), on the same random volumes in [0, 1]: wall and host time per step, the breakdown
(VAE / LPIPS3D / discriminator forward and backward, optimisers, other) as shares of CPU time (cpu) or GPU kernel
time (cuda, plus ``breakdown_host``); host synchronisations per step in ``train_step`` (:func:`count_syncs`: a
dispatch mode, a function mode, CUDA's sync-debug warnings, the profiler's own events) and in
``train.train_epoch`` over one log interval. Per epoch: one ``metrics.validate`` pass, one checkpoint write and,
with ``--data``, one epoch of batches through ``device_data.make_loaders`` (DataLoader vs device cache), timed per
batch and synchronised. bench/README.md says what each count means.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.autograd.profiler import record_function
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import dataset
import metrics
import train
from bench import harness
from checkpoints import save_checkpoint, training_checkpoint
from config import Config, apply_overrides, load_config
from device_data import choose_recompute, epoch_batches, make_loaders
from losses import VAEGANLoss
from model import build_perceptual_loss
from model.recompute import recompute
from utils import DistributedContext, resolve_amp_dtype

MODULES = ("vae", "lpips", "discriminator")
OPTIMIZERS = ("optimizer_g", "optimizer_d")
STEP_RANGE = "train_step"
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
CATEGORIES = (
    "vae forward",
    "vae backward",
    "lpips forward",
    "lpips backward",
    "discriminator forward",
    "discriminator backward",
    "optimiser (AdamW steps)",
    "other backward (loss terms, grad accumulation)",
    "other (loss terms, clipping, guard, EMA)",
)
aten = torch.ops.aten
DATA_DEPENDENT_OPS = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
}
HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


# ------------------------------------------------------------------------------------------ ranges


class Ranges:
    """``record_function`` ranges around the VAE, LPIPS3D, discriminator forwards and the optimiser steps, put
    there by hooks (the code under test is not edited). Use as a context manager; the hooks are removed after."""

    def __init__(self, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.targets = (modules, optimizers)
        self.open: dict[str, list[record_function]] = collections.defaultdict(list)
        self.handles: list[Any] = []

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            scope = record_function(name)
            scope.__enter__()
            self.open[name].append(scope)

        return hook

    def _exit(self, name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self.open[name].pop().__exit__(None, None, None)

        return hook

    def __enter__(self) -> Ranges:
        modules, optimizers = self.targets
        for name, module in modules.items():
            self.handles.append(module.register_forward_pre_hook(self._enter(f"{name}.forward")))
            self.handles.append(module.register_forward_hook(self._exit(f"{name}.forward")))
        for name, optimizer in optimizers.items():
            self.handles.append(optimizer.register_step_pre_hook(self._enter(f"{name}.step")))
            self.handles.append(optimizer.register_step_post_hook(self._exit(f"{name}.step")))
        return self

    def __exit__(self, *_: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _descendants(event: Any) -> Iterator[Any]:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


def _inside_backward(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(BACKWARD_PREFIX):
            return True
        parent = parent.cpu_parent
    return False


def breakdown(events: Any, steps: int, on_device: bool) -> dict[str, Any]:
    """Per-step milliseconds and shares of :data:`CATEGORIES` from the profiler's events of ``steps`` steps.

    ``on_device``: attribute GPU kernel time (CUDA) instead of CPU time. Backward nodes are attributed to the
    module whose forward range holds the op with their sequence number (same thread).
    """

    def cost(event: Any) -> float:
        return event.device_time_total if on_device else event.cpu_time_total

    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]
    owner: dict[tuple[int, int], str] = {}
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in cpu_events:
        module, _, kind = event.name.partition(".")
        if kind == "forward" and module in MODULES:
            totals[f"{module} forward"] += cost(event)
            for child in _descendants(event):
                if child.sequence_nr >= 0:
                    owner.setdefault((child.thread, child.sequence_nr), module)
        elif kind == "step" and module in OPTIMIZERS:
            totals["optimiser (AdamW steps)"] += cost(event)
    for event in cpu_events:
        if event.name.startswith(BACKWARD_PREFIX) and not _inside_backward(event):
            module = owner.get((event.fwd_thread, event.sequence_nr))
            name = f"{module} backward" if module else "other backward (loss terms, grad accumulation)"
            totals[name] += cost(event)
    if on_device:
        total = sum(e.self_device_time_total for e in cpu_events)
    else:
        total = sum(cost(e) for e in cpu_events if e.name == STEP_RANGE)
    totals["other (loss terms, clipping, guard, EMA)"] = max(0.0, total - sum(totals.values()))
    return {
        "basis": "GPU kernel time" if on_device else "CPU time of train_step (main thread)",
        "ms_per_step": total / steps / 1e3,
        "categories": {
            name: {"ms_per_step": value / steps / 1e3, "share": value / total if total else float("nan")}
            for name, value in totals.items()
        },
    }


def profiler_sync_events(events: Any, steps: int) -> dict[str, float]:
    """Per step: ``aten::_local_scalar_dense`` events (named with the op that called them), device-to-host
    memcpys and explicit synchronise calls, as the profiler saw them."""
    counts = collections.Counter()
    for event in events:
        name = event.name
        if name == "aten::_local_scalar_dense":
            caller = event.cpu_parent
            while caller is not None and caller.name in ("aten::item", "aten::is_nonzero"):
                caller = caller.cpu_parent
            counts[f"aten::_local_scalar_dense in {caller.name if caller else '-'}"] += 1
        elif "Memcpy DtoH" in name:
            counts["device-to-host memcpy"] += 1
        elif name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
            counts[name] += 1
    return {name: counts[name] / steps for name in sorted(counts)}


# ------------------------------------------------------------------------------------------ syncs


class _DispatchCounter(TorchDispatchMode):
    """Counts ``_local_scalar_dense``, device-to-host copies and data-dependent-shape ops."""

    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self.counts["aten._local_scalar_dense"] += 1
        elif func in DATA_DEPENDENT_OPS or _is_boolean_indexing(func, args):
            self.counts[f"data-dependent op {func.__name__}"] += 1
        elif _is_device_to_host_copy(func, args, kwargs):
            self.counts["device-to-host copy"] += 1
        return func(*args, **kwargs)


def _is_boolean_indexing(func: Any, args: tuple) -> bool:
    """``x[mask]`` / ``x[mask] = v`` with a boolean mask: the result's size depends on the mask's values."""
    if func not in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
        return False
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])


def _is_device_to_host_copy(func: Any, args: tuple, kwargs: dict) -> bool:
    """``_to_copy(x, device=cpu)`` or ``cpu_tensor.copy_(x)`` with ``x`` on an accelerator."""
    if func is aten._to_copy.default:
        source, target = args[0], kwargs.get("device")
    elif func is aten.copy_.default:
        source, target = args[1], args[0].device
    else:
        return False
    return source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu"


class _HostReadCounter(TorchFunctionMode):
    """Counts reads of tensor values on the host (``item``, ``tolist``, ``.cpu()``, ``bool(t)``, ...)."""

    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.counts[f"host read .{name}"] += 1
        return func(*args, **(kwargs or {}))


def count_syncs(run: Callable[[], Any], device: torch.device, use_modes: bool) -> dict[str, int]:
    """Synchronisation counts while ``run()`` executes (see the module docstring); ``use_modes`` adds the
    dispatch- and function-mode counts."""
    counts: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            if use_modes:
                with _HostReadCounter(counts), _DispatchCounter(counts):
                    run()
            else:
                run()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    if device.type == "cuda":
        counts["cuda sync-debug warnings"] = sum("synchronizing" in str(w.message) for w in caught)
    return dict(counts)


# ------------------------------------------------------------------------------------------ timing


def profile_stage(
    stage: str,
    state: train.TrainState,
    loss: VAEGANLoss,
    images: torch.Tensor,
    config: Config,
    amp_dtype: torch.dtype | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Warm-up, timed steps, profiled steps and the sync counts of one stage."""
    device, gan = images.device, stage == "gan"

    def step() -> dict[str, torch.Tensor]:
        return train.train_step(state, loss, images, gan, config.train, amp_dtype)

    for _ in range(args.warmup):
        step()
    walls = [harness.timed(step, device)[0] for _ in range(args.steps)]
    modules = {"vae": state.vae_step, "lpips": loss.perceptual, "discriminator": state.discriminator}
    optimizers = {"optimizer_g": state.optimizer_g, "optimizer_d": state.optimizer_d}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    harness.synchronize(device)
    ranges = Ranges({k: m for k, m in modules.items() if m is not None}, optimizers)
    # one step traced but not kept: the profiler's own first-step overhead stays out of the numbers
    schedule = torch.profiler.schedule(wait=0, warmup=1, active=args.steps, repeat=1)
    with ranges, torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
        for _ in range(1 + args.steps):
            with record_function(STEP_RANGE):
                step()
            harness.synchronize(device)  # every kernel of the step inside the trace
            profiler.step()
    if args.trace is not None:
        path = args.trace.with_name(f"{args.trace.stem}_{stage}{args.trace.suffix}")
        profiler.export_chrome_trace(str(path))
        print(f"trace: {path}")
    events = profiler.events()
    host = breakdown(events, args.steps, on_device=False)
    result: dict[str, Any] = {
        "wall_ms_per_step": 1e3 * statistics.median(walls),
        "wall_ms_all": [1e3 * w for w in walls],
        "host_ms_per_step": host["ms_per_step"],
        "breakdown": breakdown(events, args.steps, on_device=True) if device.type == "cuda" else host,
        "profiler_sync_events_per_step": profiler_sync_events(events, args.steps),
    }
    if device.type == "cuda":
        result["gpu_busy_fraction"] = result["breakdown"]["ms_per_step"] / result["wall_ms_per_step"]
        result["breakdown_host"] = host  # where the launching goes
    use_modes = not config.train.compile
    counts = count_syncs(lambda: [step() for _ in range(args.steps)], device, use_modes)
    result["syncs_per_step_in_train_step"] = {k: v / args.steps for k, v in counts.items()}
    if not use_modes:
        result["note"] = "train.compile: dispatch/function-mode counts left out (dynamo would retrace)"
    return result


def count_epoch_loop_syncs(
    state: train.TrainState, loss: VAEGANLoss, images: torch.Tensor, config: Config, stage: str, folder: Path
) -> dict[str, Any]:
    """Sync counts of ``train.train_epoch`` over ``train.log_every_steps`` steps (one log interval)."""
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=images.device)
    amp = resolve_amp_dtype(config.train.amp, images.device)
    run = train.Run(config, context, amp, folder, folder / "last.pt", folder)  # no checkpoint is written here
    steps = config.train.log_every_steps
    counts = count_syncs(
        lambda: train.train_epoch(state, run, loss, iter([images] * steps), steps, stage),
        images.device,
        use_modes=not config.train.compile,
    )
    return {"steps": steps, "counts": counts}


# ------------------------------------------------------------------------------------------ per epoch


def with_overrides(config: Config, overrides: list[str]) -> Config:
    """``config`` with ``section.key=value`` overrides applied (validated as ``load_config`` does)."""
    return Config.from_dict(apply_overrides(config.to_dict(), overrides))


def time_data_path(config: Config, context: DistributedContext, mode: str, folder: Path) -> dict[str, Any]:
    """``device_data.make_loaders`` with ``data.device_cache`` on (``device``) or off (``loader``): its set-up
    time and one epoch of training batches through ``device_data.epoch_batches``, synchronised after each batch."""
    config = with_overrides(config, [f"data.device_cache={json.dumps('on' if mode == 'device' else 'off')}"])
    setup_s, (loader, val_set, generator) = harness.timed(
        lambda: make_loaders(config, context), context.device
    )
    batches = epoch_batches(loader, generator, config.train, context.device, 0, 0, len(loader))
    seconds = [harness.timed(lambda: next(batches), context.device)[0] for _ in range(len(loader))]
    return {
        "path": type(loader).__name__,
        "setup_s": setup_s,
        "batches": len(seconds),
        "first_batch_s": seconds[0],
        "s_per_batch_after_first": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
        "val_set": val_set,
    }


def per_epoch(
    state: train.TrainState,
    lpips: nn.Module,
    config: Config,
    context: DistributedContext,
    amp_dtype: torch.dtype | None,
    args: argparse.Namespace,
    folder: Path,
) -> dict[str, Any]:
    """Data paths (``--data``), one validation pass and one checkpoint write."""
    out: dict[str, Any] = {"data": {}}
    for mode in ("loader", "device") if args.data == "both" else (args.data,):
        result = time_data_path(config, context, mode, folder)
        val_set = result.pop("val_set")
        out["data"][mode] = result
        print(f"data ({mode}): {json.dumps(result)}", flush=True)
    validation_s, _ = harness.timed(
        lambda: metrics.validate(state.eval_vae, val_set, lpips, config, context, amp_dtype), context.device
    )
    out["validation"] = {
        "volumes": len(val_set),
        "s": validation_s,
        "s_per_volume": validation_s / len(val_set),
        "source": "the config's validation split",
    }
    path = folder / "last.pt"
    checkpoint_s, _ = harness.timed(
        lambda: save_checkpoint(training_checkpoint(state, config, context, "gan", None), path),
        context.device,
    )
    out["checkpoint"] = {"s": checkpoint_s, "mib": path.stat().st_size / 2**20}
    return out


def print_stage(stage: str, values: dict[str, Any]) -> None:
    """The breakdown table and the sync counts of one stage."""
    text = values["breakdown"]
    busy = f", GPU busy {100 * values['gpu_busy_fraction']:.0f} %" if "gpu_busy_fraction" in values else ""
    print(
        f"\n== {stage}: {values['wall_ms_per_step']:.1f} ms/step wall, {values['host_ms_per_step']:.1f} ms host"
        f"{busy}; shares of {text['basis']} ({text['ms_per_step']:.1f} ms/step)"
    )
    for name, item in text["categories"].items():
        print(f"  {name:48s} {item['ms_per_step']:9.2f} ms {100 * item['share']:6.1f} %")
    print(f"  syncs per step in train_step: {values['syncs_per_step_in_train_step'] or 'none'}")
    print(f"  profiler events per step: {values['profiler_sync_events_per_step'] or 'none'}")


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(harness.REPO_ROOT / "config.json"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--shape", type=int, nargs=3, default=None, help="default: preprocessing.target_shape"
    )
    parser.add_argument("--batch_size", type=int, default=None, help="default: train.batch_size")
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first, per stage")
    parser.add_argument("--steps", type=int, default=5, help="timed, profiled and counted steps per stage")
    parser.add_argument("--stages", nargs="+", choices=("pretrain", "gan"), default=["pretrain", "gan"])
    parser.add_argument(
        "--data",
        choices=("loader", "device", "both"),
        default="both",
        help="time one epoch of batches from the config's train split: DataLoader, device cache or both",
    )
    parser.add_argument("--data_limit", type=int, default=None, help="first N rows of each split for --data")
    parser.add_argument(
        "--trace", type=Path, default=None, help="Chrome trace per stage: <stem>_<stage>.json"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="profile_step_") as folder:  # split heads, checkpoint, run files
        return profile(args, Path(folder))


def profile(args: argparse.Namespace, folder: Path) -> int:
    """Everything ``main`` promises, with scratch files in ``folder``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    overrides = [f"train.device={json.dumps(device.type)}", *args.overrides]
    if args.shape is not None:
        overrides.append(f"preprocessing.target_shape={json.dumps(args.shape)}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    config = load_config(args.config, overrides)
    if args.data_limit is not None:
        for split in ("train", "val"):
            csv = folder / f"{split}.csv"
            dataset.read_split(getattr(config.data, f"{split}_csv")).head(args.data_limit).to_csv(
                csv, index=False
            )
        config = with_overrides(config, harness.data_overrides(folder / "train.csv", folder / "val.csv"))
    context = DistributedContext(rank=0, world_size=1, local_rank=0, device=device)
    amp_dtype = resolve_amp_dtype(config.train.amp, device)
    shape = tuple(config.preprocessing.target_shape)
    torch.manual_seed(config.train.seed)
    state = train.build_state(config, device)
    lpips = build_perceptual_loss(config.perceptual).to(device)
    loss = VAEGANLoss.from_config(config, lpips)
    use_recompute = choose_recompute(config.train, state.vae, shape, device)
    train.wrap_for_training(state, config.train, context)
    memory_format = torch.channels_last_3d if config.train.channels_last else torch.contiguous_format
    images = torch.rand(config.train.batch_size, 1, *shape, device=device).to(memory_format=memory_format)
    settings = {
        "config": args.config,
        "overrides": overrides,
        "device": str(device),
        "shape": list(shape),
        "batch": config.train.batch_size,
        "amp": str(amp_dtype),
        "recompute": use_recompute,
        "compile": config.train.compile,
        "channels_last": config.train.channels_last,
        "perceptual": lpips.description,
        "warmup": args.warmup,
        "steps": args.steps,
        "inputs": "random volumes in [0, 1]",
        "load_average_start": harness.load_average(),
    }
    info = harness.machine_info(device)
    print("machine:", json.dumps(info))
    print("settings:", json.dumps(settings), flush=True)
    result: dict[str, Any] = {"machine": info, "settings": settings, "stages": {}}
    state.vae_step.train()
    with recompute(use_recompute):
        for stage in args.stages:
            result["stages"][stage] = profile_stage(stage, state, loss, images, config, amp_dtype, args)
            print_stage(stage, result["stages"][stage])
            result["stages"][stage]["syncs_in_train_epoch_per_log_interval"] = count_epoch_loop_syncs(
                state, loss, images, config, stage, folder
            )
        result["epoch"] = per_epoch(state, lpips, config, context, amp_dtype, args, folder)
    settings["load_average_end"] = harness.load_average()
    for stage, values in result["stages"].items():
        loop = values["syncs_in_train_epoch_per_log_interval"]
        print(f"{stage}: syncs in train.train_epoch over {loop['steps']} steps: {loop['counts'] or 'none'}")
    print("validation:", json.dumps(result["epoch"]["validation"]))
    print("checkpoint write:", json.dumps(result["epoch"]["checkpoint"]))
    if args.json is not None:
        harness.write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
