"""Experiments above the library, run from a checkout with `python -m` (this package is not installed).

    demo/              `python -m experiments.demo`: the whole mission on bundled data (make demo), the shapes
                       world (experiments.demo.shapes), the β study (experiments.demo.beta_study), adherence
    compare/           `python -m experiments.compare`: A/B codecs for diffusion
    benchmark/         `python -m experiments.benchmark`: what the codec and the U-Net cost (docs/benchmark.md);
                       experiments.benchmark.gpu_check: every stage at real sizes on one CUDA device
    codec_recipe.py    codec training recipes under one time budget (docs/codec-recipe.md)
    fit_warm_start.py  the linear codec behind the thumbnail warm start (codec/linear_codec_f8c4.json)

The library (codec/, diffusion/, latent_codec/) never imports these; they run its installed command
(`python -m latent_codec ...`) in subprocesses, as a user does.
"""

from pathlib import Path

# The checkout these experiments run from: its configs/, data/ and docs/ are their defaults. Only experiments may
# find files this way; an installed library has no checkout beside it.
CHECKOUT = Path(__file__).resolve().parents[1]
