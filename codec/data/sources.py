"""Where training images come from, as one map-style dataset: image folders, saved `datasets`, arrow files, the Hub,
the bundled photos (scikit-image's colour photos, the default that needs no download), and webdataset tars and
parquet files (img2dataset's too), local or behind a bucket URL, through an index of their records
(codec.data.index), so that any record is read on its own without copying the data first.
"""

from __future__ import annotations

import os
import pathlib
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pyarrow as pa
from PIL import Image

from codec.common.atomic import write_atomically
from codec.data.folders import FolderImages, index_image_folder
from codec.data.listing import Found, find_data

if TYPE_CHECKING:
    from codec.data.index import RecordIndex

# ---------------------------------------------------------------------------------------------------------------
# Dataset loading
# ---------------------------------------------------------------------------------------------------------------

# img2dataset's parquet keeps the encoded image in a binary column named after its format.
BINARY_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")


def load_saved_dataset(source: str, split: str) -> datasets.Dataset:
    """A save_to_disk directory. A saved single Dataset has no splits, so `split` only applies to a DatasetDict."""
    loaded = datasets.load_from_disk(source)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"saved dataset {source!r} has no split {split!r}; available splits: {list(loaded)}")
        return loaded[split]
    return loaded


def folder_dataset(folder: FolderImages) -> datasets.Dataset:
    """The table imagefolder built (image paths, metadata columns or a 'label'), from the folder's one listing."""
    image = pa.StructArray.from_arrays([pa.nulls(len(folder), pa.binary()), folder.locations()],
                                       names=["bytes", "path"])
    columns, features = {folder.image_column: image}, {folder.image_column: datasets.Image(decode=False)}
    if folder.metadata is not None:
        for name in folder.metadata.column_names:
            columns[name] = folder.metadata.column(name)
        features |= datasets.Features.from_arrow_schema(folder.metadata.schema)
    if folder.labels is not None:
        columns["label"] = pa.array(folder.labels)
        features["label"] = datasets.ClassLabel(names=folder.label_names)
    table = datasets.table.InMemoryTable(pa.table(columns))
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=datasets.Features(features)))


class HubUnavailable(RuntimeError):
    """A Hub dataset that cannot be loaded from here (no network, no such repository or split): the user's input,
    reported in one line by the command line."""


def hub_unavailable(source: str, split: str, exc: Exception) -> HubUnavailable:
    return HubUnavailable(
        f"could not load dataset {source!r} (split {split!r}) from the Hugging Face Hub: "
        f"{type(exc).__name__}: {exc}. This machine may have no network access. Pass a local image folder, "
        f"a directory written by save_to_disk, .parquet/.arrow files, webdataset tars or a bucket URL instead."
    )


def _load_hub(source: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # network, auth, missing repo, missing split: all mean "not usable from here"
        raise hub_unavailable(source, split, exc) from exc


def _load_any(found: Found, split: str) -> datasets.Dataset:
    if found.kind == "folder":
        return folder_dataset(index_image_folder(found.listing, split))
    if found.kind == "table" and not found.names:
        return load_saved_dataset(found.root, split)
    if found.kind == "table":  # datasets puts all data_files in one 'train' split
        return datasets.load_dataset("arrow", data_files=found.locations(), split="train")
    return _load_hub(found.data, split)


def pick_image_column(features: datasets.Features, image_column: str | None, source: str) -> str:
    """The column holding images: `image_column`, else the first datasets.Image column, else img2dataset's binary
    column (jpg, ...)."""
    if image_column is not None:
        if image_column not in features:
            raise ValueError(
                f"dataset {source!r} has no column {image_column!r}; available columns: {list(features)}"
            )
        return image_column
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in BINARY_IMAGE_COLUMNS:
        if isinstance(features.get(name), datasets.Value) and features[name].dtype in ("binary", "large_binary"):
            return name
    described = {name: type(feature).__name__ for name, feature in features.items()}
    raise ValueError(
        f"dataset {source!r} has no column of type datasets.Image and no binary {'/'.join(BINARY_IMAGE_COLUMNS)} "
        f"column (columns: {described}); pass image_column= naming the column that holds image paths or bytes"
    )


def load_image_dataset(
    source: str | os.PathLike, image_column: str | None = None, split: str = "train"
) -> tuple[datasets.Dataset | RecordIndex, str]:
    """Load images from a folder, a save_to_disk directory, arrow files, webdataset tars or parquet files (a glob, a
    brace pattern, a folder of them), a bucket URL of any of these, or a Hub name (downloaded whole: streaming
    would give no random access).

    Tars and parquet come back as a RecordIndex (codec.data.index) whose records hold the image in 'image' and
    the caption in 'caption'; `image_column` then names a parquet column or a tar member ('jpg'), as for
    InputSource, and `split` does not apply.

    An image folder is indexed with one listing (codec.data.folders). 10k tiny files on this machine (2 cores), in
    10 sub-folders / flat with a metadata.jsonl: 0.03 s / 0.04 s, where datasets' imagefolder builder took 6.6 s /
    6.3 s (fresh cache; 17.7 s when issue 30 was filed). 300k files in 300 folders: 0.6 s.

    The image column comes back as datasets.Image(decode=False): nothing is decoded at load time, so one broken
    file cannot stop loading; decode_image decides per item later. Returns (dataset, image column name).
    """
    source = os.fspath(source)
    found = find_data(source)
    if found.kind in ("webdataset", "parquet"):
        from codec.data.index import RecordIndex  # it builds on InputSource, which imports this module

        return RecordIndex(source, image_column, found=found), "image"  # listed once, not again
    dataset = _load_any(found, split)
    column = pick_image_column(dataset.features, image_column, source)
    return dataset.cast_column(column, datasets.Image(decode=False)), column


# ---------------------------------------------------------------------------------------------------------------
# Bundled default data
# ---------------------------------------------------------------------------------------------------------------

# Held out: these two are never trained on, so validation numbers on them measure generalisation.
BUNDLED_VAL: tuple[str, ...] = ("astronaut", "coffee")
BUNDLED_TRAIN: tuple[str, ...] = (
    "chelsea",
    "rocket",
    "stereo_motorcycle_left",
    "stereo_motorcycle_right",
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)


def _bundled_array(name: str) -> np.ndarray:
    """Pixels of one bundled photo; the stereo pair is split into its two views."""
    import skimage.data

    if name in ("stereo_motorcycle_left", "stereo_motorcycle_right"):
        left, right, _disparity = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


def _write_png_atomically(array: np.ndarray, path: pathlib.Path) -> None:
    """Write via a temp name and os.replace, so a crash never leaves a half PNG that later reads as truncated."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"bundled photo for {path.name} is {array.dtype} {array.shape}, expected uint8 (H, W, 3)")
    # The temp name has no image suffix, so an imagefolder read meanwhile does not pick it up.
    write_atomically(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def bundled_photos(root: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """Write scikit-image's bundled colour photos as root/train and root/val image folders; return both paths.

    These ship inside the scikit-image wheel, so the toolkit has real photographs to train and validate on with no
    download. Existing files are kept, which makes repeated calls cheap and safe from concurrent processes.
    """
    root = pathlib.Path(root)
    folders = {"train": BUNDLED_TRAIN, "val": BUNDLED_VAL}
    for folder, names in folders.items():
        directory = root / folder
        directory.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = directory / f"{name}.png"
            if not target.exists():
                _write_png_atomically(_bundled_array(name), target)
    return root / "train", root / "val"
