"""latent-codec shards convert: migrate safetensors shards of earlier versions into a latent store."""

from __future__ import annotations

import argparse
import sys

from latent_codec import cli

HELP = "migrate safetensors shards of an earlier version into a latent store (nothing is re-encoded)"
DESCRIPTION = r"""Migrate the safetensors shards an earlier version wrote (format latent-shards/1) into a latent
store, which `unet train --shards` reads locally or from a bucket. Each old shard becomes one unit with the same
records in the same order; codec identities, statistics and normalisation are carried over, so a U-Net trains on
the store exactly as on the old shards. The old folder is only read.

    latent-codec shards convert --shards old-shards/ --out latents/
    latent-codec shards convert --shards old-shards/ --out s3://bucket/latents"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, metavar="DIR", help="the old shards folder (shard-NNNNN.safetensors "
                   "files and their manifest.json)")
    cli.add_out(p, "the new latent store: a folder or a bucket URL (s3://...)")


def run(args: argparse.Namespace) -> int:
    from codec.shards.convert import convert_shards

    manifest = convert_shards(args.shards, args.out)
    print(f"{args.out}: {manifest['count']} records in {len(manifest['units'])} units")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
