"""experiments/benchmark/scale.py and synthetic_store.py: the at-scale section at a tiny size. Its structure and
the consistency of its numbers are checked here; what they are on this machine is docs/benchmark.md's (no
wall-clock assertions)."""

import json
import os

import pytest

from experiments.benchmark.synthetic_store import StoreSpec, build_store, resume_view
from tests.conftest import CONFIGS

# A store of tiny latents at test size: 30 units of 100 records, 4x1x1 latents, one chunk per unit.
SPEC = StoreSpec(records=3000, unit_size=100, resolution=8, chunk_bytes=64 << 20)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Where both tests keep their synthetic stores: the second reuses the first one's."""
    return tmp_path_factory.mktemp("scale-cache")


def test_a_synthetic_store_is_one_the_encoder_would_resume_and_verify_accepts(cache, tmp_path):
    from codec.shards import LatentShards
    from codec.shards.encode import encode_dataset
    from codec.shards.verify import verify_shards

    built = build_store(cache, SPEC)
    assert verify_shards(built.store, built.codec) == []
    shards = LatentShards(built.store)
    assert len(shards) == 3000 and shards.chunk_sizes.tolist() == [100] * 30
    assert shards[2999]["id"] == "000029.tar/000000099" and tuple(shards[0]["mean"].shape) == (4, 1, 1)
    # Built once: an equal spec reuses it, untouched.
    manifest = built.store / "manifest.json"
    written = manifest.stat().st_mtime_ns
    assert build_store(cache, SPEC).store == built.store and manifest.stat().st_mtime_ns == written

    # A lost node's leftovers: the resume check accepts the settings and only the missing units are encoded (each
    # of the input's tars holds one image).
    view = tmp_path / "view"
    assert resume_view(built, view, pending=3) == [27, 28, 29]
    resumed = encode_dataset(built.codec, built.input, view, resolution=8, unit_size=100, chunk_bytes=64 << 20,
                             num_workers=0, progress=False)
    assert resumed["settings"] == json.loads(manifest.read_text())["settings"]
    assert resumed["count"] == 27 * 100 + 3 and [u["records"] for u in resumed["units"][-4:]] == [100, 1, 1, 1]
    # Hard links only: the cached store is as it was.
    assert verify_shards(built.store, built.codec) == []


def test_the_section_at_a_tiny_size(cache):
    from experiments.benchmark.report import scale_section
    from experiments.benchmark.scale import TARGETS, ScalePlan, measure_scale

    read = StoreSpec(records=64, unit_size=16, resolution=64, chunk_bytes=4096)  # 4x8x8 latents, ~3 per chunk
    plan = ScalePlan(records=(3000,), unit_size=100, read=read, preset=CONFIGS / "unet" / "tiny.yaml", loop_steps=3)
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    result = measure_scale(cache, plan)  # its own bucket, on a moto server it starts and stops
    assert os.environ.get("AWS_ENDPOINT_URL") == endpoint  # the server's variables were the run's only

    # Start-up: each process once per size, in its own process, memory from the import baseline on.
    trainer, encoder = result["startup"]
    assert (trainer["process"], encoder["process"]) == ("U-Net trainer", "encoder (resume)")
    assert trainer["records"] == trainer["store_records"] == 3000 and trainer["chunks"] == 30
    assert trainer["batch"] == 8 and trainer["num_workers"] == 0  # tiny.yaml's loader
    assert encoder["pending_units"] == 4 and encoder["chunks"] == 30
    assert encoder["startup_seconds"] >= encoder["setup_seconds"] > 0
    assert 0 <= encoder["setup_peak_above_baseline_mb"] <= encoder["peak_above_baseline_mb"]
    assert trainer["setup_peak_above_baseline_mb"] is None  # its start-up is all it does: shown as "–"
    for row in result["startup"]:
        assert row["units"] == 30 and row["startup_seconds"] > 0 and row["process_seconds"] > row["startup_seconds"]
        assert row["peak_mb"] == pytest.approx(row["baseline_mb"] + row["peak_above_baseline_mb"])
        assert row["baseline_mb"] > 0 and row["peak_above_baseline_mb"] >= 0
    for summary, row in zip(result["startup_summary"], result["startup"]):
        assert summary["process"] == row["process"] and summary["smallest"] == summary["largest"] == 3000
        assert summary["memory_spread_mb"] == 0 and summary["worst_memory_mb"] == row["peak_above_baseline_mb"]
        assert summary["memory_met"] == (row["peak_above_baseline_mb"] <= TARGETS["memory_mb"])

    # Reading: two epochs of 8 batches of 8 from each store; the bucket's rates relative to the local ones.
    reads = result["reads"]
    assert [(r["store"], r["epoch"]) for r in reads["rows"]] == [
        ("local folder", 1), ("local folder", 2), ("bucket (local S3 stand-in)", 1), ("bucket (local S3 stand-in)", 2)]
    assert reads["chunks"] > 4 and reads["records_per_chunk"] == pytest.approx(64 / reads["chunks"])  # 4 units
    for row in reads["rows"]:
        assert row["batches"] == 8 and row["latents"] == 64
        assert row["latents_per_s"] == pytest.approx(64 / row["seconds"])
        assert row["max_batch_seconds"] >= row["median_batch_seconds"] > 0
        local = reads["rows"][row["epoch"] - 1]
        assert row["ratio_to_local"] == pytest.approx(row["latents_per_s"] / local["latents_per_s"])

    # The training loop: train_unet ran 3 steps from each store, the second one timed.
    for row, store in zip(result["wait"], ("local folder", "bucket (local S3 stand-in)")):
        assert row["store"] == store and row["steps"] == 3 and row["timed_steps"] == 1 and row["device"] == "cpu"
        assert row["loop_step_seconds"] == pytest.approx(row["step_seconds"] + row["wait_seconds"])
        assert row["wait_percent_in_loop"] == pytest.approx(100 * row["wait_seconds"] / row["loop_step_seconds"])
        epoch = next(r for r in reads["rows"] if r["store"] == store and r["epoch"] == 1)
        assert row["wait_percent_epoch"] == pytest.approx(100 * epoch["mean_batch_seconds"] / row["step_seconds"])
    assert result["gpu"]["status"].startswith("not measured: no CUDA device")

    # The Markdown section: every placeholder filled, a row per measurement.
    text = scale_section(result, "python -m experiments.benchmark.scale --records 3000")
    assert text.startswith("## The latent store at scale") and "{" not in text and "}" not in text
    assert "\n| U-Net trainer | 3,000 | 30 | " in text and "\n| bucket (local S3 stand-in) | 2 | " in text
