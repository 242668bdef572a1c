"""The latent store: a dataset encoded once by the frozen codec, so the U-Net trains without the encoder.

    location.py a local folder or a bucket URL, with whole-or-absent writes
    format.py   the store: litdata chunks and a commit record per input unit, litdata's index, our manifest
    encode.py   images -> store (`latent-codec shards encode`): units dealt round-robin, resumable, N = 1 process
    verify.py   store -> a list of problems (`latent-codec shards verify`)
    reader.py   store -> records and scaled latents for the U-Net trainer (LatentShards)
    convert.py  safetensors shards of earlier versions -> a store (`latent-codec shards convert`)
"""

from codec.shards.format import read_manifest
from codec.shards.reader import LatentShards

__all__ = ["LatentShards", "read_manifest"]
