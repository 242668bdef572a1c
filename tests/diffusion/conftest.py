"""Shared fixtures for the diffusion tests: a tiny codec, a tiny captioned image folder, its latent shards, the
MiniLM text encoder and a tiny untrained pipeline, each built once per session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS

# Eight captioned photos: the seven bundled training photos plus the astronaut, 64x64 centre crops.
CAPTIONS = {
    "chelsea": "a tabby cat looking up",
    "rocket": "a rocket on the launch pad",
    "stereo_motorcycle_left": "a red motorcycle in a room",
    "stereo_motorcycle_right": "a red motorcycle seen from the right",
    "hubble_deep_field": "galaxies in deep space",
    "retina": "a fundus photo of a retina",
    "immunohistochemistry": "stained tissue under a microscope",
    "astronaut": "an astronaut in a white suit",
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared 2-core machine its OpenMP spin-waits made
    the tiny U-Net's steps 10x slower (measured: 80 training steps in 85 s with 2 threads, 10 s with 1, under
    load 5). Restored after each test, so other test folders keep their settings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def caption_images(bundled_dir) -> Path:
    """An imagefolder of 64x64 PNGs with a metadata.jsonl of captions (the `text` column)."""
    from PIL import Image, ImageOps

    root = bundled_dir.parent / "caption_images"
    root.mkdir(exist_ok=True)
    lines = []
    for name, caption in CAPTIONS.items():
        source = next(bundled_dir.glob(f"*/{name}.png"))
        ImageOps.fit(Image.open(source).convert("RGB"), (64, 64), Image.Resampling.BICUBIC).save(root / f"{name}.png")
        lines.append(json.dumps({"file_name": f"{name}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def save_tiny_codec(folder: Path, seed: int) -> Path:
    """The tiny codec preset with random weights drawn from `seed`, saved as a diffusers folder (f8, 4 latent
    channels) at folder/final; another seed is another codec, with another identity."""
    from codec.network.model import build_autoencoder
    from codec.training.config import load_codec_config

    torch.manual_seed(seed)
    vae = build_autoencoder(load_codec_config(CONFIGS / "codec" / "tiny.yaml").model)
    path = folder / "final"
    vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_codec_dir(tmp_path_factory) -> Path:
    """The tiny codec preset with fixed random weights (seed 0)."""
    return save_tiny_codec(tmp_path_factory.mktemp("codec"), seed=0)


@pytest.fixture(scope="session")
def tiny_shards(tiny_codec_dir, caption_images, tmp_path_factory) -> Path:
    """The captioned photos encoded by the tiny codec: 8 records of 4x8x8 latents in two shards."""
    from accelerate.state import AcceleratorState, GradientState

    from codec.shards.encode import encode_dataset

    out = tmp_path_factory.mktemp("shards") / "tiny"
    encode_dataset(tiny_codec_dir, caption_images, out, resolution=64, unit_size=4, batch_size=4, num_workers=0,
                   progress=False)
    AcceleratorState._reset_state(True)  # encode_dataset made a PartialState; trainers start from a clean one
    GradientState._reset_state()
    return out


@pytest.fixture(scope="session")
def minilm():
    """(tokenizer, model) of the bundled MiniLM, with the tiny preset's 16-token captions."""
    from codec.network.text_encoder import load_text_encoder

    tokenizer, model = load_text_encoder("minilm")
    tokenizer.model_max_length = 16
    return tokenizer, model


@pytest.fixture(scope="session")
def tiny_unet_config():
    from diffusion.config import load_unet_config

    return load_unet_config(CONFIGS / "unet" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_codec_dir, minilm, tiny_unet_config):
    """An untrained tiny U-Net (fixed seed) with the tiny codec and MiniLM, DDIM sampler, 64x64 images."""
    from codec.exchange.pipeline import LatentDiffusionPipeline, make_sampler
    from codec.network.model import load_codec
    from codec.network.text_encoder import hidden_width
    from diffusion.schedule import build_noise_scheduler
    from diffusion.unet import build_unet

    tokenizer, model = minilm
    torch.manual_seed(1)
    unet = build_unet(tiny_unet_config.unet, 4, 8, hidden_width(model)).eval()
    scheduler = make_sampler("ddim", build_noise_scheduler(tiny_unet_config.diffusion).config)
    pipe = LatentDiffusionPipeline(vae=load_codec(tiny_codec_dir), unet=unet, scheduler=scheduler,
                                   text_encoder=model, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def generate():
    """`latent-codec generate ...` in-process: main(argv) -> exit status."""
    from tests.conftest import command

    return command("generate")


@pytest.fixture(scope="session")
def pipeline_dir(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline saved as a folder, as `latent-codec unet train` exports one."""
    path = tmp_path_factory.mktemp("generate") / "pipeline"
    tiny_pipeline.save_pretrained(path, safe_serialization=True)
    return path
