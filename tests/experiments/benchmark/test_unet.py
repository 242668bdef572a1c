"""experiments/benchmark/unet.py: FLOPs and the U-Net timings behind docs/benchmark.md."""

import pytest

from experiments.benchmark.unet import benchmark_latent_vs_pixel, benchmark_training_throughput, forward_flops
from tests.conftest import CONFIGS


def test_flop_count_includes_attention():
    import torch
    from torch import nn

    class Attend(nn.Module):
        def forward(self, q):
            return nn.functional.scaled_dot_product_attention(q, q, q)

    # QK^T and AV: 2 matmuls of 2·n·n·d FLOPs each per head; the fused CPU kernel alone would count 0.
    assert forward_flops(Attend(), torch.randn(1, 2, 64, 16)) == 2 * 2 * 2 * 64 * 64 * 16
    # Meta tensors: the same count with nothing computed, so 262,144-token attention (a 512x512 image) is free.
    n = 512 * 512
    assert forward_flops(Attend(), torch.empty(1, 8, n, 8, device="meta")) == 8 * 2 * 2 * n * n * 8


def test_512_flops_of_the_small_unet():
    # 4x64x64 latent vs 3x512x512 image, counted without running: 31.3 vs 60,711 GFLOPs. Attention at the
    # full-resolution level (262,144 tokens) makes the pixel pass ~1,900x the latent one, not 48x.
    result = benchmark_latent_vs_pixel(CONFIGS / "unet" / "small.yaml", time_it=False)
    assert result["element_ratio"] == 48.0 and result["latent_parameters"] == 13_060_228
    assert result["latent_gflops"] == pytest.approx(31.27, rel=1e-3)
    assert result["pixel_gflops"] == pytest.approx(60_711, rel=1e-3)
    assert result["flop_ratio"] > 1000


def test_latent_vs_pixel_on_the_tiny_unet(tiny_unet_config):
    # 4x4x4 latent vs 3x32x32 image: 48x fewer numbers (the 512x512 -> 4x64x64 ratio, at test size).
    result = benchmark_latent_vs_pixel(tiny_unet_config.unet, latent_shape=(4, 4, 4), image_shape=(3, 32, 32),
                                       text_tokens=16)
    assert result["element_ratio"] == 48.0
    assert result["latent_parameters"] < result["pixel_parameters"] + 100_000  # same network, 3 vs 4 channels
    # Convolutions scale with positions (x64 here), self-attention with positions squared: the FLOP ratio
    # exceeds the element ratio. Measured: 0.0144 vs 1.079 GFLOPs, 75x (and 0.005 s vs 0.10 s).
    assert result["flop_ratio"] > 48, result
    assert result["latent_seconds"] > 0 and result["pixel_seconds"] > 0


def test_training_throughput_from_shards_vs_on_the_fly(tiny_shards, tiny_codec_dir):
    result = benchmark_training_throughput(CONFIGS / "unet" / "tiny.yaml", tiny_shards, tiny_codec_dir,
                                           batch_size=4, steps=1, text_tokens=16)
    assert result["latent_shape"] == [4, 8, 8] and result["resolution"] == 64
    assert result["shards_images_per_s"] > 0 and result["on_the_fly_images_per_s"] > 0
    assert set(result) >= {"speedup", "target_speedup", "meets_target"}


def test_a_pixel_pass_over_budget_is_timed_smaller_and_scaled_by_flops(tiny_unet_config):
    result = benchmark_latent_vs_pixel(tiny_unet_config.unet, latent_shape=(4, 4, 4), image_shape=(3, 32, 32),
                                       text_tokens=16, max_timed_pixel_gflops=0.2)
    timed = result["pixel_seconds_estimated_from"]
    assert timed["shape"][1] < 32 and timed["gflops"] <= 0.2
    assert result["pixel_seconds"] == pytest.approx(timed["seconds"] * result["pixel_gflops"] / timed["gflops"])


def test_attention_head_variants_time_the_same_network_split_differently(tiny_unet_config):
    from experiments.benchmark.unet import benchmark_attention_heads

    rows = benchmark_attention_heads(tiny_unet_config.unet, {"per level": [1, 2], "8 heads": 8},
                                     latent_shape=(4, 8, 8), batch_size=2, steps=1, text_tokens=16)
    assert [r["variant"] for r in rows] == ["per level", "8 heads", "per level, bf16 autocast"]
    # tiny.yaml's widths 32, 64: one 32-channel head then two, against 8 heads of 4 and 8 channels.
    assert rows[0]["head_channels"] == [32, 32] and rows[1]["head_channels"] == [4, 8]
    assert len({r["parameters"] for r in rows}) == 1  # the split changes no parameter
    assert rows[0]["relative_time"] == 1.0 and all(r["seconds_per_image"] > 0 for r in rows)
