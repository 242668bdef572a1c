"""latent-codec analyze latents: how diffusable is a codec's latent space, on your images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codec.measurement.equivariance import RESAMPLING
from codec.measurement.latent_analysis import named_codec
from latent_codec import cli

HELP = "statistics, spectrum and equivariance of codecs' latents, side by side"
DESCRIPTION = r"""How diffusable is a codec's latent space? Statistics, spectrum and equivariance of its latents,
on your images.

    latent-codec analyze latents --codec runs/codec/final --data bundled --resolution 256 --out runs/analysis
    latent-codec analyze latents --codec plain=runs/a/final --codec eq=runs/b/final --data data/shapes \
        --resolution 64 --limit 256 --out runs/analysis

For each codec (the same centre crops for all): per-channel mean, std, largest |value| and posterior σ of the
latents; the radially averaged power spectrum of the latents beside that of the images' luma at the latent's
size, and the share of latent power above half the Nyquist frequency (less diffuses better: Skorokhodov et al.
2025); the equivariance error, PSNR of D(τ(z)) against τ(x) for downscales and quarter turns (higher diffuses
better: EQ-VAE); and the plain reconstruction's PSNR and SSIM. Writes analysis.json, analysis.md and
spectrum.png to --out."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codec", action="append", required=True, type=named_codec, metavar="[NAME=]DIR",
                   help="codec folder (a diffusers AutoencoderKL), optionally named; repeat to compare codecs on the "
                   "same images")
    p.add_argument("--data", required=True, help="an image folder, a save_to_disk directory, .parquet/.arrow files, "
                   "or `bundled` (the held-out bundled photos)")
    p.add_argument("--resolution", type=int, default=256, help="side of the centre crop (default 256)")
    p.add_argument("--limit", type=int, default=64, help="analyse at most this many images (default 64)")
    p.add_argument("--batch-size", type=int, default=8, help="images per encoder call (default 8)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.25],
                   help="downscale factors of the equivariance error (default 0.5 0.25)")
    p.add_argument("--resample", choices=RESAMPLING, default="area", help="how τ downscales latents and images: "
                   "area (anti-aliased, the default) or bilinear (EQ-VAE's)")
    p.add_argument("--bundled-dir", default="data/bundled_photos", metavar="DIR",
                   help="where `bundled` photos are written (default data/bundled_photos)")
    cli.add_out(p, "analysis.json, analysis.md and spectrum.png")


def run(args: argparse.Namespace) -> int:
    from codec.measurement.latent_analysis import analysis_table, analyze_codecs, load_images

    codecs = dict(args.codec)
    if len(codecs) != len(args.codec):
        raise cli.CommandError("--codec: two codecs have the same name; give NAME=DIR")
    out = Path(args.out)
    images = load_images(args.data, args.resolution, args.limit, args.bundled_dir)
    analyses = analyze_codecs(codecs, images, out, args.batch_size, args.scales, args.resample)
    print(analysis_table(analyses))
    print(f"report: {out / 'analysis.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
