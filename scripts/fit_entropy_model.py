#!/usr/bin/env python
r"""Fit a probability model of quantised latents on latent shards, for scripts/compress.py.

    python scripts/fit_entropy_model.py --shards shards/ --out runs/entropy/context.safetensors
    python scripts/fit_entropy_model.py --shards shards/ --out runs/entropy/factorized.safetensors --kind factorized

The shards' posterior means, normalised as the U-Net sees them (the manifest's normalisation), are quantised
at steps Δ drawn log-uniformly from [--step-min, --step-max] and the model learns to give them as few bits as
possible (-log2 of each symbol's probability). `factorized`: one mixture of logistics per latent channel.
`context`: channel groups and checkerboard halves coded in passes, each pass's Gaussians predicted by a small
network from what is already decoded (fewer bits on latents with spatial or cross-channel structure). The file
(safetensors) records the codec that made the shards; compress.py refuses it for latents of another codec.

--channel-basis klt --spatial dct --levels L code the latent through an orthonormal transform
(codec/entropy/transform.py): the channels rotated to their decorrelated basis, then the DCT of 2^L x 2^L blocks
of positions (or L Haar splits). Same squared error at a step Δ, far fewer bits on a correlated latent
(docs/rate-distortion.md):

    python scripts/fit_entropy_model.py --shards shards/ --kind factorized --out klt-dct4.safetensors \
        --channel-basis klt --spatial dct --levels 2
"""

from __future__ import annotations

import argparse
import sys

from codec.entropy.fit import FitSettings, fit_entropy_model


def parse_args(argv=None) -> argparse.Namespace:
    d = FitSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a latent shards folder (scripts/encode_dataset.py --out)")
    p.add_argument("--out", required=True, help="the model file to write (.safetensors; written atomically)")
    p.add_argument("--kind", choices=("factorized", "context"), default=d.kind,
                   help=f"factorized (per channel) or context (channel + checkerboard passes) (default {d.kind})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"records per step (default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate, cosine-decayed to a tenth "
                   f"(default {d.lr})")
    p.add_argument("--step-min", type=float, default=d.step_min, help="finest quantisation step Δ the model is fit "
                   f"for, in normalised latent units (unit variance over the shards) (default {d.step_min})")
    p.add_argument("--step-max", type=float, default=d.step_max, help=f"coarsest step Δ (default {d.step_max}); "
                   "compress.py --bpp searches steps within [--step-min, --step-max]")
    p.add_argument("--components", type=int, default=d.components, help="factorized: logistics per channel "
                   f"(default {d.components})")
    p.add_argument("--groups", type=int, default=d.groups, help="context: channel groups, coded one after another "
                   f"(default {d.groups}, at most the latent channels)")
    p.add_argument("--hidden", type=int, default=d.hidden, help=f"context: channels of each pass's network "
                   f"(default {d.hidden})")
    p.add_argument("--channel-basis", choices=("identity", "klt"), default=d.channel_basis,
                   help="code the latent's channels as they are, or rotated to their Karhunen-Loève basis measured "
                        f"on the shards (decorrelated, largest variance first) (default {d.channel_basis})")
    p.add_argument("--spatial", choices=("haar", "dct"), default=d.spatial,
                   help="the spatial transform of 2^levels x 2^levels blocks of latent positions: the DCT "
                        f"(JPEG's) or Haar splits (default {d.spatial})")
    p.add_argument("--levels", type=int, default=d.levels,
                   help="0-4: blocks of 2^levels x 2^levels positions; 0 codes the positions as they are. "
                        "Fewer bits for a smooth, correlated latent such as configs/codec/compress-f4.yaml's; "
                        f"images are then padded to the codec's factor x 2^levels (default {d.levels})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the initial weights and the batches "
                   f"(default {d.seed})")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"print the mean bits every N steps "
                   f"(default {d.log_every})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = FitSettings(kind=args.kind, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           step_min=args.step_min, step_max=args.step_max, components=args.components,
                           groups=args.groups, hidden=args.hidden, channel_basis=args.channel_basis,
                           spatial=args.spatial, levels=args.levels, seed=args.seed, log_every=args.log_every)
    try:
        identity = fit_entropy_model(args.shards, args.out, settings)
    except (FileNotFoundError, ValueError) as exc:  # ConfigError is a ValueError: bad settings, unreadable shards
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {settings.kind} model {identity}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
