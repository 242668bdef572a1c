"""Encode and decode images larger than memory allows, one overlapping tile at a time.

Tiles overlap and are blended with a raised-cosine crossfade in the middle of each overlap, so the weights of
neighbours sum to one and no edge of a tile (where the network saw zero padding instead of context) shows.
Only one tile's activations exist at a time: peak memory follows the tile size, not the image size; only the
output itself is image-sized, accumulated in place.

What tiling does not fix: every GroupNorm in diffusers' AutoencoderKL normalises with the statistics of what it
sees, here one tile, and the mid-block attention attends only within the tile. Each tile therefore gets its own
brightness and colour; the crossfade turns the step between tiles into a smooth ramp, but on a weakly trained
codec the tone difference is visible. docs/performance.md measures it, and why a one-pass estimate of
whole-image GroupNorm statistics is not the fix.
"""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from codec.model import downsample_factor, latent_shape


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of tiles covering [0, size): stride tile - overlap, the last tile moved back to end at
    `size` (so it overlaps its neighbour more rather than running off the image). One span if size <= tile."""
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tiles: need tile >= 1 and 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _coverage(positions: torch.Tensor, centre: float, width: int) -> torch.Tensor:
    """0 before a crossfade of `width` centred at `centre`, a raised-cosine rise across it, 1 after."""
    if width == 0:
        return (positions >= centre).double()
    t = ((positions - centre) / width + 0.5).clamp(0.0, 1.0)
    return torch.sin(0.5 * math.pi * t) ** 2


def blend_weights(spans: list[tuple[int, int]], index: int, overlap: int, scale: int = 1) -> torch.Tensor:
    """1-D weights of tile `index` over its extent, all lengths multiplied by `scale`.

    Between each pair of neighbours a crossfade `overlap` wide is centred in their (possibly larger) common
    part; a tile's weight is the coverage of the crossfade before it minus that of the one after it. The
    weights of all tiles therefore sum to exactly one at every position (the sum telescopes), each crossfade
    lies inside both tiles, and pixels near a tile's edge (which saw zero padding, not context) get little
    or no weight. With overlap 0 the tiles simply abut.
    """
    start, end = spans[index]
    positions = torch.arange(start * scale, end * scale, dtype=torch.float64) + 0.5  # pixel centres

    def crossfade_centre(left: int) -> float:
        return scale * (spans[left + 1][0] + spans[left][1]) / 2

    weights = torch.ones_like(positions)
    if index > 0:
        weights = _coverage(positions, crossfade_centre(index - 1), overlap * scale)
    if index + 1 < len(spans):
        weights = weights - _coverage(positions, crossfade_centre(index), overlap * scale)
    return weights


def _check_no_builtin_tiling(vae: AutoencoderKL) -> None:
    if getattr(vae, "use_tiling", False):
        raise ValueError(
            "the codec has diffusers' own tiling enabled (vae.enable_tiling()), which would tile each of our tiles "
            "again; call vae.disable_tiling() before codec.tiling"
        )


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, images: torch.Tensor, tile: int = 512, overlap: int = 64) -> DiagonalGaussianDistribution:
    """q(z|x) of (B, 3, H, W) images, encoded in tile x tile pixel tiles overlapping by `overlap` pixels.

    Returns the posterior like codec.model.encode_posterior (`.mean`, `.logvar`, `.mode()`); mean and logvar
    are blended tile to tile with the same weights. tile and overlap must be multiples of the codec's factor.
    """
    _check_no_builtin_tiling(vae)
    f = downsample_factor(vae)
    if tile % f or overlap % f:
        raise ValueError(f"tiled_encode: tile={tile} and overlap={overlap} must be multiples of the codec's factor {f}")
    batch, _, height, width = images.shape
    channels, h, w = latent_shape(vae, height, width)
    rows, cols = tile_spans(h, tile // f, overlap // f), tile_spans(w, tile // f, overlap // f)
    moments = torch.zeros(batch, 2 * channels, h, w, dtype=torch.float32, device=images.device)
    for i, (y0, y1) in enumerate(rows):
        wy = blend_weights(rows, i, overlap // f)
        for j, (x0, x1) in enumerate(cols):
            weight = torch.outer(wy, blend_weights(cols, j, overlap // f)).to(torch.float32).to(images.device)
            posterior = vae.encode(images[:, :, y0 * f : y1 * f, x0 * f : x1 * f]).latent_dist
            moments[:, :, y0:y1, x0:x1] += torch.cat([posterior.mean, posterior.logvar], 1).float() * weight
    return DiagonalGaussianDistribution(moments.to(images.dtype))  # the weights sum to one: no division


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, latents: torch.Tensor, tile_latent: int = 64, overlap_latent: int = 8) -> torch.Tensor:
    """Decode (B, C, h, w) latents (unscaled, as encode_posterior gives them) to (B, 3, h*f, w*f) images, one
    tile_latent x tile_latent latent tile at a time, overlapping by overlap_latent latent pixels."""
    _check_no_builtin_tiling(vae)
    f = downsample_factor(vae)
    batch, _, h, w = latents.shape
    rows, cols = tile_spans(h, tile_latent, overlap_latent), tile_spans(w, tile_latent, overlap_latent)
    out = torch.zeros(batch, 3, h * f, w * f, dtype=torch.float32, device=latents.device)
    for i, (y0, y1) in enumerate(rows):
        wy = blend_weights(rows, i, overlap_latent, scale=f)
        for j, (x0, x1) in enumerate(cols):
            weight = torch.outer(wy, blend_weights(cols, j, overlap_latent, scale=f)).to(torch.float32).to(latents.device)
            pixels = vae.decode(latents[:, :, y0:y1, x0:x1]).sample
            out[:, :, y0 * f : y1 * f, x0 * f : x1 * f] += pixels.float() * weight
    return out.to(latents.dtype)


def tile_borders(spans: list[tuple[int, int]], scale: int = 1) -> list[int]:
    """Positions (times `scale`) inside the image where some tile starts or ends: where a seam would be."""
    size = spans[-1][1]
    return sorted({p * scale for span in spans for p in span if 0 < p < size})


def seam_ratio(images: torch.Tensor, row_borders: list[int], col_borders: list[int], period: int = 1) -> float:
    """Mean |jump| between neighbouring pixels across the given borders, over the same mean at all other
    positions on the same `period` grid (a decoder upsampling by f makes every f-th jump a little different,
    so for decoded images compare borders with other multiples of f).

    About 1 means the borders look like any other place in the image; a visible seam or a tone step between
    tiles makes it larger. Jumps are taken between row p-1 and row p for a border at p (columns likewise).
    """
    x = images.double()
    jumps_y = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(0, 1, 3))  # entry p-1: between rows p-1 and p
    jumps_x = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    at_border, elsewhere = [], []
    for jumps, borders in ((jumps_y, set(row_borders)), (jumps_x, set(col_borders))):
        for p in range(period, jumps.numel() + 1, period):
            (at_border if p in borders else elsewhere).append(jumps[p - 1])
    if not at_border or not elsewhere:
        raise ValueError(
            f"seam_ratio: need borders and other positions on the period-{period} grid; got borders "
            f"{sorted(row_borders)} / {sorted(col_borders)} for an image of {tuple(images.shape[-2:])}"
        )
    return float(torch.stack(at_border).mean() / torch.stack(elsewhere).mean())
