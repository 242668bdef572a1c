"""The article's VAE with one latent vector per image: AutoencoderKL whose latent numbers each see the whole image.

AutoencoderKL's latent is a grid: each cell is computed from, and decoded into, its own neighbourhood. That is what
a codec wants (tiles, any image size, a U-Net on top), and what the article's prior sampling does not: z ~ N(0, I)
draws the cells independently, and on the shapes world, where every image holds one object, a 4x4x1 grid's prior
samples held one to three objects, each cell deciding alone (docs/generative-vae.md). Here the encoder's last
feature map goes through one linear layer to the latent's means and log-variances, and the latent through one linear
layer to the decoder's first feature map, so every latent number is a function of the whole image and every pixel a
function of every latent number: the classic conv-VAE bottleneck.

The latent keeps AutoencoderKL's (latent_channels, h, w) shape, so the latent geometry, the loss, the trainer and
the exports are those of every other codec; only its numbers are no longer tied to places. The linear layers fix
the image size: the class encodes and decodes `sample_size` images only, and refuses others in one line.
Stock diffusers cannot load the export (the layers differ from AutoencoderKL's); `model.load_codec` can.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from diffusers.configuration_utils import register_to_config
from torch import nn


class GlobalLatentAutoencoderKL(AutoencoderKL):
    has_ldm_layout = False  # linear layers where LDM's VAE has convolutions (codec/exchange/ldm_format.py)

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
                 up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",), block_out_channels: tuple[int, ...] = (64,),
                 layers_per_block: int = 1, act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32,
                 sample_size: int = 32, scaling_factor: float = 0.18215, shift_factor: float | None = None,
                 latents_mean: tuple[float] | None = None, latents_std: tuple[float] | None = None,
                 force_upcast: bool = True, use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True):
        super().__init__(in_channels=in_channels, out_channels=out_channels, down_block_types=down_block_types,
                         up_block_types=up_block_types, block_out_channels=block_out_channels,
                         layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
                         norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, latents_mean=latents_mean, latents_std=latents_std,
                         force_upcast=force_upcast, use_quant_conv=True, use_post_quant_conv=True,
                         mid_block_add_attention=mid_block_add_attention)
        factor = 2 ** (len(block_out_channels) - 1)
        if sample_size % factor:
            raise ValueError(f"GlobalLatentAutoencoderKL: sample_size {sample_size} is not a multiple of the "
                             f"downsampling factor {factor}")
        grid, width = sample_size // factor, block_out_channels[-1]
        features, latent = width * grid * grid, latent_channels * grid * grid
        # The encoder ends in a feature map (not in the means and log-variances of each cell), which one linear layer
        # reads whole; the decoder starts from a feature map one linear layer writes whole.
        self.encoder.conv_out = nn.Conv2d(width, width, 3, padding=1)
        self.quant_conv = nn.Sequential(nn.Flatten(), nn.Linear(features, 2 * latent),
                                        nn.Unflatten(1, (2 * latent_channels, grid, grid)))
        self.post_quant_conv = nn.Sequential(nn.Flatten(), nn.Linear(latent, features),
                                             nn.Unflatten(1, (width, grid, grid)))
        self.decoder.conv_in = nn.Conv2d(width, width, 3, padding=1)
        self.latent_grid = grid

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.config.sample_size,) * 2:
            raise ValueError(f"a global-latent codec encodes {self.config.sample_size}x{self.config.sample_size} "
                             f"images only (its latent is one vector for the whole image), got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        return super()._encode(x)

    def _decode(self, z: torch.Tensor, return_dict: bool = True):
        if z.shape[-2:] != (self.latent_grid,) * 2:
            raise ValueError(f"a global-latent codec decodes {self.latent_grid}x{self.latent_grid} latents only (its "
                             f"{self.config.sample_size}x{self.config.sample_size} images), got "
                             f"{z.shape[-2]}x{z.shape[-1]}")
        return super()._decode(z, return_dict=return_dict)
