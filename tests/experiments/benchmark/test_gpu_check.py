import json
import math
import subprocess
import sys

import pytest
import torch

from codec.common.logs import append_history
from experiments.benchmark.gpu_check import CheckPlan, non_finite_history, prepare_output, run_gpu_check
from tests.conftest import ROOT, reset_accelerate


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_gpu_check_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark.gpu_check", "--out", str(tmp_path / "check")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "check").exists()  # refused before touching anything


def test_the_check_runs_every_stage_and_reports_finite_numbers(tmp_path):
    """The same code the GPU runs, on the tiny presets: codec (bf16, GAN past disc_start), shards, U-Net, sampling."""
    reset_accelerate()
    try:
        finite, text = run_gpu_check(tmp_path / "check", CheckPlan.tiny())
    finally:
        reset_accelerate()
    assert finite, text
    record = json.loads((tmp_path / "check" / "gpu_check.json").read_text())
    stages = record["stages"]
    assert [s["stage"].split(",")[0] for s in stages] == ["codec tiny", "encode shards", "U-Net tiny", "text-to-image"]
    assert all(s["finite"] and s["seconds"] > 0 and not s["problems"] for s in stages)
    assert (tmp_path / "check" / "gpu_check.md").read_text() == text
    assert (tmp_path / "check" / "generated.png").is_file()
    assert record["environment"]["plan"]["codec_steps"] == 4


def test_non_finite_logged_numbers_are_found(tmp_path):
    append_history(tmp_path, {"step": 1, "loss": 0.5})
    append_history(tmp_path, {"step": 2, "loss": math.nan, "lr": 1e-4})
    append_history(tmp_path, {"step": 3, "loss/d": math.inf})
    assert non_finite_history(tmp_path) == ["step 2: loss=nan", "step 3: loss/d=inf"]


def test_a_folder_that_is_not_an_earlier_check_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an earlier GPU check"):
        prepare_output(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    prepare_output(tmp_path / "again")
    (tmp_path / "again" / "old.txt").write_text("x")
    prepare_output(tmp_path / "again")  # an earlier check's folder is wiped
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["gpu_check.json"]
