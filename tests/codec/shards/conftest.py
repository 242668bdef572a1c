from pathlib import Path

import pytest

from tests.codec.shards.test_encode import make_codec, write_image_folder

# The diffusion tests' session fixtures, reused here (built once per session, not once per folder), and their
# one-thread setting: these tests moved with their code, their fixtures stayed.
from tests.diffusion.conftest import (  # noqa: F401
    caption_images,
    generate,
    minilm,
    one_torch_thread,
    pipeline_dir,
    tiny_codec_dir,
    tiny_pipeline,
    tiny_shards,
    tiny_unet_config,
)


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory) -> Path:
    """A tiny codec folder, made once per test module."""
    return make_codec(tmp_path_factory.mktemp("codec") / "tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """10 images with jsonl captions, 4 of them broken in the ways the encoder must reject."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    write_image_folder(folder, 10, captions="jsonl", broken=4)
    return folder
