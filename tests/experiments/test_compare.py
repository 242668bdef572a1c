"""The codec A/B: its arithmetic on made-up curves, then the whole command on two tiny codecs and a tiny world."""

import json

import pytest
import torch

from codec.network.model import build_autoencoder
from codec.training.config import load_codec_config
from experiments.compare.__main__ import main
from experiments.compare.report import curve, race, steps_to_reach
from experiments.demo.shapes import write_shapes_dataset
from tests.conftest import CONFIGS


def test_steps_to_reach_interpolates_between_evaluations():
    points = [(0, 1.0), (100, 0.6), (200, 0.4), (300, 0.3)]
    assert steps_to_reach(points, 0.5) == pytest.approx(150.0)  # halfway from 0.6 at 100 to 0.4 at 200
    assert steps_to_reach(points, 0.3) == 300.0
    assert steps_to_reach(points, 1.5) == 0.0
    assert steps_to_reach(points, 0.2) is None


def test_a_repeated_evaluation_keeps_its_last_value():
    history = [{"step": 0, "val/denoising_loss": 1.0}, {"step": 10, "loss": 0.9},
               {"step": 100, "val/denoising_loss": 0.7}, {"step": 100, "val/denoising_loss": 0.6}]
    assert curve(history) == [(0, 1.0), (100, 0.6)]


def test_the_race_is_run_to_the_worst_codecs_final_loss():
    curves = {"plain": [(0, 1.0), (100, 0.6), (200, 0.5)], "eq": [(0, 1.0), (50, 0.5), (100, 0.4), (200, 0.3)]}
    result = race(curves)
    assert result["worst"] == "plain" and result["bar"] == 0.5
    assert result["steps_to_bar"] == {"plain": 200.0, "eq": 50.0}
    assert result["fraction_of_slowest"] == {"plain": 1.0, "eq": 0.25}


@pytest.fixture(scope="module")
def two_codecs(tmp_path_factory):
    root = tmp_path_factory.mktemp("codecs")
    model = load_codec_config(CONFIGS / "codec" / "tiny.yaml").model
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        build_autoencoder(model).save_pretrained(root / name / "final", safe_serialization=True)
    return root


def test_the_ab_writes_its_report_and_continues_where_it_stopped(two_codecs, tmp_path, capsys):
    world = write_shapes_dataset(tmp_path / "shapes", count=20, seed=0, size=64, progress=False)
    out = tmp_path / "ab"
    argv = ["--codec", f"a={two_codecs / 'a' / 'final'}", "--codec", str(two_codecs / "b" / "final"),
            "--data", str(world), "--steps", "4", "--eval-every", "2", "--heldout", "4", "--out", str(out),
            "--unet-config", "configs/unet/tiny.yaml", "--set", "train.batch_size=4",
            "--adherence-prompts", "2", "--images-per-prompt", "1", "--sample-steps", "2", "--analysis-images", "4"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["codecs"]) == ["a", "b"] and results["settings"]["train_images"] == 16
    for name, codec in results["codecs"].items():
        assert [step for step, _ in codec["curve"]] == [0, 2, 4]
        assert set(codec["final_at"]) == {"100", "500", "900"}
        assert codec["analysis"]["images"] == 4 and 0 <= codec["adherence"]["color"] <= 100
        run = json.loads((out / "codecs" / name / "unet" / "pipeline" / "unet_training.json").read_text())
        assert run["shards"]["records"] == 16  # the held-out images were never trained on
    # Both U-Nets start from the same weights and see the same examples: at step 0 only the latents differ.
    assert results["race"]["steps_to_bar"][results["race"]["worst"]] == 4.0
    report = (out / "report.md").read_text()
    assert "| a |" in report and "| b |" in report and "loss.png" in report
    assert (out / "loss.png").stat().st_size > 1000 and (out / "spectrum.png").stat().st_size > 1000

    # A re-run finds every stage complete and gives the same results; other settings are refused, not mixed in.
    capsys.readouterr()
    assert main(argv) == 0
    assert "$ " not in capsys.readouterr().out  # no command was run again
    assert json.loads((out / "results.json").read_text()) == results
    assert main([*argv[:-1], "3"]) == 2  # --analysis-images 3
    assert "other settings" in capsys.readouterr().err
