"""Check encoded shards against their manifest: `latent-codec shards verify --shards DIR` exits non-zero on any
problem, so a copy to another machine or a half-finished sync is caught before a U-Net trains on it."""

from __future__ import annotations

import os
from pathlib import Path

from codec.network.model import codec_identity, encoder_identity, load_codec
from codec.shards.format import (
    MANIFEST,
    ShardError,
    file_sha256,
    list_shard_files,
    read_manifest,
    read_shard_header,
)
from codec.shards.reader import codec_mismatch


def verify_shards(out: str | os.PathLike, codec_dir: str | os.PathLike | None = None) -> list[str]:
    """Every problem found, as sentences naming the file; an empty list means the shards are intact.

    Checks each shard's sha256 and record count against the manifest, the total counts, files the manifest does
    not list, and (with `codec_dir`) that the manifest and every shard were made by that codec, or by one with
    its encoder identity (the parent of a decoder-only fine-tune: the latents are the same).
    """
    out = Path(out)
    try:
        manifest = read_manifest(out)
    except (FileNotFoundError, ValueError) as exc:
        return [str(exc)]
    problems = []
    # Each shard must belong to this codec: the manifest's own, or the one given with --codec.
    identity, encoder = manifest["codec"]["identity"], manifest["codec"].get("encoder_identity")
    if codec_dir is not None:
        vae = load_codec(codec_dir)
        given, given_encoder = codec_identity(vae), encoder_identity(vae)
        refusal = codec_mismatch(identity, encoder, given, given_encoder)
        if refusal is not None:
            problems.append(f"{MANIFEST}: shards were made by codec {identity}, not by --codec {codec_dir}: they were "
                            f"{refusal}")
        identity, encoder = given, given_encoder
    listed = {entry["file"] for entry in manifest["shards"]}
    for extra in sorted(p.name for p in list_shard_files(out) if p.name not in listed):
        problems.append(f"{extra}: a shard file the manifest does not list")
    total = 0
    for entry in manifest["shards"]:
        path = out / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']}: missing")
            continue
        if file_sha256(path) != entry["sha256"]:
            problems.append(f"{entry['file']}: sha256 differs from the manifest (the file is damaged or was replaced)")
        try:
            header = read_shard_header(path)
        except ShardError as exc:
            problems.append(str(exc))
            continue
        total += header["records"]
        if header["records"] != entry["records"]:
            problems.append(f"{entry['file']}: {header['records']} records, the manifest says {entry['records']}")
        made = header["info"]["settings"]
        if codec_mismatch(made["codec_identity"], made.get("encoder_identity"), identity, encoder) is not None:
            problems.append(f"{entry['file']}: made by codec {made['codec_identity']}, expected {identity}")
    if total != manifest["count"]:
        problems.append(f"{MANIFEST}: count {manifest['count']} but the shards hold {total} records")
    return problems
