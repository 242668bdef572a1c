"""Image -> compressed file -> image, with the codec and a probability model.

Compress: pad the image to a multiple of the codec's factor (edge pixels repeated: a constant border costs
fewer bits than black and leaks no darkness into the crop), take the posterior mean (in tiles for large images:
network/tiling.py), normalise it as the model was fit (the shards' normalisation), quantise with step Δ and range-code.
Decompress: the inverse, then crop back to the image's size. Rate control picks, per image, the finest step of a
geometric ladder (8 steps per octave over the model's fitted Δ range) whose whole file fits a bit budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from codec.entropy.bitstream import BitstreamError, Header, pack, unpack
from codec.entropy.models import ProbabilityModel
from codec.entropy.symbols import (
    SYMBOL_LIMIT,
    decode_symbols,
    dequantize,
    encode_symbols,
    quantize,
    symbol_bits,
    symbols_hash,
)
from codec.entropy.transform import pad_to_factor
from codec.exchange.pipeline import pil_to_tensor, tensor_to_pil, to_rgb
from codec.network.model import decode_latents, downsample_factor, encode_posterior
from codec.network.tiling import tiled_decode, tiled_encode

TILE, OVERLAP = 512, 64  # pixels: images with a side above the tile are encoded and decoded in tiles
LADDER_STEPS_PER_OCTAVE = 8


@dataclass
class Compressed:
    data: bytes  # the whole file
    step: float
    symbols: torch.Tensor  # (C, h, w) int64
    model_bits: float  # the model's cross-entropy of the symbols: what the payload should cost

    @property
    def bits(self) -> int:
        return 8 * len(self.data)


@torch.no_grad()
def encode_latent(vae, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
    """(posterior mean (C, h, w) float64 on the CPU, not normalised; (height, width)) of any-sized image."""
    x = pil_to_tensor(to_rgb(image))[None].to(vae.device, vae.dtype)
    height, width = x.shape[-2:]
    x = pad_to_factor(x, downsample_factor(vae))
    if max(x.shape[-2:]) > TILE:
        mean = tiled_encode(vae, x, TILE, OVERLAP).mean
    else:
        mean = encode_posterior(vae, x).mean
    return mean[0].double().cpu(), (height, width)


@torch.no_grad()
def decode_latent(vae, z: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """Decode an unnormalised latent (C, h, w) and crop the padding off: the image of `size` (height, width)."""
    z = z[None].to(vae.device, vae.dtype)
    factor = downsample_factor(vae)  # the same tiles in pixels whatever the codec's factor
    if max(z.shape[-2:]) > TILE // factor:
        pixels = tiled_decode(vae, z, TILE // factor, OVERLAP // factor)
    else:
        pixels = decode_latents(vae, z)
    return tensor_to_pil(pixels[0, :, : size[0], : size[1]])


def as_step(step: float, source: str) -> float:
    """Δ as the file stores it (float32), refused unless positive and finite."""
    stored = float(np.float32(step)) if math.isfinite(step) else math.nan
    if not stored > 0 or not math.isfinite(stored):
        raise BitstreamError(f"{source}: step Δ must be a positive finite number, got {step}")
    return stored


def compress_latent(model: ProbabilityModel, z_norm: torch.Tensor, step: float, size: tuple[int, int],
                    codec_identity: str, source: str) -> Compressed:
    """The file of a normalised latent (C, h, w) quantised at `step`."""
    step = as_step(step, source)
    y = quantize(z_norm, step)
    low, high = int(y.min()), int(y.max())
    if max(-low, high) > SYMBOL_LIMIT:
        raise BitstreamError(f"{source}: at step Δ={step:g} the symbols reach {max(-low, high)}, beyond the format's "
                             f"±{SYMBOL_LIMIT}; use a coarser --step")
    words = encode_symbols(model, y, step, low, high)
    header = Header(model.kind, codec_identity, model.identity, size[0], size[1], tuple(y.shape), step, low, high,
                    symbols_hash(y))
    return Compressed(pack(header, words), step, y, symbol_bits(model, y, step, low, high))


def step_ladder(model: ProbabilityModel) -> list[float]:
    """2^(k/8) for every k whose step lies in the model's fitted Δ range, finest first."""
    low, high = model.step_range
    ks = range(math.ceil(LADDER_STEPS_PER_OCTAVE * math.log2(low) - 1e-9),
               math.floor(LADDER_STEPS_PER_OCTAVE * math.log2(high) + 1e-9) + 1)
    return [2.0 ** (k / LADDER_STEPS_PER_OCTAVE) for k in ks]


def compress_to_rate(model: ProbabilityModel, z_norm: torch.Tensor, bpp: float, size: tuple[int, int],
                     codec_identity: str, source: str) -> Compressed:
    """The file at the finest ladder step that fits bpp * height * width bits, header and checksum included.

    A binary search that keeps a step that fits on its coarse side and one that does not on its fine side: the
    step it returns fits and the next finer ladder step does not (files grow as Δ shrinks, up to a few bytes of
    coder noise, so this is the finest fit for all but near-ties)."""
    if not bpp > 0:
        raise BitstreamError(f"{source}: --bpp must be positive, got {bpp}")
    budget = bpp * size[0] * size[1]
    ladder = step_ladder(model)
    if not ladder:
        raise BitstreamError(f"--model {model.path}: its step range {model.step_range} holds no ladder step; "
                             f"give --step")

    def at(i: int) -> Compressed:
        return compress_latent(model, z_norm, ladder[i], size, codec_identity, source)

    coarsest = at(len(ladder) - 1)
    if coarsest.bits > budget:
        raise BitstreamError(f"{source}: does not fit {bpp:g} bpp: the coarsest step of the model's range "
                             f"(Δ={ladder[-1]:g}) needs {coarsest.bits / (size[0] * size[1]):.4f} bpp")
    finest = at(0)
    if finest.bits <= budget:
        return finest
    too_fine, fits, best = 0, len(ladder) - 1, coarsest
    while fits - too_fine > 1:
        middle = (too_fine + fits) // 2
        candidate = at(middle)
        if candidate.bits <= budget:
            fits, best = middle, candidate
        else:
            too_fine = middle
    return best


def compress_image(vae, model: ProbabilityModel, image: Image.Image, codec_identity: str, source: str,
                   step: float | None = None, bpp: float | None = None) -> Compressed:
    """An image's file at a given step Δ, or at the finest step that fits `bpp` bits per pixel."""
    if (step is None) == (bpp is None):
        raise BitstreamError(f"{source}: give exactly one of a step Δ or a rate in bits per pixel")
    z, size = encode_latent(vae, image)
    z_norm = model.normalise(z)
    if bpp is not None:
        return compress_to_rate(model, z_norm, bpp, size, codec_identity, source)
    return compress_latent(model, z_norm, step, size, codec_identity, source)


def read_compressed(data: bytes, source: str, model: ProbabilityModel, codec_identity: str, factor: int):
    """(header, words) of a file, refused unless it was made by this codec with this model and is self-consistent."""
    header, words = unpack(data, source)
    if header.codec_identity != codec_identity:
        raise BitstreamError(f"{source}: compressed by codec {header.codec_identity}, but --codec is codec "
                             f"{codec_identity}; decompress it with the codec that made it")
    if header.model_identity != model.identity:
        raise BitstreamError(f"{source}: compressed with probability model {header.model_identity} ({header.kind}), "
                             f"but --model {model.path} is model {model.identity} ({model.kind}); pass the model "
                             f"it was compressed with")
    expected = model.coded_shape((model.metadata["latent_channels"], math.ceil(header.height / factor),
                                  math.ceil(header.width / factor)))
    if header.latent_shape != expected or not header.low <= header.high or not header.step > 0:
        raise BitstreamError(f"{source}: inconsistent header (latent {header.latent_shape} for a "
                             f"{header.height}x{header.width} image, where this codec makes {expected}; symbol range "
                             f"{header.low}..{header.high}, step {header.step})")
    return header, words


def decompress_symbols(model: ProbabilityModel, header: Header, words: np.ndarray, source: str) -> torch.Tensor:
    """The symbols of a file, checked against the hash the encoder stored."""
    try:
        y = decode_symbols(model, words, header.latent_shape, header.step, header.low, header.high)
    except (AssertionError, ValueError) as exc:  # constriction asserts on words no encoder could have written
        raise BitstreamError(f"{source}: the payload does not decode under this model ({exc}); no image "
                             f"written") from None
    if symbols_hash(y) != header.symbols_hash:
        raise BitstreamError(f"{source}: decoded symbols do not match the encoder's (hash mismatch): the probability "
                             f"model computed other probabilities here than where the file was written; no image "
                             f"written")
    return y


def decompress_image(vae, model: ProbabilityModel, header: Header, words: np.ndarray, source: str) -> Image.Image:
    """The image of a file read by read_compressed (refusing, naming `source`, a decode that went wrong)."""
    y = decompress_symbols(model, header, words, source)
    return decode_latent(vae, model.denormalise(dequantize(y, header.step)), (header.height, header.width))
