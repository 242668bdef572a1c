"""The conditional codec (CVAE): q(z | x, c) and p(x | z, c), with c a class label or a caption's text embedding.

The article's conditional VAE feeds the condition into both networks. Here it is embedded once into
`condition_channels` numbers, and enters in one of two ways (`injection`):

- "concat": the embedding is broadcast over the image (or latent) grid and concatenated as extra input channels, to
  the image at the encoder's input and to the latent at the decoder's input. diffusers' own `Encoder` and `Decoder`
  do the rest, with only their first convolution widened.
- "film": every GroupNorm of both networks is followed by a per-channel scale and shift computed from the embedding
  (FiLM, the way a U-Net takes its timestep), so the condition acts at every depth, not only at the input. The
  maps start at zero: an untrained FiLM codec is the plain AutoencoderKL.

Two further parts, measured on the shapes world (docs/generative-vae.md):

- `coordinates`: the latent grid's x and y as two more decoder input channels. Both injections give every position
  the same numbers, so "at the top left" has nothing spatial to act on; with the maps, a decoder learned to put the
  object where its caption says.
- `standardize_condition` (text): captions' pooled embeddings standardised per feature with the training set's
  statistics (buffers fitted at the first step), so the embedding MLP sees the few percent by which two captions
  differ at unit scale.

Either way the network is AutoencoderKL's apart from the condition's parts. One embedding serves both sides, so the
encoder and decoder agree on what each condition means and a gradient reaches it through both.

The class is a diffusers `ModelMixin` + `ConfigMixin`: `save_pretrained` writes a config.json and safetensors, and
`ConditionalAutoencoderKL.from_pretrained(folder)` (or `model.load_codec`) loads it. Its config also keeps what
turns a user's condition into the tensor the network takes: the class names, or the text encoder and its
max_length, so a prompt embeds the way the training captions did (`condition_tensor`).
"""

from __future__ import annotations

import functools

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, DiagonalGaussianDistribution, Encoder
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from codec.common.config import ConfigError
from codec.common.precision import sample_gaussian
from codec.training.config import INJECTIONS

CONDITIONS = ("class", "text")


class FiLMGroupNorm(nn.Module):
    """GroupNorm, then (1 + scale) * h + shift with (scale, shift) a linear map of the condition's embedding.

    The embedding is set on the module (`embedding`) by the codec before each encode or decode rather than passed as
    an argument, since diffusers' blocks call their norms with the features alone. It stays set after the call, so
    that a gradient-checkpointed block recomputed in the backward pass sees the same condition."""

    def __init__(self, norm: nn.GroupNorm, condition_channels: int):
        super().__init__()
        self.norm = norm
        self.to_scale_shift = nn.Linear(condition_channels, 2 * norm.num_channels)
        nn.init.zeros_(self.to_scale_shift.weight)
        nn.init.zeros_(self.to_scale_shift.bias)
        self.embedding: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        # A copy or pickle of the codec carries its weights, not the last call's condition (a tensor in a graph).
        return {**self.__dict__, "embedding": None}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.embedding is None:
            raise RuntimeError("FiLMGroupNorm called without a condition: call the codec's encode/decode, not its "
                               "encoder or decoder directly")
        # (B, 2C) -> (B, 2C, 1, 1) for the resnets' (B, C, H, W), (B, 2C, 1) for the attention's (B, C, H*W)
        scale_shift = self.to_scale_shift(self.embedding).to(h.dtype)
        scale, shift = scale_shift.view(*scale_shift.shape, *([1] * (h.dim() - 2))).chunk(2, dim=1)
        return self.norm(h) * (1 + scale) + shift


def _film_norms(network: nn.Module, condition_channels: int) -> list[FiLMGroupNorm]:
    """Replace every GroupNorm inside `network` by a FiLMGroupNorm around it (in place); return them in order."""
    replaced = []
    for module in list(network.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.GroupNorm):
                film = FiLMGroupNorm(child, condition_channels)
                setattr(module, child_name, film)
                replaced.append(film)
    return replaced


class ConditionalAutoencoderKL(ModelMixin, ConfigMixin):
    """AutoencoderKL's encoder and decoder, each taking the condition's embedding: as extra input channels
    (injection "concat") or as a scale and shift after every GroupNorm (injection "film").

    `condition` is "class" (an int64 label per image, 0 <= label < len(class_names)) or "text" (a float
    (B, condition_dim) pooled caption embedding, see `pooled_text_embeddings`)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        condition: str = "class",
        class_names: list[str] | None = None,
        condition_dim: int = 384,
        condition_channels: int = 16,
        injection: str = "concat",
        coordinates: bool = False,
        standardize_condition: bool = False,
        text_encoder: str | None = None,
        text_max_length: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 512,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        latents_mean: list[float] | None = None,
        latents_std: list[float] | None = None,
        force_upcast: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"ConditionalAutoencoderKL: condition {condition!r} is not one of {CONDITIONS}")
        if injection not in INJECTIONS:
            raise ValueError(f"ConditionalAutoencoderKL: injection {injection!r} is not one of {INJECTIONS}")
        if condition == "class" and not class_names:
            raise ValueError("ConditionalAutoencoderKL: condition 'class' needs class_names (one name per label)")
        if condition == "text" and not text_encoder:
            raise ValueError("ConditionalAutoencoderKL: condition 'text' needs text_encoder (the folder or 'minilm' "
                             "whose pooled embeddings it was trained on)")
        k = condition_channels
        if condition == "class":
            self.condition_embedding = nn.Embedding(len(class_names), k)
        else:
            # Two layers: a pooled sentence embedding mixes every word, and a linear map into a few channels could not
            # pull apart four independent attributes of a caption.
            self.condition_embedding = nn.Sequential(nn.Linear(condition_dim, 8 * k), nn.SiLU(), nn.Linear(8 * k, k))
            if standardize_condition:
                # Pooled sentence embeddings of one caption template differ from each other by a few percent of
                # their length: standardised per feature (fit_condition_statistics), the MLP sees those differences
                # at unit scale from its first step. Buffers, so the export carries them.
                self.register_buffer("condition_mean", torch.zeros(condition_dim))
                self.register_buffer("condition_std", torch.ones(condition_dim))
        common = dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block, act_fn=act_fn,
                      norm_num_groups=norm_num_groups, mid_block_add_attention=mid_block_add_attention)
        extra = k if injection == "concat" else 0
        self.encoder = Encoder(in_channels=in_channels + extra, out_channels=latent_channels,
                               down_block_types=down_block_types, double_z=True, **common)
        self.decoder = Decoder(in_channels=latent_channels + extra + (2 if coordinates else 0),
                               out_channels=out_channels, up_block_types=up_block_types, **common)
        if injection == "film":
            # Kept as plain lists, not submodules: the norms are already registered inside encoder and decoder.
            self._film = {"encoder": _film_norms(self.encoder, k), "decoder": _film_norms(self.decoder, k)}
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)

    def embed(self, condition: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, condition_channels): the condition's embedding, checked against the batch `like` (B, C, H, W)."""
        if condition is None:
            raise ValueError(f"this codec is conditional ({self.config.condition}): pass the condition of every image")
        if condition.shape[0] != like.shape[0]:
            raise ValueError(f"{condition.shape[0]} conditions for {like.shape[0]} images")
        if self.config.condition == "class":
            if condition.dtype not in (torch.int64, torch.int32) or condition.dim() != 1:
                raise ValueError(f"condition 'class' takes a 1-d integer tensor of labels, got {condition.dtype} "
                                 f"of shape {tuple(condition.shape)}")
            if int(condition.min()) < 0 or int(condition.max()) >= len(self.config.class_names):
                raise ValueError(f"class labels must lie in [0, {len(self.config.class_names)}), got "
                                 f"{int(condition.min())}..{int(condition.max())}")
            embedded = self.condition_embedding(condition.to(like.device, torch.int64))
        else:
            if condition.dim() != 2 or condition.shape[1] != self.config.condition_dim:
                raise ValueError(f"condition 'text' takes (B, {self.config.condition_dim}) pooled text embeddings, "
                                 f"got shape {tuple(condition.shape)}")
            condition = condition.to(like.device, torch.float32)
            if self.config.standardize_condition:
                condition = (condition - self.condition_mean) / self.condition_std
            embedded = self.condition_embedding(condition.to(like.dtype))
        return embedded.to(like.dtype)

    @torch.no_grad()
    def fit_condition_statistics(self, conditions: torch.Tensor) -> None:
        """Set the per-feature mean and standard deviation that text conditions are standardised with, from the
        training set's (N, condition_dim) caption embeddings; a fresh codec's first step, the same on every process."""
        if not self.config.standardize_condition:
            raise ValueError("this codec was built without standardize_condition")
        conditions = conditions.to(self.condition_mean.device, torch.float32)
        self.condition_mean.copy_(conditions.mean(0))
        self.condition_std.copy_(conditions.std(0, unbiased=False).clamp_min(1e-6) if len(conditions) > 1
                                 else torch.ones_like(self.condition_std))

    def _conditioned_input(self, side: str, h: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """`h` with the condition attached the configured way: concatenated as constant maps, or set on the FiLM
        norms of `side` (then `h` passes unchanged)."""
        embedded = self.embed(condition, h)
        if self.config.injection == "concat":
            return torch.cat([h, embedded[:, :, None, None].expand(-1, -1, *h.shape[2:])], dim=1)
        for norm in self._film[side]:
            norm.embedding = embedded
        return h

    def encode(self, x: torch.Tensor, condition: torch.Tensor, return_dict: bool = True):
        moments = self.quant_conv(self.encoder(self._conditioned_input("encoder", x, condition)))
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, condition: torch.Tensor, return_dict: bool = True):
        h = self._conditioned_input("decoder", self.post_quant_conv(z), condition)
        if self.config.coordinates:
            h = torch.cat([h, coordinate_maps(h)], dim=1)
        decoded = self.decoder(h)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    def forward(self, sample: torch.Tensor, condition: torch.Tensor, sample_posterior: bool = False,
                generator: torch.Generator | None = None, return_dict: bool = True):
        posterior = self.encode(sample, condition).latent_dist
        if sample_posterior:  # diffusers' posterior.sample() adds σ·ε in μ's dtype, bf16 under autocast
            noise = randn_tensor(posterior.mean.shape, generator=generator, device=posterior.mean.device,
                                 dtype=torch.float32)
            z = sample_gaussian(posterior.mean, posterior.logvar, noise).to(self.dtype)
        else:
            z = posterior.mode()
        return self.decode(z, condition, return_dict=return_dict)


def coordinate_maps(like: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): the x and y of each position of `like`'s grid, from -1 at the first row or column to 1 at the
    last; a fraction of the side, so the same caption places its object alike at any resolution."""
    batch, _, height, width = like.shape
    ys = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
    xs = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))
    return grid.expand(batch, -1, -1, -1)


def is_conditional(vae) -> bool:
    return isinstance(vae, ConditionalAutoencoderKL)


@torch.no_grad()
def pooled_text_embeddings(tokenizer, model, captions: list[str], max_length: int) -> torch.Tensor:
    """(len(captions), width): the mean of the text encoder's last hidden states over each caption's real tokens
    (padding excluded), the sentence embedding MiniLM was trained to give. Float32, on the CPU."""
    tokens = tokenizer(list(captions), padding="max_length", max_length=max_length, truncation=True,
                       return_tensors="pt")
    hidden = model(input_ids=tokens.input_ids.to(model.device),
                   attention_mask=tokens.attention_mask.to(model.device)).last_hidden_state.float().cpu()
    mask = tokens.attention_mask[:, :, None].float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TextConditions:
    """Caption -> pooled embedding with the text encoder a conditional codec names, loaded once."""

    def __init__(self, text_encoder: str, max_length: int):
        from codec.network.text_encoder import load_text_encoder

        self.tokenizer, self.model = load_text_encoder(text_encoder)
        self.max_length = max_length

    def __call__(self, captions: list[str], batch_size: int = 64) -> torch.Tensor:
        parts = [pooled_text_embeddings(self.tokenizer, self.model, captions[i : i + batch_size], self.max_length)
                 for i in range(0, len(captions), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.model.config.hidden_size)


@functools.lru_cache(maxsize=2)
def _loaded_text_conditions(text_encoder: str, max_length: int) -> TextConditions:
    """One loaded text encoder per (folder, max_length): a demo embeds a prompt at a time, and each would reload it."""
    return TextConditions(text_encoder, max_length)


def condition_tensor(vae: ConditionalAutoencoderKL, *, prompt: str | None = None, label: str | int | None = None,
                     count: int = 1) -> torch.Tensor:
    """The condition a user names (a prompt for a text codec; a class name or index for a class codec), repeated
    `count` times, as the tensor `encode` and `decode` take."""
    cfg = vae.config
    if cfg.condition == "text":
        if prompt is None:
            raise ValueError("this codec is conditioned on text: give a prompt (--prompt)")
        return _loaded_text_conditions(cfg.text_encoder, cfg.text_max_length)([prompt]).repeat(count, 1)
    if label is None:
        raise ValueError(f"this codec is conditioned on a class: give a label (--label), one of {cfg.class_names} "
                         f"or its index")
    names = list(cfg.class_names)
    if str(label) in names:
        index = names.index(str(label))
    elif str(label).lstrip("-").isdigit() and 0 <= int(label) < len(names):
        index = int(label)
    else:
        raise ValueError(f"label {label!r} is not one of this codec's classes {names} (or an index below {len(names)})")
    return torch.full((count,), index, dtype=torch.int64)


DEFAULT_CONDITION_COLUMNS = {"text": ("text", "caption"), "class": ("label",)}


def dataset_conditions(dataset, kind: str, column: str | None, source: str, *, text: TextConditions | None = None,
                       class_names: list[str] | None = None) -> tuple[torch.Tensor, list[str] | None]:
    """Every row's condition, in row order: (N,) int64 labels or (N, width) pooled caption embeddings; and the class
    names (given: a validation set must use the training set's; None: read from the column). `column` None takes
    the first of DEFAULT_CONDITION_COLUMNS[kind] the dataset has.

    A missing column, an empty caption or an unknown class is refused with one line naming the source and column."""
    columns = list(getattr(dataset, "column_names", None) or [])
    what = "captions" if kind == "text" else "class labels"
    wanted = (column,) if column else DEFAULT_CONDITION_COLUMNS[kind]
    column = next((c for c in wanted if c in columns), None)
    if column is None:
        names = " or ".join(repr(c) for c in wanted)
        raise ConfigError(f"{source}: model.condition: {kind} needs {what} in a column {names}, and the dataset has "
                         f"none (columns: {columns}); set data.condition_column to the column that holds them")
    values = dataset[column]
    if kind == "text":
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ConfigError(f"{source}: column {column!r} has {len(bad)} rows without a caption "
                             f"(first: row {bad[0]}); a text-conditioned codec needs a caption for every image")
        return text(list(values)), None
    feature = dataset.features.get(column) if hasattr(dataset, "features") else None
    if class_names is None:
        if hasattr(feature, "names"):  # a datasets ClassLabel: its own names, in label order
            class_names = list(feature.names)
        elif all(isinstance(v, (int,)) and not isinstance(v, bool) for v in values):
            class_names = [str(i) for i in range(max(values) + 1)]
        else:
            class_names = sorted({str(v) for v in values})
    if hasattr(feature, "names") or all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        labels = [int(v) for v in values]
        out_of_range = [v for v in labels if not 0 <= v < len(class_names)]
        if out_of_range:
            raise ConfigError(f"{source}: column {column!r} holds label {out_of_range[0]}, outside the "
                             f"{len(class_names)} classes {class_names}")
    else:
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted({str(v) for v in values} - set(index))
        if unknown:
            raise ConfigError(f"{source}: column {column!r} holds classes {unknown} that are not among the training "
                             f"classes {class_names}")
        labels = [index[str(v)] for v in values]
    return torch.tensor(labels, dtype=torch.int64), class_names
