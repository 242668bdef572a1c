"""Start the codec trainer from a codec the user already has (`model.init: pretrained`, `model.pretrained: PATH`).

PATH is a diffusers `AutoencoderKL` folder (config.json + diffusion_pytorch_model.safetensors) or one
original-LDM-format `.safetensors` VAE file, the kind ComfyUI and AUTOMATIC1111 load (ldm_format.py). Weights
are read from safetensors only: a pickled .ckpt/.bin/.pt can run arbitrary code when loaded.

The architecture is the checkpoint's. `model:` keys the user gave are checked against it, not applied: a config
that says 4 latent channels for a 16-channel parent is a mistake to report, not a network to build. Everything
here runs before the trainer creates its output folder, so a refused parent leaves nothing behind.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging

from codec.common.config import ConfigError
from codec.network.model import codec_identity, encoder_identity
from codec.training.config import ARCHITECTURE_DEFAULTS, ModelConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


@dataclass
class Parent:
    """The loaded parent codec, the model section resolved from it, and what the export records about it."""

    vae: AutoencoderKL
    model: ModelConfig  # the user's model section with every architecture key filled in from the checkpoint
    record: dict  # path, format, identities and latent scale, for codec_training.json


def _refuse(path: str, problem: str) -> ConfigError:
    return ConfigError(f"model.pretrained {path}: {problem}")


def _pickle_refusal(path: str, file: Path) -> ConfigError:
    return _refuse(path, f"{file.name} is a pickle checkpoint, which can run code when loaded; only safetensors "
                         f"weights are read. Convert it (safetensors.torch.save_file) or pass the .safetensors file")


def _check_folder(path: str, folder: Path) -> None:
    """A diffusers AutoencoderKL folder with safetensors weights, or a one-line refusal naming what is wrong."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        pipeline = (folder / "vae" / "config.json").is_file()
        hint = f"; it looks like a pipeline folder: pass {folder / 'vae'}" if pipeline else ""
        raise _refuse(path, f"not a diffusers AutoencoderKL folder (no config.json){hint}")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        raise _refuse(path, "config.json is not a JSON object") from None
    if class_name not in (None, "AutoencoderKL"):
        raise _refuse(path, f"config.json describes a {class_name}, not an AutoencoderKL")
    if not (folder / WEIGHTS).is_file():
        pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_refusal(path, pickles[0])
        raise _refuse(path, f"no {WEIGHTS} in the folder")


@contextmanager
def diffusers_quiet():
    """diffusers' loader logs errors only, for the duration."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _load_error_detail(exc: Exception) -> str:
    """The part of a diffusers loading error that names the tensor (its reports span lines and give advice)."""
    text = str(exc)
    shape = re.search(r"(\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\((\[[^\]]*\])\)", text)
    if shape:
        key, expected, got = shape.groups()
        return f"{key} has shape {got} in the file, config.json needs {expected}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(exc).__name__)


def _load_folder(path: str, folder: Path) -> AutoencoderKL:
    _check_folder(path, folder)
    try:
        with diffusers_quiet():  # its warnings would bury the one-line refusal below
            vae, info = AutoencoderKL.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise _refuse(path, f"{WEIGHTS} does not load into its config.json's AutoencoderKL "
                            f"({_load_error_detail(exc)})") from None
    # diffusers only warns about these and initialises missing weights at random: a fine-tune would start from noise.
    for kind, label in (("missing_keys", "missing keys"), ("unexpected_keys", "unexpected keys"),
                        ("mismatched_keys", "keys of another shape")):
        keys = sorted(map(str, info.get(kind) or []))
        if keys:
            raise _refuse(path, f"{WEIGHTS} does not match its config.json: {len(keys)} {label} "
                                f"(e.g. {', '.join(keys[:3])}); the weights and config.json are of different networks")
    return vae


def _load_single_file(path: str, file: Path) -> AutoencoderKL:
    from codec.exchange.ldm_format import load_ldm_vae

    try:
        return load_ldm_vae(file)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise _refuse(path, str(exc).replace(f"{file}: ", "")) from None


def load_pretrained(path: str) -> tuple[AutoencoderKL, str]:
    """(the parent AutoencoderKL in float32, its format) or a ConfigError naming the file and what is wrong."""
    target = Path(path)
    if target.is_dir():
        vae, kind = _load_folder(path, target), "diffusers folder"
    elif target.is_file():
        if target.suffix in PICKLE_SUFFIXES:
            raise _pickle_refusal(path, target)
        if target.suffix != ".safetensors":
            raise _refuse(path, "expected a diffusers AutoencoderKL folder or an LDM-format .safetensors VAE file")
        vae, kind = _load_single_file(path, target), "LDM single file"
    else:
        raise _refuse(path, "no such file or folder")
    for key in ("in_channels", "out_channels"):
        if vae.config[key] != 3:
            raise _refuse(path, f"{key} is {vae.config[key]}; the trainer's images have 3 (RGB) channels")
    # Training runs in float32 (autocast does the rest); fp16 files are upcast. Only when needed: diffusers warns
    # on every .to(dtype).
    return (vae if vae.dtype == torch.float32 else vae.to(torch.float32)), kind


def _as_config_value(value):
    return list(value) if isinstance(value, tuple) else value


def resolve_model_config(cfg: ModelConfig, vae: AutoencoderKL) -> ModelConfig:
    """`cfg` with every architecture key taken from the parent; a key the user set to another value is an error
    naming the key and both values."""
    values = {}
    for key in ARCHITECTURE_DEFAULTS:
        parent = _as_config_value(vae.config[key])
        given = getattr(cfg, key)
        if given is not None and given != parent:
            raise ConfigError(f"model.{key}: the config says {given!r} but the pretrained codec {cfg.pretrained} has "
                              f"{parent!r}; the architecture comes from the checkpoint: remove model.{key} or set it "
                              f"to {parent!r}")
        values[key] = parent
    return ModelConfig(**values, init=cfg.init, pretrained=cfg.pretrained)


def load_parent(cfg: ModelConfig) -> Parent:
    """The parent codec of a `model.init: pretrained` run, checked, with the model section resolved from it."""
    if not cfg.pretrained:
        raise ConfigError("model.init: pretrained needs model.pretrained (or --pretrained PATH): a diffusers "
                          "AutoencoderKL folder or an LDM-format .safetensors VAE file")
    vae, kind = load_pretrained(cfg.pretrained)
    model = resolve_model_config(cfg, vae)
    record = {
        "path": str(cfg.pretrained),
        "format": kind,
        "codec_identity": codec_identity(vae),
        "encoder_identity": encoder_identity(vae),
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": vae.config.get("shift_factor"),
        "latents_mean": vae.config.latents_mean,
        "latents_std": vae.config.latents_std,
    }
    return Parent(vae=vae, model=model, record=record)
