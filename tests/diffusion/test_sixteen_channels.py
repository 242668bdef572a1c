"""The 16-channel (SD3/Flux-shaped) preset through the whole toolkit at tiny widths: train the codec, encode shards,
train the U-Net on them, generate."""

import json

import torch

from codec.exchange.pipeline import LatentDiffusionPipeline
from codec.shards.encode import encode_dataset
from codec.training.config import load_codec_config
from codec.training.train import train_codec
from diffusion.config import load_unet_config
from diffusion.train import train_unet
from tests.conftest import CONFIGS, reset_accelerate

# f8c16.yaml's shape (4 levels, 16 latent channels) at the tiny preset's widths and budget.
TINY_F8C16 = ("model.block_out_channels=[8,8,16,16]", "model.layers_per_block=1", "model.norm_num_groups=4",
              "model.mid_block_add_attention=false", "loss.perceptual=ms_ssim", "loss.perceptual_weight=0.1",
              "loss.gan_weight=0", "data.crop_size=64", "data.resize=128", "data.val_size=64", "data.val_count=2",
              "data.num_workers=0", "optim.lr=2e-3", "optim.warmup_steps=1", "train.batch_size=4",
              "train.max_steps=3", "train.validate_every=0", "train.checkpoint_every=0", "train.ema_decay=null",
              "train.latent_stats_images=8")


def test_a_16_channel_codec_trains_encodes_trains_a_unet_and_generates(bundled_dir, caption_images, tmp_path,
                                                                       fresh_accelerate_state):
    codec_cfg = load_codec_config(CONFIGS / "codec" / "f8c16.yaml", [
        *TINY_F8C16, f"data.bundled_dir={bundled_dir}", f"train.output_dir={tmp_path / 'codec'}"])
    codec = train_codec(codec_cfg)
    info = json.loads((codec.final / "codec_training.json").read_text())
    assert info["compression_ratio_512"] == 12.0  # 512x512x3 -> 16x64x64

    reset_accelerate()
    manifest = encode_dataset(codec.final, caption_images, tmp_path / "shards", resolution=64, unit_size=4,
                              batch_size=4, num_workers=0, progress=False)
    assert manifest["latent_shape"] == [16, 8, 8] and manifest["count"] == 8

    reset_accelerate()
    unet_cfg = load_unet_config(CONFIGS / "unet" / "tiny.yaml", [
        f"shards={tmp_path / 'shards'}", f"codec={codec.final}", f"train.output_dir={tmp_path / 'unet'}",
        "train.max_steps=3", "train.batch_size=4"])
    result = train_unet(unet_cfg)
    unet_info = json.loads((result.pipeline / "unet_training.json").read_text())
    assert unet_info["compression_ratio"] == 12.0

    pipe = LatentDiffusionPipeline.from_pretrained(result.pipeline, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 16
    images = pipe(["a tabby cat looking up"], num_inference_steps=2, seed=0, output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
