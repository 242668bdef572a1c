r"""A/B codecs for diffusion: train the same U-Net on each codec's latents and see which learns fastest.

    python -m experiments.compare --codec plain=runs/plain/final --codec eq=runs/eq/final \
        --data data/shapes --resolution 64 --steps 1200 --out runs/ab
    python -m experiments.compare --codec A --codec B --data my_images/ --resolution 256 --steps 20000 \
        --unet-config configs/unet/sd.yaml --launch "accelerate launch --multi_gpu --num_processes 8" --out runs/ab

The last --heldout images of --data are held out; the rest are encoded by each codec into latent shards, and the
same U-Net config is trained on each with the same seed, data order, noise and timesteps for --steps steps. Every
--eval-every steps the held-out denoising loss is measured at the fixed timesteps (--timesteps) with fixed noise.
Each codec's latents are analysed too (`latent-codec analyze latents`' numbers) and, when the captions are
shapes-world captions (experiments/demo/shapes.py), the final U-Nets' samples are scored for prompt adherence.

Writes to --out: report.md (the table: PSNR, high-frequency share, equivariance, final losses, the steps each
U-Net needs to reach the worst codec's final loss), loss.png, spectrum.png, results.json, and each codec's shards,
U-Net run and samples under codecs/<name>/. Re-running the same command continues an interrupted A/B.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codec.common.config import exit_status
from codec.measurement.latent_analysis import named_codec
from experiments.compare.report import results_table
from experiments.compare.run import CompareSettings, compare_codecs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", action="append", required=True, type=named_codec,
                   help="a diffusers AutoencoderKL folder, optionally NAME=FOLDER; give two or more")
    p.add_argument("--data", required=True, help="the images (with captions): an image folder with metadata.jsonl, "
                   "a save_to_disk directory, or .parquet/.arrow files")
    p.add_argument("--steps", type=int, required=True, help="U-Net optimizer steps for every codec")
    p.add_argument("--out", type=Path, required=True, help="the A/B's folder; re-running into it continues")
    p.add_argument("--unet-config", default="configs/unet/small.yaml", help="the U-Net preset every codec's "
                   "U-Net is trained with (default configs/unet/small.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a U-Net config value "
                   "for every run, e.g. --set optim.lr=5e-4 (repeatable)")
    p.add_argument("--resolution", type=int, default=64, help="image side the shards are encoded at (default 64)")
    p.add_argument("--heldout", type=int, default=64, help="images held out for the eval loss (default 64)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations (default 100)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[100, 500, 900],
                   help="timesteps of the held-out loss (default 100 500 900)")
    p.add_argument("--seed", type=int, default=0, help="the U-Nets' seed (initial weights, draws; default 0)")
    p.add_argument("--encode-batch-size", type=int, default=64, help="images per encoder call (default 64)")
    p.add_argument("--analysis-images", type=int, default=64,
                   help="held-out images the latent analysis reads (default 64)")
    p.add_argument("--adherence-prompts", type=int, default=8, help="distinct held-out captions sampled at the end "
                   "and scored, shapes-world captions only (default 8; 0: none)")
    p.add_argument("--images-per-prompt", type=int, default=2, help="samples per prompt (default 2)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance of those samples (default 2)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps (DPM-Solver++; default 20)")
    p.add_argument("--launch", default="", help="prefix of the encoder and trainer commands, e.g. \"accelerate "
                   "launch --multi_gpu --num_processes 8\" (default: this Python, one process)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    codecs = dict(args.codec)
    if len(codecs) != len(args.codec) or len(codecs) < 2:
        print("error: --codec: give at least two codecs, each with its own name (NAME=FOLDER)", file=sys.stderr)
        return 2
    for name, folder in codecs.items():
        if not (Path(folder) / "config.json").is_file():
            print(f"error: --codec {name}={folder}: not a diffusers AutoencoderKL folder (no config.json)",
                  file=sys.stderr)
            return 2
    if args.steps < 1 or args.eval_every < 1 or args.heldout < 1:
        print("error: --steps, --eval-every and --heldout must be >= 1", file=sys.stderr)
        return 2
    settings = CompareSettings(
        codecs={name: str(Path(folder).resolve()) for name, folder in codecs.items()}, data=args.data,
        out=str(args.out), steps=args.steps, unet_config=args.unet_config, unet_overrides=args.set,
        resolution=args.resolution, heldout=args.heldout, eval_every=args.eval_every, eval_timesteps=args.timesteps,
        seed=args.seed, encode_batch_size=args.encode_batch_size, analysis_images=args.analysis_images,
        adherence_prompts=args.adherence_prompts, images_per_prompt=args.images_per_prompt, guidance=args.guidance,
        sample_steps=args.sample_steps, launch=args.launch)

    def run() -> int:
        results = compare_codecs(settings)
        print(results_table(results))
        print(f"report: {args.out / 'report.md'}")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
