"""The config schema: defaults, overrides and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from config import Config, ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_seed_model():
    config = load_config(None)
    assert config.model.channels == (32, 64, 128)
    assert config.model.latent_channels == 4
    assert config.model.num_res_blocks == (1, 1, 1)
    assert config.train.batch_size == 2 and config.train.learning_rate == 1e-4


@pytest.mark.parametrize(
    "path", sorted(REPO_ROOT.glob("config*.json")) + sorted(REPO_ROOT.glob("configs/*.json"))
)
def test_shipped_configs_are_valid(path):
    config = load_config(path)
    assert Config.from_dict(config.to_dict()) == config


def test_overrides_parse_json_values():
    config = load_config(
        None, ["train.num_epochs=3", "preprocessing.target_spacing=null", "train.run_name=abc"]
    )
    assert config.train.num_epochs == 3
    assert config.preprocessing.target_spacing is None
    assert config.train.run_name == "abc"


def test_round_trip_through_json(tmp_path):
    config = load_config(
        None,
        [
            "model.channels=[16,32]",
            "model.num_res_blocks=[1,2]",
            "model.attention_levels=[false,false]",
            "model.norm_num_groups=16",
        ],
    )
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.num_epochs=two"], "train.num_epochs: 'two' is not allowed; expected int"),
        (["train.nope=1"], "unknown key(s) ['nope'] in section 'train'; allowed keys:"),
        (["nope.key=1"], "unknown section 'nope'"),
        (["train.amp=fp8"], "expected one of 'auto', 'bf16', 'fp16', 'none'"),
        (["model.channels=[30,64,128]"], "multiple of model.norm_num_groups"),
        (["model.num_res_blocks=[1,1]"], "one entry per level"),
        (["model.attention_levels=[false,false,false,false]"], "one entry per level"),
        (["model.num_res_blocks=[1,0,1]"], "model.num_res_blocks: every entry must be >= 1"),
        (["model.spatial_dims=2"], "model.spatial_dims: 2 is not allowed; expected one of 3"),
        (["model.in_channels=0"], "model.in_channels must be >= 1"),
        (["model.out_channels=0"], "model.out_channels must be >= 1"),
        (["model.latent_channels=0"], "model.latent_channels must be >= 1"),
        (["model.norm_num_groups=0"], "model.norm_num_groups must be >= 1"),
        (["model.upsample_mode=nearest"], "expected one of 'trilinear', 'transposed'"),
        (["discriminator.norm=group"], "expected one of 'instance', 'batch'"),
        (["discriminator.num_layers=0"], "discriminator.num_layers must be in [1, 6]"),
        (["discriminator.channels=0"], "discriminator.channels must be >= 1"),
        (["train.beta=-1"], "train.beta must be >= 0"),
        (["augmentation.noise_prob=1.5"], "probability in [0, 1]"),
        (["train.num_epochs"], "must look like section.key=value"),
        (["train.batch_size=true"], "expected int"),
        (["augmentation.rotate_degrees=-5"], "augmentation.rotate_degrees must be >= 0"),
        (["augmentation.scale_fraction=1.5"], "augmentation.scale_fraction must be < 1"),
        (["train.val_batch_size=0"], "train.val_batch_size must be null or >= 1"),
        (["train.checkpoint_every_steps=0"], "train.checkpoint_every_steps must be null or >= 1"),
        (
            ['train.best_metric="val/psnr_brian"'],
            "train.best_metric must be a validation metric, one of val/mse,",
        ),
    ],
)
def test_bad_values_are_clear_errors(overrides, expected):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert expected in str(error.value)


def test_region_metrics_are_best_metric_choices_only_when_validation_reports_them():
    assert load_config(None, ['train.best_metric="val/ssim_gm"']).train.best_metric == "val/ssim_gm"
    with pytest.raises(ConfigError, match="region metrics need train.region_metrics: true"):
        load_config(None, ['train.best_metric="val/ssim_gm"', "train.region_metrics=false"])
    with pytest.raises(ConfigError, match="train.best_metric must be a validation metric"):
        load_config(None, ['train.best_metric="val/ssim_left"'])  # MNI regions: infer.py only


def test_import_config_loads_neither_ants_nor_nilearn():
    """config.py checks best_metric against the region names (metrics.py ← regions.py) without ANTs."""
    code = "import sys, config; print(sorted({'ants', 'nilearn'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        load_config(broken)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"training": {}}))
    with pytest.raises(ConfigError, match=r"unknown.json: unknown config section\(s\) \['training'\]"):
        load_config(unknown)


def test_override_errors_name_the_override_not_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(Config().to_dict()))
    cases = {
        "train.num_epochs=one": "train.num_epochs: 'one' is not allowed; expected int",
        "train.epochs=1": "unknown key(s) ['epochs'] in section 'train'",
        "train.beta=-1": "train.beta must be >= 0",
        "augmentation.noise_prob=1.5": "augmentation.noise_prob must be a probability in [0, 1]",
    }
    for override, problem in cases.items():
        with pytest.raises(ConfigError) as error:
            load_config(path, ["train.seed=3", override])
        assert str(error.value).startswith(f"--set {override}: {problem}"), str(error.value)
        assert str(path) not in str(error.value)


def test_file_value_errors_still_name_the_file(tmp_path):
    raw = Config().to_dict()
    raw["train"]["num_epochs"] = "one"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as error:
        load_config(path, ["train.seed=3"])
    assert str(error.value).startswith(f"{path}: train.num_epochs: 'one' is not allowed; expected int")
    assert "--set" not in str(error.value)


def test_cross_key_errors_name_every_source(tmp_path):
    """A check between two keys names the file and the override when one value came from each."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(Config().to_dict()))
    with pytest.raises(ConfigError) as error:
        load_config(path, ["train.seed=3", "model.num_res_blocks=[1,1]"])
    expected = f"{path}, --set model.num_res_blocks=[1,1]: model.num_res_blocks must have one entry per level"
    assert str(error.value).startswith(expected), str(error.value)
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.channels=[16,32]"])  # the other keys keep their defaults
    expected = "--set model.channels=[16,32]: model.num_res_blocks must have one entry per level (2,"
    assert str(error.value).startswith(expected), str(error.value)


def test_config_json_is_the_full_reference():
    assert json.loads((REPO_ROOT / "config.json").read_text()) == Config().to_dict()


@pytest.mark.parametrize("path", sorted(REPO_ROOT.glob("configs/*.json")), ids=lambda p: p.name)
def test_presets_list_only_what_they_change(path):
    """A preset = overrides on top of the schema defaults: every key it lists differs from its default."""
    preset = json.loads(path.read_text())
    defaults = Config().to_dict()
    same = [f"{s}.{k}" for s, values in preset.items() for k, v in values.items() if v == defaults[s][k]]
    assert not same, f"{path.name} repeats default values: {same}"
    expected = {s: {**values, **preset.get(s, {})} for s, values in defaults.items()}
    assert load_config(path).to_dict() == expected


def test_cpu_preset_is_the_documented_run():
    """What README promises for configs/cpu.json (a changed schema default would change the preset too)."""
    config = load_config(REPO_ROOT / "configs" / "cpu.json")
    assert config.preprocessing.target_spacing == (4.0, 4.0, 4.0)
    assert config.preprocessing.target_shape == (46, 55, 46)
    assert config.model.channels == (16, 32) and config.model.latent_channels == 4
    assert config.train.batch_size == 1 and config.train.learning_rate == 1e-3 and config.train.amp == "bf16"
    assert config.train.num_epochs == 60 and config.train.gan_start_epoch == 50
    assert config.train.val_every == 10 and config.train.run_name == "cpu_demo"
    assert not config.augmentation.enabled and config.data.num_workers == 0


@pytest.mark.parametrize(
    ("text", "expected"), [("[1, 2]", "must be a JSON object"), ('{"train": 3}', "'train'")]
)
def test_a_file_of_the_wrong_shape_is_a_config_error_with_overrides_too(tmp_path, text, expected):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as error:
        load_config(path, ["train.num_epochs=2"])
    assert str(error.value).startswith(f"{path}: ")
