"""The latent shard format: one safetensors file per block of dataset indices, written atomically, and the
manifest that lists them.

A shard `shard-00042.safetensors` holds, for N records (N <= shard size; rejected images leave no record):

    mean, logvar     (N, C, h, w) float16   the codec's posterior q(z|x) = N(mean, exp(logvar))
    original_size    (N, 2) int32           (height, width) of the decoded, EXIF-upright image
    resized_size     (N, 2) int32           (height, width) after resizing the shorter side to the resolution
    crop_box         (N, 4) int32           (left, top, right, bottom) of the crop, in resized coordinates
    flip             (N,) uint8             1 when the crop was mirrored left-right before encoding
    index            (N,) int64             the record's row in the source dataset

and in its `__metadata__` one key, "latent_shard", whose value is a JSON string with the ids, captions,
rejected images, the settings that made the shard, and the sums its latent statistics combine from. One key
and not several: safetensors writes metadata from a hash map whose order changes from process to process, and
a shard's bytes (its checksum) must not. See docs/shards.md for why safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from codec.common.atomic import write_bytes_atomically

FORMAT = "latent-shards/1"
MANIFEST = "manifest.json"
METADATA_KEY = "latent_shard"
TENSOR_NAMES = ("mean", "logvar", "original_size", "resized_size", "crop_box", "flip", "index")
_SHARD_FILE = re.compile(r"^shard-(\d{5,})\.safetensors$")


class ShardError(ValueError):
    """A shard file that is missing, unreadable, or not in this format."""


@dataclass
class ShardRecords:
    """The tensors of one shard plus the per-record strings kept in its metadata."""

    mean: torch.Tensor
    logvar: torch.Tensor
    original_size: torch.Tensor
    resized_size: torch.Tensor
    crop_box: torch.Tensor
    flip: torch.Tensor
    index: torch.Tensor
    ids: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).contiguous() for name in TENSOR_NAMES}


def shard_filename(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_number(path: str | os.PathLike) -> int | None:
    """k for 'shard-0000k.safetensors', None for any other file name."""
    match = _SHARD_FILE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_shard_files(directory: str | os.PathLike) -> list[Path]:
    """Complete shards in `directory`, by shard number. Temp files of an interrupted write are not listed."""
    found = [p for p in Path(directory).iterdir() if shard_number(p) is not None and p.is_file()]
    return sorted(found, key=shard_number)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Latent statistics carried by each shard
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Writing and reading one shard
# ---------------------------------------------------------------------------------------------------------------


def _check_records(records: ShardRecords) -> None:
    n = len(records.ids)
    if len(records.captions) != n:
        raise ValueError(f"shard records: {n} ids but {len(records.captions)} captions")
    for name in TENSOR_NAMES:
        t = getattr(records, name)
        if t.shape[0] != n:
            raise ValueError(f"shard records: tensor {name!r} has {t.shape[0]} rows for {n} ids")
    if records.mean.dtype != torch.float16 or records.logvar.dtype != torch.float16:
        raise ValueError("shard records: mean and logvar must be float16")
    for name in ("mean", "logvar"):
        if not torch.isfinite(getattr(records, name)).all():
            bad = [records.ids[i] for i in (~torch.isfinite(getattr(records, name))).flatten(1).any(1).nonzero()[:, 0]]
            raise ValueError(
                f"{name} of records {bad[:5]} is not finite in float16 (|value| > 65504 or NaN): the codec's "
                f"latents are out of range; check the codec on these images"
            )


def write_shard(path: str | os.PathLike, records: ShardRecords, info: dict) -> str:
    """Write one shard atomically and return its sha256.

    The bytes go to a temp name in the same folder, are flushed to disk, then renamed (codec/common/atomic.py):
    a kill at any moment leaves either no shard or a complete one, never a half file that a resumed run would
    skip.
    """
    _check_records(records)
    path = Path(path)
    meta = {"format": FORMAT, "info": info, "ids": list(records.ids), "captions": list(records.captions)}
    payload = safetensors_bytes(records.tensors(), {METADATA_KEY: json.dumps(meta, sort_keys=True)})
    write_bytes_atomically(path, payload, fsync=True)
    return hashlib.sha256(payload).hexdigest()


def read_shard_header(path: str | os.PathLike) -> dict:
    """Metadata and tensor shapes of a shard, without reading its tensors.

    Returns {"info", "ids", "captions", "records", "shapes"}; raises ShardError naming the file otherwise.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except FileNotFoundError as exc:
        raise ShardError(f"shard {path} does not exist") from exc
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ShardError(f"shard {path} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
                         f"delete it and re-run the encoder into the same --out") from exc
    if raw is None:
        raise ShardError(f"{path} is a safetensors file but not a latent shard (no {METADATA_KEY!r} metadata)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ShardError(f"shard {path} has format {meta.get('format')!r}; this reader understands {FORMAT!r}")
    missing = [name for name in TENSOR_NAMES if name not in shapes]
    if missing:
        raise ShardError(f"shard {path} lacks tensors {missing}")
    count = shapes["mean"][0]
    if len(meta["ids"]) != count or len(meta["captions"]) != count:
        raise ShardError(f"shard {path}: {count} latents but {len(meta['ids'])} ids and "
                         f"{len(meta['captions'])} captions")
    return {"info": meta["info"], "ids": meta["ids"], "captions": meta["captions"], "records": count, "shapes": shapes}


def read_shard(path: str | os.PathLike) -> ShardRecords:
    """All records of one shard, loaded into memory (the reader in codec/shards/reader.py memory-maps instead)."""
    header = read_shard_header(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in TENSOR_NAMES}
    return ShardRecords(**tensors, ids=header["ids"], captions=header["captions"])


def read_manifest(shards_dir: str | os.PathLike) -> dict:
    """<shards_dir>/manifest.json, written by the encoder when every shard is complete."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{shards_dir}: no {MANIFEST}; it is written when an encode finishes. Run (or re-run, it resumes) "
            f"`latent-codec shards encode --out {shards_dir}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); "
                         f"re-run the encoder into {shards_dir} to rewrite it") from exc
    if manifest.get("format") != FORMAT or "shards" not in manifest:
        raise ValueError(f"{path} is not a latent-shards manifest (format {manifest.get('format')!r})")
    return manifest
