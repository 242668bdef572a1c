#!/usr/bin/env python
"""The β trade-off on the shapes world: train one codec per run of --config for the same budget, measure each.

    python scripts/beta_study.py --config configs/beta_study.yaml
    python scripts/beta_study.py --config configs/beta_study.yaml --set overrides='["train.max_minutes=10"]'

Writes <output_dir>/results.json, report.md (the table), rate_distortion.png (rate in bits per image against held-out
PSNR, each point named) and prior_<run>.png (decoded z ~ N(0, I)). A run whose codec is already exported is measured
again without retraining; an interrupted one resumes from its latest checkpoint. Needs the shapes world
(scripts/make_shapes.py --out data/shapes, or `make demo`).
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # experiments/ runs from the checkout

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "beta_study.yaml"),
                   help="the study: codec preset, shapes folder, runs and their overrides "
                        "(default configs/beta_study.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the study config (YAML value), e.g. output_dir=runs/beta2; repeatable")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from codec.common.config import exit_status
    from experiments.demo.beta_study import load_study_config, run_study

    def run() -> int:
        cfg = load_study_config(args.config, args.set)
        if not (ROOT / cfg.shapes / "shapes.json").is_file() and not Path(cfg.shapes).is_dir():
            print(f"error: shapes {cfg.shapes}: no shapes world there; make it with scripts/make_shapes.py --out "
                  f"{cfg.shapes}", file=sys.stderr)
            return 2
        summary = run_study(cfg, ROOT)
        print(f"wrote {ROOT / cfg.output_dir}/report.md ({len(summary['runs'])} runs)")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
