"""codec/data/images.py: any stored image to RGB pixels, or a reason; PIL <-> tensor."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from codec.data import UnreadableImage, decode_image, pil_to_tensor, resize_shorter_side, tensor_to_pil, to_rgb
from tests.codec.data.helpers import pixels, round_trip, write_truncated_jpeg


# --------------------------------------------------------------------------------------------------- to_rgb


def test_to_rgb_gray_and_one_bit():
    gray = Image.fromarray(np.array([[0, 200]], dtype=np.uint8), mode="L")
    assert pixels(to_rgb(gray)).tolist() == [[[0, 0, 0], [200, 200, 200]]]
    bits = Image.new("1", (2, 1), 0)
    bits.putpixel((1, 0), 1)
    out = to_rgb(bits)
    assert out.mode == "RGB" and pixels(out).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_to_rgb_la_composites_over_white():
    la = Image.new("LA", (3, 1))
    la.putdata([(100, 0), (100, 255), (0, 128)])
    out = pixels(to_rgb(la))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [100, 100, 100]
    assert np.all(np.abs(out[0, 2] - 127) <= 1)  # half-transparent black over white is mid grey


def test_to_rgb_rgba_alpha_zero_is_white_and_opaque_keeps_colour():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(10, 20, 30, 0), (10, 20, 30, 255)])
    out = pixels(to_rgb(rgba))
    assert out[0].tolist() == [[255, 255, 255], [10, 20, 30]]


def test_to_rgb_palette_with_transparency_from_png():
    pal = Image.new("P", (2, 1), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0])
    pal.putpixel((1, 0), 1)
    reread = round_trip(pal, "PNG", transparency=0)
    assert reread.mode == "P" and "transparency" in reread.info
    assert pixels(to_rgb(reread))[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_to_rgb_cmyk_jpeg_keeps_colour():
    reread = round_trip(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert reread.mode == "CMYK"
    out = pixels(to_rgb(reread))
    assert np.abs(out - np.array([255, 0, 0])).max() <= 8  # red, not the inverted cyan of a naive read


def test_to_rgb_sixteen_bit_png_scales_by_257():
    values = np.array([[0, 65535, 128 * 257, 257]], dtype=np.uint16)
    reread = round_trip(Image.fromarray(values), "PNG")
    assert reread.mode == "I;16"
    out = pixels(to_rgb(reread))
    assert out[0, :, 0].tolist() == [0, 255, 128, 1]  # PIL's own convert would clip 257 -> 255
    assert np.all(out[..., 0] == out[..., 2])


def test_to_rgb_big_endian_sixteen_bit():
    img = Image.fromarray(np.array([[0, 65535]], dtype=">u2"))
    assert img.mode == "I;16B"
    assert pixels(to_rgb(img))[0, :, 1].tolist() == [0, 255]


def test_to_rgb_int32_uses_smallest_fitting_bit_depth():
    eight_bit = Image.fromarray(np.array([[0, 200, -5]], dtype=np.int32))
    assert eight_bit.mode == "I"
    assert pixels(to_rgb(eight_bit))[0, :, 0].tolist() == [0, 200, 0]
    sixteen_bit = Image.fromarray(np.array([[0, 65535, 1000]], dtype=np.int32))
    assert pixels(to_rgb(sixteen_bit))[0, :, 0].tolist() == [0, 255, 4]
    full = Image.fromarray(np.array([[0, 2**31 - 1]], dtype=np.int32))
    assert pixels(to_rgb(full))[0, :, 0].tolist() == [0, 255]


def test_to_rgb_float_unit_and_byte_ranges():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, -0.2]], dtype=np.float32))
    assert unit.mode == "F"
    assert pixels(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255, 0]
    byte = Image.fromarray(np.array([[0.0, 100.0, 300.0, np.nan]], dtype=np.float32))
    assert pixels(to_rgb(byte))[0, :, 0].tolist() == [0, 100, 255, 0]


def test_to_rgb_applies_exif_orientation():
    img = Image.new("RGB", (20, 10), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    reread = round_trip(img, "JPEG", exif=exif)
    assert reread.size == (20, 10)
    assert to_rgb(reread).size == (10, 20)


# --------------------------------------------------------------------------------------------------- decode_image


def test_decode_image_accepts_record_bytes_path_and_pil(tmp_path):
    path = tmp_path / "a.png"
    Image.new("LA", (4, 3), (50, 255)).save(path)
    for value in (str(path), path, {"bytes": None, "path": str(path)}, {"bytes": path.read_bytes(), "path": None}):
        out = decode_image(value)
        assert out.mode == "RGB" and out.size == (4, 3) and out.getpixel((0, 0)) == (50, 50, 50)
    assert decode_image(Image.open(path)).getpixel((1, 1)) == (50, 50, 50)


def _smooth_photo(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(9 * x) * np.cos(7 * y), np.cos(5 * x + 3 * y), x * y], axis=-1)
    return Image.fromarray(((rgb + 1) * 127.5).clip(0, 255).astype(np.uint8))


def test_decode_image_min_side_decodes_jpeg_smaller_and_close_to_a_full_decode(tmp_path):
    path = tmp_path / "big.jpg"
    _smooth_photo(1600, 1200).save(path, quality=95)
    reduced = decode_image(str(path), min_side=256)
    # libjpeg scales by 1/2, 1/4 or 1/8: 1/4 is the smallest that keeps the shorter side >= 256 (1/8 gives 150).
    assert reduced.size == (400, 300)
    full = decode_image(str(path))
    assert full.size == (1600, 1200)
    a = np.asarray(resize_shorter_side(reduced, 256), dtype=np.float64)
    b = np.asarray(resize_shorter_side(full, 256), dtype=np.float64)
    assert a.shape == b.shape == (256, 341, 3)
    assert np.abs(a - b).mean() < 1.0  # measured 0.31 grey levels (max 2): the IDCT's downscale vs bicubic's
    assert decode_image(str(path), min_side=600).size == (800, 600)
    # Nothing to gain, nothing changed: halving would undershoot min_side, and PNGs have no reduced decoding.
    assert decode_image(str(path), min_side=601).size == (1600, 1200)
    png = tmp_path / "big.png"
    _smooth_photo(1600, 1200).save(png)
    assert decode_image(str(png), min_side=256).size == (1600, 1200)


def test_decode_image_min_side_keeps_exif_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait
    _smooth_photo(1600, 1200).save(path, exif=exif, quality=95)
    assert decode_image(str(path), min_side=256).size == (300, 400)
    assert decode_image(str(path)).size == (1200, 1600)


def test_decode_image_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    write_truncated_jpeg(path)
    Image.open(path)  # the header alone still parses: only a full decode can notice
    with pytest.raises(UnreadableImage) as info:
        decode_image({"bytes": None, "path": str(path)})
    assert info.value.reason == "truncated file"
    assert str(path) in str(info.value)


def test_decode_image_zero_size_and_text_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableImage, match="zero-size file") as info:
        decode_image(str(empty))
    assert str(empty) in str(info.value)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(UnreadableImage, match="not an image") as info:
        decode_image(str(text))
    assert str(text) in str(info.value)
    with pytest.raises(UnreadableImage, match="file not found"):
        decode_image(str(tmp_path / "missing.png"))
    with pytest.raises(TypeError, match="decode_image"):
        decode_image(12345)


@pytest.mark.parametrize("side", [12, 20])  # 144 px: PIL only warns; 400 px (> 2x limit): PIL raises
def test_decode_image_decompression_bomb(tmp_path, monkeypatch, side):
    path = tmp_path / "big.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UnreadableImage, match=f"decompression bomb: {side * side} pixels"):
        decode_image(str(path))
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        decode_image(Image.new("RGB", (side, side)))


# --------------------------------------------------------------------------------------------------- helpers


def test_resize_shorter_side():
    img = Image.new("RGB", (40, 20))
    assert resize_shorter_side(img, 10).size == (20, 10)
    assert resize_shorter_side(Image.new("RGB", (15, 45)), 30).size == (30, 90)
    assert resize_shorter_side(img, 20) is img
    with pytest.raises(ValueError, match="size"):
        resize_shorter_side(img, 0)


def test_tensor_round_trip_and_clamping():
    values = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = pil_to_tensor(Image.fromarray(values))
    assert tensor.shape == (3, 5, 7) and tensor.min() >= -1 and tensor.max() <= 1
    assert tensor[:, 0, 0].tolist() == pytest.approx([v / 127.5 - 1 for v in values[0, 0]], abs=1e-6)
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), values)
    clipped = tensor_to_pil(torch.tensor([-3.0, 0.0, 5.0]).view(3, 1, 1))
    assert clipped.getpixel((0, 0)) == (0, 128, 255)
    with pytest.raises(ValueError, match="to_rgb"):
        pil_to_tensor(Image.new("L", (2, 2)))
