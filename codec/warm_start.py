"""Thumbnail warm start: set an `AutoencoderKL`'s weights so that, before any training, it already is a codec.

At initialisation the posterior mean holds the image's 8x box-averaged thumbnail in latent channels 0-2 and
the decoder upsamples those channels back (nearest neighbour); the fourth latent channel and every residual
branch start free to learn what the thumbnail misses. A randomly initialised VAE starts from noise and, on a
CPU budget, spends most of its steps learning colour and tone (see docs/codec-recipe.md).

How a plain signal survives the network's nonlinear parts:
- Residual blocks and the mid-block attention are residual: with their last layer zeroed they are the
  identity, so only the convolutions between blocks (conv_in, down/up-sampling convs, shortcuts, conv_out)
  carry the signal, and those are linear.
- GroupNorm would normalise the signal by its own per-image statistics and erase its tone. Each signal
  travels as a pair (+s, −s), whose contributions to the group mean cancel, in a group completed by constant
  "anchor" channels (±A) that dominate the group's variance; the normalisation then becomes a fixed scale,
  which the norm's per-channel gain undoes.
- SiLU is nearly the identity far from zero: the norm's bias shifts the pair by +B before it, and the next
  convolution takes (+s + B)/2 − (−s + B)/2 = s.
The result is exact up to terms of order (signal/A)² and exp(−B).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL
from torch import nn

COLORS = 3


@dataclass
class Layout:
    """Where the signal pairs and anchors live in a feature map of `width` channels."""

    width: int
    plus: list[int]
    minus: list[int]
    anchors: dict[int, float] = field(default_factory=dict)

    @property
    def used(self) -> set[int]:
        return set(self.plus) | set(self.minus) | set(self.anchors)


def normalisable_layout(width: int, groups: int, anchor: float) -> Layout | None:
    """A layout whose GroupNorm groups each hold whole signal pairs plus at least one ± anchor pair, or None
    when the groups are too narrow (fewer than 4 channels per group)."""
    per_group = width // groups
    pairs_per_group = (per_group - 2) // 2
    if pairs_per_group < 1:
        return None
    plus, minus, anchors = [], [], {}
    color = 0
    for g in range(groups):
        if color == COLORS:
            break
        base, k = g * per_group, 0
        while k < pairs_per_group and color < COLORS:
            plus.append(base + 2 * k)
            minus.append(base + 2 * k + 1)
            k, color = k + 1, color + 1
        for i, ch in enumerate(range(base + 2 * k, base + per_group)):
            anchors[ch] = anchor if i % 2 == 0 else -anchor
    return Layout(width, plus, minus, anchors) if color == COLORS else None


def compact_layout(width: int) -> Layout:
    """Signal pairs only, in the first six channels: for early layers too narrow for anchors."""
    if width < 2 * COLORS:
        raise ValueError(f"thumbnail warm start needs at least {2 * COLORS} channels per layer, got {width}")
    return Layout(width, [0, 2, 4], [1, 3, 5])


def _best_layout(width: int, final: Layout) -> Layout:
    return final if width == final.width or width >= max(final.used) + 1 else compact_layout(width)


def _linear_map(conv: nn.Conv2d, src: Layout, dst: Layout, taps: list[tuple[int, int]], scale: float = 1.0) -> None:
    """Make conv's outputs on dst's channels a fixed function of src's signals: +s -> +s, −s -> −s, summed over
    `taps` (kernel positions) times `scale`; anchors come from the bias. Outputs outside dst keep their random
    weights (free to learn), but never feed dst's channels."""
    with torch.no_grad():
        w, b = conv.weight, conv.bias
        for ch in dst.used:
            w[ch].zero_()
            b[ch] = dst.anchors.get(ch, 0.0)
        for c in range(COLORS):
            for out_ch, in_ch in ((dst.plus[c], src.plus[c]), (dst.minus[c], src.minus[c])):
                for ky, kx in taps:
                    w[out_ch, in_ch, ky, kx] = scale


def _split_into_pairs(conv: nn.Conv2d, layout: Layout) -> None:
    """conv_in: input channel c (an RGB colour, or latent channel c) -> the pair (+c, −c), anchors from the bias."""
    k = conv.kernel_size[0] // 2
    with torch.no_grad():
        for ch in layout.used:
            conv.weight[ch].zero_()
            conv.bias[ch] = layout.anchors.get(ch, 0.0)
        for c in range(COLORS):
            conv.weight[layout.plus[c], c, k, k] = 1.0
            conv.weight[layout.minus[c], c, k, k] = -1.0


def _zero_residual(block: nn.Module) -> None:
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()


def _zero_attention(attn: nn.Module) -> None:
    with torch.no_grad():
        attn.to_out[0].weight.zero_()
        attn.to_out[0].bias.zero_()


def _resnets(block: nn.Module, layout: Layout, final: Layout) -> Layout:
    """Residual branches off; where a block changes width its 1x1 shortcut re-lays the signal."""
    for resnet in block.resnets:
        _zero_residual(resnet)
        if resnet.conv_shortcut is not None:
            new = _best_layout(resnet.conv_shortcut.out_channels, final)
            _linear_map(resnet.conv_shortcut, layout, new, [(0, 0)])
            layout = new
    return layout


def _norm_to_offset_pairs(norm: nn.GroupNorm, layout: Layout, offset: float) -> None:
    """Per-channel gain = the group's (signal-free) standard deviation, bias = +offset on signal channels."""
    per_group = norm.num_channels // norm.num_groups
    with torch.no_grad():
        for ch in layout.plus + layout.minus:
            g = ch // per_group
            members = range(g * per_group, (g + 1) * per_group)
            values = [layout.anchors.get(m, 0.0) for m in members]
            mean = sum(values) / per_group
            var = sum(v * v for v in values) / per_group - mean * mean
            norm.weight[ch] = (var + norm.eps) ** 0.5
            norm.bias[ch] = offset


def _read_pairs(conv: nn.Conv2d, layout: Layout, first_out: int = 0) -> None:
    """conv outputs first_out + c = (+s_c + B)/2 − (−s_c + B)/2 = s_c, read at the kernel centre."""
    k = conv.kernel_size[0] // 2
    with torch.no_grad():
        for c in range(COLORS):
            conv.weight[first_out + c].zero_()
            conv.bias[first_out + c] = 0.0
            conv.weight[first_out + c, layout.plus[c], k, k] = 0.5
            conv.weight[first_out + c, layout.minus[c], k, k] = -0.5


def _identity_1x1(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for i in range(min(conv.in_channels, conv.out_channels)):
            conv.weight[i, i, 0, 0] = 1.0


def thumbnail_init(vae: AutoencoderKL, anchor: float = 10.0, offset: float = 16.0, logvar: float = -12.0) -> AutoencoderKL:
    """Overwrite the main path of `vae` in place (see the module docstring) and return it."""
    if vae.config.latent_channels < COLORS:
        raise ValueError(f"thumbnail warm start needs >= {COLORS} latent channels, got {vae.config.latent_channels}")
    enc, dec = vae.encoder, vae.decoder
    groups = vae.config.norm_num_groups

    # ---- encoder: conv_in -> (resnets, 2x2 average) per level -> mid -> norm -> SiLU -> conv_out
    enc_final = normalisable_layout(enc.conv_norm_out.num_channels, groups, anchor)
    if enc_final is None:
        raise ValueError("thumbnail warm start: the encoder's last GroupNorm has < 4 channels per group; lower norm_num_groups")
    layout = _best_layout(enc.conv_in.out_channels, enc_final)
    _split_into_pairs(enc.conv_in, layout)
    for block in enc.down_blocks:
        layout = _resnets(block, layout, enc_final)
        for down in block.downsamplers or []:
            # Downsample2D pads right/bottom and runs a stride-2 3x3 conv: taps (0..1, 0..1) = a 2x2 average.
            _linear_map(down.conv, layout, layout, [(0, 0), (0, 1), (1, 0), (1, 1)], 0.25)
    layout = _resnets(enc.mid_block, layout, enc_final)
    for attn in enc.mid_block.attentions:
        if attn is not None:
            _zero_attention(attn)
    if layout is not enc_final:
        raise ValueError("thumbnail warm start: no layer wide enough to add GroupNorm anchors before the encoder's last norm")
    _norm_to_offset_pairs(enc.conv_norm_out, layout, offset)
    _read_pairs(enc.conv_out, layout)
    latent = vae.config.latent_channels
    with torch.no_grad():  # log-variance channels: a small constant σ, so sampling barely perturbs the thumbnail
        enc.conv_out.weight[latent:].zero_()
        enc.conv_out.bias[latent:] = logvar
    _identity_1x1(vae.quant_conv)
    _identity_1x1(vae.post_quant_conv)

    # ---- decoder: conv_in -> mid -> (resnets, nearest x2 + conv) per level -> norm -> SiLU -> conv_out
    dec_final = normalisable_layout(dec.conv_norm_out.num_channels, groups, anchor)
    if dec_final is None:
        raise ValueError("thumbnail warm start: the decoder's last GroupNorm has < 4 channels per group; lower norm_num_groups")
    layout = _best_layout(dec.conv_in.out_channels, dec_final)
    _split_into_pairs(dec.conv_in, layout)
    layout = _resnets(dec.mid_block, layout, dec_final)
    for attn in dec.mid_block.attentions:
        if attn is not None:
            _zero_attention(attn)
    for block in dec.up_blocks:
        layout = _resnets(block, layout, dec_final)
        for up in block.upsamplers or []:
            _linear_map(up.conv, layout, layout, [(1, 1)])  # after nearest x2: the centre tap keeps it
    if layout is not dec_final:
        raise ValueError("thumbnail warm start: no layer wide enough to add GroupNorm anchors before the decoder's last norm")
    _norm_to_offset_pairs(dec.conv_norm_out, layout, offset)
    _read_pairs(dec.conv_out, layout)
    return vae
