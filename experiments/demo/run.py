"""`make demo`: the whole mission on bundled data, stage by stage.

    shapes world -> train codec (photos + shapes) -> evaluate codec -> fine-tune its decoder on shapes
    -> the VAE study (codecs at several β and a conditional VAE on 64 px shapes) -> encode shapes into latent
    shards -> train U-Net from shards -> generate for fixed prompts (U-Net and CVAE prior) + score adherence
    -> report.md

The first five stages run the same command a user runs (`latent-codec`, in a subprocess each). Generation and
scoring run in this process (report.py), through the pipeline class a user loads
(LatentDiffusionPipeline.from_pretrained), because each prompt is drawn twice from the same noise, with and
without its text, and every image is scored as it is made.

Every budget lives in configs/demo.yaml. Each stage is skipped when its output is already complete, and the
trainers resume from their latest checkpoint, so re-running after an interruption continues where it stopped.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from codec.common.atomic import write_text_atomically
from codec.common.config import ConfigError, load_config
from experiments import CHECKOUT


@dataclass
class ShapesStage:
    out: str = "data/shapes"
    count: int = 1200
    seed: int = 0
    size: int = 512


@dataclass
class TrainerStage:
    """A trainer command's stage: its preset and the `--set` overrides the demo adds."""

    config: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class EvaluateStage:
    resolution: int = 256
    bundled_dir: str = "data/bundled_photos"  # the held-out bundled photos are written here


@dataclass
class VAEStudyStage:
    # experiments.demo.beta_study's config; `overrides` are --set assignments of that config (not of the codec's).
    config: str = "configs/beta_study.yaml"
    overrides: list[str] = field(default_factory=list)
    cvae_run: str = "cvae"  # the study run whose conditional codec draws prior samples for the prompts


@dataclass
class EncodeStage:
    resolution: int = 128
    batch_size: int = 32


@dataclass
class GenerateStage:
    prompts: list[str] = field(default_factory=list)
    images_per_prompt: int = 4
    steps: int = 20
    guidance: float = 5.0
    seed: int = 0
    sampler: str = "dpm"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("generate.prompts: give at least one prompt")
        if self.images_per_prompt < 1:
            raise ConfigError("generate.images_per_prompt must be >= 1")


@dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    shapes: ShapesStage = field(default_factory=ShapesStage)
    codec: TrainerStage = field(default_factory=lambda: TrainerStage("configs/codec/small.yaml"))
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    # A decoder-only fine-tune of the codec on the shapes world at the U-Net's resolution (train.trainable:
    # decoder): the encoder, so every latent, stays bit-identical, and the pipeline gets a decoder that draws the
    # shapes' outlines from those latents. No config: the stage is skipped and the U-Net uses the codec as is.
    shapes_decoder: TrainerStage = field(default_factory=TrainerStage)
    vae_study: VAEStudyStage = field(default_factory=VAEStudyStage)
    encode: EncodeStage = field(default_factory=EncodeStage)
    unet: TrainerStage = field(default_factory=lambda: TrainerStage("configs/unet/small.yaml"))
    generate: GenerateStage = field(
        default_factory=lambda: GenerateStage(prompts=["a red circle in the center on a black background"]))


def load_demo_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DemoConfig:
    return load_config(DemoConfig, path, overrides)


# Where every stage writes, relative to the demo's output folder.
LAYOUT = {
    "codec_run": "codec", "codec": "codec/final", "evaluation": "evaluation", "shapes_decoder_run": "shapes-decoder",
    "vae_study": "vae-study", "shards": "shards", "unet_run": "unet", "pipeline": "unet/pipeline",
    "generated": "generated", "stages": "stages.json",
}


@dataclass(frozen=True)
class Paths:
    """Where every stage writes, under the demo's output folder: `paths.codec` is root / LAYOUT["codec"]."""

    root: Path

    def __getattr__(self, name: str) -> Path:
        if name in LAYOUT:
            return self.root / LAYOUT[name]
        raise AttributeError(name)


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=CHECKOUT)


def _latent_codec(group: str, verb: str) -> list[str]:
    """The installed command, run as a module of this Python (the one the demo runs under)."""
    return [sys.executable, "-m", "latent_codec", group, verb]


def _experiment(module: str) -> list[str]:
    """An experiment of this checkout; it runs with cwd at the checkout, so `-m` finds experiments/ there."""
    return [sys.executable, "-m", module]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


class StageClock:
    """Seconds per stage, kept in stages.json so a resumed demo still reports the stages it skipped."""

    def __init__(self, path: Path):
        self.path = path
        self.seconds: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def run(self, name: str, done: bool, action) -> None:
        if done:
            print(f"== {name}: already complete, reused", flush=True)
            self.seconds.setdefault(name, {"seconds": None})["reused"] = True
        else:
            print(f"== {name}", flush=True)
            started = time.perf_counter()
            action()
            self.seconds[name] = {"seconds": round(time.perf_counter() - started, 1), "reused": False}
        write_text_atomically(self.path, json.dumps(self.seconds, indent=2))


def run_demo(cfg: DemoConfig) -> Path:
    """Run (or resume) every stage; returns the report's path."""
    from experiments.demo.report import generate_and_score, write_report  # heavy imports only when running

    paths = Paths(CHECKOUT / cfg.output_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    clock = StageClock(paths.stages)
    shapes_dir = CHECKOUT / cfg.shapes.out

    clock.run("shapes world", (shapes_dir / "shapes.json").exists(), lambda: _run(
        _experiment("experiments.demo.shapes") + [
            "--out", str(shapes_dir), "--count", str(cfg.shapes.count), "--seed", str(cfg.shapes.seed),
            "--size", str(cfg.shapes.size), "--preview", str(paths.root / "shapes_preview.png")]))
    clock.run("codec training", (paths.codec / "config.json").exists(), lambda: _run(
        _latent_codec("codec", "train") + ["--config", str(CHECKOUT / cfg.codec.config), "--out", str(paths.codec_run),
                                           "--resume", "latest", *_sets(cfg.codec.overrides)]))
    clock.run("codec evaluation", (paths.evaluation / "summary.json").exists(), lambda: _run(
        _latent_codec("codec", "evaluate") + ["--codec", str(paths.codec), "--data", "bundled",
                                              "--bundled-dir", cfg.evaluate.bundled_dir,
                                              "--resolution", str(cfg.evaluate.resolution),
                                              "--out", str(paths.evaluation)]))
    # The codec the U-Net's shards and pipeline use: the decoder fine-tune when the demo makes one (same encoder).
    diffusion_codec = paths.codec
    if cfg.shapes_decoder.config:
        diffusion_codec = paths.shapes_decoder_run / "final"
        clock.run("shapes decoder", (diffusion_codec / "config.json").exists(), lambda: _run(
            _latent_codec("codec", "train") + ["--config", str(CHECKOUT / cfg.shapes_decoder.config),
                                               "--pretrained", str(paths.codec),
                                               "--data", str(shapes_dir), "--out", str(paths.shapes_decoder_run),
                                               "--resume", "latest", *_sets(cfg.shapes_decoder.overrides)]))
    clock.run("VAE study (β, CVAE)", (paths.vae_study / "results.json").exists(), lambda: _run(
        _experiment("experiments.demo.beta_study") + [
            "--config", str(CHECKOUT / cfg.vae_study.config), "--set", f"output_dir={paths.vae_study}",
            *_sets(cfg.vae_study.overrides)]))
    clock.run("encode shards", (paths.shards / "manifest.json").exists(), lambda: _run(
        _latent_codec("shards", "encode") + ["--codec", str(diffusion_codec), "--data", str(shapes_dir),
                                             "--out", str(paths.shards), "--resolution", str(cfg.encode.resolution),
                                             "--batch-size", str(cfg.encode.batch_size)]))
    clock.run("U-Net training", (paths.pipeline / "model_index.json").exists(), lambda: _run(
        _latent_codec("unet", "train") + ["--config", str(CHECKOUT / cfg.unet.config), "--shards", str(paths.shards),
                                          "--codec", str(diffusion_codec), "--out", str(paths.unet_run),
                                          "--resume", "latest", *_sets(cfg.unet.overrides)]))
    clock.run("generate + adherence", (paths.generated / "adherence.json").exists(),
              lambda: generate_and_score(paths.pipeline, cfg.generate, paths.generated,
                                         cvae_dir=paths.vae_study / cfg.vae_study.cvae_run / "final"))
    report = write_report(cfg, paths, clock.seconds)
    print(f"report: {report}", flush=True)
    return report
