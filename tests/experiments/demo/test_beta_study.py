"""The β study's measures against their closed forms, and a three-run study end to end on tiny data."""

import json
import math
from pathlib import Path

import pytest
import torch

from codec.network.model import encode_posterior, load_codec
from experiments.demo.adherence import shows_one_shape
from experiments.demo.beta_study import (
    ConvergedWithin,
    active_channels,
    doubling_check,
    heldout_shapes,
    load_study_config,
    plateau_slope,
    prior_file,
    rate_bits,
    run_study,
    stable_end,
)
from experiments.demo.shapes import render, scenes
from tests.conftest import ROOT


def test_rate_is_the_kl_in_bits():
    mean = torch.tensor([[[[1.0]], [[0.0]]]])  # one image, two latent numbers
    logvar = torch.tensor([[[[0.0]], [[math.log(4.0)]]]])
    nats = 0.5 * (1.0 + 1 - 1 - 0) + 0.5 * (0 + 4 - 1 - math.log(4.0))
    assert rate_bits(mean, logvar).item() == pytest.approx(nats / math.log(2), rel=1e-6)  # computed in fp32
    assert rate_bits(torch.zeros(3, 4, 2, 2), torch.zeros(3, 4, 2, 2)).tolist() == [0.0, 0.0, 0.0]


def test_active_channels_counts_channels_whose_mean_varies_with_the_image():
    g = torch.Generator().manual_seed(0)
    means = torch.zeros(500, 4, 2, 2)
    means[:, 0] = torch.randn(500, 2, 2, generator=g)  # variance 1: active
    means[:, 1] = 0.05 * torch.randn(500, 2, 2, generator=g)  # variance 0.0025: collapsed
    means[:, 2] = 3.0  # constant: collapsed
    means[:, 3] = 0.2 * torch.randn(500, 2, 2, generator=g)  # variance 0.04: active
    assert active_channels(means) == 2


def test_plateau_slope_reads_the_constant_rate_steps_before_the_cool_down_with_its_error():
    steps = list(range(25, 9001, 25))
    wobble = [(-1.0) ** (s // 25) * 30.0 for s in steps]  # alternating logs: no correlation to widen the error by
    # Falling until 4,000, flat (with noise) at the constant rate up to 8,000, then a cool-down that drops it again.
    losses = [(1000.0 - 0.25 * s if s < 4000 else 0.0 if s <= 8000 else -(s - 8000) * 0.5) + w
              for s, w in zip(steps, wobble)]
    slope, stderr = plateau_slope(steps, losses, stable_end=8000)  # the window is 6,000-8,000
    assert abs(slope) <= 2 * stderr and stderr == pytest.approx(30 / math.sqrt(sum(
        (s / 1000 - 7.0125) ** 2 for s in steps if 6000 < s <= 8000)), rel=0.02)
    # Without the cool-down's start the window is 6,750-9,000: the drop makes it fall, far beyond its error.
    slope, stderr = plateau_slope(steps, losses, stable_end=9000)
    assert slope < -100 and abs(slope) > 2 * stderr
    line = plateau_slope(steps, [-3.0 * s for s in steps], 8000)
    assert line == (pytest.approx(-3000.0), pytest.approx(0.0, abs=1e-6))
    assert math.isnan(plateau_slope([25], [1.0], 25)[0])
    record = {"config": {"optim": {"cooldown_steps": 2000}, "train": {"max_steps": 18000}}}
    assert stable_end(record, 18000) == 16000
    assert stable_end({"config": {"optim": {}, "train": {"max_steps": 20000}}}, 1560) == 1560


def test_doubling_check_compares_the_last_budget_with_the_longest_at_most_half_as_long():
    within = ConvergedWithin(psnr_db=0.5, rate_fraction=0.1, rate_floor_bits=1.0)
    # The β = 1 run of the study at 9,000 / 18,000 / 36,000 steps: +3.25 dB over the last doubling, not converged.
    budgets = {9000: {"psnr_db": 32.19, "rate_bits": 67.0}, 18000: {"psnr_db": 33.94, "rate_bits": 58.0},
               36000: {"psnr_db": 37.19, "rate_bits": 58.0}}
    check = doubling_check(budgets, within)
    assert check["from_steps"] == 18000 and not check["converged"]
    assert check["psnr_change_db"] == pytest.approx(3.25) and check["rate_change_bits"] == pytest.approx(0.0)
    # Within 0.5 dB and 10% of the rate (5.8 of 58 bits): 5.7 bits less is converged, 6.1 bits more is not.
    budgets[36000] = {"psnr_db": 34.3, "rate_bits": 58.0 - 5.7}
    assert doubling_check(budgets, within)["converged"]
    budgets[36000]["rate_bits"] = 58.0 + 6.1
    assert not doubling_check(budgets, within)["converged"]
    # A budget less than twice as long is no doubling: 30,000 compares with 9,000, the longest at most half of it.
    assert doubling_check({9000: budgets[9000], 18000: budgets[18000],
                           30000: {"psnr_db": 33.0, "rate_bits": 60.0}}, within)["from_steps"] == 9000
    assert doubling_check({18000: budgets[18000], 30000: budgets[18000]}, within) is None
    assert doubling_check({36000: budgets[36000]}, within) is None
    # A CVAE's rate of a tenth of a bit: the 1-bit floor, not 10% of it, bounds its change.
    cvae = {9000: {"psnr_db": 28.37, "rate_bits": 0.1}, 18000: {"psnr_db": 28.05, "rate_bits": 0.6}}
    assert doubling_check(cvae, within) == {"from_steps": 9000, "psnr_change_db": pytest.approx(-0.32),
                                            "rate_change_bits": pytest.approx(0.5), "converged": True}
    # β 1e-6 from 36,000 to 72,000 steps: held-out -0.47 dB while the training reconstruction's mean squared error
    # fell from 5.97e-4 to 3.22e-4, 10 log10(5.97 / 3.22) = +2.681 dB: converged, by learning its training set.
    memorised = {36000: {"psnr_db": 37.31, "rate_bits": 155.0, "train_rec": 5.97e-4},
                 72000: {"psnr_db": 36.84, "rate_bits": 169.0, "train_rec": 3.22e-4}}
    check = doubling_check(memorised, within)
    assert check["converged"] and check["train_rec_gain_db"] == pytest.approx(2.681, abs=1e-3)
    memorised[36000]["train_rec"] = None  # a budget whose history has no reconstruction logged: no training gain
    assert "train_rec_gain_db" not in doubling_check(memorised, within)


def test_training_reconstruction_is_the_mean_over_the_last_part_of_the_budget(tmp_path):
    from experiments.demo.beta_study import training_reconstruction

    assert training_reconstruction(tmp_path, 100) is None  # no history
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps({"step": k, "loss/rec": float(k)}) + "\n" for k in range(1, 201)))
    assert training_reconstruction(tmp_path, 100) == pytest.approx(99.5)  # steps 99 and 100: the last 2%
    assert training_reconstruction(tmp_path, 200, fraction=0.05) == pytest.approx(195.5)  # 191..200
    # Logs every 10 steps and none in the window: the last log before the budget's end.
    history.write_text("".join(json.dumps({"step": k, "loss/rec": float(k)}) + "\n" for k in range(10, 100, 10)))
    assert training_reconstruction(tmp_path, 100) == pytest.approx(90.0)


def test_one_shape_holds_for_real_shapes_and_not_for_noise():
    held = scenes(56, 7)
    assert sum(shows_one_shape(render(s, 64)) for s in held) >= 55
    # at the study's 32 px too: measured 198 of 200 real images (97% of 400 of another seed)
    assert sum(shows_one_shape(render(s, 32)) for s in scenes(200, 7)) >= 194
    rng = torch.Generator().manual_seed(0)
    noise = (torch.rand(20, 64, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()
    assert not any(shows_one_shape(n) for n in noise)
    two = render(held[0], 64)
    pixels = __import__("numpy").asarray(two).copy()
    pixels[2:12, 2:12] = (245, 245, 245) if held[0].color != "white" else (230, 30, 30)  # a second object colour
    assert not shows_one_shape(pixels)


def test_a_three_run_study_measures_the_rate_and_writes_its_table_plot_and_prior_grids(tmp_path):
    shapes = tmp_path / "shapes"  # the study writes its own world there, and trains two runs at a time
    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({
        "codec_config": str(ROOT / "configs/codec/beta-study.yaml"), "shapes": str(shapes),
        "render": {"count": 24, "size": 32, "seed": 0}, "workers": 2,
        "output_dir": str(tmp_path / "out"), "heldout_count": 8, "prior_samples": 8,
        "overrides": ["train.max_steps=2", "optim.warmup_steps=0", "train.batch_size=4", "data.crop_size=32",
                      "data.resize=32", "data.val_size=32", "data.val_count=2", "train.checkpoint_every=0",
                      "data.num_workers=0", "train.log_every=1",
                      "train.latent_stats_images=4", "model.block_out_channels=[8,8,16,16]", "model.norm_num_groups=4"],
        "runs": [{"name": "small", "overrides": ["loss.kl_weight=1e-6"]},
                 {"name": "large", "overrides": ["loss.kl_weight=1000"]},
                 {"name": "cvae", "overrides": ["model.global_latent=false", "model.condition=text",
                                                "model.condition_channels=4"]}]}))
    summary = run_study(load_study_config(study), ROOT)
    assert json.loads((shapes / "shapes.json").read_text())["count"] == 24
    small, large, cvae = summary["runs"]
    assert small["beta"] == 1e-6 and cvae["condition"] == "text (film)" and small["steps"] == cvae["steps"] == 2
    # The rate is the posterior's KL in bits, averaged over the held-out images (closed form on the exported codec)...
    images, _ = heldout_shapes(8, load_study_config(study).heldout_seed, 32)
    with torch.no_grad():
        posterior = encode_posterior(load_codec(tmp_path / "out" / "small" / "final"), images)
    mean, logvar = posterior.mean.double(), posterior.logvar.double()
    nats = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    assert small["rate_bits"] == pytest.approx((nats / math.log(2)).mean().item(), rel=1e-6)
    # ... and it falls as β rises: two steps from one initialisation, β 1e-6 -> 1e3 (measured 4.21 -> 3.01 bits).
    assert large["rate_bits"] < 0.85 * small["rate_bits"], (small["rate_bits"], large["rate_bits"])
    for r in (small, large, cvae):
        assert r["rate_bits"] > 0 and 0 <= r["active_channels"] <= 4 and r["psnr_db"] > 0
    assert "prior_adherence_percent" in cvae and "prior_adherence_percent" not in small
    out = tmp_path / "out"
    assert (out / "rate_distortion.png").stat().st_size > 1000 and (out / "prior_cvae.png").is_file()
    assert (out / "loss_curves.png").stat().st_size > 1000 and len(small["loss_curve"]["step"]) >= 1
    assert prior_file("cvae beta=1") == "prior_cvae_beta_1.png"
    report = (out / "report.md").read_text()
    assert "| small | 1e-06 | constant | none | global | 2 |" in report and "| cvae | 1 |" in report
    assert small["latent"] == "global" and cvae["latent"] == "grid"
    # A second call reuses the exported codecs and measures the same numbers.
    again = run_study(load_study_config(study), ROOT)
    assert again["runs"][0]["psnr_db"] == small["psnr_db"]


def test_run_overrides_extend_the_named_runs_and_unknown_names_are_refused():
    from codec.common.config import ConfigError

    cfg = load_study_config(ROOT / "configs/beta_study.yaml",
                            ['only=["beta=1", "cvae"]', 'run_overrides={cvae: ["train.max_minutes=2.5"]}'])
    runs = {r.name: r.overrides for r in cfg.runs}
    assert runs["beta=1"] == ["loss.kl_weight=1"] and runs["cvae"][-1] == "train.max_minutes=2.5"
    with pytest.raises(ConfigError, match=r"run_overrides: \['cvea'\] are not runs of this study"):
        load_study_config(ROOT / "configs/beta_study.yaml", ['run_overrides={cvea: ["train.max_minutes=2.5"]}'])


def test_a_longer_budget_extends_the_runs_from_their_checkpoints_to_the_same_codec(tmp_path):
    """A study trained for 2 steps at a constant rate, given 4 with a cool-down over the last 2, then 6: each time it
    trains on from the last checkpoint both budgets make alike (the 4-step codec and its cooled-down 4th step set
    aside) and ends with the codec a 6-step study trains from scratch."""
    def study(name: str, steps: int, cooldown: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({
            "codec_config": str(ROOT / "configs/codec/beta-study.yaml"), "shapes": str(tmp_path / "shapes"),
            "render": {"count": 24, "size": 32, "seed": 0}, "output_dir": str(tmp_path / name),
            "heldout_count": 4, "prior_samples": 4,
            "overrides": [f"train.max_steps={steps}", "optim.warmup_steps=0", f"optim.cooldown_steps={cooldown}",
                          f"optim.min_lr_ratio={0.0 if cooldown else 1.0}", "train.batch_size=4", "data.val_count=2",
                          "train.checkpoint_every=1", "train.log_every=1", "train.latent_stats_images=4",
                          "model.block_out_channels=[8,8,16,16]", "model.norm_num_groups=4"],
            "runs": [{"name": "b", "overrides": ["loss.kl_weight=1"]}]}))
        return path

    runs = [run_study(load_study_config(study("extended", steps, cooldown)), ROOT)["runs"][0]
            for steps, cooldown in ((2, 0), (4, 2), (6, 2))]
    fresh = run_study(load_study_config(study("fresh", 6, 2)), ROOT)["runs"][0]
    assert [r["steps"] for r in runs] == [2, 4, 6] and fresh["steps"] == 6
    extended = runs[-1]
    assert extended["psnr_db"] == pytest.approx(fresh["psnr_db"], abs=1e-6) != pytest.approx(runs[1]["psnr_db"])
    assert extended["rate_bits"] == pytest.approx(fresh["rate_bits"], rel=1e-6)
    assert extended["loss_curve"] == fresh["loss_curve"]  # the history read as the run that went on logged it
    # The 4-step budget's 4th step had a lower rate than the 6-step one's: set aside with its codec, nothing deleted.
    aside = tmp_path / "extended" / "b" / "superseded" / "4-steps"
    assert (aside / "final" / "config.json").is_file() and (aside / "checkpoints" / "step_00000004").is_dir()
    assert [json.loads(line)["step"] for line in (aside / "history.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not (aside / "checkpoints" / "step_00000003").exists()
    # Every budget's codec is measured again beside the last: the 4-step one as the 4-step study measured it.
    assert list(extended["budgets"]) == ["2", "4", "6"] and fresh["budgets"].keys() == {"6"}
    assert extended["budgets"]["4"]["psnr_db"] == pytest.approx(runs[1]["psnr_db"], abs=1e-6)
    assert extended["doubling"]["from_steps"] == 2 and fresh["doubling"] is None
    assert extended["doubling"]["psnr_change_db"] == pytest.approx(extended["psnr_db"] - runs[0]["psnr_db"], abs=1e-6)
    # Each budget's training reconstruction is read from the history it ended with: the 2-step one from the history
    # set aside with its codec, the 6-step one from the run's own.
    def logged_rec(history: Path, step: int) -> float:
        return next(h["loss/rec"] for h in map(json.loads, history.read_text().splitlines()) if h["step"] == step)

    b = tmp_path / "extended" / "b"
    assert extended["budgets"]["2"]["train_rec"] == pytest.approx(logged_rec(b / "superseded/2-steps/history.jsonl", 2))
    assert extended["budgets"]["6"]["train_rec"] == pytest.approx(logged_rec(b / "history.jsonl", 6))
    assert extended["doubling"]["train_rec_gain_db"] == pytest.approx(
        10 * math.log10(extended["budgets"]["2"]["train_rec"] / extended["budgets"]["6"]["train_rec"]))
    report = (tmp_path / "extended" / "report.md").read_text()
    assert "| 2 -> 6: " in report and " bits (training " in report
    assert (tmp_path / "extended" / "budgets.png").stat().st_size > 1000


def test_halve_first_trains_half_the_budget_then_goes_on_so_a_study_from_nothing_has_its_doubling(tmp_path):
    """halve_first: a 4-step budget with a 2-step cool-down is first trained to 2 steps (cool-down 1), then on to 4
    from the checkpoint both make alike: the same two codecs a 2-step and a 4-step study train from scratch, so the
    doubling check has its half."""
    def study(name: str, steps: int, cooldown: int, halve_first: bool) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({
            "codec_config": str(ROOT / "configs/codec/beta-study.yaml"), "shapes": str(tmp_path / "shapes"),
            "render": {"count": 24, "size": 32, "seed": 0}, "output_dir": str(tmp_path / name),
            "heldout_count": 4, "prior_samples": 4, "halve_first": halve_first,
            "overrides": [f"train.max_steps={steps}", "optim.warmup_steps=0", f"optim.cooldown_steps={cooldown}",
                          "optim.min_lr_ratio=0.0", "train.batch_size=4", "data.val_count=2",
                          "train.checkpoint_every=1", "train.log_every=1", "train.latent_stats_images=4",
                          "model.block_out_channels=[8,8,16,16]", "model.norm_num_groups=4"],
            "runs": [{"name": "b", "overrides": ["loss.kl_weight=1"]}]}))
        return path

    halved = run_study(load_study_config(study("halved", 4, 2, True)), ROOT)["runs"][0]
    two, four = (run_study(load_study_config(study(f"fresh{n}", n, n // 2, False)), ROOT)["runs"][0] for n in (2, 4))
    assert list(halved["budgets"]) == ["2", "4"] and halved["doubling"]["from_steps"] == 2
    assert halved["psnr_db"] == pytest.approx(four["psnr_db"], abs=1e-6) != pytest.approx(two["psnr_db"])
    assert halved["budgets"]["2"]["psnr_db"] == pytest.approx(two["psnr_db"], abs=1e-6)
    assert halved["budgets"]["2"]["rate_bits"] == pytest.approx(two["rate_bits"], rel=1e-6)
    assert four["doubling"] is None  # without halve_first a study from nothing has one budget
    # Run again, the study has both codecs and trains nothing: the same numbers.
    again = run_study(load_study_config(study("halved", 4, 2, True)), ROOT)["runs"][0]
    assert again["budgets"] == halved["budgets"]


def test_steps_in_common_are_those_before_either_cool_down_starts():
    from codec.common.optim import OptimConfig
    from experiments.demo.beta_study import steps_in_common

    constant = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=1.0)
    cooled = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, cooldown_steps=1000)
    assert steps_in_common(constant, 4000, cooled, 9000) == 4000
    assert steps_in_common(cooled, 9000, cooled, 18000) == 8001  # step 8000 is the first below lr in the 9,000
    assert steps_in_common(OptimConfig(lr=1.0), 4000, OptimConfig(lr=1.0), 8000) == 1  # cosine: apart at once
