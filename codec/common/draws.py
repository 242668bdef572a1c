"""Randomness as a pure function of (purpose, seed, draw number).

Every training example of both trainers is a global draw number; everything random about it (which image or
shard record, its crop and flip, posterior noise, diffusion noise and timestep, caption dropout) comes from a
generator keyed by the draw. So 1 process with batch 8 and 2 processes with batch 4 train on identical
examples, and a resumed run continues with exactly the draws an uninterrupted run would have made.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator

import torch


def keyed_generator(*parts: int | str) -> torch.Generator:
    """A generator seeded by a stable 63-bit hash of `parts`: hashlib rather than hash(), which is salted per
    Python process. Every keyed random choice of the trainers, the shard encoder and the shard reader comes
    from here."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class DrawSampler(torch.utils.data.Sampler[int]):
    """Yields start, start + 1, ... forever: the global draw counter both trainers' datasets are indexed by.

    To resume, start at the number of draws already consumed (the U-Net's checkpoints record it; the codec trainer's
    is steps x global batch size); the run then continues with exactly the examples it would have seen without the
    interruption.
    """

    def __init__(self, start: int = 0):
        if start < 0:
            raise ValueError(f"DrawSampler: start must be >= 0, got {start}")
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)
