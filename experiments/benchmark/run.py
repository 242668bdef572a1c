"""One whole benchmark run, as `python -m experiments.benchmark` makes it: every section in order at the run's fixed
settings (full or --quick), into the results dict that report.py renders and --json saves.

The U-Net and shard modules are imported inside the functions that use them: every --memory-case child process
imports this module too, and whatever it loads counts in the resident size its memory row starts from.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from experiments import CHECKOUT
from experiments.benchmark.codec import build_codec, codec_rows, decode_head_to_head
from experiments.benchmark.common import BUNDLED_PHOTOS, SIDE, UNET_CONFIG, progress
from experiments.benchmark.environment import environment, matmul_peak
from experiments.benchmark.inference import inference_options
from experiments.benchmark.memory import memory_rows


def measure(quick: bool) -> dict:
    """Every section, in the order the report shows them."""
    repeats = 2 if quick else 5
    started = time.perf_counter()
    results: dict = {"quick": quick, "repeats": repeats, "date": time.strftime("%Y-%m-%d %H:%M"),
                     "environment": environment()}
    progress("matmul peak")
    results["matmul"] = matmul_peak(repeats=7)
    progress("codecs")
    results["codecs"] = codec_rows(quick, repeats)
    progress("decode head to head: small vs TAESD")
    results["head_to_head"] = decode_head_to_head(rounds=5 if quick else 9)
    progress("memory")
    results["memory"] = memory_rows(quick)
    progress("inference options")
    results["inference_options"] = inference_options(repeats=3 if quick else 7, try_compile=not quick)
    progress("shard encoding")
    results["shard_encoding"] = shard_encode_rows(quick)
    progress("diffusion")
    results["diffusion"] = diffusion_rows(quick)
    progress("diffusion training: shards vs on the fly")
    results["training"] = training_rows(quick)
    progress("U-Net training step: attention heads")
    results["heads"] = heads_rows(quick)
    progress("the latent store at scale")
    results["scale"] = scale_rows(quick)
    results["total_seconds"] = time.perf_counter() - started
    return results


def _copies_of(photos: Path, out: Path, copies: int) -> Path:
    """A folder with `copies` copies of every image in `photos`: enough images that the encode command's fixed
    costs (loading the codec and the dataset, writing the manifest) stand beside a realistic loop time."""
    out.mkdir(parents=True)
    for k in range(copies):
        for image in sorted(photos.iterdir()):
            (out / f"{k:02d}_{image.name}").write_bytes(image.read_bytes())
    return out


def shard_encode_rows(quick: bool) -> dict:
    """The shard encoder end to end vs the bare codec, at the command's default resolution (512) and workers (2)."""
    from codec.data import bundled_photos
    from experiments.benchmark.shards import benchmark_encode

    train, _ = bundled_photos(BUNDLED_PHOTOS)
    copies = 2 if quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        codec_dir = Path(tmp) / "codec"
        build_codec("small").save_pretrained(codec_dir, safe_serialization=True)
        data = _copies_of(Path(train), Path(tmp) / "images", copies)
        result = benchmark_encode(codec_dir, data, batch_size=8, resolution=SIDE, num_workers=2)
    return {"status": "measured", "codec": "small (random weights)",
            "data": f"{copies} copies of the 7 bundled train photos (PNG, 0.1-2 MP)", **result}


def diffusion_rows(quick: bool) -> dict:
    """The small U-Net on 4x64x64 latents vs 3x512x512 pixels (skipped in --quick: the pixel pass is slow)."""
    from experiments.benchmark.unet import benchmark_latent_vs_pixel

    if quick:
        return {"status": "skipped in --quick: the pixel-space forward alone takes about 70 s"}
    return {"status": "measured", "unet_config": str(UNET_CONFIG.relative_to(CHECKOUT)),
            **benchmark_latent_vs_pixel(UNET_CONFIG)}


def heads_rows(quick: bool) -> list[dict]:
    """The small U-Net's training step with its per-level heads vs SD's 8 heads everywhere (and under bf16)."""
    from experiments.benchmark.unet import benchmark_attention_heads

    rows = benchmark_attention_heads(UNET_CONFIG,
                                     {"small.yaml (2, 4, 8 heads)": [2, 4, 8], "SD's 8 heads everywhere": 8},
                                     batch_size=2 if quick else 4, steps=2 if quick else 3)
    for r in rows:
        progress(f"  {r['variant']}: {r['seconds_per_image']:.2f} s per image ({r['relative_time']:.2f}x)")
    return rows


def training_rows(quick: bool) -> list[dict]:
    """U-Net training images/s from shards vs encoding each batch on the fly, for the small codec and for
    SD's kl-f8 shape, at 512x512 (4x64x64 latents) with the small U-Net preset."""
    from codec.data import bundled_photos
    from codec.shards.encode import encode_dataset
    from experiments.benchmark.unet import benchmark_training_throughput

    train, _ = bundled_photos(BUNDLED_PHOTOS)
    batch_size, steps = (2, 3) if quick else (4, 5)
    rows = []
    for name in ("small", "kl-f8"):
        with tempfile.TemporaryDirectory() as tmp:
            codec_dir, shards = Path(tmp) / "codec", Path(tmp) / "shards"
            build_codec(name).save_pretrained(codec_dir, safe_serialization=True)
            encode_dataset(codec_dir, train, shards, resolution=SIDE, batch_size=batch_size, limit=batch_size,
                           num_workers=0, progress=False)
            result = benchmark_training_throughput(UNET_CONFIG, shards, codec_dir, batch_size=batch_size, steps=steps,
                                                   images_dir=train)
        rows.append({"codec": name, "unet_config": str(UNET_CONFIG.relative_to(CHECKOUT)), **result})
        progress(f"  {name}: shards {result['shards_images_per_s']:.2f} images/s, on the fly "
                 f"{result['on_the_fly_images_per_s']:.2f} images/s, {result['speedup']:.1f}x")
    return rows


def scale_rows(quick: bool) -> dict:
    """Start-up and memory at 1M and 10M records (100k and 1M in --quick), bucket vs local reads, the small
    preset's wait for data (experiments.benchmark.scale; its synthetic stores are kept in runs/benchmark-scale)."""
    from experiments.benchmark.scale import ScalePlan, measure_scale, quick_plan

    return measure_scale(plan=quick_plan() if quick else ScalePlan())
