"""What an encode is asked to do, besides its codec, data and output folder: a typed config like the trainers'.

`latent-codec shards encode` builds it from the defaults, an optional YAML file (`--config`), `--set key=value`
overrides and, last, its own flags; every field is an argument of codec.shards.encode.encode_dataset of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from codec.common import distributed
from codec.common.config import load_config
from codec.shards.format import CHUNK_BYTES


@dataclass
class EncodeConfig:
    resolution: int = 512
    caption_column: str | None = None
    image_column: str | None = None
    # Records per unit of an image folder or a saved dataset (a tar or a parquet file is one unit whatever its size):
    # the grain of work dealt to processes and of what a re-run redoes.
    unit_size: int = 1000
    batch_size: int = 16
    crop: str = "center"
    flip: str | None = None  # None: swap-left-right with random crops (codec.shards.encode.flip_policy)
    seed: int = 0
    num_workers: int = 2
    write_scaling_factor: bool = False
    limit: int | None = None
    precision: str = "fp32"
    chunk_bytes: int = CHUNK_BYTES  # litdata chunk size: one bucket GET, one cache entry (codec/shards/format.py)
    process_group_timeout_minutes: float = distributed.DEFAULT_TIMEOUT_MINUTES


def load_encode_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> EncodeConfig:
    return load_config(EncodeConfig, path, overrides)
