#!/usr/bin/env python
r"""How diffusable is a codec's latent space? Statistics, spectrum and equivariance of its latents, on your images.

    python scripts/analyze_latents.py --codec runs/demo/codec/final --data bundled --resolution 256 --out runs/analysis
    python scripts/analyze_latents.py --codec plain=runs/a/final --codec eq=runs/b/final --data data/shapes \
        --resolution 64 --limit 256 --out runs/analysis

For each codec (the same centre crops for all): per-channel mean, std, largest |value| and posterior σ of the
latents; the radially averaged power spectrum of the latents beside that of the images' luma at the latent's
size, and the share of latent power above half the Nyquist frequency (less diffuses better: Skorokhodov et al.
2025); the equivariance error, PSNR of D(τ(z)) against τ(x) for downscales and quarter turns (higher diffuses
better: EQ-VAE); and the plain reconstruction's PSNR and SSIM. Writes analysis.json, analysis.md and
spectrum.png to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codec.measurement.equivariance import RESAMPLING
from codec.measurement.latent_analysis import named_codec


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", action="append", required=True, type=named_codec,
                   help="a diffusers AutoencoderKL folder, optionally NAME=FOLDER; repeat to compare codecs on the "
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
    p.add_argument("--bundled-dir", default="data/bundled_photos", help="where `bundled` photos are written")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    codecs = dict(args.codec)
    if len(codecs) != len(args.codec):
        print("error: --codec: two codecs have the same name; give NAME=FOLDER", file=sys.stderr)
        return 2
    from codec.measurement.latent_analysis import analysis_table, analyze_codecs, load_images

    try:
        images = load_images(args.data, args.resolution, args.limit, args.bundled_dir)
        analyses = analyze_codecs(codecs, images, args.out, args.batch_size, args.scales, args.resample)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(analysis_table(analyses))
    print(f"report: {args.out / 'analysis.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
