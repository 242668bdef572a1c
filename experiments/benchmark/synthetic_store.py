"""Latent stores of any size for the at-scale benchmarks (experiments.benchmark.scale), written with the encoder's
own pieces instead of by encoding images.

Encoding 10M images would take days here, and what start-up and memory depend on is the layout (units, chunks,
commit records, litdata's index, the manifest) and the input's (one tar per unit), not the latents' values. So a
synthetic store holds random float16 latents of the shape the tiny codec preset gives at the chosen resolution
(4x1x1 at 8 px: 10M records take 2.8 GB, written in about 12 minutes here), written a unit at a time by
codec.shards.format.write_unit and finished by the encoder's own finalisation, with the settings encode_dataset
computes for the same codec and input (a folder of one-image tars, one per unit, named as the store's units). The
encoder's resume check accepts the store, and a resume into it does what it would do after a lost node.

    <cache>/codec-tiny/                   the codec (the tiny preset, seeded weights: the same identity every time)
    <cache>/<records>-r<res>-u<unit>-c<chunk>/input/000042.tar    one 1-image tar per unit
                                         /store/                   the latent store
                                         /params.json              what it was built for: reused when equal

Building is resumable like an encode: a unit whose commit record exists is not written again. A store is reused
as long as its params.json matches, whatever the code: after a change to how the encoder finishes a store,
delete <cache>/*/store/manifest.json and the next build finishes each store again (seconds; no unit is
rewritten).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CODEC_PRESET = "tiny"
PARAMS = "params.json"
# A record's caption is of LAION's typical length (~80 characters), so chunks and commit records have the sizes
# a real store of these latents would have.
CAPTION = "a photo of synthetic record {row} of {unit}, written for the at-scale benchmark of the latent store"


@dataclass(frozen=True)
class StoreSpec:
    """A synthetic store: `records` records in units of `unit_size`, latents of the tiny codec at `resolution`."""

    records: int
    unit_size: int
    resolution: int
    chunk_bytes: int

    @property
    def units(self) -> int:
        return -(-self.records // self.unit_size)

    @property
    def name(self) -> str:
        return f"{self.records}-r{self.resolution}-u{self.unit_size}-c{self.chunk_bytes}"


@dataclass(frozen=True)
class BuiltStore:
    spec: StoreSpec
    codec: Path  # the codec folder whose identity the store records
    input: Path  # the folder of tars the store's units are named after
    store: Path


def ensure_codec(cache: Path) -> Path:
    """The tiny preset's codec, saved once (seeded random weights: its identity is the same on every build)."""
    from experiments.benchmark.codec import build_codec

    folder = cache / f"codec-{CODEC_PRESET}"
    if not (folder / "config.json").is_file():
        partial = cache / f".codec-{CODEC_PRESET}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build_codec(CODEC_PRESET).save_pretrained(partial, safe_serialization=True)
        partial.rename(folder)
    return folder


def _one_image_tar(side: int) -> bytes:
    """An img2dataset-shaped tar with one sample: a side x side JPEG and its caption."""
    from PIL import Image

    image = io.BytesIO()
    Image.new("RGB", (side, side), (120, 90, 60)).save(image, format="JPEG")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, payload in (("000000000.jpg", image.getvalue()), ("000000000.txt", b"a brown square")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive.getvalue()


def write_tars(folder: Path, count: int, side: int) -> None:
    """`count` one-image tars 000000.tar, 000001.tar, ... (the same bytes each: only their names and number
    matter to a resume), written into a temp folder and renamed, so a half-written input is never taken as done."""
    if folder.is_dir():
        return
    payload = _one_image_tar(side)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for k in range(count):
        (partial / f"{k:06d}.tar").write_bytes(payload)
    partial.rename(folder)


def encoder_settings(vae, source, spec: StoreSpec) -> dict:
    """The settings encode_dataset computes for this codec and input at its defaults (centre crop, seed 0, fp32)
    with the spec's resolution, unit size and chunk size: the encoder's own run_settings."""
    from codec.shards.encode import flip_policy, run_settings

    return run_settings(vae, source, spec.resolution, "center", flip_policy("center", None), 0, spec.unit_size, None,
                        "fp32", spec.chunk_bytes)


def unit_records(number: int, name: str, count: int, latent: tuple[int, int, int], side: int):
    """`count` records as the encoder would store them for `side` x `side` images, random latents seeded by the
    unit's number (float16: means ~N(0, 1), log-variances around -4)."""
    import torch

    from codec.shards.format import UnitRecords

    rng = np.random.default_rng(number)
    shape = (count, *latent)
    sizes = torch.full((count, 2), side, dtype=torch.int32)
    return UnitRecords(
        mean=torch.from_numpy(rng.standard_normal(shape, dtype=np.float32).astype(np.float16)),
        logvar=torch.from_numpy((rng.standard_normal(shape, dtype=np.float32) * 0.5 - 4).astype(np.float16)),
        original_size=sizes, resized_size=sizes.clone(),
        crop_box=torch.tensor([0, 0, side, side], dtype=torch.int32).repeat(count, 1),
        flip=torch.zeros(count, dtype=torch.uint8), row=torch.arange(count),
        ids=[f"{name}/{row:09d}" for row in range(count)],
        captions=[CAPTION.format(row=row, unit=name) for row in range(count)],
    )


def _params(spec: StoreSpec, codec_identity: str) -> dict:
    return {**asdict(spec), "codec_identity": codec_identity, "caption": CAPTION}


def build_store(cache: Path, spec: StoreSpec, progress=print) -> BuiltStore:
    """The store of `spec` under `cache`, built unless an equal one is there (or finishing one a kill cut short)."""
    from codec.measurement.latent_stats import latent_sums
    from codec.network.model import codec_identity, load_codec
    from codec.shards.encode import finalize, remove_stale_temps
    from codec.shards.format import committed_units, write_unit
    from codec.shards.location import Location

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    codec_dir = ensure_codec(cache)
    vae = load_codec(codec_dir)
    root = cache / spec.name
    built = BuiltStore(spec, codec_dir, root / "input", root / "store")
    params = _params(spec, codec_identity(vae))
    if (root / PARAMS).is_file() and json.loads((root / PARAMS).read_text()) != params:
        shutil.rmtree(root)
    if (root / PARAMS).is_file() and (built.store / "manifest.json").is_file():
        return built
    root.mkdir(parents=True, exist_ok=True)
    (root / PARAMS).write_text(json.dumps(params, indent=2, sort_keys=True))
    write_tars(built.input, spec.units, spec.resolution)

    from codec.data import InputSource

    source = InputSource(built.input)
    settings = encoder_settings(vae, source, spec)
    store = Location(built.store)
    store.make()
    remove_stale_temps(store)  # a unit write a kill cut short
    done = committed_units(store)
    started, reported = time.perf_counter(), 0.0
    for unit in source.units:
        if unit.number in done:
            continue
        count = min(spec.unit_size, spec.records - unit.number * spec.unit_size)
        records = unit_records(unit.number, unit.name, count, tuple(settings["latent_shape"]), spec.resolution)
        info = {"settings": settings, "name": unit.name, "rejects": [], "captions_missing": 0,
                "captions_mirrored": 0, "sums": latent_sums(records.mean, records.logvar)}
        write_unit(store, unit.number, records, info, spec.chunk_bytes)
        elapsed = time.perf_counter() - started
        if elapsed - reported > 30:
            reported = elapsed
            progress(f"  synthetic store {spec.name}: unit {unit.number + 1} of {spec.units}, {elapsed:.0f} s")
    # The encoder's own finalisation: litdata's index, the rejects and the manifest exactly as encode_dataset
    # writes them (statistics from the units' sums, normalisation in the codec's form, checksums, counts).
    finalize(store, settings, vae, str(codec_dir), str(built.input), source, set())
    return built


def resume_view(built: BuiltStore, folder: Path, pending: int) -> list[int]:
    """A copy of the store as a lost node leaves it, in `folder` (hard links: free at any size, and the encoder
    only ever replaces files, never writes into one): every chunk, the commit records of all units but the last
    `pending`, no index or manifest. Returns the pending units."""
    units = sorted(int(path.stem) for path in (built.store / "units").glob("*.json"))
    missing = units[len(units) - pending:]
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "units").mkdir(parents=True)
    for path in built.store.glob("chunk-*.bin"):
        (folder / path.name).hardlink_to(path)
    for number in units[: len(units) - pending]:
        name = f"units/{number:06d}.json"
        (folder / name).hardlink_to(built.store / name)
    return missing
