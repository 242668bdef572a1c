"""Fixtures of the entropy coding tests: the diffusion tests' tiny codec and its shards (reused, not rebuilt), a
second tiny codec, models of both kinds fit briefly on the shards, and test images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.diffusion.conftest import caption_images, one_torch_thread, save_tiny_codec, tiny_codec_dir, tiny_shards  # noqa: F401

KINDS = ("factorized", "context")
# Every model file the fixtures fit: each kind, and models coding through a KLT basis and 2x2 blocks (Haar, DCT).
MODELS = (*KINDS, "context-klt-haar1", "factorized-klt-dct1")


@pytest.fixture(scope="session")
def other_codec_dir(tmp_path_factory) -> Path:
    """The tiny preset with other random weights: another codec, another identity."""
    return save_tiny_codec(tmp_path_factory.mktemp("other_codec"), seed=1)


@pytest.fixture(scope="session")
def model_files(tiny_shards, tmp_path_factory) -> dict[str, Path]:  # noqa: F811 (the imported fixture)
    """{name: model file} fit for 40 steps on the tiny shards: enough to be a model, not a good one."""
    from codec.entropy.fit import FitSettings, fit_entropy_model

    root = tmp_path_factory.mktemp("entropy_models")
    files = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before one_torch_thread; 2 busy threads made this 100x slower
    try:
        for name in MODELS:
            files[name] = root / f"{name}.safetensors"
            spatial = name.split("-")[-1][:-1] if "-klt-" in name else None
            transform = {"channel_basis": "klt", "spatial": spatial, "levels": 1} if spatial else {}
            settings = FitSettings(kind=name.split("-")[0], max_steps=40, batch_size=4, hidden=8, delta_min=0.05,
                                   delta_max=2.0, **transform)
            fit_entropy_model(tiny_shards, files[name], settings, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return files


@pytest.fixture(scope="session")
def photo(caption_images) -> Image.Image:  # noqa: F811 (the imported fixture)
    """A 64x64 RGB photo (the cat)."""
    return Image.open(caption_images / "chelsea.png").convert("RGB")


@pytest.fixture(scope="session")
def odd_photo(bundled_dir) -> Image.Image:
    """A 53x37 (width x height) crop: no side a multiple of the codec's factor 8."""
    source = next(bundled_dir.glob("*/rocket.png"))
    return Image.open(source).convert("RGB").crop((100, 60, 153, 97))
