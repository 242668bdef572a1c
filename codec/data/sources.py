"""Where training images come from: image folders, saved `datasets`, parquet/arrow files, the Hub, and
the bundled photos (scikit-image's colour photos, the default that needs no download).
"""

from __future__ import annotations

import glob
import os
import pathlib

import datasets
import numpy as np
from PIL import Image

from codec.common.atomic import write_atomically


# ---------------------------------------------------------------------------------------------------------------
# Dataset loading
# ---------------------------------------------------------------------------------------------------------------

_TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
# Files save_to_disk writes: dataset_dict.json for a DatasetDict, state.json + dataset_info.json for a Dataset.
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")


def _load_saved(source: str, split: str) -> datasets.Dataset:
    """A save_to_disk directory. A saved single Dataset has no splits, so `split` only applies to a DatasetDict."""
    loaded = datasets.load_from_disk(source)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"saved dataset {source!r} has no split {split!r}; available splits: {list(loaded)}")
        return loaded[split]
    return loaded


def _load_folder(source: str, split: str) -> datasets.Dataset:
    """An image folder; metadata.jsonl/csv add columns (captions), sub-folders add a 'label' column."""
    try:
        loaded = datasets.load_dataset("imagefolder", data_dir=source, split=split)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(
            f"could not load image folder {source!r} as split {split!r}: {exc}. Put .png/.jpg files in it; "
            f"sub-folders named train/, validation/ (or val/, valid/, dev/) and test/ become the splits "
            f"'train', 'validation' and 'test', other sub-folder names become a 'label' column"
        ) from exc
    if len(loaded) == 0:
        raise ValueError(f"image folder {source!r} holds no images for split {split!r}")
    return loaded


def _load_tables(source: str) -> datasets.Dataset:
    """Parquet/arrow files or a glob of them; datasets puts all data_files in one 'train' split."""
    if "://" not in source and next(glob.iglob(source, recursive=True), None) is None:
        raise FileNotFoundError(f"no files match {source!r}; pass an existing .parquet/.arrow file or glob")
    builder = _TABLE_BUILDERS[pathlib.PurePath(source).suffix.lower()]
    return datasets.load_dataset(builder, data_files=source, split="train")


def _load_hub(source: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # network, auth, missing repo, missing split: all mean "not usable from here"
        raise RuntimeError(
            f"could not load dataset {source!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(exc).__name__}: {exc}. This machine may have no network access. Pass a local image folder, "
            f"a directory written by save_to_disk, or .parquet/.arrow files instead."
        ) from exc


def _load_any(source: str, split: str) -> datasets.Dataset:
    if os.path.isdir(source):
        if any(os.path.exists(os.path.join(source, marker)) for marker in _SAVED_DATASET_MARKERS):
            return _load_saved(source, split)
        return _load_folder(source, split)
    if pathlib.PurePath(source).suffix.lower() in _TABLE_BUILDERS:
        return _load_tables(source)
    if os.path.exists(source):
        raise ValueError(
            f"{source!r} is a file but not .parquet/.arrow; pass an image folder, a save_to_disk directory, "
            f"or parquet/arrow files"
        )
    return _load_hub(source, split)


def _pick_image_column(dataset: datasets.Dataset, image_column: str | None, source: str) -> str:
    features = dataset.features
    if image_column is not None:
        if image_column not in features:
            raise ValueError(
                f"dataset {source!r} has no column {image_column!r}; available columns: {list(features)}"
            )
        return image_column
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    described = {name: type(feature).__name__ for name, feature in features.items()}
    raise ValueError(
        f"dataset {source!r} has no column of type datasets.Image (columns: {described}); "
        f"pass image_column= naming the column that holds image paths or bytes"
    )


def load_image_dataset(
    source: str | os.PathLike, image_column: str | None = None, split: str = "train"
) -> tuple[datasets.Dataset, str]:
    """Load images from a folder, a save_to_disk directory, parquet/arrow files, or a Hub name.

    The image column comes back as datasets.Image(decode=False): nothing is decoded at load time, so one broken
    file cannot stop loading; decode_image decides per item later. Returns (dataset, image column name).
    """
    source = os.fspath(source)
    dataset = _load_any(source, split)
    column = _pick_image_column(dataset, image_column, source)
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
