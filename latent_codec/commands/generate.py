"""latent-codec generate: text-to-image, image-to-image, reconstruction and codec prior samples."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from codec.exchange.pipeline import SAMPLERS as PIPELINE_SAMPLERS
from latent_codec import cli

# The pipeline's samplers but DDPM, a training sampler that needs all 1000 steps.
SAMPLERS = tuple(s for s in PIPELINE_SAMPLERS if s != "ddpm")

HELP = "generate images: text-to-image, image-to-image, reconstruction, codec prior samples"
DESCRIPTION = r"""Generate images with a trained pipeline: text-to-image, image-to-image, reconstruction, codec prior
samples.

    latent-codec generate --pipeline runs/unet/pipeline --prompt "a tabby cat" --sample-steps 25 --guidance 5 --seed 0
    latent-codec generate --pipeline runs/unet/pipeline --prompt "a cat at night" --init-image cat.png --strength 0.6
    latent-codec generate --pipeline runs/unet/pipeline --reconstruct photo.png      # encode -> decode
    latent-codec generate --pipeline runs/unet/pipeline --prompt "a tabby cat" --precision fp16   # on a GPU
    latent-codec generate --codec runs/codec/final --prior-samples 8              # decode z ~ N(0, I)
    latent-codec generate --codec runs/codec/final --interpolate a.png b.png --frames 7
    latent-codec generate --codec runs/cvae/final --prior-samples 8 \
        --prompt "a red star at the top on a navy background"
    latent-codec generate --codec runs/cvae-class/final --prior-samples 8 --label star    # a class CVAE

--pipeline is a pipeline folder (`latent-codec unet train` writes <out>/pipeline); for --reconstruct,
--prior-samples and --interpolate a codec folder works too (--codec). A conditional codec
(model.condition: text or class) takes its condition from --prompt or --label in those three modes:
x ~ p(x | z, c). Writes PNGs and a JSON of the settings used (with the image and
latent shapes and their element ratio, 48x for 512x512) into --out, and prints where.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", metavar="DIR", help="pipeline folder (`unet train`'s <out>/pipeline): "
                        "every mode; its codec serves --reconstruct, --prior-samples and --interpolate")
    source.add_argument("--codec", metavar="DIR", help="a codec folder (`codec train`'s <out>/final), unconditional "
                        "or conditional, for --reconstruct, --prior-samples and --interpolate")
    p.add_argument("--prompt", help="text to generate from (text-to-image, or image-to-image with --init-image); with "
                   "--prior-samples/--reconstruct/--interpolate, the condition of a text-conditioned codec")
    p.add_argument("--label", help="with --prior-samples/--reconstruct/--interpolate: the class (name or index) of a "
                   "class-conditioned codec")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--reconstruct", metavar="PATH", help="encode this image with the codec and decode it again "
                      "(what the codec keeps of it); writes the reconstruction and its PSNR")
    mode.add_argument("--prior-samples", type=int, metavar="K", help="decode K latents z ~ N(0, I) with the codec "
                      "alone (no U-Net): what the codec's KL prior generates, the baseline diffusion improves on")
    mode.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="decode --frames latents on the straight "
                      "line between two images' posterior means (A first, B last): how smooth the latent space is")
    p.add_argument("--negative-prompt", default="", help="text to steer away from (the unconditional branch of "
                   "classifier-free guidance; default: the empty caption the model was trained to drop to)")
    p.add_argument("--sample-steps", type=int, default=25, help="denoising steps of the sampler (default 25)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale: 1 is the plain "
                   "conditional model, larger follows the prompt more closely (default 5)")
    p.add_argument("--seed", type=int, help="seed of the initial noise; the same seed gives the same images "
                   "(default: a random seed, recorded in the JSON)")
    p.add_argument("--frames", type=int, default=5, help="with --interpolate: images from A to B, both ends "
                   "included (default 5)")
    p.add_argument("--num-images", type=int, default=1, help="images to generate for the prompt (default 1)")
    p.add_argument("--scheduler", choices=SAMPLERS, default="ddim", help="sampler: ddim (DDIM, deterministic), "
                   "dpm (DPM-Solver++ 2nd order multistep: good images in 15-25 steps) or euler (default ddim)")
    p.add_argument("--init-image", metavar="PATH", help="image-to-image: start from this image's latent, noised "
                   "according to --strength, instead of pure noise")
    p.add_argument("--strength", type=float, default=0.8, help="with --init-image: how far into the noise schedule "
                   "the image is pushed before denoising, 0 (unchanged) .. 1 (ignored entirely) (default 0.8)")
    p.add_argument("--resolution", type=cli.resolution, metavar="N|WxH", help="output size in pixels, N for N x N "
                   "or WIDTHxHEIGHT (default: the size the U-Net or codec was trained at); with --init-image, "
                   "--reconstruct or --interpolate, the images are resized and centre-cropped to it")
    p.add_argument("--precision", choices=cli.PRECISIONS, default="fp32", help="dtype the models run in, in "
                   "every mode: fp32 (default), bf16 or fp16 (half the memory, faster on GPUs). If the codec "
                   "overflows the reduced precision (SD-style VAEs give inf/NaN in fp16), that decode or encode is "
                   "redone in fp32 with a warning: never a NaN image")
    p.add_argument("--device", help="where the models run: cuda, cuda:1, cpu, ... (default: cuda when available, "
                   "else cpu); the initial noise is drawn on the CPU, so a seed gives the same image anywhere")
    cli.add_out(p, "the PNGs and the settings JSON", required=False, default="outputs")


def is_codec_mode(args: argparse.Namespace) -> bool:
    """--reconstruct, --prior-samples or --interpolate: the codec alone (a --prompt is then a CVAE's condition)."""
    return bool(args.reconstruct or args.prior_samples is not None or args.interpolate)


def load_image(path: str, height: int | None, width: int | None, factor: int):
    """RGB image at the requested size, or at its own size cropped (centred) to a multiple of the codec's
    downsampling factor. Returns (image, note about what was done to it or None)."""
    from PIL import Image, ImageOps

    from codec.data import UnreadableImage, decode_image

    try:
        image = decode_image(path)
    except UnreadableImage as exc:
        raise cli.CommandError(f"cannot read {path}: {exc.reason}") from None
    if height is not None:
        return (ImageOps.fit(image, (width, height), Image.Resampling.BICUBIC),
                f"resized and cropped to {width}x{height}")
    w, h = image.size
    cw, ch = w - w % factor, h - h % factor
    if cw < factor or ch < factor:
        raise cli.CommandError(f"{path} is {w}x{h}, smaller than the codec's {factor}x{factor} latent cell")
    if (cw, ch) == (w, h):
        return image, None
    left, top = (w - cw) // 2, (h - ch) // 2
    return (image.crop((left, top, left + cw, top + ch)),
            f"centre-cropped from {w}x{h} to {cw}x{ch} (a multiple of {factor})")


def load_model(path: str, precision: str = "fp32"):
    """(pipeline, None) for a pipeline folder, (None, vae) for a codec folder, weights in `precision`.
    Safetensors weights only."""
    from codec.exchange.pipeline import PRECISIONS, LatentDiffusionPipeline

    folder = Path(path)
    dtype = PRECISIONS[precision]
    if (folder / "model_index.json").is_file():
        pipe = LatentDiffusionPipeline.from_pretrained(folder, use_safetensors=True, dtype=dtype)
        pipe.set_progress_bar_config(desc="denoise")
        return pipe, None
    if (folder / "config.json").is_file():
        from codec.network.model import load_codec

        return None, load_codec(folder, dtype, allow_conditional=True)
    raise cli.CommandError(f"{path} is neither a pipeline folder (model_index.json) nor a codec folder "
                           f"(config.json); train one with `latent-codec unet train` or `latent-codec codec train`")


def run(args: argparse.Namespace) -> int:
    args.width, args.height = args.resolution or (None, None)
    codec_mode = is_codec_mode(args)
    if not codec_mode and not args.prompt:
        raise cli.CommandError("give --prompt (text-to-image), --reconstruct, --prior-samples or --interpolate")
    if args.label is not None and not codec_mode:
        raise cli.CommandError("--label conditions a class codec's --prior-samples, --reconstruct or --interpolate")
    if args.codec and not codec_mode:
        raise cli.CommandError("--codec takes --reconstruct, --prior-samples or --interpolate; text-to-image needs "
                               "--pipeline DIR")
    if args.init_image and codec_mode:
        raise cli.CommandError("--init-image is image-to-image with a pipeline; it does not combine with codec modes")
    if args.init_image and not args.prompt:
        raise cli.CommandError("--init-image needs --prompt (image-to-image is guided by a prompt)")
    if args.frames < 2:
        raise cli.CommandError(f"--frames must be >= 2 (A and B), got {args.frames}")
    for name in ("sample_steps", "num_images", "prior_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise cli.CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0.0 <= args.strength <= 1.0:
        raise cli.CommandError(f"--strength must be in [0, 1], got {args.strength}")
    import torch

    from codec.data import pil_to_tensor, tensor_to_pil
    from codec.exchange.pipeline import decode_images, encode_mean, seeded_generator
    from codec.measurement.metrics import psnr
    from codec.network.conditional import condition_tensor, is_conditional
    from codec.network.model import compression_ratio, downsample_factor, latent_blend, latent_shape, prior_latents

    pipe, vae = load_model(args.pipeline or args.codec, args.precision)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if pipe is not None:
        pipe.to(device)
    else:
        vae.to(device)
    codec_mode = is_codec_mode(args)
    if pipe is None and not codec_mode:
        raise cli.CommandError(f"--pipeline {args.pipeline} is a codec folder; --prompt needs a pipeline folder "
                               f"(`latent-codec unet train` exports one to <out>/pipeline)")
    vae = pipe.vae if pipe is not None else vae
    condition = None  # a conditional codec's c, repeated per image
    if is_conditional(vae):
        try:
            condition = condition_tensor(vae, prompt=args.prompt, label=args.label).to(vae.device)
        except ValueError as exc:
            raise cli.CommandError(f"{args.codec or args.pipeline}: {exc}") from None
    elif codec_mode and (args.prompt or args.label is not None):
        raise cli.CommandError(f"{args.codec or args.pipeline} is an unconditional codec; --prompt/--label "
                               f"condition only a conditional one (model.condition: text or class)")

    def repeat(n: int):
        return None if condition is None else condition.expand(n, *condition.shape[1:])

    factor = downsample_factor(vae)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": str(Path(args.pipeline or args.codec).resolve()), "precision": args.precision,
                "device": device}
    if condition is not None:
        settings.update(condition=vae.config.condition, prompt=args.prompt, label=args.label)
    note = None

    if not codec_mode:
        pipe.use_sampler(args.scheduler)
        image = None
        if args.init_image:
            image, note = load_image(args.init_image, args.height, args.width, factor)
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.sample_steps,
                      guidance_scale=args.guidance, num_images_per_prompt=args.num_images, seed=args.seed,
                      height=args.height, width=args.width, image=image, strength=args.strength)
        images, info = result.images, result.info
        settings.update(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.sample_steps,
                        guidance=args.guidance, seed=info["seed"], num_images=args.num_images,
                        scheduler=args.scheduler, init_image=args.init_image,
                        strength=args.strength if args.init_image else None)
        stem = f"{'img2img' if args.init_image else 'txt2img'}-seed{info['seed']}"
    elif args.reconstruct:
        image, note = load_image(args.reconstruct, args.height, args.width, factor)
        pixels = pil_to_tensor(image)[None].to(vae.device)  # float32: the PSNR compares with the exact image
        with torch.no_grad():
            decoded = decode_images(vae, encode_mean(vae, pixels, repeat(1)), repeat(1))
        images = [tensor_to_pil(decoded[0])]
        info = {"mode": "reconstruction", "image_shape": [3, *pixels.shape[2:]],
                "latent_shape": list(latent_shape(vae, *pixels.shape[2:])),
                "compression_ratio": compression_ratio(vae, *pixels.shape[2:]),
                "psnr_db": float(psnr(pixels, decoded))}
        settings.update(reconstruct=args.reconstruct)
        stem = f"reconstruction-{Path(args.reconstruct).stem}"
    elif args.interpolate:
        first, note = load_image(args.interpolate[0], args.height, args.width, factor)
        second, _ = load_image(args.interpolate[1], args.height, args.width, factor)
        if first.size != second.size:
            raise cli.CommandError(f"--interpolate images are {first.size[0]}x{first.size[1]} and "
                                   f"{second.size[0]}x{second.size[1]} after cropping to a multiple of {factor}; "
                                   f"give --resolution to bring both to one size")
        pixels = torch.stack([pil_to_tensor(first), pil_to_tensor(second)]).to(vae.device)
        with torch.no_grad():
            means = encode_mean(vae, pixels, repeat(2))
            decoded = decode_images(vae, latent_blend(means[:1], means[1:], args.frames), repeat(args.frames))
        images = [tensor_to_pil(im) for im in decoded]
        height, width = pixels.shape[2:]
        info = {"mode": "interpolation", "image_shape": [3, height, width],
                "latent_shape": list(latent_shape(vae, height, width)),
                "compression_ratio": compression_ratio(vae, height, width),
                "endpoint_psnr_db": [float(psnr(pixels[:1], decoded[:1])), float(psnr(pixels[1:], decoded[-1:]))]}
        settings.update(interpolate=args.interpolate, frames=args.frames)
        stem = f"interpolation-{Path(args.interpolate[0]).stem}-{Path(args.interpolate[1]).stem}"
    else:
        side = pipe.default_size() if pipe is not None else (vae.config.sample_size, vae.config.sample_size)
        height, width = (args.height, args.width) if args.height else side
        generator, seed = seeded_generator(args.seed)
        with torch.no_grad():
            decoded = decode_images(vae, prior_latents(vae, args.prior_samples, height, width, generator),
                                    repeat(args.prior_samples))
        images = [tensor_to_pil(im) for im in decoded]
        info = {"mode": "prior", "image_shape": [3, height, width],
                "latent_shape": list(latent_shape(vae, height, width)),
                "compression_ratio": compression_ratio(vae, height, width)}
        settings.update(prior_samples=args.prior_samples, seed=seed)
        stem = f"prior-seed{seed}"

    files = []
    for k, im in enumerate(images):
        path = out / f"{stem}-{k}.png"
        im.save(path)
        files.append(path.name)
    record = {"settings": settings, "output": info, "files": files}
    if note:
        record["input_note"] = note
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2, default=str))
    c, h, w = info["latent_shape"]
    print(f"{info['mode']}: wrote {len(files)} image(s) to {out}/{stem}-*.png and {stem}.json; "
          f"image {info['image_shape'][0]}x{info['image_shape'][1]}x{info['image_shape'][2]} <-> latent {c}x{h}x{w} "
          f"({info['compression_ratio']:.0f}x fewer numbers)" + (f"; {note}" if note else ""))
    return 0



if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
