#!/usr/bin/env python
"""Check the toolkit on a CUDA GPU in a few minutes: every stage at the real network sizes, in bf16.

    python scripts/gpu_check.py                       # writes runs/gpu-check/gpu_check.md (+ .json, generated.png)

Stages: a shapes-world dataset (512 images of 256x256) -> the kl-f8 codec trained in bf16 with LPIPS off and the
patch-GAN on from step 150 of 300 -> shards encoded in bf16 -> the sd-shaped U-Net trained in bf16 for 200 steps
-> text-to-image with bf16 weights. It prints each stage's throughput and peak GPU memory, and exits 1 if any loss,
metric, latent or image is not finite. Without a CUDA device it exits 2 at once. About 5 minutes on one H200.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # experiments/ runs from the checkout

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="working folder, wiped at the start when it holds an "
                   "earlier check (default runs/gpu-check); any other non-empty folder is refused")
    p.add_argument("--tiny", action="store_true", help="tiny presets and a few steps, allowed without CUDA: for the "
                   "test suite, which runs the same code on a CPU")
    args = p.parse_args(argv)
    import torch

    from experiments.benchmark.gpu_check import CheckPlan, run_gpu_check

    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    try:
        finite, text = run_gpu_check(Path(args.out), CheckPlan.tiny() if args.tiny else CheckPlan())
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
