"""latent-codec compress: images -> entropy-coded latent files (and the helpers `decompress` shares)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from latent_codec import cli

SUFFIX = ".lcc"

HELP = "compress images into entropy-coded latent files (.lcc)"
DESCRIPTION = r"""Compress images into entropy-coded latent files.

    latent-codec compress photo.jpg scan.png --codec runs/codec/final \
        --entropy-model entropy/entropy-model.safetensors --out compressed/ --bpp 0.1
    latent-codec compress photo.jpg --codec runs/codec/final --entropy-model ... --out compressed/ --delta 0.5

Each image (any size: padded to the codec's factor and cropped back; encoded in tiles when large) becomes
<out>/<stem>.lcc: a 52-byte header (codec identity, probability model identity, image and latent size, step Δ,
symbol range, symbol hash), the range-coded symbols y = round(normalise(z) / Δ) of its posterior mean, and
a CRC32. `latent-codec decompress` needs the same codec and the same model file (`latent-codec entropy fit`).
Every output appears complete or not at all."""


def add_codec_and_model(p: argparse.ArgumentParser, role: str) -> None:
    p.add_argument("--codec", required=True, metavar="DIR", help=f"codec folder: a diffusers AutoencoderKL "
                   f"(safetensors weights){role}")
    p.add_argument("--entropy-model", required=True, metavar="FILE", help="probability-model file from `latent-codec "
                   f"entropy fit`, fit on shards of this codec{role}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="images to compress (any format PIL reads)")
    add_codec_and_model(p, "")
    cli.add_out(p, f"one <stem>{SUFFIX} per input")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--delta", type=float, metavar="Δ", help="quantisation step Δ in the model's normalised latent "
                      "units (the latents have unit variance over the shards the model was fit on): larger is fewer "
                      "bits")
    rate.add_argument("--bpp", type=float, help="rate control: per image, the finest step of the model's Δ range "
                      "(8 steps per octave) whose whole file fits this many bits per image pixel")


def output_paths(inputs: list[str], out: Path, suffix: str) -> list[Path]:
    """<out>/<stem><suffix> for each input; two inputs with one stem would overwrite each other and are refused."""
    targets = [out / (Path(name).stem + suffix) for name in inputs]
    seen: dict[Path, str] = {}
    for name, target in zip(inputs, targets):
        if target in seen:
            raise cli.CommandError(f"{name} and {seen[target]} would both be written to {target}; rename one")
        seen[target] = name
    return targets


def codec_and_model(args: argparse.Namespace):
    """The codec, its identity and the probability model, checked to belong together before any file is read."""
    from codec.entropy.models import check_model_codec, load_model
    from codec.network.model import codec_identity, encoder_identity, load_codec

    vae = load_codec(args.codec)
    identity = codec_identity(vae)
    model = load_model(args.entropy_model)
    check_model_codec(model, identity, encoder_identity(vae))
    return vae, identity, model


def open_image(name: str):
    """RGB pixels of an input image; the shared decoder's reason (truncated, not an image, decompression bomb, ...)
    becomes the one-line error."""
    from codec.data import UnreadableImage, decode_image

    if not Path(name).is_file():
        raise FileNotFoundError(f"{name}: no such file")
    try:
        return decode_image(name)
    except UnreadableImage as exc:
        raise cli.CommandError(f"{name}: not a readable image ({exc.reason})") from None


def run(args: argparse.Namespace) -> int:
    from codec.common.atomic import write_bytes_atomically
    from codec.entropy.coder import compress_image

    vae, identity, model = codec_and_model(args)
    out = Path(args.out)
    targets = output_paths(args.inputs, out, SUFFIX)
    out.mkdir(parents=True, exist_ok=True)
    for name, target in zip(args.inputs, targets):
        image = open_image(name)
        result = compress_image(vae, model, image, identity, name, step=args.delta, bpp=args.bpp)
        write_bytes_atomically(target, result.data)
        pixels = image.width * image.height
        print(f"{target}: {len(result.data)} bytes, {result.bits / pixels:.4f} bpp, step {result.step:g} "
              f"({model.kind} model; the model's cross-entropy {result.model_bits / pixels:.4f} bpp + header)")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
