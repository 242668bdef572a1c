import pytest

from diffusion.benchmark.unet import benchmark_latent_vs_pixel, benchmark_training_throughput, forward_flops
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
    from diffusion.benchmark.unet import benchmark_attention_heads

    rows = benchmark_attention_heads(tiny_unet_config.unet, {"per level": [1, 2], "8 heads": 8},
                                     latent_shape=(4, 8, 8), batch_size=2, steps=1, text_tokens=16)
    assert [r["variant"] for r in rows] == ["per level", "8 heads", "per level, bf16 autocast"]
    # tiny.yaml's widths 32, 64: one 32-channel head then two, against 8 heads of 4 and 8 channels.
    assert rows[0]["head_channels"] == [32, 32] and rows[1]["head_channels"] == [4, 8]
    assert len({r["parameters"] for r in rows}) == 1  # the split changes no parameter
    assert rows[0]["relative_time"] == 1.0 and all(r["seconds_per_image"] > 0 for r in rows)


def test_take_turns_times_every_step_each_round_after_one_warm_up():
    from diffusion.benchmark.timing import take_turns

    calls = []
    seconds = take_turns({"a": lambda k: calls.append(("a", k)), "b": lambda k: calls.append(("b", k))}, rounds=2)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert [len(t) for t in seconds.values()] == [2, 2] and all(s >= 0 for t in seconds.values() for s in t)


def _codec_row(name: str, decode_s: float | None) -> dict:
    measured = decode_s is not None
    return {"codec": name, "class": "AutoencoderKL", "parameters_m": 12.34, "encode_gflop": 101.6,
            "decode_gflop": 310.2, "matmul_gflops_per_s": 170.4, "encode_s": 0.5123, "decode_s": decode_s,
            "encode_gflops_per_s": 198.3, "decode_gflops_per_s": 354.1 if measured else None,
            "encode_fraction_of_peak": 0.4567, "decode_fraction_of_peak": 0.6612 if measured else None}


def _results(quick: bool) -> dict:
    """A results dict shaped as diffusion.benchmark.run.measure returns it, with made-up numbers."""
    kl_f8 = _codec_row("kl-f8", None if quick else 14.2)
    if quick:
        kl_f8["decode_note"] = "skipped in --quick"
    training = {"codec": "kl-f8", "codec_parameters": 83_653_863, "unet_config": "configs/unet/small.yaml",
                "unet_parameters": 13_060_228, "batch_size": 4, "steps": 5, "shards_images_per_s": 0.8,
                "on_the_fly_images_per_s": 0.1, "speedup": 8.0, "meets_target": True}
    return {
        "quick": quick, "repeats": 2 if quick else 5, "date": "2026-01-02 03:04",
        "environment": {"machine": "x86_64, 2 CPUs", "torch": "2.14.1", "diffusers": "0.42.1", "threads": 2,
                        "cpu_capability": "AVX512", "cpu_bf16_flags": ["avx512_bf16"]},
        "matmul": {"n": 2048, "seconds": 0.1, "gflops_per_s": 171.77},
        "codecs": [_codec_row("small", 0.876), kl_f8],
        "head_to_head": {"rounds": 9, "median_s": {"small": 0.9, "taesd": 1.1}, "best_s": {"small": 0.85, "taesd": 1.0},
                         "speedup": 1.2222},
        "memory": [{"codec": "small", "mode": "tiled", "tile": "512 px", "peak_rss_mb": 1608.4,
                    "decode_increase_mb": 608.2, "output_mb": 48.0, "seconds": 55.31}],
        "inference_options": {"repeats": 3, "parts": {"decode": [
            {"variant": "channels_last", "median_s": 1.2, "best_s": 1.1, "speedup": 1.25, "speedup_best": 1.27,
             "max_abs_difference": 0.0123}]}},
        "shard_encoding": {"num_workers": 2, "batch_size": 8, "resolution": 512, "ratio": 0.87654,
                           "ratio_encode_loop": 0.95, "setup_seconds": 1.2, "finalize_seconds": 0.3,
                           "encode_loop_seconds": 12.5},
        "diffusion": {"status": "skipped in --quick"} if quick else {"status": "measured", "flop_ratio": 1941.2345},
        "training": [training],
        "heads": [{"variant": "SD's 8 heads everywhere", "attention_head_dim": 8, "head_channels": [8, 16, 32],
                   "parameters": 13_060_228, "batch_size": 4, "seconds_per_image": 2.5, "relative_time": 2.03}],
    }


def test_report_renders_every_section_from_the_results():
    from diffusion.benchmark.report import markdown

    text = markdown(_results(quick=False))
    for heading in ("# Benchmark", "## Codecs: one 512x512 image", "## Memory: one 2048x2048 decode, tiled vs untiled",
                    "## Inference-path options: the small preset, one 512x512 image", "## Shard encoding",
                    "## Diffusion training", "## U-Net training step: attention heads", "## Diffusion: the same U-Net"):
        assert f"\n{heading}" in text or text.startswith(heading), heading
    assert text.startswith("Written by `scripts/benchmark.py` on 2026-01-02 03:04", len("# Benchmark\n\n"))
    assert "**172 GFLOP/s**" in text
    # A table row: numbers to the column's precision, fractions of the matmul peak as percentages.
    assert "\n| small preset | AutoencoderKL | 12.3 | 102 / 310 | 0.512 | 0.876 | 198 / 354 | 170 | 46 / 66 |\n" in text
    assert "- 16.2x faster than kl-f8" in text  # 14.2 s / 0.876 s
    assert "- 1.22x TAESD's speed (target >= 1.0): 0.900 s vs 1.100 s, medians of 9 interleaved rounds" in text
    assert "| decode | channels_last | 1.200 | 1.100 | 1.25 | 1.27 | 1.2e-02 |" in text
    assert "the whole call adds 1.5 s of setup and manifest to 12.5 s of encoding" in text
    assert "| kl-f8 | 83.7 | configs/unet/small.yaml | 13.1 | 4 | 5 | 0.800 | 0.100 | 1.25 | 8.75 | **8.0x** |" in text
    assert "with kl-f8 the encoder costs 7.0 U-Net steps, so shards give 8.0x (meets the target)." in text
    assert "| SD's 8 heads everywhere | 8 | [8, 16, 32] | 13.1 | 4 | 2.50 | 2.03x |" in text
    assert text.endswith("| quantity | value |\n|---|---|\n| status | measured |\n| flop_ratio | 1941 |\n")
    assert "{" not in text and "}" not in text  # every placeholder filled


def test_quick_report_shows_what_was_not_measured():
    from diffusion.benchmark.report import markdown

    text = markdown(_results(quick=True))
    assert text.startswith("# Benchmark\n\nWritten by `scripts/benchmark.py --quick` on")
    # Not measured shows as "–", whatever the column's precision.
    kl_f8_row = "| kl-f8 preset (= SD's AutoencoderKL) | AutoencoderKL | 12.3 | 102 / 310 | 0.512 | – | 198 / – | 170 | 46 / – |"
    assert f"\n{kl_f8_row}\n" in text
    assert "\n\nkl-f8 decode: skipped in --quick\n\n" in text
    assert "faster than kl-f8" not in text
    assert "measured only without --quick" in text
    assert text.endswith("latents vs pixels (diffusion.benchmark.unet)\n\nskipped in --quick\n")


def test_from_json_rewrites_the_report_of_a_saved_run_without_measuring(tmp_path, capsys):
    import importlib.util
    import json

    from diffusion.benchmark.report import markdown
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    saved, out = tmp_path / "results.json", tmp_path / "report" / "benchmark.md"
    saved.write_text(json.dumps(_results(quick=True)))
    assert script.main(["--from-json", str(saved), "--out", str(out)]) == 0
    assert out.read_text() == markdown(_results(quick=True))
    assert f"written to {out} from {saved}" in capsys.readouterr().out
