"""Attention runs through PyTorch's fused scaled_dot_product_attention (diffusers' AttnProcessor2_0) in the codec's
mid-block and in the U-Net, for models we build and for models our loaders read back: the memory-hungry explicit
softmax(QK^T) path must not come back silently (an (HW)^2 matrix per head: 4096^2 floats for a 64x64 latent)."""

import torch

from codec.exchange.pipeline import LatentDiffusionPipeline
from codec.network.model import build_autoencoder, load_codec
from codec.training.config import load_codec_config
from diffusion.unet import build_unet
from tests.conftest import CONFIGS


def _attention_codec():
    torch.manual_seed(0)
    return build_autoencoder(load_codec_config(CONFIGS / "codec" / "tiny.yaml",
                                               ["model.mid_block_add_attention=true"]).model)


def _processors(model) -> list[str]:
    return sorted({type(p).__name__ for p in model.attn_processors.values()})


def _count_sdpa_calls(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    # diffusers' processors call it as F.scaled_dot_product_attention, looked up at call time.
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


def test_built_codec_and_unet_use_sdpa_and_really_call_it(tiny_unet_config, monkeypatch):
    vae = _attention_codec()
    unet = build_unet(tiny_unet_config.unet, 4, 8, 384)
    # Encoder and decoder mid-block: 2 processors; U-Net (one cross-attention level down and up, and the mid
    # block, self- and cross-attention each): 8.
    assert len(vae.attn_processors) == 2 and _processors(vae) == ["AttnProcessor2_0"]
    assert len(unet.attn_processors) == 8 and _processors(unet) == ["AttnProcessor2_0"]

    calls = _count_sdpa_calls(monkeypatch)
    with torch.no_grad():
        vae(torch.zeros(1, 3, 64, 64))
        assert len(calls) == 2
        unet(torch.zeros(1, 4, 8, 8), 10, encoder_hidden_states=torch.zeros(1, 16, 384))
    assert len(calls) == 2 + 8


def test_loaded_codec_and_pipeline_use_sdpa(tiny_pipeline, tmp_path):
    vae = _attention_codec()
    vae.save_pretrained(tmp_path / "codec", safe_serialization=True)
    assert _processors(load_codec(tmp_path / "codec")) == ["AttnProcessor2_0"]

    components = dict(tiny_pipeline.components, vae=vae)
    LatentDiffusionPipeline(**components).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    for dtype in (torch.float32, torch.bfloat16):  # also as scripts/generate.py --precision bf16 loads it
        pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipe", use_safetensors=True, dtype=dtype)
        assert len(pipe.vae.attn_processors) == 2 and len(pipe.unet.attn_processors) == 8
        assert _processors(pipe.vae) == _processors(pipe.unet) == ["AttnProcessor2_0"]
