"""Recipe study: which config change buys the most reconstruction quality per GPU-hour?

    python -m bench.recipe [--variants default lr3e-4 ...] [--seeds 0 1] [--budget_s 480] [--device cpu]
        [--preset configs/cpu.json] [--train_csv IXI/train.csv] [--val_csv IXI/val.csv]
        [--out bench/results/recipe] [--threads N] [--parallel 1] [--val_points 6] [--set section.key=value]
    python -m bench.recipe --summarise_only [--out bench/results/recipe]

A run is ``train.py``'s own loop (:func:`bench.harness.train_run`) on ``--preset`` + ``--set`` + ONE variant's
overrides (:data:`VARIANTS`) for a wall-clock budget ``train.time_budget_s = --budget_s`` (train.py's clock:
set-up, validations and checkpoints count), named ``<variant>_s<seed>`` and seeded by ``train.seed``; runs go
one after another in this process or ``--parallel N`` at a time, each pinned to its own cores. A first
``_calibration`` run (3 epochs) measures seconds per training epoch, per validation and of set-up; from them
:func:`plan` derives a budget-robust schedule (``val_every``, GAN start, warm-up, EMA horizon) kept in
``--out/calibration.json``. Outputs in ``--out``: ``summary.csv`` (one row per run: the LAST validation and the
best epoch, steps, machine, load; rewritten after every run; a run with a row is skipped), each run's folder,
``psnr_vs_time.png`` and a table where a variant beats ``default`` when its mean exceeds the default's on BOTH
in-brain PSNR and SSIM by more than the larger seed range (:func:`compare`). bench/README.md has the details.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

import dataset  # noqa: E402
import train  # noqa: E402
from bench import harness  # noqa: E402
from bench.harness import IXI, NEVER, REPO_ROOT, run_folders, run_results, validated_epochs  # noqa: E402
from config import ConfigError, load_config  # noqa: E402

CALIBRATION = "_calibration"
DEFAULT = "default"
# {name} fields are filled from the calibrated schedule (see the module docstring)
VARIANTS: dict[str, list[str]] = {
    DEFAULT: [],
    "lr3e-4": ["train.learning_rate=3e-4"],
    "lr3e-3": ["train.learning_rate=3e-3"],
    "cosine_warmup": ["train.lr_schedule=cosine", "train.warmup_steps={warmup_steps}"],
    "ema": ["train.ema_decay={ema_decay}"],
    "l1": ["train.recon_loss=l1"],
    "perceptual0": ["train.perceptual_weight=0.0"],
    "perceptual1": ["train.perceptual_weight=1.0"],
    "gan_early": ["train.gan_start_epoch={gan_early_epoch}"],
    "gan_mid": ["train.gan_start_epoch={gan_mid_epoch}"],
    "no_gan": [f"train.gan_start_epoch={NEVER}"],
    "batch2": ["train.batch_size=2"],
    "beta1e-6": ["train.beta=1e-6"],
    "augment": ["augmentation.enabled=true"],
}


class StudyError(RuntimeError):
    """A study that cannot go on as asked (one line, naming the file)."""


# ------------------------------------------------------------------------------------------- one run


def run_sets(args: argparse.Namespace, overrides: list[str], seed: int) -> list[str]:
    """A run's ``--set`` values: ``--set``, data, ``overrides``, then its seed (the last one wins)."""
    data = harness.data_overrides(Path(args.train_csv).resolve(), Path(args.val_csv).resolve())
    return [*args.set, *data, f"train.device={args.device}", *overrides, f"train.seed={seed}"]


def train_fresh(preset: str | Path, sets: list[str], out: Path, name: str, threads: int) -> float:
    """The run ``name`` from scratch on ``threads`` torch threads (the count restored after); wall seconds."""
    with harness.torch_threads(threads):
        return harness.train_run(preset, sets, out, name).wall_s


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (variant, seed) and return its summary row (``spec``: see :func:`make_specs`)."""
    out, name = Path(spec["out"]), spec["name"]
    load_start = os.getloadavg()[0]
    status = "ok"
    start = datetime.now()
    started = start.isoformat(timespec="seconds")
    try:
        wall = train_fresh(spec["preset"], spec["sets"], out, name, spec["threads"])
    except train.NonFiniteTrainingError as error:  # a diverged run is a result, not a crash of the study
        wall = (datetime.now() - start).total_seconds()
        status = "diverged: " + str(error).split(";")[0]
    metrics_csv = run_folders(out, name)[0] / "metrics.csv"
    row: dict[str, Any] = {
        "variant": spec["variant"],
        "seed": spec["seed"],
        "status": status,
        "budget_s": spec["budget_s"],
        "device": spec["device"],
        "device_name": spec["machine"].get("gpu", spec["machine"]["cpu"]),
        "threads": spec["threads"],
        "wall_s": round(wall, 1),
        "load_start": round(load_start, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "cpu": spec["machine"]["cpu"],
        "cpu_cores": spec["machine"]["cpu_cores_available"],
        "torch": spec["machine"]["torch"],
        "overrides": " ".join(spec["overrides"]),
        "metrics_csv": str(metrics_csv.relative_to(out)),
        "started": started,
    }
    if metrics_csv.is_file():
        row.update(run_results(metrics_csv))
    return row


def run_pinned(spec: dict[str, Any], cores: list[int]) -> dict[str, Any]:
    """:func:`run_one` in a worker process restricted to ``cores``."""
    os.sched_setaffinity(0, cores)
    return run_one(spec)


# ------------------------------------------------------------------------------------------- calibration


def calibration_settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a calibration (and so the whole study in ``--out``) depends on."""
    return {
        "preset": str(Path(args.preset).resolve()),
        "set": list(args.set),
        "train_csv": str(Path(args.train_csv).resolve()),
        "val_csv": str(Path(args.val_csv).resolve()),
        "device": args.device,
        "threads": args.threads,
        "budget_s": args.budget_s,
        "val_points": args.val_points,
    }


def measure(metrics_csv: Path, batch_size: int) -> dict[str, float]:
    """Seconds per training epoch, per validation (+ checkpoint) and of set-up, and steps per epoch, from the
    calibration run's metrics.csv (3 epochs, each validated)."""
    epochs = pd.read_csv(metrics_csv)
    if len(epochs) < 3:
        raise StudyError(f"{metrics_csv}: the calibration run needs 3 epochs, it has {len(epochs)}")
    elapsed, steps = epochs["time/elapsed_s"], epochs["global_step"]
    steps_per_epoch = int(steps[2] - steps[1])
    train_s = steps_per_epoch * batch_size / float(epochs["train/volumes_per_s"][2])
    return {
        "train_epoch_s": train_s,
        "validation_s": max(0.0, float(elapsed[2] - elapsed[1]) - train_s),
        "setup_s": max(0.0, float(elapsed[0]) - train_s),
        "steps_per_epoch": steps_per_epoch,
    }


def plan(measured: dict[str, float], budget_s: float, val_points: int, gan_fraction: float) -> dict[str, Any]:
    """The budget-robust schedule (see the module docstring) from the calibration's measurements."""
    train_s, val_s = measured["train_epoch_s"], measured["validation_s"]
    usable = max(budget_s - measured["setup_s"], 0.0)
    val_every = max(1, math.floor((usable / val_points - val_s) / train_s))
    epochs = usable / (train_s + val_s / val_every)
    steps = epochs * measured["steps_per_epoch"]

    def at(fraction: float) -> int:
        """The epoch at ``fraction`` of the budget: 0 for 0, never for >= 1, else at least epoch 1."""
        if fraction >= 1:
            return NEVER
        return 0 if fraction <= 0 else max(1, round(fraction * epochs))

    return {
        "val_every": val_every,
        "epochs_in_budget": round(epochs, 2),
        "steps_in_budget": round(steps),
        "validations_in_budget": math.floor(epochs / val_every),
        "gan_start_epoch": at(gan_fraction),
        "gan_early_epoch": at(1 / 3),
        "gan_mid_epoch": at(2 / 3),
        "warmup_steps": max(1, round(0.05 * steps)),
        "ema_decay": round(1.0 - 1.0 / max(10.0, 0.1 * steps), 6),
    }


def calibrate(args: argparse.Namespace, machine: dict[str, Any]) -> dict[str, Any]:
    """The study's calibration: from ``--out/calibration.json``, or measured by a 3-epoch run and saved."""
    path = args.out / "calibration.json"
    settings = calibration_settings(args)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] != settings:
            changed = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
            raise StudyError(
                f"{path} was made with other settings ({', '.join(changed)} differ); "
                "use another --out for another study"
            )
        return saved
    print(f"calibration: 3 epochs of {args.preset}, validating every epoch ...", flush=True)
    overrides = ["train.num_epochs=3", "train.val_every=1"]
    wall = train_fresh(args.preset, run_sets(args, overrides, 0), args.out, CALIBRATION, args.threads)
    config = load_config(args.preset, args.set)
    measured = measure(run_folders(args.out, CALIBRATION)[0] / "metrics.csv", config.train.batch_size)
    gan_fraction = config.train.gan_start_epoch / config.train.num_epochs
    calibration = {
        "settings": settings,
        "machine": machine,
        "measured": {**measured, "wall_s": wall},
        "schedule": plan(measured, args.budget_s, args.val_points, gan_fraction),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration, indent=2) + "\n")
    return calibration


# ------------------------------------------------------------------------------------------- the study


def resolved_overrides(variant: str, schedule: dict[str, Any]) -> list[str]:
    """The variant's overrides with the schedule's fields filled in."""
    return [item.format(**schedule) for item in VARIANTS[variant]]


def make_specs(
    args: argparse.Namespace, calibration: dict[str, Any], machine: dict[str, Any]
) -> list[dict[str, Any]]:
    """One picklable job per (variant, seed): its train.py arguments and what its summary row records."""
    schedule = calibration["schedule"]
    common = [
        f"train.num_epochs={NEVER}",
        f"train.time_budget_s={args.budget_s}",
        f"train.val_every={schedule['val_every']}",
        f"train.gan_start_epoch={schedule['gan_start_epoch']}",
    ]
    specs = []
    for variant in args.variants:
        overrides = resolved_overrides(variant, schedule)
        for seed in args.seeds:
            name = f"{variant}_s{seed}"
            specs.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "name": name,
                    "preset": str(args.preset),
                    "sets": run_sets(args, common + overrides, seed),
                    "overrides": overrides,
                    "out": str(args.out.resolve()),
                    "budget_s": args.budget_s,
                    "device": args.device,
                    "threads": args.threads,
                    "machine": machine,
                }
            )
    return specs


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    """summary.csv, ordered by variant (as in VARIANTS) and seed, written atomically."""
    order = {name: i for i, name in enumerate(VARIANTS)}
    frame = pd.DataFrame(rows)
    frame = frame.sort_values(["variant", "seed"], key=lambda c: c.map(order) if c.name == "variant" else c)
    temporary = path.with_name(f".{path.name}.tmp")
    frame.to_csv(temporary, index=False)
    os.replace(temporary, path)


def read_summary(path: Path) -> pd.DataFrame:
    """summary.csv as a frame (empty when there is none yet)."""
    return pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["variant", "seed", "overrides"])


def pending(specs: list[dict[str, Any]], summary: pd.DataFrame, path: Path) -> list[dict[str, Any]]:
    """The specs without a row in summary.csv; a row made with other overrides is refused."""
    done = {
        (str(r.variant), int(r.seed)): "" if pd.isna(r.overrides) else str(r.overrides)
        for r in summary.itertuples()
    }
    todo = []
    for spec in specs:
        key = (spec["variant"], spec["seed"])
        if key not in done:
            todo.append(spec)
        elif done[key] != (now := " ".join(spec["overrides"])):
            raise StudyError(
                f"{path}: {spec['name']} was run with overrides {done[key]!r}, now {now!r}; "
                "delete its row or use another --out"
            )
        else:
            print(f"skip {spec['name']}: already in {path}")
    return todo


def report(row: dict[str, Any], index: int, total: int) -> None:
    """One line per finished run: its status and the summary columns that say how it went."""
    keys = (
        "steps",
        "epochs",
        "val_psnr_brain",
        "val_ssim_brain",
        "best_val_psnr_brain",
        "best_epoch",
        "wall_s",
    )
    values = ", ".join(f"{key} {row[key]:.6g}" for key in keys if key in row)
    load = f"load {row['load_start']:.2f} -> {row['load_end']:.2f}"
    print(
        f"[{index}/{total}] {row['variant']} seed {row['seed']}: {row['status']}, {values}, {load}",
        flush=True,
    )


def run_study(args: argparse.Namespace, specs: list[dict[str, Any]], summary_path: Path) -> None:
    """Run the specs without a row in summary.csv (``--parallel`` at a time); rewrite it after every run."""
    rows = read_summary(summary_path).to_dict("records")
    todo = pending(specs, pd.DataFrame(rows, columns=["variant", "seed", "overrides"]), summary_path)
    for index, row in enumerate(run_all(args, todo), start=1):
        rows.append(row)
        write_summary(rows, summary_path)
        report(row, index, len(todo))


def run_all(args: argparse.Namespace, todo: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Summary rows of ``todo`` as the runs finish: one after another in this process, or ``--parallel`` at a
    time in fresh processes, each pinned to its own share of the cores."""
    if args.parallel == 1:
        yield from map(run_one, todo)
        return
    cores = sorted(os.sched_getaffinity(0))
    slots = [cores[i :: args.parallel] for i in range(args.parallel)]
    queue = list(todo)
    with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        running: dict[Future, list[int]] = {}
        while queue or running:
            while queue and len(running) < args.parallel:
                free = next(slot for slot in slots if slot not in running.values())
                running[pool.submit(run_pinned, queue.pop(0), free)] = free
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                del running[future]
                yield future.result()


# ------------------------------------------------------------------------------------------- summary


def compare(summary: pd.DataFrame) -> pd.DataFrame:
    """Per variant over its seeds: mean and range of the final in-brain PSNR/SSIM, and whether it beats
    ``default`` on both by more than the larger of the two ranges (None without a default)."""
    ok = summary[summary["status"] == "ok"].dropna(subset=["val_psnr_brain", "val_ssim_brain"])
    table = ok.groupby("variant", sort=False).agg(
        n=("seed", "count"),
        steps=("steps", "mean"),
        psnr=("val_psnr_brain", "mean"),
        psnr_range=("val_psnr_brain", lambda v: v.max() - v.min()),
        ssim=("val_ssim_brain", "mean"),
        ssim_range=("val_ssim_brain", lambda v: v.max() - v.min()),
        lpips=("val_lpips_brain", "mean"),
        best_psnr=("best_val_psnr_brain", "mean"),
        latent_std_min=("latent_std_min", "mean"),
        latent_std_max=("latent_std_max", "mean"),
    )
    order = {name: i for i, name in enumerate(VARIANTS)}
    table = table.sort_index(key=lambda names: names.map(lambda n: order.get(n, len(order))))
    if DEFAULT not in table.index:
        table["beats_default"] = None
        return table
    base = table.loc[DEFAULT]
    beats = []
    for name, variant in table.iterrows():
        psnr_margin = max(base["psnr_range"], variant["psnr_range"])
        ssim_margin = max(base["ssim_range"], variant["ssim_range"])
        beats.append(
            name != DEFAULT
            and variant["psnr"] - base["psnr"] > psnr_margin
            and variant["ssim"] - base["ssim"] > ssim_margin
        )
    table["beats_default"] = beats
    return table


def print_table(table: pd.DataFrame, summary: pd.DataFrame) -> None:
    """The comparison table, then which variants beat the default."""
    print(
        f"\n{'variant':<15}{'n':>3}{'steps':>8}  {'PSNR brain (range)':<20}{'SSIM brain (range)':<22}"
        f"{'LPIPS':>7}{'best PSNR':>11}{'latent std':>13}  beats default"
    )
    for name, r in table.iterrows():
        verdict = {True: "yes", False: "no", None: "-"}[r["beats_default"]] if name != DEFAULT else ""
        print(
            f"{name:<15}{r['n']:>3}{r['steps']:>8.0f}  {r['psnr']:>6.2f} ({r['psnr_range']:.2f}){'':<8}"
            f"{r['ssim']:>7.4f} ({r['ssim_range']:.4f}){'':<6}{r['lpips']:>7.4f}{r['best_psnr']:>11.2f}"
            f"{r['latent_std_min']:>6.2f}-{r['latent_std_max']:<6.2f}  {verdict}"
        )
    failed = summary[summary["status"] != "ok"]
    for r in failed.itertuples():
        print(f"{r.variant} seed {r.seed}: {r.status}")
    if table.empty or table["beats_default"].isna().all():
        print("no default runs: nothing to compare against")
        return
    winners = [name for name, r in table.iterrows() if r["beats_default"]]
    print(
        "beat the default on both in-brain PSNR and SSIM by more than the seed range (max - min): "
        + (", ".join(winners) if winners else "none")
    )
    if (table["n"] < 2).any():
        print("note: variants with one seed have no range; their verdict is not evidence")


def plot_curves(summary: pd.DataFrame, out: Path) -> Path:
    """psnr_vs_time.png: in-brain PSNR and SSIM of every validation against time/elapsed_s (one colour per
    variant, one line style per seed)."""
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    variants = list(dict.fromkeys(summary["variant"]))
    seeds = sorted(summary["seed"].unique())
    tab20, styles = plt.get_cmap("tab20"), ["-", "--", ":", "-."]
    # the 10 dark hues of tab20 first, then the light ones
    colours = {name: tab20(2 * (i % 20) % 20 + (i % 20) // 10) for i, name in enumerate(variants)}
    for row in summary.itertuples():
        path = out / str(row.metrics_csv)
        if not path.is_file():
            print(f"warning: {path} is missing; {row.variant} seed {row.seed} is not drawn")
            continue
        history = validated_epochs(path)
        style = styles[seeds.index(row.seed) % len(styles)]
        for ax, column in zip(axes, ("val/psnr_brain", "val/ssim_brain"), strict=True):
            ax.plot(
                history["time/elapsed_s"],
                history[column],
                style,
                marker="o",
                markersize=3,
                color=colours[row.variant],
            )
    for ax, name in zip(axes, ("in-brain PSNR (dB)", "in-brain SSIM"), strict=True):
        ax.set_xlabel("wall-clock time (s, train.py's clock: set-up and validations included)")
        ax.set_ylabel(f"validation {name}")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour, label=name) for name, colour in colours.items()]
    handles += [
        Line2D([], [], color="grey", linestyle=styles[i % len(styles)], label=f"seed {seed}")
        for i, seed in enumerate(seeds)
    ]
    axes[0].legend(handles=handles, fontsize=7, ncol=2)
    budget = summary["budget_s"].iloc[0] if len(summary) else None
    figure.suptitle(f"recipe study: validation during a {budget} s budget per run")
    figure.tight_layout()
    path = out / "psnr_vs_time.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def summarise(out: Path) -> None:
    """Redraw the figure and print the table from ``out/summary.csv``."""
    path = out / "summary.csv"
    if not path.is_file():
        raise StudyError(f"{path}: no summary yet (run the study first)")
    summary = read_summary(path)
    print_table(compare(summary), summary)
    print(f"figure: {plot_curves(summary, out)}")


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--budget_s", type=float, default=480.0, help="wall-clock seconds per run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", type=Path, default=REPO_ROOT / "configs" / "cpu.json")
    parser.add_argument("--train_csv", default=str(IXI / "train.csv"))
    parser.add_argument("--val_csv", default=str(IXI / "val.csv"))
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "recipe")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: cores / --parallel)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time, each on its own cores (CPU)")
    parser.add_argument("--val_points", type=int, default=6, help="validations wanted within the budget")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="an override on top of the preset for every run (repeatable)",
    )
    parser.add_argument("--summarise_only", action="store_true", help="redraw and print from summary.csv")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    if args.parallel < 1 or (args.parallel > 1 and args.device != "cpu") or args.parallel > cores:
        parser.error(f"--parallel must be 1, or up to the {cores} available cores with --device cpu")
    args.threads = args.threads or max(1, cores // args.parallel)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.summarise_only:
            summarise(args.out)
            return 0
        for split in (args.train_csv, args.val_csv):
            dataset.read_split(split)  # a missing or malformed split fails before the calibration
        load_config(args.preset, args.set)
        with harness.torch_threads(args.threads):
            machine = harness.machine_info(torch.device(args.device))
        print(f"machine: {json.dumps(machine)}; {args.threads} thread(s) per run, {args.parallel} at a time")
        calibration = calibrate(args, machine)
        schedule = calibration["schedule"]
        print(f"calibration: {json.dumps(calibration['measured'])}\nschedule: {json.dumps(schedule)}")
        if schedule["validations_in_budget"] < 5:
            print(
                f"warning: about {schedule['validations_in_budget']} validation(s) fit the budget besides "
                "the final one (short for an epoch + validation here); the curves will be coarse"
            )
        specs = make_specs(args, calibration, machine)
        for spec in specs:  # every variant's config is checked before any run
            load_config(spec["preset"], spec["sets"])
        run_study(args, specs, args.out / "summary.csv")
        summarise(args.out)
    except (StudyError, ConfigError, dataset.DataError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
