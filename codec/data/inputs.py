"""Inputs where users keep their data, cut into units that encoding processes deal out among themselves.

`InputSource(data)` takes whatever `load_image_dataset` takes (an image folder, a save_to_disk directory, parquet
or arrow files, a Hub name) and also webdataset tars (one `.tar`, a folder of them, a brace pattern
`shards/{00000..09999}.tar`), a folder of parquet files, img2dataset's parquet (the image in a binary `jpg`
column, `caption`, `key`), any of these behind an fsspec URL (`s3://`, `gs://`, `file://`), and a Hub dataset
streamed (`streaming=True`, its shards as units). It lists units without reading them: one per tar or parquet file,
blocks of `unit_size` images of a folder or rows of a table, the shards of a streamed Hub dataset. `records(unit)`
yields a unit's records in a fixed order, each with an id that names it wherever the data lies:

    folder      "a/b.png"                 the path relative to the folder (as the encoder has always named them)
    webdataset  "00042.tar/000000123"     tar name / sample key
    parquet     "part-3.parquet/<key>"    file name / img2dataset's 'key' column, else the row in the file
    table       "1234"                    the row in the table
    hub         "shard-00003/17"          shard / row in the shard

A record is `{"row", "id", "image" (a {"bytes", "path"} dict for codec.data.decode_image), "caption", "source"}`
or, when not even its bytes can be got, `{"row", "id", "source", "reject": reason}`. Pixels are not decoded here:
the encoder's workers decode and reject with decode_image's reason. `caption` is None where this record lacks the
caption the source has (a missing `.txt`), "" when the source has no captions. `source` says where the record
lies (a path or URL): it, and a folder image's 'path' (which decode_image reads), are all that differ between a
local copy and a bucket copy of the same data.

How units are read (measured on this machine, 2 cores, 1,000-record units):
- parquet through datasets, `load_dataset("parquet", data_files=[unit], streaming=True)`: the same rows, fsspec
  URLs, ~20 ms per file after the process's first (1.2 s, imports); sizes come from each file's parquet footer.
- tars through fsspec + tarfile (codec.data.tars), not datasets' webdataset builder: that builder infers the
  columns from a tar's first 5 samples and fails the whole tar when one of them lacks its `.txt` ("don't share
  the same prefix or the same types"), and on a tar truncated at a member boundary it stops silently (502 of 1,000
  records, no error). Here a missing member is a None caption or a reject, and a tar that ends early ends its unit
  with one reject naming the tar. It is also faster: 0.07 s for a 1,000-sample tar, 0.14 s through datasets.

The object pickles small (DataLoader workers): arrays and strings, no open files; a table or a streamed Hub
dataset is opened again in each process on first use.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import datasets

from codec.data.folders import index_image_folder
from codec.data.listing import IMAGE_EXTENSIONS, Found, find_data, join, open_file, quick_filesystem, unreachable
from codec.data.sources import hub_unavailable, load_saved_dataset, pick_image_column
from codec.data.tars import BrokenTar, tar_samples

KINDS = ("folder", "webdataset", "parquet", "table", "hub")
# Column names taken as captions when caption_column is not given (the imagefolder/metadata.jsonl convention).
DEFAULT_CAPTION_COLUMNS = ("text", "caption")
# A tar sample's image member when image_column is not given: the first of these it has, else any image suffix.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
_PROBED_SAMPLES = 8  # samples of the first tar looked at to learn where its captions are
_BATCH = 64  # table rows read at once


@dataclass(frozen=True)
class InputUnit:
    number: int  # position in the source's sorted list of units
    name: str  # stable, relative to the data root, the same whether the data is local or behind a URL
    location: str  # where to read it (local path or URL); never part of any identity
    size: int | None  # records in the unit when known without reading it, else None


def _caption_column(features: datasets.Features, caption_column: str | None, data: str) -> str | None:
    """The caption column of a table: `caption_column`, else 'text' or 'caption'; it must hold strings."""
    if caption_column is not None and caption_column not in features:
        raise ValueError(f"caption column {caption_column!r} is not a column of {data!r} (columns: "
                         f"{list(features)}); omit it to use a 'text'/'caption' column")
    name = caption_column or next((c for c in DEFAULT_CAPTION_COLUMNS if c in features), None)
    if name is not None:
        feature = features[name]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise ValueError(f"caption column {name!r} of {data!r} holds {feature}, expected one string per image")
    return name


def _image_value(value, where: str) -> dict | str:
    """A table cell as decode_image's {'bytes', 'path'}, or the reason it holds no image."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value), "path": where}
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        return value
    return "no image in the row"


class InputSource:
    """Where the images are, cut into units: one unit per tar or parquet file; blocks of `unit_size` files of an
    image folder or rows of a saved/arrow dataset; the shards of a streamed Hub dataset.

    `image_column` / `caption_column` name table columns (a folder's metadata columns included); for tars they
    name members by suffix ('jpg'; 'txt', or 'json:KEY' for a key of the json member). Left out, the image is the
    first Image column, else img2dataset's binary jpg/png/webp column, else a tar sample's jpg/jpeg/png/webp
    member; captions come from a 'text' or 'caption' column, .txt files beside a folder's images, or a tar's .txt
    members, else the json members' 'caption'. `split` picks a folder's split sub-folders, a saved DatasetDict's
    or a Hub dataset's split. `limit` keeps the first records in unit order where unit sizes are known up front.
    """

    def __init__(self, data: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None,
                 split: str = "train", unit_size: int = 1000, limit: int | None = None, found: Found | None = None):
        if unit_size < 1:
            raise ValueError(f"unit_size must be at least 1, got {unit_size}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 (or None for all records), got {limit}")
        self.data = os.fspath(data)
        self.split = split
        self.unit_size = unit_size
        found = found or find_data(self.data)  # a caller that already listed `data` passes its listing: one is enough
        self.kind: str = found.kind
        self.captions: str = "none"
        self._cache: dict = {}  # per-process handles (a table, a streamed dataset); never pickled
        units = getattr(self, f"_units_of_{self.kind}")(found, image_column, caption_column)
        self.units: list[InputUnit] = self._limited(units, limit)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}

    def __repr__(self) -> str:
        return f"InputSource({self.data!r}: {self.kind}, {len(self.units)} units, captions {self.captions})"

    def records(self, unit: InputUnit) -> Iterator[dict]:
        """The unit's records in a fixed order (see the module docstring)."""
        return getattr(self, f"_records_of_{self.kind}")(unit)

    def _limited(self, units: list[InputUnit], limit: int | None) -> list[InputUnit]:
        """The first `limit` records in unit order: later units dropped, the last one shortened."""
        if limit is None:
            return units
        if any(unit.size is None for unit in units):
            raise ValueError(
                f"limit={limit} needs the records per unit known before reading, which a {self.kind} source "
                f"({self.data!r}) does not tell; pass fewer units instead (a brace pattern or a folder of fewer tars)"
            )
        kept, left = [], limit
        for unit in units:
            if left <= 0:
                break
            kept.append(unit if unit.size <= left else InputUnit(unit.number, unit.name, unit.location, left))
            left -= unit.size
        return kept

    # ---- image folder ------------------------------------------------------------------------------------------

    def _units_of_folder(self, found: Found, image_column: str | None, caption_column: str | None) -> list:
        folder = index_image_folder(found.listing, self.split)
        if image_column is not None and image_column != folder.image_column:
            raise ValueError(f"image folder {self.data!r} has its images in column {folder.image_column!r}, not "
                             f"{image_column!r}; omit image_column")
        self.image_column, self._root, self._files = folder.image_column, folder.root, folder.files
        self._sidecar = self._caption_values = None
        columns = {} if folder.metadata is None else datasets.Features.from_arrow_schema(folder.metadata.schema)
        name = _caption_column(datasets.Features(columns), caption_column, self.data)
        if name is not None:
            self.captions, self._caption_values = f"column:{name}", folder.metadata.column(name).combine_chunks()
        elif folder.sidecar.any():
            self.captions, self._sidecar = "sidecar:.txt", folder.sidecar
        count = len(folder.files)
        return [InputUnit(k, f"files-{k:06d}", self._root, min(self.unit_size, count - start))
                for k, start in enumerate(range(0, count, self.unit_size))]

    def _records_of_folder(self, unit: InputUnit) -> Iterator[dict]:
        start = unit.number * self.unit_size
        for row in range(unit.size):
            index = start + row
            name = os.fsdecode(self._files[index])
            location = join(self._root, name)
            yield {"row": row, "id": name, "image": {"bytes": None, "path": location},
                   "caption": self._folder_caption(index, location), "source": location}

    def _folder_caption(self, index: int, location: str) -> str | None:
        if self._caption_values is not None:
            return self._caption_values[index].as_py()
        if self._sidecar is None:
            return ""
        if not self._sidecar[index]:
            return None
        with open_file(posixpath.splitext(location)[0] + ".txt") as fh:
            return fh.read().decode("utf-8", errors="replace").strip()

    # ---- webdataset tars ---------------------------------------------------------------------------------------

    def _units_of_webdataset(self, found: Found, image_column: str | None, caption_column: str | None) -> list:
        self.image_column = None if image_column is None else image_column.lower()  # member suffixes compare lowered
        units = [InputUnit(k, name, location, None)
                 for k, (name, location) in enumerate(zip(found.names, found.locations()))]
        if caption_column is not None:
            self.captions = "member:" + caption_column
        else:
            self.captions = self._probe_tar_captions(units[0].location)
        return units

    def _probe_tar_captions(self, location: str) -> str:
        """Where the first tar keeps captions: a .txt member, else a json member's 'caption', else none."""
        fs = quick_filesystem(location)[0] if "://" in location else None
        fields, json_caption = set(), False
        try:
            with open_file(location, fs) as fh:
                for number, (_, sample) in enumerate(tar_samples(fh)):
                    fields |= sample.keys()
                    json_caption = json_caption or "caption" in _json_member(sample.get("json"))
                    if number + 1 >= _PROBED_SAMPLES:
                        break
        except BrokenTar:
            pass  # reported as a reject when the unit is read; what was read so far still tells
        except FileNotFoundError:
            raise
        except Exception as exc:  # the first read of a bucket object: same one line as a failed listing
            if "://" not in location:
                raise
            raise unreachable(location, exc) from None
        if "txt" in fields:
            return "member:txt"
        return "member:json:caption" if json_caption else "none"

    def _tar_caption(self, sample: dict) -> str | None:
        if self.captions == "none":
            return ""
        member = self.captions.split(":", 1)[1]
        if member.startswith("json:"):
            value = _json_member(sample.get("json")).get(member.split(":", 1)[1])
            return value if isinstance(value, str) else None
        raw = sample.get(member)
        return None if raw is None else raw.decode("utf-8", errors="replace").strip()

    def _tar_image(self, sample: dict) -> str | None:
        if self.image_column is not None:
            return self.image_column if self.image_column in sample else None
        present = [f for f in IMAGE_MEMBERS if f in sample]
        present += [f for f in sample if "." + f.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
        return present[0] if present else None

    def _records_of_webdataset(self, unit: InputUnit) -> Iterator[dict]:
        row = 0
        with open_file(unit.location) as fh:
            try:
                for key, sample in tar_samples(fh):
                    record = {"row": row, "id": f"{unit.name}/{key}", "source": f"{unit.location}:{key}"}
                    image = self._tar_image(sample)
                    if image is None:
                        yield dict(record, reject=f"no image member (members: {', '.join(sorted(sample))})")
                    else:
                        yield dict(record, image={"bytes": sample[image], "path": f"{unit.name}/{key}.{image}"},
                                   caption=self._tar_caption(sample))
                    row += 1
            except BrokenTar as exc:
                yield {"row": row, "id": unit.name, "source": unit.location, "reject": str(exc)}

    # ---- parquet -----------------------------------------------------------------------------------------------

    def _units_of_parquet(self, found: Found, image_column: str | None, caption_column: str | None) -> list:
        footers = _parquet_footers(found.locations())
        features = datasets.Features.from_arrow_schema(footers[0].schema.to_arrow_schema())
        self.image_column = pick_image_column(features, image_column, self.data)
        name = _caption_column(features, caption_column, self.data)
        self.captions = "none" if name is None else f"column:{name}"
        self._key_column = "key" if "key" in features else None
        return [InputUnit(k, name, location, footer.num_rows)
                for k, (name, location, footer) in enumerate(zip(found.names, found.locations(), footers))]

    def _records_of_parquet(self, unit: InputUnit) -> Iterator[dict]:
        rows = datasets.load_dataset("parquet", data_files=[unit.location], split="train", streaming=True)
        if isinstance(rows.features[self.image_column], datasets.Image):
            rows = rows.cast_column(self.image_column, datasets.Image(decode=False))
        for row, values in enumerate(rows):
            if row >= unit.size:
                break
            key = values.get(self._key_column) if self._key_column else None
            ident = f"{unit.name}/{row if key is None else key}"
            yield self._table_record(row, ident, values, f"{unit.location}:{row}")

    def _table_record(self, row: int, ident: str, values: dict, source: str) -> dict:
        """A row as a record; a file whose columns differ from the first one's gives rejects and None captions."""
        image = _image_value(values.get(self.image_column), ident)
        record = {"row": row, "id": ident, "source": source}
        if isinstance(image, str):
            return dict(record, reject=image)
        caption = values.get(self.captions.split(":", 1)[1]) if self.captions != "none" else ""
        return dict(record, image=image, caption=caption)

    # ---- saved dataset, arrow files ----------------------------------------------------------------------------

    def _units_of_table(self, found: Found, image_column: str | None, caption_column: str | None) -> list:
        self._table_files = found.locations() if found.names else None
        self._root = found.root
        features = self._open_table().features
        self.image_column = pick_image_column(features, image_column, self.data)
        name = _caption_column(features, caption_column, self.data)
        self.captions = "none" if name is None else f"column:{name}"
        count = len(self._table())
        return [InputUnit(k, f"rows-{k:06d}", self.data, min(self.unit_size, count - start))
                for k, start in enumerate(range(0, count, self.unit_size))]

    def _open_table(self) -> datasets.Dataset:
        if self._table_files is None:
            return load_saved_dataset(self._root, self.split)
        return datasets.load_dataset("arrow", data_files=self._table_files, split="train")

    def _table(self) -> datasets.Dataset:
        """The table, opened once per process (memory-mapped), its images left encoded for decode_image."""
        if "table" not in self._cache:
            table = self._open_table()
            if isinstance(table.features[self.image_column], datasets.Image):
                table = table.cast_column(self.image_column, datasets.Image(decode=False))
            self._cache["table"] = table
        return self._cache["table"]

    def _records_of_table(self, unit: InputUnit) -> Iterator[dict]:
        table = self._table()
        start = unit.number * self.unit_size
        for first in range(0, unit.size, _BATCH):
            batch = table[start + first: start + min(first + _BATCH, unit.size)]
            for offset in range(len(batch[self.image_column])):
                row = first + offset
                values = {column: batch[column][offset] for column in batch}
                yield self._table_record(row, str(start + row), values, f"{self.data}:{start + row}")

    # ---- a streamed Hub dataset --------------------------------------------------------------------------------

    def _units_of_hub(self, found: Found, image_column: str | None, caption_column: str | None) -> list:
        stream = self._stream()
        self.image_column = pick_image_column(stream.features, image_column, self.data)
        name = _caption_column(stream.features, caption_column, self.data)
        self.captions = "none" if name is None else f"column:{name}"
        return [InputUnit(k, f"shard-{k:05d}", self.data, None) for k in range(stream.num_shards)]

    def _stream(self) -> datasets.IterableDataset:
        if "stream" not in self._cache:
            try:
                stream = datasets.load_dataset(self.data, split=self.split, streaming=True)
            except Exception as exc:  # network, auth, missing repo, missing split: all mean "not usable from here"
                raise hub_unavailable(self.data, self.split, exc) from exc
            if stream.features is None:
                raise ValueError(f"Hub dataset {self.data!r} does not declare its columns when streamed; "
                                 f"download it (save_to_disk or parquet) and pass the copy")
            self._cache["stream"] = stream
        return self._cache["stream"]

    def _records_of_hub(self, unit: InputUnit) -> Iterator[dict]:
        shard = self._stream().shard(num_shards=len(self.units), index=unit.number)
        if isinstance(shard.features[self.image_column], datasets.Image):
            shard = shard.cast_column(self.image_column, datasets.Image(decode=False))
        for row, values in enumerate(shard):
            yield self._table_record(row, f"{unit.name}/{row}", values, f"{self.data}:{unit.name}/{row}")


def _json_member(raw: bytes | None) -> dict:
    """A sample's json member as a dict; {} when absent or unreadable (then its caption is missing, not fatal)."""
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _parquet_footers(locations: list[str]) -> list:
    """Each file's parquet footer (row count, schema), read in parallel: a bucket answers each in tens of ms."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = quick_filesystem(locations[0])[0] if "://" in locations[0] else None

    def footer(location: str):
        try:
            with open_file(location, fs) as fh:
                return pq.read_metadata(fh)
        except pa.ArrowException as exc:
            raise ValueError(f"{location} is not a readable parquet file: {exc}") from None
        except FileNotFoundError:
            raise
        except Exception as exc:  # a bucket that stops answering after the listing
            if "://" not in location:
                raise
            raise unreachable(location, exc) from None

    with ThreadPoolExecutor(max_workers=min(16, len(locations))) as pool:
        return list(pool.map(footer, locations))
