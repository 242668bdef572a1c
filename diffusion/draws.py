"""Training examples for the U-Net as a pure function of (seed, global draw number).

A draw fixes everything random about one training example: which record it reads (a seeded, chunk-local order
per epoch: EpochOrder), the posterior sample z = mean + exp(logvar/2) * eps, the diffusion noise, the timestep and
whether its caption is dropped. So, as in the codec's trainer (codec.data.TrainCrops + DrawSampler), 1 process with
batch 8 and 2 processes with batch 4 train on identical examples, and a resumed run continues with exactly the
draws an uninterrupted run would have made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from codec.common.draws import keyed_generator
from codec.shards import LatentShards
from diffusion.config import DiffusionConfig


class EpochOrder:
    """Position in the draw stream -> record index: every record exactly once per epoch, chunk by chunk.

    A latent store is read a chunk at a time (a bucket store downloads whole chunks into a size-limited cache), so
    an order that jumps to a random record at every draw would fetch a chunk per record. Instead, per epoch (keyed
    by seed and epoch): the chunks are permuted; consecutive chunks of that order are grouped into windows of
    `shuffle_chunks`; the records of each window are permuted. A batch then mixes records of `shuffle_chunks`
    chunks, and readers need only the current window's chunks. This is MosaicML Streaming's py1b (shards
    permuted, then samples shuffled within fixed-size blocks), with blocks of whole chunks so that no chunk is
    needed by two windows.

    Memory is O(chunks + records per window): the chunk order and window boundaries of the current epoch, and the
    permuted records of the current window only (computed when first needed). Nothing per record of the dataset.
    `chunk_sizes[c]` is the number of records of chunk c; its records are the consecutive indices from
    chunk_sizes[:c].sum()."""

    def __init__(self, chunk_sizes, seed: int, shuffle_chunks: int):
        sizes = np.asarray(chunk_sizes, dtype=np.int64)
        if sizes.ndim != 1 or sizes.size == 0 or (sizes < 0).any() or sizes.sum() == 0:
            raise ValueError(f"EpochOrder: chunk_sizes must be a non-empty list of record counts >= 0 with at least "
                             f"one record, got {sizes.size} chunks")
        if shuffle_chunks < 1:
            raise ValueError(f"EpochOrder: shuffle_chunks must be >= 1, got {shuffle_chunks}")
        self.sizes, self.seed, self.shuffle_chunks = sizes, int(seed), int(shuffle_chunks)
        self.firsts = np.cumsum(sizes) - sizes  # each chunk's first record
        self.records = int(sizes.sum())
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, chunk order, window ends)
        self._window: tuple[int, int, np.ndarray] | None = None  # (epoch, window, its records in draw order)

    def __len__(self) -> int:
        return self.records

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(the epoch's chunk order, the draw position at which each window ends, exclusive)."""
        if self._epoch is None or self._epoch[0] != epoch:
            chunks = torch.randperm(len(self.sizes), generator=keyed_generator("chunks", self.seed, epoch)).numpy()
            ends = np.cumsum(self.sizes[chunks])
            last = np.arange(self.shuffle_chunks - 1, len(chunks) + self.shuffle_chunks - 1, self.shuffle_chunks)
            self._epoch = (epoch, chunks, ends[np.minimum(last, len(chunks) - 1)])
        return self._epoch[1], self._epoch[2]

    def window_records(self, epoch: int, window: int) -> np.ndarray:
        """The records of one window of one epoch, in the order the draws read them."""
        if self._window is None or self._window[:2] != (epoch, window):
            chunks, _ = self.epoch_plan(epoch)
            members = chunks[window * self.shuffle_chunks : (window + 1) * self.shuffle_chunks]
            records = np.concatenate([np.arange(self.firsts[c], self.firsts[c] + self.sizes[c]) for c in members])
            shuffle = torch.randperm(len(records), generator=keyed_generator("window", self.seed, epoch, window))
            self._window = (epoch, window, records[shuffle.numpy()])
        return self._window[2]

    def window_of(self, draw: int) -> tuple[int, int, int]:
        """(epoch, window, position within the window) of a draw."""
        epoch, position = divmod(int(draw), self.records)
        _, ends = self.epoch_plan(epoch)
        window = int(np.searchsorted(ends, position, side="right"))  # empty windows (all-empty chunks) are skipped
        return epoch, window, position - (int(ends[window - 1]) if window else 0)

    def __getitem__(self, draw: int) -> int:
        epoch, window, position = self.window_of(draw)
        return int(self.window_records(epoch, window)[position])


class TrainingDraws(torch.utils.data.Dataset):
    """Draw number -> {"latents" (scaled), "noise", "timestep", "drop_caption", "caption", "draw"}.

    Each random quantity has its own generator keyed by (purpose, seed, draw), so changing one (say, turning
    posterior sampling off) leaves the others as they were. The caption is read with its record, so nothing per
    record is held here."""

    def __init__(self, shards: LatentShards, cfg: DiffusionConfig, seed: int, shuffle_chunks: int):
        if len(shards) == 0:
            raise ValueError(f"{shards.shards_dir}: the shards hold no records; encode a dataset with images first")
        self.shards, self.cfg, self.seed = shards, cfg, seed
        self.order = EpochOrder(shards.chunk_sizes, seed, shuffle_chunks)  # the reader checked they sum to len

    def __len__(self) -> int:
        return 2**62  # the draw space is unbounded; DrawSampler decides what is drawn

    def record(self, draw: int) -> int:
        """The record draw `draw` reads (EpochOrder)."""
        return self.order[draw]

    def __getitem__(self, draw: int) -> dict:
        draw = int(draw)
        record = self.shards[self.record(draw)]
        latents = self.shards.sample_latents(record, keyed_generator("posterior", self.seed, draw),
                                             self.cfg.sample_posterior)
        noise = torch.randn(latents.shape, generator=keyed_generator("noise", self.seed, draw))
        timestep = torch.randint(self.cfg.num_train_timesteps, (),
                                 generator=keyed_generator("timestep", self.seed, draw))
        drop = torch.rand((), generator=keyed_generator("dropout", self.seed, draw)) < self.cfg.caption_dropout
        return {
            "latents": latents,
            "noise": noise,
            "timestep": timestep,
            "drop_caption": drop,
            "caption": record["caption"],
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
    records = [shards[k % len(shards)] for k in range(count)]
    latents = torch.stack([scale.scale(record["mean"]) for record in records])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=keyed_generator("eval", seed, k))
                         for k in range(count)])
    captions = [record["caption"] for record in records]
    if not timesteps:
        spread = ((torch.arange(count, dtype=torch.float64) + 0.5) * num_train_timesteps / count).long()
        return EvalSet(latents, noise, spread, captions)
    repeat = len(timesteps)
    at = torch.tensor(timesteps, dtype=torch.long).repeat_interleave(count)
    return EvalSet(latents.repeat(repeat, 1, 1, 1), noise.repeat(repeat, 1, 1, 1), at, captions * repeat)
