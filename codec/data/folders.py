"""An image folder from its one listing: the split's images, their .txt captions, metadata and labels.

What datasets' imagefolder builder made of a folder, without its 66 recursive globs:
- splits: a sub-folder named train/ (or training/), validation/ (valid/, dev/, val/) or test/ (testing/, eval/,
  evaluation/), also with a separator and more (`train-2017/`), at any depth, makes its images that split, and
  images outside every split folder are left out; a folder with no split folder is all 'train'. (datasets also
  splits by file names, `test_3.png`: a folder of such names then had no 'train' split at all. Not kept.)
- metadata.jsonl / .csv / .parquet (anywhere in the split, `file_name` relative to the metadata file, or
  `X_file_name` for an image column named X) adds its columns to the images it names. Unlike imagefolder, images
  the metadata does not name stay (with empty columns) and the order is the listing's, not the metadata's: the
  listing is the one index of a folder, for the codec trainer and the encoder alike.
- otherwise, when every image sits at the same depth and there is more than one parent folder name, the parent
  folder's name is a 'label' column (datasets.ClassLabel, names sorted).
"""

from __future__ import annotations

import io
import os
import posixpath
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from codec.data.listing import Listing, join, open_file

SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEPARATOR = "[-._ 0-9]"
_SPLIT_PATTERNS = {split: re.compile(rf"(^|{_SEPARATOR})({'|'.join(words)})($|{_SEPARATOR})")
                   for split, words in SPLIT_WORDS.items()}


@dataclass
class FolderImages:
    """One split of an image folder. `files` are the images' paths relative to `root`, sorted (numpy utf-8 byte
    strings); `sidecar[i]` says a .txt with the same stem lies beside file i. `metadata` holds the metadata files'
    columns aligned with `files` (null where an image is not named), None without metadata; `image_column` is
    what imagefolder called the image column ('image', or X for metadata's X_file_name)."""

    root: str
    split: str
    files: np.ndarray
    sidecar: np.ndarray
    metadata: pa.Table | None
    image_column: str
    label_names: list[str] | None
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> str:
        return os.fsdecode(self.files[i])

    def locations(self) -> pa.Array:
        """The images' full paths (absolute, as imagefolder gave them) or URLs, as one arrow string array."""
        base = self.root if "://" in self.root else os.path.abspath(self.root)
        prefix = os.fsencode(base.rstrip("/") + "/")
        return pa.array(np.char.add(prefix, self.files), type=pa.binary()).cast(pa.string())


def _split_of(folder: str) -> str | None:
    """The split a folder's images belong to: the first folder name on its path that spells one."""
    for part in folder.split("/"):
        for split, pattern in _SPLIT_PATTERNS.items():
            if pattern.search(part):
                return split
    return None


def _folders(files: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(distinct parent folders, each file's index into them): per-folder work runs once per folder."""
    parents = np.char.rpartition(files, b"/")[:, 0] if len(files) else files
    unique, inverse = np.unique(parents, return_inverse=True)
    return [os.fsdecode(u) for u in unique], inverse


def _stems(names: np.ndarray, suffix_dot: bytes = b".") -> np.ndarray:
    return np.char.rpartition(names, suffix_dot)[:, 0] if len(names) else names


# ---------------------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------------------


def _read_metadata_file(location: str) -> pa.Table:
    with open_file(location) as fh:
        data = fh.read()
    if location.endswith(".jsonl"):
        import pyarrow.json

        return pyarrow.json.read_json(io.BytesIO(data))
    if location.endswith(".csv"):
        import pandas as pd  # as datasets reads metadata.csv, so the columns get the same types

        return pa.Table.from_pandas(pd.read_csv(io.BytesIO(data)), preserve_index=False)
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data))


def _file_name_column(table: pa.Table, location: str) -> tuple[str, str]:
    """(metadata column naming the image files, the image column's name): file_name -> image, X_file_name -> X."""
    for name in table.column_names:
        kind = table.schema.field(name).type
        if (name == "file_name" or name.endswith("_file_name")) and (pa.types.is_string(kind)
                                                                      or pa.types.is_large_string(kind)):
            return name, name[: -len("_file_name")] or "image"
    raise ValueError(f"metadata file {location} has no string column 'file_name' (or 'X_file_name'); its columns: "
                     f"{table.column_names}")


def _relative_name(folder: str, file_name: str, location: str) -> str:
    """The image's path relative to the data root. A metadata file may only name files below its own folder."""
    normal = posixpath.normpath(file_name.replace("\\", "/"))
    if "://" in file_name or posixpath.isabs(normal) or normal == ".." or normal.startswith("../"):
        raise ValueError(f"metadata file {location} names {file_name!r}: file_name must be a relative path inside "
                         f"the metadata file's folder")
    return posixpath.join(folder, normal) if folder else normal


def _metadata(root: str, metadata_files: list[str], files: np.ndarray) -> tuple[pa.Table, str]:
    """The metadata files' columns (without file_name) aligned with `files`, and the image column's name."""
    suffixes = {posixpath.splitext(m)[1] for m in metadata_files}
    if len(suffixes) > 1:
        raise ValueError(f"image folder {root} has metadata files of different formats: {metadata_files}; keep one")
    tables, keys, image_column = [], [], None
    for name in metadata_files:
        location = join(root, name)
        table = _read_metadata_file(location)
        file_column, image_column = _file_name_column(table, location)
        folder = posixpath.dirname(name)
        keys += [_relative_name(folder, f, location) for f in table.column(file_column).to_pylist()]
        tables.append(table.drop_columns([file_column]))
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise ValueError(f"the metadata files of {root} have different columns: {exc}") from None
    return table.take(_rows_of(keys, files)), image_column


def _rows_of(keys: list[str], files: np.ndarray) -> pa.Array:
    """For each file, the index of the metadata row naming it (the first such row), null where none does."""
    rows = np.zeros(len(files), dtype=np.int64)
    found = np.zeros(len(files), dtype=bool)
    if keys:
        key_array = np.array([os.fsencode(k) for k in keys], dtype=np.bytes_)
        order = np.argsort(key_array, kind="stable")
        position = np.minimum(np.searchsorted(key_array[order], files), len(keys) - 1)
        found = key_array[order][position] == files
        rows = order[position]
    return pa.array(rows, mask=~found)


# ---------------------------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------------------------


def _labels(folders: list[str], inverse: np.ndarray, root: str) -> tuple[list[str] | None, np.ndarray | None]:
    """imagefolder's rule: a 'label' per parent folder name when all images share one depth and names differ."""
    names = [posixpath.basename(f) if f else posixpath.basename(root.rstrip("/")) for f in folders]
    depths = {f.count("/") + bool(f) for f in folders}
    distinct = sorted(set(names))
    if len(distinct) < 2 or len(depths) != 1:
        return None, None
    code = np.array([distinct.index(n) for n in names], dtype=np.int64)
    return distinct, code[inverse]


def index_image_folder(listing: Listing, split: str = "train") -> FolderImages:
    """One split of the folder `listing` lists; ValueError naming the folder when it holds no images for it."""
    root, files = listing.root, listing.images
    folders, inverse = _folders(files)
    splits = [_split_of(f) for f in folders]
    available = sorted({s for s in splits if s is not None})
    if available:
        chosen = np.array([s == split for s in splits], dtype=bool)[inverse] if len(files) else np.zeros(0, bool)
        files = files[chosen]
        metadata_files = [m for m in listing.metadata if _split_of(posixpath.dirname(m)) == split]
        folders, inverse = _folders(files)
    else:
        available = ["train"] if len(files) else []
        metadata_files = list(listing.metadata) if split == "train" else []
        files = files if split == "train" else files[:0]
    if len(files) == 0:
        raise ValueError(
            f"image folder {root!r} holds no images for split {split!r} (splits found: {available or 'none'}). Put "
            f".png/.jpg files in it; sub-folders named train/, validation/ (or val/, valid/, dev/) and test/ become "
            f"the splits 'train', 'validation' and 'test', other sub-folder names become a 'label' column"
        )
    sidecar = np.isin(_stems(files), _stems(listing.texts))
    if metadata_files:
        metadata, image_column = _metadata(root, metadata_files, files)
        label_names, labels = None, None
    else:
        metadata, image_column = None, "image"
        label_names, labels = _labels(folders, inverse, root)
    return FolderImages(root, split, files, sidecar, metadata, image_column, label_names, labels)
