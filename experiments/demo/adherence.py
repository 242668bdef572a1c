"""Prompt adherence for the shapes world: does an image show the colour, place and shape its caption asks for?

Read from pixels alone, with no learned model, so the score cannot share a generator's blind spots and a reader
can check every decision by hand. The steps, each a function below:

1. background = median colour of the image border (shapes never touch the border; a median ignores the texture);
2. every pixel gets the nearest of {background, object palette colours}; a pixel nearest a palette colour but
   more than COLOR_RADIUS from it is washed out and counted as nothing;
3. colour = the palette colour with most pixels, if it covers at least MIN_OBJECT_FRACTION of the image;
4. position = the centroid of that colour's pixels on the 3x3 grid of thirds;
5. shape = the ideal shape nearest in (extent, solidity) of that colour's largest connected blob.

Nearest-of-background-and-colour puts an anti-aliased edge pixel on the side covering more than half of it, so
masks neither grow nor shrink at the edges and centroids stay unbiased. The shape step is the weakest: at 32 px a
star's points are one or two pixels wide.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from skimage.measure import label, regionprops

from experiments.demo.shapes import BACKGROUND_COLORS, OBJECT_COLORS, POSITION_PHRASES, POSITIONS, SHAPES, STAR_INNER

__all__ = [
    "Detection",
    "Prompt",
    "chance_levels",
    "detect",
    "parse_prompt",
    "score",
    "shows_one_shape",
    "summarise",
]

COLOR_RADIUS = 110.0  # 8-bit RGB distance; the closest two palette colours are 140 apart, so no pixel is ambiguous
MIN_OBJECT_FRACTION = 0.01  # the smallest rendered object (a triangle of radius 0.18) covers 4.2% of the image
ATTRIBUTES = ("color", "position", "shape", "background")


def _star_moments(inner: float) -> tuple[float, float]:
    """(extent, solidity) of the upright five-pointed star with outer radius 1 and inner radius `inner`.

    Area = 10 triangles of sides 1 and `inner` at 36 degrees; the bounding box spans the outer points at +-18
    degrees from horizontal (width 2 cos 18) and from the top point down to those at 54 degrees below
    (height 1 + sin 54); the convex hull is the regular pentagon through the outer points, area 5/2 sin 72.
    """
    area = 5 * inner * np.sin(np.radians(36))
    box = 2 * np.cos(np.radians(18)) * (1 + np.sin(np.radians(54)))
    hull = 2.5 * np.sin(np.radians(72))
    return float(area / box), float(area / hull)


# (extent = area / bounding-box area, solidity = area / convex-hull area) of each ideal, upright shape.
SHAPE_MOMENTS: dict[str, tuple[float, float]] = {
    "circle": (np.pi / 4, 1.0),
    "square": (1.0, 1.0),
    "triangle": (0.5, 1.0),  # any triangle with a side along its bounding box fills half of it
    "star": _star_moments(STAR_INNER),
}


@dataclass(frozen=True)
class Prompt:
    color: str
    shape: str
    position: str
    background: str


@dataclass(frozen=True)
class Detection:
    """What the pixels show. color/position/shape are None when no object colour covers enough of the image."""

    color: str | None
    position: str | None
    shape: str | None
    background: str
    object_fraction: float  # of the image, in the detected colour
    extent: float | None
    solidity: float | None


def _alternation(words: Iterable[str]) -> str:
    # longest first, so "top left" is tried before "top"
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE_TO_POSITION = {phrase: position for position, phrase in POSITION_PHRASES.items()}
_PROMPT = re.compile(
    rf"an? (?P<color>{_alternation(OBJECT_COLORS)}) (?P<shape>{_alternation(SHAPES)}) "
    rf"(?P<where>{_alternation(_PHRASE_TO_POSITION)}) on an? (?P<background>{_alternation(BACKGROUND_COLORS)}) "
    rf"background"
)


def parse_prompt(text: str) -> Prompt:
    """Inverse of experiments.demo.shapes.caption; case, surrounding spaces and a final full stop are ignored."""
    match = _PROMPT.fullmatch(" ".join(text.lower().split()).rstrip("."))
    if match is None:
        raise ValueError(
            f"parse_prompt: {text!r} is not a shapes-world caption; expected e.g. 'a red circle at the top left on "
            f"a navy background' with a colour from {list(OBJECT_COLORS)}, a shape from {list(SHAPES)}, a place "
            f"from {list(_PHRASE_TO_POSITION)} and a background from {list(BACKGROUND_COLORS)}"
        )
    return Prompt(match["color"], match["shape"], _PHRASE_TO_POSITION[match["where"]], match["background"])


# ---------------------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------------------


def _as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 RGB in 0..255 from a PIL image (any mode) or a uint8 (H, W, 3) array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        described = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"adherence: expected a PIL image or a uint8 (H, W, 3) RGB array, got {described}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"adherence: image of {image.shape[1]}x{image.shape[0]} pixels is too small; need >= 16")
    return image.astype(np.float64)


def border_color(pixels: np.ndarray) -> np.ndarray:
    """Median RGB of a ring along the edges, about 1/64 of the side wide."""
    width = max(1, min(pixels.shape[:2]) // 64)
    ring = np.concatenate([pixels[:width].reshape(-1, 3), pixels[-width:].reshape(-1, 3),
                           pixels[:, :width].reshape(-1, 3), pixels[:, -width:].reshape(-1, 3)])
    return np.median(ring, axis=0)


def color_labels(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(H, W) int: index into OBJECT_COLORS of each object pixel, -1 for background and washed-out pixels."""
    palette = np.asarray(list(OBJECT_COLORS.values()), dtype=np.float64)
    references = np.concatenate([background[None, :], palette])  # reference 0 is the background
    # one (H, W) plane per reference rather than one (H, W, refs, 3) difference array: 8x less memory at 512 px
    squared = np.stack([((pixels - ref) ** 2).sum(axis=-1) for ref in references], axis=-1)
    nearest = squared.argmin(axis=-1)
    close = squared.min(axis=-1) <= COLOR_RADIUS**2
    return np.where((nearest > 0) & close, nearest - 1, -1)


def grid_position(mask: np.ndarray) -> str:
    """The 3x3 cell (thirds of width and height) holding the centroid of `mask`'s pixels."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    row = min(int(3 * (rows.mean() + 0.5) / height), 2)
    col = min(int(3 * (cols.mean() + 0.5) / width), 2)
    return POSITIONS[3 * row + col]


def blob_moments(mask: np.ndarray) -> tuple[float, float]:
    """(extent, solidity) of the largest 8-connected blob of `mask`."""
    blob = max(regionprops(label(mask, connectivity=2)), key=lambda region: region.area)
    return float(blob.extent), float(blob.solidity)


def nearest_shape(extent: float, solidity: float) -> str:
    return min(SHAPE_MOMENTS, key=lambda s: np.hypot(extent - SHAPE_MOMENTS[s][0], solidity - SHAPE_MOMENTS[s][1]))


def nearest_background(rgb: np.ndarray) -> str:
    return min(BACKGROUND_COLORS, key=lambda name: float(np.linalg.norm(rgb - np.asarray(BACKGROUND_COLORS[name]))))


def detect(image: Image.Image | np.ndarray) -> Detection:
    """Colour, position and shape of the dominant object, and the background, as the pixels show them."""
    pixels = _as_pixels(image)
    background = border_color(pixels)
    labels = color_labels(pixels, background)
    counts = np.bincount(labels[labels >= 0], minlength=len(OBJECT_COLORS))
    winner = int(counts.argmax())
    fraction = float(counts[winner]) / labels.size
    if fraction < MIN_OBJECT_FRACTION:
        return Detection(None, None, None, nearest_background(background), fraction, None, None)
    mask = labels == winner
    extent, solidity = blob_moments(mask)
    return Detection(
        color=list(OBJECT_COLORS)[winner],
        position=grid_position(mask),
        shape=nearest_shape(extent, solidity),
        background=nearest_background(background),
        object_fraction=fraction,
        extent=extent,
        solidity=solidity,
    )


ONE_SHAPE_BLOB = 0.9  # of the colour's pixels in its largest blob: one object, not a scatter of specks
MAX_OBJECT_FRACTION = 0.35  # the largest rendered object (a circle of radius 0.22) covers 15% of the image


def shows_one_shape(image: Image.Image | np.ndarray) -> bool:
    """Whether the image shows what every shapes-world image shows, whatever its caption: a single object of one
    palette colour (one blob holding >= 90% of that colour's pixels, between 1% and 35% of the image) and no second
    object colour. The coherence of an unconditional generator's samples, which have no prompt to be scored against."""
    pixels = _as_pixels(image)
    labels = color_labels(pixels, border_color(pixels))
    counts = np.bincount(labels[labels >= 0], minlength=len(OBJECT_COLORS))
    winner = int(counts.argmax())
    fractions = counts / labels.size
    if not MIN_OBJECT_FRACTION <= fractions[winner] <= MAX_OBJECT_FRACTION:
        return False
    if np.delete(fractions, winner).max() >= MIN_OBJECT_FRACTION:
        return False
    largest = max(region.area for region in regionprops(label(labels == winner, connectivity=2)))
    return bool(largest >= ONE_SHAPE_BLOB * counts[winner])


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------


def score(image: Image.Image | np.ndarray, prompt: str) -> dict:
    """One image against its prompt: {attribute}_ok booleans, the asked and the detected value of each attribute."""
    asked = parse_prompt(prompt)
    found = detect(image)
    row: dict = {"prompt": prompt, "object_fraction": found.object_fraction}
    for attribute in ATTRIBUTES:
        wanted, seen = getattr(asked, attribute), getattr(found, attribute)
        row[attribute] = wanted
        row[f"detected_{attribute}"] = seen
        row[f"{attribute}_ok"] = seen == wanted
    return row


def chance_levels() -> dict[str, float]:
    """Adherence of a generator that ignores its prompt, for prompts drawn uniformly (as experiments.demo.shapes.scenes
    draws them): it matches each attribute with probability 1 / (number of values), whatever it draws."""
    levels = {"color": 1 / len(OBJECT_COLORS), "position": 1 / len(POSITIONS), "shape": 1 / len(SHAPES),
              "background": 1 / len(BACKGROUND_COLORS)}
    levels["all"] = float(np.prod(list(levels.values())))
    return levels


def _percentages(rows: list[dict]) -> dict[str, float]:
    out = {attribute: 100.0 * np.mean([r[f"{attribute}_ok"] for r in rows]) for attribute in ATTRIBUTES}
    out["all"] = 100.0 * np.mean([all(r[f"{a}_ok"] for a in ATTRIBUTES) for r in rows])
    out["no_object"] = 100.0 * np.mean([r["detected_color"] is None for r in rows])
    return {key: float(value) for key, value in out.items()}


def summarise(rows: list[dict]) -> dict:
    """Percent of rows (score() outputs) right per attribute, with chance levels and one table row per prompt."""
    if not rows:
        raise ValueError("summarise: no scored rows; score at least one image")
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_prompt[row["prompt"]].append(row)
    return {
        "n": len(rows),
        "percent": _percentages(rows),
        "chance_percent": {key: 100.0 * value for key, value in chance_levels().items()},
        "prompts": [{"prompt": prompt, "n": len(group), **_percentages(group)} for prompt, group in by_prompt.items()],
    }
