"""Compare codec training recipes under the same CPU time budget and write docs/codec-recipe.md.

Each variant is the small preset plus `--set` overrides, trained for --minutes of training time (validation
excluded) on the bundled photos and validated on the held-out ones (astronaut, coffee: shorter side 256,
centre crop 256, posterior mean, PSNR/SSIM on uint8 RGB). Run the variants one at a time on an otherwise idle
machine: the budget is wall-clock.

    python -m experiments.codec_recipe --minutes 10 --variants plain,groups8,thumbnail
    python -m experiments.codec_recipe --list
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from codec.common.atomic import save_figure
from codec.common.logs import read_history
from experiments import CHECKOUT

# name -> (description, overrides on configs/codec/small.yaml)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plain": ("issue 8's plain recipe from random weights: 32 norm groups, L1 + 1e-6 KL, lr 1e-3, "
              "batch 8 of 128² crops", [
        "model.norm_num_groups=32", "model.init=random", "loss.pixel=l1", "loss.perceptual=none",
        "optim.lr=1e-3", "data.crop_size=128", "train.batch_size=8"]),
    "groups8": ("plain, but 8 norm groups (4+ channels per group at every width)", [
        "model.norm_num_groups=8", "model.init=random", "loss.perceptual=none", "optim.lr=1e-3",
        "data.crop_size=128", "train.batch_size=8"]),
    "thumbnail": ("groups8 + thumbnail warm start at lr 1e-3 (the plain recipe's rate)", [
        "model.norm_num_groups=8", "model.init=thumbnail", "loss.perceptual=none", "optim.lr=1e-3",
        "data.crop_size=128", "train.batch_size=8"]),
    "warm": ("thumbnail warm start (the fitted linear codec, begins above the thumbnail), L1, lr 1e-4", [
        "model.norm_num_groups=8", "model.init=thumbnail", "loss.perceptual=none", "optim.lr=1e-4",
        "data.crop_size=128", "train.batch_size=8", "train.channels_last=true"]),
    "warm-lr3e-5": ("warm at lr 3e-5", [
        "model.norm_num_groups=8", "model.init=thumbnail", "loss.perceptual=none", "optim.lr=3e-5",
        "data.crop_size=128", "train.batch_size=8", "train.channels_last=true"]),
    "warm-mse": ("warm with an MSE pixel loss (the fit's own objective, and what PSNR measures): "
                 "configs/codec/small.yaml", [
        "model.norm_num_groups=8", "model.init=thumbnail", "loss.perceptual=none", "loss.pixel=mse", "optim.lr=1e-4",
        "data.crop_size=128", "train.batch_size=8", "train.channels_last=true"]),
    "warm-narrow": ("warm with widths 32,32,64,128: about half the FLOPs per pixel, so twice the steps", [
        "model.block_out_channels=[32,32,64,128]", "model.norm_num_groups=8", "model.init=thumbnail",
        "loss.perceptual=none", "optim.lr=1e-4", "data.crop_size=128", "train.batch_size=8",
        "train.channels_last=true"]),
    "warm-mse-narrow": ("warm-mse with widths 32,32,64,128: half the decode FLOPs (66 vs 133 GFLOP at 512²)", [
        "model.block_out_channels=[32,32,64,128]", "model.norm_num_groups=8", "model.init=thumbnail",
        "loss.perceptual=none", "loss.pixel=mse", "optim.lr=1e-4", "data.crop_size=128", "train.batch_size=8",
        "train.channels_last=true"]),
    "warm-mse-48": ("warm-mse with widths 32,48,96,128: 71% of the decode FLOPs (95 vs 133 GFLOP at 512²)", [
        "model.block_out_channels=[32,48,96,128]", "model.norm_num_groups=8", "model.init=thumbnail",
        "loss.perceptual=none", "loss.pixel=mse", "optim.lr=1e-4", "data.crop_size=128", "train.batch_size=8",
        "train.channels_last=true"]),
    "warm-crops64": ("warm with batch 32 of 64² crops: the same pixels per step, 4x the images", [
        "model.norm_num_groups=8", "model.init=thumbnail", "loss.perceptual=none", "optim.lr=1e-4",
        "data.crop_size=64", "train.batch_size=32", "train.channels_last=true"]),
}


def run_variant(name: str, overrides: list[str], minutes: float, out: Path, extra: list[str], max_steps: int) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "-m", "latent_codec", "codec", "train", "--config",
           str(CHECKOUT / "configs/codec/small.yaml"), "--out", str(run_dir), "--max-steps", str(max_steps)]
    for o in [*overrides, f"train.max_minutes={minutes}", "train.checkpoint_every=0",
              "train.validate_every=25", *extra]:
        cmd += ["--set", o]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=CHECKOUT)
    history = read_history(run_dir)
    val = [h for h in history if "val/psnr" in h]
    logs = [h for h in history if "images_per_s" in h]
    return {
        "name": name,
        "steps": max(h["step"] for h in history),
        "train_seconds": max(h["train_seconds"] for h in history),
        "images_per_s": sum(h["images_per_s"] for h in logs) / max(1, len(logs)),
        "psnr": val[-1]["val/psnr"], "ssim": val[-1]["val/ssim"],
        "curve": [(h["train_seconds"], h["val/psnr"]) for h in val],
        "wall_seconds": time.perf_counter() - started,
    }


def plot(series: dict[str, list[tuple[float, float]]], reference: dict[str, float], out: Path) -> Path:
    """Held-out PSNR against training minutes, one line per run, dashed lines for references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in series.items():
        ax.plot([t / 60 for t, _ in curve], [p for _, p in curve], marker="o", markersize=3, label=label)
    right = max((t / 60 for curve in series.values() for t, _ in curve), default=1.0)
    for label, value in reference.items():
        ax.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax.text(right, value - 0.15, f"{label}: {value:.2f} dB", color="gray", fontsize=8, ha="right", va="top")
    ax.set(xlabel="training minutes (validation excluded)", ylabel="held-out PSNR, dB (astronaut, coffee at 256²)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, out, dpi=100)


def history_curve(run_dir: Path) -> list[tuple[float, float]]:
    return [(r["train_seconds"], r["val/psnr"]) for r in read_history(run_dir) if "val/psnr" in r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.codec_recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (see --list)")
    p.add_argument("--minutes", type=float, default=10.0, help="training-time budget per variant")
    p.add_argument("--out", default="runs/recipe", help="run folders and results.json go here")
    p.add_argument("--max-steps", type=int, default=100000,
                   help="steps for the learning-rate schedule (cosine to the end); the minutes budget still caps "
                   "the run")
    p.add_argument("--set", action="append", default=[], help="extra override for every variant")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--plot", type=Path, metavar="PNG", help="instead of training: plot PSNR against time for the "
                   "variants in <out>/results.json (and any --history runs) into this PNG")
    p.add_argument("--history", action="append", default=[], metavar="LABEL=RUN_DIR",
                   help="with --plot: also draw a training run folder's history.jsonl under this label (repeatable)")
    p.add_argument("--reference", action="append", default=[], metavar="LABEL=DB",
                   help="with --plot: a horizontal reference line, e.g. 'thumbnail=20.56' (repeatable)")
    args = p.parse_args(argv)
    if args.list:
        for name, (desc, overrides) in VARIANTS.items():
            print(f"{name}: {desc}\n    {' '.join(overrides)}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.plot:
        series = {f"{name} ({r['minutes']:g} min budget)": [tuple(c) for c in r["curve"]] for name, r in results.items()
                  if name in args.variants.split(",")}
        for item in args.history:
            label, _, path = item.partition("=")
            series[label] = history_curve(Path(path))
        reference = {label: float(value) for label, _, value in (r.partition("=") for r in args.reference)}
        print(f"wrote {plot(series, reference, args.plot)}")
        return 0
    for name in args.variants.split(","):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; --list shows them")
        results[name] = (run_variant(name, VARIANTS[name][1], args.minutes, out, args.set, args.max_steps)
                         | {"minutes": args.minutes})
        results_path.write_text(json.dumps(results, indent=2))
        r = results[name]
        print(f"{name}: {r['steps']} steps, {r['images_per_s']:.1f} img/s, PSNR {r['psnr']:.2f} dB, "
              f"SSIM {r['ssim']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
