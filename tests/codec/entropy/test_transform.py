"""The orthonormal latent transform (codec/entropy/transform.py) a model may code through."""

import math

import pytest
import torch

from codec.entropy.transform import (
    LatentTransform,
    block_dct,
    block_idct,
    dct_matrix,
    fit_channel_basis,
    haar_merge,
    haar_split,
)


def test_haar_split_is_orthonormal_and_merge_inverts_it():
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    t = haar_split(x)
    assert t.shape == (2, 12, 4, 6)
    torch.testing.assert_close(haar_merge(t), x, rtol=0, atol=1e-12)
    assert t.pow(2).sum().item() == pytest.approx(x.pow(2).sum().item(), rel=1e-12)  # energy kept
    # A constant image puts everything into the low band: 2x the value (four pixels / 2), zero elsewhere.
    flat = haar_split(torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64))
    torch.testing.assert_close(flat.flatten(), torch.tensor([6.0, 0, 0, 0], dtype=torch.float64))
    # A left-right step goes into the horizontal band only.
    step = haar_split(torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]]], dtype=torch.float64))
    torch.testing.assert_close(step.flatten(), torch.tensor([0.0, 2.0, 0, 0], dtype=torch.float64))


def test_the_channel_basis_decorrelates_and_sorts_by_variance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 500, 1, 4, 4, generator=g, dtype=torch.float64)
    # Channels: 2a + 0.1b and 2a - 0.1b: one direction of variance 8, one of 0.02.
    z = torch.cat([2 * a + 0.1 * b, 2 * a - 0.1 * b], 1)
    basis = fit_channel_basis(z)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(basis[0], torch.tensor([1, 1], dtype=torch.float64) / math.sqrt(2), rtol=0, atol=1e-3)
    rotated = torch.einsum("dc,nchw->ndhw", basis, z)
    variances = rotated.pow(2).mean((0, 2, 3))
    assert variances[0] > 300 * variances[1]
    assert abs((rotated[:, 0] * rotated[:, 1]).mean().item()) < 1e-10  # uncorrelated


def test_the_block_dct_is_orthonormal_and_puts_a_constant_block_into_its_first_band():
    d = dct_matrix(4)
    torch.testing.assert_close(d @ d.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    t = block_dct(x, 4)
    assert t.shape == (2, 48, 2, 3)
    torch.testing.assert_close(block_idct(t, 4), x, rtol=0, atol=1e-12)
    assert t.pow(2).sum().item() == pytest.approx(x.pow(2).sum().item(), rel=1e-12)
    # A constant 4x4 block of 5: all in band 0 (the DC), 5 x 4 (sixteen values, orthonormal).
    flat = block_dct(torch.full((1, 1, 4, 4), 5.0, dtype=torch.float64), 4)
    assert flat[0, 0, 0, 0].item() == pytest.approx(20.0) and flat[0, 1:].abs().max() < 1e-12
    # A horizontal ramp: the first horizontal frequency (band 1, order (0,0), (0,1), ...) holds most of the rest.
    ramp = block_dct(torch.arange(4.0, dtype=torch.float64).expand(1, 1, 4, 4).contiguous(), 4)
    assert ramp[0, 1].abs().item() > 10 * ramp[0, 2:].abs().max().item()


@pytest.mark.parametrize("levels, spatial", [(0, "haar"), (1, "haar"), (2, "haar"), (2, "dct"), (3, "dct")])
def test_the_transform_round_trips_any_size_and_keeps_squared_error(levels, spatial):
    g = torch.Generator().manual_seed(1)
    basis = fit_channel_basis(torch.randn(4, 4, 6, 6, generator=g, dtype=torch.float64))
    transform = LatentTransform(basis, levels, spatial)
    z = torch.randn(4, 13, 10, generator=g, dtype=torch.float64)  # sides not multiples of 2^levels
    t = transform.forward(z)
    m = 2 ** levels
    assert tuple(t.shape) == transform.coded_shape((4, 13, 10)) == (4 * m * m, -(-13 // m), -(-10 // m))
    back = transform.inverse(t)
    torch.testing.assert_close(back[:, :13, :10], z, rtol=0, atol=1e-12)  # padding sits right and below
    # Orthonormal: an error added to the coefficients is the same squared error on the (padded) latent.
    noise = torch.rand(t.shape, generator=g, dtype=torch.float64) - 0.5
    padded = transform.inverse(t)
    assert (transform.inverse(t + noise) - padded).pow(2).sum().item() == pytest.approx(noise.pow(2).sum().item(),
                                                                                       rel=1e-12)
