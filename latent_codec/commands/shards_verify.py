"""latent-codec shards verify: check shards against their manifest."""

from __future__ import annotations

import argparse
import sys

from latent_codec import cli

HELP = "check shards against their manifest (exit 1 on any problem)"
DESCRIPTION = r"""Check latent shards against their manifest: every shard's checksum and record count, and with
--codec that the shards were made by that codec. Exits 1 when anything disagrees, listing each problem.

    latent-codec shards verify --shards shards/ --codec runs/codec/final"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, metavar="DIR", help="latent shards folder (`shards encode --out`)")
    p.add_argument("--codec", metavar="DIR", help="also require that the shards were made by this codec folder")


def run(args: argparse.Namespace) -> int:
    from codec.shards.verify import verify_shards

    problems = verify_shards(args.shards, args.codec)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"{args.shards}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.shards}: all shards match the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
