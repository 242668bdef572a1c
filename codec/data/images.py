"""Turning any stored image into RGB pixels, or a clear reason why not; PIL <-> tensor conversion.

Training images come from many places and some of them are broken: a bad file is reported (UnreadableImage,
with a short reason) and skipped by the datasets that use this, instead of killing a long run.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import re
import warnings
from collections.abc import Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError

# Defined in codec/exchange/pipeline.py, which exported pipeline folders carry so that stock diffusers converts images
# exactly as the codec's data code does; re-exported here.
from codec.exchange.pipeline import pil_to_tensor, tensor_to_pil, to_rgb  # noqa: F401


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
