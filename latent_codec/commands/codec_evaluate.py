"""latent-codec codec evaluate: a codec next to the reference lines it must beat, on the same images."""

from __future__ import annotations

import argparse
import sys

from latent_codec import cli

HELP = "measure a codec against a thumbnail and JPEG at the latent's size"
DESCRIPTION = r"""Evaluate a trained codec next to the reference lines it must beat, on the same images in the same run.

    latent-codec codec evaluate --codec runs/codec/final --data bundled --resolution 256
    latent-codec codec evaluate --codec runs/my-codec/final --data val_images/ --resolution 512 \
        --lpips-backbone ~/alexnet-owt-7be5be79.pth --inception ~/weights-inception-2015-12-05-6726825d.pth

Images: shorter side resized to R, centre crop R x R, reconstructed from the posterior mean. Scores (uint8 RGB):
PSNR, SSIM, MS-SSIM, LPIPS when its backbone file is present, rFID when Inception weights are given. Reference
lines: a box-downsampled thumbnail (bicubic back up) and JPEG at the byte size of the latent in fp16 and in 8 bits.
Writes per_image.csv, summary.json, summary.md and worst.png (lowest codec PSNR) to --out."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codec", required=True, metavar="DIR", help="codec folder: a diffusers AutoencoderKL "
                   "(a training run's final/)")
    p.add_argument("--data", required=True, help="an image folder, a save_to_disk directory, .parquet/.arrow files, "
                   "a hub dataset name (needs network), or `bundled` (the held-out bundled photos)")
    p.add_argument("--resolution", type=int, default=256, help="side of the centre crop (default 256)")
    cli.add_out(p, "the report (default: evaluation-<R> next to the codec folder)", required=False)
    p.add_argument("--limit", type=int, help="evaluate at most this many readable images")
    p.add_argument("--batch-size", type=int, default=4, help="images per encoder/decoder call (default 4)")
    p.add_argument("--inception", metavar="FILE", help="FID InceptionV3 weights file (torch-fidelity's "
                   "weights-inception-2015-12-05-6726825d.pth or a .safetensors copy); without it rFID is not measured")
    p.add_argument("--lpips-backbone", metavar="FILE", help="torchvision AlexNet ImageNet weights for LPIPS "
                   "(default: torch hub's cache, checkpoints/alexnet-owt-7be5be79.pth); without the file LPIPS is "
                   "not measured")
    p.add_argument("--tile-size", type=int, help="encode and decode in overlapping tiles of this many pixels when "
                   "the image is larger (a multiple of 8)")
    p.add_argument("--tile-norm", choices=("tile", "image"), default="tile",
                   help="with --tile-size: GroupNorm statistics per tile (one pass; fine for codecs started from the "
                        "linear warm start, ~1 grey level of tone difference) or of the whole image (no tone shift "
                        "between tiles at any codec, ~13x the time; docs/performance.md)")
    p.add_argument("--bundled-dir", default="data/bundled_photos", metavar="DIR",
                   help="where `bundled` photos are written (default data/bundled_photos)")
    p.add_argument("--split", default="train", help="dataset split to read (image folders without split "
                   "sub-folders have only `train`)")


def run(args: argparse.Namespace) -> int:
    from codec.measurement.evaluate import evaluate_codec, quality_table

    result, paths = evaluate_codec(
        args.codec, args.data, resolution=args.resolution, out_dir=args.out, limit=args.limit,
        batch_size=args.batch_size, inception=args.inception, lpips_backbone=args.lpips_backbone,
        tile_size=args.tile_size, tile_norm=args.tile_norm, bundled_dir=args.bundled_dir, split=args.split,
    )
    print(quality_table(result.summary))
    print(f"\nlpips: {result.summary['lpips_note']}\nrfid: {result.summary['rfid_note']}")
    print(f"report: {paths['summary.md'].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
