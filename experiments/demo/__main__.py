"""The whole mission on bundled data: what `make demo` runs.

    shapes world -> train codec -> evaluate codec -> encode shards -> train U-Net -> generate + adherence -> report

Budgets (image counts, minutes, steps, prompts) are in --config; raise them there on a GPU. Each stage is skipped
when its output is complete and the trainers resume from checkpoints, so re-running continues an interrupted
demo. Delete the output folder (`make clean`) to start over. The report is <output_dir>/report.md.

    python -m experiments.demo                          # configs/demo.yaml, about 25 minutes on 2 CPU cores
    python -m experiments.demo --set output_dir=runs/demo2 --set shapes.count=400
"""

from __future__ import annotations

import argparse
import sys

from codec.common.config import ConfigError
from experiments.demo.run import load_demo_config, run_demo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="the demo's budgets (default configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set unet.overrides=[train.max_steps=50] (repeatable)")
    args = p.parse_args(argv)
    try:
        cfg = load_demo_config(args.config, args.set)
    except ConfigError as exc:
        p.error(str(exc))
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
