#!/usr/bin/env python
"""Measure, side by side in one run on this machine, what the codec (and later the diffusion model) costs.

    python scripts/benchmark.py                 # everything: about 20-30 minutes on 2 CPU cores
    python scripts/benchmark.py --quick         # fewer repeats, skips the slowest rows: under 10 minutes
    python scripts/benchmark.py --inference-options   # only the inference-path comparison of docs/performance.md
    python scripts/benchmark.py --tiling-quality runs/demo/codec/final   # tiled vs untiled, a trained codec
    python scripts/benchmark.py --architectures     # decode cost of candidate widths for the small preset

Writes a Markdown table (docs/benchmark.md by default) and, with --json, the raw numbers. Every timing is the
median of several runs after one untimed warm-up, batch 1, fp32, under torch.inference_mode, with random
weights (cost does not depend on them). A shared machine makes absolute seconds noisy: compare rows of the
same run, as ratios. FLOPs are counted by torch's FlopCounterMode on the meta device (no compute).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from diffusers import AutoencoderTiny  # noqa: E402

from codec.config import load_codec_config  # noqa: E402
from codec.fast import prepare_for_inference  # noqa: E402
from codec.model import build_autoencoder  # noqa: E402
from codec.tiling import tiled_decode  # noqa: E402
from diffusion.benchmark.unet import forward_flops  # noqa: E402

PRESETS = ("tiny", "small", "kl-f8")
SIDE = 512
MEMORY_SIDE = 2048
# The U-Net rows (latent vs pixel, shards vs on the fly, attention heads) all time the CPU default preset.
UNET_CONFIG = ROOT / "configs" / "unet" / "small.yaml"


def progress(message: str) -> None:
    """Progress goes to stderr: stdout carries only results (JSON for --memory-case and --inference-options)."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Timing and FLOPs
# ---------------------------------------------------------------------------------------------------------------


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `repeats` calls after `warmup` untimed ones (first calls allocate and pick kernels)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return statistics.median(times)


def matmul_peak(repeats: int, n: int = 2048) -> dict:
    """fp32 GFLOP/s of an n x n matmul: the ceiling the convolutions below can be compared with."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = median_seconds(lambda: a @ b, repeats, warmup=2)
    return {"n": n, "seconds": seconds, "gflops_per_s": 2 * n**3 / seconds / 1e9}


def build_codec(name: str, device: str = "cpu") -> torch.nn.Module:
    """A preset of ours (random weights, seed 0), or 'taesd': diffusers' AutoencoderTiny with default arguments."""
    torch.manual_seed(0)
    with torch.device(device):
        if name == "taesd":
            return AutoencoderTiny()
        return build_autoencoder(load_codec_config(ROOT / "configs" / "codec" / f"{name}.yaml").model)


def encode_fn(vae: torch.nn.Module):
    if isinstance(vae, AutoencoderTiny):
        return lambda x: vae.encode(x).latents
    return lambda x: vae.encode(x).latent_dist.mean


def decode_fn(vae: torch.nn.Module):
    return lambda z: vae.decode(z).sample


def latent_channels(vae: torch.nn.Module) -> int:
    return vae.config.latent_channels


def codec_flops(name: str, side: int = SIDE) -> tuple[float, float]:
    """GFLOP of one encode and one decode of a side x side image, counted on the meta device (no compute)."""
    return meta_codec_flops(build_codec(name, device="meta"), side)


def meta_codec_flops(vae: torch.nn.Module, side: int = SIDE) -> tuple[float, float]:
    """codec_flops of a codec built on the meta device."""
    factor = 8
    x = torch.empty(1, 3, side, side, device="meta")
    z = torch.empty(1, latent_channels(vae), side // factor, side // factor, device="meta")
    return forward_flops(encode_fn(vae), x) / 1e9, forward_flops(decode_fn(vae), z) / 1e9


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------


def codec_rows(quick: bool, repeats: int) -> list[dict]:
    """Encode and decode seconds per 512x512 image for each codec, with FLOPs and achieved GFLOP/s, next to the
    matmul peak measured right before that codec (other processes' load changes within minutes)."""
    rows = []
    for name in (*PRESETS, "taesd"):
        vae = prepare_for_inference(build_codec(name))
        enc_gflop, dec_gflop = codec_flops(name)
        x = torch.rand(1, 3, SIDE, SIDE) * 2 - 1
        z = torch.randn(1, latent_channels(vae), SIDE // 8, SIDE // 8)
        encode, decode = encode_fn(vae), decode_fn(vae)
        slow = name == "kl-f8"
        row = {
            "codec": name,
            "class": type(vae).__name__,
            "parameters_m": sum(p.numel() for p in vae.parameters()) / 1e6,
            "encode_gflop": enc_gflop,
            "decode_gflop": dec_gflop,
        }
        peak = row["matmul_gflops_per_s"] = matmul_peak(repeats=5)["gflops_per_s"]
        with torch.inference_mode():
            row["encode_s"] = median_seconds(lambda: encode(x), 1 if slow else repeats)
            if slow and quick:
                row["decode_s"] = None
                row["decode_note"] = "skipped in --quick (~14 s per decode on 2 cores)"
            else:
                row["decode_s"] = median_seconds(lambda: decode(z), 1 if slow else repeats)
        for part in ("encode", "decode"):
            seconds = row[f"{part}_s"]
            row[f"{part}_gflops_per_s"] = row[f"{part}_gflop"] / seconds if seconds else None
            row[f"{part}_fraction_of_peak"] = row[f"{part}_gflops_per_s"] / peak if seconds else None
        rows.append(row)
        progress(f"  {name}: encode {row['encode_s']:.3f} s, decode {row['decode_s'] or float('nan'):.3f} s")
        del vae
    return rows


def _interleaved_decodes(models: dict[str, torch.nn.Module], rounds: int) -> dict[str, list[float]]:
    """Seconds of one 512x512 decode per model, the models taking turns round by round so that every one sees
    the same machine load (one untimed warm-up each)."""
    latents = {name: torch.randn(1, latent_channels(m), SIDE // 8, SIDE // 8) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for name, m in models.items():
            decode_fn(m)(latents[name])
        for _ in range(rounds):
            for name, m in models.items():
                tick = time.perf_counter()
                decode_fn(m)(latents[name])
                times[name].append(time.perf_counter() - tick)
    return times


def decode_head_to_head(rounds: int) -> dict:
    """The small preset's decode against TAESD's, interleaved (the separate codec rows above are minutes apart).
    speedup = TAESD's median / small's median."""
    times = _interleaved_decodes({name: prepare_for_inference(build_codec(name)) for name in ("small", "taesd")}, rounds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"rounds": rounds, "median_s": medians, "best_s": {n: min(t) for n, t in times.items()},
            "speedup": medians["taesd"] / medians["small"]}


# Widths tried for the small preset (docs/performance.md): the rest of its configuration as in small.yaml.
CANDIDATE_WIDTHS = ([32, 64, 128, 128], [32, 64, 64, 128], [32, 48, 96, 128], [32, 32, 64, 128])


def architecture_candidates(rounds: int) -> list[dict]:
    """Decode cost of the small preset at each of CANDIDATE_WIDTHS (and without the mid-block attention),
    interleaved with TAESD: parameters, GFLOP, median seconds, speed relative to TAESD, achieved GFLOP/s."""
    base = load_codec_config(ROOT / "configs" / "codec" / "small.yaml").model
    configs = {"-".join(map(str, w)): dataclasses.replace(base, block_out_channels=list(w)) for w in CANDIDATE_WIDTHS}
    configs["32-64-128-128 without mid-block attention"] = dataclasses.replace(
        base, block_out_channels=[32, 64, 128, 128], mid_block_add_attention=False)
    models, gflop = {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        models[name] = prepare_for_inference(build_autoencoder(cfg))
        with torch.device("meta"):
            gflop[name] = meta_codec_flops(build_autoencoder(cfg))[1]
    models["taesd"] = prepare_for_inference(build_codec("taesd"))
    gflop["taesd"] = codec_flops("taesd")[1]
    times = _interleaved_decodes(models, rounds)
    taesd = statistics.median(times["taesd"])
    return [{"network": name, "parameters_m": sum(p.numel() for p in m.parameters()) / 1e6,
             "decode_gflop": gflop[name], "decode_s": statistics.median(times[name]), "best_s": min(times[name]),
             "speed_vs_taesd": taesd / statistics.median(times[name]),
             "decode_gflops_per_s": gflop[name] / statistics.median(times[name])} for name, m in models.items()]


def _proc_status_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (current) of this process's address space, from /proc/self/status (Linux)."""
    status = Path("/proc/self/status")
    if not status.is_file():
        raise RuntimeError("the memory rows read /proc/self/status, which this system does not have (Linux only)")
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def memory_case(preset: str, mode: str, side: int) -> dict:
    """Runs inside its own process: the resident-memory high-water mark of one side x side decode (tracemalloc
    cannot see torch's allocations, and a peak never goes down, hence one process per case).

    The peak is VmHWM, not getrusage's ru_maxrss: Linux carries the parent's high-water mark into ru_maxrss
    across fork/exec, so a child started by a large benchmark process would report the parent's peak
    (measured: 2188 MB before decoding anything). Both are recorded."""
    vae = prepare_for_inference(build_codec(preset))
    torch.manual_seed(0)
    z = torch.randn(1, latent_channels(vae), side // 8, side // 8)
    before = _proc_status_mb("VmRSS")
    tick = time.perf_counter()
    with torch.inference_mode():
        if mode == "untiled":
            image = vae.decode(z).sample
        else:  # "tiled": per-tile GroupNorm statistics; "tiled-image": the whole image's (codec.tiling)
            image = tiled_decode(vae, z, tile_latent=64, overlap_latent=8, norm="image" if mode == "tiled-image" else "tile")
    seconds = time.perf_counter() - tick
    peak = _proc_status_mb("VmHWM")
    return {
        "codec": preset, "mode": mode, "side": side, "seconds": seconds,
        "peak_rss_mb": peak, "rss_before_decode_mb": before, "decode_increase_mb": peak - before,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "output_mb": image.numel() * image.element_size() / 2**20,
        "tile": "whole image" if mode == "untiled" else "512 px (64 latent), overlap 64 px (8 latent)"
                + (", whole-image GroupNorm statistics" if mode == "tiled-image" else ""),
    }


def memory_rows(quick: bool) -> list[dict]:
    """Peak memory of a 2048x2048 decode, tiled vs untiled, each in a fresh subprocess."""
    cases = [("small", "untiled"), ("small", "tiled")]
    if not quick:
        cases.append(("small", "tiled-image"))  # one partial pass over the 25 tiles per GroupNorm: minutes
        cases.append(("kl-f8", "tiled"))  # untiled kl-f8 at 2048² needs tens of GB: the reason tiling exists
    rows = []
    for preset, mode in cases:
        command = [sys.executable, __file__, "--memory-case", preset, mode, str(MEMORY_SIDE)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        if done.returncode != 0:
            raise RuntimeError(f"memory case {preset} {mode} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        progress(f"  {preset} {mode}: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB, {rows[-1]['seconds']:.1f} s")
    return rows


def inference_options(repeats: int, try_compile: bool) -> dict:
    """The small preset's 512x512 decode (and encode) with each inference-path change alone, interleaved
    run by run so that load from other processes hits every variant alike. Speed-up = baseline / variant."""
    base = build_codec("small").eval().requires_grad_(False)
    x = torch.rand(1, 3, SIDE, SIDE) * 2 - 1
    z = torch.randn(1, 4, SIDE // 8, SIDE // 8)
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    threads = torch.get_num_threads()

    def run(model, part: str, mode: str, n_threads: int = threads, bf16: bool = False):
        def call():
            torch.set_num_threads(n_threads)
            context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
            with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model.decode(z).sample if part == "decode" else model.encode(x).latent_dist.mean
            torch.set_num_threads(threads)
            return out.float()
        return call

    variants = {
        "baseline: eval, torch.no_grad, contiguous": lambda part: run(base, part, "no_grad"),
        "torch.inference_mode": lambda part: run(base, part, "inference_mode"),
        "channels_last": lambda part: run(cl, part, "no_grad"),
        "channels_last + inference_mode": lambda part: run(cl, part, "inference_mode"),
        f"1 thread instead of {threads}": lambda part: run(base, part, "no_grad", 1),
        # Worth it only on CPUs with bf16 instructions (AVX-512 BF16, AMX); elsewhere it is emulated and slower.
        "channels_last + bf16 autocast": lambda part: run(cl, part, "no_grad", bf16=True),
    }
    compile_seconds = None
    if try_compile:
        compiled = copy.deepcopy(base)
        prepare_for_inference(compiled, channels_last=False, compile=True)
        tick = time.perf_counter()
        run(compiled, "decode", "inference_mode")()
        compile_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        run(compiled, "encode", "inference_mode")()
        compile_seconds_encode = time.perf_counter() - tick
        variants["torch.compile (inductor) + inference_mode"] = lambda part: run(compiled, part, "inference_mode")
    result = {"threads": threads, "repeats": repeats, "parts": {}}
    for part in ("decode", "encode"):
        calls = {name: make(part) for name, make in variants.items()}
        reference = calls["baseline: eval, torch.no_grad, contiguous"]()
        differences = {name: float((call() - reference).abs().max()) for name, call in calls.items()}  # also warms up
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(repeats):
            for name, call in calls.items():
                tick = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - tick)
        base_times = times["baseline: eval, torch.no_grad, contiguous"]
        result["parts"][part] = [
            {"variant": name, "median_s": statistics.median(t), "best_s": min(t),
             "speedup": statistics.median(base_times) / statistics.median(t), "speedup_best": min(base_times) / min(t),
             "max_abs_difference": differences[name]}
            for name, t in times.items()
        ]
        for row in result["parts"][part]:
            progress(f"  {part} {row['variant']}: {row['median_s']:.3f} s, x{row['speedup']:.2f} (best x{row['speedup_best']:.2f})")
    if try_compile:
        result["compile_first_call_s"] = {"decode": compile_seconds, "encode": compile_seconds_encode}
    return result


def tiling_quality(codec_dir: str, side: int, tiles: list[int]) -> dict:
    """How much tiled reconstruction of a trained codec differs from untiled, on the held-out bundled photos at
    side x side: relative difference, PSNR against the original, and the seam ratio at the tile borders
    (tiled image's over the untiled image's at the same places; 1 = no seam), with per-tile and whole-image
    GroupNorm statistics."""
    from codec.data import CenterCrops, bundled_photos, load_image_dataset
    from codec.model import load_codec
    from codec.metrics import psnr
    from codec.model import encode_posterior
    from codec.tiling import seam_ratio, tile_borders, tile_spans, tiled_encode

    vae = prepare_for_inference(load_codec(codec_dir))
    dataset, column = load_image_dataset(bundled_photos(ROOT / "data" / "bundled_photos")[1])
    crops = CenterCrops(dataset, column, side)
    x = torch.stack([crops[i]["pixels"] for i in range(len(crops))])
    rows = []
    with torch.inference_mode():
        q = encode_posterior(vae, x)
        tick = time.perf_counter()
        full = vae.decode(q.mean).sample.clamp(-1, 1)
        untiled_seconds = time.perf_counter() - tick
        scale = (full - full.mean()).abs().mean()
        for tile, norm in ((t, n) for t in tiles for n in ("tile", "image")):
            overlap = max(8, tile // 8 // 8 * 8)
            borders = tile_borders(tile_spans(side // 8, tile // 8, overlap // 8), 8)
            tick = time.perf_counter()
            decoded = tiled_decode(vae, q.mean, tile // 8, overlap // 8, norm=norm).clamp(-1, 1)
            decode_seconds = time.perf_counter() - tick
            encoded = tiled_encode(vae, x, tile, overlap, norm=norm)
            both = tiled_decode(vae, encoded.mean, tile // 8, overlap // 8, norm=norm).clamp(-1, 1)
            rows.append({
                "tile": tile, "overlap": overlap, "norm": norm, "tiled_decode_seconds": decode_seconds,
                "decode_relative_difference": float((decoded - full).abs().mean() / scale),
                "decode_mean_abs_difference_uint8": float((decoded - full).abs().mean() * 127.5),
                "encode_relative_difference": float((encoded.mean - q.mean).abs().mean() / (q.mean - q.mean.mean()).abs().mean()),
                "psnr_untiled": float(psnr(x, full).mean()), "psnr_tiled_decode": float(psnr(x, decoded).mean()),
                "psnr_tiled_both": float(psnr(x, both).mean()),
                "seam_ratio_tiled_over_untiled": seam_ratio(both, borders, borders, 8) / seam_ratio(full, borders, borders, 8),
            })
            progress(f"  tile {tile}: {rows[-1]}")
    return {"codec": codec_dir, "side": side, "images": len(crops), "untiled_decode_seconds": untiled_seconds,
            "rows": rows}


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
    from diffusion.benchmark.shards import benchmark_encode

    train, _ = bundled_photos(ROOT / "data" / "bundled_photos")
    copies = 2 if quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        codec_dir = Path(tmp) / "codec"
        build_codec("small").save_pretrained(codec_dir, safe_serialization=True)
        data = _copies_of(Path(train), Path(tmp) / "images", copies)
        result = benchmark_encode(codec_dir, data, batch_size=8, resolution=SIDE, num_workers=2)
    return {"status": "measured", "codec": "small (random weights)",
            "data": f"{copies} copies of the 7 bundled train photos (PNG, 0.1-2 MP)", **result}


def diffusion_rows(quick: bool) -> dict:
    from diffusion.benchmark.unet import benchmark_latent_vs_pixel

    if quick:
        return {"status": "skipped in --quick: the pixel-space forward alone takes about 70 s"}
    return {"status": "measured", "unet_config": str(UNET_CONFIG.relative_to(ROOT)), **benchmark_latent_vs_pixel(UNET_CONFIG)}


def heads_rows(quick: bool) -> list[dict]:
    """The small U-Net's training step with its per-level heads vs SD's 8 heads everywhere (and under bf16)."""
    from diffusion.benchmark.unet import benchmark_attention_heads

    rows = benchmark_attention_heads(UNET_CONFIG, {"small.yaml (2, 4, 8 heads)": [2, 4, 8], "SD's 8 heads everywhere": 8},
                                     batch_size=2 if quick else 4, steps=2 if quick else 3)
    for r in rows:
        progress(f"  {r['variant']}: {r['seconds_per_image']:.2f} s per image ({r['relative_time']:.2f}x)")
    return rows


def training_rows(quick: bool) -> list[dict]:
    """U-Net training images/s from shards vs encoding each batch on the fly, for the small codec and for
    SD's kl-f8 shape, at 512x512 (4x64x64 latents) with the small U-Net preset."""
    from codec.data import bundled_photos
    from diffusion.shards.encode import encode_dataset
    from diffusion.benchmark.unet import benchmark_training_throughput

    train, _ = bundled_photos(ROOT / "data" / "bundled_photos")
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
        rows.append({"codec": name, "unet_config": str(UNET_CONFIG.relative_to(ROOT)), **result})
        progress(f"  {name}: shards {result['shards_images_per_s']:.2f} images/s, on the fly "
                 f"{result['on_the_fly_images_per_s']:.2f} images/s, {result['speedup']:.1f}x")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _f(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _key_value_table(result: dict) -> list[str]:
    lines = ["| quantity | value |", "|---|---|"]
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    return lines


def markdown(results: dict) -> str:
    env = results["environment"]
    peak = results["matmul"]["gflops_per_s"]
    lines = [
        "# Benchmark",
        "",
        f"Written by `scripts/benchmark.py{' --quick' if results['quick'] else ''}` on {results['date']}: "
        f"{env['machine']}, torch {env['torch']}, diffusers {env['diffusers']}, "
        f"torch.get_num_threads() = {env['threads']}, CPU capability {env.get('cpu_capability')}, bf16 "
        f"instructions: {', '.join(env.get('cpu_bf16_flags') or []) or 'none'}. Batch 1, fp32, torch.inference_mode, random weights, "
        f"codecs prepared with codec.fast.prepare_for_inference; medians of {results['repeats']} runs after a "
        f"warm-up (kl-f8: 1 run). The machine is shared: compare rows of one run, not runs.",
        "",
        f"fp32 matmul {results['matmul']['n']}x{results['matmul']['n']}: **{peak:.0f} GFLOP/s** (median of 7) at "
        f"the start; each codec row is compared with the same matmul measured just before it (median of 5).",
        "",
        f"## Codecs: one {SIDE}x{SIDE} image",
        "",
        "| codec | class | params (M) | GFLOP enc / dec | encode s | decode s | GFLOP/s enc / dec | matmul GFLOP/s | % of matmul enc / dec |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = {"tiny": "tiny preset", "small": "small preset", "kl-f8": "kl-f8 preset (= SD's AutoencoderKL)",
              "taesd": "TAESD shape (AutoencoderTiny())"}
    for r in results["codecs"]:
        pct = lambda v: "–" if v is None else f"{100 * v:.0f}"  # noqa: E731
        lines.append(
            f"| {labels[r['codec']]} | {r['class']} | {r['parameters_m']:.1f} | {r['encode_gflop']:.0f} / "
            f"{r['decode_gflop']:.0f} | {_f(r['encode_s'], 3)} | {_f(r['decode_s'], 3)} | "
            f"{_f(r['encode_gflops_per_s'], 0)} / {_f(r['decode_gflops_per_s'], 0)} | {r['matmul_gflops_per_s']:.0f} | "
            f"{pct(r['encode_fraction_of_peak'])} / {pct(r['decode_fraction_of_peak'])} |"
        )
    notes = [f"{r['codec']} decode: {r['decode_note']}" for r in results["codecs"] if r.get("decode_note")]
    if notes:
        lines += ["", *notes]
    by_name = {r["codec"]: r for r in results["codecs"]}
    small, h2h = by_name["small"], results["head_to_head"]
    lines += ["", "**The default codec's decode targets** (issue 6):", ""]
    if by_name["kl-f8"]["decode_s"]:
        lines.append(f"- {by_name['kl-f8']['decode_s'] / small['decode_s']:.1f}x faster than kl-f8 (target >= 12x; "
                     f"rows above)")
    lines += [
        f"- {h2h['speedup']:.2f}x TAESD's speed (target >= 1.0): {h2h['median_s']['small']:.3f} s vs "
        f"{h2h['median_s']['taesd']:.3f} s, medians of {h2h['rounds']} interleaved rounds (best runs "
        f"{h2h['best_s']['small']:.3f} s vs {h2h['best_s']['taesd']:.3f} s)",
        f"- {100 * small['decode_fraction_of_peak']:.0f}% of the matmul peak (target >= 50%)",
    ]
    lines += [
        "",
        f"## Memory: one {MEMORY_SIDE}x{MEMORY_SIDE} decode, tiled vs untiled",
        "",
        "Each case in its own process; peak RSS is the process's resident high-water mark (VmHWM; torch, "
        "Python and the model included, about 1 GB before any work), the increase is over the resident size "
        "just before decoding. (getrusage's ru_maxrss is not used: Linux carries the parent process's peak "
        "into it across fork/exec.)",
        "",
        "| codec | mode | tile | peak RSS (MB) | increase by the decode (MB) | output (MB) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["memory"]:
        lines.append(
            f"| {r['codec']} | {r['mode']} | {r['tile']} | {r['peak_rss_mb']:.0f} | {r['decode_increase_mb']:.0f} | "
            f"{r['output_mb']:.0f} | {r['seconds']:.1f} |"
        )
    if results["quick"]:
        lines += ["", "small tiled with whole-image GroupNorm statistics and kl-f8 tiled are measured only without "
                  "--quick (25 tiles: minutes each)."]
    if results.get("inference_options"):
        opts = results["inference_options"]
        lines += ["", "## Inference-path options: the small preset, one 512x512 image", "",
                  f"Interleaved run by run, {opts['repeats']} rounds; speed-up = baseline / variant, of the medians "
                  "and of the best runs (the best run is the one other processes disturbed least); max |difference| "
                  "to the baseline's output.", "",
                  "| part | variant | median s | best s | speed-up (median) | speed-up (best) | max abs difference |",
                  "|---|---|---|---|---|---|---|"]
        for part, rows in opts["parts"].items():
            for r in rows:
                lines.append(f"| {part} | {r['variant']} | {r['median_s']:.3f} | {r['best_s']:.3f} | {r['speedup']:.2f} | "
                             f"{r['speedup_best']:.2f} | {r['max_abs_difference']:.1e} |")
        if "compile_first_call_s" in opts:
            c = opts["compile_first_call_s"]
            lines += ["", f"torch.compile first call (compilation included): decode {c['decode']:.0f} s, "
                      f"encode {c['encode']:.0f} s."]
    shard = results["shard_encoding"]
    lines += ["", "## Shard encoding (diffusion.benchmark.shards.benchmark_encode)", "",
              f"scripts/encode_dataset.py's work (decode, resize, crop in {shard['num_workers']} DataLoader workers; "
              f"encode; write shards and manifest) against the bare codec's encode of the same images, already in "
              f"memory, at the same batch size ({shard['batch_size']}) and resolution ({shard['resolution']}). "
              f"End to end: **{shard['ratio']:.2f}** of the bare codec's images/s for the whole call, "
              f"**{shard['ratio_encode_loop']:.2f}** for the encode loop alone (target >= 0.90); the whole call adds "
              f"{shard['setup_seconds'] + shard['finalize_seconds']:.1f} s of setup and manifest to "
              f"{shard['encode_loop_seconds']:.1f} s of encoding, a fixed cost a real dataset amortises.", ""]
    lines += _key_value_table(shard)
    lines += ["", "## Diffusion training: latents from shards vs encoding on the fly (diffusion.benchmark.unet)", "",
              "The same U-Net training step (forward, backward, AdamW; 512x512 images = 4x64x64 latents, 77 "
              "precomputed MiniLM caption tokens), fed from shards or by encoding each batch with the codec first. "
              "The on-the-fly side gets its images already decoded, so the speed-up counts the encoder alone (a "
              "lower bound: a real on-the-fly loader also decodes and resizes every image every epoch).", "",
              "| codec | codec params (M) | U-Net | U-Net params (M) | batch | steps | from shards (images/s) | "
              "on the fly (images/s) | U-Net step s / image | encoder s / image | speed-up (target >= 5x) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["training"]:
        step_s = 1 / r["shards_images_per_s"]
        lines.append(f"| {r['codec']} | {r['codec_parameters'] / 1e6:.1f} | {r['unet_config']} | "
                     f"{r['unet_parameters'] / 1e6:.1f} | {r['batch_size']} | {r['steps']} | "
                     f"{r['shards_images_per_s']:.3f} | {r['on_the_fly_images_per_s']:.3f} | {step_s:.2f} | "
                     f"{1 / r['on_the_fly_images_per_s'] - step_s:.2f} | **{r['speedup']:.1f}x** |")
    verdicts = [f"with {r['codec']} the encoder costs {r['speedup'] - 1:.1f} U-Net steps, so shards give "
                f"{r['speedup']:.1f}x ({'meets' if r['meets_target'] else 'under'} the target)"
                for r in results["training"]]
    lines += ["", "The speed-up is 1 + (encoder s / U-Net step s): shards remove the encoder from every step and "
              "nothing else, so 5x needs an encoder costing 4 U-Net steps. Here " + "; ".join(verdicts) + ". A cheap "
              "encoder leaves little to remove; shards still keep it out of training memory and save decoding and "
              "resizing every image at every epoch."]
    lines += ["", "## U-Net training step: attention heads (diffusion.benchmark.unet.benchmark_attention_heads)", "",
              "The small U-Net's training step at 4x64x64 (4096 positions at the outer level) with the same widths "
              "and parameters, attention split into different head counts; steps taken in turns, medians. "
              "`attention_head_dim` is diffusers' name for the number of heads.", "",
              "| variant | attention_head_dim | channels per head | params (M) | batch | s / image | time vs first |",
              "|---|---|---|---|---|---|---|"]
    for r in results["heads"]:
        lines.append(f"| {r['variant']} | {r['attention_head_dim']} | {r['head_channels']} | "
                     f"{r['parameters'] / 1e6:.1f} | {r['batch_size']} | {r['seconds_per_image']:.2f} | "
                     f"{r['relative_time']:.2f}x |")
    lines += ["", "## Diffusion: the same U-Net on latents vs pixels (diffusion.benchmark.unet)", ""]
    diffusion = results["diffusion"]
    lines += _key_value_table(diffusion) if diffusion.get("status") == "measured" else [diffusion["status"]]
    return "\n".join(lines) + "\n"


def cpu_bf16_flags() -> list[str] | None:
    """The CPU's bf16 instruction sets from /proc/cpuinfo (None where there is no such file): whether bf16
    autocast rows can be fast on this machine or are emulated."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return sorted({flag for flag in flags.split(":", 1)[1].split() if "bf16" in flag})


def environment() -> dict:
    import diffusers

    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16_flags": cpu_bf16_flags()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 repeats, no kl-f8 decode, no kl-f8 memory row, no "
                   "torch.compile, no latent-vs-pixel U-Net row, smaller training batches: under 10 minutes on 2 cores")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark.md", help="Markdown table (default docs/benchmark.md)")
    p.add_argument("--inference-options", action="store_true",
                   help="only compare inference-path options for the small preset (docs/performance.md); prints JSON")
    p.add_argument("--architectures", action="store_true",
                   help="only compare the decode cost of candidate widths for the small preset with TAESD "
                        "(docs/performance.md); prints JSON")
    p.add_argument("--tiling-quality", metavar="CODEC_DIR",
                   help="only measure tiled vs untiled reconstruction of a trained codec (docs/performance.md); prints JSON")
    p.add_argument("--side", type=int, default=512, help="image side for --tiling-quality (default 512)")
    p.add_argument("--tiles", type=int, nargs="+", default=[128, 256], help="tile sizes in pixels for --tiling-quality")
    p.add_argument("--memory-case", nargs=3, metavar=("PRESET", "MODE", "SIDE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_case:
        preset, mode, side = args.memory_case
        print(json.dumps(memory_case(preset, mode, int(side))))
        return 0
    repeats = 2 if args.quick else 5
    if args.tiling_quality:
        print(json.dumps(tiling_quality(args.tiling_quality, args.side, args.tiles), indent=2))
        return 0
    if args.architectures:
        print(json.dumps(architecture_candidates(rounds=7), indent=2))
        return 0
    if args.inference_options:
        print(json.dumps(inference_options(repeats=7, try_compile=True), indent=2))
        return 0
    started = time.perf_counter()
    results: dict = {"quick": args.quick, "repeats": repeats, "date": time.strftime("%Y-%m-%d %H:%M"),
                     "environment": environment()}
    progress("matmul peak")
    results["matmul"] = matmul_peak(repeats=7)
    progress("codecs")
    results["codecs"] = codec_rows(args.quick, repeats)
    progress("decode head to head: small vs TAESD")
    results["head_to_head"] = decode_head_to_head(rounds=5 if args.quick else 9)
    progress("memory")
    results["memory"] = memory_rows(args.quick)
    progress("inference options")
    results["inference_options"] = inference_options(repeats=3 if args.quick else 7, try_compile=not args.quick)
    progress("shard encoding")
    results["shard_encoding"] = shard_encode_rows(args.quick)
    progress("diffusion")
    results["diffusion"] = diffusion_rows(args.quick)
    progress("diffusion training: shards vs on the fly")
    results["training"] = training_rows(args.quick)
    progress("U-Net training step: attention heads")
    results["heads"] = heads_rows(args.quick)
    results["total_seconds"] = time.perf_counter() - started
    text = markdown(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    print(text)
    print(f"written to {args.out} in {results['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
