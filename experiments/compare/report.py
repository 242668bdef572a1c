"""The A/B's numbers and pictures from the runs' histories: curves, steps to a loss, the table, the plots.

Pure functions over plain data first (tested on made-up curves), then the two plots and the Markdown.
"""

from __future__ import annotations

from pathlib import Path

from codec.common.atomic import save_figure

MEAN = "val/denoising_loss"


def curve(history: list[dict], key: str = MEAN) -> list[tuple[int, float]]:
    """(step, value) of every evaluation holding `key`, sorted by step; a step evaluated twice (a resume that
    repeated it) keeps its last value."""
    points = {int(h["step"]): float(h[key]) for h in history if key in h}
    return sorted(points.items())


def steps_to_reach(points: list[tuple[int, float]], level: float) -> float | None:
    """The first step at which the curve is at or below `level`, linearly interpolated between the two
    evaluations around the crossing; None when it never gets there."""
    previous = None
    for step, value in points:
        if value <= level:
            if previous is None or previous[1] == value:
                return float(step)
            (s0, v0) = previous
            return s0 + (step - s0) * (v0 - level) / (v0 - value)
        previous = (step, value)
    return None


def race(curves: dict[str, list[tuple[int, float]]]) -> dict:
    """The comparison the issue asks for: the worst codec's final held-out loss is the bar; how many steps each
    codec's U-Net needs to reach it, and the ratio to the slowest (the worst codec reaches it at its last step)."""
    finals = {name: points[-1][1] for name, points in curves.items() if points}
    if len(finals) != len(curves):
        raise ValueError(f"no evaluations yet for {sorted(set(curves) - set(finals))}")
    worst = max(finals, key=finals.get)
    bar = finals[worst]
    steps = {name: steps_to_reach(points, bar) for name, points in curves.items()}
    slowest = max(s for s in steps.values() if s is not None)
    return {
        "bar": bar, "worst": worst, "final": finals, "steps_to_bar": steps,
        "fraction_of_slowest": {name: (s / slowest if s is not None and slowest else None)
                                for name, s in steps.items()},
    }


def plot_losses(curves: dict[str, dict[str, list[tuple[int, float]]]], keys: list[str], out: str | Path) -> Path:
    """One panel per key (the mean and each timestep), one line per codec, held-out loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, by_key in curves.items():
            points = by_key.get(key, [])
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=2.5, label=name)
        ax.set(title=key.replace("val/denoising_loss", "held-out loss").replace("_t", " at t="), xlabel="U-Net step",
               yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("denoising MSE (held-out, fixed noise)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def _cell(value, digits: int = 4, pct: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if pct else f"{value:.{digits}f}"


def results_table(results: dict) -> str:
    """One Markdown row per codec: what the analysis measured of its latents, and how its U-Net learned."""
    timesteps = results["settings"]["eval_timesteps"]
    head = ["codec", "PSNR", "latent power > ¼ c/s", "equivariance PSNR", "final held-out loss",
            *[f"t={t}" for t in timesteps], "steps to the bar", "of the slowest", "adherence c/p/s/b"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    race_ = results["race"]
    for name, codec in results["codecs"].items():
        a = codec["analysis"]
        adherence = codec.get("adherence")
        adh = ("/".join(f"{adherence[k]:.0f}" for k in ("color", "position", "shape", "background"))
               if adherence else "—")
        cells = [name, f"{a['reconstruction']['psnr']:.2f}",
                 _cell(a["spectrum"]["latent_high_frequency_share"], pct=True),
                 _cell(a["equivariance_psnr_mean"], 2), _cell(race_["final"][name]),
                 *[_cell(codec["final_at"].get(str(t))) for t in timesteps],
                 _cell(race_["steps_to_bar"][name], 0), _cell(race_["fraction_of_slowest"][name], 2), adh]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report_markdown(results: dict) -> str:
    s = results["settings"]
    race_ = results["race"]
    lines = [
        "# Codec A/B: which latent space does a U-Net learn fastest?",
        "",
        f"{len(results['codecs'])} codecs, the same U-Net config ({s['unet_config']}), seed {s['seed']}, "
        f"{s['steps']} steps each, on {s['train_images']} images of {s['data']} at {s['resolution']} px; held-out loss "
        f"on {s['heldout']} other images at t = {', '.join(map(str, s['eval_timesteps']))} with fixed noise, "
        f"every {s['eval_every']} steps. Each codec's latents are scaled by its own shards' factor.",
        "",
        results_table(results),
        "",
        f"The bar is the worst codec's final held-out loss ({race_['worst']}: {race_['bar']:.4f}); "
        f"\"steps to the bar\" "
        f"is where each U-Net's held-out loss first reaches it (interpolated between evaluations), \"of the slowest\" "
        f"that step over the slowest codec's. PSNR and the latent statistics are measured on the held-out images "
        f"(measurement.latent_analysis); equivariance PSNR is the mean over τ of D(τ(z)) against τ(x). Adherence: "
        f"percent of samples with the asked colour/position/shape/background (shapes-world captions only).",
        "",
        "![held-out loss](loss.png)",
        "",
        "![latent spectra](spectrum.png)",
        "",
    ]
    if results.get("adherence_note"):
        lines += [f"Adherence: {results['adherence_note']}", ""]
    return "\n".join(lines)
