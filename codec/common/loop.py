"""What both trainers' loops share: the `train:` section's loop settings and what a finished loop returns."""

from __future__ import annotations

from dataclasses import dataclass

from codec.common.config import check_loop_settings
from codec.common.distributed import DEFAULT_TIMEOUT_MINUTES


@dataclass
class LoopSettings:
    """The `train:` keys every trainer reads, with the codec's defaults; diffusion.config overrides them.

    A trainer's own `train:` section subclasses this, so a setting means the same thing (and is checked the same
    way) in both."""

    seed: int = 0
    batch_size: int = 8  # per process; the global batch is batch_size * processes * grad_accum
    grad_accum: int = 1
    max_steps: int = 1000
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | no | bf16 | fp16
    # How long a barrier or all-reduce waits for the slowest process before the run fails. torch's NCCL default
    # (10 min) is shorter than some legitimate waits: one process writing a checkpoint, the export or validation.
    process_group_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES
    ema_decay: float | None = 0.999  # null disables EMA; the export then holds the raw weights
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 250
    log_every: int = 10
    output_dir: str = "runs/codec"
    # Recompute each block's activations in the backward pass instead of storing them (diffusers'
    # enable_gradient_checkpointing): less activation memory (larger batches) for about one more forward pass of
    # compute.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_loop_settings(self)


@dataclass
class LoopResult:
    """What every trainer returns; each adds the folder it exported."""

    step: int
    metrics: dict  # the last validation's numbers (EMA weights, the same that are exported)
