"""The codec as one original-LDM-format `.safetensors` file: the key names ComfyUI's and AUTOMATIC1111's VAE
loaders read (CompVis/latent-diffusion's `Encoder`/`Decoder`), which diffusers' `AutoencoderKL.from_single_file`
also loads.

diffusers -> LDM is the inverse of diffusers' own `convert_ldm_vae_checkpoint` (loaders/single_file_utils.py):
  encoder.down_blocks.i.resnets.j  -> encoder.down.i.block.j        (conv_shortcut -> nin_shortcut)
  encoder.down_blocks.i.downsamplers.0 -> encoder.down.i.downsample
  decoder.up_blocks.i.*            -> decoder.up.(n-1-i).*           (LDM numbers decoder levels from the bottom)
  *.mid_block.resnets.0/1          -> *.mid.block_1/2
  *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0} -> *.mid.attn_1.{norm,q,k,v,proj_out}, as 1x1 convs
  *.conv_norm_out                  -> *.norm_out
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from codec.common.atomic import write_atomically

_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_key(key: str, levels: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    match = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)$", key)
    if match:
        level, kind, index, rest = match.groups()
        ldm_level = levels - 1 - int(level)
        key = (f"decoder.up.{ldm_level}.block.{index}.{rest}" if kind == "resnets"
               else f"decoder.up.{ldm_level}.upsample.{rest}")
    key = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", key)
    match = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key)
    if match:
        side, name, kind = match.groups()
        key = f"{side}.mid.attn_1.{_ATTENTION[name]}.{kind}"
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def to_ldm_state_dict(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The codec's weights under LDM key names; attention projections become the 1x1 convolutions LDM uses."""
    if not getattr(vae, "has_ldm_layout", True):
        raise ValueError(f"a {type(vae).__name__} has layers LDM's VAE does not (e.g. a global latent's linear "
                         f"layers): it has no LDM layout (its diffusers folder loads with model.load_codec)")
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, tensor in vae.state_dict().items():
        ldm = _ldm_key(key, levels)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        if ldm in out:
            raise ValueError(f"two codec weights map to the LDM key {ldm!r}; this architecture has no LDM layout")
        out[ldm] = tensor.detach() if tensor.is_meta else tensor.detach().cpu().contiguous()  # meta: shapes only
    return out


def save_ldm_vae(vae: AutoencoderKL, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the single-file VAE (atomically). `dtype` (e.g. torch.float16, what most shared VAE files hold)
    casts the weights; None keeps float32. The scaling factor is not part of the format: ComfyUI and AUTOMATIC1111
    take it from the model they pair the VAE with, so a codec with its own factor needs that factor given to them.
    It is kept in the file's metadata (with norm_num_groups, which the weights do not show) for load_ldm_vae."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the single-file VAE is written as .safetensors (ComfyUI and AUTOMATIC1111 load it)")
    tensors = to_ldm_state_dict(vae)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    metadata = {"format": "pt", "norm_num_groups": str(vae.config.norm_num_groups),
                **{key: json.dumps(vae.config.get(key)) for key in LATENT_NORM_KEYS}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


# Prefixes under which full Stable Diffusion checkpoints hold their VAE (diffusers' LDM_VAE_KEYS).
VAE_PREFIXES = ("first_stage_model.", "vae.")
# Not stored in the weights; every SD, SDXL, SD3 and Flux VAE uses 32 groups.
DEFAULT_NORM_GROUPS = 32
# How the codec's latents are normalised for a diffusion model (diffusers' config keys): kept in the metadata.
LATENT_NORM_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


def _vae_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


def ldm_vae_config(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """AutoencoderKL arguments read off an LDM VAE's weights: widths per level, blocks per level, latent channels,
    mid-block attention, quant convs. norm_num_groups and the scaling factor are not in the weights: they come
    from the file's metadata when this project wrote it, else SD's values (32 groups; 0.18215 for 4 channels)."""
    metadata = metadata or {}
    levels = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("encoder.down.")})
    if not levels or "decoder.conv_in.weight" not in tensors or "encoder.conv_in.weight" not in tensors:
        raise ValueError("no LDM VAE weights (encoder.down.*, encoder.conv_in, decoder.conv_in) in it")
    widths = [int(tensors[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    blocks = len({k.split(".")[4] for k in tensors if k.startswith("encoder.down.0.block.")})
    latent = int(tensors["decoder.conv_in.weight"].shape[1])
    norm = {key: json.loads(metadata[key]) for key in LATENT_NORM_KEYS if key in metadata}
    return {
        "in_channels": int(tensors["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(tensors["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": blocks,
        "latent_channels": latent,
        "norm_num_groups": int(metadata.get("norm_num_groups", DEFAULT_NORM_GROUPS)),
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in tensors,
        "use_quant_conv": "quant_conv.weight" in tensors,
        "use_post_quant_conv": "post_quant_conv.weight" in tensors,
        "scaling_factor": 0.18215 if latent == 4 else 1.0,
        **{key: value for key, value in norm.items() if value is not None},
    }


def load_ldm_vae(path: str | os.PathLike, config_dir: str | os.PathLike | None = None) -> AutoencoderKL:
    """An AutoencoderKL from a single-file LDM VAE (`.safetensors` only: a pickle could run code on load), or the
    VAE inside a full SD checkpoint (`first_stage_model.*`). The architecture is read off the weights (or taken from
    a diffusers folder `config_dir`); a key the architecture lacks, or one it needs that the file lacks, is refused
    with the keys named. The key mapping is the inverse of to_ldm_state_dict, one table for both directions."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors VAE files are loaded (a .ckpt/.pt/.bin is a pickle, which can "
                         f"run code when read); convert it with safetensors first")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such VAE file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = _vae_tensors({k: handle.get_tensor(k) for k in handle.keys()})
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        config = (AutoencoderKL.load_config(str(config_dir)) if config_dir is not None
                  else ldm_vae_config(tensors, metadata))
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not an LDM VAE file: {exc}") from None
    try:
        vae = AutoencoderKL.from_config(config)
    except ValueError as exc:  # e.g. widths that SD's 32 groups do not divide
        raise ValueError(f"{path}: no AutoencoderKL has this architecture ({exc}); the file records no "
                         f"norm_num_groups, so {config['norm_num_groups']} was assumed: pass the codec's diffusers "
                         f"folder as its config") from None
    names = {_ldm_key(key, len(vae.config.block_out_channels)): key for key in vae.state_dict()}
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise ValueError(f"{path}: {len(missing)} missing and {len(extra)} unexpected keys for an LDM VAE of "
                         f"{config['block_out_channels']} x {config['layers_per_block']} blocks "
                         f"(missing e.g. {missing[:3]}, unexpected e.g. {extra[:3]})")
    state = {}
    target = vae.state_dict()
    for ldm, key in names.items():
        tensor = tensors[ldm]
        if ".mid.attn_1." in ldm and tensor.ndim == 4 and target[key].ndim == 2:
            tensor = tensor[:, :, 0, 0]  # LDM's 1x1 convolutions are diffusers' linear projections
        if tensor.shape != target[key].shape:
            raise ValueError(f"{path}: {ldm} has shape {tuple(tensor.shape)}, the architecture read off the file "
                             f"needs {tuple(target[key].shape)}")
        state[key] = tensor.float()
    vae.load_state_dict(state, strict=True)
    return vae.eval()


# SD's fixed VAE network, the only one ComfyUI's and AUTOMATIC1111's VAE loaders build (ComfyUI: comfy/sd.py, class
# VAE; AUTOMATIC1111: the ddconfig of SD's v1 yaml): width 128 times these multipliers, 2 res blocks per level, 32
# GroupNorm groups, mid-block attention. Of the file they read only the latent channels.
SD_WIDTH = 128
SD_LAYERS_PER_BLOCK = 2


def sd_fixed_network_config(tensors: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKL arguments for the network ComfyUI builds to load `tensors` (LDM key names): multipliers
    [1, 2, 4, 4], or [1, 2, 4] when the file has neither a third downsample nor a fourth up level (SD's x4
    upscaler VAE); latent channels from decoder.conv_in; quant convs when the file has post_quant_conv (without
    them ComfyUI builds Flux's and SD3's engine, which has none)."""
    three = ("encoder.down.2.downsample.conv.weight" not in tensors
             and "decoder.up.3.upsample.conv.weight" not in tensors)
    widths = [SD_WIDTH * m for m in ([1, 2, 4] if three else [1, 2, 4, 4])]
    quant = "post_quant_conv.weight" in tensors
    return {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths), "block_out_channels": widths,
            "layers_per_block": SD_LAYERS_PER_BLOCK, "latent_channels": int(tensors["decoder.conv_in.weight"].shape[1]),
            "norm_num_groups": DEFAULT_NORM_GROUPS, "use_quant_conv": quant, "use_post_quant_conv": quant}


def sd_fixed_network_mismatches(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Why SD's fixed network (sd_fixed_network_config) cannot take `tensors`: each key it lacks, has in excess or
    holds in another shape, as one readable line; empty when ComfyUI's loader would load the file."""
    config = sd_fixed_network_config(tensors)
    with torch.device("meta"):  # shapes only: no 84 MB of weights allocated to compare against
        network = AutoencoderKL(**config)
    wanted = to_ldm_state_dict(network)
    # Shapes first: ComfyUI loads with strict=False, so a size mismatch is what stops it (missing weights it logs
    # and leaves at their random initialisation, which decodes noise).
    problems = [f"{key} is {tuple(tensors[key].shape)}, SD's network has {tuple(wanted[key].shape)}"
                for key in sorted(set(wanted) & set(tensors)) if tensors[key].shape != wanted[key].shape]
    problems += [f"{key} missing" for key in sorted(set(wanted) - set(tensors))]
    problems += [f"{key} unexpected" for key in sorted(set(tensors) - set(wanted))]
    return problems


def tools_that_load(tensors: dict[str, torch.Tensor]) -> tuple[list[str], str | None]:
    """(the tools that load this LDM VAE file, why the others do not). diffusers reads any architecture through
    from_single_file with the codec's folder as config; ComfyUI needs SD's fixed network, with any latent channel
    count (4 and 16 are what its models pair with); AUTOMATIC1111 also needs 4 latent channels and SD's four levels
    with quant convs (its v1 and XL configs)."""
    problems = sd_fixed_network_mismatches(tensors)
    if problems:
        widths = "-".join(str(SD_WIDTH * m) for m in (1, 2, 4, 4))
        return ["diffusers"], (f"ComfyUI and AUTOMATIC1111 build SD's fixed network (widths {widths}, "
                               f"{SD_LAYERS_PER_BLOCK} res blocks per level, {DEFAULT_NORM_GROUPS} groups) and cannot "
                               f"load this one ({len(problems)} keys differ, e.g. {problems[0]})")
    config = sd_fixed_network_config(tensors)
    if config["latent_channels"] == 4 and len(config["block_out_channels"]) == 4 and config["use_quant_conv"]:
        return ["diffusers", "ComfyUI", "AUTOMATIC1111"], None
    return ["diffusers", "ComfyUI"], (f"AUTOMATIC1111 builds SD 1.x/XL's VAE (4 latent channels, four levels, quant "
                                      f"convs); this one has {config['latent_channels']} latent channels, "
                                      f"{len(config['block_out_channels'])} levels"
                                      f"{'' if config['use_quant_conv'] else ', no quant convs'}")


def export_for_tools(codec_dir: str | os.PathLike, out: str | os.PathLike, name: str = "vae",
                     dtype: torch.dtype | None = torch.float16) -> dict:
    """From a codec folder (a diffusers AutoencoderKL folder, or a pipeline folder's vae/), write into `out`:
    `diffusers/` (AutoencoderKL.from_pretrained loads it) and `<name>.safetensors` (the LDM single file for ComfyUI's
    and AUTOMATIC1111's VAE loaders). The single file is read back by diffusers' from_single_file and its outputs
    compared with the folder's on a test image before the export is reported, so a file that would load wrong is
    never handed out. Returns what was written and the round trip's largest difference."""
    from codec.common.atomic import folder_atomically
    from codec.network.model import downsample_factor, load_codec

    source = Path(codec_dir)
    if (source / "model_index.json").is_file():
        source = source / "vae"
    vae = load_codec(source)
    tensors = to_ldm_state_dict(vae)  # before anything is written: a codec without an LDM layout is refused here
    out = Path(out)
    with folder_atomically(out / "diffusers") as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    path = save_ldm_vae(vae, out / f"{name}.safetensors", dtype)
    back = AutoencoderKL.from_single_file(str(path), config=str(out / "diffusers"), local_files_only=True,
                                          torch_dtype=torch.float32)
    factor = downsample_factor(vae)
    x = torch.rand(1, vae.config.in_channels, 4 * factor, 4 * factor,
                   generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = vae.decode(vae.encode(x).latent_dist.mode()).sample
        have = back.decode(back.encode(x).latent_dist.mode()).sample
    difference = float((want - have).abs().max())
    # fp16 weights round every weight to 11 bits: outputs move by about 4e-3 (tiny codec); a wrong key would move
    # them by ~1.
    tolerance = 0.0 if dtype in (None, torch.float32) else 0.05
    if not difference <= tolerance:
        raise RuntimeError(f"{path}: read back by diffusers' from_single_file it decodes {difference:.3g} away from "
                           f"{source} (allowed {tolerance}); the file is not a faithful copy, do not use it")
    loaders, not_loaded_because = tools_that_load(tensors)
    return {"diffusers": out / "diffusers", "single_file": path, "round_trip_max_difference": difference,
            "scaling_factor": float(vae.config.scaling_factor), "latent_channels": int(vae.config.latent_channels),
            "loaders": loaders, "not_loaded_because": not_loaded_because}
