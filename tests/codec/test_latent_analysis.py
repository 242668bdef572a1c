"""The latent analysis: spectra against closed forms, then the whole report of a codec on images."""

import json
import math

import pytest
import torch

from codec.measurement.latent_analysis import (
    analyze_codec,
    high_frequency_share,
    power_spectrum_2d,
    radial_profile,
    radius_grid,
)
from codec.network.model import build_autoencoder
from codec.network.warm_start import thumbnail_init
from codec.training.config import ModelConfig
from tests.conftest import command

TINY = ModelConfig(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4,
                   mid_block_add_attention=False)
WARM = ModelConfig(block_out_channels=[16, 16, 16, 16], layers_per_block=1, norm_num_groups=1,
                   mid_block_add_attention=False)


def cosine(n: int, k: int) -> torch.Tensor:
    """A cosine of k cycles across an n x n map, varying along x."""
    x = torch.arange(n, dtype=torch.float64)
    return torch.cos(2 * math.pi * k * x / n).expand(n, n).reshape(1, 1, n, n)


def test_parseval_the_spectrum_sums_to_the_maps_variance():
    torch.manual_seed(0)
    maps = torch.randn(3, 4, 16, 16) * 2 + 5
    power = power_spectrum_2d(maps)
    expected = maps.double().flatten(0, 1).var(dim=(-2, -1), unbiased=False).mean()
    torch.testing.assert_close(power.sum(), expected)


@pytest.mark.parametrize("k, high", [(2, False), (4, False), (5, True), (8, True)])
def test_a_cosine_puts_all_its_power_in_its_own_ring(k, high):
    # 16 samples: ring k is k/16 cycles per sample; above 0.25 means k > 4.
    power = power_spectrum_2d(cosine(16, k))
    freqs, profile = radial_profile(power)
    assert freqs[k] == k / 16 and profile[k] == pytest.approx(1.0)
    assert high_frequency_share(power) == pytest.approx(1.0 if high else 0.0)


def test_white_noise_has_the_high_frequency_share_of_the_grid_area():
    # A flat spectrum: the share is the fraction of non-DC grid points beyond radius 0.25 (≈ 1 − π/16 = 0.80).
    torch.manual_seed(0)
    power = power_spectrum_2d(torch.randn(64, 1, 32, 32))
    beyond = (radius_grid(32, 32) > 0.25).sum().item() / (32 * 32 - 1)
    assert high_frequency_share(power) == pytest.approx(beyond, abs=0.01)
    assert beyond == pytest.approx(1 - math.pi / 16, abs=0.02)


def test_a_smooth_codec_has_less_high_frequency_power_than_white_noise(bundled_dir):
    # The thumbnail warm start's latents are box thumbnails of the photos (and a fitted luma channel, sharper): they
    # inherit the images' falling spectrum.
    from codec.measurement.latent_analysis import load_images

    images = load_images("bundled", 128, None, bundled_dir)
    torch.manual_seed(0)
    warm = analyze_codec(thumbnail_init(build_autoencoder(WARM)).eval(), images.split(2))
    spectrum = warm["spectrum"]
    assert spectrum["latent_high_frequency_share"] < 0.5 < 1 - math.pi / 16
    # its fitted 4th channel
    assert 0 < spectrum["image_high_frequency_share"] < spectrum["latent_high_frequency_share"]
    assert warm["images"] == 2 and warm["latent_shape"] == [4, 16, 16]
    assert len(warm["channels"]["std"]) == 4 and all(s > 0 for s in warm["channels"]["std"])
    assert set(warm["equivariance_psnr"]) == {"scale 0.5", "scale 0.25", "rotate 90", "rotate 180", "rotate 270"}
    # The warm start is near the linear thumbnail codec: its reconstruction and a 2x downscale's are both sane.
    assert warm["reconstruction"]["psnr"] > 18 and warm["equivariance_psnr"]["scale 0.5"] > 15


def test_the_script_writes_json_markdown_and_plot_for_two_codecs(tmp_path, bundled_dir):
    main = command("analyze latents")

    torch.manual_seed(0)
    for name, vae in (("random", build_autoencoder(TINY)), ("warm", thumbnail_init(build_autoencoder(WARM)))):
        vae.save_pretrained(tmp_path / name / "final", safe_serialization=True)
    out = tmp_path / "report"
    code = main(["--codec", str(tmp_path / "random" / "final"), "--codec", f"warm={tmp_path / 'warm' / 'final'}",
                 "--data", "bundled", "--bundled-dir", str(bundled_dir), "--resolution", "64", "--out", str(out)])
    assert code == 0
    analyses = json.loads((out / "analysis.json").read_text())
    assert list(analyses) == ["random", "warm"]
    assert analyses["warm"]["reconstruction"]["psnr"] > analyses["random"]["reconstruction"]["psnr"]
    assert (out / "spectrum.png").stat().st_size > 1000
    assert "| warm |" in (out / "analysis.md").read_text()


def test_the_script_names_a_missing_codec(tmp_path, bundled_dir, capsys):
    main = command("analyze latents")

    code = main(["--codec", str(tmp_path / "nothing"), "--data", "bundled", "--bundled-dir", str(bundled_dir),
                 "--out", str(tmp_path / "r")])
    assert code == 2 and "nothing" in capsys.readouterr().err
