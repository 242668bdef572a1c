from pathlib import Path

import pytest

from tests.diffusion.shards.test_encode import make_codec, write_image_folder


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
