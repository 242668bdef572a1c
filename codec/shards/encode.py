"""Encode a dataset once with the frozen codec into a latent store, so diffusion trains without the encoder.

    accelerate launch -m latent_codec shards encode --codec runs/codec/final --data photos/ --out shards/
    latent-codec shards encode --codec C --data 's3://bucket/laion/{00000..09999}.tar' --out s3://bucket/latents

The input is cut into units (codec.data.InputSource: one per tar or parquet file, blocks of --unit-size files of an
image folder or rows of a saved dataset), and each unit becomes its own chunks and commit record in the store
(format.py). The units not yet committed are dealt round-robin over the processes, so a re-run after a lost node
redoes only what is missing, with at most one unit more on one process than on another. What a unit holds depends
only on its input and the settings (random crops are keyed by the record's id), never on which process, worker
or run encoded it: a resumed or re-dealt encode writes the same bytes an uninterrupted one would. Given the same
number of threads per process: CPU convolutions sum in a thread-count dependent order, which moves float32
latents by ~1e-6 and can flip the last float16 bit.

Image decoding, resizing and cropping run in DataLoader workers (one unit per worker at a time) while the main
thread encodes. The file format is in format.py, the checker in verify.py, the reader in reader.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from codec.common import distributed
from codec.common.atomic import write_text_atomically
from codec.common.draws import keyed_generator
from codec.data import InputSource, InputUnit, UnreadableImage, decode_image, pil_to_tensor, resize_shorter_side
from codec.data.crops import mirror_caption
from codec.exchange.pipeline import NORM_KEYS
from codec.measurement.latent_stats import latent_sums, stats_from_sums
from codec.network.fast import prepare_for_inference
from codec.network.model import (
    codec_identity,
    encode_posterior,
    encoder_identity,
    latent_shape,
    load_codec,
    norm_from_stats,
    norm_mode,
)
from codec.shards.format import (
    CHUNK_BYTES,
    FORMAT,
    MANIFEST,
    REJECTS,
    StoreIndex,
    UnitRecords,
    committed_units,
    publish,
    read_manifest,
    read_unit_record,
    unit_entry,
    write_unit,
)
from codec.shards.location import Location

CROPS = ("center", "random")
# What a random crop's drawn mirror does to a record (see `mirrored_record`); a center crop never mirrors ("none").
FLIPS = ("swap-left-right", "uncaptioned-only", "none")
# Settings that decide a unit's contents: a resumed run must match all of them. `precision` is one: bf16 moves
# the means by ~1.6% (relative RMS, tests/codec/shards/test_encode_scale.py), so a resume in another
# precision would mix two encodings of one dataset. `source` is the input's kind, unit names and caption source.
SETTING_KEYS = ("codec_identity", "resolution", "crop", "flip", "seed", "unit_size", "limit", "source",
                "latent_shape", "precision", "chunk_bytes")
# Recorded in settings and manifest but not compared on resume: the codec identity already fixes it. It lets a
# decoder-only fine-tune of the codec use the latents (codec/shards/reader.py codec_mismatch).
ENCODER_KEY = "encoder_identity"
# The encoder's autocast dtype per --precision (None: no autocast). The store holds float16 either way.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger(__name__)


def process_state(timeout_minutes: float = distributed.DEFAULT_TIMEOUT_MINUTES) -> PartialState:
    """Process index/count from accelerate (see codec.common.distributed for the CPU multi-process pitfall)."""
    return distributed.process_state("each process would encode every unit", timeout_minutes)


# ---------------------------------------------------------------------------------------------------------------
# Per-image work, run in DataLoader workers
# ---------------------------------------------------------------------------------------------------------------


def crop_position(resized_w: int, resized_h: int, resolution: int, crop: str, seed: int,
                  key: str) -> tuple[int, int, bool]:
    """(left, top, flip) of the resolution x resolution crop. Random crops draw from a generator keyed by
    (seed, the record's id), so a record's crop is the same whichever process, worker, run or unit layout encodes
    it, and wherever its data is stored. `flip` is
    the drawn mirror, drawn whatever the --flip policy; `mirrored_record` decides whether it is applied."""
    if crop == "center":
        return (resized_w - resolution) // 2, (resized_h - resolution) // 2, False
    generator = keyed_generator("encode-crop", seed, key)
    left = int(torch.randint(resized_w - resolution + 1, (1,), generator=generator))
    top = int(torch.randint(resized_h - resolution + 1, (1,), generator=generator))
    flip = bool(torch.rand((), generator=generator) < 0.5)
    return left, top, flip


def flip_policy(crop: str, flip: str | None) -> str:
    """The --flip policy a run records: None means swap-left-right for random crops; center crops never mirror."""
    if flip is not None and flip not in FLIPS:
        raise ValueError(f"--flip {flip!r}: expected one of {FLIPS}")
    if crop == "center":
        if flip not in (None, "none"):
            raise ValueError(f"--flip {flip!r} needs --crop random: a center crop is never mirrored")
        return "none"
    return FLIPS[0] if flip is None else flip


def mirrored_record(drawn: bool, caption: str, policy: str) -> tuple[bool, str]:
    """(mirror the pixels?, the caption to store with them) for a record whose crop drew `drawn`.

    A mirror is applied only where the stored caption can stay true: "swap-left-right" mirrors the caption's side
    words with the pixels (mirror_caption), "uncaptioned-only" mirrors only records without a caption, "none"
    never mirrors. Unlike keeping the caption (what random crops did before --flip), none of these lets "a red
    circle at the top left" label a circle at the top right."""
    if not drawn or policy == "none" or (policy == "uncaptioned-only" and caption.strip()):
        return False, caption
    return True, mirror_caption(caption)


@dataclass(frozen=True)
class Framing:
    """How every record is cut and mirrored: the part of the settings a DataLoader worker needs."""

    resolution: int
    crop: str
    seed: int
    flip: str

    def prepare(self, record: dict) -> dict:
        """One input record -> pixels ready to encode with their bookkeeping, or a reject with its reason."""
        base = {"row": record["row"], "id": record["id"], "source": record.get("source")}
        if "reject" in record:
            return dict(base, reject=record["reject"])
        try:
            img = decode_image(record["image"], min_side=self.resolution)
        except UnreadableImage as exc:
            return dict(base, reject=exc.reason, source=exc.source or base["source"])
        width, height = img.size
        resized = resize_shorter_side(img, self.resolution)
        rw, rh = resized.size
        left, top, drawn = crop_position(rw, rh, self.resolution, self.crop, self.seed, record["id"])
        pixels = pil_to_tensor(resized.crop((left, top, left + self.resolution, top + self.resolution)))
        caption = record["caption"]
        flip, stored = mirrored_record(drawn, "" if caption is None else caption, self.flip)
        return dict(base, pixels=pixels.flip(-1) if flip else pixels, caption=stored,
                    caption_missing=caption is None, caption_mirrored=caption is not None and stored != caption,
                    original_size=(height, width), resized_size=(rh, rw),
                    crop_box=(left, top, left + self.resolution, top + self.resolution), flip=flip)


def collate_records(unit: int, items: list[dict], last: bool) -> dict:
    """Stack the readable images of a batch and pass rejects through, so one broken file costs one record."""
    kept = [item for item in items if "reject" not in item]
    rejects = [{"unit": unit, "row": i["row"], "id": i["id"], "source": i["source"], "reason": i["reject"]}
               for i in items if "reject" in i]
    pixels = torch.stack([item.pop("pixels") for item in kept]) if kept else None
    return {"unit": unit, "last": last, "pixels": pixels, "records": kept, "rejects": rejects}


class UnitBatches(IterableDataset):
    """This process's units as batches, each unit read whole by one DataLoader worker (worker w of W takes units
    w, w + W, ...), in input order; a unit's last batch says so, even when it is empty."""

    def __init__(self, source: InputSource, units: list[InputUnit], framing: Framing, batch_size: int):
        self.source, self.units, self.framing, self.batch_size = source, units, framing, batch_size

    def __iter__(self):
        worker = get_worker_info()
        mine = self.units if worker is None else self.units[worker.id :: worker.num_workers]
        for unit in mine:
            batch = []
            for record in self.source.records(unit):
                batch.append(self.framing.prepare(record))
                if len(batch) == self.batch_size:
                    yield collate_records(unit.number, batch, last=False)
                    batch = []
            yield collate_records(unit.number, batch, last=True)


# ---------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------


def _posterior_as_stored(vae, pixels: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar) of a batch as a shard stores them (float16, CPU), the encoder run under autocast to `dtype`
    (None: float32)."""
    autocast = nullcontext() if dtype is None else torch.autocast(pixels.device.type, dtype=dtype)
    with torch.inference_mode(), autocast:
        posterior = encode_posterior(vae, pixels)
    return posterior.mean.half().cpu(), posterior.logvar.half().cpu()


def _non_finite_rows(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Rows with an inf or NaN, after the cast to float16 (so |value| > 65504 counts too)."""
    return ~(torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(logvar).flatten(1).all(1))


def encode_batch(vae, pixels: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    """float16 (mean, logvar) of a batch, the rows re-encoded in float32, and the rows still not finite.

    SD-style VAEs overflow float16 on some images (activations past 65504 become inf, then NaN): those rows are
    taken from a float32 encode of the same batch, which is what a float32 run would have stored for them. Rows not
    finite even in float32 are for the caller to reject, never to store. (The pipeline's finite_or_fp32 redoes a
    whole call instead: it has no rows to reject.)"""
    mean, logvar = _posterior_as_stored(vae, pixels, dtype)
    bad = _non_finite_rows(mean, logvar)
    upcast = bad.clone() if dtype is not None else torch.zeros_like(bad)
    if upcast.any():
        mean32, logvar32 = _posterior_as_stored(vae, pixels, None)
        rows = bad.view(-1, *[1] * (mean.dim() - 1))
        mean, logvar = torch.where(rows, mean32, mean), torch.where(rows, logvar32, logvar)
        bad = _non_finite_rows(mean, logvar)
    return mean, logvar, upcast, bad


NON_FINITE_REASON = ("the codec's latents are not finite (inf or NaN, or |value| > 65504, the float16 maximum) even "
                     "encoded in float32; check the codec on this image")


@dataclass
class UnitBuilder:
    """Collects a unit's encoded batches until its last one."""

    means: list = field(default_factory=list)
    logvars: list = field(default_factory=list)
    records: list = field(default_factory=list)
    rejects: list = field(default_factory=list)
    upcast_ids: list = field(default_factory=list)

    def add(self, batch: dict, vae, device, dtype: torch.dtype | None) -> None:
        """Encode one batch; records whose latents are not finite become rejects."""
        records, rejects = batch["records"], list(batch["rejects"])
        if batch["pixels"] is not None:
            mean, logvar, upcast, bad = encode_batch(vae, batch["pixels"].to(device, torch.float32), dtype)
            self.upcast_ids += [r["id"] for r, u in zip(records, upcast.tolist()) if u]
            rejects += [{"unit": batch["unit"], "row": r["row"], "id": r["id"], "source": r["source"],
                         "reason": NON_FINITE_REASON} for r, b in zip(records, bad.tolist()) if b]
            records = [r for r, b in zip(records, bad.tolist()) if not b]
            self.means.append(mean[~bad])
            self.logvars.append(logvar[~bad])
        self.records.extend(records)
        self.rejects.extend(sorted(rejects, key=lambda r: r["row"]))

    def build(self, latent: tuple[int, int, int]) -> UnitRecords:
        def ints(key, dtype, width):
            return torch.tensor([r[key] for r in self.records], dtype=dtype).reshape(len(self.records), *width)

        empty = torch.zeros((0, *latent), dtype=torch.float16)
        return UnitRecords(
            mean=torch.cat(self.means) if self.means else empty,
            logvar=torch.cat(self.logvars) if self.logvars else empty,
            original_size=ints("original_size", torch.int32, (2,)),
            resized_size=ints("resized_size", torch.int32, (2,)),
            crop_box=ints("crop_box", torch.int32, (4,)),
            flip=ints("flip", torch.uint8, ()),
            row=ints("row", torch.int64, ()),
            ids=[r["id"] for r in self.records],
            captions=[r["caption"] for r in self.records],
        )


def _commit(store: Location, unit: InputUnit, builder: UnitBuilder, settings: dict) -> None:
    if builder.upcast_ids:
        log.warning("unit %s: %d image(s) gave non-finite latents in %s and were re-encoded in fp32 (any still not "
                    "finite are in %s): %s", unit.name, len(builder.upcast_ids), settings["precision"], REJECTS,
                    ", ".join(builder.upcast_ids))
    records = builder.build(tuple(settings["latent_shape"]))
    info = {
        "settings": settings,
        "name": unit.name,
        "rejects": builder.rejects,
        "captions_missing": sum(bool(r["caption_missing"]) for r in builder.records),
        "captions_mirrored": sum(bool(r["caption_mirrored"]) for r in builder.records),
        "sums": latent_sums(records.mean, records.logvar),
    }
    write_unit(store, unit.number, records, info, settings["chunk_bytes"])


def _encode_units(vae, source: InputSource, units: list[InputUnit], framing: Framing, settings: dict,
                  store: Location, batch_size: int, num_workers: int, device, progress: tqdm) -> float:
    """Encode and commit `units` (this process's share). Returns the seconds the encoder sat waiting for the
    data workers' next batch."""
    if not units:
        return 0.0
    dtype = PRECISIONS[settings["precision"]]
    by_number = {unit.number: unit for unit in units}
    loader = DataLoader(UnitBatches(source, units, framing, batch_size), batch_size=None,
                        num_workers=min(num_workers, len(units)), pin_memory=torch.device(device).type == "cuda")
    builders: dict[int, UnitBuilder] = {}
    waited, batches = 0.0, iter(loader)
    while True:
        tick = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - tick
        if batch is None:
            break
        builder = builders.setdefault(batch["unit"], UnitBuilder())
        builder.add(batch, vae, device, dtype)
        progress.update(len(batch["records"]) + len(batch["rejects"]))
        if batch["last"]:
            _commit(store, by_number[batch["unit"]], builders.pop(batch["unit"]), settings)
    return waited


# ---------------------------------------------------------------------------------------------------------------
# Resume: what is done, what is left, who does it
# ---------------------------------------------------------------------------------------------------------------


def _mismatch(found: dict, settings: dict, where: str, store: Location) -> None:
    for key in SETTING_KEYS:
        if found.get(key) != settings[key]:
            raise ValueError(
                f"--out {store} already holds latents made with {key}={found.get(key)!r} ({where}), but this run "
                f"has {key}={settings[key]!r}. Resuming would mix incompatible latents: pass a new --out, or delete "
                f"{store} to start over")


def check_resumable(store: Location, settings: dict) -> set[int]:
    """Units already committed in the store; refuses when the store was made with other settings (checked
    against the manifest, or the first committed unit: finalising checks every unit again)."""
    if store.exists(MANIFEST):
        _mismatch(read_manifest(store)["settings"], settings, MANIFEST, store)
    done = committed_units(store)
    if done:
        first = min(done)
        _mismatch(read_unit_record(store, first)["info"]["settings"], settings, f"unit {first}", store)
    return done


def deal(pending: list[int], process: int, processes: int) -> list[int]:
    """This process's share of the pending units, dealt round-robin: shares differ by at most one unit, whichever
    units an earlier run left undone."""
    return pending[process::processes]


def remove_stale_temps(store: Location) -> None:
    """Temp folders of unit writes a kill interrupted (a local store only: a bucket has no partial objects)."""
    if store.remote:
        return
    for entry in os.scandir(store.root):
        if entry.name.startswith(".tmp-unit-") and entry.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Finalising
# ---------------------------------------------------------------------------------------------------------------


def finalize(store: Location, settings: dict, vae, codec_dir: str, data: str, source: InputSource,
              started: set[int]) -> tuple[dict, int]:
    """Main process, after every unit is committed: write litdata's index, the manifest (checksums, counts,
    statistics) and the rejects. Returns the manifest and the number of images read by this run."""
    units, sums, rejected, missing, mirrored, new_images = [], [], 0, 0, 0, 0
    gathered = StoreIndex()
    with ThreadPoolExecutor(16 if store.remote else 1) as pool:  # a bucket answers many small GETs at once
        # A few hundred commit records at a time, each dropped once counted: 10k of them would hold 10k copies of
        # litdata's record layout.
        for start in range(0, len(source.units), 256):
            part = source.units[start : start + 256]
            for unit, record in zip(part, pool.map(lambda u: read_unit_record(store, u.number), part)):
                info = record["info"]
                _mismatch(info["settings"], settings, f"unit {unit.number}", store)
                units.append(unit_entry(record, unit.name))
                gathered.add(record)
                sums.append(info["sums"])
                rejected += len(info["rejects"])
                missing += info["captions_missing"]
                mirrored += info["captions_mirrored"]
                if unit.number not in started:
                    new_images += record["records"] + len(info["rejects"])
    stats = stats_from_sums(sums)
    normalisation = norm_from_stats(stats, norm_mode(vae.config))
    manifest = {
        "format": FORMAT,
        "settings": settings,
        "codec": {"identity": settings["codec_identity"], ENCODER_KEY: settings[ENCODER_KEY], "path": str(codec_dir),
                  "config": json.loads(vae.to_json_string())},
        "data": {"source": str(data), "kind": source.kind, "captions": source.captions,
                 "captions_missing": missing, "captions_mirrored": mirrored},
        "resolution": settings["resolution"],
        "crop": settings["crop"],
        "flip": settings["flip"],
        "seed": settings["seed"],
        "latent_shape": settings["latent_shape"],
        "dtype": "float16",
        "count": sum(u["records"] for u in units),
        "rejected": rejected,
        "units": units,
        "latent_stats": stats,
        # Measured here in the form the codec's own normalisation has (global, shift or per-channel), so a codec
        # with a shift keeps one: the reader, the U-Net trainer and the pipeline all apply this.
        "normalisation": normalisation,
        "scaling_factor": normalisation["scaling_factor"],
    }
    publish(store, manifest, gathered)
    return manifest, new_images


def write_scaling_factor_into_codec(codec_dir: str | os.PathLike, vae: AutoencoderKL, normalisation: dict) -> None:
    """Store the shards' measured normalisation (scaling factor, and shift or per-channel statistics) in the codec
    folder's config.json, leaving the weights file untouched."""
    vae.register_to_config(**normalisation)
    config_path = Path(codec_dir) / "config.json"
    config = json.loads(config_path.read_text())
    for key in NORM_KEYS:
        config[key] = vae.config[key]
    write_text_atomically(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------


def _validate(resolution: int, unit_size: int, batch_size: int, crop: str, num_workers: int, limit: int | None,
              precision: str, chunk_bytes: int) -> None:
    for name, value in (("resolution", resolution), ("unit_size", unit_size), ("batch_size", batch_size),
                        ("chunk_bytes", chunk_bytes)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if crop not in CROPS:
        raise ValueError(f"--crop {crop!r}: expected one of {CROPS}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {tuple(PRECISIONS)}")
    if num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {num_workers}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")


def source_settings(source: InputSource) -> dict:
    """What identifies the input in a resume check: its kind, its units (names, in order), its caption source."""
    names = "\n".join(unit.name for unit in source.units)
    return {"kind": source.kind, "units": len(source.units), "captions": source.captions,
            "unit_names_sha256": hashlib.sha256(names.encode()).hexdigest()}


def run_settings(vae, source: InputSource, resolution: int, crop: str, flip: str, seed: int, unit_size: int,
                 limit: int | None, precision: str, chunk_bytes: int) -> dict:
    """What every unit and the manifest record as the settings that made them (SETTING_KEYS, compared on resume,
    and the encoder identity). `flip` is the policy flip_policy returns."""
    return {
        "codec_identity": codec_identity(vae), ENCODER_KEY: encoder_identity(vae),
        "resolution": resolution, "crop": crop, "flip": flip, "seed": seed, "unit_size": unit_size, "limit": limit,
        "source": source_settings(source), "latent_shape": list(latent_shape(vae, resolution, resolution)),
        "precision": precision, "chunk_bytes": chunk_bytes,
    }


def encode_dataset(
    codec_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    resolution: int = 512,
    caption_column: str | None = None,
    image_column: str | None = None,
    unit_size: int = 1000,
    batch_size: int = 16,
    crop: str = "center",
    flip: str | None = None,
    seed: int = 0,
    num_workers: int = 2,
    write_scaling_factor: bool = False,
    limit: int | None = None,
    progress: bool = True,
    timings: dict | None = None,
    precision: str = "fp32",
    chunk_bytes: int = CHUNK_BYTES,
    process_group_timeout_minutes: float = distributed.DEFAULT_TIMEOUT_MINUTES,
) -> dict:
    """Encode `data` into the store `out` (a folder or a bucket URL; see the module docstring); returns the
    manifest. Run by every process of a launch.

    `timings`, when given, receives this process's seconds spent in setup (codec, input listing, resume check),
    in the encode loop (first batch requested to last unit committed), waiting inside that loop for the data
    workers, and in finalising (index and manifest), for benchmarks.

    `flip` is what a random crop's drawn mirror does to a captioned record (FLIPS, `mirrored_record`; None:
    swap-left-right); the manifest records it. `precision` (fp32 | bf16 | fp16) is the encoder's autocast; images
    whose latents overflow in it are re-encoded in fp32 (encode_batch). `process_group_timeout_minutes` bounds
    every wait for the slowest process.
    """
    _validate(resolution, unit_size, batch_size, crop, num_workers, limit, precision, chunk_bytes)
    flip = flip_policy(crop, flip)
    started_at = time.perf_counter()
    state = process_state(process_group_timeout_minutes)
    codec_dir, data, store = os.fspath(codec_dir), os.fspath(data), Location(out)
    # channels-last: 1.2-1.4x faster encoding on CPU (docs/performance.md); the weights and identity are unchanged.
    vae = prepare_for_inference(load_codec(codec_dir).to(state.device))
    source = InputSource(data, image_column=image_column, caption_column=caption_column, unit_size=unit_size,
                         limit=limit)
    settings = run_settings(vae, source, resolution, crop, flip, seed, unit_size, limit, precision, chunk_bytes)
    # One process decides what is done, and every process gets the same answer: listing separately could see a
    # unit another process has just committed and deal the rest differently.
    done_box: list[Any] = [None]
    if state.is_main_process:
        store.make()
        remove_stale_temps(store)
        done_box = [sorted(check_resumable(store, settings))]
    if state.num_processes > 1:
        broadcast_object_list(done_box, from_process=0)
    done = set(done_box[0])
    pending = [unit.number for unit in source.units if unit.number not in done]
    mine = [source.units[k] for k in deal(pending, state.process_index, state.num_processes)]
    framing = Framing(resolution, crop, seed, flip)
    sizes = [unit.size for unit in mine]
    bar = tqdm(total=None if None in sizes else sum(sizes), unit="img",
               desc=f"encode (process 0 of {state.num_processes}, {len(mine)} of {len(pending)} pending units)",
               disable=not (progress and state.is_main_process), dynamic_ncols=True)
    loop_started = time.perf_counter()
    waited = _encode_units(vae, source, mine, framing, settings, store, batch_size, num_workers, state.device, bar)
    loop_ended = time.perf_counter()
    bar.close()
    gather_object([len(mine)])  # the barrier: every unit is committed before the manifest is written
    if state.is_main_process:
        manifest, new_images = finalize(store, settings, vae, codec_dir, data, source, done)
        if write_scaling_factor:
            write_scaling_factor_into_codec(codec_dir, vae, manifest["normalisation"])
        seconds = time.perf_counter() - started_at
        print(f"encode done: {new_images} images read this run, {manifest['rejected']} rejected"
              f"{f' (listed in {store.join(REJECTS)})' if manifest['rejected'] else ''}, {manifest['count']} records "
              f"in {len(source.units)} units ({len(pending)} encoded now), {seconds:.1f} s, "
              f"{new_images / seconds:.1f} images/s", flush=True)
    state.wait_for_everyone()
    if timings is not None:
        timings.update(setup_seconds=loop_started - started_at, encode_loop_seconds=loop_ended - loop_started,
                       waiting_for_data_seconds=waited, finalize_seconds=time.perf_counter() - loop_ended)
    return read_manifest(store)
