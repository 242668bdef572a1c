"""Regions that must compute in float32 even inside a mixed-precision (bf16/fp16) autocast.

Casting inputs with `.float()` is not enough under autocast: its convolutions and matmuls cast them straight back
to bf16. Measured under CPU bf16 autocast: the MS-SSIM distance of two smooth images changed sign (+0.0019 in
fp32, -0.0015 in bf16) and the cosine of its gradient to the fp32 one was 0.77. So losses, metrics and the
adaptive GAN weight switch autocast off for their own computation.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable)


# Device types autocast can be on for; the ones not compiled into this torch are simply never on.
AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


@contextlib.contextmanager
def autocast_off():
    """Switch off every autocast that is on (CPU and CUDA keep separate states), restore them after."""
    with contextlib.ExitStack() as stack:
        for device_type in AUTOCAST_DEVICES:
            try:
                enabled = torch.is_autocast_enabled(device_type)
            except RuntimeError:  # a device type this build does not know
                continue
            if enabled:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


# Only the half precisions are upcast: a float64 argument was asked for (rate_bits, kl_bits_per_pixel sum KLs
# whose terms cancel to 1e-7), and casting it to float32 would undo that.
LOW_PRECISIONS = (torch.bfloat16, torch.float16)


def _to_fp32(value):
    if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISIONS:
        return value.float()
    return value


def in_fp32(fn: F) -> F:
    """Run `fn` with autocast off and its bf16/fp16 tensor arguments in float32 (float64 ones stay float64).
    Gradients flow through the casts, so it can wrap a loss."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*[_to_fp32(a) for a in args], **{k: _to_fp32(v) for k, v in kwargs.items()})

    return wrapper  # type: ignore[return-value]


def run_in_fp32(module: nn.Module) -> nn.Module:
    """Make `module`'s forward compute in float32 under autocast (its parameters are float32 already).

    Used for the codec decoder's last convolution: its output is the image the losses see (bf16 would round a
    pixel near 1.0 to steps of 1/128, coarser than the uint8 it is saved as), and the adaptive GAN weight takes
    its gradients at that layer's weight, where fp16 underflows without the scaler (the gradient reaching each
    output element is about 1/(pixels·batch): 1.6e-7 for 8 images of 512², a float16 subnormal). The parameters
    and their names are unchanged, so checkpoints and exports are the same files.
    """
    # A method bound to the module itself (not a closure over it): a deepcopy of the module stays in fp32 and
    # calls its own weights.
    module.forward = types.MethodType(_forward_in_fp32, module)
    return module


def _forward_in_fp32(self: nn.Module, *args, **kwargs):
    return in_fp32(type(self).forward)(self, *args, **kwargs)


def runs_in_fp32(module: nn.Module) -> bool:
    return getattr(module.forward, "__func__", None) is _forward_in_fp32


@in_fp32
def sample_gaussian(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z = μ + exp(½ log σ²)·ε, in float32 whatever autocast made of μ and log σ².

    Under bf16 autocast the encoder's μ and log σ² are bf16, and bf16's step near a raw latent of 4 is 1/64: with
    log σ² = -10 (σ = 0.0067), 75% of bf16 samples rounded back to μ, so sample_posterior silently decoded the mean
    while the KL's gradient to log σ² assumed noise was added. The decoder may still run in bf16 after."""
    return mean + torch.exp(0.5 * logvar) * noise
