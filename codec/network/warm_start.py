"""Thumbnail warm start: set an `AutoencoderKL`'s weights so that, before any training, it already is a codec.

At initialisation the network computes a fitted linear codec (codec/network/linear_codec.py): the posterior mean holds
the image's 8x box thumbnail in latent channels 0-2 and a half-pixel-shifted luma channel in 3, and the decoder
is the least-squares linear upsampler of those four channels. On the held-out photos it begins above the
thumbnail baseline (box + bicubic); every residual branch and every channel the linear path does not use start
free to learn what it misses. A randomly initialised VAE starts from noise and, on a CPU budget, spends most of
its steps learning colour and tone (see docs/codec-recipe.md).

How a linear signal survives the network's nonlinear parts:
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

from codec.network.linear_codec import LinearCodec, fitted_path


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


def normalisable_layout(width: int, groups: int, anchor: float, signals: int) -> Layout | None:
    """A layout whose GroupNorm groups each hold whole signal pairs plus at least one ± anchor pair, or None
    when the groups are too narrow (fewer than 4 channels per group) or too few."""
    per_group = width // groups
    pairs_per_group = (per_group - 2) // 2
    if pairs_per_group < 1:
        return None
    plus, minus, anchors = [], [], {}
    for g in range(groups):
        if len(plus) == signals:
            break
        base, k = g * per_group, 0
        while k < pairs_per_group and len(plus) < signals:
            plus.append(base + 2 * k)
            minus.append(base + 2 * k + 1)
            k += 1
        for i, ch in enumerate(range(base + 2 * k, base + per_group)):
            anchors[ch] = anchor if i % 2 == 0 else -anchor
    return Layout(width, plus, minus, anchors) if len(plus) == signals else None


def compact_layout(width: int, signals: int) -> Layout:
    """Signal pairs only, in the first channels: for early layers too narrow for anchors."""
    if width < 2 * signals:
        raise ValueError(f"thumbnail warm start needs at least {2 * signals} channels per layer, got {width}")
    return Layout(width, list(range(0, 2 * signals, 2)), list(range(1, 2 * signals, 2)))


def _best_layout(width: int, final: Layout) -> Layout:
    return final if width == final.width or width >= max(final.used) + 1 else compact_layout(width, len(final.plus))


def _clear(conv: nn.Conv2d, dst: Layout) -> None:
    """dst's channels read nothing; anchors come from the bias. Other outputs keep their random weights (free to
    learn) but never feed dst's channels."""
    for ch in dst.used:
        conv.weight[ch].zero_()
        conv.bias[ch] = dst.anchors.get(ch, 0.0)


def _depthwise(conv: nn.Conv2d, src: Layout, dst: Layout, kernels: torch.Tensor) -> None:
    """Signal s -> signal s through its own 3x3 (or 1x1) kernel: +s -> +s and −s -> −s."""
    with torch.no_grad():
        _clear(conv, dst)
        for s, kernel in enumerate(kernels):
            for out_ch, in_ch in ((dst.plus[s], src.plus[s]), (dst.minus[s], src.minus[s])):
                conv.weight[out_ch, in_ch] = kernel


def _identity_kernels(conv: nn.Conv2d, signals: int) -> torch.Tensor:
    k = torch.zeros(signals, *conv.kernel_size)
    k[:, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
    return k


def _split_into_pairs(conv: nn.Conv2d, layout: Layout, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """conv_in: signal s = weight[s] * inputs (+ bias[s]) as the pair (+s, −s); anchors from the bias."""
    with torch.no_grad():
        _clear(conv, layout)
        for s in range(weight.shape[0]):
            conv.weight[layout.plus[s], : weight.shape[1]] = weight[s]
            conv.weight[layout.minus[s], : weight.shape[1]] = -weight[s]
            if bias is not None:
                conv.bias[layout.plus[s]] = bias[s]
                conv.bias[layout.minus[s]] = -bias[s]


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
            _depthwise(resnet.conv_shortcut, layout, new, _identity_kernels(resnet.conv_shortcut, len(final.plus)))
            layout = new
    return layout


def _norm_to_offset_pairs(norm: nn.GroupNorm, layout: Layout, offset: float) -> None:
    """Per-channel gain = the group's (signal-free) standard deviation, bias = +offset on signal channels.

    The anchors are needed only in the group statistics, not downstream: their outputs are set to 0. A constant
    ±A feeding the last convolution would let Adam's first steps (about lr on every weight, whatever the
    gradient's size) move the output by lr·A per weight, and knock the warm start off its starting quality."""
    per_group = norm.num_channels // norm.num_groups
    with torch.no_grad():
        for ch in layout.anchors:
            norm.weight[ch] = 0.0
            norm.bias[ch] = 0.0
        for ch in layout.plus + layout.minus:
            g = ch // per_group
            members = range(g * per_group, (g + 1) * per_group)
            values = [layout.anchors.get(m, 0.0) for m in members]
            mean = sum(values) / per_group
            var = sum(v * v for v in values) / per_group - mean * mean
            norm.weight[ch] = (var + norm.eps) ** 0.5
            norm.bias[ch] = offset


def _read_pairs(conv: nn.Conv2d, layout: Layout, mix: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """conv output o = Σ_s mix[o, s] · ((+s + B)/2 − (−s + B)/2) = Σ_s mix[o, s] · s, at the kernel centre."""
    k = conv.kernel_size[0] // 2
    with torch.no_grad():
        for o in range(mix.shape[0]):
            conv.weight[o].zero_()
            conv.bias[o] = 0.0 if bias is None else bias[o]
            for s in range(mix.shape[1]):
                conv.weight[o, layout.plus[s], k, k] = 0.5 * mix[o, s]
                conv.weight[o, layout.minus[s], k, k] = -0.5 * mix[o, s]


def _identity_1x1(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for i in range(min(conv.in_channels, conv.out_channels)):
            conv.weight[i, i, 0, 0] = 1.0


def _mid_block(mid: nn.Module, layout: Layout, final: Layout) -> Layout:
    layout = _resnets(mid, layout, final)
    for attn in mid.attentions:
        if attn is not None:
            _zero_attention(attn)
    return layout


def _read_out(norm: nn.GroupNorm, conv: nn.Conv2d, layout: Layout, final: Layout, offset: float, where: str,
              mix: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """The last norm -> SiLU -> conv_out: the signal pairs, mixed by `mix`, become the outputs."""
    if layout is not final:
        raise ValueError("thumbnail warm start: no layer wide enough to add GroupNorm anchors "
                         f"before the {where}'s last norm")
    _norm_to_offset_pairs(norm, layout, offset)
    _read_pairs(conv, layout, mix, bias)


def _final_layout(norm: nn.GroupNorm, anchor: float, signals: int, where: str) -> Layout:
    layout = normalisable_layout(norm.num_channels, norm.num_groups, anchor, signals)
    if layout is None:
        raise ValueError(f"thumbnail warm start: the {where}'s last GroupNorm ({norm.num_channels} channels, "
                         f"{norm.num_groups} groups) cannot hold {signals} signal pairs with anchors; it needs >= 4 "
                         "channels per group: lower model.norm_num_groups")
    return layout


def _conv_in(half: nn.Module, anchor: float, signals: int, where: str, weight: torch.Tensor,
             bias: torch.Tensor | None = None) -> tuple[Layout, Layout]:
    """conv_in of the encoder or decoder `half` as signal pairs; returns (its layout, the last norm's layout).
    The last norm's layout comes first: it decides how wide the early layers' layouts may be."""
    final = _final_layout(half.conv_norm_out, anchor, signals, where)
    layout = _best_layout(half.conv_in.out_channels, final)
    _split_into_pairs(half.conv_in, layout, weight, bias)
    return layout, final


def _levels(blocks: nn.ModuleList, resamplers: str, layout: Layout, final: Layout, kernels: torch.Tensor) -> Layout:
    """Each level's resnets, then its `resamplers` ("downsamplers" or "upsamplers") conv as kernels[level]."""
    level = 0
    for block in blocks:
        layout = _resnets(block, layout, final)
        for resampler in getattr(block, resamplers) or []:
            _depthwise(resampler.conv, layout, layout, kernels[level])
            level += 1
    return layout


def thumbnail_init(vae: AutoencoderKL, linear: LinearCodec | None = None, anchor: float = 10.0, offset: float = 16.0,
                   logvar: float = -12.0) -> AutoencoderKL:
    """Overwrite the main path of `vae` in place so it computes `linear` (default: the shipped fit, see the
    module docstring) and return it."""
    enc, dec = vae.encoder, vae.decoder
    downsamplers = [d for block in enc.down_blocks for d in block.downsamplers or []]
    upsamplers = [u for block in dec.up_blocks for u in block.upsamplers or []]
    linear = linear or LinearCodec.load(fitted_path(len(downsamplers)))
    signals = linear.signals
    if vae.config.latent_channels != signals or len(downsamplers) != linear.levels or len(upsamplers) != linear.levels:
        raise ValueError(f"thumbnail warm start: the fitted linear codec is f{2 ** linear.levels}/c{signals}; this "
                         f"codec has {len(downsamplers)} down-sampling levels and {vae.config.latent_channels} latent "
                         "channels (use model.init=random, or fit filters for it with a checkout's "
                         "`python -m experiments.fit_warm_start`)")

    # ---- encoder: conv_in -> (resnets, down-sampling conv) per level -> mid -> norm -> SiLU -> conv_out
    layout, enc_final = _conv_in(enc, anchor, signals, "encoder", linear.enc_in)
    layout = _levels(enc.down_blocks, "downsamplers", layout, enc_final, linear.enc_down)
    layout = _mid_block(enc.mid_block, layout, enc_final)
    _read_out(enc.conv_norm_out, enc.conv_out, layout, enc_final, offset, "encoder", torch.eye(signals))
    with torch.no_grad():  # log-variance channels: a small constant σ, so sampling barely perturbs the latent
        enc.conv_out.weight[signals:].zero_()
        enc.conv_out.bias[signals:] = logvar
    _identity_1x1(vae.quant_conv)
    _identity_1x1(vae.post_quant_conv)

    # ---- decoder: conv_in -> mid -> (resnets, nearest x2 + conv) per level -> norm -> SiLU -> conv_out
    layout, dec_final = _conv_in(dec, anchor, signals, "decoder", linear.dec_in, linear.dec_in_bias)
    layout = _mid_block(dec.mid_block, layout, dec_final)
    layout = _levels(dec.up_blocks, "upsamplers", layout, dec_final, linear.dec_up)
    _read_out(dec.conv_norm_out, dec.conv_out, layout, dec_final, offset, "decoder", linear.dec_out,
              linear.dec_out_bias)
    return vae
