"""bench/: every script imports and parses its flags, ``harness.run_results`` reads a run's last validation,
and ``bench.cpu_estimate`` times a real (tiny) ``train.py`` run through ``harness.train_run``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pandas as pd
import pytest
from helpers import tiny_overrides

from bench import harness

SCRIPTS = sorted(
    path.stem
    for path in (harness.REPO_ROOT / "bench").glob("*.py")
    if path.stem not in ("__init__", "harness")
)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_and_shows_its_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"bench.{name}").main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_run_results_are_the_last_validation(tmp_path: Path) -> None:
    """Epoch 1 is not validated, epoch 3 (stopped by the budget) is the last validated one."""
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
    assert results["elapsed_s"] == 20.0
    assert results["val_psnr_brain"] == 19.5 and results["latent_std_max"] == 19.5 + 7


def test_cpu_estimate_compares_train_py_estimate_with_its_run(
    tiny_split: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import cpu_estimate

    train_args = tiny_overrides(tmp_path, tiny_split, perceptual_weight=0.0)
    sets = [
        item for flag, value in zip(train_args[2::2], train_args[3::2], strict=True) for item in (flag, value)
    ]
    out = tmp_path / "estimate"
    assert cpu_estimate.main(["--config_file", train_args[1], *sets, "--out_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 4  # 4 volumes, batch 2, 2 epochs
    assert summary["estimated_step_s"] > 0 and summary["measured_run_s"] > 0
    assert summary["estimated_run_s"] == pytest.approx(summary["estimated_step_s"] * 4, abs=0.1)
    assert summary["measured_over_estimated"] == pytest.approx(
        summary["measured_run_s"] / (summary["estimated_step_s"] * 4), rel=0.1
    )
    assert summary["machine"]["torch"] and "measured/estimated" in capsys.readouterr().out
    assert not list(tmp_path.glob("runs*")), "the run goes into a temporary folder, not where the config says"
