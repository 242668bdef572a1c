#!/usr/bin/env python
"""Compare codec training recipes under the same CPU time budget and write docs/codec-recipe.md.

Each variant is the small preset plus `--set` overrides, trained for --minutes of training time (validation
excluded) on the bundled photos and validated on the held-out ones (astronaut, coffee: shorter side 256,
centre crop 256, posterior mean, PSNR/SSIM on uint8 RGB). Run the variants one at a time on an otherwise idle
machine: the budget is wall-clock.

    python scripts/codec_recipe.py --minutes 10 --variants plain,groups8,thumbnail
    python scripts/codec_recipe.py --list
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (description, overrides on configs/codec/small.yaml)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plain": ("issue 8's plain recipe: 32 norm groups, L1 + 0.5 MSE, lr 1e-3, batch 8 of 128² crops", [
        "model.norm_num_groups=32", "model.init=random", "loss.pixel=l1", "loss.perceptual=none",
        "optim.lr=1e-3", "data.crop_size=128", "train.batch_size=8"]),
    "groups8": ("plain, but 8 norm groups (4+ channels per group at every width)", [
        "model.norm_num_groups=8", "model.init=random", "loss.perceptual=none", "optim.lr=1e-3",
        "data.crop_size=128", "train.batch_size=8"]),
    "thumbnail": ("groups8 + thumbnail warm start", [
        "model.norm_num_groups=8", "model.init=thumbnail", "loss.perceptual=none", "optim.lr=1e-3",
        "data.crop_size=128", "train.batch_size=8"]),
}


def run_variant(name: str, overrides: list[str], minutes: float, out: Path, extra: list[str]) -> dict:
    run_dir = out / name
    cmd = [sys.executable, str(ROOT / "scripts" / "train_codec.py"), "--config", str(ROOT / "configs/codec/small.yaml"),
           "--output-dir", str(run_dir), "--max-steps", "100000"]
    for o in [*overrides, f"train.max_minutes={minutes}", "train.checkpoint_every=0",
              "train.validate_every=25", *extra]:
        cmd += ["--set", o]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    val = [h for h in history if "val/psnr" in h]
    logs = [h for h in history if "images_per_s" in h]
    return {
        "name": name,
        "steps": max(h["step"] for h in history),
        "train_seconds": max(h["train_seconds"] for h in history),
        "images_per_s": sum(h["images_per_s"] for h in logs) / max(1, len(logs)),
        "psnr": val[-1]["val/psnr"], "ssim": val[-1]["val/ssim"], "curve": [(h["train_seconds"], h["val/psnr"]) for h in val],
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (see --list)")
    p.add_argument("--minutes", type=float, default=10.0, help="training-time budget per variant")
    p.add_argument("--out", default="runs/recipe", help="run folders and results.json go here")
    p.add_argument("--set", action="append", default=[], help="extra override for every variant")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (desc, overrides) in VARIANTS.items():
            print(f"{name}: {desc}\n    {' '.join(overrides)}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; --list shows them")
        results[name] = run_variant(name, VARIANTS[name][1], args.minutes, out, args.set) | {"minutes": args.minutes}
        results_path.write_text(json.dumps(results, indent=2))
        r = results[name]
        print(f"{name}: {r['steps']} steps, {r['images_per_s']:.1f} img/s, PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
