"""Encoding datasets into latent shards: equal output for any process count, resume, rejects, captions, verify."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import codec.shards.encode as encode_module
from codec.data import decode_image, pil_to_tensor, resize_shorter_side
from codec.network.model import build_autoencoder, codec_identity, encode_posterior, load_codec
from codec.shards import LatentShards, read_manifest
from codec.shards.encode import deal, encode_dataset
from codec.shards.location import Location
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


def store_records(out) -> list[dict]:
    """Every record of a store, read back through the reader, in store order."""
    shards = LatentShards(out)
    return [shards[i] for i in range(len(shards))]


def chunk_hashes(out) -> list[list[str]]:
    """Each unit's chunk checksums, from the manifest."""
    return [[c["sha256"] for c in unit["chunks"]] for unit in read_manifest(out)["units"]]


def assert_same_store(a, b) -> None:
    """The same units, chunks (byte for byte: their sha256), records and rejects."""
    assert chunk_hashes(a) == chunk_hashes(b)
    ra, rb = store_records(a), store_records(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key], key
    assert Location(a).read_text("rejects.jsonl") == Location(b).read_text("rejects.jsonl")


# `latent-codec shards encode|verify ...` in-process: main(argv) -> exit status.
encode_command, verify_command = command("shards encode"), command("shards verify")


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_write_exactly_the_store_one_process_writes(codec_dir, photos, tmp_path):
    # Same thread count in both runs: CPU convolutions sum in a thread-dependent order (see the module docstring).
    env = launch_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    # 4 units of 3 (the last holds 1), batch 2, random crops: units are dealt round-robin to the two processes.
    common = ["--codec", str(codec_dir), "--data", str(photos), "--resolution", str(RES), "--unit-size", "3",
              "--batch-size", "2", "--crop", "random", "--seed", "7", "--num-workers", "1"]
    two = _run([*TWO_PROCESSES, "-m", "latent_codec", "shards", "encode", *common, "--out", str(tmp_path / "two")], env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does in the launched processes; in-process saves ~8 s of imports
    try:
        assert encode_command([*common, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)

    assert "encode (process 0 of 2, 2 of 4 pending units)" in two.stderr  # really two processes, dealt 2 and 2
    assert_same_store(tmp_path / "one", tmp_path / "two")
    manifest = read_manifest(tmp_path / "two")
    assert [u["records"] for u in manifest["units"]] == [3, 2, 3, 1]  # im04 is a truncated JPEG
    assert manifest["count"] == 9 and manifest["rejected"] == 1
    assert read_manifest(tmp_path / "one")["latent_stats"] == manifest["latent_stats"]


def test_deal_gives_every_pending_unit_once_and_balances_the_shares():
    pending = [0, 1, 2, 5, 6, 7, 8, 11, 13, 14]  # what a lost node left behind: any subset
    for processes in (1, 2, 3, 4, 16):
        shares = [deal(pending, p, processes) for p in range(processes)]
        assert sorted(k for share in shares for k in share) == pending
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_interrupted_encode_resumes_to_identical_output_and_verify_catches_damage(codec_dir, photos, tmp_path,
                                                                                  monkeypatch):
    kwargs = dict(resolution=RES, unit_size=3, batch_size=2, crop="random", seed=1, num_workers=1, progress=False)
    encode_dataset(codec_dir, photos, tmp_path / "whole", **kwargs)

    real_write = encode_module.write_unit
    written = []

    def killed_after_two(store, unit, records, info, chunk_bytes):
        if len(written) == 2:
            raise RuntimeError("killed")
        written.append(unit)
        return real_write(store, unit, records, info, chunk_bytes)

    monkeypatch.setattr(encode_module, "write_unit", killed_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        encode_dataset(codec_dir, photos, tmp_path / "resumed", **kwargs)
    resumed = tmp_path / "resumed"
    assert sorted(p.name for p in (resumed / "units").iterdir()) == ["000000.json", "000001.json"]
    assert not (resumed / "manifest.json").exists()
    before = {unit: (resumed / "units" / f"{unit:06d}.json").stat().st_mtime_ns for unit in written}
    monkeypatch.setattr(encode_module, "write_unit", real_write)
    encode_dataset(codec_dir, photos, resumed, **kwargs)

    assert {unit: (resumed / "units" / f"{unit:06d}.json").stat().st_mtime_ns for unit in written} == before
    assert_same_store(tmp_path / "whole", resumed)
    assert verify_shards(resumed, codec_dir) == []

    other = make_codec(tmp_path / "other", seed=1)
    problems = verify_shards(resumed, other)
    assert len(problems) == 5 and "made by codec" in problems[0]  # the manifest and each of the 4 units

    chunk = resumed / read_manifest(resumed)["units"][2]["chunks"][0]["file"]
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0x01  # one bit of one record
    chunk.write_bytes(bytes(data))
    problems = verify_shards(resumed)
    assert problems == [f"{chunk.name}: sha256 differs from the manifest (the file is damaged or was replaced)"]
    assert verify_command(["--shards", resumed]) == 1
    assert verify_command(["--shards", tmp_path / "whole", "--codec", codec_dir]) == 0
    assert verify_command(["--shards", tmp_path / "whole", "--codec", other]) == 1


def test_a_lost_process_is_redone_balanced_and_gives_the_bytes_of_an_uninterrupted_run(codec_dir, tmp_path):
    """A launched encode whose process dies after committing some units (as a lost node does), then a re-run on
    two processes: only the missing units are encoded, dealt 2 and 2, and the store equals an uninterrupted one."""
    folder = tmp_path / "photos"
    write_image_folder(folder, 10, captions="txt")
    site = tmp_path / "site"
    site.mkdir()
    # The child commits three units, then dies without a word, as a killed node does.
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "import codec.shards.encode as e\n"
        "real, done = e.write_unit, []\n"
        "def dying(*args, **kwargs):\n"
        "    if len(done) == 3:\n"
        "        os._exit(9)\n"
        "    done.append(real(*args, **kwargs))\n"
        "e.write_unit = dying\n")
    common = ["-m", "latent_codec", "shards", "encode", "--codec", str(codec_dir), "--data", str(folder),
              "--resolution", str(RES), "--unit-size", "1", "--batch-size", "1", "--num-workers", "0",
              "--out", str(tmp_path / "lost")]
    died = subprocess.run([sys.executable, *common], cwd=ROOT, env=launch_env(site), capture_output=True, text=True,
                          timeout=300)
    assert died.returncode == 9 and len(list((tmp_path / "lost" / "units").iterdir())) == 3
    # The re-run's processes record the timeout each gives its process group.
    (site / "sitecustomize.py").write_text(
        "import os, torch.distributed as d\n"
        "real = d.init_process_group\n"
        "def init(*args, **kwargs):\n"
        "    with open(os.environ['TIMEOUT_LOG'], 'a') as fh:\n"
        "        fh.write(f\"rank={os.environ['RANK']} timeout={kwargs.get('timeout')}\\n\")\n"
        "    return real(*args, **kwargs)\n"
        "d.init_process_group = init\n")
    log = tmp_path / "timeouts.log"
    rerun = _run([*TWO_PROCESSES, *common, "--process-group-timeout-minutes", "7"],
                 launch_env(site, TIMEOUT_LOG=str(log)))
    assert "encode (process 0 of 2, 4 of 7 pending units)" in rerun.stderr  # 7 left: 4 and 3
    assert sorted(log.read_text().splitlines()) == ["rank=0 timeout=0:07:00", "rank=1 timeout=0:07:00"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_dataset(codec_dir, folder, tmp_path / "whole", resolution=RES, unit_size=1, batch_size=1,
                       num_workers=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert_same_store(tmp_path / "whole", tmp_path / "lost")


def test_resuming_into_a_store_of_another_codec_is_refused(codec_dir, photos, tmp_path, capsys):
    kwargs = dict(resolution=RES, unit_size=4, batch_size=4, num_workers=0, progress=False, limit=4)
    encode_dataset(codec_dir, photos, tmp_path / "out", **kwargs)
    other = make_codec(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match=r"already holds latents made with codec_identity=.*pass a new --out"):
        encode_dataset(other, photos, tmp_path / "out", **kwargs)
    with pytest.raises(ValueError, match=r"resolution=64 .*this run has resolution=32"):
        encode_dataset(codec_dir, photos, tmp_path / "out", **dict(kwargs, resolution=32))
    code = encode_command(["--codec", str(other), "--data", str(photos), "--out", str(tmp_path / "out"),
                           "--resolution", str(RES), "--unit-size", "4", "--limit", "4", "--num-workers", "0"])
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
    manifest = encode_dataset(codec_dir, tmp_path / "odd", tmp_path / "out", resolution=RES, unit_size=10,
                              batch_size=4, crop="random", seed=3, num_workers=1, progress=False)
    assert manifest["count"] == 4 and manifest["rejected"] == 1
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("e_truncated.jpg", "truncated file")]
    assert rejects[0]["source"].endswith("e_truncated.jpg")

    records = store_records(tmp_path / "out")
    assert [r["id"] for r in records] == ["a_cmyk.jpg", "b_16bit.png", "c_rgba.png", "d_gray.png"]
    assert [r["original_size"] for r in records] == [(70, 90), (80, 70), (100, 64), (75, 75)]
    assert [r["row"] for r in records] == [0, 1, 2, 3] and {r["unit"] for r in records} == {0}
    # Each record's latents are the codec's encoding of exactly the crop and flip it records.
    vae = load_codec(codec_dir)
    for record in records:
        img = resize_shorter_side(decode_image(str(tmp_path / "odd" / record["id"])), RES)
        assert (img.size[1], img.size[0]) == record["resized_size"]
        left, top, right, bottom = record["crop_box"]
        assert (right - left == RES and bottom - top == RES and 0 <= left and right <= img.size[0]
                and bottom <= img.size[1])
        pixels = pil_to_tensor(img.crop((left, top, right, bottom)))
        pixels = pixels.flip(-1) if record["flip"] else pixels
        with torch.inference_mode():
            mean = encode_posterior(vae, pixels[None]).mean[0]
        assert torch.allclose(record["mean"], mean, atol=2e-3, rtol=2e-3), record["id"]
        assert record["mean"].shape == (4, RES // 8, RES // 8)
    assert read_manifest(tmp_path / "out")["dtype"] == "float16"


def test_zero_size_and_oversized_images_are_rejected_with_their_reasons(codec_dir, tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    write_image_folder(folder, 3, captions="none")  # 80x64, 64x96, 100x70
    (folder / "im03.png").write_bytes(b"")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 64x96 and 100x70 count as decompression bombs
    manifest = encode_dataset(codec_dir, folder, tmp_path / "out", resolution=RES, num_workers=0, progress=False)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["unit"], r["row"], r["id"], r["reason"].split(":")[0]) for r in rejects] == [
        (0, 1, "im01.png", "decompression bomb"), (0, 2, "im02.png", "decompression bomb"),
        (0, 3, "im03.png", "zero-size file")]
    assert manifest["count"] == 1 and manifest["rejected"] == 3
    assert [r["id"] for r in store_records(tmp_path / "out")] == ["im00.png"]


def test_captions_from_metadata_jsonl_and_from_txt_sidecars(codec_dir, tmp_path):
    write_image_folder(tmp_path / "jsonl", 3, captions="jsonl")
    write_image_folder(tmp_path / "txt", 3, captions="txt")
    (tmp_path / "txt" / "im01.txt").unlink()  # one image without its sidecar
    kwargs = dict(resolution=RES, unit_size=10, num_workers=0, progress=False)
    a = encode_dataset(codec_dir, tmp_path / "jsonl", tmp_path / "a", **kwargs)
    b = encode_dataset(codec_dir, tmp_path / "txt", tmp_path / "b", **kwargs)
    assert a["data"]["captions"] == "column:text" and b["data"]["captions"] == "sidecar:.txt"
    assert [r["caption"] for r in store_records(tmp_path / "a")] == ["photo number 0", "photo number 1",
                                                                      "photo number 2"]
    assert [r["caption"] for r in store_records(tmp_path / "b")] == ["photo number 0", "", "photo number 2"]
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
    for flag in ("--codec", "--data", "--out", "--resolution", "--caption-column", "--unit-size", "--batch-size",
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
    assert_same_store(tmp_path / "timed", tmp_path / "plain")
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
