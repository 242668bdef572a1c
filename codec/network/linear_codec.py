"""The best *linear* codec that fits the f8/c4 `AutoencoderKL`'s linear path: the warm start's target.

A linear codec here is exactly the chain of linear layers the warm start (codec/network/warm_start.py) can set in an
`AutoencoderKL` while every nonlinear part is bypassed:

    encoder: 3x3 conv RGB -> S signals, then per level Downsample2D (pad right/bottom, 3x3 stride-2 conv,
             one kernel per signal) -> S latent channels
    decoder: 3x3 conv latents -> S signals (+ bias), then per level nearest x2 + 3x3 conv (one kernel per
             signal), then a 1x1 mix of the signals -> RGB (+ bias)

Latent channels 0-2 are the 8x box thumbnail (R, G, B) and stay fixed. Channel 3 starts as the thumbnail's
luma sampled half a latent pixel (4 px) down and right, so together the channels sample luma on a quincunx
grid, twice as densely as the thumbnail alone; the fit then refines that channel's filters and the whole
decoder by least squares on training photos. Measured on the held-out bundled photos at 256² (see
docs/codec-recipe.md): thumbnail (box + bicubic) 20.56 dB, this chain with three channels 20.72 dB, with the
quincunx luma channel 21.76 dB, with the fourth channel's filters fitted too (the shipped
linear_codec_f8c4.json, made by a checkout's `python -m experiments.fit_warm_start` from the 7 training photos)
22.35 dB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RGB = 3
LUMA = (0.299, 0.587, 0.114)
FITTED = Path(__file__).with_name("linear_codec_f8c4.json")


def fitted_path(levels: int) -> Path:
    """The shipped fit for a codec with `levels` down-sampling levels (factor 2**levels): f8 for the diffusion
    codecs, f4 for configs/codec/compress-f4.yaml."""
    return Path(__file__).with_name(f"linear_codec_f{2 ** levels}c{RGB + 1}.json")


@dataclass
class LinearCodec:
    enc_in: torch.Tensor  # (S, 3, 3, 3)
    enc_down: torch.Tensor  # (levels, S, 3, 3)
    dec_in: torch.Tensor  # (S, S, 3, 3)
    dec_in_bias: torch.Tensor  # (S,)
    dec_up: torch.Tensor  # (levels, S, 3, 3)
    dec_out: torch.Tensor  # (3, S)
    dec_out_bias: torch.Tensor  # (3,)

    @property
    def signals(self) -> int:
        return self.enc_in.shape[0]

    @property
    def levels(self) -> int:
        return self.enc_down.shape[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.enc_in, padding=1)
        for k in self.enc_down:
            h = F.conv2d(F.pad(h, (0, 1, 0, 1)), k[:, None], stride=2, groups=self.signals)
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(z, self.dec_in, self.dec_in_bias, padding=1)
        for k in self.dec_up:
            h = F.conv2d(F.interpolate(h, scale_factor=2, mode="nearest"), k[:, None], padding=1, groups=self.signals)
        return F.conv2d(h, self.dec_out[:, :, None, None], self.dec_out_bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def save(self, path: str | Path) -> None:
        data = {name: t.tolist() for name, t in self.tensors().items()}
        Path(path).write_text(json.dumps(data, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: str | Path = FITTED) -> LinearCodec:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no fitted linear codec here; make it with a checkout's "
                                    f"`python -m experiments.fit_warm_start`")
        data = json.loads(Path(path).read_text())
        return cls(**{name: torch.tensor(data[name], dtype=torch.float32) for name in cls.__dataclass_fields__})


def _box(levels: int, signals: int, last_shifted: bool) -> torch.Tensor:
    k = torch.zeros(levels, signals, 3, 3)
    k[:, :, 0:2, 0:2] = 0.25  # after the right/bottom pad: pixels 2i, 2i+1
    if last_shifted:
        k[-1, RGB:] = 0.0
        k[-1, RGB:, 1:3, 1:3] = 0.25  # pixels 2i+1, 2i+2: half an output pixel further
    return k


def initial(levels: int = 3) -> LinearCodec:
    """Box thumbnail in channels 0-2, half-pixel-shifted luma in channel 3, bilinear-like decoding."""
    signals = RGB + 1
    enc_in = torch.zeros(signals, RGB, 3, 3)
    for c in range(RGB):
        enc_in[c, c, 1, 1] = 1.0
    enc_in[RGB, :, 1, 1] = torch.tensor(LUMA)
    dec_in = torch.zeros(signals, signals, 3, 3)
    for s in range(signals):
        dec_in[s, s, 1, 1] = 1.0
    bilinear = torch.outer(torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.25, 0.5, 0.25]))
    return LinearCodec(
        enc_in=enc_in, enc_down=_box(levels, signals, last_shifted=True),
        dec_in=dec_in, dec_in_bias=torch.zeros(signals),
        dec_up=bilinear.expand(levels, signals, 3, 3).clone(),
        dec_out=torch.eye(RGB, signals), dec_out_bias=torch.zeros(RGB),
    )


def fit(images: torch.Tensor, steps: int = 1500, lr: float = 1e-2, start: LinearCodec | None = None,
        levels: int = 3) -> LinearCodec:
    """Least-squares fit (Adam on the MSE) of the decoder and of the fourth channel's encoder filters to
    `images` ([-1, 1], N x 3 x H x W). Channels 0-2 stay the exact box thumbnail."""
    codec = start or initial(levels)
    params = {name: t.clone().requires_grad_(True) for name, t in codec.tensors().items()}
    fixed_rows = slice(0, RGB)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    for step in range(steps):
        if step == int(0.65 * steps):  # a lower rate to settle: the chain is multilinear, not convex
            for group in optimizer.param_groups:
                group["lr"] = lr / 5
        current = LinearCodec(**params)
        loss = F.mse_loss(current.decode(current.encode(images)), images)
        optimizer.zero_grad()
        loss.backward()
        params["enc_in"].grad[fixed_rows] = 0
        params["enc_down"].grad[:, fixed_rows] = 0
        optimizer.step()
    return LinearCodec(**{name: t.detach() for name, t in params.items()})
