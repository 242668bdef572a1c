"""Quantised latents as integer symbols, range-coded under a probability model, and the bits the model gives them.

The coder is constriction's range coder (a queue: symbols come out in the order they went in, pass after pass). Its
alphabet is the image's own symbol range [low, high] (both in the file's header): every symbol of the image is in
it, each gets at least the coder's smallest probability, 2^-24, so nothing is ever clipped. The model's mass
outside the range is not renormalised away: the coder gives it to the two edge symbols (coder_probability). The
bit counts below use the coder's own 24-bit probabilities; counting a renormalised Gaussian instead under-reported
the file by 5-20% for a model predicting wider than the latent.

Encoder and decoder must give the coder bit-identical probabilities. Everything is computed in float64 on the CPU
from ẑ = yΔ of symbols both sides have, and the context model's means and scales are then rounded to a grid of
2^-16 symbols (the factorized tables to 2^-32): a last-bit difference between two builds of the same arithmetic
would have to straddle a grid point to matter. The file also carries a hash of the symbols (bitstream.py), so a
decode that still went wrong is refused instead of written.
"""

from __future__ import annotations

import hashlib

import constriction
import numpy as np
import torch

from codec.entropy.discrete import normal_cdf
from codec.entropy.models import ProbabilityModel

SYMBOL_LIMIT = 32767  # the header stores the range as int16
MEAN_SCALE_GRID = 2.0**-16  # in symbol units
SCALE_BOUNDS = (0.11, 2.0**14)  # symbol units; below 0.11 a bin already holds all but ~5e-6 of the mass
TABLE_GRID = 2.0**-32
TABLE_FLOOR = 2.0**-20  # well above constriction's own floor of 2^-24
CODER_PRECISION = 24  # constriction's default models: probabilities are integers over 2^24


def quantize(z_norm: torch.Tensor, step: float) -> torch.Tensor:
    """y = round(z / Δ) as int64 (ties to even, as torch.round does everywhere)."""
    return torch.round(z_norm.double() / step).to(torch.int64)


def dequantize(y: torch.Tensor, step: float) -> torch.Tensor:
    return y.double() * step


def symbols_hash(y: torch.Tensor) -> bytes:
    """4 bytes of sha256 over the symbols as little-endian int32: a wrong decode is caught, not written."""
    return hashlib.sha256(y.to(torch.int32).numpy().astype("<i4").tobytes()).digest()[:4]


@torch.no_grad()
def factorized_tables(model: ProbabilityModel, step: float, low: int, high: int) -> np.ndarray:
    """(C, high - low + 1) float64: each channel's probabilities over the alphabet, floored, normalised, on the grid."""
    tables = model.network.channel_tables(step, low, high).clamp_min(0.0)
    tables = tables / tables.sum(-1, keepdim=True)
    tables = tables.clamp_min(TABLE_FLOOR)
    tables = tables / tables.sum(-1, keepdim=True)
    return (torch.round(tables / TABLE_GRID) * TABLE_GRID).numpy()


def _on_grid(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x / MEAN_SCALE_GRID) * MEAN_SCALE_GRID


@torch.no_grad()
def pass_gaussians(model: ProbabilityModel, index: int, coding_pass, zhat: torch.Tensor, step: float):
    """(mean, std) in symbol units, float64 numpy arrays, of the symbols of one context pass (the coder's order)."""
    network = model.network
    mean, scale = network.predict(index, coding_pass, zhat[None], torch.full((1, 1, 1, 1), step, dtype=torch.float64))
    start, end = coding_pass.channels
    target = coding_pass.target[start:end]
    mean = _on_grid(mean[0][target] / step)
    std = _on_grid(scale[0][target] / step).clamp(*SCALE_BOUNDS)
    return mean.numpy(), std.numpy()


def _context_passes(model: ProbabilityModel, shape):
    return [(i, p) for i, p in enumerate(model.network.passes(*shape[-2:])) if p.target.any()]


@torch.no_grad()
def encode_symbols(model: ProbabilityModel, y: torch.Tensor, step: float, low: int, high: int) -> np.ndarray:
    """The range coder's words (uint32) for symbols y (C, h, w), all within [low, high]. A one-symbol alphabet
    (low == high: the header alone says every symbol) costs no words."""
    encoder = constriction.stream.queue.RangeEncoder()
    if low == high:
        return encoder.get_compressed()
    if model.kind == "factorized":
        for channel, table in enumerate(factorized_tables(model, step, low, high)):
            symbols = (y[channel].reshape(-1) - low).numpy().astype(np.int32)
            encoder.encode(symbols, constriction.stream.model.Categorical(table, perfect=False))
    else:
        family = constriction.stream.model.QuantizedGaussian(low, high)
        zhat = dequantize(y, step)
        for index, coding_pass in _context_passes(model, y.shape):
            mean, std = pass_gaussians(model, index, coding_pass, zhat, step)
            encoder.encode(y[coding_pass.target].numpy().astype(np.int32), family, mean, std)
    return encoder.get_compressed()


@torch.no_grad()
def decode_symbols(model: ProbabilityModel, words: np.ndarray, shape: tuple[int, int, int], step: float, low: int,
                   high: int) -> torch.Tensor:
    """Inverse of encode_symbols: the (C, h, w) int64 symbols."""
    if low == high:
        return torch.full(shape, low, dtype=torch.int64)
    decoder = constriction.stream.queue.RangeDecoder(words)
    if model.kind == "factorized":
        rows = [decoder.decode(constriction.stream.model.Categorical(table, perfect=False), shape[1] * shape[2]) + low
                for table in factorized_tables(model, step, low, high)]
        return torch.from_numpy(np.stack(rows).astype(np.int64)).reshape(shape)
    family = constriction.stream.model.QuantizedGaussian(low, high)
    y = torch.zeros(shape, dtype=torch.int64)
    zhat = torch.zeros(shape, dtype=torch.float64)
    for index, coding_pass in _context_passes(model, shape):
        mean, std = pass_gaussians(model, index, coding_pass, zhat, step)
        decoded = torch.from_numpy(decoder.decode(family, mean, std).astype(np.int64))
        y[coding_pass.target] = decoded
        zhat[coding_pass.target] = dequantize(decoded, step)
    return y


def coder_probability(left_cdf: torch.Tensor, right_cdf: torch.Tensor, index: torch.Tensor,
                      alphabet_size: int) -> torch.Tensor:
    """The probability constriction's coder gives the symbol `index` (0 for `low`) of an alphabet of K symbols whose
    model CDF is left_cdf at its bin's left edge and right_cdf at its right edge. Its models are integers over
    2^24: each symbol 1 unit plus the units floor((2^24 - K) · CDF) it spans, the first symbol's left edge pinned
    at 0 and the last's right edge at 2^24, so the edge symbols take the tails beyond the alphabet
    (LeakyQuantizer in its quantize.rs, and Categorical with perfect=False alike). Computed from the same float64
    CDFs, these are the coder's integers, not an average of them: near 8σ the float CDF already reads 1, and the
    coder's floor then gives some symbol twice its one unit."""
    total = 2.0**CODER_PRECISION
    free = total - alphabet_size
    left = torch.where(index == 0, 0.0, torch.floor(free * left_cdf) + index)
    right = torch.where(index == alphabet_size - 1, total, torch.floor(free * right_cdf) + index + 1)
    return (right - left) / total


def categorical_probability(tables: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The coder's probability (Categorical(table, perfect=False)) of alphabet positions index (C, n) under the
    tables (C, K) of factorized_tables: their CDFs summed in order, as Categorical sums them."""
    right = torch.cumsum(tables, -1)
    right = right / right[:, -1:]
    left = torch.nn.functional.pad(right[:, :-1], (1, 0))
    return coder_probability(left.gather(1, index), right.gather(1, index), index, tables.shape[-1])


def gaussian_probability(symbols: torch.Tensor, low: int, high: int, mean: torch.Tensor,
                         std: torch.Tensor) -> torch.Tensor:
    """The coder's probability (QuantizedGaussian(low, high)) of symbols under N(mean, std²), all in symbol units.
    The plain CDF, as the coder evaluates it, not the bin mass folded to the small side (discrete.py): the coder's
    integers come from these very floats."""
    return coder_probability(normal_cdf((symbols - 0.5 - mean) / std), normal_cdf((symbols + 0.5 - mean) / std),
                             symbols - low, high - low + 1)


@torch.no_grad()
def symbol_bits(model: ProbabilityModel, y: torch.Tensor, step: float, low: int, high: int) -> float:
    """The model's cross-entropy of y: Σ -log2 p(y) with the very probabilities the coder uses (coder_probability
    over the alphabet [low, high]). A range coder pays this plus a few bytes."""
    if low == high:
        return 0.0
    if model.kind == "factorized":
        tables = torch.from_numpy(factorized_tables(model, step, low, high))
        p = categorical_probability(tables, y.reshape(y.shape[0], -1) - low)
        return float(-torch.log2(p).sum())
    total = 0.0
    zhat = dequantize(y, step)
    for index, coding_pass in _context_passes(model, y.shape):
        mean, std = (torch.from_numpy(a) for a in pass_gaussians(model, index, coding_pass, zhat, step))
        p = gaussian_probability(y[coding_pass.target].double(), low, high, mean, std)
        total += float(-torch.log2(p).sum())
    return total
