"""Fixtures of the experiments' tests."""

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
