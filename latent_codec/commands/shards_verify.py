"""latent-codec shards verify: check shards against their manifest."""

from __future__ import annotations

import argparse
import sys

from latent_codec import cli

HELP = "check a latent store against its manifest (exit 1 on any problem)"
DESCRIPTION = r"""Check a latent store (a folder or a bucket URL) against its manifest: every chunk's checksum and
record count, every unit's commit record, litdata's index, and with --codec that the latents were made by that
codec. Exits 1 when anything disagrees, listing each problem.

    latent-codec shards verify --shards latents/ --codec runs/codec/final
    latent-codec shards verify --shards s3://bucket/latents"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, metavar="DIR", help="latent store: a folder or a bucket URL "
                   "(`shards encode --out`)")
    p.add_argument("--codec", metavar="DIR", help="also require that the shards were made by this codec folder")


def run(args: argparse.Namespace) -> int:
    from codec.shards.verify import verify_shards

    problems = verify_shards(args.shards, args.codec)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    if problems:
        print(f"{args.shards}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.shards}: every chunk matches the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
