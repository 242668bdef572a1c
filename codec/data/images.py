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

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError


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
