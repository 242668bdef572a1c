"""Reconstruction metrics, per image, on images in [-1, 1] quantised to uint8 like a saved PNG would be."""

from __future__ import annotations

import torch


def to_uint8_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> {0, ..., 255} as float: metrics see exactly the pixels a user would save."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """10·log10(255² / MSE) per image on uint8-quantised RGB; identical images give +inf."""
    mse = (to_uint8_range(x) - to_uint8_range(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image (Gaussian window 11, σ 1.5, the standard constants) on uint8-quantised RGB."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        to_uint8_range(y), to_uint8_range(x), data_range=255.0, reduction="none"
    )
