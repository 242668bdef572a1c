"""Shards made with a codec serve a decoder-only fine-tune of it (same encoder identity) and nothing else."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from codec.common.config import ConfigError
from codec.network.model import build_autoencoder, codec_identity, encoder_identity
from codec.shards import LatentShards
from codec.shards.verify import verify_shards
from codec.training.config import load_codec_config
from diffusion.train import codec_for_shards
from tests.conftest import CONFIGS


def _child(tiny_codec_dir, path, part):
    """The tiny codec with one weight of `part` (decoder or encoder) nudged, saved as a folder."""
    vae = AutoencoderKL.from_pretrained(tiny_codec_dir)
    with torch.no_grad():
        getattr(vae, part).conv_in.bias.add_(1e-3)
    vae.save_pretrained(path, safe_serialization=True)
    return path, vae


def test_shards_record_the_encoder_identity(tiny_shards, tiny_codec_dir):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    expected = encoder_identity(AutoencoderKL.from_pretrained(tiny_codec_dir))
    assert manifest["codec"]["encoder_identity"] == manifest["settings"]["encoder_identity"] == expected
    assert LatentShards(tiny_shards).encoder_identity == expected


def test_a_decoder_only_child_uses_its_parents_shards(tiny_shards, tiny_codec_dir, tmp_path):
    path, child = _child(tiny_codec_dir, tmp_path / "child", "decoder")
    parent = AutoencoderKL.from_pretrained(tiny_codec_dir)
    assert codec_identity(child) != codec_identity(parent) and encoder_identity(child) == encoder_identity(parent)
    vae, shards, _ = codec_for_shards(str(path), str(tiny_shards))
    assert len(shards) == 8 and torch.equal(vae.decoder.conv_in.bias, child.decoder.conv_in.bias)
    assert verify_shards(tiny_shards, path) == []


def test_a_codec_with_another_encoder_is_refused_naming_both_identities(tiny_shards, tiny_codec_dir, tmp_path):
    path, other = _child(tiny_codec_dir, tmp_path / "other", "encoder")
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    with pytest.raises(ConfigError) as caught:
        codec_for_shards(str(path), str(tiny_shards))
    message = str(caught.value)
    assert "\n" not in message
    for identity in (manifest["codec"]["identity"], manifest["codec"]["encoder_identity"], codec_identity(other),
                     encoder_identity(other)):
        assert identity in message
    assert "decoder-only fine-tune" in message and "re-encode" in message
    problems = verify_shards(tiny_shards, path)
    # The manifest and each of its shards.
    assert len(problems) == 1 + len(manifest["units"]) == 3 and "made by codec" in problems[0]


def test_shards_from_before_encoder_identities_accept_only_their_own_codec(tiny_shards, tiny_codec_dir, tmp_path):
    old = tmp_path / "old_shards"
    shutil.copytree(tiny_shards, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["codec"]["encoder_identity"], manifest["settings"]["encoder_identity"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    codec_for_shards(str(tiny_codec_dir), str(old))  # the codec that made them still passes
    path, _ = _child(tiny_codec_dir, tmp_path / "child", "decoder")
    with pytest.raises(ConfigError, match="written before shards recorded encoder identities"):
        codec_for_shards(str(path), str(old))


def test_a_codec_of_other_latent_channels_is_refused_in_those_words(tiny_shards, tmp_path):
    cfg = load_codec_config(CONFIGS / "codec" / "tiny.yaml", ["model.latent_channels=16"])
    build_autoencoder(cfg.model).save_pretrained(tmp_path / "c16")
    with pytest.raises(ConfigError, match=r"c16 makes 16-channel latents but .* holds 4-channel ones"):
        codec_for_shards(str(tmp_path / "c16"), str(tiny_shards))
