"""The global-latent codec (model.global_latent): every latent number sees the whole image, and back."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from codec.common.config import ConfigError
from codec.exchange.ldm_format import to_ldm_state_dict
from codec.network.global_latent import GlobalLatentAutoencoderKL
from codec.network.model import build_autoencoder, load_codec, prior_latents
from codec.training.config import ModelConfig, load_codec_config


def _model(global_latent: bool) -> AutoencoderKL:
    torch.manual_seed(0)
    cfg = ModelConfig(block_out_channels=[8, 16, 32], layers_per_block=1, latent_channels=1, norm_num_groups=8,
                      mid_block_add_attention=False, sample_size=64, global_latent=global_latent)
    return build_autoencoder(cfg).eval()


def _far_over_near(vae: AutoencoderKL) -> float:
    """When only the top-left latent number changes, how much the far corner's pixels move relative to the top-left
    ones (GroupNorm's statistics span the image, so a grid codec's far corner moves a little too)."""
    z = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    z2 = z.clone()
    z2[..., 0, 0] += 3.0
    with torch.no_grad():
        drawn = (vae.decode(z).sample - vae.decode(z2).sample).abs()
    return float(drawn[..., -16:, -16:].mean() / drawn[..., :16, :16].mean())


def test_every_latent_number_draws_the_whole_image():
    grid, global_ = _far_over_near(_model(False)), _far_over_near(_model(True))
    # 64 px with 3 levels: a 16x16 latent grid. Measured: 0.02 for the grid codec, 0.9 for the global one.
    assert global_ > 0.5 and global_ > 10 * grid, (grid, global_)


def test_exports_load_with_load_codec_and_other_sizes_are_refused(tmp_path):
    vae = _model(True)
    vae.save_pretrained(tmp_path / "global")
    loaded = load_codec(tmp_path / "global")
    assert isinstance(loaded, GlobalLatentAutoencoderKL)
    z = prior_latents(vae, 2, 64, 64, torch.Generator().manual_seed(0))
    assert z.shape == (2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, loaded.decode(z).sample)
        with pytest.raises(ValueError, match="encodes 64x64 images only"):
            loaded.encode(torch.zeros(1, 3, 32, 32))
        with pytest.raises(ValueError, match="decodes 16x16 latents only"):
            loaded.decode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="no LDM layout"):
        to_ldm_state_dict(loaded)
    with torch.device("meta"):  # the β study's preset is one
        study = build_autoencoder(load_codec_config("configs/codec/beta-study.yaml").model)
    assert isinstance(study, GlobalLatentAutoencoderKL) and study.latent_grid == 4


def test_config_refuses_a_conditional_or_pretrained_global_latent_and_mismatched_sizes(tiny_config):
    with pytest.raises(ConfigError, match="global_latent builds a new unconditional network"):
        ModelConfig(global_latent=True, condition="text")
    with pytest.raises(ConfigError, match="must be equal"):
        tiny_config("model.global_latent=true", "model.sample_size=32")  # the tiny preset crops 64 px
    cfg = tiny_config("model.global_latent=true", "model.sample_size=64")
    assert cfg.model.architecture()["global_latent"] is True
    assert "global_latent" not in tiny_config().model.architecture()


def test_generate_draws_prior_samples_at_the_codecs_size_and_refuses_other_sizes_in_one_line(tmp_path, capsys):
    from PIL import Image

    from tests.conftest import command

    vae = _model(True)
    vae.save_pretrained(tmp_path / "global")
    generate, out = command("generate"), tmp_path / "out"
    assert generate(["--codec", tmp_path / "global", "--prior-samples", "2", "--seed", "0", "--out", out]) == 0
    record = json.loads((out / "prior-seed0.json").read_text())
    assert record["output"]["latent_shape"] == [1, 16, 16] and Image.open(out / "prior-seed0-0.png").size == (64, 64)
    Image.new("RGB", (96, 96), (200, 30, 30)).save(tmp_path / "photo.png")
    capsys.readouterr()
    assert generate(["--codec", tmp_path / "global", "--reconstruct", tmp_path / "photo.png", "--out", out]) != 0
    err = capsys.readouterr().err
    assert "encodes 64x64 images only" in err and err.count("\n") == 1, err


def test_export_for_tools_refuses_a_global_latent_before_writing_anything(tmp_path, capsys):
    from tests.conftest import command

    _model(True).save_pretrained(tmp_path / "global")
    assert command("codec export")(["--codec", tmp_path / "global", "--out", tmp_path / "export"]) != 0
    assert "no LDM layout" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
