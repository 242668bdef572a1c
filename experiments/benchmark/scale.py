"""The latent store at scale (issue 30): start-up and memory of the U-Net trainer and the encoder at 1M and 10M
records, latents read from a bucket (moto's S3 server on 127.0.0.1, the tests' stand-in) against a local folder,
and how long the small U-Net preset's training loop waits for data.

    python -m experiments.benchmark.scale --records 10000000 --out DIR    # this section alone: DIR/scale.md, .json
    python -m experiments.benchmark                                      # every section, this one included

What is measured:
- Start-up, in a fresh process per case, on a synthetic store of N records (synthetic_store.py: the encoder's own
  writer and finalisation, tiny 4x1x1 latents, units of 1,000 records). The U-Net trainer: from right after its
  imports to the first batch of training draws, through LatentShards, TrainingDraws and a DataLoader over a
  DrawSampler as diffusion/train.py builds them (no U-Net). The encoder: a resume into the store with all units
  committed but the last few (a lost node's leftovers), up to the start of its encode loop (encode_dataset's
  `setup_seconds`); its memory is the whole resume's (setup, the pending units, the manifest), and apart the
  setup's. Memory is the process's peak resident size above its resident size right after the imports (the import
  baseline; the peak is reset there through /proc/self/clear_refs). Targets: <= 30 s, <= 500 MB, and 1M vs 10M
  within 50 MB.
- Reading: a store of realistic latents (4x64x64, as for 512x512 images; chunks of ~250 records) from a local
  folder and from the bucket (cache empty, then warm), in the trainer's order (TrainingDraws over a DrawSampler,
  the preset's batch size and DataLoader workers), two epochs each: latents per second side by side.
- The wait for data: diffusion.train.train_unet itself runs a few steps of the preset from each store, with
  `iter(loader)` replaced by a timer of every `next(batches)`; the wait is reported as a % of the step time, in
  the loop and over a whole first epoch (the reads above: with the preset's 0 workers a batch is read in the loop's
  own thread, so the loop waits exactly as long as the reading takes).
- When a GPU is lent: the `sd`-shaped U-Net streaming from the bucket vs from local latents, step time within 5%
  (the same train_unet runs on CUDA; without CUDA the row says how to run it).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from experiments import CHECKOUT
from experiments.benchmark.common import UNET_CONFIG, progress
from experiments.benchmark.memory import _proc_status_mb
from experiments.benchmark.synthetic_store import BuiltStore, StoreSpec, build_store, resume_view

DEFAULT_CACHE = CHECKOUT / "runs" / "benchmark-scale"  # synthetic stores, kept between runs (3.3 GB)
SD_CONFIG = CHECKOUT / "configs" / "unet" / "sd.yaml"
# The start-up stores: tiny latents (4x1x1: the tiny codec at 8 px), the encoder's default unit and chunk sizes.
STARTUP_RESOLUTION = 8
STARTUP_CHUNK_BYTES = 64 << 20  # codec.shards.format.CHUNK_BYTES: one chunk per 1,000-record unit of tiny latents
PENDING_UNITS = 4  # units a lost node left for the encoder's resume
# The reading store: 4,000 latents of 4x64x64 (64 KB each with the log-variance) in units of 1,000; 16 MB chunks
# hold ~250 records, so the store has 16 chunks and the trainer's chunk-local order has something to order.
READ_SPEC = StoreSpec(records=4000, unit_size=1000, resolution=512, chunk_bytes=16 << 20)
TARGETS = {"startup_seconds": 30.0, "memory_mb": 500.0, "memory_spread_mb": 50.0, "wait_percent": 2.0,
           "gpu_step_percent": 5.0}
# The child processes: this module's own command line, run from the checkout.
CASE = [sys.executable, "-m", "experiments.benchmark.scale", "--case"]


@dataclass(frozen=True)
class ScalePlan:
    """What one run measures; the defaults are the issue's sizes (the test runs a tiny plan)."""

    records: tuple[int, ...] = (1_000_000, 10_000_000)  # start-up stores, smallest first
    unit_size: int = 1000
    read: StoreSpec = READ_SPEC
    preset: Path = UNET_CONFIG  # the U-Net preset whose batch size, workers, order and step are measured
    loop_steps: int = 4  # train_unet steps per store; the first is start-up, the rest are timed (>= 3)
    gpu_preset: Path = SD_CONFIG
    gpu_steps: int = 20


def quick_plan() -> ScalePlan:
    return ScalePlan(records=(100_000, 1_000_000), loop_steps=3)


# ---------------------------------------------------------------------------------------------------------------
# Start-up: one fresh process per case
# ---------------------------------------------------------------------------------------------------------------


def _reset_peak() -> bool:
    """Set VmHWM to the current resident size (Linux: "5" to /proc/self/clear_refs), so the peak measured from
    here on is not an import's transient. False where the kernel does not allow it: the peak then includes it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class ProcessMemory:
    """Resident memory from the import baseline on (memory.py reads /proc/self/status)."""

    def __init__(self):
        gc.collect()
        self.baseline_mb = _proc_status_mb("VmRSS")
        self.peak_reset = _reset_peak()

    def result(self) -> dict:
        peak = _proc_status_mb("VmHWM")
        return {"baseline_mb": self.baseline_mb, "peak_mb": peak, "peak_above_baseline_mb": peak - self.baseline_mb,
                "peak_reset_at_baseline": self.peak_reset}


def trainer_loader(shards, cfg):
    """The U-Net trainer's loader from draw 0, as diffusion/train.py builds it (before accelerate wraps it)."""
    from diffusion.train import training_loader

    return training_loader(shards, cfg, 0)


def trainer_case(store: str, preset: str) -> dict:
    """In a fresh process: seconds and memory from right after the imports to the first batch of training draws."""
    import torch  # noqa: F401
    from litdata import StreamingDataset  # noqa: F401  (the reader imports it on first read: an import, not work)

    import diffusion.train  # noqa: F401  (the trainer's module, as a training process has it imported)
    from codec.shards import LatentShards
    from diffusion.config import load_unet_config

    memory = ProcessMemory()
    tick = time.perf_counter()
    cfg = load_unet_config(preset)
    shards = LatentShards(store)
    batch = next(iter(trainer_loader(shards, cfg)))
    seconds = time.perf_counter() - tick
    return {"process": "U-Net trainer", "startup_seconds": seconds, "setup_peak_above_baseline_mb": None,
            "store_records": len(shards),
            "chunks": len(shards.chunk_sizes), "batch": len(batch["draw"]), "num_workers": cfg.train.num_workers,
            **memory.result()}


def encoder_case(codec: str, data: str, store: str, resolution: int, unit_size: int, chunk_bytes: int) -> dict:
    """In a fresh process: a resume of encode_dataset into `store`; start-up is from right after the imports to the
    encode loop, memory the whole resume's peak and, apart, the peak when the encode loop starts (the setup's)."""
    from codec.shards import encode

    memory = ProcessMemory()
    tick = time.perf_counter()
    timings, setup_peak = {}, []
    encode_units = encode._encode_units

    def peak_then_encode(*args, **kwargs):
        setup_peak.append(_proc_status_mb("VmHWM"))
        return encode_units(*args, **kwargs)

    called = time.perf_counter() - tick
    with mock.patch.object(encode, "_encode_units", peak_then_encode):
        manifest = encode.encode_dataset(codec, data, store, resolution=resolution, unit_size=unit_size,
                                         chunk_bytes=chunk_bytes, progress=False, timings=timings)
    return {"process": "encoder (resume)", "startup_seconds": called + timings["setup_seconds"],
            "chunks": sum(len(u["chunks"]) for u in manifest["units"]),
            **{key: timings[key] for key in ("setup_seconds", "encode_loop_seconds", "finalize_seconds")},
            "setup_peak_above_baseline_mb": setup_peak[0] - memory.baseline_mb, **memory.result()}


def run_case(case: dict) -> dict:
    """One case in a fresh `python -m experiments.benchmark.scale --case JSON` process; its last stdout line."""
    tick = time.perf_counter()
    done = subprocess.run([*CASE, json.dumps(case)], capture_output=True, text=True, cwd=CHECKOUT,
                          env=os.environ.copy())
    if done.returncode != 0:
        raise RuntimeError(f"scale case {case['kind']} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - tick}


def startup_specs(plan: ScalePlan) -> list[StoreSpec]:
    """The start-up stores: tiny latents, plan.records records each."""
    return [StoreSpec(records, plan.unit_size, STARTUP_RESOLUTION, STARTUP_CHUNK_BYTES) for records in plan.records]


def startup_rows(stores: list[BuiltStore], plan: ScalePlan) -> list[dict]:
    """Trainer and encoder start-up on each store, smallest first."""
    rows = []
    for built in stores:
        spec, records = built.spec, built.spec.records
        common = {"records": records, "units": spec.units}
        rows.append({**common, **run_case({"kind": "trainer", "store": str(built.store), "preset": str(plan.preset)})})
        progress(f"  trainer at {records:,}: {rows[-1]['startup_seconds']:.1f} s, "
                 f"+{rows[-1]['peak_above_baseline_mb']:.0f} MB")
        view = built.store.parent / "resume-view"
        pending = resume_view(built, view, min(PENDING_UNITS, spec.units - 1))
        try:
            encoder = run_case({"kind": "encoder", "codec": str(built.codec), "data": str(built.input),
                                "store": str(view), "resolution": spec.resolution, "unit_size": spec.unit_size,
                                "chunk_bytes": spec.chunk_bytes})
        finally:
            shutil.rmtree(view, ignore_errors=True)
        rows.append({**common, **encoder, "pending_units": len(pending)})
        progress(f"  encoder at {records:,}: {rows[-1]['startup_seconds']:.1f} s, "
                 f"+{rows[-1]['peak_above_baseline_mb']:.0f} MB")
    return rows


def startup_summary(rows: list[dict]) -> list[dict]:
    """Per process: the worst start-up and memory over the sizes, and the memory spread between the smallest and
    the largest store, each against its target."""
    summary = []
    for process in dict.fromkeys(row["process"] for row in rows):
        mine = sorted((row for row in rows if row["process"] == process), key=lambda row: row["records"])
        spread = mine[-1]["peak_above_baseline_mb"] - mine[0]["peak_above_baseline_mb"]
        worst_seconds = max(row["startup_seconds"] for row in mine)
        worst_mb = max(row["peak_above_baseline_mb"] for row in mine)
        summary.append({
            "process": process, "smallest": mine[0]["records"], "largest": mine[-1]["records"],
            "worst_startup_seconds": worst_seconds, "worst_memory_mb": worst_mb, "memory_spread_mb": spread,
            "startup_met": worst_seconds <= TARGETS["startup_seconds"], "memory_met": worst_mb <= TARGETS["memory_mb"],
            "spread_met": abs(spread) <= TARGETS["memory_spread_mb"],
        })
    return summary


# ---------------------------------------------------------------------------------------------------------------
# A bucket, and reading from it
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def s3_bucket(url: str | None):
    """`url` as given (a bucket the environment reaches), else a fresh bucket on moto's S3 server started on
    127.0.0.1 for the run (experiments/local_s3.py, as the tests start theirs), reached as any custom endpoint is:
    AWS_ENDPOINT_URL and the usual keys in os.environ while it runs."""
    if url is not None:
        yield url.rstrip("/")
        return
    from experiments.local_s3 import start_local_s3, stop_local_s3

    s3, server = start_local_s3()
    try:
        with mock.patch.dict(os.environ, s3.env):
            yield s3.new_bucket("scale")
    finally:
        stop_local_s3(server)


def upload(folder: Path, url: str) -> float:
    """Copy a local store to `url`, file by file; seconds taken."""
    from codec.shards.location import Location

    tick = time.perf_counter()
    target = Location(url)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        target.put(path, path.relative_to(folder).as_posix())
    return time.perf_counter() - tick


def read_epochs(shards, cfg, epochs: int) -> list[dict]:
    """Seconds of every batch the trainer's loader gives over `epochs` epochs, summarised per epoch."""
    batches = iter(trainer_loader(shards, cfg))
    per_epoch = math.ceil(len(shards) / cfg.train.batch_size)
    rows = []
    for epoch in range(1, epochs + 1):
        seconds = []
        for _ in range(per_epoch):
            tick = time.perf_counter()
            next(batches)
            seconds.append(time.perf_counter() - tick)
        total = sum(seconds)
        rows.append({"epoch": epoch, "batches": per_epoch, "latents": per_epoch * cfg.train.batch_size,
                     "seconds": total, "latents_per_s": per_epoch * cfg.train.batch_size / total,
                     "first_batch_seconds": seconds[0], "mean_batch_seconds": total / per_epoch,
                     "median_batch_seconds": statistics.median(seconds), "max_batch_seconds": max(seconds)})
    return rows


def read_rows(built: BuiltStore, bucket: str, preset: Path, cache_dir: Path) -> dict:
    """Two epochs in the trainer's order from the local store and from its copy in the bucket (chunk cache empty at
    the start), latents per second side by side."""
    from codec.shards import LatentShards
    from diffusion.config import load_unet_config

    cfg = load_unet_config(preset)
    rows = [{"store": "local folder", **row} for row in read_epochs(LatentShards(built.store), cfg, 2)]
    upload_seconds = upload(built.store, bucket)
    remote = LatentShards(bucket, cache_dir=str(cache_dir))
    rows += [{"store": "bucket (local S3 stand-in)", **row} for row in read_epochs(remote, cfg, 2)]
    for row in rows:
        local = next(r for r in rows if r["store"] == "local folder" and r["epoch"] == row["epoch"])
        row["ratio_to_local"] = row["latents_per_s"] / local["latents_per_s"]
    chunks = built.store.glob("chunk-*.bin")
    return {"rows": rows, "upload_seconds": upload_seconds, "batch_size": cfg.train.batch_size,
            "num_workers": cfg.train.num_workers, "shuffle_chunks": cfg.train.shuffle_chunks,
            "chunks": len(remote.chunk_sizes), "records_per_chunk": float(remote.chunk_sizes.mean()),
            "store_mb": sum(path.stat().st_size for path in chunks) / 2**20}


# ---------------------------------------------------------------------------------------------------------------
# The training loop's wait for data
# ---------------------------------------------------------------------------------------------------------------


class NextTimer:
    """Stands for `iter` in diffusion.train: wraps the loader's iterator and records when each next() starts and
    how long it takes."""

    def __init__(self):
        self.starts: list[float] = []
        self.waits: list[float] = []

    def __call__(self, iterable):
        inner = iter(iterable)

        def timed():
            while True:
                tick = time.perf_counter()
                try:
                    batch = next(inner)
                except StopIteration:
                    return
                self.starts.append(tick)
                self.waits.append(time.perf_counter() - tick)
                yield batch

        return timed()

    def summary(self) -> dict:
        """Step k's loop time is from its next() to the next step's. The first step (the loader's start-up and
        the first allocations) is left out; what remains is the steady loop."""
        if len(self.starts) < 3:
            raise RuntimeError(f"timed {len(self.starts)} batches of the training loop, need >= 3: does "
                               f"diffusion/train.py still take its batches with next(iter(loader))?")
        loop = [b - a for a, b in zip(self.starts[1:-1], self.starts[2:])]
        waits = self.waits[1:-1]
        compute = [step - wait for step, wait in zip(loop, waits)]
        return {"timed_steps": len(loop), "first_batch_seconds": self.waits[0],
                "step_seconds": statistics.median(compute), "loop_step_seconds": statistics.median(loop),
                "wait_seconds": sum(waits) / len(waits), "wait_percent_in_loop": 100 * sum(waits) / sum(loop)}


def loop_wait(preset: Path, codec: Path, store: str, steps: int, workdir: Path, cache_dir: Path | None = None) -> dict:
    """`steps` steps of diffusion.train.train_unet with `preset` on `store` (no validation, no checkpoints), every
    next(batches) of its loop timed."""
    from codec.common.distributed import reset_accelerate_state
    from codec.shards.reader import CACHE_VARIABLE
    from diffusion import train
    from diffusion.config import load_unet_config

    cfg = load_unet_config(preset)
    cfg.shards, cfg.codec = str(store), str(codec)
    cfg.train.output_dir, cfg.train.max_steps = str(workdir), steps
    cfg.train.validate_every = cfg.train.checkpoint_every = 0
    timer = NextTimer()
    env = {CACHE_VARIABLE: str(cache_dir)} if cache_dir is not None else {}
    reset_accelerate_state()  # another Accelerator may have run in this process
    try:
        with mock.patch.object(train, "iter", timer, create=True), mock.patch.dict(os.environ, env):
            train.train_unet(cfg)
    finally:
        reset_accelerate_state()
    return {"steps": steps, "batch_size": cfg.train.batch_size, "num_workers": cfg.train.num_workers,
            "device": "cuda" if _cuda() else "cpu", **timer.summary()}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def wait_rows(built: BuiltStore, bucket: str, plan: ScalePlan, reads: dict, workdir: Path) -> list[dict]:
    """The preset's loop from the local store and from the bucket (cache empty at the start): its step time, the
    wait in the loop, and the wait over a whole first epoch (the reads' mean batch seconds against the step)."""
    rows = []
    for name, store, cache in (("local folder", str(built.store), None),
                               ("bucket (local S3 stand-in)", bucket, workdir / "loop-cache")):
        progress(f"  {plan.preset.name}: {plan.loop_steps} training steps from the {name}")
        row = {"store": name, **loop_wait(plan.preset, built.codec, store, plan.loop_steps,
                                          workdir / f"run-{len(rows)}", cache)}
        epoch = next(r for r in reads["rows"] if r["store"] == name and r["epoch"] == 1)
        row["epoch_mean_batch_seconds"] = epoch["mean_batch_seconds"]
        row["wait_percent_epoch"] = 100 * epoch["mean_batch_seconds"] / row["step_seconds"]
        row["met"] = max(row["wait_percent_in_loop"], row["wait_percent_epoch"]) <= TARGETS["wait_percent"]
        rows.append(row)
        progress(f"    step {row['step_seconds']:.2f} s, wait {row['wait_percent_in_loop']:.2f}% in the loop, "
                 f"{row['wait_percent_epoch']:.2f}% over an epoch")
    return rows


def gpu_rows(built: BuiltStore, bucket: str, plan: ScalePlan, workdir: Path) -> dict:
    """Run it when a GPU is lent: the sd-shaped U-Net streaming from the bucket vs from local latents, loop step
    times (the wait included) within 5% of each other. Without CUDA, a status line saying so."""
    if not _cuda():
        return {"status": f"not measured: no CUDA device on this machine. Run `python -m experiments.benchmark.scale` "
                          f"where a GPU is lent: {plan.gpu_preset.name} then trains {plan.gpu_steps} steps from the "
                          f"local and from the bucket store and compares their step times (target within "
                          f"{TARGETS['gpu_step_percent']:.0f}%)"}
    local = loop_wait(plan.gpu_preset, built.codec, str(built.store), plan.gpu_steps, workdir / "gpu-local")
    remote = loop_wait(plan.gpu_preset, built.codec, bucket, plan.gpu_steps, workdir / "gpu-bucket",
                       workdir / "gpu-cache")
    slower = 100 * (remote["loop_step_seconds"] / local["loop_step_seconds"] - 1)
    return {"status": "measured", "preset": plan.gpu_preset.name, "local": local, "bucket": remote,
            "bucket_slower_percent": slower, "met": slower <= TARGETS["gpu_step_percent"]}


# ---------------------------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------------------------


def measure_scale(cache: Path = DEFAULT_CACHE, plan: ScalePlan | None = None, bucket: str | None = None) -> dict:
    """Every measurement of this section into one dict (report.py's scale_section renders it). Synthetic stores
    are built under `cache` once and reused; `bucket`: an s3:// URL to read from instead of a fresh bucket on a
    local moto server."""
    import litdata

    from experiments.benchmark.environment import environment

    plan = plan or ScalePlan()
    started = time.perf_counter()
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "environment": environment(),
                    "litdata": litdata.__version__, "targets": TARGETS, "preset": plan.preset.name,
                    "unit_size": plan.unit_size, "pending_units": PENDING_UNITS,
                    "startup_latent_shape": [4, 1, 1], "read_store": vars(plan.read)}
    progress("at scale: synthetic stores (built once, then reused)")
    tick = time.perf_counter()
    stores = [build_store(Path(cache), spec, progress) for spec in startup_specs(plan)]
    built = build_store(Path(cache), plan.read, progress)
    result["build_seconds"] = time.perf_counter() - tick
    progress("at scale: start-up and memory")
    result["startup"] = startup_rows(stores, plan)
    result["startup_summary"] = startup_summary(result["startup"])
    result["read_store"]["latent_shape"] = json.loads((built.store / "manifest.json").read_text())["latent_shape"]
    with tempfile.TemporaryDirectory() as tmp, s3_bucket(bucket) as url:
        remote = f"{url}/scale-{os.getpid()}-{int(time.time())}"
        progress("at scale: reading latents, local folder vs bucket")
        result["reads"] = read_rows(built, remote, plan.preset, Path(tmp) / "read-cache")
        progress("at scale: the training loop's wait for data")
        result["wait"] = wait_rows(built, remote, plan, result["reads"], Path(tmp))
        result["gpu"] = gpu_rows(built, remote, plan, Path(tmp))
    result["seconds"] = time.perf_counter() - started
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=10_000_000,
                   help="the largest store; start-up is also measured at a tenth of it (default 10,000,000)")
    p.add_argument("--unit-size", type=int, default=1000, help="records per unit of the start-up stores")
    p.add_argument("--out", type=Path, help="write scale.md and scale.json here (default: print the Markdown)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"synthetic stores, kept between runs "
                   f"(default {DEFAULT_CACHE.relative_to(CHECKOUT)})")
    p.add_argument("--steps", type=int, default=ScalePlan.loop_steps,
                   help="training steps per store for the wait (the first is not timed; >= 3)")
    p.add_argument("--bucket", help="an s3:// URL to read from (AWS_ENDPOINT_URL etc. from the environment) instead "
                   "of a fresh bucket on a moto server started on 127.0.0.1")
    # Internal: each start-up case runs in a fresh process of this command.
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        kind = case.pop("kind")
        print(json.dumps(trainer_case(**case) if kind == "trainer" else encoder_case(**case)), flush=True)
        return 0
    from experiments.benchmark.report import scale_section

    if args.steps < 3:
        raise SystemExit("--steps must be >= 3: the first step is start-up, and a step's time needs the next one")
    plan = ScalePlan(records=(max(args.records // 10, args.unit_size), args.records), unit_size=args.unit_size,
                     loop_steps=args.steps)
    result = measure_scale(args.cache, plan, args.bucket)
    text = scale_section(result, command=f"python -m experiments.benchmark.scale --records {args.records}")
    if args.out is None:
        print(text)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text(text + "\n")
    (args.out / "scale.json").write_text(json.dumps(result, indent=2))
    print(text)
    print(f"written to {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
