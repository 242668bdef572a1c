"""What the pipeline needs of the codec and of image files, in a file that imports only torch, numpy and PIL.

Exported pipeline folders carry this file next to pipeline.py (diffusers copies the files a custom pipeline imports
relatively), so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs this very code where our
packages are not installed. codec.model and codec.data re-export these names; they are defined here only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
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
