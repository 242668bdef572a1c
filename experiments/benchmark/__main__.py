"""Measure, side by side in one run on this machine, what the codec (and later the diffusion model) costs.

    python -m experiments.benchmark             # everything: about 25-35 minutes on 2 CPU cores (+15 once:
                                                # the at-scale section builds its 10M-record store)
    python -m experiments.benchmark --quick     # fewer repeats, skips the slowest rows: under 15 minutes
    python -m experiments.benchmark --inference-options   # only the inference-path comparison of docs/performance.md
    python -m experiments.benchmark --tiling-quality runs/demo/codec/final   # tiled vs untiled, a trained codec
    python -m experiments.benchmark --architectures       # decode cost of candidate widths for the small preset
    python -m experiments.benchmark --from-json bench.json --out report.md   # re-render a saved run, no measuring
    python -m experiments.benchmark.scale --records 10000000 --out DIR       # only the at-scale section

Writes a Markdown table (docs/benchmark.md by default) and, with --json, the raw numbers. Every timing is the
median of several runs after one untimed warm-up, batch 1, fp32, under torch.inference_mode, with random
weights (cost does not depend on them). A shared machine makes absolute seconds noisy: compare rows of the
same run, as ratios. FLOPs are counted by torch's FlopCounterMode on the meta device (no compute).

The measurements are in experiments/benchmark/ (run.py runs them all), the report's text in
experiments/benchmark/report_template.md. The GPU check is experiments.benchmark.gpu_check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import CHECKOUT
from experiments.benchmark.codec import architecture_candidates
from experiments.benchmark.inference import inference_options, tiling_quality
from experiments.benchmark.memory import memory_case
from experiments.benchmark.report import markdown
from experiments.benchmark.run import measure


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 repeats, no kl-f8 decode, no kl-f8 memory row, no "
                   "torch.compile, no latent-vs-pixel U-Net row, smaller training batches, the at-scale section at "
                   "100k and 1M records instead of 1M and 10M: under 10 minutes on 2 cores, plus about 5 for the "
                   "at-scale section (its synthetic stores are built once, then reused from runs/benchmark-scale)")
    p.add_argument("--json", type=Path, help="also write the raw numbers here")
    p.add_argument("--out", type=Path, default=CHECKOUT / "docs" / "benchmark.md",
                   help="Markdown table (default docs/benchmark.md)")
    p.add_argument("--from-json", type=Path, metavar="PATH",
                   help="measure nothing: write the Markdown table of the raw numbers an earlier --json saved")
    p.add_argument("--inference-options", action="store_true",
                   help="only compare inference-path options for the small preset (docs/performance.md); prints JSON")
    p.add_argument("--architectures", action="store_true",
                   help="only compare the decode cost of candidate widths for the small preset with TAESD "
                        "(docs/performance.md); prints JSON")
    p.add_argument("--tiling-quality", metavar="CODEC_DIR",
                   help="only measure tiled vs untiled reconstruction of a trained codec (docs/performance.md); "
                        "prints JSON")
    p.add_argument("--side", type=int, default=512, help="image side for --tiling-quality (default 512)")
    p.add_argument("--tiles", type=int, nargs="+", default=[128, 256], help="tile sizes in pixels for --tiling-quality")
    # Internal: memory rows run each case in a fresh process of this command (experiments/benchmark/memory.py).
    p.add_argument("--memory-case", nargs=3, metavar=("PRESET", "MODE", "SIDE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_case:
        preset, mode, side = args.memory_case
        print(json.dumps(memory_case(preset, mode, int(side))))
        return 0
    if args.tiling_quality:
        print(json.dumps(tiling_quality(args.tiling_quality, args.side, args.tiles), indent=2))
        return 0
    if args.architectures:
        print(json.dumps(architecture_candidates(rounds=7), indent=2))
        return 0
    if args.inference_options:
        print(json.dumps(inference_options(repeats=7, try_compile=True), indent=2))
        return 0
    results = json.loads(args.from_json.read_text()) if args.from_json else measure(args.quick)
    text = markdown(results)
    _write(args.out, text)
    if args.json:
        _write(args.json, json.dumps(results, indent=2))
    print(text)
    if args.from_json:
        print(f"written to {args.out} from {args.from_json}")
    else:
        print(f"written to {args.out} in {results['total_seconds']:.0f} s")
    return 0


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
