"""The rate-distortion sweep: curve arithmetic on made-up curves with exact answers, rates that are the real files'
bytes, the KL rate against a hand computation from the posterior, and scripts/rate_distortion.py end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from codec.data import pil_to_tensor
from codec.entropy.bitstream import MAGIC, OVERHEAD_BYTES
from codec.entropy.coder import decompress_symbols, read_compressed
from codec.entropy.models import load_model
from codec.entropy.rate_distortion import (
    above_at_every_rate,
    bits_saving_at_equal_psnr,
    codec_point,
    geometric_steps,
    interpolate_psnr_at,
    kl_bits_per_pixel,
    merge_sweeps,
    pillow_point,
)
from codec.entropy.symbols import symbol_bits
from codec.measurement.quality import encode_jpeg, encode_webp
from codec.network.model import codec_identity, downsample_factor, load_codec
from tests.codec.entropy.test_compress import refused, run
from tests.conftest import command

SIDE = 40  # a multiple of the tiny codec's factor 8: a 4x5x5 latent


def curve(*points: tuple[float, float]) -> list[dict]:
    return [{"bpp": bpp, "psnr": value} for bpp, value in points]


@pytest.fixture(scope="module")
def rd_main():
    return command("analyze rate-distortion")


@pytest.fixture(scope="module")
def images(photo, odd_photo) -> torch.Tensor:
    """Two 40x40 photos in [-1, 1] at uint8 levels, as the script's loader gives them."""
    crops = [photo.crop((12, 12, 12 + SIDE, 12 + SIDE)), odd_photo.resize((SIDE, SIDE), Image.Resampling.BICUBIC)]
    return torch.stack([pil_to_tensor(img) for img in crops])


@pytest.fixture(scope="module")
def vae(tiny_codec_dir):
    return load_codec(tiny_codec_dir)


# ---------------------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------------------


def test_psnr_is_interpolated_linearly_in_bpp_and_not_extrapolated():
    points = curve((0.5, 31.0), (0.1, 20.0), (0.3, 30.0))  # unsorted on purpose
    assert interpolate_psnr_at(points, 0.2) == pytest.approx(25.0)
    assert interpolate_psnr_at(points, 0.4) == pytest.approx(30.5)
    assert interpolate_psnr_at(points, 0.1) == 20.0 and interpolate_psnr_at(points, 0.5) == 31.0
    assert interpolate_psnr_at(points, 0.05) is None and interpolate_psnr_at(points, 0.6) is None
    assert interpolate_psnr_at(curve((0.2, 27.0)), 0.2) == 27.0 and interpolate_psnr_at([], 0.2) is None


def test_a_rate_below_the_references_lowest_is_not_comparable_and_not_a_win():
    ours = curve((0.1, 25.0), (0.2, 28.0), (0.3, 30.0))
    reference = curve((0.15, 24.0), (0.25, 27.0), (1.0, 35.0))
    check = above_at_every_rate(ours, reference, 0.25)
    # Our points <= 0.25 bpp (0.1, 0.2) and the reference's points within our range and <= 0.25 (0.15, 0.25).
    assert [(r["bpp"], r["at"]) for r in check["points"]] == [(0.1, "ours"), (0.15, "reference"), (0.2, "ours"),
                                                              (0.25, "reference")]
    margins = [r["margin"] for r in check["points"]]
    assert margins[0] is None and check["points"][0]["reference"] is None
    assert margins[1:] == pytest.approx([26.5 - 24.0, 28.0 - 25.5, 29.0 - 27.0])
    assert check["holds"] is None and check["verdict"].startswith("not established")
    assert "0.1000" in check["verdict"] and "0.1500" in check["verdict"]  # the rate, and the reference's lowest


def test_above_holds_only_when_every_rate_is_compared_and_won():
    ours = curve((0.2, 30.0), (0.3, 32.0))
    won = above_at_every_rate(ours, curve((0.1, 20.0), (0.4, 26.0)), 0.25)
    assert won["holds"] is True and [r["margin"] for r in won["points"]] == pytest.approx([30.0 - 22.0, 31.0 - 23.0])
    lost = above_at_every_rate(ours, curve((0.1, 29.0), (0.4, 35.0)), 0.25)
    assert lost["holds"] is False and lost["points"][0]["margin"] == pytest.approx(-1.0)
    assert "0.2000" in lost["verdict"]
    nothing = above_at_every_rate(curve((0.5, 33.0)), curve((0.1, 20.0), (1.0, 40.0)), 0.25)
    assert nothing["holds"] is None and nothing["points"] == []
    ms_ssim = above_at_every_rate([{"bpp": 0.2, "ms_ssim": 0.9}], [{"bpp": 0.1, "ms_ssim": 0.7},
                                                                   {"bpp": 0.3, "ms_ssim": 0.95}], 0.25, "ms_ssim")
    assert ms_ssim["holds"] is True and ms_ssim["points"][0]["margin"] == pytest.approx(0.9 - 0.825)


def test_a_crossing_between_the_last_vertex_and_the_target_rate_is_a_loss():
    # Ahead at every vertex up to 0.25 bpp (0.1, 0.2), behind at 0.25 itself (25.75 against 26.25 dB): the
    # reference's next vertex, 0.3, lies past the target. The old check compared vertices only and said yes.
    ours = curve((0.1, 25.0), (0.3, 26.0))
    reference = curve((0.1, 24.0), (0.2, 24.5), (0.3, 28.0))
    check = above_at_every_rate(ours, reference, 0.25)
    assert [(r["bpp"], r["at"]) for r in check["points"]] == [(0.1, "ours"), (0.2, "reference"), (0.25, "end")]
    assert check["points"][-1]["margin"] == pytest.approx(25.75 - 26.25)
    assert check["holds"] is False and "0.2500" in check["verdict"]


def test_bits_saving_at_equal_psnr_over_the_common_range():
    factorized = curve((1.0, 20.0), (1.5, 25.0), (2.0, 30.0))
    # A constant 20% fewer bits at every PSNR.
    uniform = bits_saving_at_equal_psnr(curve((0.8, 20.0), (1.6, 30.0)), factorized)
    assert [r["saving"] for r in uniform["levels"]] == pytest.approx([0.2, 0.2, 0.2])
    # Context 0.5 -> 2.0 bpp over 20 -> 30 dB: at 20 dB 1 - 0.5/1, at 25 dB 1 - 1.25/1.5, at 30 dB 1 - 2/2.
    varying = bits_saving_at_equal_psnr(curve((0.5, 20.0), (2.0, 30.0)), factorized)
    assert [r["psnr"] for r in varying["levels"]] == [20.0, 25.0, 30.0]
    assert [r["saving"] for r in varying["levels"]] == pytest.approx([0.5, 1 / 6, 0.0])
    assert varying["min"] == pytest.approx(0.0) and varying["mean"] == pytest.approx((0.5 + 1 / 6) / 3)
    # Only the PSNR both curves reach counts: 25..30 dB here.
    partial = bits_saving_at_equal_psnr(curve((1.2, 25.0), (1.8, 35.0)), factorized)
    assert partial["psnr_range"] == [25.0, 30.0]
    assert [r["saving"] for r in partial["levels"]] == pytest.approx([1 - 1.2 / 1.5, 1 - 1.5 / 2.0])
    apart = bits_saving_at_equal_psnr(curve((3.0, 40.0), (4.0, 45.0)), factorized)
    assert apart["psnr_range"] is None and apart["min"] is None and apart["levels"] == []


def test_default_steps_are_geometric_and_span_the_range():
    steps = geometric_steps(0.05, 2.0, 8)
    assert len(steps) == 8 and steps[0] == pytest.approx(0.05) and steps[-1] == pytest.approx(2.0)
    ratios = [b / a for a, b in zip(steps, steps[1:])]
    assert ratios == pytest.approx([40 ** (1 / 7)] * 7)


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["factorized", "context"])
def test_a_codec_points_rate_is_its_files_bytes(vae, tiny_codec_dir, model_files, images, tmp_path, kind):
    """Each point's bpp is its files' bytes and its model_bpp the model's bits of the files' own symbols, which the
    payloads cost to within the coder's last words; both fall as Δ grows."""
    model, identity = load_model(model_files[kind]), codec_identity(vae)
    points = []
    for step in (0.25, 0.5, 1.0):
        files_dir = tmp_path / str(step)
        point = codec_point(vae, model, kind, images, step, identity, files_dir=files_dir)
        files = [files_dir / f"{i}.lcc" for i in range(len(images))]
        sizes = [f.stat().st_size for f in files]
        assert point["bytes"] == sizes and min(sizes) > OVERHEAD_BYTES
        assert point["bpp"] == pytest.approx(sum(8 * s / SIDE**2 for s in sizes) / len(sizes))
        model_bits = []
        for f in files:  # real files of this codec and model, the header counted in the rate
            data = f.read_bytes()
            assert data.startswith(MAGIC)
            header, words = read_compressed(data, f.name, model, identity, downsample_factor(vae))
            assert (header.height, header.width, header.step) == (SIDE, SIDE, point["step"])
            y = decompress_symbols(model, header, words, f.name)
            model_bits.append(symbol_bits(model, y, header.step, header.low, header.high))
            assert abs(32 * len(words) - model_bits[-1]) <= 64, (32 * len(words), model_bits[-1])
        assert point["model_bpp"] == pytest.approx(sum(model_bits) / len(model_bits) / SIDE**2, rel=1e-12)
        assert point["step"] == pytest.approx(step) and math.isfinite(point["psnr"]) and 0 <= point["ms_ssim"] <= 1
        points.append(point)
    assert points[0]["model_bpp"] > points[1]["model_bpp"] > points[2]["model_bpp"] > 0
    assert points[0]["bpp"] >= points[1]["bpp"] >= points[2]["bpp"] and points[0]["bpp"] > points[2]["bpp"]


@pytest.mark.parametrize("method, encode, qualities", [("jpeg", encode_jpeg, (5, 50, 95)),
                                                       ("webp", encode_webp, (0, 50, 95))])
def test_pillow_rates_are_the_encoded_bytes_and_rise_with_quality(images, tmp_path, method, encode, qualities):
    from codec.data import tensor_to_pil

    points = [pillow_point(method, images, q, files_dir=tmp_path / str(q)) for q in qualities]
    for q, point in zip(qualities, points):
        sizes = [len(encode(tensor_to_pil(x), q)) for x in images]
        assert point["bytes"] == sizes and point["quality"] == q
        assert sorted(f.stat().st_size for f in (tmp_path / str(q)).iterdir()) == sorted(sizes)
        assert point["bpp"] == pytest.approx(sum(s * 8 / SIDE**2 for s in sizes) / len(sizes))
    assert [p["bpp"] for p in points] == sorted(p["bpp"] for p in points) and points[0]["bpp"] < points[-1]["bpp"]
    assert points[0]["psnr"] < points[-1]["psnr"]


def test_kl_bits_per_pixel_is_the_posteriors_kl_in_bits_per_pixel(vae, images):
    expected = []
    with torch.no_grad():
        for x in images:
            posterior = vae.encode(x[None]).latent_dist
            mean, logvar = posterior.mean.double(), posterior.logvar.double()
            nats = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum().item()
            expected.append(nats / math.log(2) / SIDE**2)
    # rel 1e-6: the encoder runs in float32, and a padded copy of the input may take another convolution path
    assert kl_bits_per_pixel(vae, images) == pytest.approx(sum(expected) / len(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------------------------


def finite_numbers(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(finite_numbers(v) for v in value)
    return True


def test_the_script_writes_the_json_the_plot_and_the_report(rd_main, tiny_codec_dir, model_files, bundled_dir,
                                                            tmp_path, capsys):
    out = tmp_path / "rd"
    argv = ["--codec", tiny_codec_dir, "--entropy-model", model_files["factorized"],
            "--entropy-model", model_files["context"],
            "--data", "bundled", "--bundled-dir", bundled_dir, "--resolution", 32, "--limit", 2,
            "--deltas", 0.3, 1.0, "--jpeg-qualities", 5, 50, "--webp-qualities", 5, 50, "--out", out, "--device", "cpu"]
    status, printed, _ = run(rd_main, argv, capsys)
    assert status == 0 and "report:" in printed
    result = json.loads((out / "rd.json").read_text())
    assert {"curves", "kinds", "above_references", "context_savings", "kl_bits_per_pixel", "speed", "models",
            "images", "resolution", "overhead_bytes"} <= result.keys()
    assert result["images"] == 2 and result["resolution"] == [32, 32]
    assert list(result["curves"]) == ["factorized", "context", "jpeg", "webp"]
    for _label, points in result["curves"].items():
        assert len(points) == 2 and [p["bpp"] for p in points] == sorted(p["bpp"] for p in points)
        for p in points:
            assert {"bpp", "psnr", "ms_ssim", "encode_seconds", "decode_seconds", "bytes"} <= p.keys()
    assert finite_numbers(result) and result["kl_bits_per_pixel"] > 0
    # The same steps give both models the same symbols, hence the same images.
    for f, c in zip(result["curves"]["factorized"], result["curves"]["context"]):
        assert f["psnr"] == c["psnr"] and f["step"] == c["step"]
    assert {(a["ours"], a["reference"], a["metric"]) for a in result["above_references"]} == {
        (o, r, m) for o in ("factorized", "context") for r in ("jpeg", "webp") for m in ("psnr", "ms_ssim")}
    assert [(s["context"], s["factorized"]) for s in result["context_savings"]] == [("context", "factorized")]
    with Image.open(out / "rd.png") as plot:
        assert plot.format == "PNG"
    report = (out / "report.md").read_text()
    for heading in ("At or below 0.25 bpp", "Context model vs factorized", "KL beside the measured rate",
                    "Speed per 32x32 image", "Every point"):
        assert heading in report
    assert f"{result['kl_bits_per_pixel']:.4f} bpp" in report


def test_the_script_refuses_a_model_fit_for_another_codec(rd_main, other_codec_dir, model_files, tmp_path, capsys):
    out = tmp_path / "rd"
    line = refused(rd_main, ["--codec", other_codec_dir, "--entropy-model", model_files["context"], "--out", out,
                             "--device", "cpu"], capsys, model_files["context"])
    assert "was fit on latents of codec" in line and not out.exists()


def test_the_script_refuses_two_unnamed_models_of_one_kind_and_unreadable_data(rd_main, tiny_codec_dir, model_files,
                                                                              tmp_path, capsys):
    out = tmp_path / "rd"
    common = ["--codec", tiny_codec_dir, "--out", out, "--device", "cpu"]
    model = model_files["factorized"]
    line = refused(rd_main, [*common, "--entropy-model", model, "--entropy-model", model], capsys, model)
    assert "name them" in line
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    refused(rd_main, [*common, "--entropy-model", model, "--data", junk], capsys, junk)
    refused(rd_main, [*common, "--entropy-model", model, "--jpeg-qualities", 0], capsys, "--jpeg-qualities")
    assert not out.exists()


def test_plot_rd_overlays_the_codec_curves_of_sweeps_of_the_same_images(tmp_path, capsys):
    main = command("analyze plot-rd")

    def sweep(name: str, **changes) -> Path:
        result = {"images": 2, "resolution": [64, 64], "data": "bundled", "target_bpp": 0.25,
                  "curves": {"context": curve((0.1, 20.0), (0.3, 25.0)), "jpeg": curve((0.2, 21.0), (0.4, 26.0))},
                  "kinds": {"context": "context", "jpeg": "jpeg"}, **changes}
        for points in result["curves"].values():
            for p in points:
                p["ms_ssim"] = p["psnr"] / 30
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(result))
        return path

    plain, noisy = sweep("plain"), sweep("noisy")
    merged = merge_sweeps([("plain", json.loads(plain.read_text())), ("noisy", json.loads(noisy.read_text()))])
    assert list(merged["curves"]) == ["plain: context", "jpeg", "noisy: context"]  # JPEG once, from the first
    assert main([f"plain={plain}", f"noisy={noisy}", "--out", tmp_path / "both"]) == 0
    with Image.open(tmp_path / "both" / "rd.png") as plot:
        assert plot.format == "PNG"
    capsys.readouterr()
    # Sweeps of other images do not share an axis: refused in one line naming the label.
    other = sweep("other", resolution=[128, 128])
    assert main([f"plain={plain}", f"big={other}", "--out", tmp_path / "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latent-codec analyze plot-rd: error: big: swept resolution") and "\n" not in err
    assert not (tmp_path / "x").exists()
    assert main([f"plain={tmp_path / 'missing.json'}", "--out", tmp_path / "x"]) == 2
    assert "missing.json" in capsys.readouterr().err
