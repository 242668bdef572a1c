"""The codec network: diffusers' `AutoencoderKL`, plus the few functions around it that training and users need.

Using the library's class (not a copy of it) is what makes our checkpoints load anywhere with
`AutoencoderKL.from_pretrained(path)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from codec.common.draws import keyed_generator
from codec.common.precision import in_fp32, run_in_fp32, sample_gaussian

# Latent geometry is defined in codec/exchange/pipeline.py, the file exported pipeline folders carry so that stock
# diffusers computes shapes exactly as we do; re-exported here, where the codec's users look for it.
from codec.exchange.pipeline import (  # noqa: F401
    compression_ratio,
    decode_latents,
    denormalise_latents,
    downsample_factor,
    encode_posterior,
    latent_norm,
    latent_shape,
    normalise_latents,
    prior_latents,
)
from codec.measurement.equivariance import Transform, transform_image, transform_latent
from codec.measurement.latent_stats import latent_sums, stats_from_sums
from codec.network.conditional import ConditionalAutoencoderKL
from codec.network.global_latent import GlobalLatentAutoencoderKL
from codec.training.config import ModelConfig


def build_autoencoder(cfg: ModelConfig) -> AutoencoderKL:
    cls = GlobalLatentAutoencoderKL if cfg.global_latent else AutoencoderKL
    return cls(
        in_channels=3,
        out_channels=3,
        **_network_arguments(cfg),
        # Placeholder until real statistics are measured at export (see write_latent_stats).
        scaling_factor=1.0,
    )


def _network_arguments(cfg: ModelConfig) -> dict:
    """The encoder/decoder shape both codec classes take from `model:`."""
    levels = len(cfg.block_out_channels)
    return dict(
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        mid_block_add_attention=cfg.mid_block_add_attention,
    )


def build_codec(cfg: ModelConfig, class_names: list[str] | None = None, condition_dim: int = 384):
    """The network `cfg` describes: AutoencoderKL, or with model.condition the conditional codec of the same shape."""
    if cfg.condition == "none":
        return build_autoencoder(cfg)
    return ConditionalAutoencoderKL(
        condition=cfg.condition,
        class_names=class_names,
        condition_dim=condition_dim,
        condition_channels=cfg.condition_channels,
        injection=cfg.condition_injection,
        coordinates=cfg.condition_coordinates,
        standardize_condition=cfg.condition == "text",
        text_encoder=cfg.text_encoder if cfg.condition == "text" else None,
        text_max_length=cfg.text_max_length,
        **_network_arguments(cfg),
    )


def load_codec(codec_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
               allow_conditional: bool = False) -> AutoencoderKL:
    """A diffusers AutoencoderKL folder (e.g. the `final/` the codec trainer exports), in `dtype`, eval mode; with
    `allow_conditional`, a ConditionalAutoencoderKL folder too (config.json's _class_name says which). Everything
    else (shards, U-Nets, pipelines, LDM files) takes an unconditional codec: a latent there carries no condition.

    Only safetensors weights are accepted: a pickled .bin could run arbitrary code on load.
    """
    path = Path(codec_dir)
    if not (path / "config.json").is_file() or not (path / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(
            f"--codec {codec_dir}: expected a diffusers AutoencoderKL folder with config.json and "
            f"diffusion_pytorch_model.safetensors (`latent-codec codec train` exports one as <out>/final)"
        )
    cls = AutoencoderKL
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name") == ConditionalAutoencoderKL.__name__:
        if not allow_conditional:
            raise ValueError(f"--codec {codec_dir} is a conditional codec (condition: {config.get('condition')}); this "
                             f"command needs an unconditional AutoencoderKL (model.condition: none). A conditional "
                             f"codec samples with `latent-codec generate --codec {codec_dir} --prior-samples N`")
        cls = ConditionalAutoencoderKL
    elif config.get("_class_name") == GlobalLatentAutoencoderKL.__name__:
        cls = GlobalLatentAutoencoderKL
    vae = cls.from_pretrained(path, use_safetensors=True, dtype=dtype)
    return vae.eval().requires_grad_(False)



def per_sample_noise(shape: tuple[int, ...], draws: torch.Tensor, seed: int, device, dtype) -> torch.Tensor:
    """Standard normal noise of `shape` where row i depends only on (seed, draws[i]).

    Keying the reparameterization noise to the training example (not to the process's RNG stream) makes a
    2-process run draw exactly the noise a 1-process run draws for the same images.
    """
    rows = [torch.randn(shape[1:], generator=keyed_generator("posterior", seed, draw)) for draw in draws.tolist()]
    return torch.stack(rows).to(device=device, dtype=dtype)


def quantisation_noise(shape: tuple[int, ...], draws: torch.Tensor, seed: int, low: float, high: float, device,
                       dtype) -> torch.Tensor:
    """Uniform noise U(-Δ/2, Δ/2) of `shape`, with one Δ per row drawn log-uniformly from [low, high]; row i
    depends only on (seed, draws[i]), as per_sample_noise's rows do."""
    rows = []
    for draw in draws.tolist():
        generator = keyed_generator("quantisation", seed, draw)
        step = low * (high / low) ** torch.rand((), generator=generator, dtype=torch.float64).item()
        rows.append((torch.rand(shape[1:], generator=generator) - 0.5) * step)
    return torch.stack(rows).to(device=device, dtype=dtype)


class CodecForTraining(nn.Module):
    """The VAE's full training forward pass in one module, so accelerate's DDP wrapper sees encode and decode
    (calling them on the unwrapped model bypasses gradient averaging, a bug of the public training script).
    Also holds the learned scalar output log-variance of the NLL, so its gradient is averaged too."""

    def __init__(self, vae: AutoencoderKL, learn_logvar: bool = False, logvar_init: float = 0.0, seed: int = 0,
                 frozen_encoder: bool = False, noise_steps: tuple[float, float] | None = None):
        super().__init__()
        self.vae = vae
        # A frozen encoder (train.trainable: decoder) runs without autograd: no activations kept for a backward
        # that never reaches it. Its KL term is then a constant, as it is in sd-vae-ft-mse's decoder-only recipe.
        self.frozen_encoder = frozen_encoder
        # The decoder's last convolution computes in fp32 under mixed precision: its output is the image, and its
        # weight is where the adaptive GAN weight takes its gradients (see run_in_fp32).
        run_in_fp32(vae.decoder.conv_out)
        self.seed = seed  # with each example's draw number, keys its posterior noise
        # loss.quantisation_noise: decode denormalise(normalise(mean) + U(-Δ/2, Δ/2)), what a file at step Δ decodes
        self.noise_steps = noise_steps
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)), requires_grad=learn_logvar)

    def forward(self, images: torch.Tensor, draws: torch.Tensor | None = None, condition: torch.Tensor | None = None,
                transform: Transform | None = None, resample: str = "area"):
        """draws: the examples' global draw numbers, to sample z ~ q(z|x) (or, with noise_steps, the mean plus
        quantisation noise); None decodes the posterior mean.
        condition: each image's condition, for a conditional codec (both networks take it).

        Returns (recon, mean, logvar); with a `transform` τ also (D(τ(z)), τ(x)), the equivariance regulariser's
        pair, computed here so that DDP sees the second decode as part of the forward pass."""
        with torch.no_grad() if self.frozen_encoder else nullcontext():
            posterior = encode_posterior(self.vae, images, condition)
        if draws is None:
            z = posterior.mode()
        elif self.noise_steps is not None:
            noise = quantisation_noise(posterior.mean.shape, draws, self.seed, *self.noise_steps,
                                       posterior.mean.device, torch.float32)
            # The noise is added where files quantise, in the normalised units, so that Δ means the same here and
            # in a file (per-channel statistics make the raw width differ per channel). In float32, as the posterior
            # sample is: a bf16 mean near 4 has steps of 1/64, which a fine Δ's noise would round back to.
            norm = latent_norm(self.vae.config)
            z = denormalise_latents(normalise_latents(posterior.mean.float(), norm) + noise, norm)
        else:
            noise = per_sample_noise(posterior.mean.shape, draws, self.seed, posterior.mean.device, torch.float32)
            z = sample_gaussian(posterior.mean, posterior.logvar, noise)
        recon = decode_latents(self.vae, z, condition)
        if transform is None:
            return recon, posterior.mean, posterior.logvar
        target = transform_image(images, transform, downsample_factor(self.vae), tuple(z.shape[-2:]), resample)
        transformed = decode_latents(self.vae, transform_latent(z, transform, resample), condition)
        return recon, posterior.mean, posterior.logvar, transformed, target


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Encode -> posterior mean -> decode: the deterministic reconstruction used for evaluation."""
    return decode_latents(vae, encode_posterior(vae, images, condition).mode(), condition)


@torch.no_grad()
def sample_prior(vae: AutoencoderKL, n: int, height: int, width: int, generator: torch.Generator | None = None,
                 condition: torch.Tensor | None = None):
    """Decode z ~ N(0, I): what the VAE generates on its own, without a diffusion model on its latents; with a
    conditional codec, x ~ p(x | z, c) for the n conditions given."""
    return decode_latents(vae, prior_latents(vae, n, height, width, generator), condition)


@torch.no_grad()
def latent_blend(za: torch.Tensor, zb: torch.Tensor, frames: int) -> torch.Tensor:
    """`frames` latents on the straight line from za to zb (each (1, C, h, w)), both ends included."""
    t = torch.linspace(0, 1, frames, device=za.device, dtype=za.dtype).view(-1, 1, 1, 1)
    return za * (1 - t) + zb * t


def interpolate(vae: AutoencoderKL, a: torch.Tensor, b: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Decode straight-line blends of two images' posterior means; returns (steps, 3, H, W) from a to b."""
    za = encode_posterior(vae, a[None]).mode()
    zb = encode_posterior(vae, b[None]).mode()
    return vae.decode(latent_blend(za, zb, steps)).sample


@torch.no_grad()
@in_fp32
def latent_statistics(vae: AutoencoderKL, batches) -> dict:
    """Statistics of the latents z ~ q(z|x) over `batches` of images: global std and mean, per-channel mean/std.

    The one definition of the latent scale, shared with the shards' manifest (the same latent_sums and
    stats_from_sums, docs/shards.md): by the law of total variance, Var[z] = Var[mean] + E[exp(logvar)], exactly,
    with no draw. LDM's scale_by_std measured SD's 0.18215 on such samples; it is what the U-Net trains on.
    """
    parts = []
    for batch in batches:  # images, or (images, conditions) for a conditional codec
        images, condition = batch if isinstance(batch, (tuple, list)) else (batch, None)
        posterior = encode_posterior(vae, images.to(vae.device, vae.dtype), condition)
        parts.append(latent_sums(posterior.mean, posterior.logvar))
    if not parts:
        raise ValueError("latent_statistics: no images given")
    return stats_from_sums(parts)


LATENT_NORM_MODES = ("global", "shift", "per_channel")


def norm_from_stats(stats: dict, mode: str) -> dict:
    """The latent normalisation (exchange.pipeline.NORM_KEYS) that makes latents of these statistics unit-variance, in
    diffusers' conventions. global: scaling_factor = 1/std (SD). shift: shift_factor = mean, scaling_factor = 1/std
    (SD3/Flux). per_channel: latents_mean/latents_std with scaling_factor 1 (SDXL-style)."""
    if mode == "global":
        return {"scaling_factor": 1.0 / stats["std"], "shift_factor": None, "latents_mean": None, "latents_std": None}
    if mode == "shift":
        return {"scaling_factor": 1.0 / stats["std"], "shift_factor": float(stats["mean"]), "latents_mean": None,
                "latents_std": None}
    if mode == "per_channel":
        return {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": list(stats["channel_mean"]),
                "latents_std": list(stats["channel_std"])}
    raise ValueError(f"latent statistics mode {mode!r}: expected one of {', '.join(LATENT_NORM_MODES)}")


def norm_mode(config) -> str:
    """Which of LATENT_NORM_MODES a vae config's normalisation has, so a re-measurement keeps its form."""
    norm = latent_norm(config)
    if norm["latents_mean"] is not None:
        return "per_channel"
    return "shift" if norm["shift_factor"] is not None else "global"


def write_latent_stats(vae: AutoencoderKL, stats: dict, mode: str = "global") -> None:
    """Store the normalisation of these statistics (norm_from_stats) in the model's config, where diffusers'
    pipelines read it."""
    vae.register_to_config(**norm_from_stats(stats, mode))


def codec_identity(vae: AutoencoderKL) -> str:
    """A short hash of the weights and architecture: shards and checkpoints record which codec made them."""
    # "_"-keys are diffusers bookkeeping (_name_or_path, _diffusers_version): a moved codec is the same codec.
    arch = {k: v for k, v in vae.config.items()
            if not k.startswith("_") and k not in ("scaling_factor", "latents_mean", "latents_std", "shift_factor")}
    return _weights_hash(hashlib.sha256(), arch, vae.state_dict().items())


def _weights_hash(h, arch: dict, tensors) -> str:
    """The first 16 hex digits of `h` fed the architecture as JSON (tuples in memory and lists on disk hash alike)
    and each (name, tensor) in name order as float32 bytes (a codec stored in fp16 and its copy saved in fp32 hold
    the same numbers)."""
    h.update(json.dumps(arch, sort_keys=True).encode())
    for name, tensor in sorted(tensors):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


# The config keys that shape what the encoder computes; decoder-side keys (up_block_types, out_channels,
# use_post_quant_conv) and the latent scale are left out, so a decoder-only fine-tune keeps its parent's value.
ENCODER_CONFIG_KEYS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "act_fn",
                       "latent_channels", "norm_num_groups", "mid_block_add_attention", "use_quant_conv")
# image -> posterior (mean, logvar): what latent shards store (a conditional codec's condition embedding feeds it too)
ENCODER_PREFIXES = ("encoder.", "quant_conv.", "condition_embedding.")
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def encoder_identity(vae: AutoencoderKL) -> str:
    """A short hash of what maps an image to its posterior: the encoder and quant_conv weights and the config keys
    that shape them. Two codecs with one encoder identity give the same latents for every image, so shards made by
    one serve the other (a decoder-only fine-tune of it, say)."""
    arch = {k: vae.config.get(k) for k in ENCODER_CONFIG_KEYS}
    encoder = [(name, t) for name, t in vae.state_dict().items() if name.startswith(ENCODER_PREFIXES)]
    return _weights_hash(hashlib.sha256(b"encoder"), arch, encoder)  # the prefix: never equal to a codec_identity


def freeze_for_training(vae: AutoencoderKL, trainable: str) -> None:
    """Leave only the `trainable` half (all | decoder | encoder) requiring grad. Done before accelerator.prepare:
    DDP registers gradient hooks for exactly the parameters that require grad at wrap time."""
    if trainable == "all":
        return
    frozen = ENCODER_PREFIXES if trainable == "decoder" else DECODER_PREFIXES
    for name, param in vae.named_parameters():
        if name.startswith(frozen):
            param.requires_grad_(False)
