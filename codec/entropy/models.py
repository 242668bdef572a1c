"""The probability models of quantised latents, and their file.

Both models give the probability of a symbol y = round(z / Δ) of the normalised latent z (normalise_latents, unit
variance over the shards) at any step Δ, as the mass of its bin under a continuous density (discrete.py), so one
model serves every Δ:

- FactorizedModel: per channel one mixture of logistics, the same for every position (Ballé et al. 2017's
  "factorized prior", here without the hyperprior). Symbols are independent given their channel.
- ContextModel: the latent is coded in passes, channel group by channel group (Minnen & Singh 2020, "Channel-wise
  autoregressive entropy models"), and within a group the checkerboard's anchors first, then the other half
  (He et al. 2021, "Checkerboard context model"). For each pass a small convolutional network sees what is already
  decoded (earlier groups everywhere, this group's anchors in the second pass) and log Δ, and predicts a Gaussian
  (mean, scale) for every symbol of the pass. A pass is one vectorised coder call, not one call per symbol.

Either model may code the latent through an orthonormal transform (transform.py: a channel basis and Haar splits);
its symbols are then the transform's coefficients, and the network has one channel per coefficient band.

The file is safetensors: the network's tensors (float32), the transform's channel basis (float64, when there is
one), and one metadata key, "entropy_model", a JSON string with the format, kind, network config, the codec it was
fit for (identity and encoder identity), the latent normalisation of the shards, the transform's levels and the fit
settings. One key because safetensors writes a metadata map in varying
order, and the file's bytes should not vary. The model's identity, which every compressed file records, is a hash
of that JSON and the tensors.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from codec.common.atomic import write_bytes_atomically
from codec.common.config import ConfigError
from codec.entropy.discrete import gaussian_bin_probability, logistic_mixture_bin_probability
from codec.entropy.transform import LatentTransform
from codec.exchange.pipeline import denormalise_latents, latent_norm, normalise_latents
from codec.shards.reader import codec_mismatch

FORMAT = "entropy-model/1"
METADATA_KEY = "entropy_model"
BASIS_KEY = "transform.channel_basis"  # the tensor that is the transform's, not the network's
KINDS = ("factorized", "context")
# The scale a network may predict, in normalised latent units: below 1e-4 a bin's mass is 0 or 1 at any useful Δ.
LOG_SCALE_RANGE = (math.log(1e-4), math.log(1e3))


class EntropyModelError(ConfigError):
    """A probability model file that is missing, unreadable, not a model, or made for another codec (one line and
    exit 2 in the scripts)."""


class FactorizedModel(nn.Module):
    """p(y_c) = Σ_k π_ck [S((yΔ + Δ/2 - m_ck)/s_ck) - S((yΔ - Δ/2 - m_ck)/s_ck)]: a mixture of K logistics per
    channel c, integrated over the symbol's bin."""

    kind = "factorized"

    def __init__(self, channels: int, components: int = 3):
        super().__init__()
        self.channels, self.components = channels, components
        self.logits = nn.Parameter(torch.zeros(channels, components))
        self.loc = nn.Parameter(torch.linspace(-1.0, 1.0, components).repeat(channels, 1))
        self.log_scale = nn.Parameter(torch.full((channels, components), math.log(0.5)))

    @property
    def config(self) -> dict:
        return {"channels": self.channels, "components": self.components}

    def _mixture(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.logits, self.loc, torch.exp(self.log_scale.clamp(*LOG_SCALE_RANGE))

    def bin_probability(self, y: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Probability of each symbol of y (B, C, h, w) at step (B, 1, 1, 1)."""
        logits, loc, scale = (t[None, :, None, None, :] for t in self._mixture())
        return logistic_mixture_bin_probability(y * step, (step / 2)[..., None], logits, loc, scale)

    def channel_tables(self, step: float, low: int, high: int) -> torch.Tensor:
        """(C, high - low + 1): each channel's probability of the symbols low..high, not yet renormalised."""
        logits, loc, scale = (t[:, None, :] for t in self._mixture())
        centers = torch.arange(low, high + 1, dtype=loc.dtype) * step
        return logistic_mixture_bin_probability(centers.expand(self.channels, -1), step / 2, logits, loc, scale)


def channel_groups(channels: int, groups: int) -> list[tuple[int, int]]:
    """`groups` contiguous (start, end) channel ranges of near-equal size covering 0..channels."""
    if not 1 <= groups <= channels:
        raise ConfigError(f"context model: groups must be between 1 and the latent channels ({channels}), got {groups}")
    bounds = [round(i * channels / groups) for i in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def checkerboard(h: int, w: int) -> torch.Tensor:
    """(h, w) bool, True at the anchors ((i + j) even): the positions coded first within a channel group."""
    return (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0


@dataclass(frozen=True)
class CodingPass:
    """One pass of the context model: which channels it predicts, what is known before it, what it codes."""

    channels: tuple[int, int]
    known: torch.Tensor  # (C, h, w) bool: decoded before this pass
    target: torch.Tensor  # (C, h, w) bool: coded in this pass


class ContextModel(nn.Module):
    """Channel groups x checkerboard halves, coded in order; pass k predicts N(mean, scale²) for its symbols from the
    latents decoded before it (ẑ = yΔ) and log Δ."""

    kind = "context"

    def __init__(self, channels: int, groups: int = 4, hidden: int = 32):
        super().__init__()
        self.channels, self.hidden = channels, hidden
        self.groups = channel_groups(channels, groups)
        inputs = 2 * channels + 1  # known latents, which of them are known, log Δ
        self.nets = nn.ModuleList(
            self._pass_network(inputs, hidden, 2 * (end - start)) for start, end in self.groups for _phase in (0, 1)
        )

    @staticmethod
    def _pass_network(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
        net = nn.Sequential(
            nn.Conv2d(inputs, hidden, 5, padding=2), nn.LeakyReLU(0.1),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(hidden, outputs, 1),
        )
        nn.init.zeros_(net[-1].weight)  # start at N(0, 1): the unit-variance latents' own marginal
        nn.init.zeros_(net[-1].bias)
        return net

    @property
    def config(self) -> dict:
        return {"channels": self.channels, "groups": len(self.groups), "hidden": self.hidden}

    def passes(self, h: int, w: int) -> list[CodingPass]:
        anchors = checkerboard(h, w)
        result = []
        for start, end in self.groups:
            for phase in (0, 1):
                known = torch.zeros(self.channels, h, w, dtype=torch.bool)
                known[:start] = True
                target = torch.zeros_like(known)
                if phase == 0:
                    target[start:end] = anchors
                else:
                    known[start:end] = anchors
                    target[start:end] = ~anchors
                result.append(CodingPass((start, end), known, target))
        return result

    def predict(self, index: int, coding_pass: CodingPass, zhat: torch.Tensor, step: torch.Tensor):
        """(mean, scale), each (B, end - start, h, w), of pass `index` from zhat (B, C, h, w) at step (B, 1, 1, 1).
        Only zhat's known entries are read: the decoder, which has nothing else yet, computes the same numbers."""
        known = coding_pass.known.to(zhat.device)[None].expand_as(zhat)
        inputs = torch.cat([torch.where(known, zhat, torch.zeros((), dtype=zhat.dtype)), known.to(zhat.dtype),
                            torch.log(step).expand(-1, 1, *zhat.shape[-2:])], dim=1)
        mean, log_scale = self.nets[index](inputs).chunk(2, dim=1)
        return mean, torch.exp(log_scale.clamp(*LOG_SCALE_RANGE))

    def gaussians(self, zhat: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, scale) of every element of zhat, each from its own pass: teacher forcing, all passes at once."""
        mean, scale = torch.zeros_like(zhat), torch.ones_like(zhat)
        for index, coding_pass in enumerate(self.passes(*zhat.shape[-2:])):
            start, end = coding_pass.channels
            target = coding_pass.target[start:end].to(zhat.device)[None]
            m, s = self.predict(index, coding_pass, zhat, step)
            mean[:, start:end] = torch.where(target, m, mean[:, start:end])
            scale[:, start:end] = torch.where(target, s, scale[:, start:end])
        return mean, scale

    def bin_probability(self, y: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Probability of each symbol of y (B, C, h, w) at step (B, 1, 1, 1)."""
        zhat = y * step
        mean, scale = self.gaussians(zhat, step)
        return gaussian_bin_probability(zhat, step / 2, mean, scale)


def build_network(kind: str, config: dict) -> nn.Module:
    if kind == "factorized":
        return FactorizedModel(**config)
    if kind == "context":
        return ContextModel(**config)
    raise ConfigError(f"entropy model kind {kind!r}: expected one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------------------------
# The file
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ProbabilityModel:
    """A model file loaded for coding: its network in float64 on the CPU (encoder and decoder must compute the
    same probabilities), its metadata, and its identity (16 hex digits)."""

    network: nn.Module
    metadata: dict
    identity: str
    path: str
    transform: LatentTransform | None = None

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def scaling_factor(self) -> float:
        return float(self.metadata["normalisation"]["scaling_factor"])

    @property
    def step_range(self) -> tuple[float, float]:
        return tuple(self.metadata["fit"]["step_range"])

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Codec latent (C, h, w) -> what the model codes: the unit-variance latent the model was fit on (what
        LatentShards.scale returns), through the model's transform when it has one."""
        z = normalise_latents(z, latent_norm(self.metadata["normalisation"]))
        return z if self.transform is None else self.transform.forward(z)

    def denormalise(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of normalise (a transformed latent comes back padded to the transform's multiple)."""
        z = t if self.transform is None else self.transform.inverse(t)
        return denormalise_latents(z, latent_norm(self.metadata["normalisation"]))

    def coded_shape(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The shape of the symbols for a codec latent of `latent_shape` (channels, height, width)."""
        return tuple(latent_shape) if self.transform is None else self.transform.coded_shape(latent_shape)


def model_identity(metadata: dict, tensors: dict[str, torch.Tensor]) -> str:
    """16 hex digits of sha256 over the metadata JSON and each tensor's name and bytes, in name order."""
    h = hashlib.sha256(b"entropy-model")
    h.update(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())  # as stored: float32, the basis float64
    return h.hexdigest()[:16]


def save_model(network: nn.Module, path: str | os.PathLike, *, codec_identity: str, encoder_identity: str | None,
               normalisation: dict, fit: dict, transform: LatentTransform | None = None) -> str:
    """Write the model file atomically; returns its identity. `normalisation`: the shards'
    (LatentShards.normalisation), shift and per-channel statistics included."""
    latent_channels = network.config["channels"] if transform is None else transform.channel_basis.shape[0]
    metadata = {
        "format": FORMAT,
        "kind": network.kind,
        "config": network.config,
        "codec": {"identity": codec_identity, "encoder_identity": encoder_identity},
        "latent_channels": latent_channels,
        # Only the keys set: a global normalisation's metadata, and so the model's identity, is what it always was.
        "normalisation": {k: v for k, v in latent_norm(normalisation).items() if v is not None},
        "fit": fit,
    }
    tensors = {name: t.detach().cpu().float().contiguous() for name, t in network.state_dict().items()}
    if transform is not None:
        metadata["transform"] = {"levels": transform.levels, "spatial": transform.spatial}
        tensors[BASIS_KEY] = transform.channel_basis.cpu().double().contiguous()
    payload = safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    write_bytes_atomically(path, payload)
    return model_identity(metadata, tensors)


def load_model(path: str | os.PathLike) -> ProbabilityModel:
    """Read a model file written by save_model; anything else is an EntropyModelError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise EntropyModelError(f"--model {path}: no such file; fit one with "
                                f"`latent-codec entropy fit --shards <latent shards> --out <folder>`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get(METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise EntropyModelError(f"--model {path}: not a readable safetensors file ({exc})") from None
    try:
        metadata = json.loads(stored) if stored is not None else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise EntropyModelError(f"--model {path}: not an entropy model file of format {FORMAT} (no "
                                f"'{METADATA_KEY}' metadata); fit one with `latent-codec entropy fit`")
    network = build_network(metadata["kind"], metadata["config"])
    weights = {name: t for name, t in tensors.items() if name != BASIS_KEY}
    transform = None
    try:
        network.load_state_dict(weights)
        if "transform" in metadata:
            transform = LatentTransform(tensors[BASIS_KEY], int(metadata["transform"]["levels"]),
                                        metadata["transform"]["spatial"])
            channels = metadata["latent_channels"]
            if (transform.channel_basis.shape[0] != channels
                    or transform.coded_shape((channels, 1, 1))[0] != metadata["config"]["channels"]):
                raise ValueError(f"a {tuple(transform.channel_basis.shape)} channel basis at {transform.levels} "
                                 f"levels for {channels} latent channels and a network of "
                                 f"{metadata['config']['channels']}")
    except (RuntimeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise EntropyModelError(f"--model {path}: its tensors do not fit its own config ({first})") from None
    return ProbabilityModel(network.double().eval().requires_grad_(False), metadata, model_identity(metadata, tensors),
                            str(path), transform)


def check_model_codec(model: ProbabilityModel, codec_identity: str, encoder_identity: str | None) -> None:
    """Refuse a model fit on latents of another encoder: its probabilities describe numbers this codec never makes."""
    made = model.metadata["codec"]
    if codec_mismatch(made["identity"], made.get("encoder_identity"), codec_identity, encoder_identity) is not None:
        raise EntropyModelError(
            f"--model {model.path} was fit on latents of codec {made['identity']}, not of this codec "
            f"{codec_identity} (nor of a decoder-only fine-tune of it, which would share its encoder); fit one on "
            f"shards of this codec: `latent-codec entropy fit --shards <shards it encoded>`"
        )
