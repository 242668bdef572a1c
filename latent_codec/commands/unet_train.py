"""latent-codec unet train: the text-conditioned latent U-Net on latent shards, the codec frozen."""

from __future__ import annotations

import argparse
import os
import sys

from latent_codec import cli

HELP = "train the text-conditioned latent U-Net on shards; exports a diffusers pipeline"
DESCRIPTION = r"""Train the text-conditioned latent U-Net on latent shards, with the codec frozen (its encoder never
runs).

    latent-codec unet train --config small --shards shards/ --codec runs/codec/final --out runs/unet
    accelerate launch --multi_gpu --num_processes 2 -m latent_codec unet train --config tiny ...
    latent-codec unet train --config small --shards ... --codec ... --out runs/unet --resume latest

Make the shards first with `latent-codec shards encode --codec C --data IMAGES --out SHARDS`. CPU-only machines:
prefix a multi-process launch with ACCELERATE_USE_CPU=true. The whole pipeline (codec, U-Net with EMA weights, text
encoder, tokenizer, scheduler) is exported to <out>/pipeline; `latent-codec generate --pipeline <that folder>`
samples it. Presets: tiny (tests, smoke runs), small (CPU default, 13 M parameters), sd (Stable Diffusion 1.x's
U-Net shape, for GPUs)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_config_flags(p, "unet", required=True, example="diffusion.prediction_type=v_prediction")
    p.add_argument("--shards", metavar="DIR", help="latent shards folder written by `latent-codec shards encode` "
                   "(overrides `shards`)")
    p.add_argument("--codec", metavar="DIR", help="the codec folder that encoded the shards (overrides `codec`); "
                   "shards made by another codec are refused. Its decoder draws the validation samples; it is copied "
                   "into the export")
    cli.add_out(p, "checkpoints, logs, sample grids and pipeline/ (overrides train.output_dir)", required=False)
    cli.add_training_flags(p)


def run(args: argparse.Namespace) -> int:
    from codec.common.config import trainer_overrides
    from diffusion.config import load_unet_config

    cfg = load_unet_config(cli.config_path(args.config, "unet"), trainer_overrides(args.set, args.max_steps))
    # Paths are taken verbatim, not parsed as YAML values like --set's.
    cfg.shards = args.shards or cfg.shards
    cfg.codec = args.codec or cfg.codec
    cfg.train.output_dir = args.out or cfg.train.output_dir
    if not cfg.shards or not cfg.codec:
        raise cli.CommandError("give the latent shards and their codec: --shards DIR --codec DIR")
    from diffusion.train import train_unet

    result = train_unet(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"pipeline exported to {result.pipeline} after {result.step} steps", flush=True)  # see codec_train
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
