"""latent-codec analyze plot-rd: several rate-distortion sweeps of the same images in one plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latent_codec import cli

PLOT_FILE = "rd.png"

HELP = "overlay several rate-distortion sweeps (rd.json) of the same images in one plot"
DESCRIPTION = rf"""Several rate-distortion sweeps in one plot: the codec curves of each rd.json
(`analyze rate-distortion`) under its label, and JPEG's and WebP's curves once, from the first. The sweeps must be
of the same images at the same size, or their curves would not be comparable; anything else is refused. Writes
<out>/{PLOT_FILE}.

    latent-codec analyze plot-rd plain=runs/rd-plain/rd.json noise=runs/rd-noise/rd.json --out runs/rd-compare
    latent-codec analyze plot-rd ... --curves context jpeg   # only these curves of each sweep"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweeps", nargs="+", metavar="LABEL=RD_JSON", help="a label and an rd.json of `analyze "
                   "rate-distortion`; the first also gives the JPEG and WebP curves")
    cli.add_out(p, f"{PLOT_FILE} (written atomically)")
    p.add_argument("--curves", nargs="+", default=None, help="only these curves of each sweep: model names "
                   "(factorized, context, or a NAME given to --entropy-model) and jpeg / webp (default: all)")
    p.add_argument("--max-bpp", type=float, default=0.5, help="right end of the x axis (default 0.5)")


def run(args: argparse.Namespace) -> int:
    from codec.entropy.rate_distortion import load_sweep, merge_sweeps, plot_rate_distortion

    result = merge_sweeps([load_sweep(spec) for spec in args.sweeps], args.curves)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"wrote {plot_rate_distortion(result, out / PLOT_FILE, args.max_bpp)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
