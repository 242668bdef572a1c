"""latent-codec decompress: entropy-coded latent files -> PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latent_codec import cli
from latent_codec.commands.compress import SUFFIX, add_codec_and_model, codec_and_model, output_paths

HELP = f"decompress {SUFFIX} files into PNGs"
DESCRIPTION = rf"""Decompress entropy-coded latent files into PNGs.

    latent-codec decompress compressed/photo{SUFFIX} --codec runs/codec/final \
        --entropy-model entropy/entropy-model.safetensors --out decoded/

Needs the codec and the probability model the file was compressed with: a file made with others, a truncated,
corrupted or foreign file is refused with one line naming it, before anything is written. Every output appears
complete or not at all."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=f"compressed files ({SUFFIX}) to decode")
    add_codec_and_model(p, "; the one the files were compressed with")
    cli.add_out(p, "one <stem>.png per input")


def run(args: argparse.Namespace) -> int:
    from codec.common.atomic import write_atomically
    from codec.entropy.coder import decompress_image, read_compressed
    from codec.network.model import downsample_factor

    vae, identity, model = codec_and_model(args)
    out = Path(args.out)
    targets = output_paths(args.inputs, out, ".png")
    for name in args.inputs:
        if not Path(name).is_file():
            raise FileNotFoundError(f"{name}: no such file")
    # Every file's header, checksum and identities are checked before anything is decoded or written.
    files = [read_compressed(Path(name).read_bytes(), name, model, identity, downsample_factor(vae))
             for name in args.inputs]
    out.mkdir(parents=True, exist_ok=True)
    for name, target, (header, words) in zip(args.inputs, targets, files):
        image = decompress_image(vae, model, header, words, name)
        write_atomically(target, lambda tmp, image=image: image.save(tmp, format="PNG"))
        print(f"{target}: {header.width}x{header.height}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
