"""The A/B of codecs for diffusion: the same U-Net, trained the same way on each codec's latents, stage by stage.

    split the data (held-out images the U-Nets never train on) -> per codec: encode train and held-out shards
    -> analyse its latents on the held-out images -> train the U-Net, evaluating the held-out loss at fixed
    timesteps every few steps -> sample the held-out captions and score adherence (shapes-world captions)
    -> results.json, report.md, loss.png, spectrum.png

Fair by construction: every U-Net has the same config, seed (so the same initial weights when the codecs'
latents have the same shape), data order (draws keyed by seed and record, diffusion/draws.py), noise, timesteps
and held-out examples; each learns its codec's latents scaled by its own shards' factor, and the eval loss of
held-out shards takes that factor too. The encoders and trainers run as the command a user runs (`latent-codec`,
a subprocess each, optionally under `accelerate launch`); every stage is skipped when its output is complete, and
the trainers resume from their latest checkpoint, so re-running the same command continues an interrupted A/B.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from codec.common.atomic import folder_atomically, write_text_atomically
from codec.common.config import ConfigError
from codec.common.logs import read_history
from experiments import CHECKOUT
from experiments.compare.report import MEAN, curve, plot_losses, race, report_markdown


@dataclass
class CompareSettings:
    codecs: dict[str, str]  # name -> codec folder
    data: str
    out: str
    steps: int
    unet_config: str = "configs/unet/small.yaml"
    unet_overrides: list[str] = field(default_factory=list)  # --set assignments of the U-Net config
    resolution: int = 64
    heldout: int = 64
    eval_every: int = 100
    eval_timesteps: list[int] = field(default_factory=lambda: [100, 500, 900])
    seed: int = 0
    encode_batch_size: int = 64
    analysis_images: int = 64
    adherence_prompts: int = 8  # distinct held-out captions sampled at the end (0: none)
    images_per_prompt: int = 2
    guidance: float = 2.0
    sample_steps: int = 20
    launch: str = ""  # a prefix for the trainer and encoder commands, e.g. "accelerate launch --num_processes 8"
    train_images: int = 0  # filled in by the split

    def recorded(self) -> dict:
        """What must match for a re-run to continue this A/B (all but how the commands are launched)."""
        record = asdict(self)
        record.pop("launch")
        return record


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=CHECKOUT)


def _command(settings: CompareSettings, group: str, verb: str) -> list[str]:
    """`latent-codec <group> <verb>` run as a module: under this Python, or after the --launch prefix (`accelerate
    launch` takes -m too)."""
    prefix = shlex.split(settings.launch) if settings.launch else [sys.executable]
    return [*prefix, "-m", "latent_codec", group, verb]


def split_data(settings: CompareSettings, out: Path) -> tuple[Path, Path, int]:
    """The last `heldout` images of the data as the held-out set, the rest for training, each saved as a
    `datasets` folder under out/data (once; both renamed into place when complete)."""
    from codec.data import load_image_dataset

    train_dir, held_dir = out / "data" / "train", out / "data" / "heldout"
    if not (held_dir / "dataset_info.json").is_file() or not (train_dir / "dataset_info.json").is_file():
        dataset, _ = load_image_dataset(settings.data)
        if not hasattr(dataset, "save_to_disk"):  # tars and parquet come as a record index, not a datasets table
            raise ConfigError(f"--data {settings.data}: the A/B splits its data into saved datasets; pass an image "
                              f"folder or a save_to_disk folder (tars and parquet are read by the trainers and the "
                              f"encoder, not by this split)")
        if len(dataset) <= settings.heldout:
            raise ConfigError(f"--data {settings.data}: {len(dataset)} images, not enough to hold out "
                              f"{settings.heldout} and train on the rest; lower --heldout")
        cut = len(dataset) - settings.heldout
        for folder, part in ((train_dir, dataset.select(range(cut))),
                             (held_dir, dataset.select(range(cut, len(dataset))))):
            with folder_atomically(folder) as tmp:
                part.save_to_disk(str(tmp))
    from datasets import load_from_disk

    return train_dir, held_dir, len(load_from_disk(str(train_dir)))


def check_settings(settings: CompareSettings, out: Path) -> None:
    """A re-run into the same folder must be the same A/B: the first run's settings are kept in compare.json."""
    path = out / "compare.json"
    if path.is_file():
        before = json.loads(path.read_text())
        now = settings.recorded()
        changed = sorted(k for k in set(before) | set(now) if k != "train_images" and before.get(k) != now.get(k))
        if changed:
            raise ConfigError(f"{out} holds an A/B made with other settings ({', '.join(changed)} differ); re-run it "
                              f"with the same ones to continue, or choose another --out")


def unet_command(settings: CompareSettings, name: str, codec: str, paths: dict) -> list[str]:
    sets = [*settings.unet_overrides,
            f"train.max_steps={settings.steps}", f"train.seed={settings.seed}",
            f"train.validate_every={settings.eval_every}", f"train.eval_shards={paths['heldout_shards']}",
            f"train.eval_timesteps=[{','.join(map(str, settings.eval_timesteps))}]",
            f"train.eval_items={settings.heldout}", "train.validate_samples=false"]
    return [*_command(settings, "unet", "train"), "--config", str(CHECKOUT / settings.unet_config), "--shards",
            str(paths["shards"]), "--codec", codec, "--out", str(paths["unet"]), "--resume", "latest",
            *[a for s in sets for a in ("--set", s)]]


def _encode(settings: CompareSettings, codec: str, data: Path, out: Path) -> None:
    if (out / "manifest.json").is_file():
        return
    _run([*_command(settings, "shards", "encode"), "--codec", codec, "--data", str(data), "--out", str(out),
          "--resolution", str(settings.resolution), "--batch-size", str(settings.encode_batch_size),
          "--seed", str(settings.seed)])


def shapes_prompts(captions: list[str], count: int) -> tuple[list[str], str | None]:
    """The first `count` distinct captions, when every one is a shapes-world caption the adherence scorer reads;
    otherwise no prompts and the reason."""
    from experiments.demo.adherence import parse_prompt

    prompts = list(dict.fromkeys(captions))[:count]
    if not prompts:
        return [], "the held-out images have no captions"
    try:
        for prompt in prompts:
            parse_prompt(prompt)
    except ValueError:
        return [], ("not scored: the captions are not shapes-world captions, and adherence is read from pixels only "
                    "for those (experiments/demo/adherence.py)")
    return prompts, None


def compare_codecs(settings: CompareSettings) -> dict:
    """Run (or continue) every stage; returns results.json's content."""
    from codec.measurement.latent_analysis import analyze_codecs, load_images, plot_spectra
    from codec.shards import LatentShards
    from experiments.demo.report import generate_and_score
    from experiments.demo.run import GenerateStage

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    check_settings(settings, out)
    train_dir, held_dir, settings.train_images = split_data(settings, out)
    write_text_atomically(out / "compare.json", json.dumps(settings.recorded(), indent=2))

    paths = {name: {"shards": out / "codecs" / name / "shards", "heldout_shards": out / "codecs" / name / "heldout",
                    "unet": out / "codecs" / name / "unet"} for name in settings.codecs}
    for name, codec in settings.codecs.items():
        print(f"== {name}: encode", flush=True)
        _encode(settings, codec, train_dir, paths[name]["shards"])
        _encode(settings, codec, held_dir, paths[name]["heldout_shards"])

    print("== latent analysis on the held-out images", flush=True)
    analysis_path = out / "analysis" / "analysis.json"
    if analysis_path.is_file():
        analyses = json.loads(analysis_path.read_text())
    else:
        images = load_images(str(held_dir), settings.resolution, settings.analysis_images)
        analyses = analyze_codecs(settings.codecs, images, out / "analysis")
    plot_spectra(analyses, out / "spectrum.png")

    held = LatentShards(next(iter(paths.values()))["heldout_shards"])
    captions = [held[i]["caption"] for i in range(len(held))]  # --heldout records (64 by default)
    prompts, adherence_note = (shapes_prompts(captions, settings.adherence_prompts) if settings.adherence_prompts
                               else ([], "not asked for (--adherence-prompts 0)"))
    results: dict = {"settings": settings.recorded(), "codecs": {}, "adherence_note": adherence_note}
    curves: dict[str, dict] = {}
    keys = [MEAN, *[f"{MEAN}_t{t}" for t in settings.eval_timesteps]]
    for name, codec in settings.codecs.items():
        unet = paths[name]["unet"]
        print(f"== {name}: U-Net, {settings.steps} steps", flush=True)
        if not (unet / "pipeline" / "model_index.json").is_file():
            _run(unet_command(settings, name, codec, paths[name]))
        history = read_history(unet)
        curves[name] = {key: curve(history, key) for key in keys}
        entry = {"codec": codec, "analysis": analyses[name], "curve": curves[name][MEAN],
                 "final_at": {str(t): (curves[name][f"{MEAN}_t{t}"] or [(None, None)])[-1][1]
                              for t in settings.eval_timesteps}}
        if prompts:
            adherence_dir = out / "codecs" / name / "adherence"
            if (adherence_dir / "adherence.json").is_file():
                scored = json.loads((adherence_dir / "adherence.json").read_text())
            else:
                scored = generate_and_score(unet / "pipeline", GenerateStage(
                    prompts=prompts, images_per_prompt=settings.images_per_prompt, steps=settings.sample_steps,
                    guidance=settings.guidance, seed=settings.seed, sampler="dpm"), adherence_dir)
            entry["adherence"] = scored["conditional"]["percent"]
        results["codecs"][name] = entry
    results["race"] = race({name: c[MEAN] for name, c in curves.items()})
    plot_losses(curves, keys, out / "loss.png")
    write_text_atomically(out / "results.json", json.dumps(results, indent=2))
    write_text_atomically(out / "report.md", report_markdown(results))
    return results
