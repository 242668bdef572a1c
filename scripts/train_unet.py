#!/usr/bin/env python
"""Train the text-conditioned latent U-Net on latent shards, with the codec frozen (its encoder never runs).

    accelerate launch scripts/train_unet.py --config configs/unet/small.yaml --shards shards/ --codec runs/codec/final
    accelerate launch --multi_gpu --num_processes 2 scripts/train_unet.py --config configs/unet/tiny.yaml ...
    # CPU-only machines: prefix the multi-process launch with ACCELERATE_USE_CPU=true
    python scripts/train_unet.py --config configs/unet/small.yaml --shards ... --codec ... --resume latest

Make the shards first with scripts/encode_dataset.py --codec C --data IMAGES --out SHARDS. Plain `python
scripts/train_unet.py ...` runs one process. The whole pipeline (codec, U-Net with EMA weights, text encoder,
tokenizer, scheduler) is exported to <output-dir>/pipeline; scripts/generate.py --model <that folder> samples it.
"""

from __future__ import annotations

import argparse
import os
import sys

from codec.common.config import exit_status, trainer_overrides
from diffusion.config import load_unet_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="YAML preset: configs/unet/tiny.yaml (tests, smoke runs), small.yaml "
                   "(CPU default, 13 M parameters), sd.yaml (Stable Diffusion 1.x's U-Net shape, for GPUs)")
    p.add_argument("--shards", help="latent shards folder written by scripts/encode_dataset.py (overrides `shards`)")
    p.add_argument("--codec", help="the codec folder that encoded the shards (overrides `codec`); shards made by "
                   "another codec are refused. Its decoder draws the validation samples; it is copied into the export")
    p.add_argument("--output-dir", help="run folder for checkpoints, logs, sample grids and pipeline/ "
                   "(overrides train.output_dir)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train in total (overrides train.max_steps)")
    p.add_argument("--resume", help="`latest` continues from the newest checkpoint in the output dir (or starts fresh "
                   "when there is none); a checkpoint folder path continues from that one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set diffusion.prediction_type=v_prediction "
                   "--set train.batch_size=16 --set text_encoder.path=/models/clip-text (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    cfg = load_unet_config(args.config, trainer_overrides(args.set, args.max_steps))
    # Paths are taken verbatim, not parsed as YAML values like --set's.
    cfg.shards = args.shards or cfg.shards
    cfg.codec = args.codec or cfg.codec
    cfg.train.output_dir = args.output_dir or cfg.train.output_dir
    if not cfg.shards or not cfg.codec:
        print("error: give the latent shards and their codec: --shards DIR --codec DIR", file=sys.stderr)
        return 2
    from diffusion.train import train_unet

    result = train_unet(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"pipeline exported to {result.pipeline} after {result.step} steps", flush=True)  # see train_codec.py
    return 0


if __name__ == "__main__":
    sys.exit(main())
