"""``python -m bench.recipe``: a tiny time-budgeted study (summary columns, figure, resume,
``--summarise_only``) and the "beats the default" rule."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import tiny_overrides

import train
from bench import harness
from bench import recipe as recipe_module

COLUMNS = [
    "variant",
    "seed",
    "budget_s",
    "device",
    "steps",
    "val_psnr_brain",
    "val_ssim_brain",
    "val_lpips_brain",
    "latent_std_min",
    "latent_std_max",
    "best_val_psnr_brain",
    "best_val_ssim_brain",
    "best_epoch",
    "overrides",
    "wall_s",
    "epochs",
    "threads",
    "load_start",
    "load_end",
    "cpu",
]


@pytest.fixture(scope="module")
def recipe():
    return recipe_module


def study_argv(tmp_path: Path, split: tuple[Path, Path], *extra: str) -> list[str]:
    """recipe.py arguments: the tiny model of the train tests as ``--set`` overrides on config.json."""
    train_args = tiny_overrides(tmp_path, split, perceptual_weight=0.1)
    sets = [value for flag, value in zip(train_args[2::2], train_args[3::2], strict=True) if flag == "--set"]
    argv = ["--preset", train_args[1], "--train_csv", str(split[0]), "--val_csv", str(split[1])]
    argv += ["--out", str(tmp_path / "study"), "--device", "cpu", "--threads", "1", *extra]
    return argv + [item for value in sets for item in ("--set", value)]


def test_tiny_study_resumes_and_summarises(
    recipe, tiny_split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    argv = study_argv(tmp_path, tiny_split, "--variants", "default", "l1", "--seeds", "0", "--budget_s", "3")
    threads = torch.get_num_threads()
    assert recipe.main(argv) == 0
    assert torch.get_num_threads() == threads  # the runs' --threads 1 did not stay with the process
    out = tmp_path / "study"
    summary = pd.read_csv(out / "summary.csv")
    assert set(COLUMNS) <= set(summary.columns)
    assert list(summary["variant"]) == ["default", "l1"] and list(summary["seed"]) == [0, 0]
    assert (summary["status"] == "ok").all() and summary["stopped_by_time_budget"].all()
    assert (summary["steps"] > 0).all() and (summary["budget_s"] == 3).all()
    assert list(summary["overrides"].fillna("")) == ["", "train.recon_loss=l1"]
    for row in summary.itertuples():  # the LAST validation of the run, and the best one
        history = pd.read_csv(out / row.metrics_csv).dropna(subset=["val/psnr_brain"])
        assert len(history) >= 1
        assert row.val_psnr_brain == pytest.approx(history["val/psnr_brain"].iloc[-1])
        assert row.best_val_psnr_brain == pytest.approx(history["val/psnr_brain"].max())
        assert row.steps == history["global_step"].iloc[-1]
    config = json.loads((out / "runs" / "l1_s0" / "config.json").read_text())
    assert config["train"]["recon_loss"] == "l1" and config["train"]["time_budget_s"] == 3
    assert (
        config["train"]["val_every"]
        == json.loads((out / "calibration.json").read_text())["schedule"]["val_every"]
    )
    assert (out / "psnr_vs_time.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "machine:" in printed and "beat the default" in printed

    def no_training(argv: list[str]) -> int:
        raise AssertionError("a run with a row in summary.csv was trained again")

    monkeypatch.setattr(train, "main", no_training)
    assert recipe.main(argv) == 0
    assert "skip default_s0" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), summary)

    assert recipe.main([*argv, "--budget_s", "5"]) == 2  # another budget into the same study
    assert "budget_s differ" in capsys.readouterr().err

    (out / "psnr_vs_time.png").unlink()
    assert recipe.main(["--summarise_only", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "l1" in printed and "beat the default" in printed
    assert (out / "psnr_vs_time.png").is_file()


def test_run_results_are_the_last_validation_and_the_best_epoch(tmp_path: Path) -> None:
    """Epoch 1 is not validated, epoch 2 is the best, epoch 3 (stopped by the budget) the last."""
    names = list(harness.LAST_METRICS.values())
    rows = []
    for epoch, psnr in enumerate([18.0, None, 21.0, 19.5]):
        values = {name: None if psnr is None else psnr + k for k, name in enumerate(names)}
        rows.append(
            {
                "epoch": epoch,
                "global_step": 10 * (epoch + 1),
                "time/elapsed_s": 5.0 * (epoch + 1),
                "stopped_by_time_budget": epoch == 3,
                **values,
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "metrics.csv", index=False)
    results = harness.run_results(tmp_path / "metrics.csv")
    assert results["steps"] == 40 and results["epochs"] == 4 and results["stopped_by_time_budget"]
    assert results["val_psnr_brain"] == 19.5 and results["latent_std_max"] == 19.5 + 7
    assert results["best_epoch"] == 2 and results["best_elapsed_s"] == 15.0
    assert results["best_val_psnr_brain"] == 21.0 and results["best_val_lpips_brain"] == 23.0


def test_beats_default_needs_both_metrics_beyond_the_seed_range(recipe) -> None:
    rows = []
    for variant, psnr, ssim in [
        ("default", (20.0, 20.2), (0.80, 0.81)),
        ("lr3e-4", (20.6, 20.7), (0.83, 0.84)),  # beyond both ranges: beats
        ("l1", (20.6, 20.7), (0.81, 0.815)),  # SSIM within the default's range: does not
        ("ema", (20.25, 21.0), (0.83, 0.84)),  # PSNR gain 0.525 < its own range 0.75: does not
    ]:
        for seed in (0, 1):
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "status": "ok",
                    "steps": 100,
                    "val_psnr_brain": psnr[seed],
                    "val_ssim_brain": ssim[seed],
                    "val_lpips_brain": 0.1,
                    "best_val_psnr_brain": psnr[seed],
                    "latent_std_min": 0.5,
                    "latent_std_max": 1.0,
                }
            )
    table = recipe.compare(pd.DataFrame(rows))
    assert table["psnr_range"]["default"] == pytest.approx(0.2)
    assert table["beats_default"].to_dict() == {"default": False, "lr3e-4": True, "l1": False, "ema": False}
