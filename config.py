"""The config schema: every key, its type, default and allowed values, in one place.

A config is JSON with one object per section (``model``, ``discriminator``, ``perceptual``, ``data``,
``preprocessing``, ``augmentation``, ``train``). Every script reads it through :func:`load_config`, which

* starts from the defaults below,
* applies the file's values, then ``--set section.key=value`` overrides,
* rejects unknown keys, wrong types and out-of-range values with an error that lists what is allowed and
  names where the value came from: the file, or the ``--set section.key=value`` override.

Presets (``configs/*.json``) are overrides on top of these defaults: they list only the keys they change.
``config.json`` is the full reference (every key at its default). A changed default here changes every
preset that does not list that key.

The effective config (``Config.to_dict()``) is saved into the run folder and into every checkpoint, so a
checkpoint alone is enough to rebuild the model and reproduce the preprocessing.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from metrics import VALIDATION_METRICS, VALIDATION_REGION_METRICS

__all__ = [
    "AugmentationConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DiscriminatorConfig",
    "ModelConfig",
    "PerceptualConfig",
    "PreprocessingConfig",
    "TrainConfig",
    "load_config",
]


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; ``keys``: the dotted keys it concerns."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


def _check(condition: bool, message: str, *keys: str) -> None:
    """Raise :class:`ConfigError` with ``message`` about ``keys`` (``section.key``) unless ``condition``."""
    if not condition:
        raise ConfigError(message, keys)


def _check_minimum(
    section: str, values: Any, minimum: int, names: tuple[str, ...], nullable: bool = False
) -> None:
    """``section.name >= minimum`` for each of ``names`` of the dataclass ``values`` (or null, when ``nullable``)."""
    for name in names:
        value = getattr(values, name)
        allowed = "null or " if nullable else ""
        _check(
            (nullable and value is None) or value >= minimum,
            f"{section}.{name} must be {allowed}>= {minimum}",
            f"{section}.{name}",
        )


@dataclass
class ModelConfig:
    """MAISI-style KL-VAE (see ``model/maisi_vae.py``). Defaults = the seed model.

    ``spatial_dims`` is always 3 (the model is 3-D only); the key stays so that saved configs and checkpoints,
    which list it, keep loading.
    """

    spatial_dims: Literal[3] = 3
    in_channels: int = 1
    out_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    latent_channels: int = 4
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    upsample_mode: Literal["trilinear", "transposed"] = "trilinear"

    def validate(self) -> None:
        _check_minimum(
            "model", self, 1, ("in_channels", "out_channels", "latent_channels", "norm_num_groups")
        )
        _check(len(self.channels) >= 1, "model.channels: give at least one level", "model.channels")
        for name in ("num_res_blocks", "attention_levels"):
            _check(
                len(getattr(self, name)) == len(self.channels),
                f"model.{name} must have one entry per level ({len(self.channels)}, like model.channels)",
                f"model.{name}",
                "model.channels",
            )
        for c in self.channels:
            _check(
                c > 0 and c % self.norm_num_groups == 0,
                f"model.channels: every entry must be a positive multiple of model.norm_num_groups "
                f"({self.norm_num_groups}); got {list(self.channels)}",
                "model.channels",
                "model.norm_num_groups",
            )
        _check(
            all(n >= 1 for n in self.num_res_blocks),
            "model.num_res_blocks: every entry must be >= 1",
            "model.num_res_blocks",
        )
        _check(self.norm_eps > 0, "model.norm_eps must be > 0", "model.norm_eps")


@dataclass
class DiscriminatorConfig:
    """3D PatchGAN discriminator (``model/discriminator.py``), used from ``train.gan_start_epoch``."""

    channels: int = 32
    num_layers: int = 3
    norm: Literal["instance", "batch"] = "instance"
    learning_rate: float = 1e-4
    loss: Literal["least_squares", "hinge"] = "least_squares"

    def validate(self) -> None:
        _check(self.channels >= 1, "discriminator.channels must be >= 1", "discriminator.channels")
        _check(
            1 <= self.num_layers <= 6,
            "discriminator.num_layers must be in [1, 6]",
            "discriminator.num_layers",
        )
        _check(
            self.learning_rate > 0, "discriminator.learning_rate must be > 0", "discriminator.learning_rate"
        )


@dataclass
class PerceptualConfig:
    """3D LPIPS (``model/lpips3D.py``). ``random`` is an untrained network: reported as NOT pretrained."""

    backbone: Literal["deepbet", "medicalnet_resnet10", "medicalnet_resnet50", "random"] = "deepbet"
    weights_path: str | None = None

    def validate(self) -> None:
        pass


@dataclass
class PreprocessingConfig:
    """The one preprocessing pipeline (``dataset.preprocess_volume``); saved into every checkpoint."""

    orientation: str = "RAS"
    target_spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    target_shape: tuple[int, int, int] = (91, 109, 91)
    intensity: Literal["percentile", "minmax"] = "percentile"
    lower_percentile: float = 0.0
    upper_percentile: float = 99.5
    apply_mask: bool = False

    def validate(self) -> None:
        _check(
            len(self.orientation) == 3 and set(self.orientation.upper()) <= set("RLAPSI"),
            f"preprocessing.orientation must be a 3-letter axis code like 'RAS'; got {self.orientation!r}",
            "preprocessing.orientation",
        )
        if self.target_spacing is not None:
            _check(
                len(self.target_spacing) == 3 and all(s > 0 for s in self.target_spacing),
                "preprocessing.target_spacing must be null or three positive numbers (mm)",
                "preprocessing.target_spacing",
            )
        _check(
            len(self.target_shape) == 3 and all(s >= 1 for s in self.target_shape),
            "preprocessing.target_shape must be three positive integers",
            "preprocessing.target_shape",
        )
        _check(
            0.0 <= self.lower_percentile < self.upper_percentile <= 100.0,
            "preprocessing: need 0 <= lower_percentile < upper_percentile <= 100",
            "preprocessing.lower_percentile",
            "preprocessing.upper_percentile",
        )


@dataclass
class AugmentationConfig:
    """Training-only augmentations (never applied in validation, inference or latent saving)."""

    enabled: bool = True
    affine_prob: float = 0.3
    rotate_degrees: float = 5.0
    scale_fraction: float = 0.05
    translate_voxels: float = 3.0
    bias_field_prob: float = 0.3
    gamma_prob: float = 0.3
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise_prob: float = 0.2
    noise_std: float = 0.01
    flip_left_right_prob: float = 0.0

    def validate(self) -> None:
        for name in ("affine_prob", "bias_field_prob", "gamma_prob", "noise_prob", "flip_left_right_prob"):
            value = getattr(self, name)
            _check(
                0.0 <= value <= 1.0,
                f"augmentation.{name} must be a probability in [0, 1]; got {value}",
                f"augmentation.{name}",
            )
        _check(
            0 < self.gamma_range[0] <= self.gamma_range[1],
            "augmentation.gamma_range must be [low, high] with 0 < low <= high",
            "augmentation.gamma_range",
        )
        _check_minimum(
            "augmentation", self, 0, ("noise_std", "rotate_degrees", "scale_fraction", "translate_voxels")
        )
        _check(
            self.scale_fraction < 1, "augmentation.scale_fraction must be < 1", "augmentation.scale_fraction"
        )


@dataclass
class DataConfig:
    """Split CSVs (or folders / single files). Relative paths are relative to the working directory.

    ``train_csv`` / ``val_csv`` default to the built-in demo cohort, which ``demo_cohort.py`` synthesises on
    first use when ``demo_dir`` does not hold it yet. ``device_cache``: keep the preprocessed volumes on the
    training device and augment them there in batch (``auto``: on CUDA when they fit, else the ``cache`` path;
    ``on``: always, also on CPU; ``off``: never).
    """

    train_csv: str = "data/demo/train.csv"
    val_csv: str = "data/demo/val.csv"
    demo_dir: str | None = "data/demo"
    cache: Literal["memory", "disk", "none"] = "memory"
    cache_dir: str = "data/cache"
    num_workers: int = 2
    skip_bad_files: bool = False
    strict_input_checks: bool = False  # inputs of mixed grids or not skull-stripped: errors, not warnings
    device_cache: Literal["auto", "on", "off"] = "auto"

    def validate(self) -> None:
        _check_minimum("data", self, 0, ("num_workers",))


@dataclass
class TrainConfig:
    """Optimisation, stages, AMP, checkpointing and validation.

    * ``init_from``: start a new run from existing VAE weights — one of our checkpoints or a MAISI state dict
      (``checkpoints.init_vae_weights``); ignored by ``--resume``.
    * ``lr_schedule``: ``constant``, or ``cosine`` decay to ``min_lr_fraction`` × ``learning_rate`` over the run
      (over ``time_budget_s`` when that is set); both after ``warmup_steps`` of linear warm-up.
    * ``ema_decay``: keep an exponential moving average of the VAE weights; validation, the best model and
      the inference checkpoint then use the average. On by default (0.999): each step uses
      ``min(ema_decay, (1 + t) / (10 + t))`` (``train.update_ema``), an averaging horizon of about a ninth of
      the steps so far, up to ``1 / (1 - ema_decay)`` steps; ``null`` switches it off.
    * ``time_budget_s``: stop after this much wall-clock time since the start (validate and save first).
    * ``recompute``: the memory-saving recompute of ``model/recompute.py`` — ``auto``: on for CPU, off on
      CUDA unless the estimated training memory would not fit.
    * ``channels_last``: store the inputs and the discriminator (and any non-native VAE) channels-last too;
      our VAE's convolution weights always are (measured faster on CPU; see BENCHMARKS.md).
    * ``compile_mode``: the ``torch.compile`` mode when ``compile`` is true.
    * ``val_batch_size``: volumes per validation forward pass (default: ``batch_size``).
    * ``region_metrics``: validation also reports PSNR/SSIM/MAE per tissue class (``val/psnr_gm`` …;
      ``regions.py``: each validation subject is segmented once, at the first validation); they are then
      ``best_metric`` choices too (``metrics.VALIDATION_REGION_METRICS``).
    """

    run_name: str = "vae_default"
    init_from: str | None = None
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = 2
    learning_rate: float = 1e-4
    weight_decay: float = 1e-5
    num_epochs: int = 100
    max_steps_per_epoch: int | None = None
    recon_loss: Literal["mse", "l1"] = "mse"
    beta: float = 1e-7
    perceptual_weight: float = 0.3
    adversarial_weight: float = 0.1
    adaptive_adversarial_weight: bool = True
    gan_start_epoch: int = 50
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    min_lr_fraction: float = 0.1
    ema_decay: float | None = 0.999
    time_budget_s: float | None = None
    grad_clip: float | None = 1.0
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    recompute: Literal["auto", "on", "off"] = "auto"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    val_every: int = 1
    val_batch_size: int | None = None
    region_metrics: bool = True
    checkpoint_every_steps: int | None = None
    best_metric: str = "val/psnr_brain"
    best_metric_mode: Literal["max", "min"] = "max"
    max_consecutive_nonfinite: int = 5
    log_every_steps: int = 10
    runs_dir: str = "runs"
    best_runs_dir: str = "best_runs"

    def validate(self) -> None:
        _check_minimum("train", self, 1, ("batch_size", "num_epochs", "val_every", "log_every_steps"))
        _check_minimum("train", self, 1, ("max_consecutive_nonfinite",))
        _check_minimum("train", self, 0, ("weight_decay", "beta", "perceptual_weight", "adversarial_weight"))
        _check_minimum("train", self, 0, ("warmup_steps", "gan_start_epoch"))
        nullable = ("max_steps_per_epoch", "val_batch_size", "checkpoint_every_steps")
        _check_minimum("train", self, 1, nullable, nullable=True)
        _check(self.learning_rate > 0, "train.learning_rate must be > 0", "train.learning_rate")
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            "train.grad_clip must be null or > 0",
            "train.grad_clip",
        )
        _check(
            0.0 <= self.min_lr_fraction <= 1.0,
            "train.min_lr_fraction must be in [0, 1]",
            "train.min_lr_fraction",
        )
        _check(
            self.ema_decay is None or 0.0 < self.ema_decay < 1.0,
            "train.ema_decay must be null or in (0, 1), e.g. 0.999",
            "train.ema_decay",
        )
        _check(
            self.time_budget_s is None or self.time_budget_s > 0,
            "train.time_budget_s must be null or > 0 (seconds)",
            "train.time_budget_s",
        )
        choices = VALIDATION_METRICS + (VALIDATION_REGION_METRICS if self.region_metrics else ())
        hint = (
            " (region metrics need train.region_metrics: true)"
            if self.best_metric in VALIDATION_REGION_METRICS
            else ""
        )
        _check(
            self.best_metric in choices,
            f"train.best_metric must be a validation metric, one of {', '.join(choices)}; got "
            f"{self.best_metric!r}{hint}",
            "train.best_metric",
        )
        _check(
            self.run_name and "/" not in self.run_name and self.run_name not in (".", ".."),
            f"train.run_name must be a plain folder name; got {self.run_name!r}",
            "train.run_name",
        )
        _check(
            self.init_from is None or self.init_from.strip() != "",
            "train.init_from must be null or the path of a checkpoint / MAISI state dict",
            "train.init_from",
        )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "discriminator": DiscriminatorConfig,
    "perceptual": PerceptualConfig,
    "data": DataConfig,
    "preprocessing": PreprocessingConfig,
    "augmentation": AugmentationConfig,
    "train": TrainConfig,
}


@dataclass
class Config:
    """The whole effective config: one dataclass per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-able dict of every section (tuples become lists)."""
        return {name: _section_to_dict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Build and validate a config from a (possibly partial) dict; missing keys take defaults."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a JSON object with sections {sorted(SECTIONS)}")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {unknown}; allowed sections: {sorted(SECTIONS)}", tuple(unknown)
            )
        sections = {
            name: _section_from_dict(name, section_type, raw.get(name, {}))
            for name, section_type in SECTIONS.items()
        }
        config = cls(**sections)
        for name in SECTIONS:
            getattr(config, name).validate()
        return config


def _section_to_dict(section: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe_type(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe_type(a) for a in args)})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form (lists -> tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value in args:
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
    elif origin is tuple:
        if isinstance(value, list | tuple):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], where) for v in value)
            if len(value) == len(args):
                return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {value!r} is not allowed; expected {_describe_type(tp)}", (where,))


def _section_from_dict(name: str, section_type: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{name}' must be an object", (name,))
    hints = typing.get_type_hints(section_type)
    allowed = [f.name for f in dataclasses.fields(section_type)]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in section '{name}'; allowed keys: {allowed}",
            tuple(f"{name}.{key}" for key in unknown),
        )
    values = {key: _coerce(value, hints[key], f"{name}.{key}") for key, value in raw.items()}
    return section_type(**values)


def _parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); ``value`` parsed as JSON, else a plain string."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.num_epochs=2)")
    dotted, text = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    if section not in SECTIONS:
        raise ConfigError(f"override {item!r}: unknown section {section!r}; allowed: {sorted(SECTIONS)}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    return section, key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; ``value`` is parsed as JSON, else taken as a plain string."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        section, key, value = _parse_override(item)
        raw.setdefault(section, {})[key] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a JSON config file (or only defaults when ``path`` is None) and apply ``--set`` overrides.

    An error names where the values it concerns came from: the file and/or the ``--set`` override(s).
    """
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}  # "section" / "section.key" -> the file or "--set section.key=value"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from error
        for section, values in raw.items() if isinstance(raw, dict) else ():
            sources[section] = str(path)
            if isinstance(values, dict):
                sources.update({f"{section}.{key}": str(path) for key in values})
    overrides = overrides or []
    raw = apply_overrides(raw, overrides)
    for item in overrides:
        section, key, _ = _parse_override(item)
        sources[f"{section}.{key}"] = f"--set {item}"
    try:
        return Config.from_dict(raw)
    except ConfigError as error:
        involved = {sources[key] for key in error.keys if key in sources}
        everywhere = ([str(path)] if path is not None else []) + [f"--set {item}" for item in overrides]
        named = [source for source in dict.fromkeys(everywhere) if source in involved]
        if not named and path is not None:  # e.g. the file is not a JSON object
            named = [str(path)]
        prefix = f"{', '.join(named)}: " if named else ""
        raise ConfigError(f"{prefix}{error}", error.keys) from None
