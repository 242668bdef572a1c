"""The latent denoiser: diffusers' `UNet2DConditionModel`, so the exported folder loads in any diffusers pipeline."""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from diffusion.config import ConfigError, UNetConfig


def build_unet(cfg: UNetConfig, channels: int, sample_size: int, text_width: int) -> UNet2DConditionModel:
    """A text-conditioned U-Net on (channels, sample_size, sample_size) inputs, cross-attending to `text_width`-d
    token embeddings. `channels` is the codec's latent channels (4), or 3 for the pixel-space comparison."""
    if cfg.cross_attention_dim is not None and cfg.cross_attention_dim != text_width:
        raise ConfigError(
            f"unet.cross_attention_dim is {cfg.cross_attention_dim} but the text encoder's tokens are {text_width}-d; "
            f"set unet.cross_attention_dim to {text_width} or null (null follows the text encoder)"
        )
    levels = len(cfg.block_out_channels)
    if sample_size % 2 ** (levels - 1):
        raise ConfigError(
            f"latents of side {sample_size} cannot be halved {levels - 1} times by a U-Net with {levels} levels; "
            f"use latents whose side is a multiple of {2 ** (levels - 1)} or fewer unet.block_out_channels"
        )
    # One number stays one number, so SD's shape exports SD's exact config.json.
    heads = cfg.attention_head_dim if isinstance(cfg.attention_head_dim, int) else tuple(cfg.attention_head_dim)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=tuple(cfg.down_block_types),
        up_block_types=tuple(cfg.up_block_types),
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=text_width,
        attention_head_dim=heads,
        norm_num_groups=cfg.norm_num_groups,
    )
