"""Tiny images written to tmp_path, shared by the tests of codec.data's modules."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


# Distinct solid colours, so which image a crop came from can be read off its pixels.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0), (0, 150, 150)]


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


def round_trip(img: Image.Image, fmt: str, **save_args) -> Image.Image:
    """Save and re-open, so tests see images the way a file reader produces them."""
    buf = io.BytesIO()
    img.save(buf, fmt, **save_args)
    buf.seek(0)
    return Image.open(buf)


def write_truncated_jpeg(path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def write_colour_folder(folder, sizes, broken: int | None = None) -> list[str]:
    """PNG i has colour COLOURS[i]; file `broken` (if given) is a truncated JPEG instead."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, size in enumerate(sizes):
        if i == broken:
            name = f"{i}.jpg"
            write_truncated_jpeg(folder / name)
        else:
            name = f"{i}.png"
            Image.new("RGB", size, COLOURS[i]).save(folder / name)
        names.append(name)
    return names


def records(folder, names) -> list[dict]:
    """Rows shaped like a datasets Image(decode=False) column."""
    return [{"image": {"bytes": None, "path": str(folder / n)}} for n in names]
