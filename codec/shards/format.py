"""The latent store: litdata chunks written one input unit at a time, a commit record per unit, litdata's index,
and our manifest, in a local folder or a bucket prefix (docs/shards.md).

    <store>/chunk-000042-0000.bin     litdata chunks of unit 42 (one input tar or parquet file, or one block of an
                                      image folder or saved dataset); a unit writes one or more
    <store>/units/000042.json         unit 42's commit record, written after its chunks: chunk files, sha256s,
                                      record and reject counts, the settings that made it, its latent sums and
                                      litdata's chunk entries. A unit without this file is not done.
    <store>/index.json                litdata's index of every chunk in unit order (what StreamingDataset opens)
    <store>/manifest.json             written last: codec identity, settings, statistics, normalisation, units
    <store>/rejects.jsonl             one line per image that could not be encoded, with the reason

A record (one image) holds: mean, logvar (C, h, w) float16, the posterior q(z|x) = N(mean, exp(logvar)); id,
caption; unit, row (its place in the input); original_size, resized_size (2,) int32 (height, width); crop_box (4,)
int32 (left, top, right, bottom in resized coordinates); flip (1 when the crop was mirrored before encoding).

Why litdata (0.2.x) and not a format of our own: it reads chunks from a bucket into a local cache with a size
bound and has random access by record, with no pinned version changed in this stack. MosaicML Streaming would
downgrade numpy, transformers and huggingface_hub; webdataset and `datasets` streaming cannot resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from codec.shards.location import Location, stream_sha256

FORMAT = "latent-store/1"
LEGACY_FORMAT = "latent-shards/1"  # the safetensors shards of before; `latent-codec shards convert` migrates them
MANIFEST = "manifest.json"
INDEX = "index.json"  # litdata's file name: StreamingDataset opens <store>/index.json
UNITS = "units"
REJECTS = "rejects.jsonl"
# litdata packs records into chunks of about this many bytes: big enough that a bucket read is one large GET,
# small enough that a cache of a few chunks per worker stays in a few hundred MB (litdata suggests ~64 MB).
CHUNK_BYTES = 64 << 20
_UNIT_RECORD = re.compile(r"^(\d{6,})\.json$")


class StoreError(ValueError):
    """A store file that is missing, unreadable, or not in this format."""


@dataclass
class UnitRecords:
    """The encoded records of one input unit, in input order (rejected images leave no record)."""

    mean: torch.Tensor  # (N, C, h, w) float16
    logvar: torch.Tensor
    original_size: torch.Tensor  # (N, 2) int32
    resized_size: torch.Tensor  # (N, 2) int32
    crop_box: torch.Tensor  # (N, 4) int32
    flip: torch.Tensor  # (N,) uint8
    row: torch.Tensor  # (N,) int64, the record's place in its unit
    ids: list[str]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def check(self) -> None:
        n = len(self.ids)
        if len(self.captions) != n:
            raise ValueError(f"unit records: {n} ids but {len(self.captions)} captions")
        for name in ("mean", "logvar", "original_size", "resized_size", "crop_box", "flip", "row"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"unit records: {name!r} has {getattr(self, name).shape[0]} rows for {n} ids")
        if self.mean.dtype != torch.float16 or self.logvar.dtype != torch.float16:
            raise ValueError("unit records: mean and logvar must be float16")
        for name in ("mean", "logvar"):
            bad = ~torch.isfinite(getattr(self, name)).flatten(1).all(1)
            if bad.any():
                ids = [self.ids[i] for i in bad.nonzero()[:, 0].tolist()]
                raise ValueError(f"{name} of records {ids[:5]} is not finite in float16 (|value| > 65504 or NaN): "
                                 f"the codec's latents are out of range; check the codec on these images")

    def items(self, unit: int):
        """One litdata item per record. Plain ints and numpy arrays: litdata stores them in its own fixed layout."""
        mean, logvar = self.mean.numpy(), self.logvar.numpy()
        sizes, resized, boxes = self.original_size.numpy(), self.resized_size.numpy(), self.crop_box.numpy()
        for i in range(len(self)):
            yield {"mean": mean[i], "logvar": logvar[i], "id": self.ids[i], "caption": self.captions[i],
                   "unit": unit, "row": int(self.row[i]), "original_size": sizes[i], "resized_size": resized[i],
                   "crop_box": boxes[i], "flip": int(self.flip[i])}


def unit_record_name(unit: int) -> str:
    return f"{UNITS}/{unit:06d}.json"


def chunk_name(unit: int, k: int) -> str:
    return f"chunk-{unit:06d}-{k:04d}.bin"


def committed_units(store: Location) -> set[int]:
    """Units whose commit record exists: one listing of <store>/units/."""
    return {int(m.group(1)) for name in store.list(UNITS) if (m := _UNIT_RECORD.match(name))}


def _file_sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return stream_sha256(fh)


def write_unit(store: Location, unit: int, records: UnitRecords, info: dict, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Write one unit's chunks, then its commit record; return the record.

    The chunks are packed by litdata's writer in a temp folder (inside a local store, so moving them in is a
    rename), named chunk-<unit>-<k>.bin, and moved or uploaded; the commit record goes last. A kill before it
    leaves chunks no record lists, which the re-run rewrites with the same bytes."""
    from litdata.streaming.writer import BinaryWriter

    records.check()
    temp_parent = None if store.remote else os.fspath(store.root)
    with tempfile.TemporaryDirectory(dir=temp_parent, prefix=f".tmp-unit-{unit:06d}-") as tmp:
        chunks, config = [], None
        if len(records):
            writer = BinaryWriter(tmp, chunk_bytes=chunk_bytes)
            for i, item in enumerate(records.items(unit)):
                writer.add_item(i, item)
            writer.done()
            # The writer names its files after the process's rank (<rank>.index.json, chunk-<rank>-<k>.bin); the
            # chunks are renamed after the unit below, whichever process wrote them.
            (index_file,) = [name for name in os.listdir(tmp) if name.endswith(".index.json")]
            with open(os.path.join(tmp, index_file)) as fh:
                written = json.load(fh)
            config = written["config"]
            for k, entry in enumerate(written["chunks"]):
                name = chunk_name(unit, k)
                local = os.path.join(tmp, entry["filename"])
                chunks.append({"file": name, "records": entry["chunk_size"], "sha256": _file_sha256(local),
                               "litdata": dict(entry, filename=name)})
                store.put(local, name)
    record = {"format": FORMAT, "unit": unit, "records": len(records), "chunks": chunks, "litdata_config": config,
              "info": info}
    store.write_text(unit_record_name(unit), json.dumps(record, sort_keys=True))
    return record


def read_unit_record(store: Location, unit: int) -> dict:
    name = unit_record_name(unit)
    try:
        record = json.loads(store.read_text(name))
    except FileNotFoundError as exc:
        raise StoreError(f"{store.join(name)} does not exist: unit {unit} is not encoded") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{store.join(name)} is not readable JSON ({exc}); delete it and re-run the encoder into "
                         f"{store}") from exc
    if record.get("format") != FORMAT:
        raise StoreError(f"{store.join(name)} has format {record.get('format')!r}; this reader understands {FORMAT!r}")
    return record


def _config_body(config: dict) -> dict:
    return {key: value for key, value in config.items() if key != "types"}


def content_digest(chunk_hashes) -> str:
    """16 hex digits naming a store's content: a digest of its chunks' sha256s in order."""
    h = hashlib.sha256()
    for sha in chunk_hashes:
        h.update(f"{sha}\n".encode())
    return h.hexdigest()[:16]


class StoreIndex:
    """litdata's index.json and the store's rejects, gathered one commit record at a time in unit order, so finishing
    a store of 10k units never holds 10k commit records (each repeats litdata's record layout)."""

    def __init__(self):
        self.chunks: list[dict] = []
        self.config: dict | None = None
        self.first_unit: int | None = None
        self.rejects: list[dict] = []
        self.hashes: list[str] = []

    def add(self, record: dict) -> None:
        self.rejects.extend(record["info"]["rejects"])
        self.hashes.extend(chunk["sha256"] for chunk in record["chunks"])
        if record["litdata_config"] is None:
            return  # every image of the unit was rejected: no chunk
        if self.config is None:
            self.config, self.first_unit = record["litdata_config"], record["unit"]
        elif _config_body(self.config) != _config_body(record["litdata_config"]):
            raise StoreError(f"unit {record['unit']} was written with another record layout than unit "
                             f"{self.first_unit}; re-encode it")
        self.chunks.extend(chunk["litdata"] for chunk in record["chunks"])

    def index(self) -> dict:
        """Deterministic: `updated_at` (which litdata folds into its cache folder's name) is the content digest, so
        re-encoded content gets a new cache."""
        return {"chunks": self.chunks, "config": self.config, "updated_at": content_digest(self.hashes)}


def unit_entry(record: dict, name: str) -> dict:
    """A unit as the manifest lists it: its chunks with their checksums, its record and reject counts."""
    return {"unit": record["unit"], "name": name, "records": record["records"],
            "rejected": len(record["info"]["rejects"]),
            "chunks": [{key: chunk[key] for key in ("file", "records", "sha256")} for chunk in record["chunks"]]}


def publish(store: Location, manifest: dict, gathered: StoreIndex) -> None:
    """Write the rejects, litdata's index and, last, the manifest: a store with a manifest is complete."""
    store.write_text(REJECTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in gathered.rejects))
    store.write_text(INDEX, json.dumps(gathered.index(), sort_keys=True))
    store.write_text(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(store: str | os.PathLike | Location) -> dict:
    """<store>/manifest.json, written when an encode finishes."""
    store = store if isinstance(store, Location) else Location(store)
    try:
        text = store.read_text(MANIFEST)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{store}: no {MANIFEST}; it is written when an encode finishes. Run (or re-run, it resumes) "
            f"`latent-codec shards encode --out {store}`") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{store.join(MANIFEST)} is not readable JSON ({exc}); "
                         f"re-run the encoder into {store} to rewrite it") from exc
    if manifest.get("format") == LEGACY_FORMAT:
        raise ValueError(f"{store} holds safetensors shards of an earlier version (format {LEGACY_FORMAT}); convert "
                         f"them with `latent-codec shards convert --shards {store} --out NEW`, or re-encode")
    if manifest.get("format") != FORMAT or "units" not in manifest:
        raise ValueError(f"{store.join(MANIFEST)} is not a latent store manifest (format {manifest.get('format')!r})")
    return manifest


def chunk_sizes(manifest: dict) -> np.ndarray:
    """Records per chunk in store order, from the manifest alone: what a chunk-local order is built from."""
    return np.array([chunk["records"] for unit in manifest["units"] for chunk in unit["chunks"]], dtype=np.int64)
