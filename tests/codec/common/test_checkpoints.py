import json
import logging

import pytest
import torch

from codec.common.checkpoints import resolve_resume
from codec.common.config import ConfigError


def _checkpoint(root, step, **state):
    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
    return path


def test_resume_checks_the_recorded_network_and_warns_when_there_is_none(tmp_path, caplog):
    model = {"block_out_channels": [32, 64], "attention_head_dim": [1, 2]}
    assert resolve_resume(tmp_path, "latest", model) == (None, 0)  # nothing saved yet: a fresh start
    _checkpoint(tmp_path, 3, model=model)
    newest = _checkpoint(tmp_path, 12, model=model)
    assert resolve_resume(tmp_path, "latest", model) == (newest, 12)

    other = {**model, "attention_head_dim": 8}
    with pytest.raises(ConfigError, match=r"attention_head_dim: \[1, 2\] in the checkpoint, 8 now"):
        resolve_resume(tmp_path, "latest", other)

    old = tmp_path / "old"
    legacy = _checkpoint(old, 5)  # written before checkpoints recorded their network
    with caplog.at_level(logging.WARNING, logger="codec.common.checkpoints"):
        assert resolve_resume(old, "latest", other) == (legacy, 5)
    assert "resumed unchecked" in caplog.text


def test_ema_weights_swaps_in_and_restores():
    from diffusers.training_utils import EMAModel

    from codec.common.checkpoints import ema_weights

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMAModel(model.parameters(), decay=0.5)
    with torch.no_grad():
        model.weight.fill_(3.0)
    model.train()
    with ema_weights(ema, model) as inside:
        assert inside is model and not model.training
        assert torch.equal(model.weight, torch.ones(1, 2))  # the EMA's weights, not the trained ones
    assert model.training and torch.equal(model.weight, torch.full((1, 2), 3.0))
    with ema_weights(None, model):  # no EMA kept: the model's own weights, in eval mode
        assert not model.training and torch.equal(model.weight, torch.full((1, 2), 3.0))
    assert model.training
