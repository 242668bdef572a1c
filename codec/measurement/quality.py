"""Reference lines a codec has to beat, computed on the same images: a thumbnail and JPEG at the latent's size.

A latent of 4x64x64 numbers for a 512x512 image only means something next to what other ways of keeping that
little get: a box-downsampled thumbnail with the same factor (3x64x64 numbers, upsampled back with bicubic),
and a JPEG file as large as the latent would be stored in fp16 (C*h*w*2 bytes) or in 8 bits (C*h*w bytes).
encode_jpeg and encode_webp are also the references swept over quality by codec.entropy.rate_distortion.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from PIL import Image

from codec.data import pil_to_tensor, tensor_to_pil
from codec.network.model import latent_shape

JPEG_QUALITIES = (1, 95)  # Pillow's useful range: above 95 it only disables quantisation steps, files balloon


def latent_budgets(vae: AutoencoderKL, height: int, width: int) -> dict[str, int]:
    """Bytes one image's latent takes when stored in fp16 and in 8 bits: the JPEG budgets."""
    numbers = math.prod(latent_shape(vae, height, width))
    return {"fp16": 2 * numbers, "8bit": numbers}


def thumbnail_numbers(height: int, width: int, factor: int) -> int:
    """Values a thumbnail keeps: 3 colour channels at 1/factor of each side."""
    if height % factor or width % factor:
        raise ValueError(f"thumbnail: image size {height}x{width} is not a multiple of the factor {factor}")
    return 3 * (height // factor) * (width // factor)


def thumbnail_image(img: Image.Image, factor: int) -> Image.Image:
    """Box-average down by `factor` (each thumbnail pixel is the mean of a factor x factor block, 8-bit), then
    bicubic back up to the original size."""
    width, height = img.size
    thumbnail_numbers(height, width, factor)  # validates the size
    small = img.reduce(factor)  # PIL's reduce is an exact box filter over factor x factor blocks
    return small.resize((width, height), Image.Resampling.BICUBIC)


def thumbnail_baseline(images: torch.Tensor, factor: int) -> torch.Tensor:
    """thumbnail_image for a batch of [-1, 1] images, returned in [-1, 1]."""
    return torch.stack([pil_to_tensor(thumbnail_image(tensor_to_pil(x), factor)) for x in images])


@dataclass(frozen=True)
class JpegAtBudget:
    """The best JPEG that fits `budget` bytes, or `quality is None` when even quality 1 is larger."""

    budget: int
    quality: int | None
    encoded: bytes | None
    bytes_at_quality_1: int

    @property
    def reachable(self) -> bool:
        return self.quality is not None

    def decoded(self) -> Image.Image:
        if self.encoded is None:
            raise ValueError(
                f"no JPEG fits {self.budget} bytes (quality 1 needs {self.bytes_at_quality_1}); check .reachable first"
            )
        return Image.open(io.BytesIO(self.encoded)).convert("RGB")


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """Pillow JPEG with optimised Huffman tables (smaller files at the same quality: the fair baseline) and
    Pillow's default 4:2:0 chroma subsampling."""
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def encode_webp(img: Image.Image, quality: int) -> bytes:
    """Pillow lossy WebP (libwebp) at `quality` 0..100 with method 6, its slowest and smallest encoder setting:
    like encode_jpeg's optimised tables, the reference at its best rather than its fastest."""
    buffer = io.BytesIO()
    img.save(buffer, format="WEBP", quality=quality, method=6)
    return buffer.getvalue()


def jpeg_at_budget(img: Image.Image, budget: int) -> JpegAtBudget:
    """Highest JPEG quality in 1..95 whose file fits in `budget` bytes, by binary search.

    File size is not strictly monotone in quality, so the search keeps the invariant "lo fits, hi does not" and
    returns a boundary: the result fits and quality + 1 does not (or the result is 95).
    """
    lo, hi = JPEG_QUALITIES
    smallest = encode_jpeg(img, lo)
    if len(smallest) > budget:
        return JpegAtBudget(budget, None, None, len(smallest))
    best = encode_jpeg(img, hi)
    if len(best) <= budget:
        return JpegAtBudget(budget, hi, best, len(smallest))
    best = smallest
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = encode_jpeg(img, mid)
        if len(candidate) <= budget:
            lo, best = mid, candidate
        else:
            hi = mid
    return JpegAtBudget(budget, lo, best, len(smallest))

