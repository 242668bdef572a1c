"""Migrating safetensors shards of earlier versions into a latent store: the same records, the same scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from codec.shards import LatentShards, read_manifest
from codec.shards.convert import convert_shards
from codec.shards.verify import verify_shards
from tests.codec.shards.test_encode import chunk_hashes
from tests.conftest import command

convert_command = command("shards convert")


def write_legacy_shards(folder: Path, sizes: list[int], shard_size: int = 4) -> list[dict]:
    """Shards as version latent-shards/1 wrote them (safetensors + one JSON metadata key + manifest.json); a shard
    that holds fewer records than shard_size lost its first index to a reject. Returns every record written."""
    folder.mkdir(parents=True)
    settings = {"codec_identity": "c0ffee", "encoder_identity": "e0", "resolution": 64, "crop": "center",
                "flip": "none", "seed": 0, "shard_size": shard_size, "num_images": shard_size * len(sizes),
                "caption_source": "column:text", "latent_shape": [4, 8, 8], "precision": "fp32"}
    generator = torch.Generator().manual_seed(0)
    entries, written = [], []
    for k, n in enumerate(sizes):
        first = k * shard_size
        indices = list(range(first + shard_size - n, first + shard_size))
        mean = torch.randn((n, 4, 8, 8), generator=generator).half()
        logvar = (torch.randn((n, 4, 8, 8), generator=generator) - 4).half()
        ids = [f"im{i:02d}.png" for i in indices]
        rejects = [{"index": first, "id": f"im{first:02d}.png", "source": "x", "reason": "truncated file"}] \
            if n < shard_size else []
        info = {"settings": settings, "shard": k, "indices": [first, first + shard_size], "rejects": rejects,
                "captions_missing": 0, "captions_mirrored": 0, "sums": {"count": n}}
        meta = {"format": "latent-shards/1", "info": info, "ids": ids, "captions": [f"photo {i}" for i in indices]}
        name = f"shard-{k:05d}.safetensors"
        save_file({"mean": mean, "logvar": logvar, "original_size": torch.full((n, 2), 64, dtype=torch.int32),
                   "resized_size": torch.full((n, 2), 64, dtype=torch.int32),
                   "crop_box": torch.tensor([[0, 0, 64, 64]] * n, dtype=torch.int32),
                   "flip": torch.zeros(n, dtype=torch.uint8), "index": torch.tensor(indices, dtype=torch.int64)},
                  folder / name, metadata={"latent_shard": json.dumps(meta, sort_keys=True)})
        entries.append({"file": name, "records": n, "rejected": len(rejects), "sha256": "-", "indices": [0, 0]})
        written += [{"mean": mean[j].float(), "id": ids[j], "caption": f"photo {indices[j]}"} for j in range(n)]
    normalisation = {"scaling_factor": 0.5, "shift_factor": None, "latents_mean": None, "latents_std": None}
    manifest = {"format": "latent-shards/1", "settings": settings, "shards": entries, "shard_size": shard_size,
                "codec": {"identity": "c0ffee", "encoder_identity": "e0", "path": "codec", "config": {}},
                "data": {"source": "photos", "image_column": "image", "captions": "column:text",
                         "captions_missing": 0, "captions_mirrored": 0},
                "count": sum(sizes), "rejected": sum(n < shard_size for n in sizes), "latent_shape": [4, 8, 8],
                "latent_stats": {"std": 2.0}, "normalisation": normalisation, "scaling_factor": 0.5,
                "resolution": 64, "crop": "center", "flip": "none", "seed": 0, "dtype": "float16"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return written


def test_converted_shards_read_back_record_for_record_with_the_same_scale(tmp_path, capsys):
    old = tmp_path / "old"
    written = write_legacy_shards(old, [4, 3, 4])
    with pytest.raises(ValueError, match="safetensors shards of an earlier version.*shards convert"):
        LatentShards(old)

    assert convert_command(["--shards", old, "--out", tmp_path / "new"]) == 0
    assert "11 records in 3 units" in capsys.readouterr().out
    store = LatentShards(tmp_path / "new")
    assert len(store) == 11 and store.chunk_sizes.tolist() == [4, 3, 4]
    assert store.normalisation == read_manifest(tmp_path / "new")["normalisation"]
    assert store.scaling_factor == 0.5 and store.encoder_identity == "e0"
    for i, record in enumerate(written):
        got = store[i]
        assert torch.equal(got["mean"], record["mean"]) and (got["id"], got["caption"]) == (record["id"],
                                                                                         record["caption"])
    assert (store[4]["unit"], store[4]["row"]) == (1, 1)  # row 0 of old shard 1 was the rejected image
    rejects = [json.loads(line) for line in (tmp_path / "new" / "rejects.jsonl").read_text().splitlines()]
    assert rejects == [{"unit": 1, "row": 0, "id": "im04.png", "source": "x", "reason": "truncated file"}]
    assert verify_shards(tmp_path / "new") == []

    convert_shards(old, tmp_path / "again", progress=False)
    assert chunk_hashes(tmp_path / "again") == chunk_hashes(tmp_path / "new")  # the same bytes every time
    with pytest.raises(ValueError, match="shards convert` reads 'latent-shards/1' shards"):
        convert_shards(tmp_path / "new", tmp_path / "twice", progress=False)
