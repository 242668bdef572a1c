"""Encode a dataset once with the frozen codec into latent shards, so diffusion trains without the encoder.

    accelerate launch -m latent_codec shards encode --codec runs/codec/final --data photos/ --out shards/

Shard k always holds dataset indices k*shard_size .. (k+1)*shard_size - 1 (minus rejected images), encoded in
batches that start at the shard's first index. Which process encodes a shard (k mod processes) therefore changes
nothing in it, and a re-run into the same --out skips the complete shards and produces the same files an
uninterrupted run would have. Given the same number of threads per process: CPU convolutions sum in a
thread-count dependent order, which moves float32 latents by ~1e-6 and can flip the last float16 bit.

Image decoding, resizing and cropping run in DataLoader workers while the main thread encodes, so the encoder is
not left waiting on PIL. The file format is in format.py, the checker in verify.py, the reader in reader.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from codec.common import distributed
from codec.common.atomic import write_text_atomically
from codec.common.draws import keyed_generator
from codec.data import UnreadableImage, decode_image, load_image_dataset, pil_to_tensor, resize_shorter_side
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
    FORMAT,
    MANIFEST,
    ShardRecords,
    file_sha256,
    list_shard_files,
    read_manifest,
    read_shard_header,
    shard_filename,
    shard_number,
    write_shard,
)

REJECTS = "rejects.jsonl"
CROPS = ("center", "random")
# What a random crop's drawn mirror does to a record (see `mirrored_record`); a center crop never mirrors ("none").
FLIPS = ("swap-left-right", "uncaptioned-only", "none")
# What random crops did before --flip existed: mirror half the records and keep their captions unchanged, so
# "on the left" could label a shape on the right. Only ever read from old shards, to refuse resuming into them.
LEGACY_FLIP = "keep-captions"
# Column names taken as captions when --caption-column is not given (the imagefolder/metadata.jsonl convention).
DEFAULT_CAPTION_COLUMNS = ("text", "caption")
# Settings that decide a shard's contents: a resumed run must match all of them. `precision` is one: bf16 moves
# the means by ~1.6% (relative RMS, tests/codec/shards/test_encode_scale.py), so a resume in another
# precision would mix two encodings of one dataset.
SETTING_KEYS = ("codec_identity", "resolution", "crop", "flip", "seed", "shard_size", "num_images", "caption_source",
                "latent_shape", "precision")
# What shards written before a key existed were made with: every encode before --precision ran in fp32.
SETTING_DEFAULTS = {"precision": "fp32"}
# Recorded in settings and manifest but not compared on resume: the codec identity already fixes it, and shards
# written before it existed must still resume. It lets a decoder-only fine-tune of the codec use the shards
# (codec/shards/reader.py codec_mismatch).
ENCODER_KEY = "encoder_identity"
# The encoder's autocast dtype per --precision (None: no autocast). The shards store float16 either way.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: codec, processes, captions
# ---------------------------------------------------------------------------------------------------------------


def process_state(timeout_minutes: float = distributed.DEFAULT_TIMEOUT_MINUTES) -> PartialState:
    """Process index/count from accelerate (see codec.common.distributed for the CPU multi-process pitfall)."""
    return distributed.process_state("each process would encode every shard", timeout_minutes)


def caption_source(dataset: datasets.Dataset, data: str, caption_column: str | None) -> str:
    """Where captions come from: 'column:NAME', 'sidecar:.txt' (a.png + a.txt in a folder), or 'none'."""
    features = dataset.features
    if caption_column is not None:
        if caption_column not in features:
            raise ValueError(
                f"--caption-column {caption_column!r} is not a column of {data!r} (columns: {list(features)}); "
                f"omit it to use a 'text'/'caption' column or .txt files beside the images"
            )
        name = caption_column
    else:
        name = next((c for c in DEFAULT_CAPTION_COLUMNS if c in features), None)
    if name is not None:
        feature = features[name]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"caption column {name!r} of {data!r} holds {feature}, expected one string per image")
        return f"column:{name}"
    if os.path.isdir(data) and next(Path(data).rglob("*.txt"), None) is not None:
        return "sidecar:.txt"
    return "none"


# ---------------------------------------------------------------------------------------------------------------
# Per-image work, run in DataLoader workers
# ---------------------------------------------------------------------------------------------------------------


def crop_position(resized_w: int, resized_h: int, resolution: int, crop: str, seed: int,
                  index: int) -> tuple[int, int, bool]:
    """(left, top, flip) of the resolution x resolution crop. Random crops draw from a generator keyed by
    (seed, dataset index), so a record's crop is the same whichever process, worker or run encodes it. `flip` is
    the drawn mirror, drawn whatever the --flip policy; `mirrored_record` decides whether it is applied."""
    if crop == "center":
        return (resized_w - resolution) // 2, (resized_h - resolution) // 2, False
    generator = keyed_generator("encode-crop", seed, index)
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


class ShardImages(torch.utils.data.Dataset):
    """Dataset index -> one record ready to encode, or a reject with its reason (decided here, in the worker).

    The id is the image's path relative to the data folder when it lies inside it, else the dataset index.
    """

    def __init__(self, dataset: datasets.Dataset, image_column: str, data: str, resolution: int, crop: str,
                 seed: int, captions: str, flip: str = FLIPS[0]):
        self.dataset = dataset
        self.image_column = image_column
        self.root = Path(data).resolve() if os.path.isdir(data) else None
        self.resolution = resolution
        self.crop = crop
        self.seed = seed
        self.captions = captions
        self.flip = flip

    def __len__(self) -> int:
        return len(self.dataset)

    def _path(self, value: Any) -> str | None:
        return value.get("path") if isinstance(value, dict) else None

    def _id(self, index: int, path: str | None) -> str:
        if self.root is not None and path and os.path.isabs(path):
            try:
                return Path(path).resolve().relative_to(self.root).as_posix()
            except ValueError:
                pass  # a path outside the folder (e.g. kept in a saved dataset) names nothing stable
        return str(index)

    def _caption(self, row: dict, path: str | None) -> str | None:
        """The caption, or None when this record has none although the dataset has a caption source."""
        if self.captions.startswith("column:"):
            return row[self.captions.split(":", 1)[1]]
        if self.captions.startswith("sidecar:"):
            sidecar = Path(path).with_suffix(".txt") if path else None
            if sidecar is None or not sidecar.is_file():
                return None
            return sidecar.read_text(encoding="utf-8").strip()
        return ""

    def __getitem__(self, index: int) -> dict:
        row = self.dataset[index]
        value = row[self.image_column]
        path = self._path(value)
        record = {"index": index, "id": self._id(index, path), "source": path}
        try:
            img = decode_image(value, min_side=self.resolution)
        except UnreadableImage as exc:
            return dict(record, reject=exc.reason, source=exc.source or path)
        width, height = img.size
        resized = resize_shorter_side(img, self.resolution)
        rw, rh = resized.size
        left, top, drawn = crop_position(rw, rh, self.resolution, self.crop, self.seed, index)
        pixels = pil_to_tensor(resized.crop((left, top, left + self.resolution, top + self.resolution)))
        caption = self._caption(row, path)
        flip, stored = mirrored_record(drawn, "" if caption is None else caption, self.flip)
        return dict(
            record,
            pixels=pixels.flip(-1) if flip else pixels,
            caption=stored,
            caption_missing=caption is None,
            caption_mirrored=caption is not None and stored != caption,
            original_size=(height, width),
            resized_size=(rh, rw),
            crop_box=(left, top, left + self.resolution, top + self.resolution),
            flip=flip,
        )


def collate_records(items: list[dict]) -> dict:
    """Stack the readable images of a batch and pass rejects through, so one broken file costs one record."""
    kept = [item for item in items if "reject" not in item]
    rejects = [{"index": i["index"], "id": i["id"], "source": i["source"], "reason": i["reject"]}
               for i in items if "reject" in i]
    pixels = torch.stack([item.pop("pixels") for item in kept]) if kept else None
    return {"pixels": pixels, "records": kept, "rejects": rejects}


# ---------------------------------------------------------------------------------------------------------------
# Plan: which indices, which shards, which batches
# ---------------------------------------------------------------------------------------------------------------


def shard_indices(k: int, shard_size: int, num_images: int) -> range:
    return range(k * shard_size, min((k + 1) * shard_size, num_images))


def shard_batches(k: int, shard_size: int, num_images: int, batch_size: int) -> list[list[int]]:
    """Batches of shard k: consecutive chunks from its first index, the same for any number of processes."""
    indices = shard_indices(k, shard_size, num_images)
    return [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]


@dataclass
class ShardBuilder:
    """Collects a shard's encoded batches until it is complete."""

    means: list
    logvars: list
    records: list
    rejects: list

    @classmethod
    def empty(cls) -> ShardBuilder:
        return cls([], [], [], [])

    def build(self, latent: tuple[int, int, int]) -> ShardRecords:
        def ints(key, dtype, width):
            return torch.tensor([r[key] for r in self.records], dtype=dtype).reshape(len(self.records), *width)

        empty = torch.zeros((0, *latent), dtype=torch.float16)
        return ShardRecords(
            mean=torch.cat(self.means) if self.means else empty,
            logvar=torch.cat(self.logvars) if self.logvars else empty,
            original_size=ints("original_size", torch.int32, (2,)),
            resized_size=ints("resized_size", torch.int32, (2,)),
            crop_box=ints("crop_box", torch.int32, (4,)),
            flip=ints("flip", torch.uint8, ()),
            index=ints("index", torch.int64, ()),
            ids=[r["id"] for r in self.records],
            captions=[r["caption"] for r in self.records],
        )


# ---------------------------------------------------------------------------------------------------------------
# Resume safety
# ---------------------------------------------------------------------------------------------------------------


def _recorded_setting(found: dict, key: str) -> Any:
    """A setting as shards record it; shards written before the key existed get what they were made with."""
    if key == "flip" and key not in found:
        return LEGACY_FLIP if found.get("crop") == "random" else "none"
    return found.get(key, SETTING_DEFAULTS.get(key))


def _mismatch(found: dict, settings: dict, where: str, out: Path) -> None:
    for key in SETTING_KEYS:
        value = _recorded_setting(found, key)
        if value != settings[key]:
            raise ValueError(
                f"--out {out} already holds shards made with {key}={value!r} ({where}), but this run "
                f"has {key}={settings[key]!r}. Resuming would mix incompatible shards: pass a new --out, or delete "
                f"{out} to start over"
            )


def check_resumable(out: Path, settings: dict) -> set[int]:
    """Shard numbers already complete in `out`; refuses when anything there was made with other settings."""
    manifest = out / MANIFEST
    if manifest.is_file():
        _mismatch(read_manifest(out)["settings"], settings, MANIFEST, out)
    done = set()
    for path in list_shard_files(out):
        _mismatch(read_shard_header(path)["info"]["settings"], settings, path.name, out)
        done.add(shard_number(path))
    return done


def _remove_stale_temps(out: Path) -> None:
    """Temp files of writes a kill interrupted; complete shards were os.replace'd and are never temp files."""
    for pattern in (".shard-*.safetensors.*.tmp", f".{MANIFEST}.*.tmp", f".{REJECTS}.*.tmp"):
        for tmp in out.glob(pattern):
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------------------


def _validate(resolution: int, shard_size: int, batch_size: int, crop: str, num_workers: int, limit: int | None,
              precision: str) -> None:
    for name, value in (("resolution", resolution), ("shard_size", shard_size), ("batch_size", batch_size)):
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


def _add_batch(shard: ShardBuilder, batch: dict, vae, device, dtype: torch.dtype | None) -> list[str]:
    """Encode one batch into `shard`; records whose latents are not finite become rejects. Returns the ids of
    the images re-encoded in float32."""
    records, rejects = batch["records"], list(batch["rejects"])
    upcast_ids = []
    if batch["pixels"] is not None:
        mean, logvar, upcast, bad = encode_batch(vae, batch["pixels"].to(device, torch.float32), dtype)
        upcast_ids = [r["id"] for r, u in zip(records, upcast.tolist()) if u]
        rejects += [{"index": r["index"], "id": r["id"], "source": r["source"], "reason": NON_FINITE_REASON}
                    for r, b in zip(records, bad.tolist()) if b]
        records = [r for r, b in zip(records, bad.tolist()) if not b]
        shard.means.append(mean[~bad])
        shard.logvars.append(logvar[~bad])
    shard.records.extend(records)
    shard.rejects.extend(sorted(rejects, key=lambda r: r["index"]))
    return upcast_ids


def _encode_my_shards(vae, images: ShardImages, pending: list[int], settings: dict, out: Path, batch_size: int,
                      num_workers: int, device, progress: tqdm) -> tuple[float, dict[int, str]]:
    """Encode shards `pending` (this process's share) in order, writing each as soon as it is complete.
    Returns the seconds the encoder sat waiting for the data workers' next batch, and each written shard's
    sha256 (taken from the bytes as they were written, so the manifest needs no second read)."""
    n, size = settings["num_images"], settings["shard_size"]
    plan = [batch for k in pending for batch in shard_batches(k, size, n, batch_size)]
    if not plan:
        return 0.0, {}
    dtype = PRECISIONS[settings["precision"]]
    waited, hashes = 0.0, {}
    loader = DataLoader(images, batch_sampler=plan, collate_fn=collate_records, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda")
    batches = iter(loader)
    for k in pending:
        shard, upcast_ids = ShardBuilder.empty(), []
        for _ in shard_batches(k, size, n, batch_size):
            tick = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - tick
            upcast_ids += _add_batch(shard, batch, vae, device, dtype)
            progress.update(len(batch["records"]) + len(batch["rejects"]))
        if upcast_ids:
            log.warning("%s: %d image(s) gave non-finite latents in %s and were re-encoded in fp32 (any still not "
                        "finite are in %s): %s", shard_filename(k), len(upcast_ids), settings["precision"], REJECTS,
                        ", ".join(upcast_ids))
        records = shard.build(tuple(settings["latent_shape"]))
        info = {
            "settings": settings,
            "shard": k,
            "indices": [k * size, min((k + 1) * size, n)],
            "rejects": shard.rejects,
            "captions_missing": sum(bool(r["caption_missing"]) for r in shard.records),
            "captions_mirrored": sum(bool(r["caption_mirrored"]) for r in shard.records),
            "sums": latent_sums(records.mean, records.logvar),
        }
        hashes[k] = write_shard(out / shard_filename(k), records, info)
    return waited, hashes


def _hash_my_earlier_shards(out: Path, done: set[int], state: PartialState) -> dict[int, str]:
    """sha256 of the shards a previous run completed, shard k hashed by process k mod processes: hashing them
    all on process 0 while the others wait in a barrier can outlast the process group's timeout."""
    return {k: file_sha256(out / shard_filename(k)) for k in sorted(done)
            if k % state.num_processes == state.process_index}


def _gather_hashes(mine: dict[int, str]) -> dict[int, str]:
    """Every process's shard hashes, on every process (gather_object of a list concatenates the ranks' lists)."""
    return dict(gather_object(sorted(mine.items())))


def _finalize(out: Path, settings: dict, vae, codec_dir: str, data: str, image_column: str,
              started: set[int], hashes: dict[int, str]) -> tuple[dict, int]:
    """Main process, after every shard exists: write the manifest (checksums, counts, statistics) and rejects.jsonl.
    `hashes` holds every shard's sha256, computed by the process that wrote or found it; only headers are read
    here. Returns the manifest and the number of images read by this run (shards not in `started`)."""
    num_shards = math.ceil(settings["num_images"] / settings["shard_size"])
    entries, sums, rejects, captions_missing, captions_mirrored, new_images = [], [], [], 0, 0, 0
    for k in range(num_shards):
        path = out / shard_filename(k)
        header = read_shard_header(path)
        info = header["info"]
        _mismatch(info["settings"], settings, path.name, out)
        entries.append({"file": path.name, "records": header["records"], "rejected": len(info["rejects"]),
                        "indices": info["indices"], "sha256": hashes[k]})
        sums.append(info["sums"])
        rejects.extend(info["rejects"])
        captions_missing += info["captions_missing"]
        captions_mirrored += info.get("captions_mirrored", 0)  # absent only in center-crop shards: none mirrored
        if k not in started:
            new_images += info["indices"][1] - info["indices"][0]
    stats = stats_from_sums(sums)
    normalisation = norm_from_stats(stats, norm_mode(vae.config))
    manifest = {
        "format": FORMAT,
        "settings": settings,
        "codec": {"identity": settings["codec_identity"], ENCODER_KEY: settings[ENCODER_KEY], "path": str(codec_dir),
                  "config": json.loads(vae.to_json_string())},
        "data": {"source": str(data), "image_column": image_column, "captions": settings["caption_source"],
                 "captions_missing": captions_missing, "captions_mirrored": captions_mirrored},
        "resolution": settings["resolution"],
        "crop": settings["crop"],
        "flip": settings["flip"],
        "seed": settings["seed"],
        "shard_size": settings["shard_size"],
        "latent_shape": settings["latent_shape"],
        "dtype": "float16",
        "count": sum(e["records"] for e in entries),
        "rejected": len(rejects),
        "shards": entries,
        "latent_stats": stats,
        # Measured here in the form the codec's own normalisation has (global, shift or per-channel), so a codec
        # with a shift keeps one: the reader, the U-Net trainer and the pipeline all apply this.
        "normalisation": normalisation,
        "scaling_factor": normalisation["scaling_factor"],
    }
    write_text_atomically(out / REJECTS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejects))
    write_text_atomically(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
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


def encode_dataset(
    codec_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    resolution: int = 512,
    caption_column: str | None = None,
    image_column: str | None = None,
    shard_size: int = 1000,
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
    process_group_timeout_minutes: float = distributed.DEFAULT_TIMEOUT_MINUTES,
) -> dict:
    """Encode `data` into `out` (see the module docstring); returns the manifest. Run by every process of a launch.

    `timings`, when given, receives this process's seconds spent in setup (codec, dataset, resume check), in the
    encode loop (first batch requested to last shard written), waiting inside that loop for the data workers,
    and in finalising (manifest), for benchmarks.

    `flip` is what a random crop's drawn mirror does to a captioned record (FLIPS, `mirrored_record`; None:
    swap-left-right); the manifest records it.

    `precision` (fp32 | bf16 | fp16) is the encoder's autocast; images whose latents overflow in it are
    re-encoded in fp32 (encode_batch). `process_group_timeout_minutes` bounds every wait for the slowest process.
    """
    _validate(resolution, shard_size, batch_size, crop, num_workers, limit, precision)
    flip = flip_policy(crop, flip)
    started_at = time.perf_counter()
    state = process_state(process_group_timeout_minutes)
    codec_dir, data, out = os.fspath(codec_dir), os.fspath(data), Path(out)
    # channels-last: 1.2-1.4x faster encoding on CPU (docs/performance.md); the weights and identity are unchanged.
    vae = prepare_for_inference(load_codec(codec_dir).to(state.device))
    latent = latent_shape(vae, resolution, resolution)
    with state.main_process_first():  # the first process builds the datasets cache, the others reuse it
        dataset, column = load_image_dataset(data, image_column)
    num_images = len(dataset) if limit is None else min(limit, len(dataset))
    settings = {
        "codec_identity": codec_identity(vae), ENCODER_KEY: encoder_identity(vae),
        "resolution": resolution, "crop": crop, "flip": flip, "seed": seed,
        "shard_size": shard_size, "num_images": num_images,
        "caption_source": caption_source(dataset, data, caption_column), "latent_shape": list(latent),
        "precision": precision,
    }
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out)
    state.wait_for_everyone()
    done = check_resumable(out, settings)
    state.wait_for_everyone()  # every process has seen the same complete shards before any writes a new one
    num_shards = math.ceil(num_images / shard_size)
    mine = [k for k in range(num_shards) if k % state.num_processes == state.process_index and k not in done]
    images = ShardImages(dataset, column, data, resolution, crop, seed, settings["caption_source"], flip)
    bar = tqdm(total=sum(len(shard_indices(k, shard_size, num_images)) for k in mine), unit="img",
               desc=f"encode (process 0 of {state.num_processes})", disable=not (progress and state.is_main_process),
               dynamic_ncols=True)
    loop_started = time.perf_counter()
    waited, hashes = _encode_my_shards(vae, images, mine, settings, out, batch_size, num_workers, state.device, bar)
    loop_ended = time.perf_counter()
    bar.close()
    hashes = _gather_hashes({**hashes, **_hash_my_earlier_shards(out, done, state)})  # also the barrier
    if state.is_main_process:
        manifest, new_images = _finalize(out, settings, vae, codec_dir, data, column, done, hashes)
        if write_scaling_factor:
            write_scaling_factor_into_codec(codec_dir, vae, manifest["normalisation"])
        seconds = time.perf_counter() - started_at
        print(f"encode done: {new_images} images read this run, {manifest['rejected']} rejected"
              f"{f' (listed in {out / REJECTS})' if manifest['rejected'] else ''}, {manifest['count']} records in "
              f"{num_shards} shards ({num_shards - len(done)} written now), {seconds:.1f} s, "
              f"{new_images / seconds:.1f} images/s", flush=True)
    state.wait_for_everyone()
    if timings is not None:
        timings.update(setup_seconds=loop_started - started_at, encode_loop_seconds=loop_ended - loop_started,
                       waiting_for_data_seconds=waited, finalize_seconds=time.perf_counter() - loop_ended)
    return json.loads((out / MANIFEST).read_text())
