import pytest

from codec.common.config import ConfigError, exit_status, trainer_overrides
from codec.training.config import CodecConfig, load_codec_config
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


def test_trainer_command_max_steps_wins_over_set():
    overrides = trainer_overrides(["train.max_steps=5", "train.batch_size=2"], 9)
    cfg = load_codec_config(CONFIGS / "codec" / "tiny.yaml", overrides)
    assert (cfg.train.max_steps, cfg.train.batch_size) == (9, 2)
    assert trainer_overrides(["train.max_steps=5"], None) == ["train.max_steps=5"]
    with pytest.raises(ConfigError, match=r"train.batch_size and train.grad_accum must be >= 1"):
        load_codec_config(None, trainer_overrides(["train.grad_accum=0"], 3))


def test_exit_status_is_2_with_one_line_for_a_config_error(capsys):
    def failing() -> int:
        load_codec_config(None, ["train.max_steps=many"])
        return 0

    assert exit_status(failing) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.max_steps" in err and err.count("\n") == 1
    assert exit_status(lambda: 0) == 0


def test_the_compression_preset_is_f4_and_starts_from_the_f4_warm_start():
    from codec.network.model import build_autoencoder, latent_shape
    from codec.network.warm_start import thumbnail_init

    cfg = load_codec_config(CONFIGS / "codec" / "compress-f4.yaml")
    assert cfg.model.init == "thumbnail" and not cfg.model.mid_block_add_attention
    vae = thumbnail_init(build_autoencoder(cfg.model))
    assert latent_shape(vae, 512, 512) == (4, 128, 128)  # 12x fewer numbers: the latent of a compression codec
