"""Train the KL-VAE codec: one loop, top to bottom.

Run it through `accelerate launch -m latent_codec codec train --config small`: accelerate decides
the device, the number of processes and the precision; this file never branches on them.

Reproducibility by construction: every training image is identified by a global draw number (see
`codec.data.TrainCrops`), which fixes its crop, flip and reparameterization noise. So 1 process with batch 8
and 2 processes with batch 4 see the same images with the same noise, and a resumed run continues with
exactly the draws an uninterrupted run would have made.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import torch
import yaml
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
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
from codec.common.distributed import agreed_seconds, make_accelerator
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
from codec.data import CenterCrops, TrainCrops, bundled_photos, load_image_dataset
from codec.data.crops import mirror_caption
from codec.exchange.pretrained import Parent, load_parent
from codec.measurement.equivariance import draw_transform
from codec.measurement.evaluate import evaluate_reconstructions, save_png, validation_grid
from codec.network.conditional import TextConditions, dataset_conditions
from codec.network.model import (
    CodecForTraining,
    build_codec,
    codec_identity,
    compression_ratio,
    encoder_identity,
    freeze_for_training,
    latent_statistics,
    write_latent_stats,
)
from codec.network.warm_start import thumbnail_init
from codec.training.config import CodecConfig, DataConfig, ModelConfig
from codec.training.losses import (
    CodecLoss,
    PatchDiscriminator,
    adaptive_gan_weight,
    build_perceptual,
    discriminator_loss,
    generator_gan_loss,
)

log = logging.getLogger("codec.training.train")


# ---------------------------------------------------------------------------------------------------------
# Pieces the loop uses
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult(LoopResult):
    final: Path  # the exported diffusers folder


@dataclass
class Data:
    train: TrainCrops
    val: CenterCrops
    train_dataset: object  # the raw training set, for the latent statistics measured at export
    image_column: str
    description: str
    class_names: list[str] | None = None  # a class-conditioned codec's (its conditions ride in train and val)


def _mixable(dataset, key: str, source: str) -> None:
    """data.extra_train concatenates tables; tars and parquet come as a record index (codec.data.index), which is
    not one."""
    if not isinstance(dataset, datasets.Dataset):
        raise ConfigError(f"{key}: {source} holds tars or parquet files, read through a record index that "
                          f"data.extra_train cannot mix with other sources; put all tars (or all parquet files) in "
                          f"data.train as one folder or pattern, or leave data.extra_train empty")


def load_data(cfg: DataConfig, seed: int, model: ModelConfig | None = None) -> Data:
    """The training crops and validation images of data.train / data.val: any input load_image_dataset takes (the
    same strings as `shards encode --data`: folders, saved datasets, arrow, tars and parquet, local or in a
    bucket); tars and parquet through a record index, so a draw fixes its example for them too."""
    train_source, val_source = cfg.train, cfg.val
    if train_source == "bundled" or val_source == "bundled":
        bundled_train, bundled_val = bundled_photos(cfg.bundled_dir)
        train_source = str(bundled_train) if train_source == "bundled" else train_source
        val_source = str(bundled_val) if val_source == "bundled" else val_source
    train_ds, column = load_image_dataset(train_source, cfg.image_column)
    if val_source is None:
        # Hold out images of the training set itself, chosen by the seed, and never train on them.
        order = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(seed)).tolist()
        held = min(cfg.val_count, max(1, len(train_ds) // 10))
        val_ds, val_column = train_ds.select(sorted(order[:held])), column
        train_ds = train_ds.select(sorted(order[held:]))
        description = f"train: {len(train_ds)} images of {cfg.train}; val: {held} held out of it"
    else:
        val_ds, val_column = load_image_dataset(val_source, cfg.image_column)
        description = f"train: {len(train_ds)} images of {train_source}; val: {len(val_ds)} images of {val_source}"
    conditional = model is not None and model.condition != "none"
    if conditional and cfg.extra_train:
        raise ConfigError(f"data.extra_train mixes in only the images of {cfg.extra_train}, without their "
                         f"{model.condition} conditions; a conditional codec trains on data.train alone")
    if cfg.extra_train:
        _mixable(train_ds, "data.train", cfg.train)
        parts = [train_ds.select_columns([column])]
        for source in cfg.extra_train:
            extra, extra_column = load_image_dataset(source)
            _mixable(extra, "data.extra_train", source)
            if cfg.extra_train_limit is not None:
                extra = extra.select(range(min(cfg.extra_train_limit, len(extra))))
            parts.append(extra.select_columns([extra_column]).rename_columns({extra_column: column})
                         if extra_column != column else extra.select_columns([column]))
            description += f"; + {len(extra)} training images of {source}"
        train_ds = datasets.concatenate_datasets(parts)
    train_conditions = mirrored_conditions = val_conditions = class_names = None
    if conditional:
        text = TextConditions(model.text_encoder, model.text_max_length) if model.condition == "text" else None
        column_name = cfg.condition_column
        train_conditions, class_names = dataset_conditions(train_ds, model.condition, column_name, train_source,
                                                           text=text)
        val_conditions, _ = dataset_conditions(val_ds, model.condition, column_name, val_source or train_source,
                                               text=text, class_names=class_names)
        if text is not None and cfg.flip:  # a mirrored crop is conditioned on its mirrored caption (TrainCrops)
            mirrored_conditions, _ = dataset_conditions(train_ds, "text", column_name, train_source,
                                                        text=lambda captions: text(list(map(mirror_caption, captions))))
        description += (f"; conditioned on {model.condition} ({column_name or 'default column'}"
                        + (f": {len(class_names)} classes)" if class_names else ")"))
    return Data(
        train=TrainCrops(train_ds, column, cfg.crop_size, seed=seed, resize=cfg.resize, flip=cfg.flip,
                         conditions=train_conditions, mirrored_conditions=mirrored_conditions),
        val=CenterCrops(val_ds, val_column, cfg.val_size, limit=cfg.val_count, conditions=val_conditions),
        train_dataset=train_ds,
        image_column=column,
        description=description,
        class_names=class_names,
    )


def export_codec(vae, data: Data, cfg: CodecConfig, output_dir: Path, run_info: dict) -> Path:
    """Measure latent statistics, write them into the config (unless the parent's scale is kept), save a diffusers
    folder at <output_dir>/final with codec_training.json beside it."""
    images = CenterCrops(data.train_dataset, data.image_column, cfg.data.val_size, limit=cfg.train.latent_stats_images,
                         conditions=data.train.conditions)
    loader = DataLoader(images, batch_size=8)
    stats = latent_statistics(vae, ((b["pixels"], b["condition"]) if "condition" in b else b["pixels"] for b in loader))
    latent_norm = cfg.latent_norm()
    if latent_norm != "keep":  # keep: the parent's scaling_factor / shift_factor / latents_mean / latents_std stay
        write_latent_stats(vae, stats, latent_norm)
    final = output_dir / "final"
    with folder_atomically(final) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        info = dict(run_info, latent_statistics=stats, latent_norm=latent_norm, codec_identity=codec_identity(vae),
                    encoder_identity=encoder_identity(vae))
        (tmp / "codec_training.json").write_text(json.dumps(info, indent=2))
    return final


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def recorded_network(cfg: CodecConfig, parent: Parent | None) -> dict:
    """What a checkpoint records of the network, so a resume with another one is refused (resolve_resume):
    the architecture, plus the parent and the trainable half when they are not the defaults (checkpoints written
    before those existed then still resume)."""
    network = cfg.model.architecture()
    if parent is not None:
        network["parent_codec_identity"] = parent.record["codec_identity"]
    if cfg.train.trainable != "all":
        network["trainable"] = cfg.train.trainable
    return network


def initial_codec(cfg: CodecConfig, parent: Parent | None, data: Data):
    """The codec of the first step: the parent's weights, the fitted linear codec's, or diffusers' random
    initialisation (drawn after set_seed, the same on every process); with model.condition, the conditional codec
    for the data's classes or caption embeddings."""
    if parent is not None:
        return parent.vae
    conditions = data.train.conditions
    text_width = conditions.shape[1] if conditions is not None and conditions.dim() == 2 else 384
    vae = build_codec(cfg.model, data.class_names, text_width)
    if getattr(vae.config, "standardize_condition", False):
        vae.fit_condition_statistics(conditions)
    if cfg.model.init == "thumbnail":
        thumbnail_init(vae)
    return vae


def train_codec(cfg: CodecConfig, resume: str | None = None) -> TrainResult:
    # The parent first: a folder that is not a codec, a pickle, or a config that contradicts it is refused before
    # the run folder, its log or its trackers exist.
    parent = load_parent(cfg.model) if cfg.model.init == "pretrained" else None
    if parent is not None:
        cfg = replace(cfg, model=parent.model)  # run.yaml and checkpoints record the architecture really trained
    output_dir = Path(cfg.train.output_dir)
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.grad_accum, output_dir,
                                   cfg.train.process_group_timeout_minutes)
    main = accelerator.is_main_process
    handler = start_run_logging(log, main, output_dir)
    set_seed(cfg.train.seed)  # identical initial weights on every process
    # Before loading data: a checkpoint of another network is refused at once. model.init only decides the
    # first step's weights, so a resumed run may name another (but not another parent).
    architecture = recorded_network(cfg, parent)
    resume_dir, step = resolve_resume(output_dir, resume, architecture, accelerator)  # the same on every rank

    # ---- data -------------------------------------------------------------------------------------------
    with accelerator.main_process_first():  # the first process writes bundled photos and dataset caches
        data = load_data(cfg.data, cfg.train.seed, cfg.model)
    # Seconds spent in training steps (not validation or checkpoints), carried across resumes.
    train_seconds = float(read_trainer_state(resume_dir).get("train_seconds", 0.0))
    draws_per_step = cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum
    loader = DataLoader(
        data.train,
        batch_size=cfg.train.batch_size,
        sampler=DrawSampler(start=step * draws_per_step),
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )
    val_images = torch.stack([data.val[i]["pixels"] for i in range(len(data.val))])
    val_conditions = data.val.conditions  # None for an unconditional codec

    # ---- model, losses, optimizers -------------------------------------------------------------------------
    vae = initial_codec(cfg, parent, data)
    freeze_for_training(vae, cfg.train.trainable)  # before accelerator.prepare: DDP wraps what requires grad
    if cfg.train.gradient_checkpointing:
        vae.enable_gradient_checkpointing()  # engages whenever grad is on (diffusers' Encoder/Decoder blocks)
    if cfg.train.channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    model = CodecForTraining(vae, cfg.loss.learn_logvar, cfg.loss.logvar_init, seed=cfg.train.seed,
                             frozen_encoder=cfg.train.trainable == "decoder",
                             noise_steps=tuple(cfg.loss.quantisation_noise) if cfg.loss.quantisation_noise else None)
    perceptual, perceptual_used = build_perceptual(cfg.loss)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    criterion = CodecLoss(cfg.loss, perceptual)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, cfg.optim)
    use_gan = cfg.loss.gan_weight > 0
    disc = opt_d = None
    if use_gan:
        disc = PatchDiscriminator(channels=cfg.loss.disc_channels, layers=cfg.loss.disc_layers)
        opt_d = adamw(disc.parameters(), cfg.optim, lr=cfg.loss.disc_lr or cfg.optim.lr, weight_decay=0.0)
        model, optimizer, disc, opt_d, loader = accelerator.prepare(model, optimizer, disc, opt_d, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    inner = accelerator.unwrap_model(model)
    last_layer = inner.vae.decoder.conv_out.weight
    ema = None
    if cfg.train.ema_decay:
        ema = EMAModel(inner.vae.parameters(), decay=cfg.train.ema_decay)
        ema.to(accelerator.device)
        keep_ema_in_checkpoints(accelerator, ema, inner.vae)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        log.info("resumed from %s at step %d", resume_dir, step)
        if main:
            truncate_history(output_dir, step)  # the steps after the checkpoint are made, and logged, again

    run_info = {
        "config": to_dict(cfg),
        "perceptual_used": perceptual_used,
        "processes": accelerator.num_processes,
        "global_batch": draws_per_step,
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "data": data.description,
        "compression_ratio_512": compression_ratio(inner.vae, 512, 512),
        "trainable": cfg.train.trainable,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "parent": None if parent is None else parent.record,
    }
    if main:
        (output_dir / "run.yaml").write_text(yaml.safe_dump(run_info, sort_keys=False))
        # a global latent's codec takes its sample_size only; any other codec is described at 512 px
        size = cfg.model.sample_size if cfg.model.global_latent else 512
        factor = 2 ** (len(inner.vae.config.block_out_channels) - 1)
        log.info("codec: %.2fM parameters, %dx%dx3 -> %s latent (%.0fx fewer numbers)",
                 sum(p.numel() for p in inner.vae.parameters()) / 1e6, size, size,
                 (inner.vae.config.latent_channels, size // factor, size // factor),
                 run_info["compression_ratio_512"])
        log.info("%s", data.description)
        log.info("perceptual loss in use: %s", perceptual_used)
        if parent is not None:
            log.info("started from %s (%s, codec %s, encoder %s); training %s: %.2fM parameters",
                     parent.record["path"], parent.record["format"], parent.record["codec_identity"],
                     parent.record["encoder_identity"], cfg.train.trainable, run_info["trainable_parameters"] / 1e6)
        log.info("processes: %d, global batch: %d, precision: %s, device: %s",
                 accelerator.num_processes, draws_per_step, accelerator.mixed_precision, accelerator.device)
    accelerator.init_trackers("codec", config=flat_hparams(run_info["config"]))

    def validate(at_step: int) -> dict:
        """EMA weights (when kept) on the held-out images; grid PNG on disk, numbers to the trackers."""
        metrics = {}
        if main:
            with ema_weights(ema, inner.vae) as vae_:
                batches = (val_images.split(8) if val_conditions is None
                           else list(zip(val_images.split(8), val_conditions.split(8))))
                metrics = evaluate_reconstructions(vae_, batches, perceptual)
                grid = validation_grid(vae_, val_images[:8], seed=cfg.train.seed,
                                       condition=None if val_conditions is None else val_conditions[:8])
            save_png(grid, output_dir / "samples" / f"step_{at_step:08d}.png")
            accelerator.log(metrics, step=at_step)
            append_history(output_dir, {"step": at_step, "train_seconds": round(train_seconds, 3), **metrics})
            log.info("step %d validation: %s", at_step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        accelerator.wait_for_everyone()
        return metrics

    # ---- train -------------------------------------------------------------------------------------------
    model.train()
    batches = iter(loader)
    progress = tqdm(total=cfg.train.max_steps, initial=step, disable=not main, desc="codec", dynamic_ncols=True)
    seconds_at_log, images_since = train_seconds, 0
    interval = IntervalMeans()  # the logged losses: means over the steps since the last log, on every process
    budget = cfg.train.max_minutes * 60 if cfg.train.max_minutes else None
    metrics: dict = {}
    validated_at = checkpointed_at = -1
    if step == 0 and cfg.train.validate_every > 0:
        metrics, validated_at = validate(0), 0
    # With a time budget, every rank stops and schedules from one shared clock (one tiny gather per batch).
    clock = agreed_seconds(accelerator, train_seconds) if budget is not None else train_seconds
    while step < cfg.train.max_steps and (budget is None or clock < budget):
        started = time.perf_counter()
        # With a time budget the schedule follows whichever runs out first, steps or time.
        schedule_step = step if budget is None else max(step, round(cfg.train.max_steps * clock / budget))
        lr = learning_rate(schedule_step, cfg.optim, cfg.train.max_steps)
        set_learning_rate(optimizer, lr)
        gan_on = use_gan and step >= cfg.loss.disc_start
        batch = next(batches)
        images = batch["pixels"]
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        draws = batch["draw"] if cfg.loss.sample_posterior or cfg.loss.quantisation_noise else None
        condition = batch.get("condition")  # a conditional codec's labels or caption embeddings

        # The equivariance regulariser's τ for this step, the same on every process (codec/measurement/equivariance.py).
        tau = (draw_transform(cfg.loss.equivariance, cfg.loss.equivariance_scales, cfg.train.seed, step)
               if cfg.loss.equivariance_weight > 0 else None)

        with accelerator.accumulate(*( [model, disc] if use_gan else [model] )):
            with accelerator.autocast():
                if tau is None:
                    recon, mean, logvar = model(images, draws, condition)
                    equivariant = None
                else:
                    recon, mean, logvar, *equivariant = model(images, draws, condition, tau,
                                                              cfg.loss.equivariance_resample)
                parts = criterion(images, recon, mean, logvar, inner.logvar, step, equivariant)
                loss = parts.total
                g_loss = gan_weight = torch.zeros((), device=images.device)
                if gan_on:
                    g_loss = generator_gan_loss(accelerator.unwrap_model(disc), recon)
                    # λ from the gradients of the whole global batch, the same on every rank.
                    gan_weight = cfg.loss.gan_weight * adaptive_gan_weight(
                        parts.nll, g_loss, last_layer, cfg.loss.adaptive_weight_max,
                        reduce_mean=lambda grad: accelerator.reduce(grad, reduction="mean"))
                    loss = loss + gan_weight * g_loss
            backward_and_step(accelerator, loss, optimizer, trainable, cfg.optim.max_grad_norm)

            d_loss = torch.zeros((), device=images.device)
            if gan_on:
                with accelerator.autocast():
                    d_loss = discriminator_loss(disc, images, recon)
                backward_and_step(accelerator, d_loss, opt_d, disc.parameters(), cfg.optim.max_grad_norm)
        interval.add({"loss/total": loss, "loss/rec": parts.rec, "loss/perceptual": parts.perceptual,
                      "loss/kl": parts.kl, "loss/g": g_loss, "loss/d": d_loss,
                      **({} if parts.equivariance is None else {"loss/equivariance": parts.equivariance})})

        images_since += images.shape[0] * accelerator.num_processes
        train_seconds += time.perf_counter() - started
        if budget is not None:
            clock = agreed_seconds(accelerator, train_seconds)
        if not accelerator.sync_gradients:
            continue
        step += 1
        if ema is not None:
            ema.step(inner.vae.parameters())
        progress.update(1)

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            elapsed = train_seconds - seconds_at_log
            logs = {
                **interval.means(lambda sums: accelerator.reduce(sums, reduction="mean")),
                "loss/nll_logvar": inner.logvar.item(), "loss/kl_weight": parts.kl_weight,
                "loss/gan_weight": float(gan_weight), "lr": lr, "images_per_s": images_since / max(elapsed, 1e-9),
            }
            accelerator.log(logs, step=step)
            if main:
                append_history(output_dir, {"step": step, "train_seconds": round(train_seconds, 3), **logs})
            progress.set_postfix(loss=f"{logs['loss/total']:.4f}", rec=f"{logs['loss/rec']:.4f}",
                                 perc=f"{logs['loss/perceptual']:.4f}", kl=f"{logs['loss/kl']:.1f}",
                                 img_s=f"{logs['images_per_s']:.1f}")
            seconds_at_log, images_since = train_seconds, 0
        if cfg.train.validate_every > 0 and (step % cfg.train.validate_every == 0 or step == cfg.train.max_steps):
            metrics, validated_at = validate(step), step
        if cfg.train.checkpoint_every > 0 and (step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps):
            save_checkpoint(accelerator, output_dir, step, cfg.train.keep_checkpoints,
                            {"train_seconds": train_seconds, "model": architecture})
            checkpointed_at = step
    progress.close()
    # A time budget can end the loop between scheduled events: validate and checkpoint the last step.
    if cfg.train.validate_every > 0 and validated_at != step:
        metrics = validate(step)
    if cfg.train.checkpoint_every > 0 and checkpointed_at != step:
        save_checkpoint(accelerator, output_dir, step, cfg.train.keep_checkpoints,
                        {"train_seconds": train_seconds, "model": architecture})

    # ---- export ------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    final = output_dir / "final"
    if main:
        vae_ = inner.vae
        if ema is not None:
            ema.copy_to(vae_.parameters())
        vae_.eval()
        final = export_codec(vae_, data, cfg, output_dir, dict(run_info, steps=step))
        log.info("exported %s (%s.from_pretrained loads it)", final, type(vae_).__name__)
        if parent is not None:
            identity = encoder_identity(vae_)
            log.info("encoder identity %s: %s", identity,
                     "the parent's, so shards encoded with the parent serve this codec"
                     if identity == parent.record["encoder_identity"]
                     else "not the parent's: re-encode shards made with the parent")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    stop_run_logging(log, handler)
    return TrainResult(final=final, step=step, metrics=metrics)
