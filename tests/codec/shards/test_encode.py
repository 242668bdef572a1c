"""Encoding datasets into latent shards: equal output for any process count, resume, rejects, captions, verify."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import codec.shards.encode as encode_module
from codec.data import decode_image, pil_to_tensor, resize_shorter_side
from codec.network.model import build_autoencoder, codec_identity, encode_posterior, load_codec
from codec.shards.encode import encode_dataset
from codec.shards.format import read_shard, shard_filename
from codec.shards.verify import verify_shards
from codec.training.config import load_codec_config
from experiments.benchmark.shards import benchmark_encode
from tests.conftest import CONFIGS, ROOT, TWO_PROCESSES, command, launch_env

RES = 64  # tiny codec is f8: 64x64 images -> 4x8x8 latents


# ---------------------------------------------------------------------------------------------------------------
# Helpers (also used by tests/codec/shards/test_reader.py)
# ---------------------------------------------------------------------------------------------------------------


def make_codec(path: Path, seed: int = 0, mean_gain: float = 1.0) -> Path:
    """Save the tiny preset's AutoencoderKL, untrained, as a diffusers folder.

    mean_gain multiplies the weights that produce the posterior mean, giving a codec whose latents are not
    unit-scale, so a scaling factor has something to correct.
    """
    torch.manual_seed(seed)
    vae = build_autoencoder(load_codec_config(CONFIGS / "codec" / "tiny.yaml", []).model)
    if mean_gain != 1.0:
        c = vae.config.latent_channels
        with torch.no_grad():
            vae.quant_conv.weight[:c] *= mean_gain
            vae.quant_conv.bias[:c] *= mean_gain
    vae.save_pretrained(path, safe_serialization=True)
    return path


def photo(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth colour image with some texture: (height, width, 3) uint8 for size (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform())) for _ in range(3)]
    rgb = 127.5 + 90 * np.stack(base, -1) + rng.normal(0, 12, (h, w, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


SIZES = [(80, 64), (64, 96), (100, 70), (64, 64), (90, 90), (120, 64), (64, 80), (72, 72), (96, 64), (66, 99)]


def write_image_folder(folder: Path, count: int, captions: str = "jsonl", broken: int | None = None) -> list[str]:
    """count PNG photos (im00.png, ...); captions from metadata.jsonl ('jsonl'), a.txt sidecars ('txt'), or none.
    Image `broken` is a truncated JPEG instead. Returns the file names in dataset (sorted) order."""
    folder.mkdir(parents=True, exist_ok=True)
    names, lines = [], []
    for i in range(count):
        pixels = photo(i, SIZES[i % len(SIZES)])
        if i == broken:
            name = f"im{i:02d}.jpg"
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG", quality=90)
            (folder / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        else:
            name = f"im{i:02d}.png"
            Image.fromarray(pixels).save(folder / name)
        names.append(name)
        caption = f"photo number {i}"
        if captions == "jsonl":
            lines.append(json.dumps({"file_name": name, "text": caption}))
        elif captions == "txt":
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
    if lines:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return names


def shard_contents(out: Path) -> list[dict]:
    """Every shard of an encode, fully loaded, with its checksum from the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    return [dict(vars(read_shard(out / e["file"])), sha256=e["sha256"]) for e in manifest["shards"]]


def assert_same_shards(a: Path, b: Path) -> None:
    sa, sb = shard_contents(a), shard_contents(b)
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        assert x["ids"] == y["ids"] and x["captions"] == y["captions"]
        for name in ("mean", "logvar", "original_size", "resized_size", "crop_box", "flip", "index"):
            assert torch.equal(x[name], y[name]), name
        assert x["sha256"] == y["sha256"]
    for f in ("rejects.jsonl",):
        assert (a / f).read_text() == (b / f).read_text()


# `latent-codec shards encode|verify ...` in-process: main(argv) -> exit status.
encode_command, verify_command = command("shards encode"), command("shards verify")


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_write_exactly_the_shards_one_process_writes(codec_dir, photos, tmp_path):
    # Same thread count in both runs: CPU convolutions sum in a thread-dependent order (see the module docstring).
    env = launch_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # 4 shards of 3 (the last holds 1), batch 2, random crops: shards alternate between the two processes.
    common = ["--codec", str(codec_dir), "--data", str(photos), "--resolution", str(RES), "--shard-size", "3",
              "--batch-size", "2", "--crop", "random", "--seed", "7", "--num-workers", "1"]
    two = _run([*TWO_PROCESSES, "-m", "latent_codec", "shards", "encode", *common, "--out", str(tmp_path / "two")], env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does in the launched processes; in-process saves ~8 s of imports
    try:
        assert encode_command([*common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)

    assert "encode (process 0 of 2)" in two.stderr  # really two processes, not two lone ones
    assert_same_shards(tmp_path / "one", tmp_path / "two")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [e["records"] for e in manifest["shards"]] == [3, 2, 3, 1]  # im04 is a truncated JPEG
    assert manifest["count"] == 9 and manifest["rejected"] == 1
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert one["latent_stats"] == manifest["latent_stats"]


def test_interrupted_encode_resumes_to_identical_output_and_verify_catches_damage(codec_dir, photos, tmp_path,
                                                                                  monkeypatch):
    kwargs = dict(resolution=RES, shard_size=3, batch_size=2, crop="random", seed=1, num_workers=1, progress=False)
    encode_dataset(codec_dir, photos, tmp_path / "whole", **kwargs)

    real_write = encode_module.write_shard
    written = []

    def killed_after_two(path, records, info):
        if len(written) == 2:
            raise RuntimeError("killed")
        written.append(Path(path).name)
        return real_write(path, records, info)

    monkeypatch.setattr(encode_module, "write_shard", killed_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        encode_dataset(codec_dir, photos, tmp_path / "resumed", **kwargs)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["shard-00000.safetensors",
                                                                        "shard-00001.safetensors"]
    before = {name: (tmp_path / "resumed" / name).stat().st_mtime_ns for name in written}
    monkeypatch.setattr(encode_module, "write_shard", real_write)
    encode_dataset(codec_dir, photos, tmp_path / "resumed", **kwargs)

    assert {name: (tmp_path / "resumed" / name).stat().st_mtime_ns for name in written} == before  # skipped
    assert_same_shards(tmp_path / "whole", tmp_path / "resumed")
    assert verify_shards(tmp_path / "resumed", codec_dir) == []

    other = make_codec(tmp_path / "other", seed=1)
    problems = verify_shards(tmp_path / "resumed", other)
    assert len(problems) == 5 and "made by codec" in problems[0]  # the manifest and each of the 4 shards

    shard = tmp_path / "resumed" / shard_filename(2)
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of one latent
    shard.write_bytes(bytes(data))
    problems = verify_shards(tmp_path / "resumed")
    assert problems == [f"{shard.name}: sha256 differs from the manifest (the file is damaged or was replaced)"]
    assert verify_command(["--shards", tmp_path / "resumed"]) == 1
    assert verify_command(["--shards", tmp_path / "whole", "--codec", codec_dir]) == 0
    assert verify_command(["--shards", tmp_path / "whole", "--codec", other]) == 1


def test_resuming_into_shards_of_another_codec_is_refused(codec_dir, photos, tmp_path, capsys):
    kwargs = dict(resolution=RES, shard_size=4, batch_size=4, num_workers=0, progress=False, limit=4)
    encode_dataset(codec_dir, photos, tmp_path / "out", **kwargs)
    other = make_codec(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match=r"already holds shards made with codec_identity=.*pass a new --out"):
        encode_dataset(other, photos, tmp_path / "out", **kwargs)
    with pytest.raises(ValueError, match=r"resolution=64 .*this run has resolution=32"):
        encode_dataset(codec_dir, photos, tmp_path / "out", **dict(kwargs, resolution=32))
    code = encode_command(["--codec", str(other), "--data", str(photos), "--out", str(tmp_path / "out"),
                           "--resolution", str(RES), "--shard-size", "4", "--limit", "4", "--num-workers", "0"])
    assert code == 2 and "codec_identity" in capsys.readouterr().err


def _awkward_images(folder: Path) -> dict[str, Image.Image]:
    """The formats that trip up naive loaders, plus one truncated file."""
    folder.mkdir()
    rgb = photo(3, (90, 70))
    files = {
        "a_cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "b_16bit.png": Image.fromarray((photo(4, (70, 80))[..., 0].astype(np.uint16) * 257)),
        "c_rgba.png": Image.fromarray(np.dstack([photo(5, (64, 100)), np.full((100, 64), 128, np.uint8)])),
        "d_gray.png": Image.fromarray(photo(6, (75, 75))[..., 1]),
    }
    for name, img in files.items():
        img.save(folder / name)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    (folder / "e_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return files


def test_unusual_modes_are_encoded_and_the_broken_file_is_rejected(codec_dir, tmp_path):
    _awkward_images(tmp_path / "odd")
    manifest = encode_dataset(codec_dir, tmp_path / "odd", tmp_path / "out", resolution=RES, shard_size=10,
                              batch_size=4, crop="random", seed=3, num_workers=1, progress=False)
    assert manifest["count"] == 4 and manifest["rejected"] == 1
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("e_truncated.jpg", "truncated file")]
    assert rejects[0]["source"].endswith("e_truncated.jpg")

    shard = read_shard(tmp_path / "out" / shard_filename(0))
    assert shard.ids == ["a_cmyk.jpg", "b_16bit.png", "c_rgba.png", "d_gray.png"]
    assert shard.original_size.tolist() == [[70, 90], [80, 70], [100, 64], [75, 75]]
    # Each record's latents are the codec's encoding of exactly the crop and flip it records.
    vae = load_codec(codec_dir)
    for row, name in enumerate(shard.ids):
        img = resize_shorter_side(decode_image(str(tmp_path / "odd" / name)), RES)
        assert [img.size[1], img.size[0]] == shard.resized_size[row].tolist()
        left, top, right, bottom = shard.crop_box[row].tolist()
        assert (right - left == RES and bottom - top == RES and 0 <= left and right <= img.size[0]
                and bottom <= img.size[1])
        pixels = pil_to_tensor(img.crop((left, top, right, bottom)))
        pixels = pixels.flip(-1) if shard.flip[row] else pixels
        with torch.inference_mode():
            mean = encode_posterior(vae, pixels[None]).mean[0]
        assert torch.allclose(shard.mean[row].float(), mean, atol=2e-3, rtol=2e-3), name
    assert shard.mean.dtype == torch.float16 and shard.mean.shape == (4, 4, RES // 8, RES // 8)


def test_zero_size_and_oversized_images_are_rejected_with_their_reasons(codec_dir, tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    write_image_folder(folder, 3, captions="none")  # 80x64, 64x96, 100x70
    (folder / "im03.png").write_bytes(b"")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 64x96 and 100x70 count as decompression bombs
    manifest = encode_dataset(codec_dir, folder, tmp_path / "out", resolution=RES, num_workers=0, progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["id"], r["reason"].split(":")[0]) for r in rejects] == [
        (1, "im01.png", "decompression bomb"), (2, "im02.png", "decompression bomb"), (3, "im03.png", "zero-size file")]
    assert manifest["count"] == 1 and manifest["rejected"] == 3
    assert read_shard(tmp_path / "out" / shard_filename(0)).ids == ["im00.png"]


def test_captions_from_metadata_jsonl_and_from_txt_sidecars(codec_dir, tmp_path):
    write_image_folder(tmp_path / "jsonl", 3, captions="jsonl")
    write_image_folder(tmp_path / "txt", 3, captions="txt")
    (tmp_path / "txt" / "im01.txt").unlink()  # one image without its sidecar
    kwargs = dict(resolution=RES, shard_size=10, num_workers=0, progress=False)
    a = encode_dataset(codec_dir, tmp_path / "jsonl", tmp_path / "a", **kwargs)
    b = encode_dataset(codec_dir, tmp_path / "txt", tmp_path / "b", **kwargs)
    assert a["data"]["captions"] == "column:text" and b["data"]["captions"] == "sidecar:.txt"
    assert read_shard(tmp_path / "a" / shard_filename(0)).captions == ["photo number 0", "photo number 1",
                                                                       "photo number 2"]
    assert read_shard(tmp_path / "b" / shard_filename(0)).captions == ["photo number 0", "", "photo number 2"]
    assert b["data"]["captions_missing"] == 1
    with pytest.raises(ValueError, match="'prompt' is not a column"):
        encode_dataset(codec_dir, tmp_path / "jsonl", tmp_path / "c", caption_column="prompt", **kwargs)


def test_write_scaling_factor_changes_only_the_codec_config(tmp_path, photos):
    codec = make_codec(tmp_path / "codec", mean_gain=6.0)
    weights = (codec / "diffusion_pytorch_model.safetensors").read_bytes()
    identity = codec_identity(load_codec(codec))
    manifest = encode_dataset(codec, photos, tmp_path / "out", resolution=RES, num_workers=0, progress=False,
                              write_scaling_factor=True, limit=6)
    config = json.loads((codec / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(manifest["scaling_factor"])
    assert manifest["scaling_factor"] == pytest.approx(1 / manifest["latent_stats"]["std"])
    assert config["scaling_factor"] < 0.7  # the 6x mean gain makes these latents ~1.7x wider than unit scale
    assert (codec / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    assert codec_identity(load_codec(codec)) == identity  # still the same codec for resume/verify
    assert load_codec(codec).config.scaling_factor == pytest.approx(manifest["scaling_factor"])


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        encode_command(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--codec", "--data", "--out", "--resolution", "--caption-column", "--shard-size", "--batch-size",
                 "--crop", "--flip", "--seed", "--num-workers", "--write-scaling-factor", "--limit", "--config",
                 "--set"):
        assert flag in out, flag
    with pytest.raises(SystemExit):
        verify_command(["--help"])
    assert "--codec" in capsys.readouterr().out


def test_benchmark_encode_rates_are_consistent_and_timings_change_no_output(codec_dir, photos, tmp_path):
    timings: dict = {}
    encode_dataset(codec_dir, photos, tmp_path / "timed", resolution=RES, batch_size=4, num_workers=1,
                   progress=False, timings=timings)
    encode_dataset(codec_dir, photos, tmp_path / "plain", resolution=RES, batch_size=4, num_workers=1, progress=False)
    assert_same_shards(tmp_path / "timed", tmp_path / "plain")
    assert set(timings) == {"setup_seconds", "encode_loop_seconds", "waiting_for_data_seconds", "finalize_seconds"}
    assert 0 <= timings["waiting_for_data_seconds"] <= timings["encode_loop_seconds"]

    result = benchmark_encode(codec_dir, photos, batch_size=4, resolution=RES, num_workers=1)
    assert result["images"] == 9  # 10 files, one broken: the bare codec side skips it too
    parts = result["setup_seconds"] + result["encode_loop_seconds"] + result["finalize_seconds"]
    assert parts <= result["end_to_end_seconds"]
    assert result["end_to_end_images_per_s"] == pytest.approx(9 / result["end_to_end_seconds"])
    assert result["codec_images_per_s"] == pytest.approx(9 / result["codec_seconds"])
    assert result["ratio"] == pytest.approx(result["end_to_end_images_per_s"] / result["codec_images_per_s"])
    assert result["ratio_encode_loop"] == pytest.approx(9 / result["encode_loop_seconds"]
                                                        / result["codec_images_per_s"])
    assert result["ratio_encode_loop"] >= result["ratio"]
