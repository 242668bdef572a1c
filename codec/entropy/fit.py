"""Fit a probability model on latent shards: the bits it assigns to quantised latents, minimised.

Each step draws a batch of records, normalises their posterior means as the shards' reader does
(LatentShards.scale), draws one step Δ per record log-uniformly from the configured range (so one model serves
every Δ of that range), quantises y = round(z / Δ) and minimises the mean of -log2 p(y) over the latent elements:
the rate a file would pay, which is the discretised likelihood of the data. The context model sees the other
symbols exactly as the decoder will (teacher forcing: ẑ = yΔ of the decoded passes), all passes in one forward.

With a transform (transform.py) the model is fit on, and codes, the coefficients: the channel basis is measured
first on up to BASIS_RECORDS records of the shards, then every batch is transformed before it is quantised.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from codec.common.config import ConfigError, check_choice
from codec.entropy.discrete import bits
from codec.entropy.models import KINDS, build_network, save_model
from codec.entropy.transform import SPATIAL, LatentTransform, fit_channel_basis
from codec.shards.reader import LatentShards

BASIS_RECORDS = 4096  # enough for a C x C covariance; bounded so a large dataset is not read twice
CHANNEL_BASES = ("identity", "klt")


@dataclass
class FitSettings:
    kind: str = "context"
    max_steps: int = 2000
    batch_size: int = 16
    lr: float = 3e-3
    delta_min: float = 1 / 16  # Δ range in normalised (unit-variance) latent units
    delta_max: float = 2.0
    components: int = 3  # factorized: logistics per channel
    groups: int = 4  # context: channel groups (at most the latent channels)
    hidden: int = 32  # context: width of each pass's network
    channel_basis: str = "identity"  # identity | klt: code the channels as they are, or rotated to their KLT basis
    spatial: str = "dct"  # haar | dct: the orthonormal transform of 2^levels x 2^levels blocks
    levels: int = 0  # block size 2^levels of the spatial transform (0: none)
    seed: int = 0
    log_every: int = 100

    def check(self) -> None:
        check_choice("--kind", self.kind, KINDS)
        check_choice("--channel-basis", self.channel_basis, CHANNEL_BASES)
        check_choice("--spatial", self.spatial, SPATIAL)
        if not 0 <= self.levels <= 4:
            raise ConfigError(f"--levels: expected 0 to 4, got {self.levels}")
        if not 0 < self.delta_min <= self.delta_max:
            raise ConfigError(f"Δ range: need 0 < delta_min <= delta_max, got {self.delta_min}, {self.delta_max}")
        if self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("max_steps and batch_size must be >= 1 and lr > 0")


def network_for(settings: FitSettings, channels: int):
    if settings.kind == "factorized":
        return build_network("factorized", {"channels": channels, "components": settings.components})
    return build_network("context", {"channels": channels, "groups": min(settings.groups, channels),
                                     "hidden": settings.hidden})


def latent_transform(shards: LatentShards, settings: FitSettings, generator: torch.Generator) -> LatentTransform | None:
    """The transform the settings ask for, its channel basis measured on the shards; None for none."""
    if settings.channel_basis == "identity" and settings.levels == 0:
        return None
    channels = int(shards.manifest["latent_shape"][0])
    if settings.channel_basis == "identity":
        return LatentTransform(torch.eye(channels, dtype=torch.float64), settings.levels, settings.spatial)
    rows = torch.randperm(len(shards), generator=generator)[:BASIS_RECORDS].tolist()
    z = torch.stack([shards.scale(shards[i]["mean"]).double() for i in sorted(rows)])
    return LatentTransform(fit_channel_basis(z), settings.levels, settings.spatial)


def draw_batch(shards: LatentShards, settings: FitSettings, generator: torch.Generator,
               transform: LatentTransform | None = None):
    """(y, Δ): quantised normalised posterior means of a random batch (through `transform` when given), each at
    its own random step."""
    rows = torch.randint(len(shards), (settings.batch_size,), generator=generator).tolist()
    z = torch.stack([shards.scale(shards[i]["mean"]) for i in rows])
    if transform is not None:
        z = transform.forward(z).float()
    low, high = math.log(settings.delta_min), math.log(settings.delta_max)
    step = torch.exp(low + (high - low) * torch.rand(len(rows), 1, 1, 1, generator=generator))
    return torch.round(z / step), step


def fit_entropy_model(shards_dir: str | os.PathLike, out: str | os.PathLike, settings: FitSettings,
                      log: Callable[[str], None] = print) -> str:
    """Fit the model `settings` describes on the shards and write it to the file `out` (its folder created);
    returns the model's identity."""
    settings.check()
    shards = LatentShards(shards_dir)
    if len(shards) == 0:
        raise ConfigError(f"--shards {shards_dir}: holds no records")
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    transform = latent_transform(shards, settings, generator)
    latent_shape = tuple(int(n) for n in shards.manifest["latent_shape"])
    coded = latent_shape if transform is None else transform.coded_shape(latent_shape)
    if transform is not None:
        log(f"coding through a {settings.channel_basis} channel basis and a {settings.spatial} of "
            f"{2 ** settings.levels}x{2 ** settings.levels} blocks: "
            f"latents {latent_shape} -> coefficients {coded}")
    network = network_for(settings, coded[0]).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.lr)
    recent = []
    for step in range(settings.max_steps):
        for group in optimizer.param_groups:  # cosine decay to a tenth: the last steps settle instead of jitter
            group["lr"] = settings.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / settings.max_steps)))
        y, delta = draw_batch(shards, settings, generator, transform)
        loss = bits(network.bin_probability(y, delta)).mean()  # bits per latent element
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent = (recent + [loss.item()])[-settings.log_every:]
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.max_steps:
            log(f"step {step + 1}/{settings.max_steps}: {sum(recent) / len(recent):.4f} bits per latent element")
    codec = shards.manifest["codec"]
    fit = {**dataclasses.asdict(settings), "step_range": [settings.delta_min, settings.delta_max],
           "shards": str(shards_dir), "records": len(shards), "final_bits_per_element": sum(recent) / len(recent)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # only now: a refused fit leaves no folder behind
    return save_model(network.eval(), out, codec_identity=codec["identity"],
                      encoder_identity=codec.get("encoder_identity"), normalisation=shards.normalisation, fit=fit,
                      transform=transform)
