"""Why latent diffusion: measured cost of the same U-Net in latent vs pixel space, and of training from shards vs
encoding every batch on the fly. Importable functions returning plain dicts (`python -m experiments.benchmark`
prints them).

Timings on a shared CPU are noisy: each function measures both sides in the same call, so read the ratios.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from codec.network.model import encode_posterior
from diffusion.config import UNetConfig, load_unet_config
from diffusion.schedule import diffusion_loss
from experiments.benchmark.timing import best_seconds, take_turns


def _unet_config(unet_config: UNetConfig | str | Path) -> UNetConfig:
    """A UNetConfig, or the `unet` section of a preset file such as configs/unet/small.yaml."""
    return unet_config if isinstance(unet_config, UNetConfig) else load_unet_config(unet_config).unet


def forward_flops(model, *args, **kwargs) -> int:
    """FLOPs of one forward pass, counted by torch's FlopCounterMode.

    Attention runs through PyTorch's math kernel while counting: the fused CPU kernel
    (_scaled_dot_product_flash_attention_for_cpu) has no FLOP formula and would count as 0, hiding exactly the
    quadratic term that makes pixel-space diffusion expensive. The math kernel materialises the n x n attention
    matrix, so give large inputs as meta tensors (shapes only: nothing is computed or allocated)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


def unet_flops(cfg: UNetConfig, shape: tuple[int, int, int], text_width: int, text_tokens: int) -> int:
    """FLOPs of one U-Net forward pass (batch 1) on a (C, H, W) input, counted on the meta device."""
    from diffusion.unet import build_unet

    with torch.device("meta"):
        unet = build_unet(cfg, shape[0], shape[1], text_width)
        x, text, t = torch.empty(1, *shape), torch.empty(1, text_tokens, text_width), torch.tensor([500])
    return forward_flops(unet, x, t, encoder_hidden_states=text)


def _time_forward(cfg: UNetConfig, shape, text_width: int, text_tokens: int, warm_up: bool, repeats: int) -> float:
    """Seconds of one forward pass on the CPU, random weights (the cost does not depend on them)."""
    from diffusion.unet import build_unet

    torch.manual_seed(0)
    unet = build_unet(cfg, shape[0], shape[1], text_width).eval()
    x, text, t = torch.randn(1, *shape), torch.randn(1, text_tokens, text_width), torch.tensor([500])
    with torch.no_grad():
        if warm_up:
            unet(x, t, encoder_hidden_states=text)
        return best_seconds(lambda: unet(x, t, encoder_hidden_states=text), repeats)


def benchmark_latent_vs_pixel(
    unet_config: UNetConfig | str | Path,
    latent_shape: tuple[int, int, int] = (4, 64, 64),
    image_shape: tuple[int, int, int] = (3, 512, 512),
    text_width: int = 384,
    text_tokens: int = 77,
    time_it: bool = True,
    repeats: int = 1,
    max_timed_pixel_gflops: float | None = 1000.0,
) -> dict:
    """One denoising step (a U-Net forward pass, batch 1) of the same U-Net on a latent vs on the image itself.

    The pixel-space twin has 3 input/output channels and runs at the image's resolution; everything else (widths,
    levels, attention, text conditioning) is shared. FLOPs are counted on the meta device (instant, any size).

    With time_it, both passes run on the CPU: the latent one after an untimed warm-up (at its size first-call
    allocations would dominate), best of `repeats`; the pixel one once (its first-call overhead is noise). A
    pixel pass above `max_timed_pixel_gflops` is not run at full size: small.yaml at 512x512 is 60.7 TFLOPs,
    mostly self-attention over 262,144 positions, about 40 minutes here. Instead the image side is halved until
    the pass fits, that pass is timed, and `pixel_seconds` = its seconds x the FLOP ratio, marked by
    `pixel_seconds_estimated_from` (the shape actually timed). None times the full size whatever it costs.
    Returns elements, parameters, GFLOPs, seconds and their ratios (pixel / latent)."""
    cfg = _unet_config(unet_config)
    from diffusion.unet import build_unet

    result: dict = {"latent_shape": list(latent_shape), "image_shape": list(image_shape),
                    "element_ratio": (image_shape[0] * image_shape[1] * image_shape[2])
                    / (latent_shape[0] * latent_shape[1] * latent_shape[2]),
                    "text_tokens": text_tokens, "threads": torch.get_num_threads()}
    for name, shape in (("latent", latent_shape), ("pixel", image_shape)):
        with torch.device("meta"):
            result[f"{name}_parameters"] = sum(p.numel()
                                               for p in build_unet(cfg, shape[0], shape[1], text_width).parameters())
        result[f"{name}_gflops"] = unet_flops(cfg, shape, text_width, text_tokens) / 1e9
    result["flop_ratio"] = result["pixel_gflops"] / result["latent_gflops"]
    if not time_it:
        return result
    result["latent_seconds"] = _time_forward(cfg, latent_shape, text_width, text_tokens, True, repeats)
    timed, timed_gflops = tuple(image_shape), result["pixel_gflops"]
    factor = 2 ** (len(cfg.block_out_channels) - 1)  # the U-Net needs sides divisible by this
    while (max_timed_pixel_gflops is not None and timed_gflops > max_timed_pixel_gflops
           and (timed[1] // 2) % factor == 0):
        timed = (timed[0], timed[1] // 2, timed[2] // 2)
        timed_gflops = unet_flops(cfg, timed, text_width, text_tokens) / 1e9
    seconds = _time_forward(cfg, timed, text_width, text_tokens, False, 1)
    result["pixel_seconds"] = seconds * result["pixel_gflops"] / timed_gflops
    if timed != tuple(image_shape):
        result["pixel_seconds_estimated_from"] = {"shape": list(timed), "gflops": timed_gflops, "seconds": seconds}
    result["time_ratio"] = result["pixel_seconds"] / result["latent_seconds"]
    return result


def benchmark_attention_heads(
    unet_config: UNetConfig | str | Path,
    variants: dict[str, int | list[int]],
    latent_shape: tuple[int, int, int] = (4, 64, 64),
    batch_size: int = 4,
    steps: int = 3,
    text_width: int = 384,
    text_tokens: int = 77,
    bf16: bool = True,
) -> list[dict]:
    """Seconds per image of one U-Net training step (forward, backward, AdamW) for head-count variants of the same
    U-Net: {label: attention_head_dim}. Same widths and parameters; only how attention splits them differs.

    FLOPs do not tell these apart (QK^T and AV cost 2·n²·width whatever the split), but the CPU's fused attention
    kernel runs one softmax over n x n scores per head, so many narrow heads at the 4096-token level are slow.
    With `bf16`, the first variant also runs under bf16 autocast (train.mixed_precision: bf16), worth it on CPUs
    with bf16 instructions. One untimed warm-up per variant, then `steps` rounds taking turns; medians."""
    import dataclasses

    from diffusion.unet import build_unet

    cfg = _unet_config(unet_config)
    x = torch.randn(batch_size, *latent_shape)
    text, t = torch.randn(batch_size, text_tokens, text_width), torch.randint(1000, (batch_size,))
    runs = [(label, heads, False) for label, heads in variants.items()]
    if bf16:
        label, heads = next(iter(variants.items()))
        runs.append((f"{label}, bf16 autocast", heads, True))

    def training_step(unet, optimizer, autocast: bool) -> Callable[[int], None]:
        def step(_: int) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                prediction = unet(x, t, encoder_hidden_states=text).sample
            diffusion_loss(prediction.float(), x).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    configs, unets, steps_of = {}, {}, {}
    for label, heads, autocast in runs:
        configs[label] = dataclasses.replace(cfg, attention_head_dim=heads)
        torch.manual_seed(0)
        unets[label] = build_unet(configs[label], latent_shape[0], latent_shape[1], text_width).train()
        steps_of[label] = training_step(unets[label], torch.optim.AdamW(unets[label].parameters(), lr=1e-4), autocast)
    seconds = take_turns(steps_of, steps)
    first = statistics.median(seconds[runs[0][0]])
    return [{
        "variant": label, "attention_head_dim": heads, "bf16_autocast": autocast,
        "head_channels": [w // h for w, h in zip(cfg.block_out_channels, configs[label].heads_per_level())],
        "parameters": sum(p.numel() for p in unets[label].parameters()),
        "batch_size": batch_size, "latent_shape": list(latent_shape),
        "seconds_per_image": statistics.median(seconds[label]) / batch_size,
        "relative_time": statistics.median(seconds[label]) / first,
    } for label, heads, autocast in runs]


def _pixels_of_shards(shards, images_dir: str | Path | None, count: int) -> torch.Tensor:
    """The first `count` training images as the encoder saw them (same resize and centre crop), decoded up front."""
    from codec.data import InputSource
    from codec.shards.encode import Framing

    manifest = shards.manifest
    source = str(images_dir) if images_dir is not None else manifest["data"]["source"]
    if not Path(source).exists():
        raise FileNotFoundError(
            f"the store's source images {source} are not here; pass images_dir= pointing at the images the store "
            f"was encoded from (the on-the-fly side must encode real images)"
        )
    inputs, framing = InputSource(source), Framing(manifest["resolution"], "center", 0, "none")
    prepared = (framing.prepare(record) for unit in inputs.units for record in inputs.records(unit))
    pixels = [item["pixels"] for item in prepared if "pixels" in item][:count]
    if not pixels:
        raise ValueError(f"none of the images in {source} is readable")
    return torch.stack(pixels)


def benchmark_training_throughput(
    unet_config: UNetConfig | str | Path,
    shards_dir: str | Path,
    codec_dir: str | Path,
    batch_size: int = 8,
    steps: int = 3,
    images_dir: str | Path | None = None,
    text_encoder: str = "minilm",
    text_tokens: int = 77,
) -> dict:
    """U-Net training images/s (forward, backward, AdamW step, batch `batch_size`) when latents come from the
    shards, against encoding each batch with the codec on the fly (encode -> posterior sample -> scale -> the
    same step). The target is a speed-up >= 5x.

    Both sides get the same caption embeddings, computed before the clock starts. The on-the-fly side's images are
    decoded and cropped before the clock starts too, so the ratio counts only the encoder's cost: a lower bound on
    the real saving, which also includes decoding and resizing every image at every epoch. One untimed warm-up step
    per side, then `steps` steps per side, alternating; images/s from each side's median step."""
    from codec.network.fast import prepare_for_inference
    from codec.network.model import load_codec
    from codec.network.text_encoder import CaptionEmbeddings, hidden_width, load_text_encoder
    from codec.shards import LatentShards
    from diffusion.config import DiffusionConfig, TrainConfig
    from diffusion.draws import TrainingDraws
    from diffusion.schedule import build_noise_scheduler
    from diffusion.unet import build_unet

    cfg = _unet_config(unet_config)
    # The on-the-fly side encodes as fast as this project can (channels-last, as encode_dataset does), so the
    # speed-up is not inflated by a slow baseline.
    vae = prepare_for_inference(load_codec(codec_dir))
    shards = LatentShards(shards_dir)
    diffusion = DiffusionConfig()
    scheduler = build_noise_scheduler(diffusion)
    draws = TrainingDraws(shards, diffusion, seed=0, shuffle_chunks=TrainConfig().shuffle_chunks)
    tokenizer, text_model = load_text_encoder(text_encoder)
    embeddings = CaptionEmbeddings(tokenizer, text_model, max_length=text_tokens)
    channels, side, _ = shards.manifest["latent_shape"]
    torch.manual_seed(0)
    unet = build_unet(cfg, channels, side, hidden_width(text_model)).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    pixels = _pixels_of_shards(shards, images_dir, batch_size)
    pixels = pixels[torch.arange(batch_size) % len(pixels)]
    text = embeddings([shards[i % len(shards)]["caption"] for i in range(batch_size)])

    def unet_step(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> None:
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, encoder_hidden_states=text).sample
        diffusion_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def from_shards(k: int) -> None:
        batch = torch.utils.data.default_collate([draws[k * batch_size + i] for i in range(batch_size)])
        unet_step(batch["latents"], batch["noise"], batch["timestep"])

    def on_the_fly(k: int) -> None:
        with torch.no_grad():
            posterior = encode_posterior(vae, pixels)
            latents = shards.scale(posterior.sample(torch.Generator().manual_seed(k)))
        unet_step(latents, torch.randn(latents.shape), torch.randint(1000, (batch_size,)))

    # The two sides take turns step by step and each rate comes from its median step: the U-Net step varies by
    # ~20% here, more than the small codec's whole encode costs.
    seconds = take_turns({"shards": from_shards, "on_the_fly": on_the_fly}, steps)
    rates = {name: batch_size / statistics.median(times) for name, times in seconds.items()}
    return {
        "batch_size": batch_size, "steps": steps, "latent_shape": [channels, side, side],
        "resolution": shards.manifest["resolution"], "threads": torch.get_num_threads(),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "codec_parameters": sum(p.numel() for p in vae.parameters()),
        "shards_images_per_s": rates["shards"], "on_the_fly_images_per_s": rates["on_the_fly"],
        "speedup": rates["shards"] / rates["on_the_fly"], "target_speedup": 5.0,
        "meets_target": rates["shards"] / rates["on_the_fly"] >= 5.0,
    }
