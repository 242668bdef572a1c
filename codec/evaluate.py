"""Measure a codec on held-out images and draw what it does: reconstructions, prior samples, interpolation."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torchvision.utils import make_grid

from codec.metrics import psnr, ssim
from codec.model import interpolate, reconstruct, sample_prior


@torch.no_grad()
def evaluate_reconstructions(vae: AutoencoderKL, batches, perceptual=None) -> dict:
    """Mean L1 (in [-1, 1] units), PSNR and SSIM (uint8 RGB), and LPIPS when an LPIPS module is given,
    of posterior-mean reconstructions over `batches` of images."""
    l1, p, s, lp, count = 0.0, 0.0, 0.0, 0.0, 0
    for images in batches:
        images = images.to(vae.device, vae.dtype)
        recon = reconstruct(vae, images).clamp(-1, 1)
        l1 += (images - recon).abs().flatten(1).mean(1).sum().item()
        p += psnr(images, recon).sum().item()
        s += ssim(images, recon).sum().item()
        if perceptual is not None and perceptual.name == "lpips":
            lp += perceptual(images, recon).sum().item()
        count += images.shape[0]
    if not count:
        raise ValueError("evaluate_reconstructions: no validation images")
    metrics = {"val/l1": l1 / count, "val/psnr": p / count, "val/ssim": s / count}
    if perceptual is not None and perceptual.name == "lpips":
        metrics["val/lpips"] = lp / count
    return metrics


@torch.no_grad()
def validation_grid(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0, n_prior: int | None = None) -> Image.Image:
    """Rows: inputs | reconstructions | decoded prior samples z ~ N(0, I) | interpolation from the first image
    to the second. The prior row shows what the VAE alone generates, next to what its latents can hold."""
    images = images.to(vae.device, vae.dtype)
    n, _, h, w = images.shape
    rows = [images, reconstruct(vae, images)]
    g = torch.Generator().manual_seed(seed)
    rows.append(sample_prior(vae, n_prior or n, h, w, generator=g))
    if n >= 2:
        rows.append(interpolate(vae, images[0], images[1], steps=n))
    tiles = torch.cat([r.float().clamp(-1, 1).cpu() for r in rows])
    grid = make_grid((tiles + 1) / 2, nrow=n, padding=2, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write atomically: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path
