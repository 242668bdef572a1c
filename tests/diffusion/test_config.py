import pytest
from accelerate import init_empty_weights

from codec.common.config import ConfigError
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
    with pytest.raises(ConfigError, match="train.shuffle_chunks"):
        load_unet_config(None, ["train.shuffle_chunks=0"])
    with pytest.raises(ConfigError, match="text_encoder.cache_captions"):
        load_unet_config(None, ["text_encoder.cache_captions=-1"])
    with pytest.raises(ConfigError, match="text_encoder.precompute"):  # replaced by cache_captions
        load_unet_config(None, ["text_encoder.precompute=true"])


def _heads(unet) -> dict[str, int]:
    return {name: module.heads for name, module in unet.named_modules() if type(module).__name__ == "Attention"}


def test_heads_per_level_give_32_channel_heads_in_the_small_preset_and_survive_a_folder_round_trip(tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = load_unet_config(CONFIGS / "unet" / "small.yaml").unet
    assert cfg.heads_per_level() == [2, 4, 8]
    with init_empty_weights():
        heads = _heads(build_unet(cfg, 4, 16, 384))
    # Outer level 64 / 2, second 128 / 4, middle block 256 / 8: 32 channels per head everywhere.
    assert heads["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == 2
    assert heads["up_blocks.1.attentions.0.transformer_blocks.0.attn2"] == 4
    assert heads["mid_block.attentions.0.transformer_blocks.0.attn1"] == 8
    assert load_unet_config(None, ["unet.attention_head_dim=4"]).unet.heads_per_level() == [4, 4, 4]

    tiny = load_unet_config(CONFIGS / "unet" / "tiny.yaml", ["unet.attention_head_dim=[1,2]"]).unet
    unet = build_unet(tiny, 4, 8, 384)
    unet.save_pretrained(tmp_path / "unet")
    assert _heads(UNet2DConditionModel.from_pretrained(tmp_path / "unet")) == _heads(unet)


def test_head_counts_that_do_not_fit_the_levels_are_errors():
    with pytest.raises(ConfigError, match="one head count per level \\(3\\), got 2"):
        load_unet_config(None, ["unet.attention_head_dim=[2,4]"])
    with pytest.raises(ConfigError, match="3 heads cannot split a level of width 64"):
        load_unet_config(None, ["unet.attention_head_dim=[3,4,8]"])


def test_optimizer_defaults_are_the_diffusion_ones():
    cfg = load_unet_config(None)
    assert cfg.optim.betas == [0.9, 0.999] and cfg.optim.lr == 1e-4 and cfg.optim.min_lr_ratio == 1.0
    assert cfg.train.ema_decay == 0.9999
