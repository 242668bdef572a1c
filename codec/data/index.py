"""Random access to the records of webdataset tars and parquet files, local or behind a URL: the codec trainer's
way to read the inputs the encoder streams (codec.data.inputs).

Why an index: TrainCrops (codec/data/crops.py) maps a global draw number to a row of a seeded permutation of the
whole dataset, so that 1 or N processes and a resumed run see the same examples. That holds only where any
record can be read on its own. A tar has no table of contents and datasets' webdataset streaming reads it front to
back, so what a streamed draw sees would depend on how far each reader got; parquet through datasets' map-style
loader is first copied whole into datasets' arrow cache (the dataset again, on every machine).

`RecordIndex(data)` lists the units as InputSource does (one per tar or parquet file) and keeps, per unit, where
its records lie, as numpy arrays (no Python object per record):
  tar      one scan of the tar's headers (codec.data.tars.tar_members: tarfile seeks past the data): each sample's
           key, image member (its field, offset, size) and caption member (offset, size; -1 when missing); a sample
           without an image member, and a truncated tar's end, as the rejects InputSource gives.
  parquet  the footer: the rows of each row group.
Each unit's arrays are cached on local disk ($LATENT_CODEC_INDEX_CACHE, else ~/.cache/latent-codec/record-index)
under a key of the unit's location, its size and ETag (a bucket) or modification time (a local file), and the
source's choice of image and caption members: a changed file is scanned again, an unchanged one never. Units are
indexed in parallel (threads: the scan waits on the disk or the bucket).

`index[i]` is InputSource's record i, the same dict (`row`, `id`, `source`, `image` {bytes, path}, `caption`, or
`reject`), so a draw gives the same example from a tar, from the same tar in a bucket, with any process count.
A tar record is one ranged read (the span from its image to its caption member: `cat_file(path, start, end)`, or
seek + read); a parquet record is its row group's columns (one coalesced read; img2dataset writes 100 rows per
group), the last group read kept per process and the footers of the last few files. Per record the index holds
34 bytes + the key (img2dataset's: 9), 430 MB for 10M records, shared by forked DataLoader workers.

Measured on this machine (2 cores), img2dataset-shaped tars of 1,000 samples (256x256 JPEG + txt + json, 23 MB):
- building: 0.08 s per tar on a local disk (3,000 headers read, the images skipped); 0.26 s per tar through the
  local S3 stand-in (moto), where the scan reads the whole tar: s3fs reads ahead in 50 MB blocks, and skipping
  members smaller than that would cost one request per header instead (3,000 per tar). So a bucket's tars are
  read once per machine, then never again: 8 tars from the cache in 0.01 s (local) / 0.5 s (the bucket, mostly
  its listing and one HEAD per tar to compare sizes and ETags).
- a random record: 0.02 ms from a local tar (page cache), 9 ms from moto (one request); parquet with 100-row
  groups, 2 ms / 10 ms (a row group per record), 0.03 / 0.15 ms per record read in order.
Every process builds its own index: the trainer loads data on its main process first, so the other processes of
that machine read the cache it wrote; on another machine each process scans (the same arrays, written atomically).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import operator
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from codec.common.atomic import write_atomically
from codec.data.inputs import InputSource, InputUnit
from codec.data.listing import Found, is_url, open_file, quick_filesystem, unreachable
from codec.data.tars import BrokenTar, tar_members

logger = logging.getLogger(__name__)

INDEXED_KINDS = ("webdataset", "parquet")
CACHE_VARIABLE = "LATENT_CODEC_INDEX_CACHE"
_FORMAT = 1  # changes when the cached arrays change meaning: older caches are then ignored
_OPEN_PARQUET = 4  # parquet files a process keeps open (their footers parsed)
_RECORD_FIELDS = ["image", "caption", "id"]


def default_cache_dir() -> str:
    return os.environ.get(CACHE_VARIABLE) or os.path.join(os.path.expanduser("~"), ".cache", "latent-codec",
                                                           "record-index")


# ---------------------------------------------------------------------------------------------------------------
# Building: one unit at a time, from the cache or a scan
# ---------------------------------------------------------------------------------------------------------------


def _caption_member(source: InputSource) -> str | None:
    """The tar member that holds captions ('txt', 'json'), or None when the source has none."""
    return None if source.captions == "none" else source.captions.split(":")[1]


def _scan_tar(source: InputSource, unit: InputUnit, fs) -> dict[str, np.ndarray]:
    """Where each sample's image and caption lie in the tar, from its headers, with InputSource's rejects."""
    caption_member = _caption_member(source)
    keys, fields, image_fields, spans, rejects = [], {}, [], [], {}
    with open_file(unit.location, fs) as fh:
        try:
            for key, members in tar_members(fh):
                keys.append(key)
                image = source._tar_image(members)  # InputSource's rule, so the index gives its records
                if image is None:
                    rejects[len(keys) - 1] = f"no image member (members: {', '.join(sorted(members))})"
                    image_fields.append(-1)
                    spans.append((-1, -1, -1, -1))
                    continue
                image_fields.append(fields.setdefault(image, len(fields)))
                spans.append((*members[image], *members.get(caption_member, (-1, -1))))
        except BrokenTar as exc:  # one reject naming the tar, with no key: its id is the tar's name
            keys.append("")
            image_fields.append(-1)
            spans.append((-1, -1, -1, -1))
            rejects[len(keys) - 1] = str(exc)
    return {
        "key": np.array([key.encode() for key in keys], dtype=np.bytes_),
        "field": np.array(image_fields, dtype=np.int16),
        "member": np.array(spans, dtype=np.int64).reshape(-1, 4),  # image offset, size, caption offset, size
        "fields": np.array(list(fields), dtype=np.str_),
        "reject_row": np.array(list(rejects), dtype=np.int64),
        "reject_reason": np.array(list(rejects.values()), dtype=np.str_),
    }


def _scan_parquet(source: InputSource, unit: InputUnit, fs) -> dict[str, np.ndarray]:
    """The rows of each row group and the file's columns, from its footer."""
    import pyarrow.parquet as pq

    with open_file(unit.location, fs) as fh:
        footer = pq.read_metadata(fh)
    return {"group_rows": np.array([footer.row_group(g).num_rows for g in range(footer.num_row_groups)],
                                   dtype=np.int64),
            "columns": np.array(footer.schema.to_arrow_schema().names, dtype=np.str_)}


def _stamp(unit: InputUnit, fs) -> list:
    """What changes when the unit's file does: size and modification time (local), size and ETag (a bucket)."""
    if fs is None:
        stat = os.stat(unit.location)
        return [stat.st_size, stat.st_mtime_ns]
    info = fs.info(unit.location)
    tag = next((str(info[k]) for k in ("ETag", "etag", "LastModified", "mtime", "updated") if info.get(k)), None)
    return [info.get("size"), tag]


def _cache_path(cache_dir: str, source: InputSource, unit: InputUnit, stamp: list) -> str:
    where = unit.location if is_url(unit.location) else os.path.abspath(unit.location)
    key = json.dumps([_FORMAT, source.kind, where, stamp, source.image_column, source.captions])
    return os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:32] + ".npz")


def _load_cached(path: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged cache file is scanned again, not trusted
        logger.warning("ignoring the damaged record index cache %s: %s", path, exc)
        return None


def _save_cached(path: str, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:  # a file object: np.savez would add '.npz' to the temp name
            np.savez(fh, **arrays)

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomically(path, write)
    except OSError as exc:  # a read-only cache costs a scan next time, nothing else
        logger.warning("could not cache the record index at %s: %s", path, exc)


def _index_units(source: InputSource, cache_dir: str, threads: int, progress: bool) -> tuple[list[dict], int]:
    """Each unit's arrays, in unit order, and how many came from the cache."""
    fs = quick_filesystem(source.units[0].location)[0] if is_url(source.units[0].location) else None
    scan = _scan_tar if source.kind == "webdataset" else _scan_parquet

    def one(unit: InputUnit) -> tuple[dict, bool]:
        try:
            path = _cache_path(cache_dir, source, unit, _stamp(unit, fs))
            cached = _load_cached(path)
            if cached is not None:
                return cached, True
            arrays = scan(source, unit, fs)
        except FileNotFoundError:
            raise
        except Exception as exc:  # a bucket that stops answering: one line naming the unit, as InputSource's
            if fs is None:
                raise
            raise unreachable(unit.location, exc) from None
        _save_cached(path, arrays)
        return arrays, False

    units, hits = [], 0
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(source.units)))) as pool:
        bar = tqdm(total=len(source.units), desc="index records", unit="unit", disable=not progress)
        for arrays, cached in pool.map(one, source.units):
            units.append(arrays)
            hits += cached
            bar.update()
        bar.close()
    return units, hits


# ---------------------------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------------------------


class RecordIndex:
    """The records of webdataset tars or parquet files, by position: `len(index)`, `index[i]` (InputSource's
    record i), `index["caption"]` / `index["id"]` (and a parquet file's columns) as lists, `select(rows)`.

    `data`, `image_column`, `caption_column` and `found` (a listing of `data` already made) as InputSource takes
    them. Pickles without open files or connections (DataLoader workers); each process opens its own on first
    read."""

    def __init__(self, data: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None,
                 cache_dir: str | None = None, threads: int = 16, progress: bool = True, found: Found | None = None):
        started = time.perf_counter()
        self.source = InputSource(data, image_column, caption_column, found=found)
        if self.source.kind not in INDEXED_KINDS:
            raise ValueError(f"{self.source.data!r} holds {self.source.kind} data, which load_image_dataset reads "
                             f"as a table; RecordIndex is for webdataset tars and parquet files")
        self._units, hits = _index_units(self.source, cache_dir or default_cache_dir(), threads, progress)
        if self.source.kind == "webdataset":
            sizes = [len(arrays["key"]) for arrays in self._units]
            self._rejects = [dict(zip(a["reject_row"].tolist(), a["reject_reason"].tolist())) for a in self._units]
        else:
            sizes = [int(arrays["group_rows"].sum()) for arrays in self._units]
            self._group_starts = [np.concatenate([[0], np.cumsum(a["group_rows"])]) for a in self._units]
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._rows: np.ndarray | None = None  # the records kept by select(), else all
        self._handles: dict = {}  # this process's open files, filesystems and last row group; never pickled
        self._pid = os.getpid()
        logger.info("indexed %d records of %s in %d units (%d from the cache) in %.1f s", self._starts[-1],
                    self.source.data, len(self._units), hits, time.perf_counter() - started)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def __repr__(self) -> str:
        return f"RecordIndex({self.source.data!r}: {self.source.kind}, {len(self._units)} units, {len(self)} records)"

    def __len__(self) -> int:
        return int(self._starts[-1]) if self._rows is None else len(self._rows)

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    @property
    def column_names(self) -> list[str]:
        """The fields of a record, and for parquet the columns of the first file (as lists through index[name])."""
        extra = self._units[0]["columns"].tolist() if self.source.kind == "parquet" else []
        return _RECORD_FIELDS + [name for name in extra if name not in _RECORD_FIELDS]

    def select(self, rows) -> RecordIndex:
        """The records at `rows` (positions in this index), in that order; the arrays are shared, not copied."""
        chosen = copy.copy(self)
        rows = np.asarray(list(rows), dtype=np.int64)
        chosen._rows = rows if self._rows is None else self._rows[rows]
        chosen._handles = {}
        return chosen

    def __getitem__(self, item):
        if isinstance(item, str):
            return self._column(item)
        position = operator.index(item)
        if not -len(self) <= position < len(self):
            raise IndexError(f"record {position} of an index of {len(self)}")
        position %= len(self)
        if self._rows is not None:
            position = int(self._rows[position])
        unit = int(np.searchsorted(self._starts, position, side="right")) - 1
        row = position - int(self._starts[unit])
        if self.source.kind == "webdataset":
            return self._tar_record(unit, row)
        return self._parquet_record(unit, row)

    # ---- reading -----------------------------------------------------------------------------------------------

    def _open(self) -> dict:
        """This process's handles: a forked DataLoader worker must not reuse its parent's connections."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        return self._handles

    def _read_range(self, location: str, start: int, end: int) -> bytes:
        if is_url(location):
            handles = self._open()
            protocol = location.split("://", 1)[0]
            if protocol not in handles:
                import fsspec

                handles[protocol] = fsspec.filesystem(protocol)
            data = handles[protocol].cat_file(location, start=start, end=end)
        else:
            with open(location, "rb") as fh:
                fh.seek(start)
                data = fh.read(end - start)
        if len(data) != end - start:
            raise OSError(f"{location}: {len(data)} bytes at {start} where the index says {end - start}; the file "
                          f"changed while in use: restart to index it again")
        return data

    def _tar_record(self, unit_number: int, row: int) -> dict:
        unit, arrays = self.source.units[unit_number], self._units[unit_number]
        key = arrays["key"][row].decode()
        record = ({"row": row, "id": f"{unit.name}/{key}", "source": f"{unit.location}:{key}"} if key
                  else {"row": row, "id": unit.name, "source": unit.location})
        reason = self._rejects[unit_number].get(row)
        if reason is not None:
            return dict(record, reject=reason)
        image_at, image_size, caption_at, caption_size = (int(v) for v in arrays["member"][row])
        start = image_at if caption_at < 0 else min(image_at, caption_at)
        blob = self._read_range(unit.location, start, max(image_at + image_size, caption_at + caption_size))
        image_at, caption_at = image_at - start, caption_at - start
        member = {} if caption_size < 0 else {_caption_member(self.source): blob[caption_at:caption_at + caption_size]}
        field = arrays["fields"][arrays["field"][row]]
        image = {"bytes": blob[image_at:image_at + image_size], "path": f"{unit.name}/{key}.{field}"}
        return dict(record, image=image, caption=self.source._tar_caption(member))

    def _parquet_file(self, unit_number: int):
        """The unit's parquet file, kept open (its footer parsed) among this process's last few."""
        import pyarrow.parquet as pq

        files = self._open().setdefault("parquet", OrderedDict())
        if unit_number in files:
            files.move_to_end(unit_number)
            return files[unit_number]
        location = self.source.units[unit_number].location
        if is_url(location):
            import fsspec

            fs, path = fsspec.core.url_to_fs(location)
            # No read-ahead: pyarrow asks for exactly the column chunks it needs, coalesced (pre_buffer).
            opened = pq.ParquetFile(fs.open(path, "rb", cache_type="none"), pre_buffer=True)
        else:
            opened = pq.ParquetFile(location, pre_buffer=True)
        files[unit_number] = opened
        if len(files) > _OPEN_PARQUET:
            files.popitem(last=False)[1].close()
        return opened

    def _row_group(self, unit_number: int, group: int):
        handles = self._open()
        if handles.get("group", (None, None))[0] != (unit_number, group):
            opened = self._parquet_file(unit_number)
            source = self.source
            wanted = (source.image_column, None if source.captions == "none" else source.captions.split(":", 1)[1],
                      source._key_column)
            columns = [name for name in wanted if name is not None and name in opened.schema_arrow.names]
            handles["group"] = ((unit_number, group), opened.read_row_group(group, columns=columns))
        return handles["group"][1]

    def _parquet_record(self, unit_number: int, row: int) -> dict:
        unit, starts = self.source.units[unit_number], self._group_starts[unit_number]
        group = int(np.searchsorted(starts, row, side="right")) - 1
        table = self._row_group(unit_number, group)
        values = {name: table.column(name)[row - int(starts[group])].as_py() for name in table.column_names}
        key = values.get(self.source._key_column) if self.source._key_column else None
        ident = f"{unit.name}/{row if key is None else key}"
        return self.source._table_record(row, ident, values, f"{unit.location}:{row}")

    def _column(self, name: str) -> list:
        """Every record's `name`, in index order: a caption or id from the records (each unit read once, in
        order), a parquet column from the files (None in a file that lacks it)."""
        if name in ("caption", "id"):
            values = [record.get(name) for unit in self.source.units for record in self.source.records(unit)]
        elif name in self.column_names and name != "image":
            import pyarrow.parquet as pq

            values = []
            for unit, arrays in zip(self.source.units, self._units):
                if name in arrays["columns"].tolist():
                    with open_file(unit.location) as fh:
                        values += pq.read_table(fh, columns=[name]).column(name).to_pylist()
                else:
                    values += [None] * int(arrays["group_rows"].sum())
        else:
            raise KeyError(f"{name!r} is not a column of {self.source.data!r} (columns: {self.column_names}; "
                           f"images are read record by record)")
        return values if self._rows is None else [values[i] for i in self._rows.tolist()]
