"""The optimizer settings both trainers share, the learning rate as a pure function of the step, and the step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from codec.common.config import ConfigError


@dataclass
class OptimConfig:
    """AdamW with the codec's defaults (latent-diffusion's autoencoder betas); diffusion.config overrides them."""

    lr: float = 1.0e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # the rate decays to lr * min_lr_ratio at max_steps
    # 0: cosine decay over the whole run. N > 0: warm-up, stable, decay: `lr` until the last N steps, then a linear
    # decay to lr * min_lr_ratio. A longer budget then repeats every step of a shorter one up to its decay, so a run
    # can be extended from its checkpoints, and the decay lets its loss settle at the end.
    cooldown_steps: int = 0
    max_grad_norm: float | None = 1.0
    # torch's fused AdamW kernel (CPU and CUDA): the same update, 1.17x the bare training steps per second of the β
    # study's small network on one core (docs/generative-vae.md). Off by default: the demo's numbers were measured
    # without it, and a fused update rounds differently, so a run resumed across the switch is not the run it would
    # have been.
    fused: bool = False

    def __post_init__(self) -> None:
        if self.cooldown_steps < 0:
            raise ConfigError(f"optim.cooldown_steps must be >= 0, got {self.cooldown_steps}")


def learning_rate(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps`; with `cooldown_steps`, `lr`
    until the last cooldown_steps before `max_steps`, then linear decay to `lr * min_lr_ratio` at `max_steps`.

    A pure function of the step (no scheduler object): resuming needs nothing but the step, and the rate does
    not depend on how many processes step a scheduler (accelerate steps a prepared one once per process)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.cooldown_steps > 0:
        progress = min(1.0, max(0.0, (step - (max_steps - cfg.cooldown_steps)) / cfg.cooldown_steps))
        return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * progress)
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(parameters, cfg: OptimConfig, lr: float | None = None, weight_decay: float | None = None):
    """The AdamW of both trainers (the discriminator's included), with cfg's betas and kernel."""
    return torch.optim.AdamW(parameters, lr=cfg.lr if lr is None else lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
                             **({"fused": True} if cfg.fused else {}))


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def backward_and_step(accelerator, loss, optimizer, parameters, max_grad_norm: float | None) -> None:
    """Backpropagate `loss` through accelerate (scaling, DDP averaging), clip the gradient norm on the steps
    where gradients are synchronised (clipping a half-accumulated gradient would clip the wrong norm), step."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
