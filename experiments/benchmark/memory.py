"""Peak memory of one 2048x2048 decode, tiled vs untiled: why codec.network.tiling exists.

A process's resident high-water mark never goes down, so each case runs in a fresh process: `python -m
experiments.benchmark --memory-case PRESET MODE SIDE` (a hidden flag) runs `memory_case` and prints its row as JSON.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from codec.network.fast import prepare_for_inference
from codec.network.tiling import tiled_decode
from experiments import CHECKOUT
from experiments.benchmark.codec import build_codec, latent_channels
from experiments.benchmark.common import MEMORY_SIDE, progress

# The benchmark's own command line, run from the checkout (where `-m` finds experiments/).
MEMORY_CASE = [sys.executable, "-m", "experiments.benchmark", "--memory-case"]


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
        else:  # "tiled": per-tile GroupNorm statistics; "tiled-image": the whole image's (codec.network.tiling)
            image = tiled_decode(vae, z, tile_latent=64, overlap_latent=8,
                                 norm="image" if mode == "tiled-image" else "tile")
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
    """Peak memory of a 2048x2048 decode, tiled vs untiled, each case a fresh `MEMORY_CASE` process."""
    cases = [("small", "untiled"), ("small", "tiled")]
    if not quick:
        cases.append(("small", "tiled-image"))  # one partial pass over the 25 tiles per GroupNorm: minutes
        cases.append(("kl-f8", "tiled"))  # untiled kl-f8 at 2048² needs tens of GB: the reason tiling exists
    rows = []
    for preset, mode in cases:
        command = [*MEMORY_CASE, preset, mode, str(MEMORY_SIDE)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), cwd=CHECKOUT)
        if done.returncode != 0:
            raise RuntimeError(f"memory case {preset} {mode} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        progress(f"  {preset} {mode}: peak RSS {rows[-1]['peak_rss_mb']:.0f} MB, {rows[-1]['seconds']:.1f} s")
    return rows
