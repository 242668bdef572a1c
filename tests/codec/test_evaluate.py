"""Codec evaluation: the reference lines' arithmetic, the added metrics, and the evaluate script end to end."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from PIL import Image

from codec.data import CenterCrops, decode_image, load_image_dataset, resize_shorter_side
from codec.measurement.evaluate import reconstruct_posterior_mean
from codec.measurement.metrics import InceptionUnavailable, fid_inception, ms_ssim, psnr, to_uint8_range
from codec.measurement.quality import (
    encode_jpeg,
    jpeg_at_budget,
    latent_budgets,
    thumbnail_baseline,
    thumbnail_image,
    thumbnail_numbers,
)
from codec.network.model import build_autoencoder, reconstruct
from codec.training.config import load_codec_config
from codec.training.losses import ms_ssim_scales
from tests.conftest import CONFIGS, command


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return build_autoencoder(load_codec_config(CONFIGS / "codec" / "tiny.yaml").model).eval()


@pytest.fixture(scope="module")
def astronaut(bundled_dir) -> Image.Image:
    img = resize_shorter_side(decode_image(bundled_dir / "val" / "astronaut.png"), 128)
    return img.crop((0, 0, 128, 128))


@pytest.mark.parametrize("budget", [700, 1024, 2048, 4096, 9000])
def test_jpeg_search_returns_the_highest_quality_that_fits(astronaut, budget):
    fit = jpeg_at_budget(astronaut, budget)
    assert fit.reachable and len(fit.encoded) <= budget
    assert fit.encoded == encode_jpeg(astronaut, fit.quality)
    assert fit.quality == 95 or len(encode_jpeg(astronaut, fit.quality + 1)) > budget
    assert fit.decoded().size == astronaut.size


def test_jpeg_budget_below_quality_1_is_reported_unreachable(astronaut):
    smallest = len(encode_jpeg(astronaut, 1))
    fit = jpeg_at_budget(astronaut, smallest - 1)
    assert not fit.reachable and fit.quality is None and fit.bytes_at_quality_1 == smallest
    with pytest.raises(ValueError, match=f"quality 1 needs {smallest}"):
        fit.decoded()
    assert jpeg_at_budget(astronaut, smallest).quality >= 1


def test_latent_budgets_are_the_latent_in_fp16_and_8_bit(tiny_vae):
    assert latent_budgets(tiny_vae, 256, 256) == {"fp16": 4 * 32 * 32 * 2, "8bit": 4 * 32 * 32}
    assert latent_budgets(tiny_vae, 512, 384) == {"fp16": 4 * 64 * 48 * 2, "8bit": 4 * 64 * 48}


def test_thumbnail_keeps_3_numbers_per_block_and_is_exact_on_block_constant_images():
    assert thumbnail_numbers(256, 256, 8) == 3 * 32 * 32
    assert thumbnail_numbers(512, 384, 8) == 3 * 64 * 48
    with pytest.raises(ValueError, match="not a multiple of the factor 8"):
        thumbnail_numbers(100, 64, 8)
    flat = Image.new("RGB", (64, 48), (200, 30, 90))
    assert thumbnail_image(flat, 8).tobytes() == flat.tobytes()
    # Box averaging: each 8x8 block of a two-valued checkerboard becomes its mean; a flat grey survives upsampling.
    board = torch.zeros(1, 3, 64, 64)
    board[..., ::2, ::2] = board[..., 1::2, 1::2] = 1.0
    board = board * 2 - 1  # pixels 0 and 255 in equal numbers: every block averages to 127.5 -> 128
    out = thumbnail_baseline(board, 8)
    assert out.shape == board.shape and torch.all(to_uint8_range(out) == 128)


def test_ms_ssim_uses_the_scales_that_fit_and_sees_uint8_pixels():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 64, 64)) / 127.5 - 1  # on the uint8 grid
    assert ms_ssim_scales(64) == 3 and ms_ssim_scales(256) == 5
    torch.testing.assert_close(ms_ssim(x, x), torch.ones(2))
    # below half a uint8 step the saved pixels are the same, so the score is exactly that of identical images
    assert torch.equal(ms_ssim(x, x + 0.3 / 127.5), ms_ssim(x, x))
    noisy = ms_ssim(x, x + 0.2 * torch.randn_like(x))
    assert torch.all(noisy < 0.99)


def test_reconstruction_in_tiles_is_the_plain_one_when_one_tile_covers_the_image(tiny_vae):
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(reconstruct_posterior_mean(tiny_vae, x, tile_size=64), reconstruct(tiny_vae, x))
        assert reconstruct_posterior_mean(tiny_vae, torch.rand(1, 3, 96, 80) * 2 - 1,
                                          tile_size=32).shape == (1, 3, 96, 80)


def test_rfid_without_a_usable_inception_file_is_an_error_not_a_missing_number(tmp_path):
    with pytest.raises(InceptionUnavailable, match="torch-fidelity|does not exist"):
        fid_inception(tmp_path / "missing.pth")


def test_evaluate_script_writes_codec_and_reference_lines(tiny_vae, bundled_dir, tmp_path):
    main = command("codec evaluate")
    tiny_vae.save_pretrained(tmp_path / "codec", safe_serialization=True)
    out = tmp_path / "report"
    missing = tmp_path / "no-alexnet.pth"
    code = main(["--codec", str(tmp_path / "codec"), "--data", "bundled", "--bundled-dir", str(bundled_dir),
                 "--resolution", "64", "--out", str(out), "--lpips-backbone", str(missing)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    lines = summary["reference_lines"]

    # The codec's PSNR is exactly what reconstructing the same centre crops gives.
    dataset, column = load_image_dataset(bundled_dir / "val")
    crops = CenterCrops(dataset, column, 64)
    images = torch.stack([crops[i]["pixels"] for i in range(len(crops))])
    with torch.no_grad():
        expected = psnr(images, reconstruct(tiny_vae, images).clamp(-1, 1)).mean()
    assert summary["images"] == 2
    assert summary["psnr"] == pytest.approx(float(expected), abs=1e-4) == lines["codec"]["psnr"]
    assert 0 < summary["ssim"] < 1

    # 64x64 -> latent 4x8x8: 256 numbers, 512 B in fp16 (JPEG fits, at low quality), 256 B in 8 bits (it never does).
    assert lines["codec"]["numbers_per_image"] == 256 and lines["thumbnail"]["numbers_per_image"] == 3 * 8 * 8
    assert lines["jpeg_fp16_size"]["budget_bytes"] == 512 and lines["jpeg_8bit_size"]["budget_bytes"] == 256
    assert lines["jpeg_fp16_size"]["unreachable"] == 0 and lines["jpeg_fp16_size"]["mean_bytes"] <= 512
    assert lines["jpeg_8bit_size"]["unreachable"] == 2 and lines["jpeg_8bit_size"]["psnr"] is None
    assert lines["thumbnail"]["psnr"] > 15 and lines["jpeg_fp16_size"]["psnr"] > 15

    with open(out / "per_image.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 4
    for row in (r for r in rows if r["method"] == "jpeg_fp16_size"):
        crop = Image.open(bundled_dir / "val" / row["image"]).convert("RGB")
        crop = resize_shorter_side(crop, 64)
        left, top = (crop.width - 64) // 2, (crop.height - 64) // 2
        crop = crop.crop((left, top, left + 64, top + 64))
        assert int(row["jpeg_quality"]) == jpeg_at_budget(crop, 512).quality
    assert summary["lpips"] is None and str(missing) in summary["lpips_note"]
    assert summary["rfid"] is None and "not measured" in summary["rfid_note"]
    md = (out / "summary.md").read_text()
    assert "JPEG at the 8-bit latent's size" in md and "unreachable for 2 image(s)" in md
    assert Image.open(out / "worst.png").size == (5 * 64 + 6 * 2, 2 * 64 + 3 * 2)  # 2 images x (original + 4 methods)
