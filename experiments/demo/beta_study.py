"""The β trade-off, measured: codecs trained for one budget at β from the latent-diffusion value to above 1.

Each run is the codec trainer (codec.training.train) on the shapes world with the exact likelihood (loss.nll: exact), so
β = 1 is the article's VAE and its loss the negative ELBO. Every trained codec is then measured on held-out shapes
rendered from another seed:

- distortion: PSNR of posterior-mean reconstructions;
- rate: KL(q(z|x) || N(0, I)) in bits per image, what the latent carries about the image (Alemi et al., 2018);
- active channels: latent channels whose posterior mean varies with the image (Burda et al.'s active units:
  Var_x E_q[z] > 0.01, averaged over the channel's positions); the rest have collapsed onto the prior;
- prior samples: z ~ N(0, I) decoded. Unconditional: the share showing one shape of a palette colour at all
  (adherence.shows_one_shape). Conditional: the adherence to the condition, per attribute (adherence.score).

The runs and their budgets are listed in a YAML file (configs/beta_study.yaml); this module has no numbers of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from codec.common.atomic import save_figure, write_text_atomically
from codec.common.checkpoints import checkpoint_dirs, read_trainer_state
from codec.common.config import ConfigError, exit_status, from_dict, load_config
from codec.common.optim import OptimConfig, learning_rate
from experiments import CHECKOUT
from experiments.demo.adherence import ATTRIBUTES


@dataclass
class StudyRun:
    name: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class ShapesWorld:
    """The study's own shapes world, written at `shapes` when that folder does not hold it already: small images
    rendered at the study's resolution, so no training step decodes and resizes a large PNG."""
    count: int = 4000
    size: int = 32
    seed: int = 0


@dataclass
class ConvergedWithin:
    psnr_db: float = 0.5
    rate_fraction: float = 0.1  # of the earlier budget's rate, and never below rate_floor_bits
    rate_floor_bits: float = 1.0  # a CVAE's rate is a fraction of a bit: a tenth of it would be noise


@dataclass
class BetaStudyConfig:
    codec_config: str = "configs/codec/beta-study.yaml"
    shapes: str = "data/shapes"
    render: ShapesWorld | None = None  # null: `shapes` must exist (e.g. the demo's 512 px world)
    # Runs trained side by side, each in its own process with cores / workers threads: a network this small keeps
    # one core busy better than two (measured: two 1-thread runs make 1.4x the steps of one 2-thread run).
    workers: int = 1
    output_dir: str = "runs/beta-study"
    overrides: list[str] = field(default_factory=list)  # for every run, before its own
    heldout_count: int = 64
    heldout_seed: int = 1
    prior_samples: int = 64
    runs: list[StudyRun] = field(default_factory=list)
    only: list[str] = field(default_factory=list)  # names of the runs to do (empty: all), e.g. a shorter demo
    # More overrides for the named runs, after their own: e.g. a longer clock for one run, {cvae: [train.max_minutes=5]}
    run_overrides: dict[str, list[str]] = field(default_factory=dict)
    # A run has converged when doubling its budget moved its point of the trade-off by less than this: half the
    # separation the study must show between neighbouring β (1 dB or 20% of the rate).
    converged_within: ConvergedWithin = field(default_factory=ConvergedWithin)
    # true: a run with a warm-up-stable-decay step budget and no codec of half its steps is first trained to half (its
    # cool-down halved too), then on to its budget from the checkpoints both make alike: a study started from
    # nothing says whether each run converged, for the cost of the half's cool-down.
    halve_first: bool = False

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("runs: list at least one run (a name and its --set overrides)")
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise ConfigError(f"runs: names must differ, got {names}")
        unknown = [name for name in self.only if name not in names]
        if unknown:
            raise ConfigError(f"only: {unknown} are not runs of this study; its runs are {names}")
        strange = [name for name in self.run_overrides if name not in names]
        if strange:
            raise ConfigError(f"run_overrides: {strange} are not runs of this study; its runs are {names}")
        for run in self.runs:
            extra = self.run_overrides.get(run.name, [])
            if not isinstance(extra, list) or not all(isinstance(item, str) for item in extra):
                raise ConfigError(f"run_overrides: {run.name}: expected a list of key=value texts, got {extra!r}")
            run.overrides = [*run.overrides, *extra]
        if self.only:
            self.runs = [r for r in self.runs if r.name in self.only]
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")


def load_study_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> BetaStudyConfig:
    return load_config(BetaStudyConfig, path, overrides)


# ---------------------------------------------------------------------------------------------------------------
# Measures (pure functions of a codec and images)
# ---------------------------------------------------------------------------------------------------------------


def rate_bits(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, I)) per image, in bits: the rate of the posterior against the prior."""
    from codec.training.losses import kl_divergence

    return kl_divergence(mean.double(), logvar.double()) / math.log(2)


def plateau_slope(steps: list[int], losses: list[float], stable_end: int,
                  fraction: float = 0.25) -> tuple[float, float]:
    """The least-squares slope of the loss against step over the last `fraction` of the steps at a constant rate
    (up to `stable_end`, where the cool-down starts, or the run's last step when it has none), per 1,000 steps, and
    its standard error, widened for the correlation of neighbouring logs (AR(1) at lag 1). (nan, nan) with fewer than
    3 logs in the window. Reported, not a test of convergence: at a constant rate the weights' wander hides the
    slow descent a longer budget's cool-down then shows (doubling_check is the test)."""
    window = [(step, loss) for step, loss in zip(steps, losses) if stable_end * (1 - fraction) < step <= stable_end]
    if len(window) < 3:
        return float("nan"), float("nan")
    x = torch.tensor([step for step, _ in window], dtype=torch.float64) / 1000
    y = torch.tensor([loss for _, loss in window], dtype=torch.float64)
    x = x - x.mean()
    slope = (x * (y - y.mean())).sum() / (x * x).sum().clamp_min(1e-12)
    residual = y - y.mean() - slope * x
    stderr = (residual.pow(2).sum() / (len(window) - 2) / (x * x).sum().clamp_min(1e-12)).sqrt()
    rho = float((residual[1:] * residual[:-1]).sum() / residual.pow(2).sum().clamp_min(1e-12))
    rho = min(max(rho, 0.0), 0.9)  # anti-correlated logs would narrow it: never below the plain error
    return float(slope), float(stderr * math.sqrt((1 + rho) / (1 - rho)))


def doubling_check(budgets: dict[int, dict], within: ConvergedWithin) -> dict | None:
    """Whether a run's last budget (the largest key of `budgets`, steps -> {"psnr_db", "rate_bits"}) moved its point
    of the trade-off by less than `within` from the longest earlier budget with at most half its steps: the numbers
    the study reports no longer depend on how long it trained. None when no earlier budget is that short.

    Where both budgets carry "train_rec" (the training reconstruction loss at their end, training_reconstruction),
    it also gives how much that improved in dB, 10 log10(before / now): a held-out PSNR that stops while the
    training one still rises is a run learning its training set, not one that has nothing more to learn."""
    steps = max(budgets)
    earlier = [s for s in budgets if 2 * s <= steps]
    if not earlier:
        return None
    before, now = budgets[max(earlier)], budgets[steps]
    psnr_change = now["psnr_db"] - before["psnr_db"]
    rate_change = now["rate_bits"] - before["rate_bits"]
    rate_allowed = max(within.rate_fraction * before["rate_bits"], within.rate_floor_bits)
    check = {"from_steps": max(earlier), "psnr_change_db": psnr_change, "rate_change_bits": rate_change,
             "converged": bool(abs(psnr_change) <= within.psnr_db and abs(rate_change) <= rate_allowed)}
    if before.get("train_rec") and now.get("train_rec"):
        check["train_rec_gain_db"] = 10 * math.log10(before["train_rec"] / now["train_rec"])
    return check


def training_reconstruction(run_dir: Path, steps: int, fraction: float = 0.02) -> float | None:
    """The mean training reconstruction loss (loss/rec, per pixel element) a run logged over the last `fraction`
    of its `steps` (its last log when none falls there), from `run_dir`/history.jsonl: the same end-of-budget
    window for every budget, as one batch of 16 is noisy. None when the history has no such log."""
    from codec.common.logs import read_history

    logs = [(h["step"], h["loss/rec"]) for h in read_history(run_dir) if "loss/rec" in h and h["step"] <= steps]
    if not logs:
        return None
    window = [rec for step, rec in logs if step > steps * (1 - fraction)] or [logs[-1][1]]
    return sum(window) / len(window)


def stable_end(recorded: dict, steps: int) -> int:
    """The last step at the constant rate of a run recorded in codec_training.json: before its cool-down, if any."""
    cooldown = recorded["config"]["optim"].get("cooldown_steps", 0)
    return recorded["config"]["train"]["max_steps"] - cooldown if cooldown else steps


def active_channels(means: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent channels c with mean over positions of Var_x μ_c(x) above `threshold`; means: (N, C, h, w)."""
    variance = means.double().var(dim=0, unbiased=False).flatten(1).mean(1)
    return int((variance > threshold).sum())


@torch.no_grad()
def measure_codec(vae, images: torch.Tensor, conditions: torch.Tensor | None, prior_conditions: torch.Tensor | None,
                  prior_captions: list[str] | None, prior_count: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """The study's numbers for one codec on held-out `images` ((N, 3, H, W) in [-1, 1]), and its prior samples."""
    from codec.data import tensor_to_pil
    from codec.measurement.metrics import psnr
    from codec.network.model import decode_latents, encode_posterior, prior_latents
    from experiments.demo.adherence import score, shows_one_shape, summarise

    means, rates, psnrs = [], [], []
    for k in range(0, len(images), 32):
        x = images[k : k + 32]
        c = None if conditions is None else conditions[k : k + 32]
        posterior = encode_posterior(vae, x, c)
        recon = decode_latents(vae, posterior.mode(), c).clamp(-1, 1)
        means.append(posterior.mean)
        rates.append(rate_bits(posterior.mean, posterior.logvar))
        psnrs.append(psnr(x, recon))
    height, width = images.shape[2:]
    z = prior_latents(vae, prior_count, height, width, torch.Generator().manual_seed(seed))
    samples = decode_latents(vae, z, prior_conditions).clamp(-1, 1)
    pils = [tensor_to_pil(s) for s in samples]
    numbers = {
        "psnr_db": float(torch.cat(psnrs).mean()),
        "rate_bits": float(torch.cat(rates).mean()),
        "active_channels": active_channels(torch.cat(means)),
        "latent_channels": int(vae.config.latent_channels),
        "prior_one_shape_percent": 100.0 * sum(shows_one_shape(p) for p in pils) / len(pils),
    }
    if prior_captions is not None:
        summary = summarise([score(p, caption) for p, caption in zip(pils, prior_captions)])
        numbers["prior_adherence_percent"] = {a: summary["percent"][a] for a in (*ATTRIBUTES, "all")}
    return numbers, samples


# ---------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------


def heldout_shapes(count: int, seed: int, size: int) -> tuple[torch.Tensor, list[str]]:
    from codec.data import pil_to_tensor
    from experiments.demo.shapes import caption, render, scenes

    held = scenes(count, seed)
    return torch.stack([pil_to_tensor(render(s, size)) for s in held]), [caption(s) for s in held]


def run_study(cfg: BetaStudyConfig, root: Path) -> dict:
    """Train (or reuse) every run's codec, measure it, write results.json, report.md and the plots; returns results."""
    from codec.measurement.evaluate import save_png
    from codec.training.config import load_codec_config
    from experiments.demo.shapes import write_shapes_dataset

    out = root / cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    if cfg.render is not None:
        write_shapes_dataset(root / cfg.shapes, cfg.render.count, cfg.render.seed, cfg.render.size, progress=True)
    configs = {run.name: load_codec_config(root / cfg.codec_config, [
        f"data.train={json.dumps(str(root / cfg.shapes))}", f"train.output_dir={json.dumps(str(out / run.name))}",
        *cfg.overrides, *run.overrides]) for run in cfg.runs}
    to_train = [run.name for run in cfg.runs if not trained(out / run.name, configs[run.name].train)]
    if cfg.halve_first:
        halves = {name: half for name in to_train if (half := half_budget(configs[name], out / name)) is not None}
        for name, half in halves.items():
            set_aside_other_budget(out / name, half)
        train_runs(list(halves.values()), list(halves), cfg.workers)
    for name in to_train:
        set_aside_other_budget(out / name, configs[name])
    train_runs([configs[name] for name in to_train], to_train, cfg.workers)
    results = []
    heldout: dict[int, tuple[torch.Tensor, list[str]]] = {}  # by image size: rendered once, measured by every run
    for run in cfg.runs:
        codec_cfg = configs[run.name]
        final = out / run.name / "final"
        size = codec_cfg.data.val_size
        if size not in heldout:
            heldout[size] = heldout_shapes(cfg.heldout_count, cfg.heldout_seed, size)
        images, captions = heldout[size]
        numbers, samples = measure_export(final, images, captions, cfg.prior_samples, run.name)
        history = json.loads((final / "codec_training.json").read_text())
        loss = history["config"]["loss"]
        model = history["config"]["model"]
        condition = model["condition"]
        if condition != "none":  # runs recorded before the key were concatenations
            condition = f"{condition} ({model.get('condition_injection', 'concat')})"
        numbers.update(name=run.name, beta=loss["kl_weight"], schedule=schedule_text(loss), condition=condition,
                       latent="global" if model.get("global_latent") else "grid", steps=history["steps"])
        curve = loss_curve(out / run.name, images[0].numel())
        constant_until = stable_end(history, history["steps"])
        slope, stderr = plateau_slope(curve["step"], curve["loss"], constant_until)
        numbers.update(loss_curve=curve, cooldown_steps=history["steps"] - min(constant_until, history["steps"]),
                       plateau_slope=slope, plateau_stderr=stderr)
        # The same measures on the codecs its shorter budgets exported (set aside when it was trained on): how far
        # its numbers still move with the budget.
        exports = {steps: final for steps, final in earlier_exports(out / run.name).items() if steps < history["steps"]}
        budgets = {steps: measure_export(earlier, images, captions, cfg.prior_samples, run.name)[0]
                   for steps, earlier in exports.items()}
        budgets[history["steps"]] = numbers
        # Each budget's training reconstruction, from the history it ended with (set aside beside its codec).
        for steps, numbers_then in budgets.items():
            ended = exports[steps].parent if steps in exports else out / run.name
            numbers_then["train_rec"] = training_reconstruction(ended, steps)
        numbers["budgets"] = {str(steps): {key: budgets[steps][key] for key in BUDGET_KEYS}
                              for steps in sorted(budgets)}
        numbers["doubling"] = doubling_check(budgets, cfg.converged_within)
        save_png(_grid(samples[:16]), out / prior_file(run.name))
        results.append(numbers)
        print(f"  {run.name}: {_line(numbers)}", flush=True)
    summary = {"runs": results, "heldout": {"count": cfg.heldout_count, "seed": cfg.heldout_seed}}
    write_text_atomically(out / "results.json", json.dumps(summary, indent=2))
    plot_rate_distortion(results, out / "rate_distortion.png")
    plot_loss_curves(results, out / "loss_curves.png")
    plot_budgets(results, out / "budgets.png")
    write_text_atomically(out / "report.md", report_markdown(results, cfg))
    return summary


BUDGET_KEYS = ("psnr_db", "rate_bits", "prior_one_shape_percent", "train_rec")


def measure_export(final: Path, images: torch.Tensor, captions: list[str], prior_count: int,
                   name: str) -> tuple[dict, torch.Tensor]:
    """measure_codec on the codec exported at `final`, a conditional one given the held-out captions (and, for its
    prior samples, those captions in turn)."""
    from codec.network.conditional import TextConditions, is_conditional
    from codec.network.model import load_codec

    vae = load_codec(final, allow_conditional=True)
    conditions = prior_conditions = prior_captions = None
    if is_conditional(vae):
        if vae.config.condition != "text":
            raise ConfigError(f"run {name}: the study scores text-conditioned codecs only (prompts are captions)")
        text = TextConditions(vae.config.text_encoder, vae.config.text_max_length)
        prior_captions = [captions[k % len(captions)] for k in range(prior_count)]
        conditions, prior_conditions = text(captions), text(prior_captions)
    return measure_codec(vae, images, conditions, prior_conditions, prior_captions, prior_count)


def earlier_exports(run_dir: Path) -> dict[int, Path]:
    """The codecs a run exported for other budgets before it was trained on (set aside in
    <run>/superseded/<steps>-steps/final by set_aside_other_budget), by their steps."""
    found = {}
    for final in sorted((run_dir / "superseded").glob("*-steps/final")):
        record = final / "codec_training.json"
        if record.is_file() and (final / "config.json").is_file():
            found[json.loads(record.read_text())["steps"]] = final
    return dict(sorted(found.items()))


def trained(run_dir: Path, train) -> bool:
    """Whether the run's exported codec has its budget (a clock budget, once exported, has). A run given more steps
    than its codec was trained for is trained on (see set_aside_other_budget), so a longer budget extends a study
    instead of starting it again."""
    record = run_dir / "final" / "codec_training.json"
    if not (run_dir / "final" / "config.json").is_file() or not record.is_file():
        return False
    return bool(train.max_minutes) or json.loads(record.read_text())["steps"] >= train.max_steps


def half_budget(codec_cfg, run_dir: Path):
    """The run's budget halved, cool-down and all, where the doubling check will need it and the run has no codec of
    at least that many steps: None for a clock budget or a schedule without a cool-down (no longer budget repeats
    their steps), and for a run with such a codec already."""
    train, optim = codec_cfg.train, codec_cfg.optim
    if train.max_minutes or optim.cooldown_steps <= 0 or train.max_steps % 2 or optim.cooldown_steps % 2:
        return None
    half = train.max_steps // 2
    exported = set(earlier_exports(run_dir))
    record = run_dir / "final" / "codec_training.json"
    if record.is_file() and (run_dir / "final" / "config.json").is_file():
        exported.add(json.loads(record.read_text())["steps"])
    if any(half <= steps for steps in exported):
        return None
    return replace(codec_cfg, train=replace(train, max_steps=half),
                   optim=replace(optim, cooldown_steps=optim.cooldown_steps // 2))


def steps_in_common(old: OptimConfig, old_steps: int, new: OptimConfig, new_steps: int) -> int:
    """How many first steps two budgets make at the same learning rates (the rest of their schedules, β's
    included, follow the step alone): a checkpoint after at most that many steps is one of both runs."""
    for step in range(min(old_steps, new_steps)):
        if not math.isclose(learning_rate(step, old, old_steps), learning_rate(step, new, new_steps), rel_tol=1e-12):
            return step
    return min(old_steps, new_steps)


def set_aside_other_budget(run_dir: Path, codec_cfg) -> None:
    """Before a run exported for another budget trains on: its codec, and its checkpoints after the steps both
    budgets make alike (the last steps of a cool-down, say), move to <run>/superseded/<steps>-steps/ with a copy of
    its history, so the run resumes from the last checkpoint the new budget would also have made. Nothing is
    deleted."""
    record = run_dir / "final" / "codec_training.json"
    if not record.is_file():
        return  # nothing exported: an interrupted run, resumed as it is
    recorded = json.loads(record.read_text())
    old = from_dict(OptimConfig, recorded["config"]["optim"], "optim")  # keys it lacks (older runs) take defaults
    common = steps_in_common(old, recorded["config"]["train"]["max_steps"], codec_cfg.optim,
                             codec_cfg.train.max_steps)
    aside = run_dir / "superseded" / f"{recorded['steps']}-steps"
    (aside / "checkpoints").mkdir(parents=True, exist_ok=True)
    for checkpoint in checkpoint_dirs(run_dir):
        if read_trainer_state(checkpoint)["step"] > common:
            checkpoint.rename(aside / "checkpoints" / checkpoint.name)
    (run_dir / "final").rename(aside / "final")
    if (run_dir / "history.jsonl").is_file():  # the trainer drops the records after the step it resumes from
        shutil.copy2(run_dir / "history.jsonl", aside / "history.jsonl")
    print(f"  {run_dir.name}: {recorded['steps']} steps exported, {codec_cfg.train.max_steps} asked; "
          f"resuming after at most {common} steps (the rest set aside in {aside})", flush=True)


def train_runs(configs: list, names: list[str], workers: int) -> None:
    """Train each codec config (resuming from its latest checkpoint); with workers > 1, that many at a time, each in
    a fresh process with its share of the cores."""
    if workers == 1 or len(configs) <= 1:
        for codec_cfg, name in zip(configs, names):
            _train_one(codec_cfg, name, threads=None)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # torch's own thread count, not os.cpu_count(): it already follows the process's CPU affinity and OMP_NUM_THREADS
    threads = max(1, torch.get_num_threads() // workers)
    # The longest budget first (clock, then steps), so that the shorter runs fill the other workers meanwhile and all
    # end together.
    order = sorted(range(len(configs)), key=lambda k: (-(configs[k].train.max_minutes or 0.0),
                                                       -configs[k].train.max_steps))
    configs, names = [configs[k] for k in order], [names[k] for k in order]
    # spawn: a fresh interpreter per run, so no accelerate state or torch thread pool is inherited
    with ProcessPoolExecutor(max_workers=min(workers, len(configs)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in [pool.submit(_train_one, codec_cfg, name, threads) for codec_cfg, name in zip(configs, names)]:
            done.result()  # a failed run raises here, with its own traceback


def _train_one(codec_cfg, name: str, threads: int | None) -> None:
    from codec.common.distributed import reset_accelerate_state
    from codec.training.train import train_codec

    if threads is not None:
        torch.set_num_threads(threads)
    print(f"== beta study: {name}", flush=True)
    reset_accelerate_state()
    train_codec(codec_cfg, resume="latest")
    reset_accelerate_state()


def schedule_text(loss: dict) -> str:
    """How β moved, from a run's recorded loss config: "constant", "linear 0 -> 1 over 200 steps", ..."""
    if loss["kl_schedule"] == "linear":
        start = loss.get("kl_start_weight", 0.0)
        return f"linear {start:g} -> {loss['kl_weight']:g} over {loss['kl_warmup_steps']} steps"
    if loss["kl_schedule"] == "cyclical":
        return f"cyclical, {loss['kl_cycle_steps']} steps"
    return loss["kl_schedule"]


def prior_file(name: str) -> str:
    """prior_<name>.png with every character but letters, digits, '.' and '-' as '_' (Markdown links break on
    spaces)."""
    return "prior_" + re.sub(r"[^A-Za-z0-9.\-]", "_", name) + ".png"


def _grid(samples: torch.Tensor):
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid((samples.float().cpu() + 1) / 2, nrow=8, padding=2, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def _line(n: dict) -> str:
    text = (f"PSNR {n['psnr_db']:.2f} dB, rate {n['rate_bits']:.0f} bits/image, active channels "
            f"{n['active_channels']}/{n['latent_channels']}, prior one shape {n['prior_one_shape_percent']:.0f}%")
    if "prior_adherence_percent" in n:
        text += ", prior adherence " + "/".join(f"{n['prior_adherence_percent'][a]:.0f}" for a in ATTRIBUTES)
    return text


def loss_curve(run_dir: Path, pixels: int) -> dict:
    """A run's logged training loss in nats per image (the trainer logs it per pixel element), against step."""
    from codec.common.logs import read_history

    logs = [h for h in read_history(run_dir) if "loss/total" in h]
    return {"step": [h["step"] for h in logs], "loss": [h["loss/total"] * pixels for h in logs]}


def plot_loss_curves(results: list[dict], path: Path) -> Path:
    """Each run's training loss (β-weighted, nats per image) against step, whole (left) and over the last half of
    the run less its final value (right, linear): whether it had converged, which a whole curve on a log axis hides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (whole, end) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps, losses = r["loss_curve"]["step"], torch.tensor(r["loss_curve"]["loss"])
        if len(losses) >= 5:  # a running mean over 5 logs: single batches of 16 are noisy
            losses = torch.nn.functional.avg_pool1d(losses[None, None], 5, 1, 2, count_include_pad=False)[0, 0]
        line, = whole.plot(steps, losses.tolist(), label=r["name"], lw=1)
        half = [k for k, s in enumerate(steps) if s >= steps[-1] / 2] if steps else []
        if half:
            end.plot([steps[k] for k in half], (losses[half] - losses[-1]).tolist(), lw=1, color=line.get_color())
    whole.set(xlabel="step", ylabel="training loss, nats per image (β-weighted)", title="Training loss per run")
    whole.set_yscale("symlog", linthresh=100)
    whole.legend(fontsize=7)
    end.set(xlabel="step", ylabel="loss less its final value, nats per image",
            title="The last half of each run (running mean of 5 logs)")
    end.axhline(0, color="black", lw=0.5)
    for ax in (whole, end):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_budgets(results: list[dict], path: Path) -> Path:
    """Each run's held-out PSNR and rate against the steps of every budget it was measured at (log axis): a run
    has converged where its line goes flat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (distortion, rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        steps = [int(s) for s in r["budgets"]]
        distortion.plot(steps, [b["psnr_db"] for b in r["budgets"].values()], marker="o", lw=1, label=r["name"])
        rate.plot(steps, [max(b["rate_bits"], 1e-2) for b in r["budgets"].values()], marker="o", lw=1)
    distortion.set(xlabel="training steps (log)", ylabel="held-out PSNR (dB)", title="Distortion by budget")
    rate.set(xlabel="training steps (log)", ylabel="rate, bits per image (log)", title="Rate by budget")
    rate.set_yscale("log")
    distortion.legend(fontsize=7)
    ticks = sorted({int(s) for r in results for s in r["budgets"]})
    for ax in (distortion, rate):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_rate_distortion(results: list[dict], path: Path) -> Path:
    """Rate (bits per image, log axis) against distortion (PSNR), each point named by its run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        marker = "s" if r["condition"] != "none" else ("o" if r["schedule"] == "constant" else "^")
        ax.scatter(max(r["rate_bits"], 1e-2), r["psnr_db"], marker=marker, s=40)
        ax.annotate(r["name"], (max(r["rate_bits"], 1e-2), r["psnr_db"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xscale("log")
    ax.set(xlabel="rate: KL(q(z|x) || N(0, I)), bits per image (log)", ylabel="distortion: held-out PSNR (dB)",
           title="β trade-off on the shapes world (o constant, ^ annealed/cyclical, s conditional)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def doubling_text(doubling: dict | None, steps: int) -> str:
    if doubling is None:
        return "-"
    training = (f" (training {doubling['train_rec_gain_db']:+.2f} dB)" if "train_rec_gain_db" in doubling else "")
    return (f"{doubling['from_steps']} -> {steps}: {doubling['psnr_change_db']:+.2f} dB, "
            f"{doubling['rate_change_bits']:+.1f} bits{training}")


def report_markdown(results: list[dict], cfg: BetaStudyConfig) -> str:
    within = cfg.converged_within
    lines = [
        "# β trade-off on the shapes world", "",
        f"Codec preset `{cfg.codec_config}` on `{cfg.shapes}`, each run for the steps in its row; measured on "
        f"{cfg.heldout_count} held-out shapes (seed {cfg.heldout_seed}) and {cfg.prior_samples} prior samples.", "",
        "| run | β | schedule | condition | latent | steps (cool-down) | PSNR (dB) | rate (bits/image) | "
        "active channels | prior: one shape | prior adherence c/p/s/b | loss slope | last doubling | converged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        adherence = ("/".join(f"{r['prior_adherence_percent'][a]:.0f}" for a in ATTRIBUTES)
                     if "prior_adherence_percent" in r else "-")
        cooldown = f" ({r['cooldown_steps']})" if r["cooldown_steps"] else ""
        converged = "-" if r["doubling"] is None else "yes" if r["doubling"]["converged"] else "no"
        lines.append(f"| {r['name']} | {r['beta']:g} | {r['schedule']} | {r['condition']} | "
                     f"{r['latent']} | {r['steps']}{cooldown} | {r['psnr_db']:.2f} | {r['rate_bits']:.1f} | "
                     f"{r['active_channels']}/{r['latent_channels']} | "
                     f"{r['prior_one_shape_percent']:.0f}% | {adherence} | "
                     f"{r['plateau_slope']:+.0f} ± {r['plateau_stderr']:.0f} | "
                     f"{doubling_text(r['doubling'], r['steps'])} | {converged} |")
    lines += ["", f"Converged: the run's held-out PSNR moved by at most {within.psnr_db:g} dB and its rate by at most "
              f"{100 * within.rate_fraction:g}% (never less than {within.rate_floor_bits:g} bit) over its last "
              "doubling of steps: from the longest earlier budget with at most half its steps (set aside in "
              "<run>/superseded/) to its own; '-' when it has no such budget. In brackets, how much the training "
              "reconstruction improved over the same doubling (its mean squared error over the last 2% of each "
              "budget): a held-out PSNR that stops while this still rises is a run learning its training set. "
              "Loss slope: the least-squares slope of "
              "the training loss (nats per image, per 1,000 steps) over the last quarter of the steps at the "
              "constant learning rate (before the cool-down), ± its standard error (widened for neighbouring logs' "
              "correlation). It is no test of convergence: at a constant rate the weights improve by less than the "
              "loss's noise, and only a cool-down shows it (docs/generative-vae.md).", "",
              "![rate against distortion](rate_distortion.png)", "", "![PSNR and rate by budget](budgets.png)", "",
              "![training loss per run](loss_curves.png)", ""]
    lines += ["Prior samples, z ~ N(0, I) decoded (the CVAE's with the held-out captions), one grid per run:", ""]
    lines += [f"`{r['name']}`: ![prior samples of {r['name']}]({prior_file(r['name'])})" for r in results]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------

COMMAND_LINE = """The β trade-off on the shapes world: train one codec per run of --config (the budget
of `overrides`, a run's own in `run_overrides`), measure each.

    python -m experiments.demo.beta_study --config configs/beta_study.yaml
    python -m experiments.demo.beta_study --config configs/beta_study.yaml \\
        --set overrides='["train.max_steps=144000", "optim.cooldown_steps=16000", "optim.min_lr_ratio=0",
                          "train.keep_checkpoints=33"]'

Writes <output_dir>/results.json, report.md (the table), rate_distortion.png (rate in bits per image against held-out
PSNR, each point named), budgets.png (each run's PSNR and rate at every budget it was trained to), loss_curves.png and
prior_<run>.png (decoded z ~ N(0, I)). A run whose codec is already exported for its budget is measured again without
retraining; an interrupted one resumes from its latest checkpoint; one given more steps than it was trained for trains
on from the last checkpoint both budgets make alike (with optim.cooldown_steps, the start of its cool-down), its codec
and later checkpoints set aside in <run>/superseded/. Those earlier codecs are measured too: a run has converged when
its last doubling of steps moved its PSNR and rate by less than converged_within. The study renders its own shapes
world (render:) or reads `shapes`.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.demo.beta_study", description=COMMAND_LINE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CHECKOUT / "configs" / "beta_study.yaml"),
                   help="the study: codec preset, shapes folder, runs and their overrides "
                        "(default configs/beta_study.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the study config (YAML value), e.g. output_dir=runs/beta2; repeatable")
    args = p.parse_args(argv)

    def run() -> int:
        cfg = load_study_config(args.config, args.set)
        missing = not (CHECKOUT / cfg.shapes / "shapes.json").is_file() and not Path(cfg.shapes).is_dir()
        if cfg.render is None and missing:
            print(f"error: shapes {cfg.shapes}: no shapes world there; make it with python -m experiments.demo.shapes "
                  f"--out {cfg.shapes}", file=sys.stderr)
            return 2
        summary = run_study(cfg, CHECKOUT)
        print(f"wrote {CHECKOUT / cfg.output_dir}/report.md ({len(summary['runs'])} runs)")
        return 0

    return exit_status(run)


if __name__ == "__main__":
    raise SystemExit(main())
