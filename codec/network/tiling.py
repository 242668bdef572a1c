"""Encode and decode images larger than memory allows, one overlapping tile at a time.

Tiles overlap and are blended with a raised-cosine crossfade in the middle of each overlap, so the weights of
neighbours sum to one and no edge of a tile (where the network saw zero padding instead of context) shows.
Only one tile's activations exist at a time: peak memory follows the tile size, not the image size; only the
output itself is image-sized, accumulated in place.

Every GroupNorm in diffusers' AutoencoderKL normalises with the statistics of what it sees, by default one
tile, so each tile gets its own brightness and colour; the crossfade turns the step between tiles into a smooth
ramp, but the tone difference can be visible. `norm="image"` removes it: every GroupNorm then normalises with
the statistics of the whole image, measured one norm at a time over all tiles (a norm's statistics depend on
every earlier norm's, so a single gathering pass gets them wrong; docs/performance.md). That costs one partial
pass over the tiles per GroupNorm, several times the work of `norm="tile"`, and keeps memory bounded by the tile.
What remains different from an untiled pass is the receptive field cut at tile edges (hidden by the overlap)
and the mid-block attention attending within a tile only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from codec.network.model import downsample_factor, latent_shape


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
            "again; call vae.disable_tiling() before codec.network.tiling"
        )


NORMS = ("tile", "image")


class _Measured(Exception):
    """Stops a tile's forward pass right after the GroupNorm being measured has seen its input."""


class _WholeImageGroupNorm:
    """Makes the GroupNorms of `module` normalise with whole-image statistics while it runs tile by tile.

    measure(run_tile, tiles) finds the norms' execution order, then for norm k runs every tile up to norm k
    (norms before it already using their whole-image statistics), accumulating blend-weighted sums of its
    input, and stops the pass there. The blend weights of all tiles sum to one at every position, so the sums
    are the whole image's. Afterwards every norm normalises with its stored (mean, variance) per sample and
    group, until the hooks are removed.
    """

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.order: list[nn.GroupNorm] = []
        self.recording = False
        self.weights: tuple[Callable[[int], torch.Tensor], Callable[[int], torch.Tensor], int, int] | None = None
        self.sums: list[torch.Tensor] = []
        self.handles = [norm.register_forward_hook(self._hook) for norm in self.norms]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, norm: nn.GroupNorm, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.order.append(norm)
            return output
        k = self.order.index(norm)
        x = args[0]
        if k < len(self.stats):
            mean, var = self.stats[k]
            return _group_norm_with(x, norm, mean, var)
        self._accumulate(x, norm)
        raise _Measured

    def _accumulate(self, x: torch.Tensor, norm: nn.GroupNorm) -> None:
        """Blend-weighted sum, sum of squares and weight per sample and group of this tile's input x."""
        weight_y, weight_x, tile_h, tile_w = self.weights
        if x.dim() == 4:
            scale = x.shape[-2] // tile_h
        else:  # diffusers' attention applies its GroupNorm to (B, C, H*W)
            scale = math.isqrt(x.shape[-1] // (tile_h * tile_w))
        w = torch.outer(weight_y(scale), weight_x(scale)).reshape(-1).to(torch.float64).to(x.device)
        batch, channels = x.shape[:2]
        groups = x.double().reshape(batch, norm.num_groups, channels // norm.num_groups, -1)
        self.sums.append(torch.stack([(groups * w).sum((2, 3)), (groups.square() * w).sum((2, 3)),
                                      (w.sum() * groups.shape[2]).expand(batch, norm.num_groups)]))

    def measure(self, run_tile: Callable[[int, int], None], tiles: list[tuple[int, int]], weights_of) -> None:
        """run_tile(i, j) runs the network on tile (i, j); weights_of(i, j) gives that tile's
        (weight_y(scale), weight_x(scale), tile_h, tile_w) for the accumulation."""
        self.recording = True
        self.weights = weights_of(*tiles[0])
        run_tile(*tiles[0])
        self.recording = False
        if sorted(map(id, self.order)) != sorted(map(id, self.norms)):
            raise RuntimeError("whole-image GroupNorm: a GroupNorm ran twice or not at all in one pass; "
                               "this network is not supported with norm='image'")
        for _ in self.order:
            self.sums = []
            for tile in tiles:
                self.weights = weights_of(*tile)
                try:
                    run_tile(*tile)
                except _Measured:
                    pass
            total, total_sq, count = torch.stack(self.sums).sum(0)
            mean = total / count
            self.stats.append((mean, (total_sq / count - mean.square()).clamp_min(0.0)))
        self.weights = None


def _group_norm_with(x: torch.Tensor, norm: nn.GroupNorm, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """GroupNorm of x with given per-(sample, group) mean and biased variance instead of x's own."""
    batch, channels = x.shape[:2]
    groups = x.reshape(batch, norm.num_groups, -1)
    inv = torch.rsqrt(var + norm.eps).to(x.dtype)[:, :, None]
    y = ((groups - mean.to(x.dtype)[:, :, None]) * inv).reshape(x.shape)
    if norm.affine:
        shape = (1, channels) + (1,) * (x.dim() - 2)
        y = y * norm.weight.reshape(shape) + norm.bias.reshape(shape)
    return y


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"tiling: norm must be one of {NORMS}, got {norm!r}")


def _tiled(module: nn.Module, rows: list[tuple[int, int]], cols: list[tuple[int, int]], overlap: int, norm: str,
           run_tile: Callable[[int, int], torch.Tensor], blend: Callable[[int, int, torch.Tensor], None]) -> None:
    """Run every tile (i, j) of rows x cols (latent spans) through run_tile and hand the result to blend, with
    `module`'s GroupNorms using whole-image statistics when norm == "image"."""
    _check_norm(norm)
    tiles = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    shared = _WholeImageGroupNorm(module) if norm == "image" and len(tiles) > 1 else None
    try:
        if shared is not None:
            def weights_of(i: int, j: int):
                return (lambda s: blend_weights(rows, i, overlap, scale=s),
                        lambda s: blend_weights(cols, j, overlap, scale=s),
                        rows[i][1] - rows[i][0], cols[j][1] - cols[j][0])

            shared.measure(run_tile, tiles, weights_of)
        for i, j in tiles:
            blend(i, j, run_tile(i, j))
    finally:
        if shared is not None:
            shared.remove()


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, images: torch.Tensor, tile: int = 512, overlap: int = 64,
                 norm: str = "tile") -> DiagonalGaussianDistribution:
    """q(z|x) of (B, 3, H, W) images, encoded in tile x tile pixel tiles overlapping by `overlap` pixels.

    Returns the posterior like codec.network.model.encode_posterior (`.mean`, `.logvar`, `.mode()`); mean and logvar
    are blended tile to tile with the same weights. tile and overlap must be multiples of the codec's factor.
    norm: "tile" (GroupNorm statistics per tile, one pass) or "image" (whole-image statistics, see the module).
    """
    _check_no_builtin_tiling(vae)
    f = downsample_factor(vae)
    if tile % f or overlap % f:
        raise ValueError(f"tiled_encode: tile={tile} and overlap={overlap} must be multiples of the codec's factor {f}")
    batch, _, height, width = images.shape
    channels, h, w = latent_shape(vae, height, width)
    rows, cols = tile_spans(h, tile // f, overlap // f), tile_spans(w, tile // f, overlap // f)
    moments = torch.zeros(batch, 2 * channels, h, w, dtype=torch.float32, device=images.device)

    def run_tile(i: int, j: int) -> torch.Tensor:
        (y0, y1), (x0, x1) = rows[i], cols[j]
        posterior = vae.encode(images[:, :, y0 * f : y1 * f, x0 * f : x1 * f]).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], 1)

    def blend(i: int, j: int, result: torch.Tensor) -> None:
        (y0, y1), (x0, x1) = rows[i], cols[j]
        weight = torch.outer(blend_weights(rows, i, overlap // f), blend_weights(cols, j, overlap // f))
        moments[:, :, y0:y1, x0:x1] += result.float() * weight.to(torch.float32).to(images.device)

    _tiled(vae.encoder, rows, cols, overlap // f, norm, run_tile, blend)
    return DiagonalGaussianDistribution(moments.to(images.dtype))  # the weights sum to one: no division


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, latents: torch.Tensor, tile_latent: int = 64, overlap_latent: int = 8,
                 norm: str = "tile") -> torch.Tensor:
    """Decode (B, C, h, w) latents (unscaled, as encode_posterior gives them) to (B, 3, h*f, w*f) images, one
    tile_latent x tile_latent latent tile at a time, overlapping by overlap_latent latent pixels.
    norm: "tile" (GroupNorm statistics per tile, one pass) or "image" (whole-image statistics, see the module)."""
    _check_no_builtin_tiling(vae)
    f = downsample_factor(vae)
    batch, _, h, w = latents.shape
    rows, cols = tile_spans(h, tile_latent, overlap_latent), tile_spans(w, tile_latent, overlap_latent)
    out = torch.zeros(batch, 3, h * f, w * f, dtype=torch.float32, device=latents.device)

    def run_tile(i: int, j: int) -> torch.Tensor:
        (y0, y1), (x0, x1) = rows[i], cols[j]
        return vae.decode(latents[:, :, y0:y1, x0:x1]).sample

    def blend(i: int, j: int, pixels: torch.Tensor) -> None:
        (y0, y1), (x0, x1) = rows[i], cols[j]
        weight = torch.outer(blend_weights(rows, i, overlap_latent, scale=f),
                             blend_weights(cols, j, overlap_latent, scale=f))
        out[:, :, y0 * f : y1 * f, x0 * f : x1 * f] += pixels.float() * weight.to(torch.float32).to(latents.device)

    _tiled(vae.decoder, rows, cols, overlap_latent, norm, run_tile, blend)
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
