"""latent-codec codec train: train the KL-VAE codec (or fine-tune one you have) from a preset or YAML config."""

from __future__ import annotations

import argparse
import json
import sys

from latent_codec import cli

HELP = "train the KL-VAE codec, or fine-tune one you have"
DESCRIPTION = r"""Train the KL-VAE codec from a preset or a YAML config; the final EMA model is exported as a diffusers
AutoencoderKL folder at <out>/final.

    latent-codec codec train --config small --data photos/ --out runs/codec
    accelerate launch --multi_gpu --num_processes 2 -m latent_codec codec train --config kl-f8 --data ... --out ...
    # fine-tune a codec you have (a diffusers folder or an LDM .safetensors file), decoder only:
    latent-codec codec train --config finetune-decoder --pretrained PATH --data my_images/ --out runs/finetune

CPU-only machines: prefix a multi-process launch with ACCELERATE_USE_CPU=true. Re-running with --resume latest
continues an interrupted run to the same weights."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    cli.add_config_flags(p, "codec", required=True, example="loss.kl_weight=1e-5")
    p.add_argument("--data", help="training images: an image folder, webdataset tars (a .tar, a folder of them, a "
                   "brace pattern) or parquet files (img2dataset's layouts; indexed once for random access), a saved "
                   "`datasets` directory, .arrow files, a hub dataset name (needs network), or `bundled` "
                   "(scikit-image's photos); file forms may be s3://, gs:// or file:// URLs. Overrides data.train; "
                   "unless data.val is set, validation images are then held out of it.")
    cli.add_out(p, "checkpoints, logs, sample grids and final/ (overrides train.output_dir)", required=False)
    p.add_argument("--pretrained", metavar="PATH", help="start from this codec: a diffusers AutoencoderKL folder "
                   "(safetensors weights) or an LDM-format .safetensors VAE file; its architecture is used (sets "
                   "model.init=pretrained and model.pretrained)")
    cli.add_training_flags(p)

def run(args: argparse.Namespace) -> int:
    from codec.common.config import trainer_overrides
    from codec.training.config import load_codec_config

    # JSON-quoted, a path is one YAML string whatever it looks like (`2024`, `null`, `a: b`).
    start = ["model.init=pretrained", f"model.pretrained={json.dumps(args.pretrained)}"] if args.pretrained else []
    cfg = load_codec_config(cli.config_path(args.config, "codec"), trainer_overrides([*start, *args.set],
                                                                                    args.max_steps))
    # Paths are taken verbatim, not parsed as YAML values like --set's (a folder named `2024` or `null`).
    if args.data:
        cfg.data.train = args.data
    if args.out:
        cfg.train.output_dir = args.out
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
    sys.exit(cli.main_for(sys.modules[__name__]))
