"""Latent shards: a dataset encoded once by the frozen codec, so the U-Net trains without the encoder.

    format.py   the files: one safetensors shard per block of dataset indices + manifest.json
    encode.py   images -> shards (`latent-codec shards encode`): resumable, identical for 1 or N processes
    verify.py   shards -> a list of problems (`latent-codec shards verify`)
    reader.py   shards -> records and scaled latents for the U-Net trainer (LatentShards)
"""

from codec.shards.format import read_manifest
from codec.shards.reader import LatentShards

__all__ = ["LatentShards", "read_manifest"]
