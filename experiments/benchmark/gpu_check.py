"""Check the toolkit on a CUDA GPU in a few minutes: every stage at the real network sizes, in bf16.

    python -m experiments.benchmark.gpu_check         # writes runs/gpu-check/gpu_check.md (+ .json, generated.png)

Stages: a shapes-world dataset (512 images of 256x256) -> the kl-f8 codec trained in bf16 with LPIPS off and the
patch-GAN on from step 150 of 300 -> shards encoded in bf16 -> the sd-shaped U-Net trained in bf16 for 200 steps
-> text-to-image with bf16 weights. About 5 minutes on one H200.

What it proves: the CUDA paths (bf16 autocast, TF32, SDPA, the fp32 loss regions, the upcast on overflow) run at
scale and give finite numbers. What it measures: each stage's throughput and peak GPU memory, printed per stage.
It fails (exit 1) on any non-finite loss, metric, latent or image; without CUDA it exits 2 at once. `--tiny`
(CheckPlan.tiny()) swaps in the tiny presets and a few steps so the test suite can run the same code on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from codec.common.atomic import write_text_atomically
from codec.common.distributed import reset_accelerate_state
from codec.common.logs import read_history
from experiments import CHECKOUT

MARKER = "gpu_check.json"
PROMPTS = 4  # captions of unseen shapes-world scenes (seed 1; the training images are seed 0)


@dataclass
class CheckPlan:
    """Sizes of each stage: the real presets for a GPU, the tiny ones for the test suite's CPU run."""

    codec_config: str = "configs/codec/kl-f8.yaml"
    unet_config: str = "configs/unet/sd.yaml"
    images: int = 512
    size: int = 256
    codec_steps: int = 300
    codec_batch: int = 8
    unet_steps: int = 200
    unet_batch: int = 32
    sample_steps: int = 25
    num_workers: int = 4

    @classmethod
    def tiny(cls) -> CheckPlan:
        return cls("configs/codec/tiny.yaml", "configs/unet/tiny.yaml", images=12, size=64, codec_steps=4,
                   codec_batch=2, unet_steps=4, unet_batch=4, sample_steps=2, num_workers=0)


@dataclass
class StageResult:
    stage: str
    seconds: float
    throughput: str
    peak_gpu_mb: float | None
    finite: bool
    problems: list[str] = field(default_factory=list)


def _peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb() -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def non_finite_history(output_dir: Path) -> list[str]:
    """Every logged number of a run that is NaN or infinite, as 'step N: key=value'."""
    found = []
    for row in read_history(output_dir):
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                found.append(f"step {row.get('step')}: {key}={value}")
    return found


def non_finite_shards(shards_dir: Path) -> list[str]:
    from codec.shards import LatentShards

    found = []
    shards = LatentShards(shards_dir)
    for i in range(len(shards)):
        record = shards[i]
        for name in ("mean", "logvar"):
            if not torch.isfinite(record[name]).all():
                found.append(f"record {i} ({record['id']}): {name} holds "
                             f"{int((~torch.isfinite(record[name])).sum())} non-finite values")
    return found


def _rate(history: list[dict], key: str) -> float:
    """The median logged rate over the second half of a run (the first steps include warm-up and compilation)."""
    values = [row[key] for row in history if key in row]
    return float(np.median(values[len(values) // 2:])) if values else float("nan")


def _timed_training(train, cfg):
    """(result, seconds) of one trainer run, from a clean accelerate state and with the GPU peak reset."""
    reset_accelerate_state()  # each trainer builds its own Accelerator
    _peak_reset()
    started = time.perf_counter()
    result = train(cfg)
    return result, time.perf_counter() - started


def check_codec(plan: CheckPlan, data: Path, out: Path) -> tuple[StageResult, Path]:
    from codec.training.config import load_codec_config
    from codec.training.train import train_codec

    overrides = [
        f"data.train={data}", "data.val=null", "data.val_count=8", f"data.crop_size={plan.size}", "data.resize=null",
        f"data.val_size={plan.size}", f"data.num_workers={plan.num_workers}",
        "loss.perceptual=none", "loss.gan_weight=0.5", f"loss.disc_start={plan.codec_steps // 2}",
        f"train.max_steps={plan.codec_steps}", f"train.batch_size={plan.codec_batch}", "train.mixed_precision=bf16",
        f"train.validate_every={plan.codec_steps}", f"train.checkpoint_every={plan.codec_steps}", "train.log_every=10",
        f"train.output_dir={out}", "train.latent_stats_images=64",
    ]
    cfg = load_codec_config(CHECKOUT / plan.codec_config, overrides)
    result, seconds = _timed_training(train_codec, cfg)
    problems = non_finite_history(out)
    problems += [f"validation {k}={v}" for k, v in result.metrics.items() if not math.isfinite(v)]
    gan = [row["loss/gan_weight"] for row in read_history(out) if row.get("loss/gan_weight")]
    if not gan:
        problems.append("the GAN never switched on (loss/gan_weight stayed 0)")
    rate = _rate(read_history(out), "images_per_s")
    psnr = result.metrics.get("val/psnr")
    return StageResult(f"codec {Path(plan.codec_config).stem}, bf16, GAN on", seconds, f"{rate:.1f} images/s"
                       + (f", val PSNR {psnr:.2f} dB" if psnr is not None else ""), _peak_mb(), not problems,
                       problems), result.final


def check_encode(plan: CheckPlan, codec: Path, data: Path, out: Path) -> StageResult:
    from codec.shards.encode import encode_dataset

    _peak_reset()
    started = time.perf_counter()
    manifest = encode_dataset(codec, data, out, resolution=plan.size, unit_size=max(plan.images // 4, 1),
                              batch_size=32, num_workers=plan.num_workers, precision="bf16", progress=False)
    seconds = time.perf_counter() - started
    problems = non_finite_shards(out)
    if manifest["count"] != plan.images:
        problems.append(f"{manifest['count']} records for {plan.images} images ({manifest['rejected']} rejected)")
    return StageResult("encode shards, bf16", seconds, f"{manifest['count'] / seconds:.1f} images/s", _peak_mb(),
                       not problems, problems)


def check_unet(plan: CheckPlan, codec: Path, shards: Path, out: Path) -> tuple[StageResult, Path]:
    from diffusion.config import load_unet_config
    from diffusion.train import train_unet

    overrides = [
        f"shards={shards}", f"codec={codec}", f"train.max_steps={plan.unet_steps}",
        f"train.batch_size={plan.unet_batch}",
        "train.mixed_precision=bf16", "train.validate_every=0", f"train.checkpoint_every={plan.unet_steps}",
        "train.log_every=10", f"train.output_dir={out}", "optim.warmup_steps=10",
    ]
    cfg = load_unet_config(CHECKOUT / plan.unet_config, overrides)
    result, seconds = _timed_training(train_unet, cfg)
    problems = non_finite_history(out)
    rate = _rate(read_history(out), "latents_per_s")
    return StageResult(f"U-Net {Path(plan.unet_config).stem}, bf16", seconds, f"{rate:.1f} latents/s", _peak_mb(),
                       not problems, problems), result.pipeline


def check_generate(plan: CheckPlan, pipeline: Path, out: Path) -> StageResult:
    from codec.data import tensor_to_pil
    from codec.exchange.pipeline import LatentDiffusionPipeline
    from codec.measurement.evaluate import save_png
    from experiments.demo.shapes import caption, scenes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = LatentDiffusionPipeline.from_pretrained(pipeline, use_safetensors=True, dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [caption(scene) for scene in scenes(PROMPTS, seed=1)]
    _peak_reset()
    started = time.perf_counter()
    result = pipe(prompts, num_inference_steps=plan.sample_steps, guidance_scale=5.0, seed=0, output_type="pt")
    seconds = time.perf_counter() - started
    images = result.images.float()
    problems = ([] if torch.isfinite(images).all()
                else [f"{int((~torch.isfinite(images)).sum())} non-finite pixel values"])
    save_png(tensor_to_pil(torch.cat(list(images.nan_to_num().clamp(-1, 1)), dim=-1)), out / "generated.png")
    return StageResult("text-to-image, bf16 weights", seconds,
                       f"{len(prompts) / seconds:.2f} images/s ({plan.sample_steps} steps, CFG)", _peak_mb(),
                       not problems, problems)


def prepare_output(out: Path) -> None:
    """Start from an empty folder; one holding anything but an earlier check is refused (it is wiped)."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"--out {out} exists and holds no {MARKER}: it is not an earlier GPU check, and "
                                  f"the check wipes its folder; pass a new or empty --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("{}\n")  # claims the folder at once, so a crash mid-check can be rerun into it


def report(results: list[StageResult], environment: dict) -> str:
    lines = [f"GPU check on {environment['device']} (torch {environment['torch']}, CUDA {environment['cuda']})", "",
             "| stage | seconds | throughput | peak GPU memory | finite |", "|---|---:|---|---:|---|"]
    for r in results:
        memory = f"{r.peak_gpu_mb / 1024:.1f} GiB" if r.peak_gpu_mb is not None else "-"
        lines.append(f"| {r.stage} | {r.seconds:.1f} | {r.throughput} | {memory} | {'yes' if r.finite else 'NO'} |")
    for r in results:
        lines += [f"- {r.stage}: {problem}" for problem in r.problems]
    return "\n".join(lines) + "\n"


def run_gpu_check(out: Path, plan: CheckPlan) -> tuple[bool, str]:
    """Run every stage into `out`; returns (all finite, the Markdown report), also written to out/gpu_check.md."""
    from experiments.demo.shapes import write_shapes_dataset

    out = Path(out)
    prepare_output(out)
    environment = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__, "cuda": torch.version.cuda, "plan": plan.__dict__,
    }
    data = write_shapes_dataset(out / "shapes", plan.images, seed=0, size=plan.size)
    results: list[StageResult] = []
    codec_result, codec = check_codec(plan, data, out / "codec")
    results.append(codec_result)
    results.append(check_encode(plan, codec, data, out / "shards"))
    unet_result, pipeline = check_unet(plan, codec, out / "shards", out / "unet")
    results.append(unet_result)
    results.append(check_generate(plan, pipeline, out))
    text = report(results, environment)
    write_text_atomically(out / "gpu_check.md", text)
    write_text_atomically(out / MARKER, json.dumps({"environment": environment,
                                                    "stages": [r.__dict__ for r in results]}, indent=2) + "\n")
    return all(r.finite for r in results), text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="working folder, wiped at the start when it holds an "
                   "earlier check (default runs/gpu-check); any other non-empty folder is refused")
    p.add_argument("--tiny", action="store_true", help="tiny presets and a few steps, allowed without CUDA: for the "
                   "test suite, which runs the same code on a CPU")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    try:
        finite, text = run_gpu_check(Path(args.out), CheckPlan.tiny() if args.tiny else CheckPlan())
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
