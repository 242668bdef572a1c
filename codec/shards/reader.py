"""Read a latent store written by codec/shards/encode.py, local or in a bucket, so diffusion trains without the
encoder.

`LatentShards` gives random access to every record through litdata's StreamingDataset on a local folder: a local
store is read in place; a bucket store's chunks are downloaded whole, on first use, into a local mirror bounded
by `max_cache_size` (least recently used chunks evicted; `ChunkCache`). Nothing per record is held in memory: ids
and captions live in the chunks, and what the trainer needs to order its reads (records per chunk) is one small
array. Reading is cheap when nearby records are read together (diffusion/draws.py orders an epoch chunk by chunk
for this).

Why our own chunk cache and not litdata's: litdata's random access to a bucket fetches each record with its own
range GET (one request per record, ~64 KB each for SD-sized latents), and its chunk cache deletes a chunk as soon
as a sequential reader moves past it, which a shuffled window of chunks would download again and again; its fast
client (obstore) also refused the plain-http endpoints of MinIO and of the tests' local S3 in 0.2.76.

Latents come out in the diffusion model's space, normalised with the manifest's `normalisation`
(exchange.pipeline.normalise_latents: z · scaling_factor, with the shift or per-channel statistics when the codec
has them), measured over the whole encoded dataset on latents sampled from the posterior (docs/shards.md).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch
from litdata.utilities.format import _convert_bytes_to_int

from codec.common.config import ConfigError
from codec.common.precision import sample_gaussian
from codec.exchange.pipeline import denormalise_latents, latent_norm, normalise_latents
from codec.shards.format import INDEX, chunk_sizes, content_digest, read_manifest
from codec.shards.location import Location

# Where a bucket store's chunks are cached, unless the caller names a folder: $LATENT_CODEC_STORE_CACHE, else
# ~/.cache/latent-codec/stores; one sub-folder per store URL.
CACHE_VARIABLE = "LATENT_CODEC_STORE_CACHE"
DEFAULT_CACHE_SIZE = "10GB"


def codec_mismatch(made_codec: str, made_encoder: str | None, codec: str, encoder: str | None) -> str | None:
    """Why latents made by (made_codec, made_encoder) do not belong to the codec (codec, encoder), or None when
    they do: the same codec, or one with the same encoder identity (a decoder-only fine-tune of it, whose latents
    are bit-identical). Latents written before encoder identities were recorded (made_encoder None) match only
    their own codec."""
    if codec == made_codec or (made_encoder is not None and encoder == made_encoder):
        return None
    if made_encoder is None:
        return (f"encoded by codec {made_codec}, not by codec {codec}, and written before shards recorded encoder "
                f"identities (a decoder-only fine-tune cannot be recognised). Re-encode with "
                f"`latent-codec shards encode --codec <yours>`")
    theirs = f" (encoder {encoder})" if encoder is not None else ""
    return (f"encoded by codec {made_codec} (encoder {made_encoder}), not by codec {codec}{theirs}: its "
            f"latents mean nothing to the other codec's decoder. Use the codec that made them or a decoder-only "
            f"fine-tune of it (train.trainable: decoder), or re-encode with "
            f"`latent-codec shards encode --codec <yours>`")


class ChunkCache:
    """Whole chunks of a bucket store in a local folder, downloaded on first use; beyond `max_bytes`, the least
    recently used are deleted. Several processes may share the folder: a download lands under a temp name and is
    renamed, and a reader that finds its chunk evicted by a neighbour downloads it again (LatentShards)."""

    def __init__(self, store: Location, folder: str, chunk_files: list[str], max_bytes: int):
        self.store, self.folder, self.chunk_files, self.max_bytes = store, folder, chunk_files, max_bytes
        self._current: int | None = None

    def path(self, chunk: int) -> str:
        return os.path.join(self.folder, self.chunk_files[chunk])

    def ensure(self, chunk: int, again: bool = False) -> None:
        """Chunk `chunk` is in the folder (a chunk read again is marked as recently used)."""
        if chunk == self._current and not again:
            return
        path = self.path(chunk)
        if again or not os.path.exists(path):
            self.store.get(self.chunk_files[chunk], path)
            self._evict(keep=path)
        else:
            os.utime(path)  # recently used
        self._current = chunk

    def _evict(self, keep: str) -> None:
        chunks = []
        for entry in os.scandir(self.folder):
            if entry.name.startswith("chunk-") and entry.name.endswith(".bin"):
                stat = entry.stat()
                chunks.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in chunks)
        for _, size, path in sorted(chunks):
            if total <= self.max_bytes:
                break
            if path != keep:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass  # another process evicted it first
                total -= size


class LatentShards(torch.utils.data.Dataset):
    """Random access to all records of a latent store, in store order (units in input order).

    `dataset[i]` -> {"mean", "logvar": float32 (C, h, w) unscaled posterior parameters, "caption", "id", "unit",
    "row": where the record came from in the input, "original_size", "resized_size": (height, width), "crop_box":
    (left, top, right, bottom), "flip"}. `latents(i)` is the scaled sample the diffusion model
    trains on. `verify_codec`: a codec identity (codec.network.model.codec_identity), with `verify_encoder` its
    encoder identity (codec.network.model.encoder_identity); a store made by another codec is refused unless it
    has the same encoder (see codec_mismatch). `cache_dir`, `max_cache_size`: where and how much of a bucket
    store is kept locally (a local store is read in place).
    """

    def __init__(self, shards_dir: str | os.PathLike, verify_codec: str | None = None,
                 verify_encoder: str | None = None, cache_dir: str | None = None,
                 max_cache_size: str = DEFAULT_CACHE_SIZE):
        self.location = Location(shards_dir)
        self.shards_dir = str(self.location)
        self.manifest = read_manifest(self.location)
        identity = self.manifest["codec"]["identity"]
        self.encoder_identity = self.manifest["codec"].get("encoder_identity")
        if verify_codec is not None:
            refusal = codec_mismatch(identity, self.encoder_identity, verify_codec, verify_encoder)
            if refusal is not None:
                raise ConfigError(f"{shards_dir} was {refusal}")  # a ValueError: one line and exit 2 in the CLIs
        self.normalisation = latent_norm(self.manifest["normalisation"])
        self.scaling_factor = float(self.normalisation["scaling_factor"])
        self.chunk_sizes = chunk_sizes(self.manifest)
        self._count = int(self.manifest["count"])
        if int(self.chunk_sizes.sum()) != self._count:
            raise ValueError(f"{self.location.join('manifest.json')}: its units list {int(self.chunk_sizes.sum())} "
                             f"records but its count is {self._count}; run `latent-codec shards verify --shards "
                             f"{shards_dir}`")
        self._chunk_starts = np.concatenate([[0], np.cumsum(self.chunk_sizes)])
        self._cache = None
        if self.location.remote:
            # One mirror folder per store URL and content: a store re-encoded at the same URL gets a fresh one.
            chunks = [chunk for unit in self.manifest["units"] for chunk in unit["chunks"]]
            content = content_digest(c["sha256"] for c in chunks)
            root = cache_dir or os.environ.get(CACHE_VARIABLE) or os.path.join(
                os.path.expanduser("~"), ".cache", "latent-codec", "stores")
            folder = os.path.join(root, hashlib.sha256(self.shards_dir.encode()).hexdigest()[:16], content)
            self._cache = ChunkCache(self.location, folder, [c["file"] for c in chunks],
                                     _convert_bytes_to_int(max_cache_size))
        self._stream = None
        self._stream_pid = None

    def __len__(self) -> int:
        return self._count

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_stream"] = None  # each worker process opens its own reader
        return state

    def _records(self):
        """litdata's dataset over the local store or the bucket store's mirror, opened on first use in each
        process (a forked worker opens its own)."""
        if self._stream is None or self._stream_pid != os.getpid():
            from litdata import StreamingDataset

            folder = self.shards_dir
            if self._cache is not None:
                folder = self._cache.folder
                os.makedirs(folder, exist_ok=True)
                if not os.path.exists(os.path.join(folder, INDEX)):
                    self.location.get(INDEX, os.path.join(folder, INDEX))
            # batch_decode=0: decode only the record asked for. litdata's default decodes a window of 256 around
            # it, which costs 2.5 ms per random read here instead of 0.05 ms.
            # Random access by global record number: litdata's len() is a per-rank share under torch.distributed,
            # its [i] is not, and its own rank split and shuffling are not used (diffusion/draws.py orders reads).
            self._stream = StreamingDataset(folder, batch_decode=0)
            self._stream_pid = os.getpid()
        return self._stream

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"record {i} is out of range for {n} records in {self.shards_dir}")
        i %= n
        records = self._records()
        if self._cache is None:
            item = records[i]
        else:
            chunk = int(np.searchsorted(self._chunk_starts, i, side="right")) - 1
            self._cache.ensure(chunk)
            try:
                item = records[i]
            except (FileNotFoundError, RuntimeError):  # evicted by another process between ensure and read
                self._cache.ensure(chunk, again=True)
                item = records[i]
        return {
            "mean": torch.from_numpy(np.asarray(item["mean"], dtype=np.float32)),
            "logvar": torch.from_numpy(np.asarray(item["logvar"], dtype=np.float32)),
            "caption": item["caption"],
            "id": item["id"],
            "unit": int(item["unit"]),
            "row": int(item["row"]),
            "original_size": tuple(int(v) for v in item["original_size"]),
            "resized_size": tuple(int(v) for v in item["resized_size"]),
            "crop_box": tuple(int(v) for v in item["crop_box"]),
            "flip": bool(item["flip"]),
        }

    def latents(self, i: int, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Normalised latent of record i: normalise(mean + exp(logvar / 2) * eps), or normalise(mean)."""
        return self.sample_latents(self[i], generator, sample)

    def sample_latents(self, record: dict, generator: torch.Generator | None = None,
                       sample: bool = True) -> torch.Tensor:
        """`latents` of a record already read (`self[i]`), so a caller that needs its caption too reads it once."""
        z = record["mean"]
        if sample:
            z = sample_gaussian(z, record["logvar"], torch.randn(z.shape, generator=generator))
        return self.scale(z)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Codec latents -> the unit-variance space the diffusion model works in."""
        return normalise_latents(z, self.normalisation)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of scale: what the codec's decoder takes."""
        return denormalise_latents(z, self.normalisation)
