"""Read the latent shards written by codec/encode_dataset.py, so diffusion trains without running the encoder.

Two readers over the same files, both memory-mapped through safetensors (a record costs one small read; nothing
is loaded whole):

- `LatentShards`: map-style random access to every record of every shard.
- `StreamingLatentShards`: an iterable for training that shuffles shard order and the records within each shard
  by (seed, epoch), and splits the records over processes and DataLoader workers.

Both return latents in the diffusion model's space, z * scaling_factor, where scaling_factor comes from the
manifest: 1 / std of the latents sampled from the posterior over the whole encoded dataset (docs/shards.md).
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import torch
from safetensors import safe_open

from codec.data import keyed_generator
from codec.shards import read_manifest as _read_manifest
from codec.shards import read_shard_header

__all__ = ["LatentShards", "StreamingLatentShards", "read_manifest"]


def read_manifest(shards_dir: str | os.PathLike) -> dict:
    """<shards_dir>/manifest.json as a dict; a clear error when it is missing (the encode has not finished) or
    unreadable."""
    return _read_manifest(shards_dir)


class LatentShards(torch.utils.data.Dataset):
    """Random access to all records of all shards in manifest order.

    `dataset[i]` -> {"mean", "logvar": float32 (C, h, w) unscaled posterior parameters, "caption", "id",
    "index": the record's row in the source dataset}. `latents(i)` is the scaled sample the diffusion model
    trains on. `verify_codec`: a codec identity (codec.model.codec_identity); refuse shards made by another.
    """

    def __init__(self, shards_dir: str | os.PathLike, verify_codec: str | None = None):
        self.shards_dir = Path(shards_dir)
        self.manifest = read_manifest(shards_dir)
        identity = self.manifest["codec"]["identity"]
        if verify_codec is not None and verify_codec != identity:
            raise ValueError(
                f"{shards_dir} was encoded by codec {identity}, not by codec {verify_codec}: its latents mean nothing "
                f"to a model of the other codec. Re-encode the dataset with scripts/encode_dataset.py --codec <yours>"
            )
        self.scaling_factor = float(self.manifest["scaling_factor"])
        self._files: list[Path] = []
        self._starts: list[int] = []
        self._ids: list[str] = []
        self._captions: list[str] = []
        for entry in self.manifest["shards"]:
            path = self.shards_dir / entry["file"]
            header = read_shard_header(path)
            if header["records"] != entry["records"]:
                raise ValueError(
                    f"{path} holds {header['records']} records but the manifest says {entry['records']}; run "
                    f"`scripts/encode_dataset.py verify {shards_dir}` and re-encode the damaged shards"
                )
            self._starts.append(len(self._ids))
            self._files.append(path)
            self._ids.extend(header["ids"])
            self._captions.extend(header["captions"])
        self._handles: dict[int, object] = {}
        self._handles_pid = os.getpid()

    def __len__(self) -> int:
        return len(self._ids)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not travel to worker processes; each reopens its own
        return state

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} is out of range for {n} records in {self.shards_dir}")
        i = i % n
        shard = bisect.bisect_right(self._starts, i) - 1
        return shard, i - self._starts[shard]

    def _handle(self, shard: int):
        if self._handles_pid != os.getpid():  # a forked worker: the parent's handles are not ours to share
            self._handles, self._handles_pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self._files[shard]), framework="pt")
        return self._handles[shard]

    def _row(self, shard: int, row: int, name: str) -> torch.Tensor:
        return self._handle(shard).get_slice(name)[row : row + 1][0]

    def __getitem__(self, i: int) -> dict:
        shard, row = self._locate(int(i))
        position = self._starts[shard] + row
        return {
            "mean": self._row(shard, row, "mean").float(),
            "logvar": self._row(shard, row, "logvar").float(),
            "caption": self._captions[position],
            "id": self._ids[position],
            "index": int(self._row(shard, row, "index")),
        }

    def latents(self, i: int, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Scaled latent of record i: (mean + exp(logvar / 2) * eps) * scaling_factor, or mean * scaling_factor."""
        record = self[i]
        z = record["mean"]
        if sample:
            z = z + torch.exp(0.5 * record["logvar"]) * torch.randn(z.shape, generator=generator)
        return self.scale(z)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Codec latents -> the unit-variance space the diffusion model works in."""
        return z * self.scaling_factor

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of scale: what the codec's decoder takes."""
        return z / self.scaling_factor


def _process_split(process_index: int | None, num_processes: int | None) -> tuple[int, int]:
    """Defaults from accelerate. cpu=True on a GPU-less multi-process launch, else accelerate would report one
    process and every process would read every record."""
    if process_index is None or num_processes is None:
        from codec.distributed import process_state

        state = process_state("every process would read every record; or pass process_index and num_processes")
        process_index = state.process_index if process_index is None else process_index
        num_processes = state.num_processes if num_processes is None else num_processes
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} must be in [0, num_processes={num_processes})")
    return process_index, num_processes


class StreamingLatentShards(torch.utils.data.IterableDataset):
    """Training stream: yields {"latents": scaled float32 (C, h, w), "caption", "id"}, each record once per epoch.

    Order of an epoch (a pure function of seed and epoch): the shards in a shuffled order, and within each shard its
    records in a shuffled order; `shuffle=False` keeps manifest order. That sequence of positions is dealt out
    like cards: process p takes positions p, p + P, p + 2P, ... (P processes), and DataLoader worker w of W in
    that process takes every W-th of those. So every record is read exactly once per epoch overall, with no
    padding or duplicates, and when records do not divide evenly the shares differ by at most one record:
    `len(self)` is this process's share. A DDP trainer must not let processes run different numbers of steps;
    count steps (iterate endlessly, calling set_epoch at each new epoch) or stop every process at the smallest
    share. Do not pass the DataLoader through `accelerator.prepare`, which would split it a second time.

    With sample_posterior, eps is drawn from a generator keyed by (seed, epoch, record), so a record's latent
    depends neither on the process/worker layout nor on restarts. `set_epoch` writes to shared memory, so it
    reaches DataLoader workers even with persistent_workers=True; call it before iterating each epoch.
    """

    def __init__(self, shards_dir: str | os.PathLike, sample_posterior: bool = True, seed: int = 0,
                 shuffle: bool = True, process_index: int | None = None, num_processes: int | None = None):
        super().__init__()
        self.shards = LatentShards(shards_dir)
        self.sample_posterior = sample_posterior
        self.seed = seed
        self.shuffle = shuffle
        self.process_index, self.num_processes = _process_split(process_index, num_processes)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def manifest(self) -> dict:
        return self.shards.manifest

    @property
    def scaling_factor(self) -> float:
        return self.shards.scaling_factor

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        return self.shards.scale(z)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        return self.shards.unscale(z)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(range(self.process_index, len(self.shards), self.num_processes))

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The record positions of one epoch, before they are dealt to processes and workers."""
        counts = [entry["records"] for entry in self.manifest["shards"]]
        starts = torch.tensor([0, *counts]).cumsum(0)[:-1].tolist()
        if not self.shuffle:
            return torch.arange(len(self.shards))
        shard_order = torch.randperm(len(counts), generator=keyed_generator("shards", self.seed, epoch)).tolist()
        return torch.cat([
            torch.randperm(counts[s], generator=keyed_generator("records", self.seed, epoch, s)) + starts[s]
            for s in shard_order
        ] or [torch.zeros(0, dtype=torch.int64)])

    def __iter__(self):
        epoch = self.epoch
        mine = self.epoch_order(epoch)[self.process_index :: self.num_processes]
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            mine = mine[worker.id :: worker.num_workers]
        for i in mine.tolist():
            record = self.shards[i]
            z = record["mean"]
            if self.sample_posterior:
                eps = torch.randn(z.shape, generator=keyed_generator("noise", self.seed, epoch, i))
                z = z + torch.exp(0.5 * record["logvar"]) * eps
            yield {"latents": self.shards.scale(z), "caption": record["caption"], "id": record["id"]}
