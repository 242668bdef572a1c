"""latent-codec analyze rate-distortion: the codec's files against JPEG and WebP, bits per pixel against quality."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from codec.common.config import ConfigError
from codec.entropy.models import check_model_codec, load_model
from codec.entropy.rate_distortion import geometric_steps
from codec.measurement.latent_analysis import load_images, named_codec
from latent_codec import cli

JPEG_QUALITIES = [1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 65, 80, 95]
WEBP_QUALITIES = [0, 1, 2, 3, 5, 8, 10, 15, 20, 30, 40, 50, 65, 80, 95]
DEFAULT_STEP_COUNT = 8

HELP = "rate-distortion sweep of the codec's files against JPEG and WebP on the same images"
DESCRIPTION = r"""Rate-distortion sweep: the codec with each probability model over steps Δ, JPEG and WebP over
quality, on the same held-out images; bits per pixel of the real files against PSNR and MS-SSIM.

    latent-codec analyze rate-distortion --codec runs/codec/final \
        --entropy-model runs/entropy/factorized/entropy-model.safetensors \
        --entropy-model runs/entropy/context/entropy-model.safetensors --data bundled --resolution 512 --out runs/rd-512

Images: shorter side resized to R, centre crop R x R (as `codec evaluate`). Rate: each file's bytes x 8 /
(R·R), header included: the codec's files are exactly what `latent-codec compress` writes. Scores on the decoded uint8
image. Also reported: the codec's posterior KL in bits per pixel beside the measured rate, whether the codec lies
above JPEG and WebP at every rate up to 0.25 bpp, the context model's saving over the factorized one at equal
PSNR, and encode / decode seconds per image of every method from the same run. Writes rd.json, rd.png and
report.md to --out (each atomically).
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codec", required=True, metavar="DIR", help="codec folder: the diffusers AutoencoderKL "
                   "(safetensors weights) the models were fit for")
    p.add_argument("--entropy-model", required=True, action="append", metavar="[NAME=]FILE",
                   help="probability-model file from `latent-codec entropy fit`, fit on shards of this codec; "
                   "repeat for several models. Each curve is labelled with the model's kind (factorized / "
                   "context), or NAME when given as NAME=FILE (needed when two models have one kind)")
    p.add_argument("--data", default="bundled", help="an image folder, a save_to_disk directory, .parquet/.arrow "
                   "files, or `bundled`: the held-out bundled photos (default bundled)")
    p.add_argument("--resolution", type=int, default=256, help="side R of the centre crop, after resizing the "
                   "shorter side to R (default 256)")
    p.add_argument("--limit", type=int, help="use at most this many readable images (default: all)")
    p.add_argument("--deltas", type=float, nargs="+", metavar="Δ", help="quantisation steps, in the models' "
                   "normalised latent units (larger is fewer bits) (default: "
                   f"{DEFAULT_STEP_COUNT} geometric steps spanning the Δ range every model was fit for)")
    p.add_argument("--jpeg-qualities", type=int, nargs="+", default=JPEG_QUALITIES, metavar="Q",
                   help=f"Pillow JPEG qualities, 1..95 (default {' '.join(map(str, JPEG_QUALITIES))})")
    p.add_argument("--webp-qualities", type=int, nargs="+", default=WEBP_QUALITIES, metavar="Q",
                   help=f"Pillow WebP qualities, 0..100, method 6 (default {' '.join(map(str, WEBP_QUALITIES))})")
    p.add_argument("--max-bpp", type=float, default=1.0, help="right end of the plot's x axis in bits per pixel; "
                   "every point is in rd.json and report.md whatever its rate (default 1.0)")
    cli.add_out(p, "rd.json, rd.png and report.md")
    p.add_argument("--keep-files", action="store_true", help="also keep every file the sweep made under "
                   "<out>/files/<method>/<step or quality>/<image index>.lcc|.jpg|.webp")
    p.add_argument("--device", default=None,
                   help="where the VAE runs (default cuda when available, else cpu); the range coder and the "
                   "probability models always run on the CPU in float64")
    p.add_argument("--bundled-dir", default="data/bundled_photos", metavar="DIR",
                   help="where `bundled` photos are written "
                   "(default data/bundled_photos)")


def load_models(values: list[str], identity: str, encoder: str | None) -> dict:
    """{label: model} of the --entropy-model arguments, each checked against the codec."""
    models = {}
    for value in values:
        name, path = named_codec(value) if "=" in value else (None, value)
        model = load_model(path)
        check_model_codec(model, identity, encoder)
        label = name or model.kind
        if label in models:
            raise ConfigError(f"--entropy-model {value}: the label {label!r} is taken by --entropy-model "
                              f"{models[label].path}; name them, e.g. --entropy-model {label}-a={models[label].path} "
                              f"--entropy-model {label}-b={path}")
        models[label] = model
    return models


def check_settings(args, models: dict) -> list[float]:
    """The steps Δ to sweep (the default from the models' common fitted range); bad settings are ConfigErrors."""
    if args.resolution < 1 or (args.limit is not None and args.limit < 1) or not args.max_bpp > 0:
        raise ConfigError("--resolution and --limit must be at least 1 and --max-bpp positive")
    for flag, qualities, (low, high) in (("--jpeg-qualities", args.jpeg_qualities, (1, 95)),
                                         ("--webp-qualities", args.webp_qualities, (0, 100))):
        if any(not low <= q <= high for q in qualities):
            raise ConfigError(f"{flag} {' '.join(map(str, qualities))}: each must be in {low}..{high}")
    if args.deltas is not None:
        if any(not s > 0 for s in args.deltas):
            raise ConfigError(f"--deltas {' '.join(map(str, args.deltas))}: each step Δ must be positive")
        return sorted(args.deltas)
    low = max(m.step_range[0] for m in models.values())
    high = min(m.step_range[1] for m in models.values())
    if not 0 < low <= high:
        raise ConfigError("the models were fit for Δ ranges with nothing in common ("
                          + ", ".join(f"{label}: {m.step_range}" for label, m in models.items()) + "); give --deltas")
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


def run(args: argparse.Namespace) -> int:
    from codec.entropy.rate_distortion import sweep, write_outputs
    from codec.network.fast import prepare_for_inference
    from codec.network.model import codec_identity, encoder_identity, load_codec

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device here; use --device cpu")
    vae = prepare_for_inference(load_codec(args.codec).to(args.device))
    identity = codec_identity(vae)
    models = load_models(args.entropy_model, identity, encoder_identity(vae))
    steps = check_settings(args, models)
    images = read_images(args)
    result = sweep(vae, models, images, steps, args.jpeg_qualities, args.webp_qualities, identity,
                   files_dir=out / "files" if args.keep_files else None)
    result.update(codec=str(args.codec), data=args.data if args.data != "bundled" else
                  f"bundled ({Path(args.bundled_dir) / 'val'})")
    paths = write_outputs(result, out, args.max_bpp)
    print(f"KL of the posterior: {result['kl_bits_per_pixel']:.4f} bpp")
    for check in result["above_references"]:
        print(f"{check['ours']} vs {check['reference']} ({check['metric']}, up to {check['max_bpp']:g} bpp): "
              f"{check['verdict']}")
    print(f"report: {paths['report.md']}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
