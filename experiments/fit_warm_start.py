"""Fit the linear codec the thumbnail warm start sets (codec/network/linear_codec.py) and write its filters as JSON.

The shipped codec/linear_codec_f8c4.json was made by the defaults below, from the bundled *training* photos
(the held-out astronaut and coffee are not used), and its held-out PSNR is printed next to the thumbnail
baseline's. Re-run it with --data to fit your own images (then pass the file to `thumbnail_init(vae, linear=...)`).

    python -m experiments.fit_warm_start            # the shipped fit, about 4 minutes on 2 cores
    python -m experiments.fit_warm_start --data DIR --out my_filters.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from codec.data import CenterCrops, bundled_photos, load_image_dataset
from codec.measurement.metrics import psnr, quantise
from codec.measurement.quality import thumbnail_baseline
from codec.network.linear_codec import fit, fitted_path, initial
from experiments import CHECKOUT


def crops(source: str, size: int) -> torch.Tensor:
    dataset, column = load_image_dataset(source)
    return torch.stack([item["pixels"] for item in CenterCrops(dataset, column, size)])


def held_out_psnr(reconstructed: torch.Tensor, images: torch.Tensor) -> float:
    return psnr(quantise(reconstructed.clamp(-1, 1)), quantise(images)).mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.fit_warm_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="bundled", help="training images (folder, saved dataset, parquet) or 'bundled'")
    p.add_argument("--bundled-dir", default="data/bundled_photos", help="where the bundled photos are written")
    p.add_argument("--size", type=int, default=256, help="shorter side resize + centre crop of each image")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps of the least-squares fit")
    p.add_argument("--factor", type=int, choices=(4, 8), default=8,
                   help="down-sampling factor of the codec it starts: 8 (the diffusion codecs) or 4 (compress-f4.yaml)")
    p.add_argument("--out", default=None,
                   help="JSON file to write (default: the shipped codec/linear_codec_f<factor>c4.json)")
    args = p.parse_args(argv)
    train_dir, val_dir = bundled_photos(CHECKOUT / args.bundled_dir)
    train = crops(str(train_dir) if args.data == "bundled" else args.data, args.size)
    val = crops(str(val_dir), args.size)
    levels = args.factor.bit_length() - 1
    out = args.out or str(fitted_path(levels))
    started = time.perf_counter()
    codec = fit(train, steps=args.steps, levels=levels)
    seconds = time.perf_counter() - started
    codec.save(out)
    with torch.no_grad():
        start, fitted = initial(levels), codec
        rows = {
            "thumbnail (box + bicubic)": held_out_psnr(thumbnail_baseline(val, args.factor), val),
            "initial (box RGB + shifted luma)": held_out_psnr(start.decode(start.encode(val)), val),
            "fitted": held_out_psnr(fitted.decode(fitted.encode(val)), val),
            "fitted, on its training images": held_out_psnr(fitted.decode(fitted.encode(train)), train),
        }
    print(f"fitted on {len(train)} images at {args.size}² in {seconds:.0f} s -> {out}")
    for name, value in rows.items():
        print(f"  {name}: {value:.2f} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
