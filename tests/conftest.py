"""Shared fixtures: the tiny codec config and the bundled photos, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite runs with no network: nothing may wait on a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="session")
def bundled_dir(tmp_path_factory) -> Path:
    from codec.data import bundled_photos

    root = tmp_path_factory.mktemp("bundled_photos")
    bundled_photos(root)
    return root


@pytest.fixture
def tiny_config(tmp_path, bundled_dir):
    """Build the tiny preset with test-specific overrides, writing into this test's tmp dir."""
    from codec.config import load_codec_config

    def make(*overrides: str):
        return load_codec_config(
            CONFIGS / "codec" / "tiny.yaml",
            [f"data.bundled_dir={bundled_dir}", f"train.output_dir={tmp_path / 'run'}", *overrides],
        )

    return make


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state; each in-process training run starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
