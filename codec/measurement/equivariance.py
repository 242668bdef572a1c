"""The spatial transforms τ of the equivariance regulariser and of the latent analysis: one implementation of each.

A codec is equivariant to τ when decoding the transformed latent gives the transformed image,
D(τ(E(x))) ≈ τ(x). EQ-VAE (Kouzelis et al., ICML 2025) asks it of downscales and quarter turns; "Improving the
Diffusability of Autoencoders" (Skorokhodov et al., 2025) of 2x and 4x downscales only, and finds that latents
which obey it carry less high-frequency power, which a diffusion model learns faster.

A downscale by s maps a latent of side h to round(s·h) and the image to exactly f times that (f: the codec's
downsampling factor), so decoded and target images always have the same size, whatever the crop. Resampling:
- area: each output pixel is the mean of its footprint (adaptive average pooling). An anti-aliased downscale at
  any factor, and for a box-filter codec exactly equivariant (tests/codec/test_equivariance.py).
- bilinear: torch's bilinear without anti-aliasing, EQ-VAE's own choice; it aliases below a factor of 1/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from codec.common.draws import keyed_generator

EQUIVARIANCE_KINDS = ("scale", "rotate", "both")
RESAMPLING = ("area", "bilinear")


@dataclass(frozen=True)
class Transform:
    """τ: a downscale by `scale` (1: none), then `quarter_turns` turns of 90° counter-clockwise."""

    scale: float = 1.0
    quarter_turns: int = 0

    @property
    def name(self) -> str:
        parts = ([f"scale {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"rotate {90 * self.quarter_turns}"] if self.quarter_turns % 4 else [])
        return " + ".join(parts) or "identity"


def resize(t: torch.Tensor, size: tuple[int, int], resample: str = "area") -> torch.Tensor:
    """`t` (N, C, H, W) resampled to `size`; unchanged when it already has it."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    if resample == "area":
        return F.interpolate(t, size=size, mode="area")
    if resample == "bilinear":
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=False)
    raise ValueError(f"resample {resample!r}: expected one of {RESAMPLING}")


def transformed_latent_size(latent_hw: tuple[int, int], scale: float) -> tuple[int, int]:
    """The latent side after a downscale by `scale`: round(s·h), at least 1."""
    return tuple(max(1, round(scale * side)) for side in latent_hw)


def transform_latent(z: torch.Tensor, tau: Transform, resample: str = "area") -> torch.Tensor:
    z = resize(z, transformed_latent_size(tuple(z.shape[-2:]), tau.scale), resample)
    return torch.rot90(z, tau.quarter_turns, dims=(-2, -1)) if tau.quarter_turns % 4 else z


def transform_image(x: torch.Tensor, tau: Transform, factor: int, latent_hw: tuple[int, int],
                    resample: str = "area") -> torch.Tensor:
    """τ(x) at exactly `factor` times the transformed latent's size, so it matches D(τ(z)) pixel for pixel."""
    h, w = transformed_latent_size(latent_hw, tau.scale)
    x = resize(x, (factor * h, factor * w), resample)
    return torch.rot90(x, tau.quarter_turns, dims=(-2, -1)) if tau.quarter_turns % 4 else x


def draw_transform(kind: str, scales: list[float], seed: int, step: int) -> Transform:
    """The τ of one optimizer step, keyed by (seed, step): the same on every process and after a resume, so N
    processes train like one. scale: one of `scales`; rotate: 1, 2 or 3 quarter turns; both: one of each, as in
    EQ-VAE."""
    if kind not in EQUIVARIANCE_KINDS:
        raise ValueError(f"equivariance {kind!r}: expected one of {EQUIVARIANCE_KINDS}")
    g = keyed_generator("equivariance", seed, step)
    scale = scales[int(torch.randint(len(scales), (), generator=g))] if kind in ("scale", "both") else 1.0
    turns = int(torch.randint(1, 4, (), generator=g)) if kind in ("rotate", "both") else 0
    return Transform(scale, turns)


def analysis_transforms(scales: list[float] = (0.5, 0.25)) -> list[Transform]:
    """The τ the latent analysis measures: each downscale alone and each quarter turn alone."""
    return [Transform(scale=s) for s in scales] + [Transform(quarter_turns=k) for k in (1, 2, 3)]
