"""The codec's typed configuration, loaded from YAML by the strict loader (codec/common/config.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from codec.common.config import ConfigError, check_choice, load_config
from codec.common.loop import LoopSettings
from codec.common.optim import OptimConfig
from codec.measurement.equivariance import EQUIVARIANCE_KINDS, RESAMPLING

__all__ = ["CodecConfig", "DataConfig", "LossConfig", "ModelConfig", "OptimConfig", "TrainConfig", "load_codec_config"]


# The architecture keys of `model:` and the values they take when not given (Stable Diffusion's kl-f8 network).
# With `init: pretrained` a key left out (null) is read from the checkpoint instead, and one given must agree
# with it (codec/exchange/pretrained.py): the user then states only what they mean to check.
ARCHITECTURE_DEFAULTS = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "mid_block_add_attention": True,
    "sample_size": 512,
}
INITS = ("random", "thumbnail", "pretrained")
CONDITIONS = ("none", "class", "text")
INJECTIONS = ("concat", "film")


@dataclass
class ModelConfig:
    """diffusers `AutoencoderKL` arguments. The downsampling factor is 2**(len(block_out_channels)-1).

    Architecture keys default to null: the kl-f8 values above for a new network, the checkpoint's own for
    `init: pretrained` (see ARCHITECTURE_DEFAULTS)."""

    block_out_channels: list[int] | None = None
    layers_per_block: int | None = None
    latent_channels: int | None = None
    norm_num_groups: int | None = None
    mid_block_add_attention: bool | None = None
    sample_size: int | None = None
    # random: diffusers' initialisation. thumbnail: start as an 8x box-down / nearest-up codec (network/warm_start.py).
    # pretrained: the weights and architecture of the AutoencoderKL at `pretrained` (codec/exchange/pretrained.py).
    init: str = "random"
    # A diffusers AutoencoderKL folder (safetensors weights) or one original-LDM-format .safetensors VAE file.
    # Checked when training starts, not here, so a preset can leave it to `--pretrained PATH`.
    pretrained: str | None = None
    # none: diffusers' AutoencoderKL. class / text: a conditional codec (codec/network/conditional.py) whose encoder and
    # decoder both take the image's class label or its caption's pooled embedding (data.condition_column).
    condition: str = "none"
    condition_channels: int = 16  # the condition's embedding width
    # film: a scale and shift after every GroupNorm of encoder and decoder. concat: the embedding as extra input
    # channels of both. Measured for the same 190 steps, FiLM reconstructed 5 dB better and its prior samples
    # followed their captions more often (docs/generative-vae.md).
    condition_injection: str = "film"
    # Two channels holding the latent grid's x and y (in [-1, 1]) at the decoder's input, so that a caption's "at the
    # top left" has somewhere to act: FiLM and concat both give the decoder the same numbers at every position, and a
    # convolution alone maps a named position to pixels poorly (Liu et al. 2018, CoordConv).
    condition_coordinates: bool = False
    text_encoder: str = "minilm"  # condition: text: `minilm` (bundled) or a local transformers folder
    text_max_length: int = 32
    # The article's VAE: one latent vector for the whole image (codec/network/global_latent.py) instead of a grid of
    # cells drawn independently by prior sampling. For model.sample_size images only; stock diffusers cannot load it.
    global_latent: bool = False

    def __post_init__(self) -> None:
        check_choice("model.init", self.init, INITS)
        check_choice("model.condition", self.condition, CONDITIONS)
        if self.condition != "none":
            if self.init != "random":
                raise ConfigError(f"model.condition: {self.condition} builds a new conditional network; it starts from "
                                  f"model.init: random, not {self.init!r}")
            check_choice("model.condition_injection", self.condition_injection, INJECTIONS)
            if self.condition_channels < 1:
                raise ConfigError(f"model.condition_channels must be >= 1, got {self.condition_channels}")
        if self.init != "pretrained":
            if self.pretrained:
                raise ConfigError(f"model.pretrained is set ({self.pretrained}) but model.init is {self.init!r}; "
                                  f"set model.init: pretrained to start from it, or drop model.pretrained")
            for key, value in ARCHITECTURE_DEFAULTS.items():
                if getattr(self, key) is None:
                    setattr(self, key, copy.deepcopy(value))
        if self.global_latent and (self.condition != "none" or self.init != "random"):
            raise ConfigError(f"model.global_latent builds a new unconditional network (model.condition: none, "
                              f"model.init: random), not condition {self.condition!r} with init {self.init!r}")
        if self.block_out_channels is not None and self.norm_num_groups is not None:
            for width in self.block_out_channels:
                if width % self.norm_num_groups:
                    raise ConfigError(
                        f"model.block_out_channels: width {width} is not divisible by "
                        f"norm_num_groups={self.norm_num_groups}"
                    )

    def architecture(self) -> dict:
        """The architecture keys only: what a checkpoint records so a resume with another network is refused.
        The condition keys only when there is one, so checkpoints written before they existed still resume."""
        network = {key: getattr(self, key) for key in ARCHITECTURE_DEFAULTS}
        if self.condition != "none":
            network.update(condition=self.condition, condition_channels=self.condition_channels)
            if self.condition_injection != "concat":  # concat checkpoints written before the key still resume
                network.update(condition_injection=self.condition_injection)
            if self.condition_coordinates:  # checkpoints written before the key still resume
                network.update(condition_coordinates=True)
            if self.condition == "text":
                # standardized: built with standardize_condition (buffers a checkpoint from before it lacks)
                network.update(text_encoder=self.text_encoder, text_max_length=self.text_max_length,
                               text_standardized=True)
        if self.global_latent:  # checkpoints written before the key still resume
            network.update(global_latent=True)
        return network


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
    kl_warmup_steps: int = 0  # linear: kl_start_weight -> kl_weight over these steps
    # linear: where β starts. 0 is KL annealing (Bowman et al. 2016). Above kl_weight it anneals β *down*: a
    # conditional VAE then learns to read its condition while z is priced out, before z could carry the same facts
    # (docs/generative-vae.md: a CVAE's latent takes the object's position unless the condition is learned first).
    kl_start_weight: float = 0.0
    kl_cycle_steps: int = 0  # cyclical: period of each ramp-and-hold cycle
    kl_cycle_ramp: float = 0.5  # cyclical: fraction of a cycle spent ramping up
    learn_logvar: bool = False
    logvar_init: float = 0.0  # s: the likelihood's log-variance (mse) or log-scale (l1), stated, or learned from here
    # scaled: LDM's rec/e^s + s (β = 1e-6 is the field's codec). exact: the likelihood's true NLL, so that β = 1 is the
    # negative ELBO of the article's VAE (needs perceptual: none and pixel_weight: 1; see losses.exact_nll).
    nll: str = "scaled"
    sample_posterior: bool = True
    gan_weight: float = 0.0  # 0 disables the patch-GAN
    disc_start: int = 50001
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None  # null: same as optim.lr
    adaptive_weight_max: float = 1.0e4
    # Equivariance regulariser (measurement/equivariance.py): + w · rec(D(τ(z)), τ(x)) each step, τ drawn per step, the
    # same reconstruction terms as the plain one (the perceptual one when τ(x) is at least 64 px a side). 0: off.
    # scale: a downscale by one of `equivariance_scales`; rotate: 1-3 quarter turns; both: one of each (EQ-VAE).
    # The diffusability paper's form is `scale` with scales [0.5, 0.25]; EQ-VAE's is `both` with scales
    # 0.25 ... 0.97 in steps of 1/32 and bilinear resampling, and half its steps on τ instead of adding it.
    equivariance_weight: float = 0.0
    equivariance: str = "scale"  # scale | rotate | both
    equivariance_scales: list[float] = field(default_factory=lambda: [0.5, 0.25])
    equivariance_resample: str = "area"  # area (anti-aliased) | bilinear (EQ-VAE's)
    # [Δ_min, Δ_max]: decode the posterior mean plus uniform noise of width Δ, Δ drawn log-uniformly per example, in
    # the units a compressed file quantises (the normalised latent, exchange.pipeline.normalise_latents with the codec's
    # scaling_factor, shift and per-channel statistics): the standard training proxy for quantisation
    # (Ballé et al. 2017), so the decoder learns the latents `latent-codec compress` sends. null: off.
    quantisation_noise: list[float] | None = None

    def __post_init__(self) -> None:
        check_choice("loss.pixel", self.pixel, ("l1", "mse"))
        check_choice("loss.perceptual", self.perceptual, ("lpips", "ms_ssim", "none"))
        if self.quantisation_noise is not None:
            noise = self.quantisation_noise
            if len(noise) != 2 or not 0 < noise[0] <= noise[1]:
                raise ConfigError(f"loss.quantisation_noise: expected [Δ_min, Δ_max] with 0 < Δ_min <= Δ_max, "
                                  f"got {noise}")
            if self.sample_posterior:
                raise ConfigError("loss.quantisation_noise decodes the posterior mean plus quantisation noise, not a "
                                  "posterior sample: set loss.sample_posterior: false")
        check_choice("loss.lpips_net", self.lpips_net, ("alex", "vgg", "squeeze"))
        check_choice("loss.if_lpips_missing", self.if_lpips_missing, ("error", "ms_ssim", "none"))
        check_choice("loss.kl_schedule", self.kl_schedule, ("constant", "linear", "cyclical"))
        check_choice("loss.nll", self.nll, ("scaled", "exact"))
        if self.nll == "exact" and (self.perceptual != "none" or self.pixel_weight != 1.0):
            raise ConfigError("loss.nll: exact is the likelihood's own NLL (an ELBO): set loss.perceptual: none and "
                              f"loss.pixel_weight: 1 (got perceptual {self.perceptual!r}, "
                              f"pixel_weight {self.pixel_weight})")
        if self.kl_start_weight < 0:
            raise ConfigError(f"loss.kl_start_weight must be >= 0, got {self.kl_start_weight}")
        if self.kl_start_weight and self.kl_schedule != "linear":
            raise ConfigError(f"loss.kl_start_weight is where the linear schedule starts; kl_schedule is "
                              f"{self.kl_schedule!r}: set kl_schedule: linear or drop kl_start_weight")
        if self.kl_schedule == "cyclical" and self.kl_cycle_steps <= 0:
            raise ConfigError("loss.kl_cycle_steps must be > 0 with kl_schedule: cyclical")
        check_choice("loss.equivariance", self.equivariance, EQUIVARIANCE_KINDS)
        check_choice("loss.equivariance_resample", self.equivariance_resample, RESAMPLING)
        if self.equivariance_weight < 0:
            raise ConfigError(f"loss.equivariance_weight must be >= 0, got {self.equivariance_weight}")
        if not self.equivariance_scales or any(not 0 < s <= 1 for s in self.equivariance_scales):
            raise ConfigError("loss.equivariance_scales: give downscale factors in (0, 1], "
                              f"got {self.equivariance_scales}")
        if self.equivariance_weight > 0 and self.nll == "exact":
            raise ConfigError("loss.nll: exact is the ELBO; an equivariance term (loss.equivariance_weight > 0) would "
                              "make the objective something else: use loss.nll: scaled with it")


@dataclass
class DataConfig:
    # An image folder, webdataset tars or parquet files (local or s3:// etc.; codec/data/index.py), a saved
    # `datasets` directory, .arrow files, a hub name, or `bundled` (the colour photos inside scikit-image,
    # written to `bundled_dir`).
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
    # The column a conditional codec reads its condition from (model.condition); null: `text` or `caption` (the first
    # present) for text, `label` for class. Class labels may be integers, a ClassLabel or strings (named in sorted
    # order).
    condition_column: str | None = None
    bundled_dir: str = "data/bundled_photos"
    crop_size: int = 256
    resize: int | None = None  # resize the shorter side before cropping; null keeps native resolution
    flip: bool = True
    val_size: int = 256
    val_count: int = 8
    num_workers: int = 2


LATENT_NORMS = ("auto", "global", "shift", "per_channel", "keep")
TRAINABLE = ("all", "decoder", "encoder")


@dataclass
class TrainConfig(LoopSettings):
    """The loop settings both trainers share (codec/common/loop.py, whose defaults are the codec's), and these."""

    # Optional wall-clock budget for training steps (validation excluded). The learning-rate schedule then
    # follows whichever runs out first; such runs are not bit-reproducible (they depend on machine speed).
    max_minutes: float | None = None
    # How the export sets the latent scale (statistics are measured and recorded in every case):
    # global: scaling_factor = 1/std | shift: shift_factor = mean and scaling_factor = 1/std (SD3/Flux) |
    # per_channel: latents_mean/std | keep: the parent's, untouched |
    # auto: keep with model.init: pretrained (every U-Net, pipeline and latent cache made for the parent assumes its
    # scale), global otherwise.
    latent_norm: str = "auto"
    latent_stats_images: int = 64
    channels_last: bool = False
    # What the optimizer updates. decoder: decoder + post_quant_conv (+ the learned NLL log-variance); the encoder
    # and quant_conv stay bit-identical, so the child's latents are the parent's and shards made with the parent
    # stay valid (how sd-vae-ft-mse was made). encoder: the mirror image (encoder + quant_conv).
    trainable: str = "all"  # all | decoder | encoder

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("train.latent_norm", self.latent_norm, LATENT_NORMS)
        check_choice("train.trainable", self.trainable, TRAINABLE)


@dataclass
class CodecConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # Choices that only make sense together, refused before any run folder exists.
        if self.train.trainable != "all" and self.model.init == "random":
            raise ConfigError(f"train.trainable: {self.train.trainable} freezes half of a randomly initialised codec; "
                              f"use it with model.init: pretrained (or thumbnail), or train.trainable: all")
        if self.train.latent_norm == "keep" and self.model.init != "pretrained":
            raise ConfigError("train.latent_norm: keep keeps a parent's scale, but model.init is not pretrained; "
                              "use auto, global or per_channel")
        if self.model.condition != "none" and self.train.trainable != "all":
            # Encoder and decoder share the condition's embedding: neither half can change without the other.
            raise ConfigError(f"model.condition: {self.model.condition} trains the whole codec; train.trainable must "
                              f"be all, not {self.train.trainable}")
        if self.loss.quantisation_noise is not None and self.model.init != "pretrained":
            # Δ is in the units of the parent's measured normalisation; a new codec has none until it is exported.
            raise ConfigError("loss.quantisation_noise needs a parent codec (model.init: pretrained): Δ is in the "
                              "units of its scaling_factor, which a new codec has not measured yet")
        if self.train.trainable == "encoder" and self.loss.gan_weight > 0:
            # The adaptive GAN weight takes gradients at the decoder's last layer, which is frozen here.
            raise ConfigError("train.trainable: encoder freezes the decoder, so loss.gan_weight must be 0")
        if self.model.global_latent and not (self.model.sample_size == self.data.crop_size == self.data.val_size):
            # Its linear layers are sized for one image size, which training crops and validation must both have.
            raise ConfigError(f"model.global_latent: model.sample_size ({self.model.sample_size}), data.crop_size "
                              f"({self.data.crop_size}) and data.val_size ({self.data.val_size}) must be equal")


    def latent_norm(self) -> str:
        """train.latent_norm with `auto` resolved: keep a pretrained parent's scale, measure a new codec's."""
        if self.train.latent_norm != "auto":
            return self.train.latent_norm
        return "keep" if self.model.init == "pretrained" else "global"


def load_codec_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> CodecConfig:
    return load_config(CodecConfig, path, overrides)
