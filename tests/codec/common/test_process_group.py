"""The process group's timeout is a setting that reaches torch.distributed.init_process_group."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from codec.common.config import ConfigError
from codec.common.distributed import make_accelerator, process_state
from codec.training.config import load_codec_config
from diffusion.config import load_unet_config
from tests.conftest import CONFIGS, reset_accelerate


class Reached(Exception):
    """Raised by the stand-in init_process_group once it has recorded its arguments."""


@pytest.fixture
def group_init(monkeypatch):
    """The environment of rank 0 of a 2-process CPU launch, with init_process_group recording its kwargs
    instead of waiting for a rank 1 that does not exist."""
    seen: dict = {}

    def init_process_group(backend=None, **kwargs):
        seen.update(kwargs, backend=backend)
        raise Reached

    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key, value in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT="29517", OMP_NUM_THREADS="1").items():
        monkeypatch.setenv(key, value)
    return seen


@pytest.mark.parametrize("minutes", [7, 45.5])
def test_the_trainers_accelerator_gives_its_timeout_to_the_process_group(group_init, fresh_accelerate_state, tmp_path,
                                                                         minutes):
    with pytest.raises(Reached):
        make_accelerator("no", 1, tmp_path, minutes)
    assert group_init["backend"] == "gloo" and group_init["timeout"] == timedelta(minutes=minutes)


def test_the_default_timeout_is_30_minutes_and_the_encoder_state_takes_one_too(group_init, fresh_accelerate_state,
                                                                               tmp_path):
    with pytest.raises(Reached):
        make_accelerator("no", 1, tmp_path)
    assert group_init["timeout"] == timedelta(minutes=30)
    reset_accelerate()
    with pytest.raises(Reached):
        process_state("each process would encode every shard", 12)
    assert group_init["timeout"] == timedelta(minutes=12)


def test_both_trainer_configs_carry_the_setting_and_refuse_a_non_positive_one():
    assert load_codec_config(CONFIGS / "codec" / "tiny.yaml").train.process_group_timeout_minutes == 30
    assert load_unet_config(None, ["train.process_group_timeout_minutes=90"]).train.process_group_timeout_minutes == 90
    for load, path in ((load_codec_config, CONFIGS / "codec" / "tiny.yaml"), (load_unet_config, None)):
        with pytest.raises(ConfigError, match="train.process_group_timeout_minutes must be > 0, got 0"):
            load(path, ["train.process_group_timeout_minutes=0"])
