"""codec/data/sources.py: image folders, saved datasets, parquet, the Hub, the bundled photos."""

from __future__ import annotations

import json
import os

import datasets
import pytest

from codec.data import BUNDLED_TRAIN, BUNDLED_VAL, UnreadableImage, bundled_photos, decode_image, load_image_dataset
from tests.codec.data.helpers import COLOURS, write_colour_folder

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


def test_load_image_folder_splits_and_labels_from_one_listing(tmp_path, offline):
    for part in ("train/cat", "train/dog", "validation/cat", "test/dog"):
        write_colour_folder(tmp_path / "splits" / part, [(4, 4)])
    train, column = load_image_dataset(tmp_path / "splits")
    assert len(train) == 2 and train.features["label"].names == ["cat", "dog"] and train["label"] == [0, 1]
    assert train[1][column]["path"] == str(tmp_path / "splits" / "train" / "dog" / "0.png")
    val, _ = load_image_dataset(tmp_path / "splits", split="validation")
    assert len(val) == 1 and "label" not in val.features  # one folder name is no label
    with pytest.raises(ValueError, match=r"no images for split 'dev'.*splits found: \['test', 'train', 'validation'\]"):
        load_image_dataset(tmp_path / "splits", split="dev")

    write_colour_folder(tmp_path / "mixed" / "a", [(4, 4)])
    write_colour_folder(tmp_path / "mixed" / "a" / "deeper", [(4, 4)])
    mixed, _ = load_image_dataset(tmp_path / "mixed")
    assert len(mixed) == 2 and "label" not in mixed.features  # images at different depths: no label


def test_load_takes_tars_and_brace_patterns_of_parquet(tmp_path, offline):
    import tarfile

    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w"):
        pass
    empty, column = load_image_dataset(tmp_path / "shards")  # through a record index: tests/codec/data/test_index.py
    assert column == "image" and len(empty) == 0
    names = write_colour_folder(tmp_path / "src", [(4, 4)] * 2)
    for i, name in enumerate(names):
        table = datasets.Dataset.from_dict({"image": [str(tmp_path / "src" / name)]})
        table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / f"part-{i}.parquet"))
    both, column = load_image_dataset(f"{tmp_path}/part-{{0,1}}.parquet")
    assert [decode_image(row[column]).getpixel((0, 0)) for row in both] == COLOURS[:2]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset(tmp_path / "no-such-folder")


def test_load_unknown_hub_name_says_what_to_pass(offline):
    with pytest.raises(RuntimeError, match="local image folder") as info:
        load_image_dataset("nobody-xyz/no-such-dataset-123")
    assert "nobody-xyz/no-such-dataset-123" in str(info.value) and "network" in str(info.value)


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
