"""The bundled "shapes world": one big coloured shape on a muted background, with a caption that says which.

A tiny text-conditioned diffusion model trained for minutes on a CPU cannot learn photographs, but it can learn
"a red circle at the top left on a navy background". Every attribute of such a caption is checkable from pixels
(see experiments/demo/adherence.py), so the demo can measure prompt adherence instead of eyeballing it.

Everything is a pure function of its inputs: a scene of a seed, an image of a scene. The palette is chosen for the
checker, not for looks: object colours sit near the corners of the RGB cube (pairwise >= 140 apart in 8-bit RGB) and
the backgrounds are dark, muted tones >= 125 away from every object colour even at the brightest point of their
gradient, so a pixel's colour alone says whether it is object or background.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

__all__ = [
    "BACKGROUND_COLORS",
    "GRID_CENTRES",
    "OBJECT_COLORS",
    "POSITIONS",
    "POSITION_PHRASES",
    "SHAPES",
    "ShapeScene",
    "caption",
    "preview_grid",
    "render",
    "sample_scene",
    "scenes",
    "write_shapes_dataset",
]

RGB = tuple[int, int, int]

OBJECT_COLORS: dict[str, RGB] = {
    "red": (230, 30, 30),
    "green": (50, 200, 60),
    "blue": (40, 70, 230),
    "yellow": (245, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 210, 230),
    "white": (245, 245, 245),
}
BACKGROUND_COLORS: dict[str, RGB] = {
    "black": (15, 15, 15),
    "dark gray": (70, 70, 70),
    "navy": (25, 30, 85),
    "brown": (95, 60, 35),
    "dark green": (25, 65, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Row-major 3x3 grid; index = 3 * row + column.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# The preposition a person would use for each cell ("on the left", "in the center", "at the top left").
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}

# Where a cell's object is centred, as a fraction of the side. Not the cells' own centres (1/6, 1/2, 5/6): an
# object of radius 0.22 there would be cut by the image edge, which changes its shape and contaminates the
# border the checker reads the background from. 1/4 and 3/4 still lie well inside the outer thirds.
GRID_CENTRES: tuple[float, float, float] = (0.25, 0.5, 0.75)
RADIUS_RANGE = (0.18, 0.22)  # of the side: >= 5.7 px at 32 px; even a 128 px image's 8x latent keeps ~3 px of it
JITTER = 0.015  # with the largest radius the shape still stays >= 0.015 of the side away from the border
GRADIENT_STRENGTH = 0.15  # brightness +-15% across the image
TEXTURE_STD = 3.0  # 8-bit levels; low-frequency, so PNGs stay small (~11 kB at 512 px) and no blob looks like an object
STAR_INNER = 0.5  # inner/outer radius; fatter than a pentagram (0.38) so its points survive 32 px renders
SUPERSAMPLE = 4  # the mask is drawn at 4x and box-filtered: box gives each pixel its exact coverage, no ringing
GENERATOR_VERSION = 1  # bump when rendering changes, so write_shapes_dataset does not reuse stale folders


@dataclass(frozen=True)
class ShapeScene:
    """One image's content. cx, cy (the shape's centre) and radius (of its circumscribed circle) are fractions of
    the image side, so one scene renders the same picture at any size; texture_seed fixes the background."""

    color: str
    shape: str
    position: str
    background: str
    cx: float
    cy: float
    radius: float
    texture_seed: int

    def __post_init__(self) -> None:
        for field, value, allowed in (("color", self.color, OBJECT_COLORS), ("shape", self.shape, SHAPES),
                                      ("position", self.position, POSITIONS),
                                      ("background", self.background, BACKGROUND_COLORS)):
            if value not in allowed:
                raise ValueError(f"ShapeScene: {field} {value!r} is not one of {list(allowed)}")
        if not (0.0 < self.radius < 0.5 and self.radius <= self.cx <= 1 - self.radius
                and self.radius <= self.cy <= 1 - self.radius):
            raise ValueError(f"ShapeScene: a shape of radius {self.radius} at ({self.cx}, {self.cy}) does not fit "
                             f"inside the image; keep radius <= cx, cy <= 1 - radius")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: ShapeScene) -> str:
    """'a red circle at the top left on a navy background'; adherence.py parses exactly this grammar."""
    return (f"{_article(scene.color)} {scene.color} {scene.shape} {POSITION_PHRASES[scene.position]} "
            f"on {_article(scene.background)} {scene.background} background")


def sample_scene(rng: random.Random, color: str | None = None) -> ShapeScene:
    """A uniformly random scene (or one of the given colour); every number drawn comes from `rng`."""
    color = rng.choice(list(OBJECT_COLORS)) if color is None else color
    shape = rng.choice(SHAPES)
    position = rng.choice(POSITIONS)
    background = rng.choice(list(BACKGROUND_COLORS))
    row, column = divmod(POSITIONS.index(position), 3)
    return ShapeScene(
        color=color,
        shape=shape,
        position=position,
        background=background,
        cx=GRID_CENTRES[column] + rng.uniform(-JITTER, JITTER),
        cy=GRID_CENTRES[row] + rng.uniform(-JITTER, JITTER),
        radius=rng.uniform(*RADIUS_RANGE),
        texture_seed=rng.randrange(2**32),
    )


def scenes(count: int, seed: int) -> list[ShapeScene]:
    """`count` scenes; each block of len(OBJECT_COLORS) consecutive scenes holds every colour once, in a shuffled
    order, so colour counts differ by at most one and a colour-adherence score has a known chance level."""
    if count < 0:
        raise ValueError(f"scenes: count must be >= 0, got {count}")
    rng = random.Random(seed)
    colors: list[str] = []
    while len(colors) < count:
        block = list(OBJECT_COLORS)
        rng.shuffle(block)
        colors.extend(block)
    return [sample_scene(rng, color) for color in colors[:count]]


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _background(scene: ShapeScene, size: int) -> np.ndarray:
    """(size, size, 3) float: the background colour under a linear brightness gradient (vertical or one of the
    two diagonals) plus a smooth texture, both drawn from scene.texture_seed."""
    rng = np.random.default_rng(scene.texture_seed)
    dx, dy = [(0.0, 1.0), (1.0, 1.0), (-1.0, 1.0)][int(rng.integers(3))]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    coords = (np.arange(size) + 0.5) / size - 0.5
    along = sign * (dx * coords[None, :] + dy * coords[:, None]) / (abs(dx) + abs(dy))  # in [-0.5, 0.5]
    shade = 1.0 + GRADIENT_STRENGTH * 2.0 * along
    coarse = Image.fromarray(rng.normal(0.0, TEXTURE_STD, (6, 6)).astype(np.float32), mode="F")
    texture = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    base = np.asarray(BACKGROUND_COLORS[scene.background], dtype=np.float64)
    return base[None, None, :] * shade[:, :, None] + texture[:, :, None]


def _outline(scene: ShapeScene, scale: float) -> list[tuple[float, float]] | None:
    """Polygon vertices in pixels of a `scale`-sided canvas, upright; None for the circle."""
    cx, cy, r = scene.cx * scale, scene.cy * scale, scene.radius * scale
    if scene.shape == "circle":
        return None
    if scene.shape == "square":
        half = 0.8 * r  # an axis-aligned square only needs its half side <= r to stay inside; 0.8 keeps areas close
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    # Triangle and star are regular and centred on (cx, cy), so their area centroid is the scene's centre and the
    # checker's centroid-based position needs no per-shape correction.
    if scene.shape == "triangle":
        radii, points = [r], 3
    else:
        radii, points = [r, STAR_INNER * r], 5
    vertices = []
    for k in range(points * len(radii)):
        angle = -math.pi / 2 + k * 2 * math.pi / (points * len(radii))
        radius = radii[k % len(radii)]
        vertices.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return vertices


def _coverage(scene: ShapeScene, size: int) -> np.ndarray:
    """(size, size) float in [0, 1]: the fraction of each pixel the shape covers (anti-aliasing)."""
    big = size * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    outline = _outline(scene, big)
    if outline is None:
        cx, cy, r = scene.cx * big, scene.cy * big, scene.radius * big
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(outline, fill=255)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float64) / 255.0


def render(scene: ShapeScene, size: int = 512) -> Image.Image:
    """The scene as a size x size RGB image; the same scene and size always give the same pixels."""
    if size < 16:
        raise ValueError(f"render: size must be >= 16 pixels (the shape would be a few pixels wide), got {size}")
    alpha = _coverage(scene, size)[:, :, None]
    color = np.asarray(OBJECT_COLORS[scene.color], dtype=np.float64)
    pixels = _background(scene, size) * (1.0 - alpha) + color[None, None, :] * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def preview_grid(scene_list: list[ShapeScene], tile: int = 192, columns: int = 4) -> Image.Image:
    """Rendered scenes in a grid, each captioned underneath, for checking a dataset by eye."""
    font = ImageFont.load_default()
    line_height, lines = 14, 3
    cell_height = tile + line_height * lines + 6
    rows = max(1, math.ceil(len(scene_list) / columns))
    grid = Image.new("RGB", (columns * tile, rows * cell_height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, scene in enumerate(scene_list):
        left, top = (i % columns) * tile, (i // columns) * cell_height
        grid.paste(render(scene, tile), (left, top))
        for k, text in enumerate(textwrap.wrap(caption(scene), width=tile // 6)[:lines]):
            draw.text((left + 3, top + tile + 3 + k * line_height), text, fill=(0, 0, 0), font=font)
    return grid


# ---------------------------------------------------------------------------------------------------------------
# Dataset on disk
# ---------------------------------------------------------------------------------------------------------------

SETTINGS_FILE = "shapes.json"
FEATURES = datasets.Features({
    "image": datasets.Image(),
    "text": datasets.Value("string"),
    "color": datasets.Value("string"),
    "shape": datasets.Value("string"),
    "position": datasets.Value("string"),
    "background": datasets.Value("string"),
    "cx": datasets.Value("float32"),
    "cy": datasets.Value("float32"),
    "radius": datasets.Value("float32"),
})


def _rows(count: int, seed: int, size: int, progress: bool) -> Iterator[dict]:
    for scene in tqdm(scenes(count, seed), desc="rendering shapes", unit="img", disable=not progress):
        fields = asdict(scene)
        del fields["texture_seed"]
        yield {"image": render(scene, size), "text": caption(scene), **fields}


def _read_settings(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SETTINGS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _reuse_or_refuse(out: Path, settings: dict) -> bool:
    """True when `out` already holds this dataset; an `out` holding anything else is never overwritten."""
    if not out.exists():
        return False
    existing = _read_settings(out)
    if existing == settings:
        return True
    raise ValueError(f"{out} already exists but was not written with {settings} (its {SETTINGS_FILE}: {existing}); "
                     f"pass another output folder or delete this one")


def write_shapes_dataset(out_dir: str | os.PathLike, count: int, seed: int, size: int = 512,
                         progress: bool = False) -> Path:
    """Render `count` scenes of `seed` into a save_to_disk dataset (columns image, text, color, shape, position,
    background, cx, cy, radius) and return its folder.

    The folder is built beside out_dir and renamed into place, so an interrupted run never leaves a half dataset
    that a later run would take as done. A folder already written with the same count, seed and size (recorded
    in shapes.json) is returned as is.
    """
    if count < 1 or size < 16:
        raise ValueError(f"write_shapes_dataset: need count >= 1 and size >= 16, got count={count} size={size}")
    out = Path(out_dir)
    settings = {"count": count, "seed": seed, "size": size, "generator_version": GENERATOR_VERSION}
    if _reuse_or_refuse(out, settings):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # our own bar counts images; datasets' extra bars would only interleave
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
            # cache_dir inside the temp dir: from_generator's arrow cache would otherwise pile up in ~/.cache
            dataset = datasets.Dataset.from_generator(
                _rows, features=FEATURES, cache_dir=os.path.join(tmp, "cache"),
                gen_kwargs={"count": count, "seed": seed, "size": size, "progress": progress})
            staged = Path(tmp) / "dataset"
            dataset.save_to_disk(staged)
            del dataset
            (staged / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
            try:
                os.rename(staged, out)
            except OSError:
                if not _reuse_or_refuse(out, settings):  # another process won the race with the same dataset: fine
                    raise
    finally:
        if not bars_were_off:
            datasets.utils.enable_progress_bars()
    return out



COMMAND_LINE = """Write the shapes-world dataset: one big coloured shape per image, captioned with its colour, shape
and place.

    python -m experiments.demo.shapes --out data/shapes --count 2000 --seed 0 --size 512
    python -m experiments.demo.shapes --out data/shapes-64 --count 2000 --size 64 --preview shapes.png

The output is a save_to_disk dataset (columns image, text, color, shape, position, background, cx, cy, radius) that
`latent-codec shards encode --data` reads directly, taking captions from its 'text' column. With --crop random
the encoder mirrors about half the images and, by default (--flip swap-left-right), swaps 'left' and 'right' in
their captions, so 'a red circle at the top left' stays true of its mirrored picture. Running again with the same
--count, --seed and --size reuses the folder; a folder written with other values is refused.
"""


def main(argv: list[str] | None = None) -> int:
    # Imported here: the command line is this module's only user of them.
    import argparse
    import sys
    import time

    p = argparse.ArgumentParser(prog="python -m experiments.demo.shapes", description=COMMAND_LINE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataset folder to write (built beside it, then renamed into place)")
    p.add_argument("--count", type=int, default=2000, help="number of images (default 2000); every object colour "
                   "appears equally often, give or take one")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes; the same seed gives the same images and "
                   "captions (default 0)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels, at least 16 (default 512)")
    p.add_argument("--preview", metavar="PATH", help="also write a PNG grid of the first 16 scenes with their "
                   "captions (re-rendered at 192 px, whatever --size is)")
    args = p.parse_args(argv)
    if args.count < 1:
        p.error(f"--count must be >= 1, got {args.count}")
    if args.size < 16:
        p.error(f"--size must be >= 16, got {args.size}")

    existed = Path(args.out).exists()
    start = time.perf_counter()
    try:
        out = write_shapes_dataset(args.out, args.count, args.seed, args.size, progress=True)
    except ValueError as exc:  # an --out holding another dataset: say so without a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    if args.preview:
        preview_grid(scenes(min(args.count, 16), args.seed)).save(args.preview)
        print(f"preview: {args.preview}")
    done = "already there, reused" if existed else f"written in {seconds:.1f} s"
    print(f"{out}: {args.count} images of {args.size}x{args.size} (seed {args.seed}), {done}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
