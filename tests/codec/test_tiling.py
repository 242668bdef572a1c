"""Tiled encode/decode: exact where the mechanism alone decides, measured tolerances where the network does.

Two effects make a tiled pass differ from an untiled one: the receptive field reaching past a tile's edge
(zero padding instead of context), which the overlap and the cosine blend must hide, and diffusers'
GroupNorm normalising with per-tile statistics, which is the network's property, not the tiling's. To test
the first on its own, some tests swap every GroupNorm for an identity: what is left differs only by edge
effects. The tolerances below are the largest value measured over seeds 0, 1, 2 with margin.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from codec.data import CenterCrops, load_image_dataset
from codec.network.model import build_autoencoder, encode_posterior
from codec.network.tiling import blend_weights, seam_ratio, tile_borders, tile_spans, tiled_decode, tiled_encode
from codec.training.config import load_codec_config
from tests.conftest import CONFIGS


def tiny_codec(seed: int = 0, groupnorm: bool = True):
    torch.manual_seed(seed)
    vae = build_autoencoder(load_codec_config(CONFIGS / "codec" / "tiny.yaml").model).eval()
    if not groupnorm:
        for module in list(vae.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.GroupNorm):
                    setattr(module, name, nn.Identity())
    return vae


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> torch.Tensor:
    """The two held-out bundled photos at 160x160: a 20x20 latent, which tiles of 8 with overlap 3 cover as
    (0, 8), (5, 13), (10, 18), (12, 20): not a multiple of the tile, the last overlap larger than the others."""
    from codec.data import bundled_photos

    _, val = bundled_photos(tmp_path_factory.mktemp("photos"))
    dataset, column = load_image_dataset(val)
    crops = CenterCrops(dataset, column, 160)
    return torch.stack([crops[i]["pixels"] for i in range(len(crops))])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |a - b| over the mean deviation of b from its mean: 0 identical, ~1 as different as b's content."""
    return float((a - b).abs().mean() / (b - b.mean()).abs().mean())


def test_spans_cover_sizes_that_are_not_multiples_of_the_tile():
    assert tile_spans(100, 64, 8) == [(0, 64), (36, 100)]  # last tile moved back, overlapping more
    assert tile_spans(32, 12, 4) == [(0, 12), (8, 20), (16, 28), (20, 32)]
    assert tile_spans(40, 64, 8) == [(0, 40)]
    for size, tile, overlap in [(100, 64, 8), (33, 7, 3), (64, 64, 8), (65, 64, 8)]:
        spans = tile_spans(size, tile, overlap)
        covered = torch.zeros(size, dtype=torch.int64)
        for start, end in spans:
            assert end - start == min(tile, size)
            covered[start:end] += 1
        assert covered.min() >= 1
        assert all(a[1] - b[0] >= overlap for a, b in zip(spans, spans[1:]))  # every neighbour overlaps enough
    with pytest.raises(ValueError, match="overlap < tile"):
        tile_spans(100, 8, 8)


@pytest.mark.parametrize("scale", [1, 8])
@pytest.mark.parametrize("size, tile, overlap", [(33, 7, 3), (20, 8, 3), (12, 7, 3), (64, 16, 0)])
def test_blend_weights_sum_to_one_everywhere(scale, size, tile, overlap):
    spans = tile_spans(size, tile, overlap)  # (12, 7, 3): three tiles overlap at some positions
    total = torch.zeros(size * scale, dtype=torch.float64)
    for i, (start, end) in enumerate(spans):
        weights = blend_weights(spans, i, overlap, scale)
        assert weights.min() >= 0 and weights.max() <= 1
        total[start * scale : end * scale] += weights
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_one_tile_is_exactly_the_untiled_pass(photos):
    vae = tiny_codec()
    x = photos[:, :, :160, :96]  # not square
    with torch.no_grad():
        q = encode_posterior(vae, x)
        assert torch.equal(tiled_encode(vae, x, tile=256, overlap=64).mean, q.mean)
        assert torch.equal(tiled_decode(vae, q.mean, tile_latent=32, overlap_latent=8), vae.decode(q.mean).sample)


def test_each_tile_is_decoded_alone_and_crossfaded_with_its_neighbour(photos):
    vae = tiny_codec()
    with torch.no_grad():
        z = encode_posterior(vae, photos[:, :, :, :96]).mean  # latent 20 x 12: rows (0, 12), (8, 20)
        tiled = tiled_decode(vae, z, tile_latent=12, overlap_latent=4)
        top, bottom = vae.decode(z[:, :, :12]).sample, vae.decode(z[:, :, 8:]).sample
    assert tiled.shape == (2, 3, 160, 96)
    torch.testing.assert_close(tiled[:, :, :64], top[:, :, :64], rtol=0, atol=1e-6)  # only the top tile here
    torch.testing.assert_close(tiled[:, :, 96:], bottom[:, :, 32:], rtol=0, atol=1e-6)
    w = blend_weights([(0, 12), (8, 20)], 1, overlap=4, scale=8)[:32].view(1, 1, 32, 1).float()
    assert 0 < w[0, 0, 0, 0] < 0.01 and 0.99 < w[0, 0, -1, 0] < 1  # a raised cosine across the 32-pixel overlap
    torch.testing.assert_close(tiled[:, :, 64:96], top[:, :, 64:] * (1 - w) + bottom[:, :, :32] * w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_without_groupnorm_tiles_match_the_untiled_pass_and_leave_no_seam(photos, seed):
    vae = tiny_codec(seed, groupnorm=False)
    with torch.no_grad():
        q = encode_posterior(vae, photos)
        z = q.mean / q.mean.std()  # unit-scale latents, as a trained codec's scaled latents are
        full = vae.decode(z).sample
        tiled = tiled_decode(vae, z, tile_latent=8, overlap_latent=3)
        abutting = tiled_decode(vae, z, tile_latent=8, overlap_latent=0)
        encoded = tiled_encode(vae, photos, tile=64, overlap=24)
    # Measured (seeds 0, 1, 2): decode 0.032 / 0.0025 / 0.0084, encode 0.0045 / 0.0052 / 0.0062.
    assert relative_error(tiled, full) < 0.06
    assert relative_error(encoded.mean, q.mean) < 0.012

    def seams(images, overlap):
        borders = tile_borders(tile_spans(20, 8, overlap), 8)
        return seam_ratio(images, borders, borders, period=8) / seam_ratio(full, borders, borders, period=8)

    # Relative to the untiled image at the same places. Measured: blended 1.66 / 1.33 / 1.23 (these outputs are
    # nearly flat, so tiny differences count), abutting tiles 65 / 74 / 81: the metric does see seams.
    assert seams(tiled, 3) < 2.5
    assert seams(abutting, 0) > 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_groupnorm_the_tone_follows_each_tile_less_as_tiles_grow(photos, seed):
    """The real network normalises with per-tile statistics, so tiled output differs from untiled by more than
    edge effects; a random codec is the worst case, its statistics varying the most with content.
    docs/performance.md measures trained codecs."""
    vae = tiny_codec(seed)
    with torch.no_grad():
        q = encode_posterior(vae, photos)
        full = vae.decode(q.mean).sample
        small, large = (relative_error(tiled_decode(vae, q.mean, t, o), full) for t, o in ((8, 3), (16, 4)))
        encoded = relative_error(tiled_encode(vae, photos, tile=128, overlap=32).mean, q.mean)
    # Measured (seeds 0, 1, 2): tiles of 8: 1.35 / 1.13 / 1.22; of 16 (2x2 tiles): 0.21 / 0.32 / 0.31;
    # encode with tiles of 16: 0.16 / 0.15 / 0.20.
    assert large < 0.5 * small
    assert large < 0.5 and encoded < 0.3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_image_groupnorm_statistics_remove_the_per_tile_tone(photos, seed):
    vae = tiny_codec(seed)
    with torch.no_grad():
        q = encode_posterior(vae, photos)
        full = vae.decode(q.mean).sample
        per_tile = relative_error(tiled_decode(vae, q.mean, 16, 4), full)
        whole = relative_error(tiled_decode(vae, q.mean, 16, 4, norm="image"), full)
        encoded_per_tile = relative_error(tiled_encode(vae, photos, tile=128, overlap=32).mean, q.mean)
        encoded_whole = relative_error(tiled_encode(vae, photos, tile=128, overlap=32, norm="image").mean, q.mean)
    # Measured (seeds 0, 1, 2), 2x2 tiles: decode 0.21 / 0.32 / 0.31 per tile -> 0.055 / 0.024 / 0.039 with the
    # whole image's statistics; encode 0.16 / 0.15 / 0.20 -> 0.0060 / 0.0040 / 0.0075. What is left is the
    # receptive field cut at tile edges and the mid-block attention seeing one tile.
    assert whole < 0.1 and whole < 0.3 * per_tile
    assert encoded_whole < 0.015 and encoded_whole < 0.1 * encoded_per_tile


def test_whole_image_statistics_are_the_untiled_pass_statistics(photos):
    """The mechanism itself: every decoder GroupNorm's (mean, variance) gathered tile by tile equals what the
    untiled pass computes, in the same order, up to edge effects."""
    import codec.network.tiling as tiling

    vae = tiny_codec(0)
    reference = []

    def record(norm, args, output):
        x = args[0]
        groups = x.double().reshape(x.shape[0], norm.num_groups, -1)
        reference.append((norm, groups.mean(-1), groups.var(-1, unbiased=False)))

    with torch.no_grad():
        z = encode_posterior(vae, photos).mean
        handles = [m.register_forward_hook(record) for m in vae.decoder.modules() if isinstance(m, nn.GroupNorm)]
        vae.decode(z)
        for handle in handles:
            handle.remove()
        shared = tiling._WholeImageGroupNorm(vae.decoder)
        rows = cols = tile_spans(20, 16, 4)
        tiles = [(i, j) for i in range(2) for j in range(2)]
        shared.measure(lambda i, j: vae.decode(z[:, :, rows[i][0]:rows[i][1], cols[j][0]:cols[j][1]]), tiles,
                       lambda i, j: (lambda s: blend_weights(rows, i, 4, scale=s),
                                     lambda s: blend_weights(cols, j, 4, scale=s), 16, 16))
        shared.remove()
    assert len(shared.stats) == len(reference) == 21
    for (norm, mean, var), (got_mean, got_var), ran in zip(reference, shared.stats, shared.order):
        assert ran is norm
        # Measured: means within 0.003 of the typical standard deviation, variances within 1.4%.
        assert (got_mean - mean).abs().max() < 0.01 * var.sqrt().mean()
        assert (got_var / var).log().abs().max() < 0.03


def test_one_tile_with_whole_image_norm_is_the_untiled_pass(photos):
    vae = tiny_codec()
    with torch.no_grad():
        z = encode_posterior(vae, photos).mean
        assert torch.equal(tiled_decode(vae, z, 32, 4, norm="image"), vae.decode(z).sample)


def test_refuses_diffusers_builtin_tiling_and_bad_tile_sizes(photos):
    vae = tiny_codec()
    with pytest.raises(ValueError, match="multiples of the codec's factor 8"):
        tiled_encode(vae, photos, tile=100, overlap=16)
    with pytest.raises(ValueError, match="norm must be one of"):
        tiled_decode(vae, torch.zeros(1, 4, 20, 20), 16, 4, norm="batch")
    vae.enable_tiling()
    with pytest.raises(ValueError, match="disable_tiling"):
        tiled_decode(vae, torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluation_reconstructs_through_tiles_with_either_norm(photos, seed):
    from codec.measurement.evaluate import reconstruct_posterior_mean

    vae = tiny_codec(seed)
    with torch.no_grad():
        full = reconstruct_posterior_mean(vae, photos)
        per_tile = relative_error(reconstruct_posterior_mean(vae, photos, 128, "tile"), full)
        whole = relative_error(reconstruct_posterior_mean(vae, photos, 128, "image"), full)
    # Measured (seeds 0, 1, 2), 160 px photos in 2x2 tiles of 128 px: 0.47 / 0.56 / 0.63 -> 0.063 / 0.033 / 0.047.
    assert whole < 0.1 < per_tile
