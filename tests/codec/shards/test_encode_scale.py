"""Encoding at scale: each process hashes its own shards, the process group's timeout is a setting, and
reduced precision (bf16/fp16) never writes a non-finite latent into a shard."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import codec.shards.encode as encode_module
from codec.shards.encode import NON_FINITE_REASON, ShardImages, encode_dataset
from codec.shards.format import (
    file_sha256,
    read_manifest,
    read_shard,
    read_shard_header,
    shard_filename,
    write_shard,
)
from codec.shards.verify import verify_shards
from tests.codec.shards.test_encode import RES, assert_same_shards, encode_command
from tests.conftest import ROOT, TWO_PROCESSES, launch_env

# 4 shards of 3 (the last holds 1), batch 2, random crops, as the 2-process test of test_encode.py.
KWARGS = dict(resolution=RES, shard_size=3, batch_size=2, crop="random", seed=7, num_workers=1, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Hashing spread over the ranks, and the process group's timeout
# ---------------------------------------------------------------------------------------------------------------

# Loaded by every process of the launch (via PYTHONPATH): records which rank hashes which file, and the timeout
# each rank gives init_process_group. encode.py imports file_sha256 after this has replaced it.
RECORD_HASHING = '''
import os
if os.environ.get("RANK") is not None:
    import torch.distributed
    import codec.shards.format as fmt

    def _record(line):
        with open(os.environ["SCALE_LOG"], "a") as fh:
            fh.write(line + "\\n")

    _real_hash, _real_init = fmt.file_sha256, torch.distributed.init_process_group

    def file_sha256(path):
        _record(f"hash rank={os.environ['RANK']} {os.path.basename(path)}")
        return _real_hash(path)

    def init_process_group(*args, **kwargs):
        _record(f"init rank={os.environ['RANK']} timeout={kwargs.get('timeout')}")
        return _real_init(*args, **kwargs)

    fmt.file_sha256 = file_sha256
    torch.distributed.init_process_group = init_process_group
'''


def test_each_process_hashes_only_its_own_shards_and_the_timeout_reaches_the_group(codec_dir, photos, tmp_path):
    """A resumed 2-process encode: shards 0 and 1 were complete before, 2 and 3 are written now. Process 0 used
    to hash all four while process 1 waited in a barrier. Now a shard written now is hashed from its bytes as
    written (no file is read again) and an earlier one by process k mod 2; the manifest is the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the launched processes: the same float16 bits
    try:
        encode_dataset(codec_dir, photos, tmp_path / "whole", **KWARGS)
    finally:
        torch.set_num_threads(threads)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for k in (0, 1):
        shutil.copy2(tmp_path / "whole" / shard_filename(k), resumed / shard_filename(k))

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(RECORD_HASHING)
    record = tmp_path / "scale.log"
    env = launch_env(tmp_path / "site", SCALE_LOG=str(record))
    args = ["--codec", str(codec_dir), "--data", str(photos), "--out", str(resumed), "--resolution", str(RES),
            "--shard-size", "3", "--batch-size", "2", "--crop", "random", "--seed", "7", "--num-workers", "1",
            "--process-group-timeout-minutes", "7"]
    proc = subprocess.run([*TWO_PROCESSES, "-m", "latent_codec", "shards", "encode", *args], cwd=ROOT, env=env,
                           capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    lines = sorted(record.read_text().splitlines())
    assert lines == ["hash rank=0 shard-00000.safetensors", "hash rank=1 shard-00001.safetensors",
                     "init rank=0 timeout=0:07:00", "init rank=1 timeout=0:07:00"], lines
    assert read_manifest(resumed) == read_manifest(tmp_path / "whole")  # checksums, counts, statistics
    assert_same_shards(tmp_path / "whole", resumed)
    for entry in read_manifest(resumed)["shards"]:
        assert entry["sha256"] == file_sha256(resumed / entry["file"])
    assert verify_shards(resumed, codec_dir) == []


# ---------------------------------------------------------------------------------------------------------------
# Reduced precision
# ---------------------------------------------------------------------------------------------------------------


def _pixels_of(photos: Path, index: int) -> torch.Tensor:
    """The pixels the encoder receives for dataset `index`, to recognise its row in a batch."""
    from codec.data import load_image_dataset

    dataset, column = load_image_dataset(str(photos), None)
    return ShardImages(dataset, column, str(photos), RES, KWARGS["crop"], KWARGS["seed"], "none")[index]["pixels"]


def overflowing_on(monkeypatch, target: torch.Tensor, always: bool = False) -> None:
    """The encoder overflows on image `target` under autocast (as SD's VAE does in fp16), or in any precision."""
    real = encode_module.encode_posterior

    def encode(vae, pixels):
        posterior = real(vae, pixels)
        if always or torch.is_autocast_enabled(pixels.device.type):
            hit = (pixels.cpu() == target).flatten(1).all(1)
            posterior.mean[hit.to(posterior.mean.device)] = float("inf")
        return posterior

    monkeypatch.setattr(encode_module, "encode_posterior", encode)


def _record(out: Path, index: int) -> dict:
    """mean and logvar of dataset index `index` in the shards of `out`."""
    k = index // KWARGS["shard_size"]
    shard = read_shard(out / shard_filename(k))
    row = shard.index.tolist().index(index)
    return {"mean": shard.mean[row], "logvar": shard.logvar[row]}


def test_an_image_that_overflows_in_fp16_is_reencoded_in_fp32_with_one_warning(codec_dir, photos, tmp_path,
                                                                                 monkeypatch, caplog):
    encode_dataset(codec_dir, photos, tmp_path / "fp32", **KWARGS)
    encode_dataset(codec_dir, photos, tmp_path / "fp16", precision="fp16", **KWARGS)
    overflowing_on(monkeypatch, _pixels_of(photos, 7))  # shard 2, batch [6, 7]
    with caplog.at_level(logging.WARNING, logger=encode_module.__name__):
        encode_dataset(codec_dir, photos, tmp_path / "overflow", precision="fp16", **KWARGS)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["shard-00002.safetensors: 1 image(s) gave non-finite latents in fp16 and were re-encoded in "
                        "fp32 (any still not finite are in rejects.jsonl): im07.png"]
    for name in ("mean", "logvar"):
        assert torch.equal(_record(tmp_path / "overflow", 7)[name], _record(tmp_path / "fp32", 7)[name])
        # Its batch-mate keeps its fp16 encoding.
        assert torch.equal(_record(tmp_path / "overflow", 6)[name], _record(tmp_path / "fp16", 6)[name])
    # fp16 and fp32 encodes differ at all, else the equality above would prove nothing.
    assert not torch.equal(_record(tmp_path / "fp16", 7)["mean"], _record(tmp_path / "fp32", 7)["mean"])
    manifest = read_manifest(tmp_path / "overflow")
    assert manifest["count"] == 9 and manifest["rejected"] == 1 and manifest["settings"]["precision"] == "fp16"
    assert verify_shards(tmp_path / "overflow", codec_dir) == []


def test_an_image_not_finite_even_in_fp32_is_rejected_with_its_reason(codec_dir, photos, tmp_path, monkeypatch):
    overflowing_on(monkeypatch, _pixels_of(photos, 7), always=True)
    manifest = encode_dataset(codec_dir, photos, tmp_path / "out", precision="bf16", **KWARGS)

    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["id"]) for r in rejects] == [(4, "im04.jpg"), (7, "im07.png")]
    assert rejects[1]["reason"] == NON_FINITE_REASON and rejects[1]["source"].endswith("im07.png")
    shard = read_shard(tmp_path / "out" / shard_filename(2))
    assert shard.index.tolist() == [6, 8] and torch.isfinite(shard.mean).all() and torch.isfinite(shard.logvar).all()
    assert manifest["count"] == 8 and manifest["rejected"] == 2


def test_bf16_encode_is_finite_and_close_to_fp32(codec_dir, photos, tmp_path):
    a = encode_dataset(codec_dir, photos, tmp_path / "fp32", **KWARGS)
    b = encode_dataset(codec_dir, photos, tmp_path / "bf16", precision="bf16", **KWARGS)
    means = {p: torch.cat([read_shard(tmp_path / p / e["file"]).mean.float() for e in m["shards"]])
             for p, m in (("fp32", a), ("bf16", b))}
    logvars = {p: torch.cat([read_shard(tmp_path / p / e["file"]).logvar.float() for e in m["shards"]])
               for p, m in (("fp32", a), ("bf16", b))}
    assert torch.isfinite(means["bf16"]).all() and torch.isfinite(logvars["bf16"]).all()
    # Measured on the tiny untrained codec (means of std 0.23, |max| 0.74): relative RMS difference of the means
    # 1.6e-2, worst |difference| 0.028 (means) and 0.024 (logvars), the latent std 2.7e-5 apart. bf16 keeps 8
    # mantissa bits, ~0.4% per operation, accumulated over the encoder's layers. (fp16 measured 2.0e-3 / 0.0034.)
    d = means["bf16"] - means["fp32"]
    rel_rms, worst_mean = float(d.norm() / means["fp32"].norm()), float(d.abs().max())
    worst_logvar = float((logvars["bf16"] - logvars["fp32"]).abs().max())
    assert 0 < rel_rms < 0.03 and worst_mean < 0.06 and worst_logvar < 0.05, (rel_rms, worst_mean, worst_logvar)
    assert b["latent_stats"]["std"] == pytest.approx(a["latent_stats"]["std"], rel=5e-4)


def test_a_resume_in_another_precision_is_refused_and_shards_from_before_the_setting_count_as_fp32(codec_dir, photos,
                                                                                                     tmp_path):
    out = tmp_path / "out"
    encode_dataset(codec_dir, photos, out, **KWARGS)
    with pytest.raises(ValueError, match=r"precision='fp32' \(manifest.json\), but this run has precision='bf16'"):
        encode_dataset(codec_dir, photos, out, precision="bf16", **KWARGS)

    # Shards written before --precision existed carry no such key: they were encoded in fp32.
    (out / "manifest.json").unlink()
    for k in range(4):
        path = out / shard_filename(k)
        info = read_shard_header(path)["info"]
        del info["settings"]["precision"]
        write_shard(path, read_shard(path), info)
    before = {k: (out / shard_filename(k)).read_bytes() for k in range(4)}
    with pytest.raises(ValueError, match=r"precision='fp32' \(shard-00000.safetensors\)"):
        encode_dataset(codec_dir, photos, out, precision="fp16", **KWARGS)
    manifest = encode_dataset(codec_dir, photos, out, **KWARGS)
    assert {k: (out / shard_filename(k)).read_bytes() for k in range(4)} == before  # resumed, none rewritten
    assert manifest["count"] == 9 and verify_shards(out, codec_dir) == []


def test_the_command_passes_precision_and_timeout_and_refuses_bad_values(codec_dir, photos, tmp_path, capsys):
    common = ["--codec", str(codec_dir), "--data", str(photos), "--resolution", str(RES), "--limit", "3",
              "--num-workers", "0"]
    assert encode_command([*common, "--out", str(tmp_path / "bf16"), "--precision", "bf16",
                        "--process-group-timeout-minutes", "45"]) == 0
    assert read_manifest(tmp_path / "bf16")["settings"]["precision"] == "bf16"
    assert encode_command([*common, "--out", str(tmp_path / "bad"), "--process-group-timeout-minutes", "0"]) == 2
    assert ": error: the process-group timeout must be > 0 minutes, got 0.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        encode_command([*common, "--out", str(tmp_path / "bad"), "--precision", "fp64"])
    assert exit_info.value.code == 2 and "invalid choice: 'fp64'" in capsys.readouterr().err
