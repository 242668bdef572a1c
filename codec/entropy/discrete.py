"""Probability of a quantisation bin under a continuous density, and its cost in bits.

A latent z quantised with step Δ becomes the symbol y = round(z / Δ); its probability under a density p is the mass
of the bin [yΔ - Δ/2, yΔ + Δ/2] (Ballé et al. 2018, "Variational image compression with a scale hyperprior",
eq. 4, there with Δ = 1). Both densities used here are symmetric about their location, so the mass is taken on the
side of the location where the CDF is small (CompressAI's trick): CDF(b) - CDF(a) of two numbers near 1 would lose
every digit in the far upper tail.
"""

from __future__ import annotations

import math

import torch

# The smallest probability a bin is given when bits are counted: a symbol the model thought impossible costs 30 bits
# rather than infinity (the coder itself floors every probability of its alphabet, see symbols.py).
PROBABILITY_FLOOR = 2.0**-30


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) = erfc(-x / √2) / 2. Not torch.special.ndtr, which goes through erf: it is off by 2% at x = -8 and
    returns 0 below about -8.3, where erfc keeps full relative precision down to float64's smallest numbers."""
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


def gaussian_bin_probability(center: torch.Tensor, half_width, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """P(center - w < X <= center + w) for X ~ N(mean, scale²):
    Φ((w - |c - μ|) / σ) - Φ((-w - |c - μ|) / σ), Φ the standard normal CDF (equal to Φ((c + w - μ)/σ) -
    Φ((c - w - μ)/σ) by symmetry)."""
    distance = (center - mean).abs()
    return normal_cdf((half_width - distance) / scale) - normal_cdf((-half_width - distance) / scale)


def logistic_bin_probability(center: torch.Tensor, half_width, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """P(center - w < X <= center + w) for X ~ Logistic(loc, scale): S((w - |c - m|)/s) - S((-w - |c - m|)/s), S the
    logistic sigmoid (the logistic CDF)."""
    distance = (center - loc).abs()
    return torch.sigmoid((half_width - distance) / scale) - torch.sigmoid((-half_width - distance) / scale)


def logistic_mixture_bin_probability(center: torch.Tensor, half_width, logits: torch.Tensor, loc: torch.Tensor,
                                     scale: torch.Tensor) -> torch.Tensor:
    """Σ_k π_k P_k(bin) for a mixture of logistics with weights π = softmax(logits) over the last dimension of
    logits/loc/scale (K components), which broadcast against center[..., None]."""
    weights = torch.softmax(logits, dim=-1)
    return (weights * logistic_bin_probability(center[..., None], half_width, loc, scale)).sum(-1)


def bits(probability: torch.Tensor) -> torch.Tensor:
    """-log2 p: the ideal code length of an event of probability p (floored at PROBABILITY_FLOOR)."""
    return -torch.log2(probability.clamp_min(PROBABILITY_FLOOR))
