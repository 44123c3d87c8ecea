"""The config schema: every key, its type, default and allowed values, in one place.

A config is JSON with one object per section (the fields of :class:`Config`). :func:`load_config` starts from
the defaults below, applies the file's values, then ``--set section.key=value`` overrides, and rejects unknown
keys, wrong types and out-of-range values. Presets (``configs/*.json``) list only the keys they change, so a
changed default here changes every preset that does not list it; ``config.json`` lists every key at its
default. The effective config (``Config.to_dict()``) is saved into the run folder and into every checkpoint,
so a checkpoint alone is enough to rebuild the model and reproduce the preprocessing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from metrics import VALIDATION_METRICS, VALIDATION_REGION_METRICS

PROBABILITY = "a probability in [0, 1]"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; ``keys``: the dotted keys it concerns."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.keys = keys


def _check(condition: bool, message: str, *keys: str) -> None:
    """Raise :class:`ConfigError` with ``message`` about ``keys`` (``section.key``; by default the key that
    ``message`` starts with) unless ``condition``."""
    if not condition:
        raise ConfigError(message, keys or (re.match(r"[\w.]+", message)[0],))


def bounded(default: Any, *rules: str) -> Any:
    """A field whose value must meet every rule, each written as its error message states it: ``">= 1"``,
    ``"> 0"``, ``"< 1"`` or an interval ``"in [low, high]"`` (``(`` / ``)``: open ends), with any words around
    it (``"a probability in [0, 1]"``). A null value of a nullable field meets them all."""
    return field(default=default, metadata={"rules": rules})


def _meets(value: float, rule: str) -> bool:
    """Whether ``value`` meets a :func:`bounded` ``rule``."""
    if interval := re.search(r"in ([\[(])([\d.]+), ([\d.]+)([\])])", rule):
        left, low, high, right = interval.groups()
        above = float(low) <= value if left == "[" else float(low) < value
        return above and (value <= float(high) if right == "]" else value < float(high))
    operator, bound = re.search(r"(>=|>|<) ([\d.]+)", rule).groups()
    return {">=": value >= float(bound), ">": value > float(bound), "<": value < float(bound)}[operator]


class _Section:
    def validate(self) -> None:
        """Raise :class:`ConfigError` for a value that breaks its field's :func:`bounded` rules; sections with
        rules between keys extend this."""
        name = next(name for name, section_type in SECTIONS.items() if section_type is type(self))
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            null = "null or " if type(None) in typing.get_args(hints[f.name]) else ""
            for rule in f.metadata.get("rules", ()) if value is not None else ():
                _check(_meets(value, rule), f"{name}.{f.name} must be {null}{rule}; got {value}")


@dataclass
class ModelConfig(_Section):
    """MAISI-style KL-VAE (see ``model/maisi_vae.py``). Defaults = the seed model.

    ``spatial_dims`` is always 3 (the model is 3-D only); the key stays so that saved configs and checkpoints,
    which list it, keep loading.
    """

    spatial_dims: Literal[3] = 3
    in_channels: int = bounded(1, ">= 1")
    out_channels: int = bounded(1, ">= 1")
    channels: tuple[int, ...] = (32, 64, 128)
    latent_channels: int = bounded(4, ">= 1")
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    attention_levels: tuple[bool, ...] = (False, False, False)
    norm_num_groups: int = bounded(32, ">= 1")
    norm_eps: float = bounded(1e-6, "> 0")
    with_encoder_nonlocal_attn: bool = False
    with_decoder_nonlocal_attn: bool = False
    upsample_mode: Literal["trilinear", "transposed"] = "trilinear"

    def validate(self) -> None:
        super().validate()
        _check(len(self.channels) >= 1, "model.channels: give at least one level")
        for name in ("num_res_blocks", "attention_levels"):
            _check(
                len(getattr(self, name)) == len(self.channels),
                f"model.{name} must have one entry per level ({len(self.channels)}, like model.channels)",
                f"model.{name}",
                "model.channels",
            )
        _check(
            all(c > 0 and c % self.norm_num_groups == 0 for c in self.channels),
            f"model.channels: every entry must be a positive multiple of model.norm_num_groups "
            f"({self.norm_num_groups}); got {list(self.channels)}",
            "model.channels",
            "model.norm_num_groups",
        )
        _check(all(n >= 1 for n in self.num_res_blocks), "model.num_res_blocks: every entry must be >= 1")


@dataclass
class DiscriminatorConfig(_Section):
    """3D PatchGAN discriminator (``model/discriminator.py``), used from ``train.gan_start_epoch``."""

    channels: int = bounded(32, ">= 1")
    num_layers: int = bounded(3, "in [1, 6]")
    norm: Literal["instance", "batch"] = "instance"
    learning_rate: float = bounded(1e-4, "> 0")
    loss: Literal["least_squares", "hinge"] = "least_squares"


@dataclass
class PerceptualConfig(_Section):
    """3D LPIPS (``model/lpips3D.py``). ``random`` is an untrained network: reported as NOT pretrained."""

    backbone: Literal["deepbet", "medicalnet_resnet10", "medicalnet_resnet50", "random"] = "deepbet"
    weights_path: str | None = None


@dataclass
class PreprocessingConfig(_Section):
    """The one preprocessing pipeline (``dataset.preprocess_volume``); saved into every checkpoint."""

    orientation: str = "RAS"
    target_spacing: tuple[float, float, float] | None = (2.0, 2.0, 2.0)
    target_shape: tuple[int, int, int] = (91, 109, 91)
    intensity: Literal["percentile", "minmax"] = "percentile"
    lower_percentile: float = 0.0
    upper_percentile: float = 99.5
    apply_mask: bool = False

    def validate(self) -> None:
        super().validate()
        _check(
            len(self.orientation) == 3 and set(self.orientation.upper()) <= set("RLAPSI"),
            f"preprocessing.orientation must be a 3-letter axis code like 'RAS'; got {self.orientation!r}",
        )
        _check(
            self.target_spacing is None or all(s > 0 for s in self.target_spacing),
            "preprocessing.target_spacing must be null or three positive numbers (mm)",
        )
        _check(
            all(s >= 1 for s in self.target_shape),
            "preprocessing.target_shape must be three positive integers",
        )
        _check(
            0.0 <= self.lower_percentile < self.upper_percentile <= 100.0,
            "preprocessing: need 0 <= lower_percentile < upper_percentile <= 100",
            "preprocessing.lower_percentile",
            "preprocessing.upper_percentile",
        )


@dataclass
class AugmentationConfig(_Section):
    """Training-only augmentations (never applied in validation, inference or latent saving)."""

    enabled: bool = True
    affine_prob: float = bounded(0.3, PROBABILITY)
    rotate_degrees: float = bounded(5.0, ">= 0")
    scale_fraction: float = bounded(0.05, ">= 0", "< 1")
    translate_voxels: float = bounded(3.0, ">= 0")
    bias_field_prob: float = bounded(0.3, PROBABILITY)
    gamma_prob: float = bounded(0.3, PROBABILITY)
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise_prob: float = bounded(0.2, PROBABILITY)
    noise_std: float = bounded(0.01, ">= 0")
    flip_left_right_prob: float = bounded(0.0, PROBABILITY)

    def validate(self) -> None:
        super().validate()
        _check(
            0 < self.gamma_range[0] <= self.gamma_range[1],
            "augmentation.gamma_range must be [low, high] with 0 < low <= high",
        )


@dataclass
class DataConfig(_Section):
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
    num_workers: int = bounded(2, ">= 0")
    skip_bad_files: bool = False
    strict_input_checks: bool = False  # inputs of mixed grids or not skull-stripped: errors, not warnings
    device_cache: Literal["auto", "on", "off"] = "auto"


@dataclass
class TrainConfig(_Section):
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
    batch_size: int = bounded(2, ">= 1")
    learning_rate: float = bounded(1e-4, "> 0")
    weight_decay: float = bounded(1e-5, ">= 0")
    num_epochs: int = bounded(100, ">= 1")
    max_steps_per_epoch: int | None = bounded(None, ">= 1")
    recon_loss: Literal["mse", "l1"] = "mse"
    beta: float = bounded(1e-7, ">= 0")
    perceptual_weight: float = bounded(0.3, ">= 0")
    adversarial_weight: float = bounded(0.1, ">= 0")
    adaptive_adversarial_weight: bool = True
    gan_start_epoch: int = bounded(50, ">= 0")
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = bounded(0, ">= 0")
    min_lr_fraction: float = bounded(0.1, "in [0, 1]")
    ema_decay: float | None = bounded(0.999, "in (0, 1), e.g. 0.999")
    time_budget_s: float | None = bounded(None, "> 0 (seconds)")
    grad_clip: float | None = bounded(1.0, "> 0")
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    recompute: Literal["auto", "on", "off"] = "auto"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    val_every: int = bounded(1, ">= 1")
    val_batch_size: int | None = bounded(None, ">= 1")
    region_metrics: bool = True
    checkpoint_every_steps: int | None = bounded(None, ">= 1")
    best_metric: str = "val/psnr_brain"
    best_metric_mode: Literal["max", "min"] = "max"
    max_consecutive_nonfinite: int = bounded(5, ">= 1")
    log_every_steps: int = bounded(10, ">= 1")
    runs_dir: str = "runs"
    best_runs_dir: str = "best_runs"

    def validate(self) -> None:
        super().validate()
        choices = VALIDATION_METRICS + (VALIDATION_REGION_METRICS if self.region_metrics else ())
        region = self.best_metric in VALIDATION_REGION_METRICS
        hint = " (region metrics need train.region_metrics: true)" if region else ""
        _check(
            self.best_metric in choices,
            f"train.best_metric must be a validation metric, one of {', '.join(choices)}; got "
            f"{self.best_metric!r}{hint}",
        )
        _check(
            self.run_name and "/" not in self.run_name and self.run_name not in (".", ".."),
            f"train.run_name must be a plain folder name; got {self.run_name!r}",
        )
        _check(
            self.init_from is None or self.init_from.strip() != "",
            "train.init_from must be null or the path of a checkpoint / MAISI state dict",
        )


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
        return {
            name: {key: list(v) if isinstance(v, tuple) else v for key, v in values.items()}
            for name, values in dataclasses.asdict(self).items()
        }

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
        config = cls(**{name: _section_from_dict(name, raw.get(name, {})) for name in SECTIONS})
        for name in SECTIONS:
            getattr(config, name).validate()
        return config


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _describe_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args)
    if origin is tuple and args[1:] == (Ellipsis,):
        return f"a list of {_describe_type(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(_describe_type(a) for a in args)})"
    return "null" if tp is type(None) else tp.__name__


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form (lists -> tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            with contextlib.suppress(ConfigError):
                return _coerce(value, option, where)
    elif origin is tuple and isinstance(value, list | tuple):
        if args[1:] == (Ellipsis,):
            args = (args[0],) * len(value)
        if len(value) == len(args):
            return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    elif (origin is Literal and value in args) or type(value) is tp:  # bool is not an int here
        return value
    elif tp is float and type(value) is int:
        return float(value)
    raise ConfigError(f"{where}: {value!r} is not allowed; expected {_describe_type(tp)}", (where,))


def _section_from_dict(name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{name}' must be an object", (name,))
    hints = typing.get_type_hints(SECTIONS[name])
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in section '{name}'; allowed keys: {list(hints)}",
            tuple(f"{name}.{key}" for key in unknown),
        )
    return SECTIONS[name](**{key: _coerce(value, hints[key], f"{name}.{key}") for key, value in raw.items()})


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings; ``value`` is parsed as JSON, else taken as a plain string."""
    raw = json.loads(json.dumps(raw))
    for item in overrides if isinstance(raw, dict) else ():  # not an object: Config.from_dict says so
        dotted, equals, text = item.partition("=")
        if not equals or "." not in dotted:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.num_epochs=2)")
        section, key = dotted.strip().split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"override {item!r}: unknown section {section!r}; allowed: {sorted(SECTIONS)}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if isinstance(raw.setdefault(section, {}), dict):  # else Config.from_dict names the section
            raw[section][key] = value
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
        sources[item.partition("=")[0].strip()] = f"--set {item}"
    try:
        return Config.from_dict(raw)
    except ConfigError as error:
        everywhere = ([str(path)] if path is not None else []) + [f"--set {item}" for item in overrides]
        named = sorted({sources[key] for key in error.keys if key in sources}, key=everywhere.index)
        if not named and path is not None:  # e.g. the file is not a JSON object
            named = [str(path)]
        prefix = f"{', '.join(named)}: " if named else ""
        raise ConfigError(f"{prefix}{error}", error.keys) from None
