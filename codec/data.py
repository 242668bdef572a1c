"""Image data for the codec: robust decoding, dataset loading, and reproducible crops.

Training images come from many places (image folders, saved datasets, parquet shards, the Hub) and some of
them are broken. Everything here is built so that a bad file is reported and skipped instead of killing a
long run, and so that what a run sees is a pure function of (seed, draw number) -- which makes training
reproducible, resumable mid-epoch, and independent of how many processes share the work.
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import logging
import math
import os
import pathlib
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import datasets
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_TRAIN",
    "BUNDLED_VAL",
    "CenterCrops",
    "DrawSampler",
    "TrainCrops",
    "UnreadableImage",
    "bundled_photos",
    "decode_image",
    "keyed_generator",
    "load_image_dataset",
    "pil_to_tensor",
    "resize_shorter_side",
    "tensor_to_pil",
    "to_rgb",
]


class UnreadableImage(Exception):
    """An image that cannot be turned into RGB pixels.

    Carries a short human `reason` ('truncated file', 'zero-size file', 'decompression bomb: 300000000 pixels',
    'not an image: ...') and the `source` it came from, so the warning a training run logs tells the operator
    which file to delete or re-download.
    """

    def __init__(self, reason: str, source: str | None = None):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


# ---------------------------------------------------------------------------------------------------------------
# Pixel conversion
# ---------------------------------------------------------------------------------------------------------------

# Modes PIL converts to RGB correctly on its own (CMYK JPEGs with the Adobe marker are already un-inverted on read).
_PLAIN_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
# Modes that carry alpha; they are composited over white because a codec sees no alpha, and black (PIL's default
# when dropping alpha) would turn transparent logos and cut-outs into black blobs that dominate the loss.
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _exif_upright(img: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF orientation tag, because cameras store pixels sideways and only the tag says so."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
        return img  # skip exif_transpose's full copy for the common upright case
    return ImageOps.exif_transpose(img)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    """Replicate an already scaled float 0..255 gray plane into 8-bit RGB."""
    plane = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([plane] * 3, axis=-1))


def _int32_divisor(values: np.ndarray) -> float:
    """Divisor that maps a mode-'I' image to 0..255.

    Mode 'I' does not say how many bits the source had, so use the smallest unsigned integer type the data fits:
    max <= 255 -> 8-bit (divisor 1), max <= 65535 -> 16-bit (divisor 257, e.g. 16-bit PNGs from older Pillow),
    otherwise full int32 range. Scaling by the observed maximum instead would make every image span full
    brightness and change the content the codec learns to reproduce. A genuinely 16-bit image whose pixels are all
    <= 255 will therefore look 257x too bright; that is the price of not knowing the bit depth.
    """
    peak = int(values.max()) if values.size else 0
    if peak <= 255:
        return 1.0
    if peak <= 65535:
        return 257.0
    return (2**31 - 1) / 255.0


def _float_to_rgb(img: Image.Image) -> Image.Image:
    """Mode 'F': data <= 1 is taken as 0..1 intensities, anything larger as 0..255; NaN becomes black."""
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.max() <= 1.0:
        values = np.clip(values, 0.0, 1.0) * 255.0
    return _gray_to_rgb(values)


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Flatten any image with alpha (or a transparency key) onto white."""
    if img.mode == "La":
        img = img.convert("LA")  # PIL cannot go from premultiplied La straight to RGBA
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image to upright 8-bit RGB, the only format the codec consumes.

    Integer modes are scaled by their bit depth rather than clipped: PIL's own I;16 -> L conversion clips at 255,
    which would turn nearly every 16-bit photo white. I;16* divides by 257 (65535 -> 255); mode 'I' follows
    `_int32_divisor`; mode 'F' follows `_float_to_rgb`. Alpha and transparency keys are composited over white.
    """
    img = _exif_upright(img)
    mode = img.mode
    if mode in _UINT16_MODES:
        return _gray_to_rgb(np.asarray(img).astype(np.float64) / 257.0)
    if mode == "I":
        values = np.clip(np.asarray(img).astype(np.float64), 0, None)  # negative counts carry no brightness
        return _gray_to_rgb(values / _int32_divisor(values))
    if mode == "F":
        return _float_to_rgb(img)
    if mode in _ALPHA_MODES or (mode in _PLAIN_MODES and img.has_transparency_data):
        return _composite_on_white(img)
    if mode == "RGB":
        return img
    if mode in _PLAIN_MODES:
        return img.convert("RGB")
    raise ValueError(
        f"to_rgb: PIL mode {mode!r} (image size {img.size}) is not supported; convert the file to an 8/16-bit "
        f"RGB or grayscale format (PNG or JPEG) first"
    )


# ---------------------------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------------------------


def _source_name(value: Any) -> str:
    """A name for error messages: the file path when there is one."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Mapping):
        if value.get("path"):
            return str(value["path"])
        return "<in-memory image bytes>"
    if isinstance(value, Image.Image):
        return getattr(value, "filename", "") or f"<PIL image {value.mode} {value.size}>"
    return repr(value)[:80]


def _read_bytes(path: str) -> bytes:
    """Whole file contents; URLs ('hf://', 'zip://...::...') go through fsspec like datasets itself does."""
    try:
        if "://" in path:
            import fsspec  # datasets depends on fsspec; imported lazily as only remote paths need it

            with fsspec.open(path, "rb") as fh:
                return fh.read()
        return pathlib.Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise UnreadableImage("file not found", path) from exc
    except IsADirectoryError as exc:
        raise UnreadableImage("is a directory, not an image file", path) from exc
    except OSError as exc:  # permissions, I/O errors: the file, not its format, is the problem
        raise UnreadableImage(f"cannot read file: {exc}", path) from exc


def _encoded_bytes(value: Any, source: str) -> bytes:
    """The encoded file bytes of a path or a datasets {'bytes', 'path'} record."""
    if isinstance(value, (str, os.PathLike)):
        return _read_bytes(os.fspath(value))
    if value.get("bytes") is not None:  # bytes win: in saved datasets 'path' is only the original file name
        return bytes(value["bytes"])
    if value.get("path"):
        return _read_bytes(str(value["path"]))
    raise UnreadableImage("record has neither 'bytes' nor 'path'", source)


def _bomb_reason(pixels: int | str) -> str:
    return f"decompression bomb: {pixels} pixels (limit Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS})"


def _bomb_pixels(exc: Exception) -> str:
    """Pixel count from PIL's bomb message ('Image size (N pixels) exceeds ...'); PIL offers no attribute."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return match.group(1) if match else f"? ({exc})"


def _jpeg_draft(img: Image.Image, min_side: int) -> None:
    """Let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale when the shorter side stays >= min_side.

    The IDCT does the downscaling, so a 12-megapixel photo headed for 512x512 decodes in a fraction of the time
    and memory and leaves a much smaller image for the bicubic resize: it keeps data workers ahead of the codec.
    The shorter side does not change under EXIF rotation, so the request is made before it."""
    width, height = img.size
    scale = min_side / min(width, height)
    if scale < 1.0:
        img.draft(img.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _open_loaded(value: Any, source: str, min_side: int | None = None) -> Image.Image:
    """Open and fully decode, so truncation shows up here and not later inside a resize."""
    if isinstance(value, Image.Image):
        width, height = value.size
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            # Image.open's bomb check never ran for an already open image; keep the rule the same for all inputs.
            raise UnreadableImage(_bomb_reason(width * height), source)
        value.load()
        return value
    data = _encoded_bytes(value, source)
    if not data:
        raise UnreadableImage("zero-size file", source)
    img = Image.open(io.BytesIO(data))
    if min_side is not None and img.format == "JPEG":
        _jpeg_draft(img, min_side)
    img.load()
    return img


def decode_image(value: Any, min_side: int | None = None) -> Image.Image:
    """Decode a path, PIL image, or datasets record ({'bytes', 'path'} from Image(decode=False)) to RGB.

    With `min_side`, a JPEG may come back smaller than stored (never with a shorter side below min_side): the
    caller is about to downscale it anyway, and libjpeg's reduced-size decoding is several times faster.

    Every failure of the file itself becomes UnreadableImage naming the file, so callers need one except clause
    to skip bad data. Images above PIL's MAX_IMAGE_PIXELS are refused: PIL only warns for them, but a 300-MP
    image would stall a data worker for seconds and exhaust its memory. LOAD_TRUNCATED_IMAGES is left False on
    purpose; half-grey truncated images would be silently trained on.
    """
    if not isinstance(value, (str, os.PathLike, Mapping, Image.Image)):
        # a caller bug, not a bad file: fail loudly instead of skipping every item as unreadable
        raise TypeError(
            f"decode_image: expected a path, a PIL image or a datasets image record {{'bytes', 'path'}}, "
            f"got {type(value).__name__}"
        )
    source = _source_name(value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return to_rgb(_open_loaded(value, source, min_side))
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(_bomb_reason(_bomb_pixels(exc)), source) from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImage("not an image: PIL cannot identify the file format", source) from exc
    except OSError as exc:
        reason = "truncated file" if "truncated" in str(exc) else f"corrupt image data: {exc}"
        raise UnreadableImage(reason, source) from exc
    except Exception as exc:  # PIL plugins raise SyntaxError, ValueError, struct.error, ... for corrupt headers
        raise UnreadableImage(f"cannot decode: {type(exc).__name__}: {exc}", source) from exc


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # not an image suffix: imagefolder ignores it
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


# ---------------------------------------------------------------------------------------------------------------
# Geometry and tensors
# ---------------------------------------------------------------------------------------------------------------


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is exactly `size`, keeping aspect ratio.

    PIL's bicubic resize widens its kernel when shrinking, i.e. it antialiases, so downscaled training images do not
    alias into patterns the codec would then learn.
    """
    if size < 1:
        raise ValueError(f"resize_shorter_side: size must be >= 1, got {size}")
    width, height = img.size
    shorter = min(width, height)
    if shorter == size:
        return img
    scale = size / shorter
    new_size = (size, max(size, round(height * scale))) if width <= height else (max(size, round(width * scale)), size)
    return img.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image to float32 (3, H, W) in [-1, 1], the range the codec trains and evaluates in."""
    if img.mode != "RGB":
        raise ValueError(f"pil_to_tensor: expected an RGB image, got mode {img.mode!r}; call to_rgb first")
    array = np.array(img, dtype=np.uint8, copy=True)  # copy: PIL's buffer is read-only and torch warns on it
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """Inverse of pil_to_tensor; clamps first because decoder outputs overshoot [-1, 1]."""
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"tensor_to_pil: expected a (3, H, W) tensor, got shape {tuple(t.shape)}")
    scaled = (t.detach().to("cpu", torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5
    array = scaled.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(array)


# ---------------------------------------------------------------------------------------------------------------
# Torch datasets and sampler
# ---------------------------------------------------------------------------------------------------------------


def keyed_generator(*parts: int | str) -> torch.Generator:
    """A generator seeded by a stable 63-bit hash of `parts`: hashlib rather than hash(), which is salted per
    Python process. Every draw-keyed random choice of both trainers and the shard reader comes from here."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _undecoded(dataset: Any, image_column: str) -> Any:
    """Check the column exists and make sure indexing yields raw records: decoding inside datasets would raise on
    a broken file before decode_image could report and skip it."""
    features = getattr(dataset, "features", None)
    if features is None:
        return dataset  # a plain sequence of mappings; nothing to cast
    if image_column not in features:
        raise ValueError(f"dataset has no column {image_column!r}; available columns: {list(features)}")
    feature = features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


class TrainCrops(torch.utils.data.Dataset):
    """Deterministic random crops keyed by a global draw counter.

    Draw d maps to epoch e = d // n and item perm_e[d % n], where perm_e is a permutation of range(n) seeded by
    (seed, e); the crop box and flip come from a generator seeded by (seed, d). So the data a run sees depends
    only on the seed and how many draws were consumed -- not on process count, worker count or restarts.

    Unreadable images are logged once per index (per process: each DataLoader worker keeps its own record),
    remembered in `rejected` (index -> reason), and replaced by the next readable item (index + 1 mod n) so every
    batch is full.
    """

    def __init__(
        self,
        dataset: Any,
        image_column: str,
        crop_size: int,
        seed: int,
        resize: int | None = None,
        flip: bool = True,
    ):
        if crop_size < 1:
            raise ValueError(f"TrainCrops: crop_size must be >= 1, got {crop_size}")
        if resize is not None and resize < 1:
            raise ValueError(f"TrainCrops: resize must be >= 1 or None, got {resize}")
        if len(dataset) == 0:
            raise ValueError("TrainCrops: the dataset is empty; point the data source at a folder with images")
        self.dataset = _undecoded(dataset, image_column)
        self.image_column = image_column
        self.crop_size = crop_size
        self.seed = seed
        self.resize = resize
        self.flip = flip
        self.rejected: dict[int, str] = {}
        self._cached_perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return 2**62  # the draw space is unbounded; the sampler decides what is drawn

    def _permutation(self, epoch: int) -> list[int]:
        if self._cached_perm is None or self._cached_perm[0] != epoch:
            perm = torch.randperm(len(self.dataset), generator=keyed_generator("perm", self.seed, epoch)).tolist()
            self._cached_perm = (epoch, perm)
        return self._cached_perm[1]

    def item_index(self, draw: int) -> int:
        """Dataset index that draw `draw` asks for (before skipping unreadable images)."""
        if draw < 0:
            raise ValueError(f"TrainCrops: draw must be >= 0, got {draw}")
        epoch, position = divmod(int(draw), len(self.dataset))
        return self._permutation(epoch)[position]

    def _readable_image(self, index: int) -> Image.Image:
        n = len(self.dataset)
        # _crop resizes to this shorter side (or crop_size, if larger) first, so a JPEG may decode smaller.
        min_side = None if self.resize is None else max(self.resize, self.crop_size)
        for candidate in ((index + k) % n for k in range(n)):
            if candidate in self.rejected:
                continue
            try:
                return decode_image(self.dataset[candidate][self.image_column], min_side)
            except UnreadableImage as exc:
                self.rejected[candidate] = str(exc)
                logger.warning("skipping unreadable training image at index %d: %s", candidate, exc)
        raise RuntimeError(
            f"TrainCrops: all {n} images are unreadable (first reasons: {list(self.rejected.values())[:3]}); "
            f"check the data source"
        )

    def _crop(self, img: Image.Image, draw: int) -> torch.Tensor:
        if self.resize is not None:
            img = resize_shorter_side(img, self.resize)
        if min(img.size) < self.crop_size:
            img = resize_shorter_side(img, self.crop_size)
        width, height = img.size
        generator = keyed_generator("crop", self.seed, draw)
        left = int(torch.randint(width - self.crop_size + 1, (1,), generator=generator))
        top = int(torch.randint(height - self.crop_size + 1, (1,), generator=generator))
        mirror = bool(torch.rand((), generator=generator) < 0.5)  # drawn even if flip=False: same boxes either way
        pixels = pil_to_tensor(img.crop((left, top, left + self.crop_size, top + self.crop_size)))
        return pixels.flip(-1) if self.flip and mirror else pixels

    def __getitem__(self, draw: int) -> dict[str, torch.Tensor]:
        img = self._readable_image(self.item_index(draw))
        return {"pixels": self._crop(img, int(draw)), "draw": torch.tensor(int(draw), dtype=torch.int64)}


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    img = resize_shorter_side(img, size)
    width, height = img.size
    left, top = (width - size) // 2, (height - size) // 2
    return img.crop((left, top, left + size, top + size))


class CenterCrops(torch.utils.data.Dataset):
    """Validation/evaluation images: shorter side resized to `size`, then a centre size x size crop.

    Decodes everything once at construction (validation sets are small) so each evaluation pass is cheap and
    identical. Unreadable images are skipped with a logged reason and listed in `rejected` as (index, reason).
    `limit` caps the number of *kept* images, so a broken file does not shrink the validation set. "index" in each
    item is the dataset index, so reports can name the image.
    """

    def __init__(self, dataset: Any, image_column: str, size: int, limit: int | None = None):
        if size < 1:
            raise ValueError(f"CenterCrops: size must be >= 1, got {size}")
        if limit is not None and limit < 1:
            raise ValueError(f"CenterCrops: limit must be >= 1 or None, got {limit}")
        dataset = _undecoded(dataset, image_column)
        self.size = size
        self.rejected: list[tuple[int, str]] = []
        self._indices: list[int] = []
        crops: list[torch.Tensor] = []
        for index in range(len(dataset)):
            if limit is not None and len(crops) >= limit:
                break
            try:
                img = decode_image(dataset[index][image_column])
            except UnreadableImage as exc:
                self.rejected.append((index, str(exc)))
                logger.warning("skipping unreadable validation image at index %d: %s", index, exc)
                continue
            array = np.array(_center_crop(img, size), dtype=np.uint8, copy=True)
            crops.append(torch.from_numpy(array).permute(2, 0, 1))  # uint8 keeps the cache 4x smaller
            self._indices.append(index)
        if not crops:
            raise RuntimeError(
                f"CenterCrops: none of the {len(dataset)} images could be read (reasons: {self.rejected[:3]}); "
                f"check the validation source"
            )
        self._crops = torch.stack(crops)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"pixels": self._crops[i].float().div(127.5).sub(1.0), "index": self._indices[i]}


class DrawSampler(torch.utils.data.Sampler[int]):
    """Yields start, start + 1, ... forever: the global draw counter for TrainCrops.

    To resume, start at the number of draws already consumed (steps x global batch size); the run then continues
    with exactly the images and crops it would have seen without the interruption.
    """

    def __init__(self, start: int = 0):
        if start < 0:
            raise ValueError(f"DrawSampler: start must be >= 0, got {start}")
        self.start = int(start)

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)
