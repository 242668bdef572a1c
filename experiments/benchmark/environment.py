"""The machine a benchmark ran on: versions, threads, bf16 instructions, and its fp32 matmul speed, the ceiling
that the codecs' achieved GFLOP/s are compared with."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from experiments.benchmark.timing import median_seconds


def matmul_peak(repeats: int, n: int = 2048) -> dict:
    """fp32 GFLOP/s of an n x n matmul: the ceiling the convolutions can be compared with."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = median_seconds(lambda: a @ b, repeats, warmup=2)
    return {"n": n, "seconds": seconds, "gflops_per_s": 2 * n**3 / seconds / 1e9}


def cpu_bf16_flags() -> list[str] | None:
    """The CPU's bf16 instruction sets from /proc/cpuinfo (None where there is no such file): whether bf16
    autocast rows can be fast on this machine or are emulated."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return sorted({flag for flag in flags.split(":", 1)[1].split() if "bf16" in flag})


def environment() -> dict:
    """Machine, library versions and thread counts: what the report's first paragraph names."""
    import diffusers

    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16_flags": cpu_bf16_flags()}
