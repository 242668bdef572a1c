"""The codec's typed configuration, loaded from YAML by the strict loader (codec/common/config.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from codec.common.config import ConfigError, check_choice, check_loop_settings, load_config
from codec.common.optim import OptimConfig

__all__ = ["CodecConfig", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig", "load_codec_config"]


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
class TrainConfig:
    seed: int = 0
    batch_size: int = 8  # per process; the global batch is batch_size * processes * grad_accum
    grad_accum: int = 1
    max_steps: int = 1000
    # Optional wall-clock budget for training steps (validation excluded). The learning-rate schedule then
    # follows whichever runs out first; such runs are not bit-reproducible (they depend on machine speed).
    max_minutes: float | None = None
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | bf16 | fp16
    # How long a barrier or all-reduce waits for the slowest process before the run fails. torch's NCCL default
    # (10 min) is shorter than some legitimate waits: one process writing a checkpoint, the export or validation.
    process_group_timeout_minutes: float = 30.0
    ema_decay: float | None = 0.999  # null disables EMA; the export then holds the raw weights
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 250
    log_every: int = 10
    output_dir: str = "runs/codec"
    latent_norm: str = "global"  # global: scaling_factor = 1/std | per_channel: latents_mean/std
    latent_stats_images: int = 64
    channels_last: bool = False
    # Recompute each encoder/decoder block's activations in the backward pass instead of storing them (diffusers'
    # enable_gradient_checkpointing): less activation memory for about one more forward pass of compute.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_loop_settings(self)
        check_choice("train.latent_norm", self.latent_norm, ("global", "per_channel"))


@dataclass
class CodecConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def load_codec_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> CodecConfig:
    return load_config(CodecConfig, path, overrides)
