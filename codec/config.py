"""Typed configuration loaded from YAML.

YAML holds values only; objects are built in plain Python from these dataclasses. Unknown or misspelled
keys are an error that names the key, because a typo that silently falls back to a default (say
`kl_weigth: 1e-4`) wastes a whole training run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the typed schema."""


# ---------------------------------------------------------------------------------------------------------
# Generic strict loader (also used by diffusion's configs)
# ---------------------------------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        # `int | list[int]`: a YAML list takes the list branch, anything else the first one.
        lists = [a for a in non_none if typing.get_origin(a) in (list, tuple)]
        chosen = lists[0] if lists and isinstance(value, (list, tuple)) else non_none[0]
        return _coerce(value, chosen, where)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation in (int, float):
        # PyYAML reads `1e-6` (no dot) as a string; accept any text that is a number of the right kind.
        try:
            number = annotation(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (annotation is int and float(value) != number):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `--set dotted.key=value` to a nested dict; the value is parsed as YAML (`[1,2]`, `1e-4`, `null`)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, for example train.max_steps=100")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read YAML at `path` (or start from defaults when None), apply `--set` overrides, build `cls`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------------------
# The codec's schema
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """diffusers `AutoencoderKL` arguments. The downsampling factor is 2**(len(block_out_channels)-1)."""

    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    sample_size: int = 512
    # random: diffusers' initialisation. thumbnail: start as an 8x box-down / nearest-up codec (codec/warm_start.py)
    init: str = "random"

    def __post_init__(self) -> None:
        check_choice("model.init", self.init, ("random", "thumbnail"))
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ConfigError(
                    f"model.block_out_channels: width {width} is not divisible by norm_num_groups={self.norm_num_groups}"
                )


@dataclass
class LossConfig:
    pixel: str = "l1"  # l1 | mse
    pixel_weight: float = 1.0
    perceptual: str = "lpips"  # lpips | ms_ssim | none
    perceptual_weight: float = 1.0
    lpips_net: str = "alex"  # alex | vgg | squeeze
    # Backbone state dict; null means torch hub's cache, <torch.hub.get_dir()>/checkpoints/<torchvision file name>.
    lpips_backbone: str | None = None
    # What to do when LPIPS is asked for but its backbone file is absent: stop, or train with the named
    # weight-free term instead (recorded in the log and the saved config, never silently).
    if_lpips_missing: str = "error"  # error | ms_ssim | none
    kl_weight: float = 1.0e-6
    kl_schedule: str = "constant"  # constant | linear | cyclical
    kl_warmup_steps: int = 0  # linear: 0 -> kl_weight over these steps
    kl_cycle_steps: int = 0  # cyclical: period of each ramp-and-hold cycle
    kl_cycle_ramp: float = 0.5  # cyclical: fraction of a cycle spent ramping up
    learn_logvar: bool = False
    logvar_init: float = 0.0
    sample_posterior: bool = True
    gan_weight: float = 0.0  # 0 disables the patch-GAN
    disc_start: int = 50001
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None  # null: same as optim.lr
    adaptive_weight_max: float = 1.0e4

    def __post_init__(self) -> None:
        check_choice("loss.pixel", self.pixel, ("l1", "mse"))
        check_choice("loss.perceptual", self.perceptual, ("lpips", "ms_ssim", "none"))
        check_choice("loss.lpips_net", self.lpips_net, ("alex", "vgg", "squeeze"))
        check_choice("loss.if_lpips_missing", self.if_lpips_missing, ("error", "ms_ssim", "none"))
        check_choice("loss.kl_schedule", self.kl_schedule, ("constant", "linear", "cyclical"))
        if self.kl_schedule == "cyclical" and self.kl_cycle_steps <= 0:
            raise ConfigError("loss.kl_cycle_steps must be > 0 with kl_schedule: cyclical")


@dataclass
class DataConfig:
    # An image folder, a saved `datasets` directory, parquet/arrow files, a hub name, or `bundled`
    # (the colour photos inside scikit-image, written to `bundled_dir`).
    train: str = "bundled"
    # More training sources (same kinds as `train`), mixed in: only their image column is used. Crops are drawn
    # uniformly over all images, so `extra_train_limit` (first N of each source) keeps a big source from drowning
    # a small one.
    extra_train: list[str] = field(default_factory=list)
    extra_train_limit: int | None = None
    # Held-out images; `bundled` is the bundled photos' validation split (astronaut, coffee). null holds out
    # `val_count` images of `train` instead.
    val: str | None = "bundled"
    image_column: str | None = None
    bundled_dir: str = "data/bundled_photos"
    crop_size: int = 256
    resize: int | None = None  # resize the shorter side before cropping; null keeps native resolution
    flip: bool = True
    val_size: int = 256
    val_count: int = 8
    num_workers: int = 2


@dataclass
class OptimConfig:
    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    max_grad_norm: float | None = 1.0


@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 8  # per process; the global batch is batch_size * processes * grad_accum
    grad_accum: int = 1
    max_steps: int = 1000
    # Optional wall-clock budget for training steps (validation excluded). The learning-rate schedule then
    # follows whichever runs out first; such runs are not bit-reproducible (they depend on machine speed).
    max_minutes: float | None = None
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | bf16 | fp16
    ema_decay: float | None = 0.999  # null disables EMA; the export then holds the raw weights
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 250
    log_every: int = 10
    output_dir: str = "runs/codec"
    latent_norm: str = "global"  # global: scaling_factor = 1/std | per_channel: latents_mean/std
    latent_stats_images: int = 64
    channels_last: bool = False

    def __post_init__(self) -> None:
        check_choice("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        check_choice("train.latent_norm", self.latent_norm, ("global", "per_channel"))
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")


@dataclass
class CodecConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_codec_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> CodecConfig:
    return load_config(CodecConfig, path, overrides)
