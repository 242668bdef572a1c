import pytest

from codec.common.config import ConfigError
from codec.config import CodecConfig, load_codec_config
from tests.conftest import CONFIGS


@pytest.mark.parametrize("preset", ["tiny", "small", "kl-f8"])
def test_presets_load(preset):
    cfg = load_codec_config(CONFIGS / "codec" / f"{preset}.yaml")
    assert isinstance(cfg, CodecConfig)
    assert cfg.model.latent_channels == 4
    assert len(cfg.model.block_out_channels) == 4  # f8: three halvings


def test_unknown_key_is_an_error_naming_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("loss:\n  kl_weigth: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"loss\.kl_weigth"):
        load_codec_config(path)


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("trian:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="trian"):
        load_codec_config(path)


def test_set_overrides_parse_values_as_yaml():
    cfg = load_codec_config(
        CONFIGS / "codec" / "tiny.yaml",
        ["loss.kl_weight=1e-4", "train.max_steps=7", "model.block_out_channels=[8,8,8,8]", "optim.max_grad_norm=null",
         "loss.learn_logvar=true"],
    )
    assert cfg.loss.kl_weight == pytest.approx(1e-4)
    assert cfg.train.max_steps == 7
    assert cfg.model.block_out_channels == [8, 8, 8, 8]
    assert cfg.optim.max_grad_norm is None
    assert cfg.loss.learn_logvar is True


def test_wrong_type_and_bad_choice_are_errors():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_codec_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_codec_config(None, ["train.max_steps=2.5"])
    with pytest.raises(ConfigError, match="loss.pixel"):
        load_codec_config(None, ["loss.pixel=l3"])
    with pytest.raises(ConfigError, match="not divisible"):
        load_codec_config(None, ["model.norm_num_groups=7"])
    with pytest.raises(ConfigError, match="key=value"):
        load_codec_config(None, ["train.max_steps"])
