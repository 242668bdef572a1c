#!/usr/bin/env python
"""Write the shapes-world dataset: one big coloured shape per image, captioned with its colour, shape and place.

    python scripts/make_shapes.py --out data/shapes --count 2000 --seed 0 --size 512
    python scripts/make_shapes.py --out data/shapes-64 --count 2000 --size 64 --preview shapes.png

The output is a save_to_disk dataset (columns image, text, color, shape, position, background, cx, cy, radius) that
scripts/encode_dataset.py --data reads directly, taking captions from its 'text' column. With --crop random
the encoder mirrors about half the images and, by default (--flip swap-left-right), swaps 'left' and 'right' in
their captions, so 'a red circle at the top left' stays true of its mirrored picture. Running again with the same
--count, --seed and --size reuses the folder; a folder written with other values is refused.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # experiments/ runs from the checkout

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataset folder to write (built beside it, then renamed into place)")
    p.add_argument("--count", type=int, default=2000, help="number of images (default 2000); every object colour "
                   "appears equally often, give or take one")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes; the same seed gives the same images and "
                   "captions (default 0)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, at least 16 (default 512)")
    p.add_argument("--preview", metavar="PATH", help="also write a PNG grid of the first 16 scenes with their "
                   "captions (re-rendered at 192 px, whatever --size is)")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error(f"--count must be >= 1, got {args.count}")
    if args.size < 16:
        p.error(f"--size must be >= 16, got {args.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from experiments.demo.shapes import preview_grid, scenes, write_shapes_dataset

    existed = Path(args.out).exists()
    start = time.perf_counter()
    try:
        out = write_shapes_dataset(args.out, args.count, args.seed, args.size, progress=True)
    except ValueError as exc:  # an --out holding another dataset: say so without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    if args.preview:
        preview_grid(scenes(min(args.count, 16), args.seed)).save(args.preview)
        print(f"preview: {args.preview}")
    done = "already there, reused" if existed else f"written in {seconds:.1f} s"
    print(f"{out}: {args.count} images of {args.size}x{args.size} (seed {args.seed}), {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
