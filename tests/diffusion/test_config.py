import pytest
from accelerate import init_empty_weights

from codec.config import ConfigError
from diffusion.config import load_unet_config
from diffusion.unet import build_unet
from tests.conftest import CONFIGS


def _parameters(preset: str, text_width: int, side: int) -> int:
    cfg = load_unet_config(CONFIGS / "unet" / f"{preset}.yaml")
    with init_empty_weights():  # shapes only: SD's U-Net would take 3.4 GB of RAM
        unet = build_unet(cfg.unet, 4, side, text_width)
    return sum(p.numel() for p in unet.parameters())


def test_presets_have_the_stated_sizes():
    assert _parameters("tiny", 384, 8) == 905_604
    assert _parameters("small", 384, 16) == 13_060_228  # REFERENCE.md's 13 M CPU U-Net
    # With a 768-d text encoder (SD's CLIP ViT-L/14) sd.yaml is exactly SD 1.5's U-Net: 859,520,964 parameters.
    assert _parameters("sd", 768, 64) == 859_520_964
    assert _parameters("sd", 384, 64) < 859_520_964


def test_preset_values():
    tiny = load_unet_config(CONFIGS / "unet" / "tiny.yaml")
    assert tiny.diffusion.num_train_timesteps == 1000 and tiny.diffusion.beta_schedule == "scaled_linear"
    assert (tiny.diffusion.beta_start, tiny.diffusion.beta_end) == (0.00085, 0.012)
    assert tiny.diffusion.prediction_type == "epsilon" and tiny.diffusion.snr_gamma == 5.0
    assert tiny.diffusion.caption_dropout == 0.1 and tiny.text_encoder.path == "minilm"
    sd = load_unet_config(CONFIGS / "unet" / "sd.yaml")
    assert sd.unet.block_out_channels == [320, 640, 1280, 1280] and sd.unet.layers_per_block == 2
    assert sd.unet.attention_head_dim == 8 and sd.unet.cross_attention_dim is None


def test_unknown_keys_and_bad_values_are_errors_naming_them():
    with pytest.raises(ConfigError, match="diffusion.snr_gama"):
        load_unet_config(CONFIGS / "unet" / "tiny.yaml", ["diffusion.snr_gama=5"])
    with pytest.raises(ConfigError, match="prediction_type"):
        load_unet_config(None, ["diffusion.prediction_type=x0"])
    with pytest.raises(ConfigError, match="down_block_types"):
        load_unet_config(None, ["unet.block_out_channels=[32,64]"])
    cfg = load_unet_config(None, ["unet.cross_attention_dim=768"])
    with pytest.raises(ConfigError, match="384-d"):
        build_unet(cfg.unet, 4, 16, 384)
    cfg = load_unet_config(CONFIGS / "unet" / "small.yaml")
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_unet(cfg.unet, 4, 6, 384)


def test_optimizer_defaults_are_the_diffusion_ones():
    cfg = load_unet_config(None)
    assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.lr == 1e-4 and cfg.optim.min_lr_ratio == 1.0
    assert cfg.train.ema_decay == 0.9999
