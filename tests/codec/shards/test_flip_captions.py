"""A mirrored record's caption must not contradict its pixels (issue 28, point 4), checked on the shapes world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codec.data import InputSource, decode_image, load_image_dataset, pil_to_tensor
from codec.data.crops import mirror_caption
from codec.shards.encode import Framing, crop_position, encode_dataset
from experiments.demo.adherence import detect, parse_prompt
from experiments.demo.shapes import write_shapes_dataset
from tests.codec.shards.test_encode import RES, encode_command, store_records, write_image_folder

COUNT = 24  # with seed 3, 16 records are mirrored and 11 of those have a left or right in their caption


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "shapes", COUNT, seed=0, size=RES)


def crop_as_encoded(image, crop_box: list[int], flip: bool) -> torch.Tensor:
    """The (H, W, 3) uint8 pixels a record's latents encode, rebuilt from the source as docs/shards.md says."""
    pixels = pil_to_tensor(image.crop(tuple(crop_box)))
    pixels = pixels.flip(-1) if flip else pixels
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


def placed_as_captioned(out: Path, data: Path) -> list[tuple[bool, str, str]]:
    """(flip, caption's position, position the pixels show) of every record of an encode of the shapes world."""
    dataset, column = load_image_dataset(str(data))
    rows = []
    for record in store_records(out):
        image = decode_image(dataset[int(record["id"])][column])  # a saved dataset's ids are its row numbers
        shown = detect(crop_as_encoded(image, record["crop_box"], record["flip"]).numpy()).position
        rows.append((record["flip"], parse_prompt(record["caption"]).position, shown))
    return rows


def test_mirrored_shapes_records_keep_captions_true_to_their_pixels(codec_dir, shapes, tmp_path):
    out = tmp_path / "out"
    manifest = encode_dataset(codec_dir, shapes, out, resolution=RES, unit_size=10, batch_size=8, crop="random",
                              seed=3, num_workers=0, progress=False)
    rows = placed_as_captioned(out, shapes)
    mirrored = [row for row in rows if row[0]]
    sided = [row for row in mirrored if row[1].endswith(("left", "right"))]
    contradictions = [row for row in rows if row[1] != row[2]]
    print(f"{len(mirrored)} of {len(rows)} records mirrored, {len(sided)} of them with left/right captions; "
          f"{len(contradictions)} captions contradict their pixels: {contradictions}")
    assert len(mirrored) == 16 and len(sided) == 11  # the draws keyed by (seed 3, index) mirror these records
    assert len(contradictions) == 0
    assert manifest["flip"] == manifest["settings"]["flip"] == "swap-left-right"
    assert manifest["data"]["captions_mirrored"] == len(sided)


@pytest.mark.parametrize("text, mirrored", [
    ("a red circle at the top left on a navy background", "a red circle at the top right on a navy background"),
    ("a blue star on the right on a black background", "a blue star on the left on a black background"),
    ("Left: a dog. RIGHT: a cat, rightmost of three", "Right: a dog. LEFT: a cat, leftmost of three"),
    ("a left-handed player waves his left-hand glove leftwards from the top-right",
     "a right-handed player waves his right-hand glove rightwards from the top-left"),
    ("bright leftovers, copyright, alright, lefty", "bright leftovers, copyright, alright, lefty"),
    ("a cat in the center", "a cat in the center"),
    ("", ""),
])
def test_mirror_caption_swaps_whole_side_words_keeping_case(text, mirrored):
    assert mirror_caption(text) == mirrored
    assert mirror_caption(mirrored) == text  # a mirror of a mirror is the original


def test_each_flip_policy_mirrors_only_where_the_stored_caption_stays_true(tmp_path):
    folder = tmp_path / "photos"
    write_image_folder(folder, 10, captions="txt")
    for i in (0, 3, 7):
        (folder / f"im{i:02d}.txt").write_text(f"a dog on the left, photo {i}\n")
    for i in (1, 5, 8):
        (folder / f"im{i:02d}.txt").unlink()  # no caption: nothing a mirror could contradict
    source = InputSource(str(folder))
    inputs = [record for unit in source.units for record in source.records(unit)]
    items = {policy: [Framing(RES, "random", 7, policy).prepare(record) for record in inputs]
             for policy in ("swap-left-right", "uncaptioned-only", "none")}
    # The draws are keyed by (seed, id) whatever the policy: same boxes, and the same drawn mirror.
    assert len({tuple(tuple(item["crop_box"]) for item in rows) for rows in items.values()}) == 1
    drawn = [crop_position(*reversed(item["resized_size"]), RES, "random", 7, item["id"])[2]
             for item in items["none"]]
    assert drawn == [False, False, True, True, True, True, False, True, True, False]
    swap, uncaptioned, none = ([item["flip"] for item in rows] for rows in items.values())
    assert swap == drawn and none == [False] * 10
    assert uncaptioned == [d and i in (1, 5, 8) for i, d in enumerate(drawn)] == [False] * 5 + [True, False, False,
                                                                                                True, False]
    captions = [item["caption"] for item in items["swap-left-right"]]
    assert captions[:4] == ["a dog on the left, photo 0", "", "photo number 2", "a dog on the right, photo 3"]
    assert captions[7] == "a dog on the right, photo 7"
    assert [i for i, item in enumerate(items["swap-left-right"]) if item["caption_mirrored"]] == [3, 7]
    for rows in (items["uncaptioned-only"], items["none"]):  # nothing captioned is mirrored, nothing rewritten
        assert [item["caption"] for item in rows][:4] == ["a dog on the left, photo 0", "", "photo number 2",
                                                          "a dog on the left, photo 3"]


def test_the_flip_policy_is_a_setting_a_resume_must_match(codec_dir, tmp_path):
    kwargs = dict(resolution=RES, unit_size=2, num_workers=0, progress=False, limit=2)
    folder = tmp_path / "photos"
    write_image_folder(folder, 2)
    random = encode_dataset(codec_dir, folder, tmp_path / "random", crop="random", **kwargs)
    center = encode_dataset(codec_dir, folder, tmp_path / "center", **kwargs)
    assert (random["flip"], center["flip"]) == ("swap-left-right", "none")
    with pytest.raises(ValueError, match=r"flip='swap-left-right' \(manifest.json\), but this run has flip='none'"):
        encode_dataset(codec_dir, folder, tmp_path / "random", crop="random", flip="none", **kwargs)
    with pytest.raises(ValueError, match=r"--flip 'swap-left-right' needs --crop random"):
        encode_dataset(codec_dir, folder, tmp_path / "other", flip="swap-left-right", **kwargs)
    with pytest.raises(ValueError, match=r"--flip 'sometimes': expected one of"):
        encode_dataset(codec_dir, folder, tmp_path / "other", crop="random", flip="sometimes", **kwargs)
    args = ["--codec", str(codec_dir), "--data", str(folder), "--resolution", str(RES), "--num-workers", "0",
            "--crop", "random", "--flip", "uncaptioned-only", "--out", str(tmp_path / "cli")]
    assert encode_command(args) == 0
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["flip"] == "uncaptioned-only"
