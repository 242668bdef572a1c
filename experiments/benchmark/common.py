"""What every section of the benchmark shares: the fixed sizes and presets it measures, where the checkout's
configs and photos are, and where progress goes."""

from __future__ import annotations

import sys

from experiments import CHECKOUT

PRESETS = ("tiny", "small", "kl-f8")
SIDE = 512
MEMORY_SIDE = 2048
# The U-Net rows (latent vs pixel, shards vs on the fly, attention heads) all time the CPU default preset.
UNET_CONFIG = CHECKOUT / "configs" / "unet" / "small.yaml"
BUNDLED_PHOTOS = CHECKOUT / "data" / "bundled_photos"


def progress(message: str) -> None:
    """Progress goes to stderr: stdout carries only results (JSON for --memory-case and --inference-options)."""
    print(message, file=sys.stderr, flush=True)
