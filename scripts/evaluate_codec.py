#!/usr/bin/env python
r"""Evaluate a trained codec next to the reference lines it must beat, on the same images in the same run.

    python scripts/evaluate_codec.py --codec runs/demo/codec/final --data bundled --resolution 256
    python scripts/evaluate_codec.py --codec runs/my-codec/final --data /path/to/val_images --resolution 512 \
        --lpips-backbone ~/alexnet-owt-7be5be79.pth --inception ~/weights-inception-2015-12-05-6726825d.pth

Images: shorter side resized to R, centre crop R x R, reconstructed from the posterior mean. Scores (uint8 RGB):
PSNR, SSIM, MS-SSIM, LPIPS when its backbone file is present, rFID when Inception weights are given. Reference
lines: a box-downsampled thumbnail (bicubic back up) and JPEG at the byte size of the latent in fp16 and in 8 bits.
Writes per_image.csv, summary.json, summary.md and worst.png (lowest codec PSNR) to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codec.measurement.evaluate import evaluate_codec, quality_table
from codec.measurement.metrics import InceptionUnavailable


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", required=True, help="diffusers AutoencoderKL folder (a training run's final/)")
    p.add_argument("--data", required=True, help="an image folder, a save_to_disk directory, .parquet/.arrow files, "
                   "a hub dataset name (needs network), or `bundled` (the held-out bundled photos)")
    p.add_argument("--resolution", type=int, default=256, help="side of the centre crop (default 256)")
    p.add_argument("--out", type=Path, help="report folder (default: evaluation-<R> next to the codec folder)")
    p.add_argument("--limit", type=int, help="evaluate at most this many readable images")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--inception", help="FID InceptionV3 weights file (torch-fidelity's "
                   "weights-inception-2015-12-05-6726825d.pth or a .safetensors copy); without it rFID is not measured")
    p.add_argument("--lpips-backbone", help="torchvision AlexNet ImageNet weights for LPIPS (default: torch hub's "
                   "cache, checkpoints/alexnet-owt-7be5be79.pth); without the file LPIPS is not measured")
    p.add_argument("--tile-size", type=int, help="encode and decode in overlapping tiles of this many pixels when "
                   "the image is larger (a multiple of 8)")
    p.add_argument("--tile-norm", choices=("tile", "image"), default="tile",
                   help="with --tile-size: GroupNorm statistics per tile (one pass; fine for codecs started from the "
                        "linear warm start, ~1 grey level of tone difference) or of the whole image (no tone shift "
                        "between tiles at any codec, ~13x the time; docs/performance.md)")
    p.add_argument("--bundled-dir", default="data/bundled_photos", help="where `bundled` photos are written")
    p.add_argument("--split", default="train", help="dataset split to read (image folders without split "
                   "sub-folders have only `train`)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run, paths = evaluate_codec(
            args.codec, args.data, resolution=args.resolution, out_dir=args.out, limit=args.limit,
            batch_size=args.batch_size, inception=args.inception, lpips_backbone=args.lpips_backbone,
            tile_size=args.tile_size, tile_norm=args.tile_norm, bundled_dir=args.bundled_dir, split=args.split,
        )
    except (FileNotFoundError, InceptionUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(quality_table(run.summary))
    print(f"\nlpips: {run.summary['lpips_note']}\nrfid: {run.summary['rfid_note']}")
    print(f"report: {paths['summary.md'].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
