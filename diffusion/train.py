"""Train the text-conditioned latent U-Net on latent shards: one loop, top to bottom.

Run it through `accelerate launch -m latent_codec unet train --config small --shards S --codec C`.
The codec stays frozen and its encoder is never run: the shards already hold every image's posterior
(`latent-codec shards encode`). The decoder is loaded only to draw validation samples, and the whole codec is
copied into the exported pipeline folder.

Reproducibility by construction, as in codec/training/train.py: every training example is a global draw number that
fixes its shard record, posterior sample, diffusion noise, timestep and caption dropout (diffusion/draws.py). Every
checkpoint records how many draws the loader has consumed, so a resume continues at the next draw even with
another process count or batch size.

Latent scale: the U-Net learns latents normalised by the shards' manifest (scaling_factor = 1/std of the encoded
dataset's latents, with a shift or per-channel statistics when the codec has them). The exported pipeline's vae
config gets exactly that normalisation, replacing whatever the codec folder held, so sampling undoes the
normalisation training saw. Shards encoded by a different codec (other weights) are refused.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import set_seed
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from codec.common.atomic import folder_atomically
from codec.common.checkpoints import (
    ema_weights,
    keep_ema_in_checkpoints,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
)
from codec.common.config import ConfigError, to_dict
from codec.common.distributed import make_accelerator
from codec.common.draws import DrawSampler
from codec.common.logs import (
    IntervalMeans,
    append_history,
    flat_hparams,
    start_run_logging,
    stop_run_logging,
    truncate_history,
)
from codec.common.loop import LoopResult
from codec.common.optim import adamw, backward_and_step, learning_rate, set_learning_rate
from codec.exchange.pipeline import LatentDiffusionPipeline, latent_norm, make_sampler
from codec.measurement.evaluate import save_png
from codec.network.model import codec_identity, compression_ratio, encoder_identity, load_codec
from codec.network.text_encoder import CaptionEmbeddings, hidden_width, load_text_encoder
from codec.shards import LatentShards, read_manifest
from codec.shards.reader import DEFAULT_CACHE_SIZE
from diffusion.config import UNetTrainingConfig
from diffusion.draws import EvalSet, TrainingDraws, eval_set
from diffusion.schedule import build_noise_scheduler, per_sample_mse, training_loss, training_target
from diffusion.unet import build_unet

log = logging.getLogger("diffusion.train")


# ---------------------------------------------------------------------------------------------------------
# Pieces the loop uses
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult(LoopResult):
    pipeline: Path  # the exported pipeline folder
    history: list = field(default_factory=list)  # every validation's (step, metrics)


def describe_norm(norm: dict) -> str:
    """A latent normalisation in a few words, for the log."""
    words = f"scaling_factor {norm['scaling_factor']:.6g}"
    if norm["shift_factor"] is not None:
        words += f", shift_factor {norm['shift_factor']:.6g}"
    if norm["latents_mean"] is not None:
        words += f", per-channel latents_mean/latents_std of {len(norm['latents_mean'])} channels"
    return words


def codec_for_shards(codec_dir: str, shards_dir: str, cache_dir: str | None = None,
                     cache_size: str = DEFAULT_CACHE_SIZE) -> tuple[AutoencoderKL, LatentShards, str]:
    """The frozen codec and its shards, checked to belong together; the vae config gets the shards' scale.

    A decoder-only fine-tune of the codec that made the shards passes: its encoder identity is theirs, so the
    latents are the ones it would have made. Returns (vae, shards, a sentence about the scale for the log)."""
    vae = load_codec(codec_dir)
    # The plainest mismatch first, in its own words (another codec's latents are refused just below).
    shard_channels = read_manifest(shards_dir)["latent_shape"][0]
    if vae.config.latent_channels != shard_channels:
        raise ConfigError(f"--codec {codec_dir} makes {vae.config.latent_channels}-channel latents but {shards_dir} "
                          f"holds {shard_channels}-channel ones: pass the codec that encoded them, or re-encode the "
                          f"dataset with `latent-codec shards encode --codec {codec_dir}`")
    identity = codec_identity(vae)
    shards = LatentShards(shards_dir, verify_codec=identity, verify_encoder=encoder_identity(vae), cache_dir=cache_dir,
                          max_cache_size=cache_size)
    had = latent_norm(vae.config)
    # The U-Net learns shards.scale(z); the pipeline undoes the vae config's normalisation. They must be one,
    # shift and per-channel statistics included (dropping a codec's shift would decode every sample offset).
    vae.register_to_config(**shards.normalisation)
    if had != shards.normalisation:
        note = (f"latent normalisation {describe_norm(shards.normalisation)} from {shards_dir}/manifest.json replaces "
                f"the codec folder's {describe_norm(had)} in the exported pipeline (the U-Net is trained on the "
                f"shards' normalisation)")
    else:
        note = f"latent normalisation {describe_norm(shards.normalisation)} (shards and codec agree)"
    if identity != shards.manifest["codec"]["identity"]:
        note += (f"; codec {identity} decodes shards of codec {shards.manifest['codec']['identity']}: the same encoder "
                 f"({shards.encoder_identity}), so the same latents")
    return vae, shards, note


@torch.no_grad()
def denoising_losses(unet: UNet2DConditionModel, scheduler, data: EvalSet, text: torch.Tensor,
                     batch_size: int = 16) -> torch.Tensor:
    """Unweighted MSE of the U-Net's prediction on each fixed example, in its own target space (epsilon or v)."""
    device = next(unet.parameters()).device
    losses = []
    for start in range(0, len(data.captions), batch_size):
        part = slice(start, start + batch_size)
        latents, noise, t = data.latents[part].to(device), data.noise[part].to(device), data.timesteps[part].to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        prediction = unet(noisy, t, encoder_hidden_states=text[part].to(device)).sample
        losses.append(per_sample_mse(prediction, training_target(scheduler, latents, noise, t)).cpu())
    return torch.cat(losses)


def denoising_loss(unet: UNet2DConditionModel, scheduler, data: EvalSet, text: torch.Tensor,
                   batch_size: int = 16) -> float:
    """The mean of `denoising_losses`: the eval loss validation reports."""
    return float(denoising_losses(unet, scheduler, data, text, batch_size).mean())


def eval_metrics(losses: torch.Tensor, data: EvalSet, timesteps: list[int]) -> dict:
    """val/denoising_loss over every eval example, and val/denoising_loss_t<T> at each of `timesteps`."""
    metrics = {"val/denoising_loss": float(losses.mean())}
    for t in timesteps:
        metrics[f"val/denoising_loss_t{t}"] = float(losses[data.timesteps == t].mean())
    return metrics


def sample_grid(pipe: LatentDiffusionPipeline, prompts: list[str], steps: int, guidance: float,
                seed: int) -> np.ndarray:
    """One decoded sample per prompt, side by side, as an (H, W, 3) uint8 array."""
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, seed=seed, output_type="pt").images
    grid = make_grid((images + 1) / 2, nrow=len(prompts), padding=2, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")


def training_loader(shards: LatentShards, cfg: UNetTrainingConfig, start: int) -> DataLoader:
    """Training examples from global draw `start` on, in batches of train.batch_size (before accelerate splits the
    global batch over the processes)."""
    return DataLoader(TrainingDraws(shards, cfg.diffusion, cfg.train.seed, cfg.train.shuffle_chunks),
                      batch_size=cfg.train.batch_size, sampler=DrawSampler(start=start),
                      num_workers=cfg.train.num_workers, persistent_workers=cfg.train.num_workers > 0)


def resume_draws(checkpoint: Path | None, step: int, draws_per_step: int) -> int:
    """The global draws a resumed run has consumed: recorded in the checkpoint's trainer_state.json, so a resume
    starts its DrawSampler at the next draw. Steps x global batch would be wrong as soon as the global batch
    changes between the runs (another process count or batch size): draws would be skipped or repeated. A
    checkpoint written before checkpoints kept the position resumes by that rule, with a warning. (JSON beside
    the weights, not accelerate's register_for_checkpointing, whose loader unpickles.)"""
    if checkpoint is None:
        return 0
    draws = read_trainer_state(checkpoint).get("draws")
    if draws is None:
        draws = step * draws_per_step
        log.warning("%s records no loader position (written before checkpoints kept it): resuming at draw %d = step "
                    "%d x global batch %d, which is right only if the run that wrote it had this global batch",
                    checkpoint, draws, step, draws_per_step)
    return int(draws)


def export_pipeline(pipe: LatentDiffusionPipeline, output_dir: Path, info: dict) -> Path:
    """Save the whole pipeline (safetensors only) at <output_dir>/pipeline, renamed into place when complete. The
    folder carries its pipeline code, so stock diffusers loads it with trust_remote_code=True
    (codec/exchange/pipeline.py)."""
    final = output_dir / "pipeline"
    with folder_atomically(final) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "unet_training.json").write_text(json.dumps(info, indent=2))
    return final



# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def train_unet(cfg: UNetTrainingConfig, resume: str | None = None) -> TrainResult:
    if not cfg.shards or not cfg.codec:
        raise ValueError("train_unet needs the latent shards and the codec that made them: pass --shards DIR and "
                         "--codec DIR (or set shards: and codec: in the config)")
    output_dir = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.grad_accum, output_dir,
                                   cfg.train.process_group_timeout_minutes)
    main = accelerator.is_main_process
    handler = start_run_logging(log, main, output_dir)
    device = accelerator.device
    # Before any loading: a checkpoint of another network is refused in a second, not after the text encoder.
    architecture = asdict(cfg.unet)
    resume_dir, step = resolve_resume(output_dir, resume, architecture, accelerator)  # the same on every rank

    # ---- data: shards, their codec, captions ------------------------------------------------------------
    vae, shards, scale_note = codec_for_shards(cfg.codec, cfg.shards, cfg.train.store_cache, cfg.train.store_cache_size)
    vae.to(device)
    channels, side, _ = shards.manifest["latent_shape"]
    tokenizer, text_model = load_text_encoder(cfg.text_encoder.path)
    tokenizer.model_max_length = cfg.text_encoder.max_length  # saved with the pipeline, so sampling pads alike
    text_model.to(device)
    embeddings = CaptionEmbeddings(tokenizer, text_model, cfg.text_encoder.max_length,
                                   cache_size=cfg.text_encoder.cache_captions)
    draws_per_step = cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum
    # The eval loss's examples: held-out shards of the same codec when given, else the training shards' first records.
    held_shards = shards if cfg.train.eval_shards is None else LatentShards(
        cfg.train.eval_shards, verify_codec=codec_identity(vae), verify_encoder=encoder_identity(vae),
        cache_dir=cfg.train.store_cache, max_cache_size=cfg.train.store_cache_size)
    held = eval_set(held_shards, cfg.train.eval_items, cfg.diffusion.num_train_timesteps, cfg.train.seed,
                    cfg.train.eval_timesteps, scale=shards)
    held_text = embeddings(held.captions)
    prompts = cfg.train.sample_prompts or list(dict.fromkeys(held.captions))[:4]

    # ---- model, schedule, optimizer ---------------------------------------------------------------------
    set_seed(cfg.train.seed)  # identical initial weights on every process
    unet = build_unet(cfg.unet, channels, side, hidden_width(text_model))
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # engages whenever grad is on (diffusers' down/mid/up blocks)
    noise_scheduler = build_noise_scheduler(cfg.diffusion)
    optimizer = adamw(unet.parameters(), cfg.optim)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    inner = accelerator.unwrap_model(unet)
    ema = None
    if cfg.train.ema_decay:
        ema = EMAModel(inner.parameters(), decay=cfg.train.ema_decay)
        ema.to(device)
        keep_ema_in_checkpoints(accelerator, ema, inner)
    draws = resume_draws(resume_dir, step, draws_per_step)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        log.info("resumed from %s at step %d, draw %d", resume_dir, step, draws)
        if main:
            truncate_history(output_dir, step)  # the steps after the checkpoint are made, and logged, again
    # Built once the checkpoint has said where the draws continue.
    loader = accelerator.prepare(training_loader(shards, cfg, draws))
    pipe = LatentDiffusionPipeline(vae=vae, unet=inner, scheduler=make_sampler("ddim", noise_scheduler.config),
                                   text_encoder=text_model, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)

    latent_elements = channels * side * side
    run_info = {
        "config": to_dict(cfg),
        "processes": accelerator.num_processes,
        "global_batch": draws_per_step,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(device),
        "shards": {"records": len(shards), "latent_shape": [channels, side, side],
                   "resolution": shards.manifest["resolution"], "scaling_factor": shards.scaling_factor,
                   "codec_identity": shards.manifest["codec"]["identity"]},
        "text_encoder": {"path": cfg.text_encoder.path, "width": hidden_width(text_model),
                         "cache_captions": cfg.text_encoder.cache_captions},
        "unet_parameters": sum(p.numel() for p in inner.parameters()),
    }
    if main:
        (output_dir / "run.yaml").write_text(yaml.safe_dump(run_info, sort_keys=False))
        log.info("U-Net: %.2fM parameters on %s latents (%dx%d images, %.0fx fewer numbers than pixels)",
                 run_info["unet_parameters"] / 1e6, (channels, side, side), shards.manifest["resolution"],
                 shards.manifest["resolution"], 3 * shards.manifest["resolution"] ** 2 / latent_elements)
        log.info("%d latent records in %s; %s", len(shards), cfg.shards, scale_note)
        log.info("text encoder %s (%d-d tokens): captions embedded one at a time, %s", cfg.text_encoder.path,
                 hidden_width(text_model), f"the last {cfg.text_encoder.cache_captions} kept"
                 if cfg.text_encoder.cache_captions else "none kept (text_encoder.cache_captions: 0)")
        log.info("processes: %d, global batch: %d, precision: %s, device: %s",
                 accelerator.num_processes, draws_per_step, accelerator.mixed_precision, device)
    accelerator.init_trackers("unet", config=flat_hparams(run_info["config"]))
    history: list = []

    def validate(at_step: int) -> dict:
        """EMA weights (when kept): denoising loss on the fixed eval set, and a sample grid decoded by the codec."""
        metrics = {}
        if main:
            with ema_weights(ema, inner):
                losses = denoising_losses(inner, noise_scheduler, held, held_text)
                metrics = eval_metrics(losses, held, cfg.train.eval_timesteps)
                if cfg.train.validate_samples:
                    grid = sample_grid(pipe, prompts, cfg.train.sample_steps, cfg.train.sample_guidance, cfg.train.seed)
            if cfg.train.validate_samples:
                save_png(Image.fromarray(grid), output_dir / "samples" / f"step_{at_step:08d}.png")
                accelerator.get_tracker("tensorboard", unwrap=True).add_image("samples", grid, at_step,
                                                                              dataformats="HWC")
            accelerator.log(metrics, step=at_step)
            append_history(output_dir, {"step": at_step, **metrics})  # the eval curve survives a resume
            history.append((at_step, metrics))
            log.info("step %d validation: denoising loss %.5f", at_step, metrics["val/denoising_loss"])
        accelerator.wait_for_everyone()
        return metrics

    # ---- train -------------------------------------------------------------------------------------------
    unet.train()
    batches = iter(loader)
    progress = tqdm(total=cfg.train.max_steps, initial=step, disable=not main, desc="unet", dynamic_ncols=True)
    tick, latents_since = time.perf_counter(), 0
    interval = IntervalMeans()  # the logged loss: its mean over the steps since the last log, on every process
    metrics: dict = {}
    if step == 0 and cfg.train.validate_every > 0:
        metrics = validate(0)
    while step < cfg.train.max_steps:
        lr = learning_rate(step, cfg.optim, cfg.train.max_steps)
        set_learning_rate(optimizer, lr)
        batch = next(batches)
        latents, noise, timesteps = batch["latents"], batch["noise"], batch["timestep"]
        # Dropped captions become "" (the unconditional embedding classifier-free guidance subtracts).
        captions = ["" if drop else caption for caption, drop in zip(batch["caption"], batch["drop_caption"].tolist())]
        text = embeddings(captions).to(device)

        with accelerator.accumulate(unet):
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with accelerator.autocast():
                prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
            loss = training_loss(noise_scheduler, prediction, latents, noise, timesteps, cfg.diffusion.snr_gamma)
            backward_and_step(accelerator, loss, optimizer, unet.parameters(), cfg.optim.max_grad_norm)
        interval.add({"loss": loss})

        latents_since += latents.shape[0] * accelerator.num_processes
        if not accelerator.sync_gradients:
            continue
        step += 1
        draws += draws_per_step
        if ema is not None:
            ema.step(inner.parameters())
        progress.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            elapsed = time.perf_counter() - tick
            logs = {**interval.means(lambda sums: accelerator.reduce(sums, reduction="mean")), "lr": lr,
                    "latents_per_s": latents_since / max(elapsed, 1e-9)}
            accelerator.log(logs, step=step)
            if main:  # the loss curve as JSON lines, for plots and reports without tensorboard
                append_history(output_dir, {"step": step, **logs})
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lat_s=f"{logs['latents_per_s']:.1f}")
            tick, latents_since = time.perf_counter(), 0
        if cfg.train.validate_every > 0 and (step % cfg.train.validate_every == 0 or step == cfg.train.max_steps):
            metrics = validate(step)
        if cfg.train.checkpoint_every > 0 and (step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps):
            save_checkpoint(accelerator, output_dir, step, cfg.train.keep_checkpoints,
                            {"model": architecture, "draws": draws})
    progress.close()

    # ---- export ------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    final = output_dir / "pipeline"
    if main:
        if ema is not None:
            ema.copy_to(inner.parameters())
        inner.eval()
        info = dict(run_info, steps=step, metrics=metrics, compression_ratio=compression_ratio(
            vae, shards.manifest["resolution"], shards.manifest["resolution"]))
        final = export_pipeline(pipe, output_dir, info)
        log.info("exported %s (LatentDiffusionPipeline.from_pretrained loads it)", final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    stop_run_logging(log, handler)
    return TrainResult(pipeline=final, step=step, metrics=metrics, history=history)
