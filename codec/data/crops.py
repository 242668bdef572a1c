"""The codec's torch datasets: training crops keyed by a global draw number, and fixed centre crops.

What a run sees is a pure function of (seed, draw number), which makes training reproducible, resumable
mid-epoch, and independent of how many processes share the work (codec/common/draws.py).

A left-right mirror turns "a red circle on the left" into a picture of one on the right, so a captioned crop is
mirrored together with its caption (`mirror_caption`), never alone.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from codec.common.draws import keyed_generator
from codec.data.images import UnreadableImage, decode_image, pil_to_tensor, resize_shorter_side

logger = logging.getLogger(__name__)

# Whole words that name a side: "left"/"right" and the forms built on them ("leftmost", "left-hand", "left-handed",
# "leftward(s)", "top-left"). Only these: "east"/"west" or "clockwise" need the scene's orientation to be mirrored
# correctly, and "right" meaning "correct" or "left" meaning "gone" ("left behind") are rewritten wrongly, which is
# why a caller may refuse to mirror captioned images instead (codec/shards/encode.py --flip uncaptioned-only).
_SIDE_WORD = re.compile(r"\b(left|right)(?=(?:most|wards?)?\b)", re.IGNORECASE)  # '-' ends a word: left-hand
_OPPOSITE_SIDE = {"left": "right", "right": "left"}


def _in_case_of(word: str, replacement: str) -> str:
    if word.isupper():
        return replacement.upper()
    return replacement.capitalize() if word[0].isupper() else replacement


def mirror_caption(text: str) -> str:
    """The caption of `text`'s image mirrored left-right: every side word swapped for its opposite, case kept.

    'A red circle at the top left' -> 'A red circle at the top right'; 'LEFTMOST' -> 'RIGHTMOST'; 'leftover' and
    'bright' are not side words and stay. Applying it twice gives `text` back."""
    return _SIDE_WORD.sub(lambda m: _in_case_of(m.group(1), _OPPOSITE_SIDE[m.group(1).lower()]), text)


# ---------------------------------------------------------------------------------------------------------------
# Torch datasets
# ---------------------------------------------------------------------------------------------------------------


def _undecoded(dataset: Any, image_column: str) -> Any:
    """Check the column exists and make sure indexing yields raw records: decoding inside datasets would raise on
    a broken file before decode_image could report and skip it."""
    features = getattr(dataset, "features", None)
    if features is None:  # a record index (codec.data.index) or a plain sequence of mappings; nothing to cast
        columns = getattr(dataset, "column_names", None)
        if columns is not None and image_column not in columns:
            raise ValueError(f"dataset has no column {image_column!r}; available columns: {list(columns)}")
        return dataset
    if image_column not in features:
        raise ValueError(f"dataset has no column {image_column!r}; available columns: {list(features)}")
    feature = features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _image(row: dict, image_column: str) -> Any:
    """The row's image for decode_image; a record whose bytes could not even be got (a tar's sample without an image
    member, a truncated tar: codec.data.index) is unreadable with its reason, like a broken file."""
    if "reject" in row:
        raise UnreadableImage(row["reject"], row.get("id"))
    return row[image_column]


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
        conditions: torch.Tensor | None = None,
        mirrored_conditions: torch.Tensor | None = None,
    ):
        if crop_size < 1:
            raise ValueError(f"TrainCrops: crop_size must be >= 1, got {crop_size}")
        if resize is not None and resize < 1:
            raise ValueError(f"TrainCrops: resize must be >= 1 or None, got {resize}")
        if len(dataset) == 0:
            raise ValueError("TrainCrops: the dataset is empty; point the data source at a folder with images")
        if mirrored_conditions is not None and (conditions is None or mirrored_conditions.shape != conditions.shape):
            raise ValueError(f"TrainCrops: mirrored_conditions must match conditions row for row, got "
                             f"{None if conditions is None else tuple(conditions.shape)} and "
                             f"{tuple(mirrored_conditions.shape)}")
        self.dataset = _undecoded(dataset, image_column)
        self.image_column = image_column
        self.crop_size = crop_size
        self.seed = seed
        self.resize = resize
        self.flip = flip
        # One condition per dataset row (a conditional codec's labels or caption embeddings), returned with the
        # row's crop: a replaced unreadable image brings its replacement's condition.
        self.conditions = conditions
        # The conditions of the rows' mirrored captions (mirror_caption), given to a mirrored crop instead: without
        # them a text-conditioned codec would learn "on the left" from shapes on the right. None: conditions that
        # no mirror contradicts (class labels), or flip=False.
        self.mirrored_conditions = mirrored_conditions
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

    def _readable_image(self, index: int) -> tuple[int, Image.Image]:
        n = len(self.dataset)
        # _crop resizes to this shorter side (or crop_size, if larger) first, so a JPEG may decode smaller.
        min_side = None if self.resize is None else max(self.resize, self.crop_size)
        for candidate in ((index + k) % n for k in range(n)):
            if candidate in self.rejected:
                continue
            try:
                return candidate, decode_image(_image(self.dataset[candidate], self.image_column), min_side)
            except UnreadableImage as exc:
                self.rejected[candidate] = str(exc)
                logger.warning("skipping unreadable training image at index %d: %s", candidate, exc)
        raise RuntimeError(
            f"TrainCrops: all {n} images are unreadable (first reasons: {list(self.rejected.values())[:3]}); "
            f"check the data source"
        )

    def _crop(self, img: Image.Image, draw: int) -> tuple[torch.Tensor, bool]:
        """The crop's pixels and whether they were mirrored."""
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
        mirror = self.flip and mirror
        return (pixels.flip(-1) if mirror else pixels), mirror

    def __getitem__(self, draw: int) -> dict[str, torch.Tensor]:
        index, img = self._readable_image(self.item_index(draw))
        pixels, mirrored = self._crop(img, int(draw))
        item = {"pixels": pixels, "draw": torch.tensor(int(draw), dtype=torch.int64)}
        if self.conditions is not None:
            rows = self.mirrored_conditions if mirrored and self.mirrored_conditions is not None else self.conditions
            item["condition"] = rows[index]
        return item


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

    def __init__(self, dataset: Any, image_column: str, size: int, limit: int | None = None,
                 conditions: torch.Tensor | None = None):
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
                img = decode_image(_image(dataset[index], image_column))
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
        # The kept images' conditions (one per dataset row given), for a conditional codec; else None.
        self.conditions = None if conditions is None else conditions[torch.tensor(self._indices)]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"pixels": self._crops[i].float().div(127.5).sub(1.0), "index": self._indices[i]}
        if self.conditions is not None:
            item["condition"] = self.conditions[i]
        return item
