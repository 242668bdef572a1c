"""Tars in a bucket -> latents in a bucket -> a U-Net trained from the bucket: the same bytes, records and losses
as the same data on local disk. The bucket is moto's S3 server on 127.0.0.1 (experiments/local_s3.py)."""

from __future__ import annotations

import io

import fsspec
import pytest
import torch
from PIL import Image

import codec.shards.encode as encode_module
import diffusion.train as train_module
from codec.common.logs import read_history
from codec.shards import read_manifest
from codec.shards.encode import encode_dataset
from codec.shards.verify import verify_shards
from diffusion.config import load_unet_config
from diffusion.train import train_unet
from tests.codec.data.test_inputs import write_tar
from tests.codec.shards.test_encode import (
    RES,
    SIZES,
    assert_same_store,
    chunk_hashes,
    photo,
    store_records,
    verify_command,
)
from tests.conftest import CONFIGS, killed_after_a_checkpoint, reset_accelerate


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(i, SIZES[i % len(SIZES)])).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_img2dataset_tars(folder, tars: int = 3, per_tar: int = 3) -> None:
    """img2dataset's layout (KEY.jpg + KEY.txt + KEY.json); in tar 1, sample 1 has no caption and sample 2 is not a
    JPEG at all."""
    folder.mkdir(parents=True)
    for t in range(tars):
        members = []
        for i in range(per_tar):
            key = f"{t:05d}{i:04d}"
            broken = t == 1 and i == 2
            members.append((f"{key}.jpg", b"\xff\xd8 not a jpeg" if broken else jpeg(t * per_tar + i)))
            if not (t == 1 and i == 1):
                members.append((f"{key}.txt", f"photo {key}".encode()))
            members.append((f"{key}.json", b'{"status": "success"}'))
        write_tar(folder / f"{t:05d}.tar", members)


def upload(folder, url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.put(f"{folder}/", f"{path}/", recursive=True)


KWARGS = dict(resolution=RES, batch_size=2, crop="random", seed=5, num_workers=1, progress=False)


def test_tars_in_a_bucket_encode_into_a_bucket_store_byte_for_byte_as_from_disk(codec_dir, local_s3, tmp_path,
                                                                                monkeypatch):
    write_img2dataset_tars(tmp_path / "tars")
    bucket = local_s3.new_bucket()
    upload(tmp_path / "tars", f"{bucket}/laion")
    local = encode_dataset(codec_dir, tmp_path / "tars", tmp_path / "latents", **KWARGS)
    remote = encode_dataset(codec_dir, f"{bucket}/laion/{{00000..00002}}.tar", f"{bucket}/latents", **KWARGS)

    assert [u["name"] for u in remote["units"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [u["records"] for u in remote["units"]] == [3, 2, 3] and remote["rejected"] == 1
    assert remote["data"]["captions_missing"] == 1
    assert chunk_hashes(tmp_path / "latents") == chunk_hashes(f"{bucket}/latents")  # the same bytes
    assert_same_store(tmp_path / "latents", f"{bucket}/latents")
    assert local["latent_stats"] == remote["latent_stats"]
    records = store_records(f"{bucket}/latents")
    assert [r["id"] for r in records][:4] == ["00000.tar/000000000", "00000.tar/000000001", "00000.tar/000000002",
                                             "00001.tar/000010000"]
    assert records[4]["caption"] == ""  # 00001.tar/000010001 has no .txt
    rejects = fsspec.open(f"{bucket}/latents/rejects.jsonl", "r").open().read()
    assert '"id": "00001.tar/000010002"' in rejects and '"unit": 1' in rejects
    assert verify_shards(f"{bucket}/latents", codec_dir) == []
    assert verify_command(["--shards", f"{bucket}/latents"]) == 0

    # Killed after its first unit reached the bucket, then re-run: only the missing units are encoded, and the
    # store is the same.
    real_write, written = encode_module.write_unit, []

    def killed_after_one(*args, **kwargs):
        if written:
            raise RuntimeError("killed")
        written.append(real_write(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(encode_module, "write_unit", killed_after_one)
    with pytest.raises(RuntimeError, match="killed"):
        encode_dataset(codec_dir, f"{bucket}/laion/{{00000..00002}}.tar", f"{bucket}/again", **KWARGS)
    assert fsspec.filesystem("s3").ls(f"{bucket[5:]}/again/units") == [f"{bucket[5:]}/again/units/000000.json"]
    monkeypatch.setattr(encode_module, "write_unit", real_write)
    again = encode_dataset(codec_dir, f"{bucket}/laion/{{00000..00002}}.tar", f"{bucket}/again", **KWARGS)
    assert chunk_hashes(f"{bucket}/again") == chunk_hashes(f"{bucket}/latents")
    assert again["count"] == 8


def test_a_unet_trains_from_a_bucket_store_as_from_disk_and_resumes_mid_epoch(
        tiny_shards, tiny_codec_dir, local_s3, tmp_path, fresh_accelerate_state, monkeypatch):
    bucket = local_s3.new_bucket()
    upload(tiny_shards, f"{bucket}/latents")
    common = ("train.max_steps=6", "train.checkpoint_every=3", "optim.warmup_steps=2", "train.batch_size=4",
              "train.log_every=1")

    def config(shards, out):
        return load_unet_config(CONFIGS / "unet" / "tiny.yaml", [
            f"shards={shards}", f"codec={tiny_codec_dir}", f"train.output_dir={tmp_path / out}", *common])

    def losses(out) -> list[float]:
        return [row["loss"] for row in read_history(tmp_path / out) if "loss" in row]

    train_unet(config(tiny_shards, "local"))
    reset_accelerate()
    train_unet(config(f"{bucket}/latents", "remote"))
    assert len(losses("remote")) == 6 and losses("remote") == losses("local")

    reset_accelerate()
    with killed_after_a_checkpoint(monkeypatch, train_module):
        train_unet(config(f"{bucket}/latents", "resumed"))  # killed at step 3 of 6: mid-epoch (8 records, 4 per step)
    train_unet(config(f"{bucket}/latents", "resumed"), resume="latest")
    assert losses("resumed") == losses("local")
    pipeline = tmp_path / "resumed" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(pipeline), load_file(tmp_path / "local" / "pipeline" / "unet" / pipeline.name)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_manifest(f"{bucket}/latents")["count"] == 8


def test_a_bucket_that_cannot_be_reached_or_does_not_exist_is_one_line(codec_dir, photos, local_s3, monkeypatch,
                                                                      capsys):
    from tests.codec.shards.test_encode import encode_command

    args = ["--codec", str(codec_dir), "--data", str(photos), "--resolution", str(RES), "--num-workers", "0"]
    assert encode_command([*args, "--out", "s3://no-such-bucket-here/latents"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("latent-codec shards encode: error: cannot write to s3://no-such-bucket-here/latents: "
                              "bucket 'no-such-bucket-here' does not exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    assert encode_command([*args, "--out", "s3://some-bucket/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach s3://some-bucket/x (AWS_ENDPOINT_URL=http://127.0.0.1:9)" in err[0]
    assert verify_command(["--shards", "s3://some-bucket/x"]) == 1
    assert "problem: cannot reach s3://some-bucket/x" in capsys.readouterr().err
