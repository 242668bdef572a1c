"""latent-codec codec export: a diffusers folder and one original-LDM-format VAE file, for the tools people use."""

from __future__ import annotations

import argparse
import sys

from latent_codec import cli

HELP = "export a codec as a diffusers folder and a single-file VAE (ComfyUI, AUTOMATIC1111)"
DESCRIPTION = r"""Export a trained codec for the tools people use: a diffusers folder and one original-LDM-format VAE
file.

    latent-codec codec export --codec runs/codec/final --out exports/my-vae
    latent-codec codec export --codec runs/unet/pipeline --out exports/my-vae --precision fp32

Writes <out>/diffusers/ (AutoencoderKL.from_pretrained, or a pipeline's vae=) and <out>/<name>.safetensors with the
key names ComfyUI's "Load VAE" and AUTOMATIC1111's SD VAE setting read; diffusers loads it with
AutoencoderKL.from_single_file(file, config=<out>/diffusers). ComfyUI and AUTOMATIC1111 build SD's fixed network
(widths 128-256-512-512, 2 res blocks per level; ComfyUI any latent channel count, AUTOMATIC1111 only 4): the kl-f8
and f8c16 presets and fine-tunes of SD-family VAEs fit it, the small, tiny and compress-f4 presets do not. The
command prints which tools load what it wrote, and warns, naming them, when some cannot.
The file is read back by from_single_file and compared with the folder before the export is reported.
Those tools take the latent scaling factor from the model they pair the VAE with (SD 1.x: 0.18215): a codec with
another factor (printed here) needs a U-Net trained on its latents, such as `latent-codec unet train`'s."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codec", required=True, metavar="DIR", help="codec folder: a diffusers AutoencoderKL (a "
                   "training run's final/), or a pipeline folder whose vae/ is exported")
    cli.add_out(p, "diffusers/ and the single file")
    p.add_argument("--name", default="vae", help="file name of the single file, without .safetensors (default vae)")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="weights of the single file "
                   "(default fp16, what shared VAE files hold; the diffusers folder stays float32)")


def run(args: argparse.Namespace) -> int:
    import torch

    from codec.exchange.ldm_format import export_for_tools

    result = export_for_tools(args.codec, args.out, args.name, torch.float16 if args.precision == "fp16" else None)
    print(f"diffusers folder: {result['diffusers']}")
    print(f"single file ({args.precision}, LDM key names): {result['single_file']} (read back by from_single_file: "
          f"largest output difference {result['round_trip_max_difference']:.2g})")
    print(f"latent channels {result['latent_channels']}, scaling factor {result['scaling_factor']:.5g}")
    print(f"loads in: {', '.join(result['loaders'])}")
    if result["not_loaded_because"]:
        print(f"warning: {result['not_loaded_because']}; load it in diffusers with AutoencoderKL.from_single_file("
              f"file, config={result['diffusers']}) or use the folder", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
