"""The latent store reader: random access, damaged inputs, the latent scale, and a store in a bucket."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from codec.common.draws import keyed_generator
from codec.network.model import codec_identity, load_codec
from codec.shards import LatentShards, read_manifest
from codec.shards.encode import encode_dataset
from tests.codec.shards.test_encode import assert_same_store, make_codec, write_image_folder


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> tuple[Path, Path]:
    """23 captioned photos (im05 a truncated JPEG), 5 per unit -> 22 records in units of 5, 4, 5, 5, 3; by a
    tiny codec whose posterior means are 6x wider than at initialisation, so its latents need scaling."""
    root = tmp_path_factory.mktemp("encoded")
    codec = make_codec(root / "codec", mean_gain=6.0)
    write_image_folder(root / "photos", 23, captions="jsonl", broken=5)
    encode_dataset(codec, root / "photos", root / "shards", resolution=64, unit_size=5, batch_size=5,
                   num_workers=0, progress=False)
    return root / "shards", codec


def test_random_access_returns_the_stored_records(encoded):
    shards_dir, codec = encoded
    shards = LatentShards(shards_dir, verify_codec=codec_identity(load_codec(codec)))
    assert len(shards) == 22
    assert shards.chunk_sizes.tolist() == [5, 4, 5, 5, 3]  # one chunk per unit of these tiny latents
    item = shards[9]  # the first record of unit 2 (images 10..14)
    assert item["mean"].dtype == torch.float32 and item["mean"].shape == (4, 8, 8)
    assert (item["id"], item["caption"], item["unit"], item["row"]) == ("im10.png", "photo number 10", 2, 0)
    assert (shards[4]["unit"], shards[4]["row"]) == (0, 4) and (shards[5]["unit"], shards[5]["row"]) == (1, 1)
    # row 0 of unit 1 was the rejected file
    assert shards[-1]["id"] == "im22.png"
    with pytest.raises(IndexError, match="record 22 is out of range for 22 records"):
        shards[22]

    sf = shards.scaling_factor
    assert sf == read_manifest(shards_dir)["scaling_factor"]
    assert torch.equal(shards.latents(9, sample=False), item["mean"] * sf)
    a = shards.latents(9, torch.Generator().manual_seed(3))
    assert torch.equal(a, shards.latents(9, torch.Generator().manual_seed(3)))
    eps = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, (item["mean"] + torch.exp(0.5 * item["logvar"]) * eps) * sf)
    assert torch.allclose(shards.unscale(shards.scale(item["mean"])), item["mean"])

    with pytest.raises(ValueError, match="was encoded by codec .* not by codec 0123456789abcdef"):
        LatentShards(shards_dir, verify_codec="0123456789abcdef")


def test_manifest_scaling_factor_gives_unit_std_latents_sampled_through_the_reader(encoded):
    shards_dir, _ = encoded
    manifest = read_manifest(shards_dir)
    sf = manifest["scaling_factor"]
    assert sf < 0.7  # the codec's latents really needed scaling
    shards = LatentShards(shards_dir)
    sampled = [shards.latents(i, keyed_generator("posterior", 0, epoch, i))
               for epoch in range(4) for i in range(len(shards))]
    z = torch.stack(sampled)  # 88 samples x 256 values
    assert z.std().item() == pytest.approx(1.0, abs=0.05)
    assert z.mean().item() == pytest.approx(manifest["latent_stats"]["mean"] * sf, abs=0.05)
    channel_std = z.transpose(0, 1).reshape(4, -1).std(1)
    assert torch.allclose(channel_std, torch.tensor(manifest["latent_stats"]["channel_std"]) * sf, rtol=0.08)
    # Scaling by the means' spread alone would leave sampled latents visibly too wide: the posterior variance counts.
    means = torch.stack([shards.latents(i, sample=False) for i in range(len(shards))])
    assert z.std().item() / means.std().item() > 1.1


def test_missing_manifest_or_a_manifest_that_disagrees_is_explained(encoded, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json; it is written when an encode finishes"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not readable JSON"):
        LatentShards(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "latent-shards/1", "shards": []}))
    with pytest.raises(ValueError, match="safetensors shards of an earlier version.*shards convert"):
        LatentShards(tmp_path)
    shards_dir, _ = encoded
    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["count"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="its units list 22 records but its count is 23"):
        LatentShards(copy)


def test_a_store_in_a_bucket_reads_as_the_local_one_through_a_bounded_cache(encoded, local_s3, tmp_path):
    import fsspec

    shards_dir, _ = encoded
    bucket = local_s3.new_bucket()
    fsspec.filesystem("s3").put(f"{shards_dir}/", f"{bucket[len('s3://'):]}/store/", recursive=True)
    sizes = sorted(p.stat().st_size for p in shards_dir.glob("chunk-*.bin"))
    budget = sizes[-1] + sizes[-2]  # room for the two biggest of the five chunks
    remote = LatentShards(f"{bucket}/store", cache_dir=str(tmp_path / "cache"), max_cache_size=f"{budget}B")
    local = LatentShards(shards_dir)
    assert len(remote) == len(local) and remote.scaling_factor == local.scaling_factor
    held = []
    for i in [*range(len(local)), 0, 21]:
        a, b = remote[i], local[i]
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], (i, key)
        held.append(sum(p.stat().st_size for p in (tmp_path / "cache").rglob("chunk-*.bin")))
    assert 0 < max(held) <= budget  # whole chunks came through the cache, never more than its bound
    assert_same_store(shards_dir, f"{bucket}/store")
