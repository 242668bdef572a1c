"""The latent statistics of a dataset, and from them the latent scale: the one definition the codec export
(codec.network.model.latent_statistics) and the shards' manifest (codec.shards) both use, so a file's Δ, the
quantisation-noise fine-tune's Δ and the U-Net's inputs are in the same units (docs/shards.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def latent_sums(mean: torch.Tensor, logvar: torch.Tensor) -> dict:
    """Per-channel sums over a shard's stored (float16) latents, in float64, so the dataset-wide statistics are
    combined from the shards without reading them again and describe exactly what the reader will see.

    elements: values per channel; sum, sum_sq: of the posterior means; sum_var: of exp(logvar).
    """
    channels = mean.shape[1]
    m = mean.double().transpose(0, 1).reshape(channels, -1)
    v = logvar.double().exp().transpose(0, 1).reshape(channels, -1)
    return {
        "elements": int(m.shape[1]),
        "sum": m.sum(1).tolist(),
        "sum_sq": (m * m).sum(1).tolist(),
        "sum_var": v.sum(1).tolist(),
    }


def stats_from_sums(parts: Iterable[dict]) -> dict:
    """Dataset-wide statistics of z = mean + exp(logvar / 2) * eps, the latent the reader samples.

    By the law of total variance, Var[z] = Var[mean] + E[exp(logvar)] (per channel, and over all elements for
    the global std). scaling_factor = 1 / std makes the sampled latents unit-variance, as SD's 0.18215 does for
    its codec. The one definition of the latent scale: the codec export measures it with this function too
    (codec.network.model.latent_statistics, docs/shards.md).
    """
    elements, total, total_sq, total_var = 0, None, None, None
    for part in parts:
        if not part["elements"]:
            continue
        s, s2, sv = (torch.tensor(part[k], dtype=torch.float64) for k in ("sum", "sum_sq", "sum_var"))
        total = s if total is None else total + s
        total_sq = s2 if total_sq is None else total_sq + s2
        total_var = sv if total_var is None else total_var + sv
        elements += part["elements"]
    if not elements:
        raise ValueError("no latents to compute statistics from: every image was rejected or the dataset is empty")
    channels = len(total)
    channel_mean = total / elements
    channel_var = total_sq / elements - channel_mean**2 + total_var / elements
    overall_mean = total.sum() / (elements * channels)
    overall_var = (total_sq.sum() + total_var.sum()) / (elements * channels) - overall_mean**2
    std = math.sqrt(max(float(overall_var), 0.0))
    if not std > 0:
        raise ValueError("the encoded latents have zero variance; the codec output is constant, check the codec")
    return {
        "of": "z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): Var[z] = Var[mean] + E[exp(logvar)]",
        "std": std,
        "mean": float(overall_mean),
        "channel_mean": channel_mean.tolist(),
        "channel_std": channel_var.clamp_min(0).sqrt().tolist(),
        "mean_std": math.sqrt(max(float(total_sq.sum() / (elements * channels) - overall_mean**2), 0.0)),
        "elements_per_channel": elements,
    }
