#!/usr/bin/env python
"""Several rate-distortion sweeps in one plot: the codec curves of each rd.json (scripts/rate_distortion.py) under
its label, and JPEG's and WebP's curves once, from the first. The sweeps must be of the same images at the same
size, or their curves would not be comparable; anything else is refused.

    python scripts/plot_rd.py plain=runs/rd-plain/rd.json noise=runs/rd-noise/rd.json --out compare.png
    python scripts/plot_rd.py ... --curves context jpeg   # only these curves of each sweep
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from codec.entropy.rate_distortion import REFERENCES, plot_rate_distortion


def load_sweep(spec: str) -> tuple[str, dict]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"{spec}: expected LABEL=rd.json")
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable rd.json ({exc})") from None
    if not isinstance(result, dict) or not {"curves", "kinds", "resolution", "images", "data"} <= result.keys():
        raise ValueError(f"{path}: not an rd.json written by scripts/rate_distortion.py")
    return label, result


def merge(sweeps: list[tuple[str, dict]], curves: list[str] | None = None) -> dict:
    """One result whose curves are each sweep's codec curves, labelled "LABEL: curve", and the first sweep's
    reference curves; `curves` keeps only the named curves (codec model names or jpeg / webp)."""
    first_label, first = sweeps[0]
    for label, result in sweeps[1:]:
        for key in ("resolution", "images", "data"):
            if result[key] != first[key]:
                raise ValueError(f"{label}: swept {key} {result[key]!r}, but {first_label} swept {first[key]!r}; "
                                 "only sweeps of the same images compare")
    merged = {**first, "curves": {}, "kinds": {}}
    for label, result in sweeps:
        for name, points in result["curves"].items():
            kind = result["kinds"][name]
            if curves is not None and name not in curves:
                continue
            if kind in REFERENCES:
                if label == first_label:
                    merged["curves"][name], merged["kinds"][name] = points, kind
                continue
            merged["curves"][f"{label}: {name}"], merged["kinds"][f"{label}: {name}"] = points, kind
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", metavar="LABEL=RD_JSON", help="a label and an rd.json of "
                   "scripts/rate_distortion.py; the first also gives the JPEG and WebP curves")
    p.add_argument("--out", required=True, help="the PNG to write (atomically)")
    p.add_argument("--curves", nargs="+", default=None, help="only these curves of each sweep: model names "
                   "(factorized, context, or a NAME given to --model) and jpeg / webp (default: all)")
    p.add_argument("--max-bpp", type=float, default=0.5, help="right end of the x axis (default 0.5)")
    args = p.parse_args(argv)
    try:
        result = merge([load_sweep(spec) for spec in args.sweeps], args.curves)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {plot_rate_distortion(result, args.out, args.max_bpp)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
