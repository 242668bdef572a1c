"""accelerate set-up for every entry point, and the one pitfall they share: multi-process launches on
machines with no GPU.

`accelerate launch --multi_gpu --num_processes N` on a CPU-only machine starts N processes with WORLD_SIZE=N,
but unless accelerate is told to use the CPU, each process reports num_processes == 1: N independent runs, no
gradient averaging, every process encoding every shard. Passing cpu=True joins them in a gloo group.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

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


# How long a collective (a barrier, an all-reduce) waits for the slowest rank before the run fails. torch's NCCL
# default is 10 minutes, shorter than some legitimate waits (one rank writing a checkpoint or the export, the
# last shards of an uneven encode); 30 minutes covers those, and still ends a truly hung run the same hour.
DEFAULT_TIMEOUT_MINUTES = 30.0


def group_timeout(minutes: float) -> timedelta:
    if not minutes > 0:
        raise ValueError(f"the process-group timeout must be > 0 minutes, got {minutes}")
    return timedelta(minutes=minutes)


def process_state(consequence: str, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES):
    """accelerate's PartialState (process index and count) with the CPU flag set, the collectives' timeout
    given to the process group, and the group checked."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu_flag(), timeout=group_timeout(timeout_minutes))
    check_process_group(state.num_processes, consequence)
    return state


def make_accelerator(mixed_precision: str, grad_accum: int, output_dir: Path,
                     timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES):
    """The trainers' Accelerator: precision resolved (`auto`), TF32 on CUDA, tensorboard under output_dir, the
    collectives' timeout (`train.process_group_timeout_minutes`) given to the process group, and the group
    checked (a multi-process launch that formed none would train N independent models)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    has_cuda = torch.cuda.is_available()
    precision = mixed_precision
    if precision == "auto":
        # fp32 on CPU: bf16 is fast only on CPUs with bf16 instructions, and costs 0.2-0.3 dB (docs/performance.md).
        precision = "bf16" if has_cuda and torch.cuda.is_bf16_supported() else "no"
    if has_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        cpu=cpu_flag(),
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        log_with="tensorboard",
        project_dir=str(output_dir),
        # accelerate passes on only values that differ from its default (10 min): exactly 10 then leaves torch's
        # own default, which is also 10 min for NCCL (30 for gloo, the CPU stand-in).
        kwargs_handlers=[InitProcessGroupKwargs(timeout=group_timeout(timeout_minutes))],
    )
    check_process_group(accelerator.num_processes, "the processes would train independently")
    return accelerator


def agreed_seconds(accelerator, seconds: float) -> float:
    """The slowest process's `seconds`, the same number on every rank. Each process measures its own time; a
    decision taken from it (stop at a time budget, a learning rate that follows the clock) must be taken from one
    clock, or one rank stops while another waits in its next all-reduce for good, and the replicas drift."""
    if accelerator.num_processes == 1:
        return seconds
    mine = torch.tensor([seconds], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.gather(mine).max())


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so that another Accelerator can be built in this process (the GPU
    check runs both trainers in one process; tests run many)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
