"""The one accelerate pitfall every entry point shares: multi-process launches on machines with no GPU.

`accelerate launch --multi_gpu --num_processes N` on a CPU-only machine starts N processes with WORLD_SIZE=N,
but unless accelerate is told to use the CPU, each process reports num_processes == 1: N independent runs, no
gradient averaging, every process encoding every shard. Passing cpu=True joins them in a gloo group.
"""

from __future__ import annotations

import os

import torch


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_flag() -> bool:
    """The `cpu=` to give Accelerator/PartialState: True for a multi-process launch with no CUDA device."""
    return not torch.cuda.is_available() and world_size() > 1


def check_process_group(num_processes: int, consequence: str) -> None:
    """Refuse to run when the launcher started several processes but accelerate formed no group."""
    if world_size() > 1 and num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world_size()} but accelerate formed no process group: {consequence}. "
            f"Launch with `accelerate launch --multi_gpu --num_processes {world_size()} ...` "
            f"(on a CPU-only machine ACCELERATE_USE_CPU=true also works)."
        )


def process_state(consequence: str):
    """accelerate's PartialState (process index and count) with the CPU flag set and the group checked."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu_flag())
    check_process_group(state.num_processes, consequence)
    return state
