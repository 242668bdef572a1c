"""Encoding in reduced precision (bf16/fp16) never writes a non-finite latent into the store, and the
precision is a setting a resume must match."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import codec.shards.encode as encode_module
from codec.data import InputSource
from codec.shards import read_manifest
from codec.shards.encode import NON_FINITE_REASON, Framing, encode_dataset
from codec.shards.verify import verify_shards
from tests.codec.shards.test_encode import RES, encode_command, store_records

# 4 units of 3 (the last holds 1), batch 2, random crops, as the 2-process test of test_encode.py.
KWARGS = dict(resolution=RES, unit_size=3, batch_size=2, crop="random", seed=7, num_workers=1, progress=False)


# ---------------------------------------------------------------------------------------------------------------
# Reduced precision
# ---------------------------------------------------------------------------------------------------------------


def _pixels_of(photos: Path, name: str) -> torch.Tensor:
    """The pixels the encoder receives for the image `name`, to recognise its row in a batch."""
    source = InputSource(str(photos))
    framing = Framing(RES, KWARGS["crop"], KWARGS["seed"], encode_module.flip_policy(KWARGS["crop"], None))
    record = next(r for unit in source.units for r in source.records(unit) if r["id"] == name)
    return framing.prepare(record)["pixels"]


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


def _records(out: Path) -> dict[str, dict]:
    """The stored records of the store `out`, by image name."""
    return {r["id"]: r for r in store_records(out)}


def test_an_image_that_overflows_in_fp16_is_reencoded_in_fp32_with_one_warning(codec_dir, photos, tmp_path,
                                                                                 monkeypatch, caplog):
    encode_dataset(codec_dir, photos, tmp_path / "fp32", **KWARGS)
    encode_dataset(codec_dir, photos, tmp_path / "fp16", precision="fp16", **KWARGS)
    overflowing_on(monkeypatch, _pixels_of(photos, "im07.png"))  # unit 2, batch [im06, im07]
    with caplog.at_level(logging.WARNING, logger=encode_module.__name__):
        encode_dataset(codec_dir, photos, tmp_path / "overflow", precision="fp16", **KWARGS)

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["unit files-000002: 1 image(s) gave non-finite latents in fp16 and were re-encoded in "
                        "fp32 (any still not finite are in rejects.jsonl): im07.png"]
    overflow, fp16, fp32 = (_records(tmp_path / p) for p in ("overflow", "fp16", "fp32"))
    for name in ("mean", "logvar"):
        assert torch.equal(overflow["im07.png"][name], fp32["im07.png"][name])
        # Its batch-mate keeps its fp16 encoding.
        assert torch.equal(overflow["im06.png"][name], fp16["im06.png"][name])
    # fp16 and fp32 encodes differ at all, else the equality above would prove nothing.
    assert not torch.equal(fp16["im07.png"]["mean"], fp32["im07.png"]["mean"])
    manifest = read_manifest(tmp_path / "overflow")
    assert manifest["count"] == 9 and manifest["rejected"] == 1 and manifest["settings"]["precision"] == "fp16"
    assert verify_shards(tmp_path / "overflow", codec_dir) == []


def test_an_image_not_finite_even_in_fp32_is_rejected_with_its_reason(codec_dir, photos, tmp_path, monkeypatch):
    overflowing_on(monkeypatch, _pixels_of(photos, "im07.png"), always=True)
    manifest = encode_dataset(codec_dir, photos, tmp_path / "out", precision="bf16", **KWARGS)

    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["unit"], r["row"], r["id"]) for r in rejects] == [(1, 1, "im04.jpg"), (2, 1, "im07.png")]
    assert rejects[1]["reason"] == NON_FINITE_REASON and rejects[1]["source"].endswith("im07.png")
    unit = [r for r in store_records(tmp_path / "out") if r["unit"] == 2]
    assert [r["id"] for r in unit] == ["im06.png", "im08.png"]
    assert all(torch.isfinite(r["mean"]).all() and torch.isfinite(r["logvar"]).all() for r in unit)
    assert manifest["count"] == 8 and manifest["rejected"] == 2


def test_bf16_encode_is_finite_and_close_to_fp32(codec_dir, photos, tmp_path):
    a = encode_dataset(codec_dir, photos, tmp_path / "fp32", **KWARGS)
    b = encode_dataset(codec_dir, photos, tmp_path / "bf16", precision="bf16", **KWARGS)
    records = {p: store_records(tmp_path / p) for p in ("fp32", "bf16")}
    means = {p: torch.stack([r["mean"] for r in rs]) for p, rs in records.items()}
    logvars = {p: torch.stack([r["logvar"] for r in rs]) for p, rs in records.items()}
    assert torch.isfinite(means["bf16"]).all() and torch.isfinite(logvars["bf16"]).all()
    # Measured on the tiny untrained codec (means of std 0.23, |max| 0.74): relative RMS difference of the means
    # 1.6e-2, worst |difference| 0.028 (means) and 0.024 (logvars), the latent std 2.7e-5 apart. bf16 keeps 8
    # mantissa bits, ~0.4% per operation, accumulated over the encoder's layers. (fp16 measured 2.0e-3 / 0.0034.)
    d = means["bf16"] - means["fp32"]
    rel_rms, worst_mean = float(d.norm() / means["fp32"].norm()), float(d.abs().max())
    worst_logvar = float((logvars["bf16"] - logvars["fp32"]).abs().max())
    assert 0 < rel_rms < 0.03 and worst_mean < 0.06 and worst_logvar < 0.05, (rel_rms, worst_mean, worst_logvar)
    assert b["latent_stats"]["std"] == pytest.approx(a["latent_stats"]["std"], rel=5e-4)


def test_a_resume_in_another_precision_is_refused(codec_dir, photos, tmp_path):
    out = tmp_path / "out"
    encode_dataset(codec_dir, photos, out, **KWARGS)
    with pytest.raises(ValueError, match=r"precision='fp32' \(manifest.json\), but this run has precision='bf16'"):
        encode_dataset(codec_dir, photos, out, precision="bf16", **KWARGS)
    (out / "manifest.json").unlink()  # an unfinished store: the units' own records are checked
    with pytest.raises(ValueError, match=r"precision='fp32' \(unit 0\)"):
        encode_dataset(codec_dir, photos, out, precision="fp16", **KWARGS)
    before = {p.name: p.read_bytes() for p in (out / "units").iterdir()}
    manifest = encode_dataset(codec_dir, photos, out, **KWARGS)
    assert {p.name: p.read_bytes() for p in (out / "units").iterdir()} == before  # resumed, none rewritten
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
