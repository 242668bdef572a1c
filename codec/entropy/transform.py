"""An orthonormal transform of the normalised latent, applied before quantisation: transform coding of the latent.

A VAE trained without a rate term leaves its latent correlated: the f4 compression codec's four channels are an RGB
thumbnail and a shifted luma sample (configs/codec/compress-f4.yaml), and neighbouring positions are nearly equal.
Quantising such numbers one by one spends bits on every one of them, however well a model predicts them. Rotating
them first puts the energy into few coefficients and leaves the rest near zero, where a coarse step costs almost
nothing. That is what JPEG's DCT and JPEG 2000's wavelets do; here the rotation is:

1. across channels, the Karhunen-Loève basis of the shards' latents (the eigenvectors of their channel covariance,
   largest variance first);
2. over space, on blocks of 2^levels x 2^levels positions: (C, h, w) -> (C·4^levels, h / 2^levels, w / 2^levels),
   the lowest band's C channels first, so the context model's first channel group codes the coarse image. Either
   `haar`, `levels` orthonormal 2x2 Haar splits of every band (a full wavelet packet, the Walsh-Hadamard transform
   of the block), or `dct`, the orthonormal 2D DCT-II of the block (JPEG's transform), bands in order of
   frequency. On the f4 codec's latents at 512² the DCT of 4x4 blocks takes 6% fewer bits than two Haar levels at
   a 0.2 dB higher PSNR (docs/rate-distortion.md): its basis fits smooth signals better.

Both are orthonormal, so a uniform step Δ on the coefficients is a uniform step on the latent: the squared error a
step adds to the latent is the same as without the transform, and only the bits change. The inverse is exact up to
float64 rounding; encoder and decoder only need to agree on the quantised coefficients, which the file carries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SPATIAL = ("haar", "dct")


def pad_to_factor(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, H, W) padded right and down to multiples of `factor`, edge values repeated: images to the codec's
    factor before encoding, latents to the transform's block before it."""
    height, width = x.shape[-2:]
    return F.pad(x, (0, -width % factor, 0, -height % factor), mode="replicate")


def fit_channel_basis(z: torch.Tensor) -> torch.Tensor:
    """(C, C) orthonormal rows: the principal directions of the channels of latents (N, C, h, w), largest variance
    first, each signed so that its largest component is positive (one answer for one data set)."""
    z = z.double()
    channels = z.shape[1]
    flat = z.transpose(0, 1).reshape(channels, -1)
    covariance = flat @ flat.T / flat.shape[1]  # second moment: the normalised latents are coded around 0
    _, vectors = torch.linalg.eigh(covariance)
    basis = vectors.flip(1).T.contiguous()
    signs = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    return basis * signs


def haar_split(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, 4C, h/2, w/2): the orthonormal 2x2 Haar bands [low, horizontal, vertical, diagonal]."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return torch.cat([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d], 1) / 2


def haar_merge(t: torch.Tensor) -> torch.Tensor:
    """The inverse of haar_split."""
    low, horizontal, vertical, diagonal = t.chunk(4, 1)
    a = (low + horizontal + vertical + diagonal) / 2
    b = (low - horizontal + vertical - diagonal) / 2
    c = (low + horizontal - vertical - diagonal) / 2
    d = (low - horizontal - vertical + diagonal) / 2
    top = torch.stack([a, b], -1).flatten(-2)  # interleave columns
    bottom = torch.stack([c, d], -1).flatten(-2)
    return torch.stack([top, bottom], -2).flatten(-3, -2)  # interleave rows


def dct_matrix(n: int) -> torch.Tensor:
    """(n, n) orthonormal DCT-II: row k is the k-th cosine, sampled at the n positions' centres."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


def frequency_order(n: int) -> list[tuple[int, int]]:
    """The (vertical, horizontal) frequencies of an n x n block, lowest first (by k + l, then k)."""
    return sorted(((k, j) for k in range(n) for j in range(n)), key=lambda kj: (kj[0] + kj[1], kj[0]))


def band_order(n: int) -> torch.Tensor:
    """Index k·n + l of each band (k, l) of an n x n block, in frequency_order."""
    return torch.tensor([k * n + j for k, j in frequency_order(n)])


def block_dct(x: torch.Tensor, n: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, n²C, h/n, w/n): the 2D DCT of each n x n block; band (k, l) of channel c at channel
    index rank(k, l)·C + c, ranks in frequency_order."""
    batch, channels, h, w = x.shape
    d = dct_matrix(n).to(x.device)
    blocks = x.reshape(batch, channels, h // n, n, w // n, n)
    coefficients = torch.einsum("ki,ncaibj,lj->nklcab", d, blocks, d).reshape(batch, n * n, channels, h // n, w // n)
    return coefficients[:, band_order(n).to(x.device)].reshape(batch, n * n * channels, h // n, w // n)


def block_idct(t: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of block_dct."""
    batch, bands, a, b = t.shape
    channels = bands // (n * n)
    d = dct_matrix(n).to(t.device)
    coefficients = t.reshape(batch, n * n, channels, a, b)[:, torch.argsort(band_order(n)).to(t.device)]
    blocks = torch.einsum("ki,nklcab,lj->ncaibj", d, coefficients.reshape(batch, n, n, channels, a, b), d)
    return blocks.reshape(batch, channels, a * n, b * n)


class LatentTransform:
    """Channel basis then a spatial transform of 2^levels blocks; `forward` pads a latent's sides with edge values
    to multiples of 2^levels first (the decoder crops the padded pixels off, as it crops the image's own
    padding)."""

    def __init__(self, channel_basis: torch.Tensor, levels: int, spatial: str = "haar"):
        if channel_basis.dim() != 2 or channel_basis.shape[0] != channel_basis.shape[1]:
            raise ValueError(f"channel basis must be square, got {tuple(channel_basis.shape)}")
        if levels < 0:
            raise ValueError(f"spatial levels must be >= 0, got {levels}")
        if spatial not in SPATIAL:
            raise ValueError(f"spatial transform {spatial!r}: expected one of {', '.join(SPATIAL)}")
        self.channel_basis = channel_basis.double()
        self.levels = levels
        self.spatial = spatial

    @property
    def multiple(self) -> int:
        return 2 ** self.levels

    def coded_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The coefficients' (channels, height, width) for a latent of `latent_shape`."""
        channels, h, w = latent_shape
        m = self.multiple
        return channels * m * m, -(-h // m), -(-w // m)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (C, h, w) or (N, C, h, w) -> coefficients, float64."""
        single = z.dim() == 3
        t = z[None] if single else z
        m = self.multiple
        t = torch.einsum("dc,nchw->ndhw", self.channel_basis.to(t.device), pad_to_factor(t, m).double())
        if self.spatial == "dct":
            t = block_dct(t, m)
        else:
            for _ in range(self.levels):
                t = haar_split(t)
        return t[0] if single else t

    def inverse(self, t: torch.Tensor) -> torch.Tensor:
        """Coefficients -> normalised latents (padded to multiples of 2^levels), float64."""
        single = t.dim() == 3
        z = (t[None] if single else t).double()
        if self.spatial == "dct":
            z = block_idct(z, self.multiple)
        else:
            for _ in range(self.levels):
                z = haar_merge(z)
        z = torch.einsum("dc,ndhw->nchw", self.channel_basis.to(z.device), z)
        return z[0] if single else z
