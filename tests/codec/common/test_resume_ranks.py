"""`--resume` on several processes: every rank resolves the same checkpoint, or every rank refuses."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

import codec.common.checkpoints as checkpoints
from codec.common.checkpoints import resolve_resume, resume_disagreement
from codec.common.config import ConfigError
from codec.training.train import train_codec
from tests.conftest import CONFIGS, ROOT, TWO_PROCESSES, launch_env


def _checkpoint(output_dir: Path, step: int) -> Path:
    path = output_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    return path


def test_disagreement_names_what_each_rank_found_and_agreement_passes():
    at_4 = {"name": "step_00000004", "step": 4, "error": None}
    fresh = {"name": None, "step": 0, "error": None}
    assert resume_disagreement("latest", [at_4, dict(at_4)]) is None
    message = resume_disagreement("latest", [at_4, fresh, at_4])
    assert message == (
        "--resume latest: the processes resolved different checkpoints (rank 0: step_00000004 (step 4), rank 1: no "
        "checkpoint (fresh start), rank 2: step_00000004 (step 4)). Resume needs a shared filesystem: every node "
        "must see the same train.output_dir (or the same --resume path)")
    assert "\n" not in message


def _two_ranks(monkeypatch, other: dict) -> SimpleNamespace:
    """An accelerator of 2 processes whose gather returns this rank's finding (rank 0) and `other` (rank 1)."""
    monkeypatch.setattr(checkpoints, "gather_object", lambda mine: [*mine, other])
    return SimpleNamespace(num_processes=2)


def test_ranks_that_agree_resume_and_one_rank_missing_the_checkpoint_makes_every_rank_refuse(tmp_path, monkeypatch):
    path = _checkpoint(tmp_path, 6)
    agreeing = _two_ranks(monkeypatch, {"name": "step_00000006", "step": 6, "error": None})
    assert resolve_resume(tmp_path, "latest", None, agreeing) == (path, 6)

    # Rank 1's node has no such folder: rank 0 found it, and still refuses, as rank 1 does (the same list).
    missing = {"name": None, "step": 0, "error": f"FileNotFoundError: --resume {path}: no complete checkpoint there "
                                                 f"(trainer_state.json missing)"}
    with pytest.raises(ConfigError, match=r"rank 0: step_00000006 \(step 6\), rank 1: error \(FileNotFoundError"):
        resolve_resume(tmp_path, str(path), None, _two_ranks(monkeypatch, missing))

    # Rank 0 is the one missing it: it takes part in the gather instead of raising alone, then refuses.
    found = {"name": "step_00000006", "step": 6, "error": None}
    with pytest.raises(ConfigError, match=r"rank 0: error \(FileNotFoundError.*rank 1: step_00000006 \(step 6\)"):
        resolve_resume(tmp_path, str(tmp_path / "elsewhere"), None, _two_ranks(monkeypatch, found))


def test_the_same_error_on_every_rank_stays_that_error(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    error = f"FileNotFoundError: --resume {gone}: no complete checkpoint there (trainer_state.json missing)"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint there"):
        resolve_resume(tmp_path, str(gone), None, _two_ranks(monkeypatch, {"name": None, "step": 0, "error": error}))


# Loaded by every process of the launch below (via PYTHONPATH): process 1 runs on a node that does not see the
# first node's disk, so its output_dir holds no checkpoint.
OWN_DISK = '''
import os
if os.environ.get("RANK") == "1":
    import codec.common.checkpoints as checkpoints
    checkpoints.checkpoint_dirs = lambda output_dir: []
'''


def test_two_processes_that_see_different_checkpoints_both_refuse_to_resume(tiny_config, fresh_accelerate_state,
                                                                             tmp_path):
    """Without a shared filesystem, rank 0 would resume step 2 and rank 1 start at 0: they would run different
    numbers of steps and one would wait in an all-reduce for good. Both refuse with the reason, and exit."""
    run = tmp_path / "run"
    train_codec(tiny_config("train.max_steps=2", "train.batch_size=1", "train.checkpoint_every=2"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    shutil.rmtree(run / "final")  # so that a run that went on would show by exporting again

    (tmp_path / "own_disk").mkdir()
    (tmp_path / "own_disk" / "sitecustomize.py").write_text(OWN_DISK)
    env = launch_env(tmp_path / "own_disk")
    bundled = tiny_config().data.bundled_dir
    cmd = [*TWO_PROCESSES, "-m", "latent_codec", "codec", "train", "--config", str(CONFIGS / "codec" / "tiny.yaml"),
           "--max-steps", "4",
           "--resume", "latest", "--set", f"data.bundled_dir={bundled}", "--set", "train.batch_size=1",
           "--set", "train.checkpoint_every=2", "--set", "train.validate_every=0", "--out", str(run)]
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the launcher stops its workers too (SIGKILL would leave them hanging)
            raise AssertionError(f"the 2-process resume hung: {proc.communicate()[1][-2000:]}") from None

    refusal = ("error: --resume latest: the processes resolved different checkpoints (rank 0: step_00000002 "
               "(step 2), rank 1: no checkpoint (fresh start)). Resume needs a shared filesystem")
    assert proc.returncode != 0 and stderr.count(refusal) == 2, stdout[-2000:] + stderr[-3000:]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]  # nothing trained
    assert not (run / "final").exists()
