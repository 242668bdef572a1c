"""Text -> latent -> image: the codec, the latent U-Net and the text encoder as one diffusers pipeline.

    pipe = LatentDiffusionPipeline.from_pretrained("runs/unet/pipeline")
    out = pipe("a cat on a sofa", num_inference_steps=25, guidance_scale=5.0, seed=0)
    out.images[0].save("cat.png"); print(out.info)   # image and latent shapes, their element ratio

Modes: text-to-image (`__call__`), image-to-image (`__call__(..., image=..., strength=...)`: encode, noise part
of the way, denoise, decode), `reconstruct` (encode -> decode) and `sample_prior` (decode z ~ N(0, I), the codec
alone). Latents are normalised with the vae config's scaling_factor, shift_factor, latents_mean and latents_std
(normalise_latents below, diffusers' conventions); the trainer writes the shards' normalisation there, so
sampling undoes exactly the normalisation the U-Net was trained on.

A saved pipeline folder loads with stock diffusers, where this project is not installed:

    pipe = DiffusionPipeline.from_pretrained("runs/unet/pipeline", trust_remote_code=True)

save_pretrained copies this file (as pipeline.py) into the folder and names the class
["pipeline", "LatentDiffusionPipeline"] in model_index.json, diffusers' convention for a custom pipeline in the
folder; so this one file imports only the standard library, torch, numpy, PIL and diffusers
(tests/test_imports.py holds it to that). It also carries what the rest of the codec shares with an exported
pipeline, so both use one definition: image files -> RGB -> tensors and back, the latent geometry of an
AutoencoderKL, and diffusers' latent normalisation. That is why it sits at the bottom, in codec/exchange/.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.utils import BaseOutput
from PIL import ExifTags, Image, ImageOps

# ---------------------------------------------------------------------------------------------------------------
# Pixels: any PIL image -> RGB -> tensor in [-1, 1], and back
# ---------------------------------------------------------------------------------------------------------------

# Modes PIL converts to RGB correctly on its own (CMYK JPEGs with the Adobe marker are already un-inverted on read).
_PLAIN_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
# Modes that carry alpha; they are composited over white because a codec sees no alpha, and black (PIL's default
# when dropping alpha) would turn transparent logos and cut-outs into black blobs that dominate the loss.
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _exif_upright(img: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF orientation tag, because cameras store pixels sideways and only the tag says so."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
        return img  # skip exif_transpose's full copy for the common upright case
    return ImageOps.exif_transpose(img)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Replicate an already scaled float 0..255 gray plane into 8-bit RGB."""
    plane = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([plane] * 3, axis=-1))


def _int32_divisor(values: np.ndarray) -> float:
    """Divisor that maps a mode-'I' image to 0..255.

    Mode 'I' does not say how many bits the source had, so use the smallest unsigned integer type the data fits:
    max <= 255 -> 8-bit (divisor 1), max <= 65535 -> 16-bit (divisor 257, e.g. 16-bit PNGs from older Pillow),
    otherwise full int32 range. Scaling by the observed maximum instead would make every image span full
    brightness and change the content the codec learns to reproduce. A genuinely 16-bit image whose pixels are all
    <= 255 will therefore look 257x too bright; that is the price of not knowing the bit depth.
    """
    peak = int(values.max()) if values.size else 0
    if peak <= 255:
        return 1.0
    if peak <= 65535:
        return 257.0
    return (2**31 - 1) / 255.0


def _float_to_rgb(img: Image.Image) -> Image.Image:
    """Mode 'F': data <= 1 is taken as 0..1 intensities, anything larger as 0..255; NaN becomes black."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.max() <= 1.0:
        values = np.clip(values, 0.0, 1.0) * 255.0
    return _gray_to_rgb(values)


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Flatten any image with alpha (or a transparency key) onto white."""
    if img.mode == "La":
        img = img.convert("LA")  # PIL cannot go from premultiplied La straight to RGBA
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image to upright 8-bit RGB, the only format the codec consumes.

    Integer modes are scaled by their bit depth rather than clipped: PIL's own I;16 -> L conversion clips at 255,
    which would turn nearly every 16-bit photo white. I;16* divides by 257 (65535 -> 255); mode 'I' follows
    `_int32_divisor`; mode 'F' follows `_float_to_rgb`. Alpha and transparency keys are composited over white.
    """
    img = _exif_upright(img)
    mode = img.mode
    if mode in _UINT16_MODES:
        return _gray_to_rgb(np.asarray(img).astype(np.float64) / 257.0)
    if mode == "I":
        values = np.clip(np.asarray(img).astype(np.float64), 0, None)  # negative counts carry no brightness
        return _gray_to_rgb(values / _int32_divisor(values))
    if mode == "F":
        return _float_to_rgb(img)
    if mode in _ALPHA_MODES or (mode in _PLAIN_MODES and img.has_transparency_data):
        return _composite_on_white(img)
    if mode == "RGB":
        return img
    if mode in _PLAIN_MODES:
        return img.convert("RGB")
    raise ValueError(
        f"to_rgb: PIL mode {mode!r} (image size {img.size}) is not supported; convert the file to an 8/16-bit "
        f"RGB or grayscale format (PNG or JPEG) first"
    )


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image to float32 (3, H, W) in [-1, 1], the range the codec trains and evaluates in."""
    if img.mode != "RGB":
        raise ValueError(f"pil_to_tensor: expected an RGB image, got mode {img.mode!r}; call to_rgb first")
    array = np.array(img, dtype=np.uint8, copy=True)  # copy: PIL's buffer is read-only and torch warns on it
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """Inverse of pil_to_tensor; clamps first because decoder outputs overshoot [-1, 1]."""
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"tensor_to_pil: expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
    scaled = (t.detach().to("cpu", torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5
    array = scaled.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)


# ---------------------------------------------------------------------------------------------------------------
# Latent geometry of a diffusers AutoencoderKL
# ---------------------------------------------------------------------------------------------------------------


def downsample_factor(vae) -> int:
    # Each level but the last halves the resolution (diffusers' DownEncoderBlock2D convention).
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae, height: int, width: int) -> tuple[int, int, int]:
    f = downsample_factor(vae)
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} is not a multiple of the codec's downsampling factor {f}")
    return (vae.config.latent_channels, height // f, width // f)


def compression_ratio(vae, height: int, width: int, channels: int = 3) -> float:
    """Image elements per latent element: 48 for 512x512x3 -> 4x64x64 (f8, c4)."""
    return channels * height * width / math.prod(latent_shape(vae, height, width))


def encode_posterior(vae, images: torch.Tensor, condition: torch.Tensor | None = None):
    """q(z|x) (q(z|x, c) for a conditional codec, given `condition`), a diffusers DiagonalGaussianDistribution:
    `.mean`, `.logvar` (clamped to [-30, 20]), `.sample(generator)` by reparameterization, `.mode()`."""
    if condition is None:
        return vae.encode(images).latent_dist
    return vae.encode(images, condition).latent_dist


def decode_latents(vae, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """p(x|z) (p(x|z, c) for a conditional codec, given `condition`): the decoded images."""
    return (vae.decode(z) if condition is None else vae.decode(z, condition)).sample


def prior_latents(vae, n: int, height: int, width: int, generator: torch.Generator | None = None):
    """n latents z ~ N(0, I) for images of height x width, drawn on the CPU (the same seed gives the same latents
    on any device), in the codec's dtype and device."""
    z = torch.randn((n, *latent_shape(vae, height, width)), generator=generator)
    return z.to(vae.device, vae.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Latent normalisation: codec latents <-> the unit-variance space the U-Net and the entropy coder work in
# ---------------------------------------------------------------------------------------------------------------

# The vae config keys diffusers' pipelines normalise latents with, and the mapping every normalisation here is.
NORM_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def latent_norm(config) -> dict:
    """The normalisation keys of a vae config, a shards manifest's `normalisation` or any mapping with .get (None
    where absent), checked: a scaling_factor, latents_mean and latents_std both or neither, and no shift next to
    per-channel statistics (no diffusers pipeline defines that pair, so its meaning would be a guess)."""
    norm = {key: config.get(key) for key in NORM_KEYS}
    if norm["scaling_factor"] is None or not float(norm["scaling_factor"]) > 0:
        raise ValueError(f"latent normalisation {norm}: scaling_factor must be a number > 0")
    if (norm["latents_mean"] is None) != (norm["latents_std"] is None):
        raise ValueError(f"latent normalisation {norm}: latents_mean and latents_std must be set together")
    if norm["latents_mean"] is not None and norm["shift_factor"] is not None:
        raise ValueError(f"latent normalisation {norm}: shift_factor and per-channel latents_mean/latents_std are "
                         f"both set; keep one (SD3/Flux use the shift, SDXL-style codecs the per-channel statistics)")
    return norm


def _per_channel(values, z: torch.Tensor) -> torch.Tensor:
    """A list of per-channel numbers shaped to broadcast over z's (..., C, h, w)."""
    if len(values) != z.shape[-3]:
        raise ValueError(f"latent normalisation has {len(values)} per-channel values for {z.shape[-3]}-channel "
                         f"latents of shape {tuple(z.shape)}")
    return torch.tensor(values, device=z.device, dtype=z.dtype).view(-1, 1, 1)


def normalise_latents(z: torch.Tensor, norm: dict) -> torch.Tensor:
    """Codec latents (..., C, h, w) -> the diffusion/coder space, diffusers' conventions: SD z · s; SD3/Flux
    (z - shift_factor) · s; SDXL-style per-channel (z - latents_mean) · s / latents_std."""
    s = float(norm["scaling_factor"])
    if norm.get("latents_mean") is not None:
        return (z - _per_channel(norm["latents_mean"], z)) * s / _per_channel(norm["latents_std"], z)
    if norm.get("shift_factor") is not None:
        return (z - float(norm["shift_factor"])) * s
    return z * s


def denormalise_latents(z: torch.Tensor, norm: dict) -> torch.Tensor:
    """The exact inverse of normalise_latents: what the codec's decoder takes."""
    s = float(norm["scaling_factor"])
    if norm.get("latents_mean") is not None:
        return z * _per_channel(norm["latents_std"], z) / s + _per_channel(norm["latents_mean"], z)
    if norm.get("shift_factor") is not None:
        return z / s + float(norm["shift_factor"])
    return z / s


log = logging.getLogger("codec.exchange.pipeline")

# The file name diffusers looks for with custom_pipeline=FOLDER (its CUSTOM_PIPELINE_FILE_NAME), without ".py".
PIPELINE_FILE = "pipeline"
SAMPLERS = ("ddim", "dpm", "euler", "ddpm")
# What `--precision` names: the dtype the weights are loaded in (memory and speed on a GPU).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_sampler(name: str, config):
    """A sampler with the training schedule's betas and prediction type: DDIM, DPM-Solver++ (2nd order
    multistep), Euler, or ancestral DDPM (1000 steps is its natural count)."""
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    raise ValueError(f"sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def guided_prediction(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): move from the unconditional prediction towards, and past,
    the conditional one. scale 1 is the conditional prediction, 0 the unconditional one."""
    return uncond + scale * (cond - uncond)


@contextmanager
def vae_in_fp32(vae: AutoencoderKL):
    """The codec in float32 for the block inside, then back in its own dtype (lossless: fp16/bf16 -> fp32 ->
    fp16/bf16 round-trips exactly)."""
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        yield vae
    finally:
        vae.to(dtype)


def _all_finite(out) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in (out if isinstance(out, tuple) else (out,)))


def finite_or_fp32(vae: AutoencoderKL, compute: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]], what: str):
    """`compute()` (a tensor or a tuple of tensors from the codec), redone with the codec in float32 when it is not
    finite in the codec's reduced precision, with a warning.

    SD's VAE overflows float16 in its decoder (activations above 65504 become inf, then NaN images: what diffusers'
    `force_upcast` / `upcast_vae` work around by always decoding in fp32). Upcasting only on overflow keeps the
    fast path for codecs that fit. `compute` must cast its inputs to `vae.dtype` when called, so the redo really
    runs in float32. Never returns non-finite values: raises FloatingPointError if float32 fails too."""
    out = compute()
    if _all_finite(out):
        return out
    if vae.dtype != torch.float32:
        log.warning("%s: non-finite values in %s (the codec overflows this precision); redoing it in float32",
                    what, str(vae.dtype).removeprefix("torch."))
        with vae_in_fp32(vae):
            out = compute()
        if _all_finite(out):
            return out
    raise FloatingPointError(f"{what}: non-finite values even in float32, so its input or the codec's weights are "
                             f"not finite; check the image or latents given and the codec folder")


def decode_images(vae: AutoencoderKL, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Codec latents (unscaled) -> float32 images in [-1, 1], never NaN (see finite_or_fp32). `condition`: one per
    latent, for a conditional codec."""
    images = finite_or_fp32(vae, lambda: decode_latents(vae, z.to(vae.dtype), condition).float(), "codec decode")
    return images.clamp(-1, 1)


def encode_mean(vae: AutoencoderKL, pixels: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Images in [-1, 1] -> the codec's posterior mean (unscaled), float32, never NaN (see finite_or_fp32).
    `condition`: one per image, for a conditional codec."""
    return finite_or_fp32(vae, lambda: encode_posterior(vae, pixels.to(vae.dtype), condition).mode().float(),
                          "codec encode")


@torch.no_grad()
def encode_prompts(tokenizer, model, prompts: list[str], max_length: int) -> torch.Tensor:
    """Per-token last hidden states, (len(prompts), max_length, width), padded to a fixed length as SD does with
    CLIP: every prompt has the same sequence length, so they batch and cache without masks."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    device = model.device
    return model(
        input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device)
    ).last_hidden_state.float()


def seeded_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A CPU generator and the seed it got: a fresh random one when None, reported so the image can be remade."""
    generator = torch.Generator()
    if seed is None:
        seed = generator.seed()  # this generator only; the global RNG is left alone
    generator.manual_seed(seed)
    return generator, seed


@dataclass
class LatentPipelineOutput(BaseOutput):
    images: list  # PIL images, or a (N, 3, H, W) tensor in [-1, 1] with output_type="pt"
    latents: torch.Tensor | None = None  # the scaled latents that were decoded
    info: dict = field(default_factory=dict)  # mode, image/latent shapes, element ratio, settings


class LatentDiffusionPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler, text_encoder, tokenizer):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    # ---- a folder that loads without this project -------------------------------------------------------

    def save_config(self, save_directory, *args, **kwargs):
        """model_index.json (save_pretrained writes it after the components), then what lets stock diffusers load
        the folder: this file as pipeline.py, and `_class_name`
        ["pipeline", "LatentDiffusionPipeline"] (the file and the class in it)."""
        super().save_config(save_directory, *args, **kwargs)
        if type(self) is not LatentDiffusionPipeline:
            return  # a subclass lives in another file, which may import anything
        folder = Path(save_directory)
        shutil.copyfile(__file__, folder / f"{PIPELINE_FILE}.py")
        index = folder / self.config_name
        config = json.loads(index.read_text())
        config["_class_name"] = [PIPELINE_FILE, type(self).__name__]
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_config(cls, *args, **kwargs):
        """model_index.json, with a `_class_name` [file, this class's name] read as this class: diffusers would
        otherwise load the folder's copy of the code (asking for trust_remote_code) even when this class is asked
        for by name. Folders saved before, which name the class alone, load as they always did."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        name = config.get("_class_name")
        if isinstance(name, (list, tuple)) and len(name) == 2 and name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return loaded

    # ---- latent space ---------------------------------------------------------------------------------------

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Codec latent -> the unit-variance space the U-Net works in, with the vae config's normalisation
        (SD: z · 0.18215; SD3/Flux: (z - shift_factor) · scaling_factor; SDXL-style per-channel statistics:
        (z - latents_mean) · scaling_factor / latents_std)."""
        return normalise_latents(z, latent_norm(self.vae.config))

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return denormalise_latents(z, latent_norm(self.vae.config))

    def default_size(self) -> tuple[int, int]:
        side = self.unet.config.sample_size * downsample_factor(self.vae)
        return side, side

    def shapes_info(self, height: int, width: int) -> dict:
        latent = latent_shape(self.vae, height, width)
        return {
            "image_shape": [3, height, width],
            "latent_shape": list(latent),
            "compression_ratio": compression_ratio(self.vae, height, width),  # 48 for 512x512x3 -> 4x64x64
        }

    # ---- pieces ------------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, self.tokenizer.model_max_length).to(
            self._execution_device, self.unet.dtype
        )

    def use_sampler(self, name: str) -> None:
        """Swap the sampler, keeping the training schedule (betas, prediction type, spacing) of the current one."""
        self.scheduler = make_sampler(name, self.scheduler.config)

    def predict(self, latents, t, cond: torch.Tensor, uncond: torch.Tensor | None, guidance_scale: float):
        """The U-Net's output at step t, guided. guidance 1 runs only the conditional branch (what guidance 1
        equals); otherwise both branches run as one batch."""
        if uncond is None or guidance_scale == 1.0:
            return self.unet(latents, t, encoder_hidden_states=cond).sample
        both = self.unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        pred_uncond, pred_cond = both.chunk(2)
        return guided_prediction(pred_uncond, pred_cond, guidance_scale)

    def denoise(self, latents, timesteps, cond, uncond, guidance_scale: float, generator=None) -> torch.Tensor:
        for t in self.progress_bar(timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            prediction = self.predict(model_input, t, cond, uncond, guidance_scale)
            latents = self.scheduler.step(prediction, t, latents, generator=generator).prev_sample
        return latents

    def decode(self, scaled_latents: torch.Tensor) -> torch.Tensor:
        """U-Net-space latents -> float32 images in [-1, 1]; a codec overflow in fp16 is redone in fp32."""
        if not torch.isfinite(scaled_latents).all():
            # Not the codec's fault, so upcasting it cannot help: refuse rather than return NaN images.
            raise FloatingPointError(f"the denoised latents are not finite (U-Net in {self.unet.dtype}); generate "
                                     f"with --precision bf16 or fp32, or check the U-Net's weights")
        return decode_images(self.vae, self.unscale_latents(scaled_latents))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> U-Net-space latents (the scaled posterior mean), float32."""
        return self.scale_latents(encode_mean(self.vae, pixels))

    def images_to_tensor(self, images) -> torch.Tensor:
        """PIL image(s) or a (N, 3, H, W) tensor in [-1, 1] -> float32 tensor on the pipeline's device (kept in
        float32: encoding casts to the codec's dtype, so a float32 redo sees the exact pixels)."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            images = torch.stack([pil_to_tensor(to_rgb(im)) for im in images])
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        latent_shape(self.vae, images.shape[2], images.shape[3])  # raises if not a multiple of the codec's factor
        return images.to(self._execution_device, torch.float32)

    @staticmethod
    def _output(images: torch.Tensor, output_type: str):
        if output_type == "pt":
            return images.cpu()
        if output_type == "pil":
            return [tensor_to_pil(im) for im in images]
        raise ValueError(f"output_type {output_type!r}: expected pil or pt")

    # ---- modes ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        height: int | None = None,
        width: int | None = None,
        image=None,
        strength: float = 0.8,
        output_type: str = "pil",
    ) -> LatentPipelineOutput:
        """Text-to-image, or image-to-image when `image` is given: the image's latent is noised to the step
        `strength` of the way through the schedule (1: pure noise, 0: unchanged) and denoised from there."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if generator is None:
            generator, seed = seeded_generator(seed)
        device = self._execution_device
        count = len(prompts) * num_images_per_prompt
        cond = self.encode_prompt(prompts).repeat_interleave(num_images_per_prompt, 0)
        uncond = (self.encode_prompt(negatives).repeat_interleave(num_images_per_prompt, 0)
                  if guidance_scale != 1.0 else None)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        if image is None:
            height, width = (height or self.default_size()[0]), (width or self.default_size()[1])
            shape = (count, self.unet.config.in_channels, *latent_shape(self.vae, height, width)[1:])
            # Noise drawn on the CPU from the seed: the same seed gives the same image on any device.
            latents = (torch.randn(shape, generator=generator).to(device, self.unet.dtype)
                       * self.scheduler.init_noise_sigma)
            mode = "text-to-image"
        else:
            pixels = self.images_to_tensor(image)
            if pixels.shape[0] not in (1, count):
                raise ValueError(f"{pixels.shape[0]} init images for {count} outputs: give one, or one per output")
            height, width = pixels.shape[2], pixels.shape[3]
            clean = self.encode(pixels).to(self.unet.dtype).expand(count, -1, -1, -1)
            start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
            timesteps = timesteps[start * self.scheduler.order :]
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(start * self.scheduler.order)
            noise = torch.randn(clean.shape, generator=generator).to(device, clean.dtype)
            latents = self.scheduler.add_noise(clean, noise, timesteps[:1].repeat(count)) if len(timesteps) else clean
            mode = "image-to-image"

        latents = self.denoise(latents, timesteps, cond, uncond, guidance_scale, generator)
        images = self.decode(latents)
        info = dict(
            mode=mode, **self.shapes_info(height, width), prompts=prompts, negative_prompts=negatives,
            steps=num_inference_steps, denoising_steps_run=len(timesteps), guidance_scale=guidance_scale,
            sampler=type(self.scheduler).__name__, seed=seed,
        )
        if image is not None:
            info["strength"] = strength
        return LatentPipelineOutput(images=self._output(images, output_type), latents=latents, info=info)

    @torch.no_grad()
    def reconstruct(self, image, output_type: str = "pil") -> LatentPipelineOutput:
        """Encode -> posterior mean -> decode: what the codec keeps of an image."""
        pixels = self.images_to_tensor(image)
        latents = self.encode(pixels)
        images = self.decode(latents)
        info = dict(mode="reconstruction", **self.shapes_info(pixels.shape[2], pixels.shape[3]))
        return LatentPipelineOutput(images=self._output(images, output_type), latents=latents, info=info)

    @torch.no_grad()
    def sample_prior(self, num_images: int = 1, seed: int | None = None, height: int | None = None,
                     width: int | None = None, output_type: str = "pil") -> LatentPipelineOutput:
        """Decode z ~ N(0, I) in the codec's own latent space (its KL prior), no U-Net: what the codec generates
        alone, the baseline the diffusion model must beat."""
        height, width = (height or self.default_size()[0]), (width or self.default_size()[1])
        generator, seed = seeded_generator(seed)
        images = decode_images(self.vae, prior_latents(self.vae, num_images, height, width, generator))
        info = dict(mode="prior", **self.shapes_info(height, width), seed=seed)
        return LatentPipelineOutput(images=self._output(images, output_type), latents=None, info=info)
