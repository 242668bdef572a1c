#!/usr/bin/env python
"""Train the KL-VAE codec from a YAML config.

    accelerate launch scripts/train_codec.py --config configs/codec/small.yaml
    accelerate launch --multi_gpu --num_processes 2 scripts/train_codec.py --config configs/codec/tiny.yaml
    # CPU-only machines: prefix the multi-process launch with ACCELERATE_USE_CPU=true
    # fine-tune a codec you have (a diffusers folder or an LDM .safetensors file), decoder only:
    python scripts/train_codec.py --config configs/codec/finetune-decoder.yaml --pretrained PATH --data my_images/

Plain `python scripts/train_codec.py ...` runs one process. The final EMA model is exported as a diffusers
folder at <output-dir>/final (AutoencoderKL.from_pretrained loads it).
"""

from __future__ import annotations

import argparse
import json
import sys

from codec.common.config import exit_status, trainer_overrides
from codec.training.config import load_codec_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML preset, e.g. configs/codec/small.yaml (tiny, small, kl-f8)")
    p.add_argument("--data", help="training images: an image folder, a saved `datasets` directory, parquet/arrow "
                   "files, a hub dataset name (needs network), or `bundled` (scikit-image's photos). "
                   "Overrides data.train; unless data.val is set, validation images are then held out of it.")
    p.add_argument("--output-dir",
                   help="run folder for checkpoints, logs, sample grids and final/ (overrides train.output_dir)")
    p.add_argument("--pretrained", metavar="PATH", help="start from this codec: a diffusers AutoencoderKL folder "
                   "(safetensors weights) or an LDM-format .safetensors VAE file; its architecture is used (sets "
                   "model.init=pretrained and model.pretrained)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train in total (overrides train.max_steps)")
    p.add_argument("--resume", help="`latest` continues from the newest checkpoint in the output dir (or starts "
                   "fresh when there is none); a checkpoint folder path continues from that one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set loss.kl_weight=1e-5 --set train.batch_size=4 "
                   "(repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: run(args))


def run(args: argparse.Namespace) -> int:
    # JSON-quoted, a path is one YAML string whatever it looks like (`2024`, `null`, `a: b`).
    start = ["model.init=pretrained", f"model.pretrained={json.dumps(args.pretrained)}"] if args.pretrained else []
    cfg = load_codec_config(args.config, trainer_overrides([*start, *args.set], args.max_steps))
    # Paths are taken verbatim, not parsed as YAML values like --set's (a folder named `2024` or `null`).
    if args.data:
        cfg.data.train = args.data
    if args.output_dir:
        cfg.train.output_dir = args.output_dir
    if (args.data and args.data != "bundled" and cfg.data.val == "bundled"
            and not any(o.startswith("data.val=") for o in args.set)):
        cfg.data.val = None  # validate on the user's own images, held out of their training set
    from codec.training.train import train_codec

    result = train_codec(cfg, resume=args.resume)
    # Flushed at once: every process of a launch prints this line into the same pipe, and a line left in a buffer
    # until exit can land in the middle of another process's output.
    print(f"codec exported to {result.final} after {result.step} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
