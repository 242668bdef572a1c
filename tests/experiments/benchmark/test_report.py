"""experiments/benchmark/report.py and `python -m experiments.benchmark --from-json`: the report of a results dict."""

def _codec_row(name: str, decode_s: float | None) -> dict:
    measured = decode_s is not None
    return {"codec": name, "class": "AutoencoderKL", "parameters_m": 12.34, "encode_gflop": 101.6,
            "decode_gflop": 310.2, "matmul_gflops_per_s": 170.4, "encode_s": 0.5123, "decode_s": decode_s,
            "encode_gflops_per_s": 198.3, "decode_gflops_per_s": 354.1 if measured else None,
            "encode_fraction_of_peak": 0.4567, "decode_fraction_of_peak": 0.6612 if measured else None}


def _results(quick: bool) -> dict:
    """A results dict shaped as experiments.benchmark.run.measure returns it, with made-up numbers."""
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
    from experiments.benchmark.report import markdown

    text = markdown(_results(quick=False))
    for heading in ("# Benchmark", "## Codecs: one 512x512 image", "## Memory: one 2048x2048 decode, tiled vs untiled",
                    "## Inference-path options: the small preset, one 512x512 image", "## Shard encoding",
                    "## Diffusion training", "## U-Net training step: attention heads", "## Diffusion: the same U-Net"):
        assert f"\n{heading}" in text or text.startswith(heading), heading
    assert text.startswith("Written by `python -m experiments.benchmark` on 2026-01-02 03:04", len("# Benchmark\n\n"))
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
    from experiments.benchmark.report import markdown

    text = markdown(_results(quick=True))
    assert text.startswith("# Benchmark\n\nWritten by `python -m experiments.benchmark --quick` on")
    # Not measured shows as "–", whatever the column's precision.
    kl_f8_row = ("| kl-f8 preset (= SD's AutoencoderKL) | AutoencoderKL | 12.3 | 102 / 310 | 0.512 | – | 198 / – | "
                 "170 | 46 / – |")
    assert f"\n{kl_f8_row}\n" in text
    assert "\n\nkl-f8 decode: skipped in --quick\n\n" in text
    assert "faster than kl-f8" not in text
    assert "measured only without --quick" in text
    assert text.endswith("latents vs pixels (experiments.benchmark.unet)\n\nskipped in --quick\n")


def test_from_json_rewrites_the_report_of_a_saved_run_without_measuring(tmp_path, capsys):
    import json

    from experiments.benchmark.__main__ import main
    from experiments.benchmark.report import markdown

    saved, out = tmp_path / "results.json", tmp_path / "report" / "benchmark.md"
    saved.write_text(json.dumps(_results(quick=True)))
    assert main(["--from-json", str(saved), "--out", str(out)]) == 0
    assert out.read_text() == markdown(_results(quick=True))
    assert f"written to {out} from {saved}" in capsys.readouterr().out
