"""Put a codec into its fastest measured inference configuration on this kind of CPU.

What helps and what does not is measured in docs/performance.md (experiments/benchmark --inference-options);
the defaults here follow those measurements. Nothing here changes the network or its results beyond float
rounding: the same weights, the same outputs to ~1e-5.
"""

from __future__ import annotations

import torch
from torch import nn


def prepare_for_inference(vae: nn.Module, channels_last: bool = True, compile: bool = False) -> nn.Module:
    """Eval mode and frozen weights, optionally channels-last memory layout and torch.compile'd encoder and
    decoder. Returns the same module (changed in place) so `vae = prepare_for_inference(vae)` reads naturally.

    channels_last defaults to on: oneDNN's convolutions ran 1.2-1.4x faster in that layout on this CPU (small
    preset, encode and decode; more for narrower networks). compile defaults to off: inductor took ~100 s to
    compile the decoder on a cold cache, for each new input shape, and the compiled decoder ran 0.82x (busy
    machine) to 1.17x (idle) of eager. torch.inference_mode() measured the same as torch.no_grad(); either is
    the caller's context, not a module setting.

    compile=True compiles the encoder and decoder in place (Module.compile), so the state dict, save_pretrained
    and attributes stay as they were; the first call at each new input shape pays the compile time.
    """
    vae.eval().requires_grad_(False)
    if channels_last:
        vae.to(memory_format=torch.channels_last)
    if compile:
        for name in ("encoder", "decoder"):
            part = getattr(vae, name, None)
            if part is None:
                raise ValueError(f"prepare_for_inference(compile=True): {type(vae).__name__} has no .{name} to compile")
            part.compile()
    return vae
