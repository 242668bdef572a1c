"""How fast images become shards: the whole encode job against the bare encoder on the same images."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from codec.data import InputSource
from codec.network.fast import prepare_for_inference
from codec.network.model import encode_posterior, load_codec
from codec.shards.encode import Framing, encode_dataset


def benchmark_encode(codec_dir: str | os.PathLike, data: str | os.PathLike, batch_size: int, resolution: int,
                     num_workers: int = 2, limit: int | None = None) -> dict:
    """End-to-end encode throughput (decode, resize, crop, encode, write shards and manifest) against the bare
    codec's `encode` on the same images at the same batch size, already decoded and cropped in memory.

    Two ratios to the bare codec's images/s: `ratio` for the whole call (setup and manifest included: a fixed
    cost of about a second that a real dataset amortises) and `ratio_encode_loop` for the loop from the first
    batch requested to the last shard written, which shows whether data loading keeps up with the encoder. The
    target is >= 0.9. Runs in this process only.
    """
    vae = prepare_for_inference(load_codec(codec_dir))  # as encode_dataset prepares it
    source = InputSource(os.fspath(data), limit=limit)
    framing = Framing(resolution, "center", 0, "none")
    count = sum(unit.size for unit in source.units)
    tick = time.perf_counter()
    prepared = (framing.prepare(record) for unit in source.units for record in source.records(unit))
    pixels = [item["pixels"] for item in prepared if "pixels" in item]
    data_seconds = time.perf_counter() - tick
    if not pixels:
        raise ValueError(f"benchmark_encode: none of the first {count} images of {data} is readable")
    batches = [torch.stack(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]

    def bare_codec_seconds() -> float:
        with torch.inference_mode():
            tick = time.perf_counter()
            for batch in batches:
                encode_posterior(vae, batch)
            return time.perf_counter() - tick

    with torch.inference_mode():
        encode_posterior(vae, batches[0])  # warm-up: first-call allocations are not the codec's speed
    before = bare_codec_seconds()
    timings: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        manifest = encode_dataset(codec_dir, data, Path(tmp) / "shards", resolution=resolution, batch_size=batch_size,
                                  num_workers=num_workers, limit=count, progress=False, timings=timings)
        seconds = time.perf_counter() - tick
    # Timed before and after the end-to-end run, so a change in machine load during the benchmark biases neither.
    bare_seconds = (before + bare_codec_seconds()) / 2
    codec_rate = len(pixels) / bare_seconds
    rate = manifest["count"] / seconds
    loop_rate = manifest["count"] / timings["encode_loop_seconds"]
    return {
        "images": manifest["count"], "batch_size": batch_size, "resolution": resolution, "num_workers": num_workers,
        "threads": torch.get_num_threads(), "data_ms_per_image": 1000 * data_seconds / count,
        "codec_ms_per_image": 1000 * bare_seconds / len(pixels),
        "end_to_end_seconds": seconds, "setup_seconds": timings["setup_seconds"],
        "encode_loop_seconds": timings["encode_loop_seconds"], "finalize_seconds": timings["finalize_seconds"],
        "waiting_for_data_seconds": timings["waiting_for_data_seconds"],
        "codec_seconds": bare_seconds, "end_to_end_images_per_s": rate, "encode_loop_images_per_s": loop_rate,
        "codec_images_per_s": codec_rate, "ratio": rate / codec_rate, "ratio_encode_loop": loop_rate / codec_rate,
    }
