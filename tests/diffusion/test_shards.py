"""The latent shard readers: random access, the training stream's split and order, and the latent scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from codec.encode_dataset import encode_dataset, load_codec
from codec.model import codec_identity
from codec.shards import read_shard, shard_filename
from diffusion.shards import LatentShards, StreamingLatentShards, read_manifest
from tests.codec.test_encode_dataset import make_codec, write_image_folder


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> tuple[Path, Path]:
    """23 captioned photos (im05 a truncated JPEG), 5 per shard -> 22 records in shards of 5, 4, 5, 5, 3; by a
    tiny codec whose posterior means are 6x wider than at initialisation, so its latents need scaling."""
    root = tmp_path_factory.mktemp("encoded")
    codec = make_codec(root / "codec", mean_gain=6.0)
    write_image_folder(root / "photos", 23, captions="jsonl", broken=5)
    encode_dataset(codec, root / "photos", root / "shards", resolution=64, shard_size=5, batch_size=5,
                   num_workers=0, progress=False)
    return root / "shards", codec


def stream_ids(dataset: StreamingLatentShards, workers: int, persistent: bool = False, epochs=(0,)) -> list[list[str]]:
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=persistent)
    out = []
    for epoch in epochs:
        dataset.set_epoch(epoch)
        out.append([item["id"] for item in loader])
    return out


def test_random_access_returns_the_stored_records(encoded):
    shards_dir, codec = encoded
    shards = LatentShards(shards_dir, verify_codec=codec_identity(load_codec(codec)))
    assert len(shards) == 22
    third = read_shard(shards_dir / shard_filename(2))  # records 9..13 (dataset indices 10..14)
    item = shards[9]
    assert item["mean"].dtype == torch.float32 and item["mean"].shape == (4, 8, 8)
    assert torch.equal(item["mean"], third.mean[0].float()) and torch.equal(item["logvar"], third.logvar[0].float())
    assert (item["id"], item["caption"], item["index"]) == ("im10.png", "photo number 10", 10)
    assert shards[4]["index"] == 4 and shards[5]["index"] == 6  # index 5 was the rejected file
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


def test_stream_yields_every_record_once_per_epoch_over_two_processes_and_two_workers(encoded):
    shards_dir, _ = encoded
    everything = [LatentShards(shards_dir)[i]["id"] for i in range(22)]
    per_process = []
    for p in (0, 1):
        dataset = StreamingLatentShards(shards_dir, seed=5, process_index=p, num_processes=2)
        epochs = stream_ids(dataset, workers=2, epochs=(0, 1))
        assert [len(ids) for ids in epochs] == [len(dataset)] * 2 == [11, 11]
        per_process.append(epochs)
    for epoch in (0, 1):
        seen = per_process[0][epoch] + per_process[1][epoch]
        assert sorted(seen) == sorted(everything)  # each record exactly once, across processes and workers
    assert per_process[0][0] != per_process[0][1]  # a new order each epoch

    # Uneven: 22 records over 3 processes -> 8, 7, 7, still each exactly once.
    shares = [stream_ids(StreamingLatentShards(shards_dir, process_index=p, num_processes=3), workers=2)[0]
              for p in range(3)]
    assert [len(s) for s in shares] == [8, 7, 7]
    assert sorted(sum(shares, [])) == sorted(everything)


def test_stream_order_is_a_function_of_seed_and_epoch(encoded):
    shards_dir, _ = encoded
    again = StreamingLatentShards(shards_dir, seed=5, process_index=0, num_processes=1)
    first = stream_ids(again, workers=0, epochs=(0, 1))
    assert stream_ids(StreamingLatentShards(shards_dir, seed=5, process_index=0, num_processes=1), 0, epochs=(0, 1)) == first
    assert stream_ids(StreamingLatentShards(shards_dir, seed=6, process_index=0, num_processes=1), 0)[0] != first[0]
    # Shards stay contiguous in the order: the first 5 records come from one shard.
    shard_of = {rid: k for k, e in enumerate(read_manifest(shards_dir)["shards"])
                for rid in read_shard(shards_dir / e["file"]).ids}
    assert len({shard_of[rid] for rid in first[0][:5]}) == 1
    # set_epoch reaches persistent workers (it writes shared memory), so they do not replay epoch 0.
    persistent = stream_ids(StreamingLatentShards(shards_dir, seed=5, process_index=0, num_processes=1), 2,
                            persistent=True, epochs=(0, 1))
    fresh = [stream_ids(StreamingLatentShards(shards_dir, seed=5, process_index=0, num_processes=1), 2, epochs=(e,))[0]
             for e in (0, 1)]
    assert persistent == fresh
    # Posterior samples are keyed by (seed, epoch, record): the same with workers or without.

    def latents(workers):
        dataset = StreamingLatentShards(shards_dir, seed=5, process_index=0, num_processes=1)
        return {item["id"]: item["latents"] for item in DataLoader(dataset, batch_size=None, num_workers=workers)}

    with_workers, without = latents(2), latents(0)
    assert all(torch.equal(with_workers[k], without[k]) for k in without)
    in_order = StreamingLatentShards(shards_dir, shuffle=False, process_index=0, num_processes=1)
    assert in_order.epoch_order(3).tolist() == list(range(22))


def test_manifest_scaling_factor_gives_unit_std_latents_sampled_through_the_reader(encoded):
    shards_dir, _ = encoded
    manifest = read_manifest(shards_dir)
    sf = manifest["scaling_factor"]
    assert sf < 0.7  # the codec's latents really needed scaling
    stream = StreamingLatentShards(shards_dir, sample_posterior=True, seed=0, process_index=0, num_processes=1)
    sampled = []
    for epoch in range(4):
        stream.set_epoch(epoch)
        sampled += [item["latents"] for item in stream]
    z = torch.stack(sampled)  # 88 samples x 256 values
    assert z.std().item() == pytest.approx(1.0, abs=0.05)
    assert z.mean().item() == pytest.approx(manifest["latent_stats"]["mean"] * sf, abs=0.05)
    channel_std = z.transpose(0, 1).reshape(4, -1).std(1)
    assert torch.allclose(channel_std, torch.tensor(manifest["latent_stats"]["channel_std"]) * sf, rtol=0.08)
    # Scaling by the means' spread alone would leave sampled latents visibly too wide: the posterior variance counts.
    means = torch.stack([item["latents"] for item in StreamingLatentShards(shards_dir, sample_posterior=False,
                                                                           process_index=0, num_processes=1)])
    assert z.std().item() / means.std().item() > 1.1


def test_missing_manifest_or_damaged_shard_is_explained(encoded, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json; it is written when an encode finishes"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not readable JSON"):
        LatentShards(tmp_path)
    shards_dir, _ = encoded
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in shards_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][1]["records"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard-00001.safetensors holds 4 records but the manifest says 5"):
        LatentShards(copy)
