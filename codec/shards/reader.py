"""Read the latent shards written by codec/shards/encode.py, so diffusion trains without running the encoder.

`LatentShards` gives random access to every record of every shard, memory-mapped through safetensors: a record
costs one small read and nothing is loaded whole, so a dataset larger than memory trains as well as a small
one (the U-Net trainer draws its records through it: diffusion/draws.py). Latents come out in the diffusion
model's space, normalised with the manifest's `normalisation` (exchange.pipeline.normalise_latents: z · scaling_factor,
with the shift or per-channel statistics when the codec has them), measured over the whole encoded dataset on the
latents sampled from the posterior (docs/shards.md).
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path

import torch
from safetensors import safe_open

from codec.common.config import ConfigError
from codec.common.precision import sample_gaussian
from codec.exchange.pipeline import denormalise_latents, latent_norm, normalise_latents
from codec.shards.format import read_manifest, read_shard_header


def codec_mismatch(made_codec: str, made_encoder: str | None, codec: str, encoder: str | None) -> str | None:
    """Why latents made by (made_codec, made_encoder) do not belong to the codec (codec, encoder), or None when
    they do: the same codec, or one with the same encoder identity (a decoder-only fine-tune of it, whose latents
    are bit-identical). Shards written before encoder identities were recorded (made_encoder None) match only
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


class LatentShards(torch.utils.data.Dataset):
    """Random access to all records of all shards in manifest order.

    `dataset[i]` -> {"mean", "logvar": float32 (C, h, w) unscaled posterior parameters, "caption", "id",
    "index": the record's row in the source dataset}. `latents(i)` is the scaled sample the diffusion model
    trains on. `verify_codec`: a codec identity (codec.network.model.codec_identity), with `verify_encoder` its encoder
    identity (codec.network.model.encoder_identity); shards made by another codec are refused unless it has the same
    encoder (see codec_mismatch).
    """

    def __init__(self, shards_dir: str | os.PathLike, verify_codec: str | None = None,
                 verify_encoder: str | None = None):
        self.shards_dir = Path(shards_dir)
        self.manifest = read_manifest(shards_dir)
        identity = self.manifest["codec"]["identity"]
        # None in shards written before encoder identities were recorded.
        self.encoder_identity = self.manifest["codec"].get("encoder_identity")
        if verify_codec is not None:
            refusal = codec_mismatch(identity, self.encoder_identity, verify_codec, verify_encoder)
            if refusal is not None:
                raise ConfigError(f"{shards_dir} was {refusal}")  # a ValueError: one line and exit 2 in the CLIs
        # Manifests written before shards recorded a normalisation scaled by scaling_factor alone.
        self.normalisation = latent_norm(self.manifest.get("normalisation")
                                         or {"scaling_factor": self.manifest["scaling_factor"]})
        self.scaling_factor = float(self.normalisation["scaling_factor"])
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
                    f"`latent-codec shards verify --shards {shards_dir}` and re-encode the damaged shards"
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
        """Normalised latent of record i: normalise(mean + exp(logvar / 2) * eps), or normalise(mean)."""
        record = self[i]
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
