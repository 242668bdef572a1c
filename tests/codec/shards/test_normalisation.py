"""One latent normalisation, shift_factor and per-channel statistics included (issue 28, points 5 and 6): the
shards measure it in the codec's own form, the reader applies diffusers' formula, the U-Net trainer hands it to
the pipeline unchanged, and the codec export measures the scale with the shards' definition."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codec.data import InputSource
from codec.exchange.pipeline import LatentDiffusionPipeline
from codec.network.model import build_autoencoder, latent_statistics, load_codec
from codec.shards import LatentShards, read_manifest
from codec.shards.encode import Framing, encode_dataset
from codec.training.config import load_codec_config
from diffusion.train import codec_for_shards
from tests.codec.shards.test_encode import write_image_folder
from tests.conftest import CONFIGS

RES = 64
# SD3/Flux-shaped and SDXL-shaped normalisations, neither with scaling_factor 1.
SHIFTED = {"scaling_factor": 0.5, "shift_factor": 0.3}
PER_CHANNEL = {"scaling_factor": 0.5, "latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [2.0, 0.5, 1.0, 4.0]}


def offset_codec(path: Path, norm: dict) -> Path:
    """The tiny codec with posterior means moved by +1 (so a shift has something to remove) and `norm` in its
    config."""
    torch.manual_seed(0)
    vae = build_autoencoder(load_codec_config(CONFIGS / "codec" / "tiny.yaml").model)
    with torch.no_grad():
        vae.quant_conv.bias[: vae.config.latent_channels] += 1.0
    vae.register_to_config(**norm)
    vae.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos") / "photos"
    write_image_folder(folder, 6, captions="jsonl")
    return folder


@pytest.fixture(scope="module", params=["shift", "per_channel"])
def encoded(request, photos, tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    codec = offset_codec(root / "codec", SHIFTED if request.param == "shift" else PER_CHANNEL)
    encode_dataset(codec, photos, root / "shards", resolution=RES, unit_size=3, batch_size=3, num_workers=0,
                   progress=False)
    return request.param, codec, root / "shards"


def by_hand(z: torch.Tensor, form: str, stats: dict) -> torch.Tensor:
    """The dataset's statistics applied in diffusers' formula of the codec's form: (z - mean) / std (shift, scale
    1/std), or (z - mean_c) / std_c per channel (scaling_factor 1)."""
    if form == "shift":
        return (z - stats["mean"]) / stats["std"]
    mean, std = (torch.tensor(stats[k]).view(-1, 1, 1) for k in ("channel_mean", "channel_std"))
    return (z - mean) / std


def test_shards_normalise_in_the_codec_form_with_the_dataset_statistics(encoded):
    form, _, shards_dir = encoded
    stats = read_manifest(shards_dir)["latent_stats"]
    shards = LatentShards(shards_dir)
    mean = shards[2]["mean"]
    gap = float((shards.latents(2, sample=False) - by_hand(mean, form, stats)).abs().max())
    assert gap < 1e-5, (f"{form}: the shards' latents are {gap:.4g} from diffusers' formula with the dataset's "
                        "statistics")
    assert float((shards.unscale(shards.scale(mean)) - mean).abs().max()) < 1e-5


def test_the_unet_trainer_hands_the_shards_normalisation_to_the_pipeline(encoded, tiny_pipeline):
    form, codec, shards_dir = encoded
    stats = read_manifest(shards_dir)["latent_stats"]
    vae, shards, _ = codec_for_shards(str(codec), str(shards_dir))
    if form == "shift":
        assert vae.config.shift_factor == pytest.approx(stats["mean"], rel=1e-9), (vae.config.shift_factor,
                                                                                     stats["mean"])
    else:
        assert vae.config.latents_mean == pytest.approx(stats["channel_mean"], rel=1e-9), vae.config.latents_mean
    pipe = LatentDiffusionPipeline(**{**tiny_pipeline.components, "vae": vae})
    z = shards[0]["mean"][None]
    torch.testing.assert_close(pipe.scale_latents(z), shards.scale(z), rtol=0, atol=1e-6)
    torch.testing.assert_close(pipe.unscale_latents(shards.scale(z)), z, rtol=0, atol=1e-5)


def test_the_export_measures_the_scale_the_shards_measure(encoded, photos):
    """codec.training.train's export and the shards' manifest: one definition (1/std of z ~ q(z|x)), one number on the
    same images (apart from the shards' float16 storage)."""
    _, codec, shards_dir = encoded
    source, framing = InputSource(str(photos)), Framing(RES, "center", 0, "none")
    records = [record for unit in source.units for record in source.records(unit)]
    pixels = torch.stack([framing.prepare(record)["pixels"] for record in records])
    exported = latent_statistics(load_codec(codec), [pixels[:3], pixels[3:]])
    sharded = read_manifest(shards_dir)["latent_stats"]
    assert exported["std"] == pytest.approx(sharded["std"], rel=2e-3), (exported["std"], sharded["std"])
    assert exported["channel_std"] == pytest.approx(sharded["channel_std"], rel=2e-3)
