"""latent-codec entropy fit: a probability model of quantised latents, fit on a codec's latent shards."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from codec.entropy.fit import FitSettings
from latent_codec import cli

MODEL_FILE = "entropy-model.safetensors"  # what --out receives; `compress --entropy-model` takes the file

HELP = "fit the probability model that entropy-codes a codec's latents (for compress)"
DESCRIPTION = rf"""Fit a probability model of quantised latents on latent shards, for `latent-codec compress`.

    latent-codec entropy fit --shards shards/ --out runs/entropy/context
    latent-codec entropy fit --shards shards/ --out runs/entropy/factorized --kind factorized

Writes <out>/{MODEL_FILE}. The shards' posterior means, normalised as the U-Net sees them (the manifest's
normalisation), are quantised at steps Δ drawn log-uniformly from [delta_min, delta_max] and the model learns to
give them as few bits as possible (-log2 of each symbol's probability). `factorized`: one mixture of logistics per
latent channel. `context`: channel groups and checkerboard halves coded in passes, each pass's Gaussians predicted
by a small network from what is already decoded (fewer bits on latents with spatial or cross-channel structure).
The file (safetensors) records the codec that made the shards; compress refuses it for latents of another codec.

--channel-basis klt --spatial dct --levels L code the latent through an orthonormal transform
(codec/entropy/transform.py): the channels rotated to their decorrelated basis, then the DCT of 2^L x 2^L blocks
of positions (or L Haar splits). Same squared error at a step Δ, far fewer bits on a correlated latent
(docs/rate-distortion.md):

    latent-codec entropy fit --shards shards/ --kind factorized --out runs/entropy/klt-dct4 \
        --channel-basis klt --spatial dct --levels 2

Settings come from the defaults, then --config (a YAML file of the keys below), then --set, then the flags."""

D = FitSettings()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, metavar="DIR", help="latent shards folder (`shards encode --out`)")
    cli.add_out(p, f"{MODEL_FILE} (written atomically)")
    cli.add_config_flags(p, "entropy", required=False, example="kind=factorized")
    # Flags default to None: a flag not given leaves the config's value alone.
    p.add_argument("--kind", choices=("factorized", "context"),
                   help=f"factorized (per channel) or context (channel + checkerboard passes) (default {D.kind})")
    p.add_argument("--max-steps", type=int, help=f"optimizer steps (default {D.max_steps})")
    p.add_argument("--batch-size", type=int, help=f"records per step (default {D.batch_size})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate, cosine-decayed to a tenth (default {D.lr})")
    p.add_argument("--delta-min", type=float, metavar="Δ", help="finest quantisation step Δ the model is fit for, in "
                   f"normalised latent units (unit variance over the shards) (default {D.delta_min})")
    p.add_argument("--delta-max", type=float, metavar="Δ", help=f"coarsest step Δ (default {D.delta_max}); "
                   "compress --bpp searches steps within [--delta-min, --delta-max]")
    p.add_argument("--components", type=int, help=f"factorized: logistics per channel (default {D.components})")
    p.add_argument("--groups", type=int, help="context: channel groups, coded one after another "
                   f"(default {D.groups}, at most the latent channels)")
    p.add_argument("--hidden", type=int, help=f"context: channels of each pass's network (default {D.hidden})")
    p.add_argument("--channel-basis", choices=("identity", "klt"),
                   help="code the latent's channels as they are, or rotated to their Karhunen-Loève basis measured "
                        f"on the shards (decorrelated, largest variance first) (default {D.channel_basis})")
    p.add_argument("--spatial", choices=("haar", "dct"),
                   help="the spatial transform of 2^levels x 2^levels blocks of latent positions: the DCT "
                        f"(JPEG's) or Haar splits (default {D.spatial})")
    p.add_argument("--levels", type=int,
                   help="0-4: blocks of 2^levels x 2^levels positions; 0 codes the positions as they are. "
                        "Fewer bits for a smooth, correlated latent such as the compress-f4 preset's; "
                        f"images are then padded to the codec's factor x 2^levels (default {D.levels})")
    p.add_argument("--seed", type=int, help=f"seed of the initial weights and the batches (default {D.seed})")
    p.add_argument("--log-every", type=int, help=f"print the mean bits every N steps (default {D.log_every})")


def run(args: argparse.Namespace) -> int:
    from codec.common.config import load_config
    from codec.entropy.fit import fit_entropy_model

    settings = cli.settings_with_flags(partial(load_config, FitSettings), args, "entropy")
    path = Path(args.out) / MODEL_FILE
    identity = fit_entropy_model(args.shards, path, settings)
    print(f"{path}: {settings.kind} model {identity}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main_for(sys.modules[__name__]))
