"""Check a latent store against its manifest: `latent-codec shards verify --shards STORE` exits non-zero on any
problem, so a copy to another machine or bucket, or a half-finished sync, is caught before a U-Net trains on it."""

from __future__ import annotations

import json
import os
import re

from codec.network.model import codec_identity, encoder_identity, load_codec
from codec.shards.format import INDEX, MANIFEST, StoreError, StoreIndex, read_manifest, read_unit_record
from codec.shards.location import Location
from codec.shards.reader import codec_mismatch

_CHUNK = re.compile(r"^chunk-\d{6,}-\d{4,}\.bin$")


def verify_shards(out: str | os.PathLike, codec_dir: str | os.PathLike | None = None) -> list[str]:
    """Every problem found, as sentences naming the file; an empty list means the store is intact.

    Checks each chunk's sha256 and record count against the manifest and the units' commit records, litdata's
    index against the units, the total count, chunk files the manifest does not list, and (with `codec_dir`) that
    the store was made by that codec, or by one with its encoder identity (the parent of a decoder-only
    fine-tune: the latents are the same).
    """
    store = Location(out)
    try:
        manifest = read_manifest(store)
    except (FileNotFoundError, OSError, ValueError) as exc:
        return [str(exc)]
    problems = []
    identity, encoder = manifest["codec"]["identity"], manifest["codec"].get("encoder_identity")
    if codec_dir is not None:
        vae = load_codec(codec_dir)
        given, given_encoder = codec_identity(vae), encoder_identity(vae)
        refusal = codec_mismatch(identity, encoder, given, given_encoder)
        if refusal is not None:
            problems.append(f"{MANIFEST}: the store was made by codec {identity}, not by --codec {codec_dir}: it was "
                            f"{refusal}")
        identity, encoder = given, given_encoder
    listed = {chunk["file"] for unit in manifest["units"] for chunk in unit["chunks"]}
    present = set(store.list())
    for extra in sorted(name for name in present if _CHUNK.match(name) and name not in listed):
        problems.append(f"{extra}: a chunk file the manifest does not list")
    gathered, complete, total = StoreIndex(), True, 0
    for unit in manifest["units"]:
        try:
            record = read_unit_record(store, unit["unit"])
        except StoreError as exc:
            problems.append(str(exc))
            complete = False
            continue
        try:
            gathered.add(record)
        except StoreError as exc:
            problems.append(str(exc))
            complete = False
        made = record["info"]["settings"]
        if codec_mismatch(made["codec_identity"], made.get("encoder_identity"), identity, encoder) is not None:
            problems.append(f"unit {unit['unit']} ({unit['name']}): made by codec {made['codec_identity']}, "
                            f"expected {identity}")
        if [c["sha256"] for c in record["chunks"]] != [c["sha256"] for c in unit["chunks"]]:
            problems.append(f"unit {unit['unit']} ({unit['name']}): its commit record lists other chunks than the "
                            f"manifest (re-encoded after the manifest was written?)")
        for chunk in unit["chunks"]:
            if chunk["file"] not in present:
                problems.append(f"{chunk['file']}: missing")
            elif store.sha256(chunk["file"]) != chunk["sha256"]:
                problems.append(f"{chunk['file']}: sha256 differs from the manifest (the file is damaged or was "
                                f"replaced)")
            total += chunk["records"]
        if sum(c["records"] for c in unit["chunks"]) != unit["records"]:
            problems.append(f"unit {unit['unit']} ({unit['name']}): its chunks hold "
                            f"{sum(c['records'] for c in unit['chunks'])} records, the manifest says {unit['records']}")
    if total != manifest["count"]:
        problems.append(f"{MANIFEST}: count {manifest['count']} but the chunks hold {total} records")
    if complete:
        try:
            index = json.loads(store.read_text(INDEX))
        except (FileNotFoundError, json.JSONDecodeError) as exc:
            problems.append(f"{INDEX}: unreadable ({exc}); re-run the encoder into {store} to rewrite it")
        else:
            if index["chunks"] != gathered.index()["chunks"]:
                problems.append(f"{INDEX}: litdata's index does not list the units' chunks in order; re-run the "
                                f"encoder into {store} to rewrite it")
    return problems
