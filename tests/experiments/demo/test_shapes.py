"""The shapes-world generator: determinism, balance, caption grammar, geometry in pixels, and the saved dataset."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from codec.data import decode_image, load_image_dataset
from codec.data.crops import mirror_caption
from experiments.demo.adherence import detect
from experiments.demo.shapes import (
    BACKGROUND_COLORS,
    GRADIENT_STRENGTH,
    OBJECT_COLORS,
    POSITIONS,
    STAR_INNER,
    ShapeScene,
    caption,
    render,
    scenes,
    write_shapes_dataset,
)
from experiments.demo.shapes import main as make_shapes


def pixels(scene: ShapeScene, size: int) -> np.ndarray:
    return np.asarray(render(scene, size), dtype=np.float64)


def test_same_seed_same_scenes_pixels_and_captions():
    first, again = scenes(12, seed=5), scenes(12, seed=5)
    assert first == again
    assert [caption(s) for s in first] == [caption(s) for s in again]
    for a, b in zip(first, again):
        assert np.array_equal(pixels(a, 32), pixels(b, 32))


def test_different_seeds_give_different_scenes_and_images():
    a, b = scenes(12, seed=5), scenes(12, seed=6)
    assert [caption(s) for s in a] != [caption(s) for s in b]
    assert sum(not np.array_equal(pixels(x, 32), pixels(y, 32)) for x, y in zip(a, b)) == 12


def test_object_colours_are_balanced():
    n = len(OBJECT_COLORS)
    assert Counter(s.color for s in scenes(10 * n, seed=0)) == {color: 10 for color in OBJECT_COLORS}
    counts = Counter(s.color for s in scenes(10 * n + 3, seed=1)).values()
    assert max(counts) - min(counts) <= 1
    # the rest is drawn at random: over 700 scenes every shape, place and background turns up
    many = scenes(700, seed=2)
    assert {len({getattr(s, f) for s in many}) for f in ("shape", "position", "background")} == {4, 9, 5}


def test_palette_is_far_apart_even_at_the_gradient_extremes():
    objects = {k: np.asarray(v, float) for k, v in OBJECT_COLORS.items()}
    closest_objects = min(np.linalg.norm(objects[a] - objects[b]) for a, b in itertools.combinations(objects, 2))
    closest_to_background = min(
        np.linalg.norm(color - np.asarray(bg, float) * (1 + sign * GRADIENT_STRENGTH))
        for color in objects.values() for bg in BACKGROUND_COLORS.values() for sign in (-1, 1)
    )
    assert closest_objects >= 140 and closest_to_background >= 125  # the numbers experiments/demo/shapes.py promises


def test_caption_grammar():
    base = ShapeScene("red", "circle", "top left", "navy", 0.25, 0.25, 0.2, 0)
    assert caption(base) == "a red circle at the top left on a navy background"
    centred = replace(base, position="center", cx=0.5, cy=0.5)
    assert caption(centred) == "a red circle in the center on a navy background"
    assert caption(replace(base, position="left", cy=0.5, shape="star", background="dark gray")) == (
        "a red star on the left on a dark gray background")
    assert caption(replace(base, position="bottom", cx=0.5, cy=0.75, color="white")) == (
        "a white circle at the bottom on a navy background")


def test_a_mirrored_scene_is_captioned_by_the_mirrored_caption():
    # What lets random crops mirror the shapes world (codec/shards/encode.py --flip swap-left-right): every word
    # of the grammar either names a side and is swapped, or names no side and is kept.
    many = scenes(63, seed=4)
    assert len({s.position for s in many}) == 9
    for scene in many:
        row, column = divmod(POSITIONS.index(scene.position), 3)
        mirrored = replace(scene, position=POSITIONS[3 * row + 2 - column], cx=1.0 - scene.cx)
        assert mirror_caption(caption(scene)) == caption(mirrored)
        assert detect(np.fliplr(np.asarray(render(scene, 32)))).position == mirrored.position


def test_scene_rejects_unknown_words_and_shapes_off_the_image():
    with pytest.raises(ValueError, match="'purple'"):
        ShapeScene("purple", "circle", "top", "navy", 0.5, 0.25, 0.2, 0)
    with pytest.raises(ValueError, match="does not fit"):
        ShapeScene("red", "circle", "top", "navy", 0.5, 0.1, 0.2, 0)
    with pytest.raises(ValueError, match="size must be >= 16"):
        render(scenes(1, 0)[0], 8)


def ideal_area(scene: ShapeScene) -> float:
    """Area of the drawn shape as a fraction of the image, from its geometry."""
    r = scene.radius
    return {"circle": math.pi * r * r, "square": (1.6 * r) ** 2, "triangle": 3 * math.sqrt(3) / 4 * r * r,
            "star": 5 * r * (STAR_INNER * r) * math.sin(math.radians(36))}[scene.shape]


@pytest.mark.parametrize("size", [32, 64, 512])
def test_rendered_shape_sits_where_the_scene_says(size):
    """Pixels nearer the object colour than the background colour form a blob with the scene's centre and area."""
    for scene in scenes(14 if size < 512 else 2, seed=11):
        image = render(scene, size)
        assert image.size == (size, size) and image.mode == "RGB"
        rgb = np.asarray(image, dtype=np.float64)
        color = np.asarray(OBJECT_COLORS[scene.color], dtype=np.float64)
        bg = np.asarray(BACKGROUND_COLORS[scene.background], dtype=np.float64)
        mask = np.linalg.norm(rgb - color, axis=-1) < np.linalg.norm(rgb - bg, axis=-1)
        rows, cols = np.nonzero(mask)
        # the blob's centroid is the scene's centre to within a pixel, at every size
        assert abs((cols.mean() + 0.5) - scene.cx * size) < 0.75, caption(scene)
        assert abs((rows.mean() + 0.5) - scene.cy * size) < 0.75, caption(scene)
        # and its area the shape's: PIL fills the boundary pixels of the 4x canvas, a quarter-pixel outward ring
        # that adds about (perimeter / area) / 4 ~ 1 / (radius in pixels) to the area
        assert mask.mean() == pytest.approx(ideal_area(scene), rel=0.01 + 1.2 / (scene.radius * size)), caption(scene)
        assert not mask[0].any() and not mask[-1].any() and not mask[:, 0].any() and not mask[:, -1].any()


def test_saved_dataset_round_trips_through_the_codec_loader(tmp_path):
    out = write_shapes_dataset(tmp_path / "shapes", count=9, seed=3, size=32)
    dataset, column = load_image_dataset(out)
    expected = scenes(9, seed=3)
    assert column == "image" and len(dataset) == 9
    assert dataset["text"] == [caption(s) for s in expected]
    assert dataset["color"] == [s.color for s in expected] and dataset["position"] == [s.position for s in expected]
    for row, scene in zip(dataset, expected):
        assert np.array_equal(np.asarray(decode_image(row[column])), np.asarray(render(scene, 32)))  # PNG: lossless
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # the staging folder is gone

    stamp = (out / "state.json").stat().st_mtime_ns
    assert write_shapes_dataset(out, count=9, seed=3, size=32) == out
    assert (out / "state.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(ValueError, match="already exists"):
        write_shapes_dataset(out, count=10, seed=3, size=32)


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as help_exit:
        make_shapes(["--help"])
    assert help_exit.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--out", "--count", "--seed", "--size", "--preview"))
    assert make_shapes(["--out", str(tmp_path / "s"), "--count", "3", "--size", "16",
                        "--preview", str(tmp_path / "p.png")]) == 0
    assert "3 images of 16x16 (seed 0)" in capsys.readouterr().out and (tmp_path / "p.png").stat().st_size > 0
    assert make_shapes(["--out", str(tmp_path / "s"), "--count", "4", "--size", "16"]) == 2
