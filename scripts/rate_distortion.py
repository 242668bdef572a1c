#!/usr/bin/env python
r"""Rate-distortion sweep: the codec with each probability model over steps Δ, JPEG and WebP over quality, on the
same held-out images; bits per pixel of the real files against PSNR and MS-SSIM.

    python scripts/rate_distortion.py --codec runs/codec/final --model runs/entropy/factorized.safetensors \
        --model runs/entropy/context.safetensors --data bundled --resolution 512 --out runs/rd-512

Images: shorter side resized to R, centre crop R x R (as scripts/evaluate_codec.py). Rate: each file's bytes x 8 /
(R·R), header included: the codec's files are exactly what scripts/compress.py writes. Scores on the decoded uint8
image. Also reported: the codec's posterior KL in bits per pixel beside the measured rate, whether the codec lies
above JPEG and WebP at every rate up to 0.25 bpp, the context model's saving over the factorized one at equal
PSNR, and encode / decode seconds per image of every method from the same run. Writes rd.json, rd.png and
report.md to --out (each atomically).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from codec.common.config import ConfigError
from codec.entropy.models import check_model_codec, load_model
from codec.entropy.rate_distortion import geometric_steps, sweep, write_outputs
from codec.measurement.latent_analysis import load_images, named_codec
from codec.network.fast import prepare_for_inference
from codec.network.model import codec_identity, encoder_identity, load_codec

JPEG_QUALITIES = [1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 65, 80, 95]
WEBP_QUALITIES = [0, 1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 65, 80, 95]
DEFAULT_STEP_COUNT = 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", required=True, help="the diffusers AutoencoderKL folder (safetensors weights) the "
                   "models were fit for")
    p.add_argument("--model", required=True, action="append", metavar="[NAME=]FILE",
                   help="probability model file from scripts/fit_entropy_model.py, fit on shards of this codec; "
                   "repeat for several models. Each curve is labelled with the model's kind (factorized / "
                   "context), or NAME when given as NAME=FILE (needed when two models have one kind)")
    p.add_argument("--data", default="bundled", help="an image folder, a save_to_disk directory, .parquet/.arrow "
                   "files, or `bundled`: the held-out bundled photos (default bundled)")
    p.add_argument("--resolution", type=int, default=256, help="side R of the centre crop, after resizing the "
                   "shorter side to R (default 256)")
    p.add_argument("--limit", type=int, help="use at most this many readable images (default: all)")
    p.add_argument("--steps", type=float, nargs="+", metavar="Δ", help="quantisation steps, in the models' "
                   "normalised latent units (larger is fewer bits) (default: "
                   f"{DEFAULT_STEP_COUNT} geometric steps spanning the Δ range every model was fit for)")
    p.add_argument("--jpeg-qualities", type=int, nargs="+", default=JPEG_QUALITIES, metavar="Q",
                   help=f"Pillow JPEG qualities, 1..95 (default {' '.join(map(str, JPEG_QUALITIES))})")
    p.add_argument("--webp-qualities", type=int, nargs="+", default=WEBP_QUALITIES, metavar="Q",
                   help=f"Pillow WebP qualities, 0..100, method 6 (default {' '.join(map(str, WEBP_QUALITIES))})")
    p.add_argument("--max-bpp", type=float, default=1.0, help="right end of the plot's x axis in bits per pixel; "
                   "every point is in rd.json and report.md whatever its rate (default 1.0)")
    p.add_argument("--out", required=True, type=Path, help="folder for rd.json, rd.png and report.md (created if "
                   "missing)")
    p.add_argument("--keep-files", action="store_true", help="also keep every file the sweep made under "
                   "<out>/files/<method>/<step or quality>/<image index>.lcc|.jpg|.webp")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the VAE runs (default cuda when available, else cpu); the range coder and the "
                   "probability models always run on the CPU in float64")
    p.add_argument("--bundled-dir", default="data/bundled_photos", help="where `bundled` photos are written "
                   "(default data/bundled_photos)")
    return p.parse_args(argv)


def load_models(values: list[str], identity: str, encoder: str | None) -> dict:
    """{label: model} of the --model arguments, each checked against the codec."""
    models = {}
    for value in values:
        name, path = named_codec(value) if "=" in value else (None, value)
        model = load_model(path)
        check_model_codec(model, identity, encoder)
        label = name or model.kind
        if label in models:
            raise ConfigError(f"--model {value}: the label {label!r} is taken by --model {models[label].path}; "
                              f"name them, e.g. --model {label}-a={models[label].path} --model {label}-b={path}")
        models[label] = model
    return models


def check_settings(args, models: dict) -> list[float]:
    """The steps to sweep (the default from the models' common fitted range); bad settings are ConfigErrors."""
    if args.resolution < 1 or (args.limit is not None and args.limit < 1) or not args.max_bpp > 0:
        raise ConfigError("--resolution and --limit must be at least 1 and --max-bpp positive")
    for flag, qualities, (low, high) in (("--jpeg-qualities", args.jpeg_qualities, (1, 95)),
                                         ("--webp-qualities", args.webp_qualities, (0, 100))):
        if any(not low <= q <= high for q in qualities):
            raise ConfigError(f"{flag} {' '.join(map(str, qualities))}: each must be in {low}..{high}")
    if args.steps is not None:
        if any(not s > 0 for s in args.steps):
            raise ConfigError(f"--steps {' '.join(map(str, args.steps))}: each step Δ must be positive")
        return sorted(args.steps)
    low = max(m.step_range[0] for m in models.values())
    high = min(m.step_range[1] for m in models.values())
    if not 0 < low <= high:
        raise ConfigError("the models were fit for Δ ranges with nothing in common ("
                          + ", ".join(f"{label}: {m.step_range}" for label, m in models.items()) + "); give --steps")
    return geometric_steps(low, high, DEFAULT_STEP_COUNT)


def read_images(args) -> torch.Tensor:
    """The centre crops; datasets' progress bars are off meanwhile, so a refusal is the one line on stderr."""
    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        return load_images(args.data, args.resolution, args.limit, args.bundled_dir)
    except RuntimeError as exc:  # nothing readable, or a source datasets cannot open
        raise ConfigError(f"--data {args.data}: {exc}") from None
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device}: no CUDA device here; use --device cpu")
        vae = prepare_for_inference(load_codec(args.codec).to(args.device))
        identity = codec_identity(vae)
        models = load_models(args.model, identity, encoder_identity(vae))
        steps = check_settings(args, models)
        images = read_images(args)
        result = sweep(vae, models, images, steps, args.jpeg_qualities, args.webp_qualities, identity,
                       files_dir=args.out / "files" if args.keep_files else None)
        result.update(codec=str(args.codec), data=args.data if args.data != "bundled" else
                      f"bundled ({Path(args.bundled_dir) / 'val'})")
        paths = write_outputs(result, args.out, args.max_bpp)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError, BitstreamError, EntropyModelError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"KL of the posterior: {result['kl_bits_per_pixel']:.4f} bpp")
    for check in result["above_references"]:
        print(f"{check['ours']} vs {check['reference']} ({check['metric']}, up to {check['max_bpp']:g} bpp): "
              f"{check['verdict']}")
    print(f"report: {paths['report.md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
