#!/usr/bin/env python
r"""Compress images into entropy-coded latent files, or decompress such files into PNGs.

    python scripts/compress.py photo.jpg scan.png --codec runs/codec/final --model context.safetensors \
        --out compressed/ --bpp 0.1
    python scripts/compress.py photo.jpg --codec runs/codec/final --model context.safetensors --out compressed/ \
        --step 0.5
    python scripts/compress.py --decompress compressed/photo.lcc --codec runs/codec/final \
        --model context.safetensors --out decoded/

Each image (any size: padded to the codec's factor and cropped back; encoded in tiles when large) becomes
<out>/<stem>.lcc: a 52-byte header (codec identity, probability model identity, image and latent size, step Δ,
symbol range, symbol hash), the range-coded symbols y = round(normalise(z) / Δ) of its posterior mean, and
a CRC32. Decompressing needs the same codec and the same model file (scripts/fit_entropy_model.py): a file made
with others, a truncated, corrupted or foreign file is refused with one line naming it. Every output appears
complete or not at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

from codec.common.atomic import write_atomically, write_bytes_atomically
from codec.data import UnreadableImage, decode_image
from codec.entropy.bitstream import BitstreamError
from codec.entropy.coder import compress_image, decompress_image, read_compressed
from codec.entropy.models import check_model_codec, load_model
from codec.network.model import codec_identity, downsample_factor, encoder_identity, load_codec

SUFFIX = ".lcc"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images to compress (any format PIL reads), or with "
                   "--decompress the .lcc files to decode")
    p.add_argument("--decompress", action="store_true", help="decode the inputs (compressed files) into "
                   "<out>/<stem>.png instead of compressing images")
    p.add_argument("--codec", required=True, help="the diffusers AutoencoderKL folder (safetensors weights); to "
                   "decompress, the codec that compressed the file")
    p.add_argument("--model", required=True, help="probability model file from scripts/fit_entropy_model.py, fit on "
                   "shards of this codec; to decompress, the model the file was compressed with")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing); files are named "
                   f"after each input's stem: <stem>{SUFFIX} when compressing, <stem>.png when decompressing")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--step", type=float, help="quantisation step Δ in the model's normalised latent units (the "
                      "latents have unit variance over the shards the model was fit on): larger is fewer bits")
    rate.add_argument("--bpp", type=float, help="rate control: per image, the finest step of the model's Δ range "
                      "(8 steps per octave) whose whole file fits this many bits per image pixel")
    args = p.parse_args(argv)
    if args.decompress and (args.step is not None or args.bpp is not None):
        p.error("--step and --bpp choose the rate when compressing; a compressed file already records its step")
    if not args.decompress and args.step is None and args.bpp is None:
        p.error("compressing needs --step or --bpp")
    return args


def output_paths(inputs: list[str], out: Path, suffix: str) -> list[Path]:
    """<out>/<stem><suffix> for each input; two inputs with one stem would overwrite each other and are refused."""
    targets = [out / (Path(name).stem + suffix) for name in inputs]
    seen: dict[Path, str] = {}
    for name, target in zip(inputs, targets):
        if target in seen:
            raise BitstreamError(f"{name} and {seen[target]} would both be written to {target}; rename one")
        seen[target] = name
    return targets


def open_image(name: str) -> Image.Image:
    """RGB pixels of an input image; the shared decoder's reason (truncated, not an image, decompression bomb, ...)
    becomes the one-line error."""
    if not Path(name).is_file():
        raise BitstreamError(f"{name}: no such file")
    try:
        return decode_image(name)
    except UnreadableImage as exc:
        raise BitstreamError(f"{name}: not a readable image ({exc.reason})") from None


def read_bytes(name: str) -> bytes:
    path = Path(name)
    if not path.is_file():
        raise BitstreamError(f"{name}: no such file")
    return path.read_bytes()


def compress_files(args, vae, model, identity: str) -> None:
    targets = output_paths(args.inputs, args.out, SUFFIX)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, target in zip(args.inputs, targets):
        image = open_image(name)
        result = compress_image(vae, model, image, identity, name, step=args.step, bpp=args.bpp)
        write_bytes_atomically(target, result.data)
        pixels = image.width * image.height
        print(f"{target}: {len(result.data)} bytes, {result.bits / pixels:.4f} bpp, step {result.step:g} "
              f"({model.kind} model; the model's cross-entropy {result.model_bits / pixels:.4f} bpp + header)")


def decompress_files(args, vae, model, identity: str) -> None:
    targets = output_paths(args.inputs, args.out, ".png")
    # Every file's header, checksum and identities are checked before anything is decoded or written.
    files = [read_compressed(read_bytes(name), name, model, identity, downsample_factor(vae)) for name in args.inputs]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, target, (header, words) in zip(args.inputs, targets, files):
        image = decompress_image(vae, model, header, words, name)
        write_atomically(target, lambda tmp, image=image: image.save(tmp, format="PNG"))
        print(f"{target}: {header.width}x{header.height}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        vae = load_codec(args.codec)
        identity = codec_identity(vae)
        model = load_model(args.model)
        check_model_codec(model, identity, encoder_identity(vae))
        (decompress_files if args.decompress else compress_files)(args, vae, model, identity)
    except (FileNotFoundError, ValueError) as exc:  # BitstreamError and EntropyModelError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
