"""Migrate the safetensors shards of earlier versions (format latent-shards/1) into a latent store, so one reader
serves every trainer: `latent-codec shards convert --shards OLD --out NEW` (NEW may be a bucket URL).

Each old shard becomes one unit with the same records in the same order; the codec identities, statistics and
normalisation are carried over unchanged, so a U-Net trains on the converted store exactly as on the old shards.
Nothing is re-encoded, and the old folder is only read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open
from tqdm.auto import tqdm

from codec.shards.format import (
    CHUNK_BYTES,
    FORMAT,
    LEGACY_FORMAT,
    StoreIndex,
    UnitRecords,
    publish,
    unit_entry,
    write_unit,
)
from codec.shards.location import Location

_LEGACY_KEY = "latent_shard"  # the one __metadata__ key the old shards kept their JSON in


def read_legacy_shard(path: Path) -> tuple[UnitRecords, dict]:
    """The records of one old shard as a unit's records (row = the dataset index's offset in the shard), and its
    info (settings, indices, rejects, sums)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[_LEGACY_KEY])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path} is not a readable latent shard ({type(exc).__name__}: {exc})") from exc
    first = meta["info"]["indices"][0]
    records = UnitRecords(mean=tensors["mean"], logvar=tensors["logvar"], original_size=tensors["original_size"],
                          resized_size=tensors["resized_size"], crop_box=tensors["crop_box"], flip=tensors["flip"],
                          row=tensors["index"] - first, ids=meta["ids"], captions=meta["captions"])
    return records, meta["info"]


def convert_shards(old: str | os.PathLike, out: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES,
                   progress: bool = True) -> dict:
    """Write the store `out` from the old shards folder `old`; returns the new manifest."""
    old = Path(old)
    legacy = json.loads((old / "manifest.json").read_text())
    if legacy.get("format") != LEGACY_FORMAT:
        raise ValueError(f"{old}/manifest.json has format {legacy.get('format')!r}; `shards convert` reads "
                         f"{LEGACY_FORMAT!r} shards")
    store = Location(out)
    store.make()
    old_settings = legacy["settings"]
    names = [entry["file"].removesuffix(".safetensors") for entry in legacy["shards"]]
    settings = {
        **{key: value for key, value in old_settings.items() if key not in ("shard_size", "num_images",
                                                                            "caption_source")},
        "unit_size": old_settings["shard_size"], "limit": None, "chunk_bytes": chunk_bytes,
        "source": {"kind": "converted", "units": len(names), "captions": old_settings["caption_source"],
                   "converted_from": f"{old} ({LEGACY_FORMAT})"},
    }
    gathered, units = StoreIndex(), []
    for unit, entry in enumerate(tqdm(legacy["shards"], desc="convert", unit="shard", disable=not progress)):
        shard, info = read_legacy_shard(old / entry["file"])
        rejects = [{"unit": unit, "row": r["index"] - info["indices"][0], "id": r["id"], "source": r["source"],
                    "reason": r["reason"]} for r in info["rejects"]]
        unit_info = {"settings": settings, "name": names[unit], "rejects": rejects,
                     "captions_missing": info["captions_missing"],
                     "captions_mirrored": info.get("captions_mirrored", 0), "sums": info["sums"]}
        record = write_unit(store, unit, shard, unit_info, chunk_bytes)
        gathered.add(record)
        units.append(unit_entry(record, names[unit]))
    manifest = {key: value for key, value in legacy.items() if key not in ("shards", "shard_size")}
    manifest.update(format=FORMAT, settings=settings, units=units, count=sum(u["records"] for u in units))
    manifest["data"] = dict(legacy["data"], kind="converted")
    publish(store, manifest, gathered)
    return manifest

