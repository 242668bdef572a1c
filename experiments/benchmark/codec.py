"""What the codecs cost at one 512x512 image: the presets and TAESD built with random weights (cost does not
depend on them), their FLOPs counted on the meta device, and their encode and decode seconds, including the
small preset against TAESD in turns and the candidate widths that led to the small preset."""

from __future__ import annotations

import dataclasses
import statistics

import torch
from diffusers import AutoencoderTiny

from codec.network.fast import prepare_for_inference
from codec.network.model import build_autoencoder
from codec.training.config import load_codec_config
from experiments import CHECKOUT
from experiments.benchmark.common import PRESETS, SIDE, progress
from experiments.benchmark.environment import matmul_peak
from experiments.benchmark.timing import median_seconds, take_turns
from experiments.benchmark.unet import forward_flops

# Widths tried for the small preset (docs/performance.md): the rest of its configuration as in small.yaml.
CANDIDATE_WIDTHS = ([32, 64, 128, 128], [32, 64, 64, 128], [32, 48, 96, 128], [32, 32, 64, 128])


def build_codec(name: str, device: str = "cpu") -> torch.nn.Module:
    """A preset of ours (random weights, seed 0), or 'taesd': diffusers' AutoencoderTiny with default arguments."""
    torch.manual_seed(0)
    with torch.device(device):
        if name == "taesd":
            return AutoencoderTiny()
        return build_autoencoder(load_codec_config(CHECKOUT / "configs" / "codec" / f"{name}.yaml").model)


def encode_fn(vae: torch.nn.Module):
    """image -> latent for either kind of codec (AutoencoderTiny has no posterior: its latents are the output)."""
    if isinstance(vae, AutoencoderTiny):
        return lambda x: vae.encode(x).latents
    return lambda x: vae.encode(x).latent_dist.mean


def decode_fn(vae: torch.nn.Module):
    return lambda z: vae.decode(z).sample


def latent_channels(vae: torch.nn.Module) -> int:
    return vae.config.latent_channels


def parameters_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def codec_flops(name: str, side: int = SIDE) -> tuple[float, float]:
    """GFLOP of one encode and one decode of a side x side image, counted on the meta device (no compute)."""
    return meta_codec_flops(build_codec(name, device="meta"), side)


def meta_codec_flops(vae: torch.nn.Module, side: int = SIDE) -> tuple[float, float]:
    """codec_flops of a codec built on the meta device."""
    factor = 8
    x = torch.empty(1, 3, side, side, device="meta")
    z = torch.empty(1, latent_channels(vae), side // factor, side // factor, device="meta")
    return forward_flops(encode_fn(vae), x) / 1e9, forward_flops(decode_fn(vae), z) / 1e9


def codec_rows(quick: bool, repeats: int) -> list[dict]:
    """Encode and decode seconds per 512x512 image for each codec, with FLOPs and achieved GFLOP/s, next to the
    matmul peak measured right before that codec (other processes' load changes within minutes)."""
    rows = []
    for name in (*PRESETS, "taesd"):
        rows.append(_codec_row(name, quick, repeats))
        progress(f"  {name}: encode {rows[-1]['encode_s']:.3f} s, decode {rows[-1]['decode_s'] or float('nan'):.3f} s")
    return rows


def _codec_row(name: str, quick: bool, repeats: int) -> dict:
    vae = prepare_for_inference(build_codec(name))
    enc_gflop, dec_gflop = codec_flops(name)
    x = torch.rand(1, 3, SIDE, SIDE) * 2 - 1
    z = torch.randn(1, latent_channels(vae), SIDE // 8, SIDE // 8)
    encode, decode = encode_fn(vae), decode_fn(vae)
    slow = name == "kl-f8"  # ~14 s per decode on 2 cores: one timed call
    row = {"codec": name, "class": type(vae).__name__, "parameters_m": parameters_m(vae),
           "encode_gflop": enc_gflop, "decode_gflop": dec_gflop}
    peak = row["matmul_gflops_per_s"] = matmul_peak(repeats=5)["gflops_per_s"]
    with torch.inference_mode():
        row["encode_s"] = median_seconds(lambda: encode(x), 1 if slow else repeats)
        if slow and quick:
            row["decode_s"] = None
            row["decode_note"] = "skipped in --quick (~14 s per decode on 2 cores)"
        else:
            row["decode_s"] = median_seconds(lambda: decode(z), 1 if slow else repeats)
    for part in ("encode", "decode"):
        seconds = row[f"{part}_s"]
        row[f"{part}_gflops_per_s"] = row[f"{part}_gflop"] / seconds if seconds else None
        row[f"{part}_fraction_of_peak"] = row[f"{part}_gflops_per_s"] / peak if seconds else None
    return row


def decodes_in_turns(models: dict[str, torch.nn.Module], rounds: int) -> dict[str, list[float]]:
    """Seconds of one 512x512 decode per model, the models taking turns round by round so that every one sees
    the same machine load (one untimed warm-up each)."""
    latents = {name: torch.randn(1, latent_channels(m), SIDE // 8, SIDE // 8) for name, m in models.items()}
    decoders = {name: decode_fn(m) for name, m in models.items()}
    steps = {name: (lambda _round, decode=decoders[name], z=latents[name]: decode(z)) for name in models}
    with torch.inference_mode():
        return take_turns(steps, rounds)


def decode_head_to_head(rounds: int) -> dict:
    """The small preset's decode against TAESD's, in turns (the separate codec rows are minutes apart).
    speedup = TAESD's median / small's median."""
    times = decodes_in_turns({name: prepare_for_inference(build_codec(name)) for name in ("small", "taesd")}, rounds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"rounds": rounds, "median_s": medians, "best_s": {n: min(t) for n, t in times.items()},
            "speedup": medians["taesd"] / medians["small"]}


def architecture_candidates(rounds: int) -> list[dict]:
    """Decode cost of the small preset at each of CANDIDATE_WIDTHS (and without the mid-block attention),
    in turns with TAESD: parameters, GFLOP, median seconds, speed relative to TAESD, achieved GFLOP/s."""
    base = load_codec_config(CHECKOUT / "configs" / "codec" / "small.yaml").model
    configs = {"-".join(map(str, w)): dataclasses.replace(base, block_out_channels=list(w)) for w in CANDIDATE_WIDTHS}
    configs["32-64-128-128 without mid-block attention"] = dataclasses.replace(
        base, block_out_channels=[32, 64, 128, 128], mid_block_add_attention=False)
    models, gflop = {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        models[name] = prepare_for_inference(build_autoencoder(cfg))
        with torch.device("meta"):
            gflop[name] = meta_codec_flops(build_autoencoder(cfg))[1]
    models["taesd"] = prepare_for_inference(build_codec("taesd"))
    gflop["taesd"] = codec_flops("taesd")[1]
    times = decodes_in_turns(models, rounds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return [{"network": name, "parameters_m": parameters_m(m), "decode_gflop": gflop[name],
             "decode_s": medians[name], "best_s": min(times[name]), "speed_vs_taesd": medians["taesd"] / medians[name],
             "decode_gflops_per_s": gflop[name] / medians[name]} for name, m in models.items()]
