"""Shared fixtures: the tiny codec config and the bundled photos, built once per session."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from codec.common.distributed import reset_accelerate_state

# The suite runs with no network: nothing may wait on a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="session", autouse=True)
def store_cache(tmp_path_factory):
    """Bucket stores cache their chunks, and record indexes of tars and parquet their arrays, in the session temp
    folder, not in the home folder (shards/reader.py, codec/data/index.py)."""
    os.environ["LATENT_CODEC_STORE_CACHE"] = str(tmp_path_factory.mktemp("store-cache"))
    os.environ["LATENT_CODEC_INDEX_CACHE"] = str(tmp_path_factory.mktemp("index-cache"))


@pytest.fixture(scope="session")
def bundled_dir(tmp_path_factory) -> Path:
    from codec.data import bundled_photos

    root = tmp_path_factory.mktemp("bundled_photos")
    bundled_photos(root)
    return root


@pytest.fixture
def tiny_config(tmp_path, bundled_dir):
    """Build the tiny preset with test-specific overrides, writing into this test's tmp dir."""
    from codec.training.config import load_codec_config

    def make(*overrides: str):
        return load_codec_config(
            CONFIGS / "codec" / "tiny.yaml",
            [f"data.bundled_dir={bundled_dir}", f"train.output_dir={tmp_path / 'run'}", *overrides],
        )

    return make


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state; each in-process training run starts from a clean one."""
    reset_accelerate()
    yield
    reset_accelerate()


# A clean accelerate state between two in-process runs of one test.
reset_accelerate = reset_accelerate_state


class Killed(RuntimeError):
    """Stands for a process killed mid-run."""


@contextmanager
def killed_after_a_checkpoint(monkeypatch, train_module):
    """The run inside is killed right after its first checkpoint is written (train_module's save_checkpoint)."""
    real_save = train_module.save_checkpoint

    def save_then_die(accelerator, output_dir, step, keep, extra=None):
        real_save(accelerator, output_dir, step, keep, extra)
        raise Killed(f"killed after the checkpoint at step {step}")

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        yield
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    reset_accelerate()


def assert_same_safetensors(a_dir: Path, b_dir: Path, names) -> None:
    """Each named safetensors file holds the same tensors, bit for bit, under both folders."""
    import torch
    from safetensors.torch import load_file

    for name in names:
        a, b = load_file(a_dir / name), load_file(b_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"


# `accelerate launch` of two processes on this CPU-only machine: the code under test must make it a gloo group.
TWO_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch_env(site: Path | None = None, **extra: str) -> dict:
    """The environment of a two-process launch: one thread per process, ACCELERATE_USE_CPU unset (the entry point
    itself must make a CPU launch distribute), `extra` variables, and `site` (a folder with a sitecustomize.py
    that every process loads) first on PYTHONPATH."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("ACCELERATE_USE_CPU", None)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package), so a test calls its main(argv) in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def command(words: str):
    """`latent-codec <words> ...` in-process, as main(argv) -> exit status (argparse errors raise SystemExit(2))."""
    from latent_codec.cli import main

    return lambda argv: main([*words.split(), *map(str, argv)])


@pytest.fixture(scope="session")
def local_s3():
    """moto's S3 server on 127.0.0.1 for the session; its endpoint and keys are in os.environ meanwhile, so
    in-process clients and launched children reach it as they would reach any custom S3 endpoint."""
    from experiments.local_s3 import start_local_s3, stop_local_s3

    s3, server = start_local_s3()
    saved = {key: os.environ.get(key) for key in s3.env}
    os.environ.update(s3.env)
    try:
        yield s3
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_local_s3(server)
