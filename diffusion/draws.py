"""Training examples for the U-Net as a pure function of (seed, global draw number).

A draw fixes everything random about one training example: which shard record it reads (a seeded permutation
per epoch), the posterior sample z = mean + exp(logvar/2) * eps, the diffusion noise, the timestep and whether
its caption is dropped. So, as in the codec's trainer (codec.data.TrainCrops + DrawSampler), 1 process with
batch 8 and 2 processes with batch 4 train on identical examples, and a resumed run continues with exactly the
draws an uninterrupted run would have made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from codec.common.draws import keyed_generator
from codec.shards import LatentShards
from codec.shards.format import read_shard_header
from diffusion.config import DiffusionConfig


def shard_captions(shards: LatentShards) -> list[str]:
    """Every record's caption in record order, from the shard headers alone (no latent is read)."""
    return [
        caption
        for entry in shards.manifest["shards"]
        for caption in read_shard_header(Path(shards.shards_dir) / entry["file"])["captions"]
    ]


class TrainingDraws(torch.utils.data.Dataset):
    """Draw number -> {"latents" (scaled), "noise", "timestep", "drop_caption", "caption", "draw"}.

    Each random quantity has its own generator keyed by (purpose, seed, draw), so changing one (say, turning
    posterior sampling off) leaves the others as they were."""

    def __init__(self, shards: LatentShards, cfg: DiffusionConfig, seed: int):
        if len(shards) == 0:
            raise ValueError(f"{shards.shards_dir}: the shards hold no records; encode a dataset with images first")
        self.shards, self.cfg, self.seed = shards, cfg, seed
        self.captions = shard_captions(shards)
        self._cached_perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return 2**62  # the draw space is unbounded; DrawSampler decides what is drawn

    def record(self, draw: int) -> int:
        """The shard record draw `draw` reads: every record once per epoch, in an order seeded per epoch."""
        epoch, position = divmod(int(draw), len(self.shards))
        if self._cached_perm is None or self._cached_perm[0] != epoch:
            perm = torch.randperm(len(self.shards), generator=keyed_generator("perm", self.seed, epoch)).tolist()
            self._cached_perm = (epoch, perm)
        return self._cached_perm[1][position]

    def __getitem__(self, draw: int) -> dict:
        draw = int(draw)
        index = self.record(draw)
        latents = self.shards.latents(index, keyed_generator("posterior", self.seed, draw), self.cfg.sample_posterior)
        noise = torch.randn(latents.shape, generator=keyed_generator("noise", self.seed, draw))
        timestep = torch.randint(self.cfg.num_train_timesteps, (),
                                 generator=keyed_generator("timestep", self.seed, draw))
        drop = torch.rand((), generator=keyed_generator("dropout", self.seed, draw)) < self.cfg.caption_dropout
        return {
            "latents": latents,
            "noise": noise,
            "timestep": timestep,
            "drop_caption": drop,
            "caption": self.captions[index],
            "draw": torch.tensor(draw, dtype=torch.int64),
        }


@dataclass
class EvalSet:
    """Fixed examples for the denoising loss that validation reports: posterior means (no sampling), noise keyed
    by ("eval", seed, k), timesteps spread evenly over the schedule (a stratified estimate: far less variance
    between evaluations than random timesteps), captions kept. The same numbers at every evaluation."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    captions: list[str]


def eval_set(shards: LatentShards, count: int, num_train_timesteps: int, seed: int,
             timesteps: list[int] | None = None, scale: LatentShards | None = None) -> EvalSet:
    """`count` records of `shards` (cycled when it holds fewer), scaled like `scale`'s latents (default: their own
    manifest's factor; held-out shards take the training shards', the space the U-Net learned). With `timesteps`,
    every record at each of them (count x len(timesteps) items, the same noise for a record at every t)."""
    scale = shards if scale is None else scale
    indices = [k % len(shards) for k in range(count)]
    latents = torch.stack([scale.scale(shards[i]["mean"]) for i in indices])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=keyed_generator("eval", seed, k))
                         for k in range(count)])
    captions = shard_captions(shards)
    captions = [captions[i] for i in indices]
    if not timesteps:
        spread = ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count).long()
        return EvalSet(latents, noise, spread, captions)
    repeat = len(timesteps)
    at = torch.tensor(timesteps, dtype=torch.long).repeat_interleave(count)
    return EvalSet(latents.repeat(repeat, 1, 1, 1), noise.repeat(repeat, 1, 1, 1), at, captions * repeat)
