"""How the small preset's inference path and tiling change its speed and its output (docs/performance.md):
each inference-path option alone against the plain baseline, and tiled against untiled reconstruction of a
trained codec."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch

from codec.network.fast import prepare_for_inference
from codec.network.tiling import tiled_decode
from experiments.benchmark.codec import build_codec
from experiments.benchmark.common import BUNDLED_PHOTOS, SIDE, progress
from experiments.benchmark.timing import take_turns

BASELINE = "baseline: eval, torch.no_grad, contiguous"


def inference_options(repeats: int, try_compile: bool) -> dict:
    """The small preset's 512x512 decode (and encode) with each inference-path change alone, in turns run by
    run so that load from other processes hits every variant alike. Speed-up = baseline / variant."""
    base = build_codec("small").eval().requires_grad_(False)
    x = torch.rand(1, 3, SIDE, SIDE) * 2 - 1
    z = torch.randn(1, 4, SIDE // 8, SIDE // 8)
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    run = _runner(x, z, threads)
    variants = {
        BASELINE: lambda part: run(base, part, "no_grad"),
        "torch.inference_mode": lambda part: run(base, part, "inference_mode"),
        "channels_last": lambda part: run(cl, part, "no_grad"),
        "channels_last + inference_mode": lambda part: run(cl, part, "inference_mode"),
        f"1 thread instead of {threads}": lambda part: run(base, part, "no_grad", 1),
        # Worth it only on CPUs with bf16 instructions (AVX-512 BF16, AMX); elsewhere it is emulated and slower.
        "channels_last + bf16 autocast": lambda part: run(cl, part, "no_grad", bf16=True),
    }
    if try_compile:
        compiled = copy.deepcopy(base)
        prepare_for_inference(compiled, channels_last=False, compile=True)
        compile_seconds = {part: _first_call_seconds(run(compiled, part, "inference_mode"))
                           for part in ("decode", "encode")}
        variants["torch.compile (inductor) + inference_mode"] = lambda part: run(compiled, part, "inference_mode")
    result = {"threads": threads, "repeats": repeats, "parts": {}}
    for part in ("decode", "encode"):
        result["parts"][part] = _option_rows({name: make(part) for name, make in variants.items()}, repeats)
        for row in result["parts"][part]:
            progress(f"  {part} {row['variant']}: {row['median_s']:.3f} s, x{row['speedup']:.2f} "
                     f"(best x{row['speedup_best']:.2f})")
    if try_compile:
        result["compile_first_call_s"] = compile_seconds
    return result


def _runner(x: torch.Tensor, z: torch.Tensor, threads: int):
    """run(model, part, mode, n_threads, bf16): a call of model's encode of x or decode of z under one option."""
    def run(model, part: str, mode: str, n_threads: int = threads, bf16: bool = False) -> Callable[[], torch.Tensor]:
        def call():
            torch.set_num_threads(n_threads)
            context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
            with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model.decode(z).sample if part == "decode" else model.encode(x).latent_dist.mean
            torch.set_num_threads(threads)
            return out.float()
        return call
    return run


def _first_call_seconds(call: Callable[[], object]) -> float:
    """Seconds of a compiled model's first call, which is where torch.compile compiles."""
    tick = time.perf_counter()
    call()
    return time.perf_counter() - tick


def _option_rows(calls: dict[str, Callable[[], torch.Tensor]], repeats: int) -> list[dict]:
    """Median and best seconds of each variant, in turns, with its speed-ups and max |difference| to BASELINE."""
    reference = calls[BASELINE]()
    # Calling every variant once for its difference is also its warm-up.
    differences = {name: float((call() - reference).abs().max()) for name, call in calls.items()}
    times = take_turns({name: (lambda _round, call=call: call()) for name, call in calls.items()}, repeats,
                       warmup=False)
    base_times = times[BASELINE]
    return [{"variant": name, "median_s": statistics.median(t), "best_s": min(t),
             "speedup": statistics.median(base_times) / statistics.median(t), "speedup_best": min(base_times) / min(t),
             "max_abs_difference": differences[name]} for name, t in times.items()]


def tiling_quality(codec_dir: str, side: int, tiles: list[int]) -> dict:
    """How much tiled reconstruction of a trained codec differs from untiled, on the held-out bundled photos at
    side x side: relative difference, PSNR against the original, and the seam ratio at the tile borders
    (tiled image's over the untiled image's at the same places; 1 = no seam), with per-tile and whole-image
    GroupNorm statistics."""
    from codec.data import CenterCrops, bundled_photos, load_image_dataset
    from codec.network.model import encode_posterior, load_codec

    vae = prepare_for_inference(load_codec(codec_dir))
    dataset, column = load_image_dataset(bundled_photos(BUNDLED_PHOTOS)[1])
    crops = CenterCrops(dataset, column, side)
    x = torch.stack([crops[i]["pixels"] for i in range(len(crops))])
    rows = []
    with torch.inference_mode():
        q = encode_posterior(vae, x)
        tick = time.perf_counter()
        full = vae.decode(q.mean).sample.clamp(-1, 1)
        untiled_seconds = time.perf_counter() - tick
        for tile, norm in ((t, n) for t in tiles for n in ("tile", "image")):
            rows.append(_tiling_row(vae, x, q, full, side, tile, norm))
            progress(f"  tile {tile}: {rows[-1]}")
    return {"codec": codec_dir, "side": side, "images": len(crops), "untiled_decode_seconds": untiled_seconds,
            "rows": rows}


def _tiling_row(vae, x: torch.Tensor, q, full: torch.Tensor, side: int, tile: int, norm: str) -> dict:
    """Tiled decode (of the untiled latents) and tiled encode + decode at one tile size, against untiled `full`."""
    from codec.measurement.metrics import psnr
    from codec.network.tiling import seam_ratio, tile_borders, tile_spans, tiled_encode

    overlap = max(8, tile // 8 // 8 * 8)
    borders = tile_borders(tile_spans(side // 8, tile // 8, overlap // 8), 8)
    tick = time.perf_counter()
    decoded = tiled_decode(vae, q.mean, tile // 8, overlap // 8, norm=norm).clamp(-1, 1)
    decode_seconds = time.perf_counter() - tick
    encoded = tiled_encode(vae, x, tile, overlap, norm=norm)
    both = tiled_decode(vae, encoded.mean, tile // 8, overlap // 8, norm=norm).clamp(-1, 1)
    scale = (full - full.mean()).abs().mean()
    return {
        "tile": tile, "overlap": overlap, "norm": norm, "tiled_decode_seconds": decode_seconds,
        "decode_relative_difference": float((decoded - full).abs().mean() / scale),
        "decode_mean_abs_difference_uint8": float((decoded - full).abs().mean() * 127.5),
        "encode_relative_difference": float((encoded.mean - q.mean).abs().mean()
                                            / (q.mean - q.mean.mean()).abs().mean()),
        "psnr_untiled": float(psnr(x, full).mean()), "psnr_tiled_decode": float(psnr(x, decoded).mean()),
        "psnr_tiled_both": float(psnr(x, both).mean()),
        "seam_ratio_tiled_over_untiled": seam_ratio(both, borders, borders, 8) / seam_ratio(full, borders, borders, 8),
    }
