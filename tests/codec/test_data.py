"""Behaviour of codec.data on tiny images written to tmp_path."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from codec.common.draws import DrawSampler
from codec.data import (
    BUNDLED_TRAIN,
    BUNDLED_VAL,
    CenterCrops,
    TrainCrops,
    UnreadableImage,
    bundled_photos,
    decode_image,
    load_image_dataset,
    pil_to_tensor,
    resize_shorter_side,
    tensor_to_pil,
    to_rgb,
)

# Distinct solid colours, so which image a crop came from can be read off its pixels.
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 200, 0), (0, 150, 150)]


@pytest.fixture
def offline(monkeypatch):
    """No network waits: the env vars cover subprocesses, but datasets and huggingface_hub read them at import
    time, so the already-imported module constants are patched too (otherwise a Hub lookup retries for ~25 s)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


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


# --------------------------------------------------------------------------------------------------- loading


def test_load_image_folder_with_captions_and_a_truncated_file(tmp_path, offline):
    folder = tmp_path / "imgs"
    names = write_colour_folder(folder, [(8, 8)] * 3, broken=1)
    with open(folder / "metadata.jsonl", "w") as fh:
        for name in names:
            fh.write(json.dumps({"file_name": name, "text": f"caption of {name}"}) + "\n")
    ds, column = load_image_dataset(str(folder))
    assert column == "image" and len(ds) == 3
    assert sorted(ds["text"]) == sorted(f"caption of {n}" for n in names)
    assert ds.features["image"].decode is False
    by_name = {os.path.basename(row["image"]["path"]): row for row in ds}
    assert decode_image(by_name["0.png"]["image"]).getpixel((0, 0)) == COLOURS[0]
    with pytest.raises(UnreadableImage, match="truncated"):
        decode_image(by_name["1.jpg"]["image"])


def test_load_image_folder_without_images_names_folder(tmp_path, offline):
    folder = tmp_path / "nothing_here"
    folder.mkdir()
    (folder / "readme.txt").write_text("no pictures")
    with pytest.raises(ValueError, match="nothing_here"):
        load_image_dataset(folder)
    with pytest.raises(ValueError, match="not .parquet/.arrow"):
        load_image_dataset(folder / "readme.txt")


def test_load_saved_dataset_and_dataset_dict(tmp_path, offline):
    src = tmp_path / "src"
    names = write_colour_folder(src, [(6, 5), (5, 6)])
    table = datasets.Dataset.from_dict(
        {"caption": ["red", "green"], "photo": [str(src / n) for n in names]}
    ).cast_column("photo", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    ds, column = load_image_dataset(tmp_path / "saved")
    assert column == "photo" and ds["caption"] == ["red", "green"]
    assert decode_image(ds[1]["photo"]).getpixel((0, 0)) == COLOURS[1]
    assert ds[1]["photo"]["bytes"] is not None  # save_to_disk embedded the file; the source may now vanish

    arrow = next((tmp_path / "saved").glob("*.arrow"))
    from_arrow, column = load_image_dataset(str(arrow))
    assert column == "photo" and from_arrow["caption"] == ["red", "green"]

    datasets.DatasetDict({"train": table, "validation": table.select([1])}).save_to_disk(str(tmp_path / "dd"))
    val, column = load_image_dataset(tmp_path / "dd", split="validation")
    assert column == "photo" and val["caption"] == ["green"]
    with pytest.raises(ValueError, match="available splits"):
        load_image_dataset(tmp_path / "dd", split="test")


def test_load_parquet_and_column_errors(tmp_path, offline):
    src = tmp_path / "src"
    names = write_colour_folder(src, [(4, 4)] * 3)
    table = datasets.Dataset.from_dict({"image": [str(src / n) for n in names], "k": [0, 1, 2]})
    table = table.cast_column("image", datasets.Image())
    table.to_parquet(str(tmp_path / "part.parquet"))
    ds, column = load_image_dataset(str(tmp_path / "part.parquet"))
    assert column == "image" and ds["k"] == [0, 1, 2]
    assert decode_image(ds[2]["image"]).getpixel((0, 0)) == COLOURS[2]
    ds, column = load_image_dataset(str(tmp_path / "part.parquet"), image_column="image")
    assert column == "image"
    with pytest.raises(ValueError, match=r"no column 'pixels'.*\['image', 'k'\]"):
        load_image_dataset(str(tmp_path / "part.parquet"), image_column="pixels")
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_image_dataset(str(tmp_path / "none-*.parquet"))


def test_load_unknown_hub_name_says_what_to_pass(offline):
    with pytest.raises(RuntimeError, match="local image folder") as info:
        load_image_dataset("nobody-xyz/no-such-dataset-123")
    assert "nobody-xyz/no-such-dataset-123" in str(info.value) and "network" in str(info.value)


# --------------------------------------------------------------------------------------------------- TrainCrops


def test_train_crops_are_deterministic_shaped_and_in_range(tmp_path):
    names = write_colour_folder(tmp_path, [(40, 30)] * 2)
    noise = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "1.png")  # texture, so different boxes give different pixels
    rows = records(tmp_path, names)
    crops = TrainCrops(rows, "image", crop_size=16, seed=7)
    again = TrainCrops(rows, "image", crop_size=16, seed=7)
    for draw in range(6):
        item = crops[draw]
        assert item["pixels"].shape == (3, 16, 16) and item["pixels"].dtype == torch.float32
        assert item["draw"].dtype == torch.int64 and int(item["draw"]) == draw
        assert -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
        assert torch.equal(item["pixels"], again[draw]["pixels"])
        assert torch.equal(item["pixels"], crops[draw]["pixels"])
    noisy_draws = [d for d in range(40) if crops.item_index(d) == 1]
    distinct = {crops[d]["pixels"].numpy().tobytes() for d in noisy_draws}
    assert len(distinct) >= 0.75 * len(noisy_draws)  # each draw gets its own box/flip (750 choices, few repeats)
    unflipped = TrainCrops(rows, "image", crop_size=16, seed=7, flip=False)
    mirrored = [torch.equal(crops[d]["pixels"], unflipped[d]["pixels"].flip(-1)) for d in noisy_draws]
    same = [torch.equal(crops[d]["pixels"], unflipped[d]["pixels"]) for d in noisy_draws]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)  # same box, flip ~ 50%
    red = crops[next(d for d in range(4) if crops.item_index(d) == 0)]["pixels"]
    assert torch.equal(red, pil_to_tensor(Image.new("RGB", (16, 16), COLOURS[0])))


def test_train_crops_every_epoch_is_a_permutation(tmp_path):
    n, epochs = 7, 4
    rows = records(tmp_path, write_colour_folder(tmp_path, [(8, 8)] * 5) + ["0.png", "1.png"])
    crops = TrainCrops(rows, "image", crop_size=8, seed=3)
    orders = [[crops.item_index(d) for d in range(e * n, (e + 1) * n)] for e in range(epochs)]
    for order in orders:
        assert sorted(order) == list(range(n))
    assert len({tuple(o) for o in orders}) > 1  # reshuffled per epoch
    other = TrainCrops(rows, "image", crop_size=8, seed=4)
    assert [other.item_index(d) for d in range(n)] != orders[0]
    assert crops.item_index(3 * n + 2) == orders[3][2]  # random access matches sequential order


def test_train_crops_order_is_stable_across_python_processes(tmp_path):
    rows = records(tmp_path, write_colour_folder(tmp_path, [(8, 8)] * 5))
    here = [TrainCrops(rows, "image", crop_size=8, seed=11).item_index(d) for d in range(12)]
    script = (
        "from codec.data import TrainCrops;"
        f"rows={rows!r};"
        "c=TrainCrops(rows,'image',crop_size=8,seed=11);"
        "print([c.item_index(d) for d in range(12)])"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")  # would change the order if hash() leaked into seeding
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(here)


def test_train_crops_resize_and_upscale_small_images(tmp_path):
    Image.fromarray(np.arange(10 * 6 * 3, dtype=np.uint8).reshape(6, 10, 3)).save(tmp_path / "small.png")
    rows = records(tmp_path, ["small.png"])
    assert TrainCrops(rows, "image", crop_size=12, seed=0)[0]["pixels"].shape == (3, 12, 12)
    resized = TrainCrops(rows, "image", crop_size=3, seed=0, resize=3)
    assert resized[0]["pixels"].shape == (3, 3, 3)


def test_train_crops_skip_unreadable_and_log_once(tmp_path, caplog):
    names = write_colour_folder(tmp_path, [(10, 10)] * 4, broken=2)
    crops = TrainCrops(records(tmp_path, names), "image", crop_size=8, seed=5, flip=False)
    caplog.set_level(logging.WARNING, logger="codec.data")
    readable = {COLOURS[i] for i in (0, 1, 3)}
    for draw in range(12):
        colour = tuple(tensor_to_pil(crops[draw]["pixels"]).getpixel((0, 0)))
        assert colour in readable
        if crops.item_index(draw) == 2:
            assert colour == COLOURS[3]  # the next index stands in for the broken one
    warnings = [r for r in caplog.records if "2.jpg" in r.getMessage()]
    assert len(warnings) == 1 and "truncated file" in warnings[0].getMessage()
    assert list(crops.rejected) == [2]


def test_train_crops_all_unreadable_raises(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_text("text")
    crops = TrainCrops(records(tmp_path, ["a.png", "b.png"]), "image", crop_size=4, seed=0)
    with pytest.raises(RuntimeError, match="all 2 images are unreadable"):
        crops[0]


def test_draw_sampler_resumes_a_dataloader_exactly(tmp_path):
    rows = records(tmp_path, write_colour_folder(tmp_path, [(12, 9)] * 3))
    crops = TrainCrops(rows, "image", crop_size=8, seed=2)
    sampler = DrawSampler(start=5)
    first = [v for _, v in zip(range(4), sampler)]
    assert first == [5, 6, 7, 8]
    full = iter(torch.utils.data.DataLoader(crops, batch_size=4, sampler=DrawSampler(0)))
    batches = [next(full) for _ in range(3)]
    assert batches[1]["draw"].tolist() == [4, 5, 6, 7]
    resumed = next(iter(torch.utils.data.DataLoader(crops, batch_size=4, sampler=DrawSampler(8))))
    assert torch.equal(resumed["pixels"], batches[2]["pixels"])
    assert resumed["draw"].tolist() == batches[2]["draw"].tolist()


# --------------------------------------------------------------------------------------------------- CenterCrops


def test_center_crops_size_rejects_and_limit(tmp_path, caplog):
    names = write_colour_folder(tmp_path, [(30, 20), (20, 40), (16, 16), (50, 20)], broken=1)
    rows = records(tmp_path, names)
    caplog.set_level(logging.WARNING, logger="codec.data")
    val = CenterCrops(rows, "image", size=16)
    assert len(val) == 3 and [val[i]["index"] for i in range(3)] == [0, 2, 3]
    for i in range(3):
        item = val[i]
        assert item["pixels"].shape == (3, 16, 16)
        assert torch.allclose(item["pixels"], pil_to_tensor(Image.new("RGB", (16, 16), COLOURS[item["index"]])))
    assert [index for index, _ in val.rejected] == [1]
    assert "1.jpg" in val.rejected[0][1] and "truncated file" in val.rejected[0][1]
    assert any("1.jpg" in r.getMessage() for r in caplog.records)
    limited = CenterCrops(rows, "image", size=16, limit=2)
    assert len(limited) == 2 and [limited[i]["index"] for i in range(2)] == [0, 2]


def test_center_crop_takes_the_middle(tmp_path):
    stripes = np.zeros((8, 24, 3), dtype=np.uint8)
    stripes[:, 8:16] = 255  # white middle third
    Image.fromarray(stripes).save(tmp_path / "s.png")
    val = CenterCrops(records(tmp_path, ["s.png"]), "image", size=8)
    assert torch.all(val[0]["pixels"] == 1.0)


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


# --------------------------------------------------------------------------------------------------- bundled


def test_bundled_photos_written_once_and_loadable(tmp_path, offline):
    train_dir, val_dir = bundled_photos(tmp_path)
    assert train_dir == tmp_path / "train" and val_dir == tmp_path / "val"
    assert sorted(p.name for p in train_dir.iterdir()) == sorted(f"{n}.png" for n in BUNDLED_TRAIN)
    assert sorted(p.name for p in val_dir.iterdir()) == sorted(f"{n}.png" for n in BUNDLED_VAL)
    assert len(BUNDLED_TRAIN) == 7 and set(BUNDLED_VAL) == {"astronaut", "coffee"}
    assert not set(BUNDLED_TRAIN) & set(BUNDLED_VAL)
    stamps = {p: p.stat().st_mtime_ns for p in train_dir.iterdir()}
    bundled_photos(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in train_dir.iterdir()} == stamps
    train, column = load_image_dataset(train_dir)
    val, _ = load_image_dataset(val_dir)
    assert len(train) == 7 and len(val) == 2
    astronaut = decode_image(next(r[column] for r in val if r[column]["path"].endswith("astronaut.png")))
    assert astronaut.size == (512, 512) and astronaut.mode == "RGB"
