"""Bin probabilities against closed forms computed independently (scipy), including the far tails."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import expit
from scipy.stats import norm

from codec.entropy.discrete import (
    bits,
    gaussian_bin_probability,
    logistic_bin_probability,
    logistic_mixture_bin_probability,
    normal_cdf,
)


def test_gaussian_bin_is_the_difference_of_normal_cdfs():
    centers = torch.linspace(-6, 6, 49, dtype=torch.float64)
    mean, scale, w = 0.3, 1.7, 0.25
    expected = norm.cdf(centers.numpy() + w, mean, scale) - norm.cdf(centers.numpy() - w, mean, scale)
    got = gaussian_bin_probability(centers, w, torch.tensor(mean, dtype=torch.float64),
                                   torch.tensor(scale, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_gaussian_far_tails_keep_their_digits():
    """20σ above the mean, CDF(b) - CDF(a) of two numbers equal to 1 in float64 would be 0, and so would
    torch.special.ndtr's lower tail; the folded erfc form keeps ~15 digits."""
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for center in (20.0, -20.0):
        got = gaussian_bin_probability(torch.tensor(center, dtype=torch.float64), 0.5, zero, one)
        assert math.isclose(float(got), norm.sf(19.5) - norm.sf(20.5), rel_tol=1e-9)
    assert math.isclose(float(normal_cdf(torch.tensor(-8.0, dtype=torch.float64))), norm.cdf(-8.0), rel_tol=1e-12)


def test_logistic_bin_is_the_difference_of_sigmoids():
    centers = torch.linspace(-5, 5, 41, dtype=torch.float64)
    loc, scale, w = -0.4, 0.6, 0.1
    expected = expit((centers.numpy() + w - loc) / scale) - expit((centers.numpy() - w - loc) / scale)
    got = logistic_bin_probability(centers, w, torch.tensor(loc, dtype=torch.float64),
                                   torch.tensor(scale, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_mixture_is_the_weighted_sum_and_its_bins_sum_to_one():
    logits = torch.tensor([0.2, -1.0, 0.5], dtype=torch.float64)
    loc = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    scale = torch.tensor([0.3, 1.0, 0.5], dtype=torch.float64)
    step = 0.2
    centers = torch.arange(-400, 401, dtype=torch.float64) * step  # ±80: every component's mass, to 1e-30
    p = logistic_mixture_bin_probability(centers, step / 2, logits, loc, scale)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    weights = torch.softmax(logits, 0)
    by_hand = sum(weights[k] * logistic_bin_probability(centers, step / 2, loc[k], scale[k]) for k in range(3))
    torch.testing.assert_close(p, by_hand, rtol=1e-12, atol=0)


def test_bits_is_minus_log2_and_floored():
    assert bits(torch.tensor([0.5, 0.25, 1.0])).tolist() == [1.0, 2.0, 0.0]
    assert float(bits(torch.tensor(0.0))) == 30.0
