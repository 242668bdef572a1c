"""The prompt-adherence scorer: parsing, closed-form shape moments, accuracy against ground truth, and honesty (an
image unrelated to its prompt scores at chance, not above)."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
from PIL import Image, ImageFilter

from experiments.demo.adherence import (
    SHAPE_MOMENTS,
    Prompt,
    blob_moments,
    chance_levels,
    color_labels,
    detect,
    parse_prompt,
    score,
    summarise,
)
from experiments.demo.shapes import BACKGROUND_COLORS, OBJECT_COLORS, POSITIONS, SHAPES, caption, render, scenes

PAIRS = 210  # 30 per object colour


def percent(rows: list[dict], attribute: str) -> float:
    return 100.0 * float(np.mean([row[f"{attribute}_ok"] for row in rows]))


def chance_band(p: float, n: int) -> tuple[float, float]:
    """chance +- 3 binomial standard deviations, in percent: where a prompt-blind generator lands 99.7% of the time."""
    sigma = math.sqrt(p * (1 - p) / n)
    return 100.0 * (p - 3 * sigma), 100.0 * (p + 3 * sigma)


def degraded(image: Image.Image, seed: int) -> Image.Image:
    """What a small codec + diffusion model does to a clean render: soft edges, faded colours, grain."""
    rgb = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
    gray = rgb.mean(axis=-1, keepdims=True)
    rgb = gray + 0.7 * (rgb - gray) + np.random.default_rng(seed).normal(0.0, 12.0, rgb.shape)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Parsing and pieces
# ---------------------------------------------------------------------------------------------------------------


def test_parse_prompt_inverts_caption():
    for scene in scenes(60, seed=0):
        parsed = parse_prompt(caption(scene))
        assert parsed == Prompt(scene.color, scene.shape, scene.position, scene.background)
    assert parse_prompt("  A Red Star on the left on a dark  gray background. ") == Prompt(
        "red", "star", "left", "dark gray")
    assert parse_prompt("a blue square at the top on a black background").position == "top"


@pytest.mark.parametrize("text", ["a purple circle in the center on a navy background", "a red circle",
                                  "a red circle at the middle on a navy background", ""])
def test_parse_prompt_names_the_text_it_cannot_read(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_prompt(text)


def test_bad_image_input_is_explained():
    with pytest.raises(ValueError, match="float64 array of shape"):
        detect(np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="too small"):
        detect(np.zeros((8, 8, 3), dtype=np.uint8))


def test_shape_moments_match_closed_forms_on_large_renders():
    """At 512 px pixelation is negligible: extent and solidity of each render are the ideal shape's."""
    seen = set()
    for scene in scenes(8, seed=4):
        rgb = np.asarray(render(scene, 512), dtype=np.float64)
        labels = color_labels(rgb, np.asarray(BACKGROUND_COLORS[scene.background], dtype=np.float64))
        extent, solidity = blob_moments(labels == list(OBJECT_COLORS).index(scene.color))
        assert (extent, solidity) == pytest.approx(SHAPE_MOMENTS[scene.shape], abs=0.02), caption(scene)
        seen.add(scene.shape)
    assert seen == set(SHAPES)
    assert SHAPE_MOMENTS["star"] == pytest.approx((0.427, 0.618), abs=1e-3)  # worked by hand in adherence.py


def test_chance_levels():
    levels = chance_levels()
    assert levels["color"] == 1 / 7 and levels["position"] == 1 / 9 and levels["shape"] == 1 / 4
    assert levels["background"] == 1 / 5 and levels["all"] == pytest.approx(1 / (7 * 9 * 4 * 5))


def test_summarise_counts_per_attribute_and_per_prompt():
    scene_a, scene_b = scenes(2, seed=9)
    rows = [score(render(scene_a, 32), caption(scene_a)), score(render(scene_a, 32), caption(scene_a)),
            score(render(scene_b, 32), caption(scene_a))]
    summary = summarise(rows)
    assert summary["n"] == 3
    assert summary["percent"]["color"] == pytest.approx(200 / 3)  # scene_b has another colour (balanced draw)
    assert summary["chance_percent"]["position"] == pytest.approx(100 / 9)
    (table,) = summary["prompts"]
    assert table["prompt"] == caption(scene_a) and table["n"] == 3 and table["no_object"] == 0.0
    with pytest.raises(ValueError, match="no scored rows"):
        summarise([])


# ---------------------------------------------------------------------------------------------------------------
# Accuracy against ground truth
# ---------------------------------------------------------------------------------------------------------------


def test_clean_renders_score_right():
    """Measured when written, on these scenes: 100% colour, position, shape and background at 64, 32 and 512 px.
    Shape is the attribute that slips first: 99.0% over 300 scenes at 32 px (a star read as a triangle, a square
    as a circle), so the 32 px bar is lower."""
    small = [score(render(s, 64), caption(s)) for s in scenes(60, seed=21)]
    assert percent(small, "color") >= 95 and percent(small, "position") >= 90
    assert percent(small, "shape") >= 95 and percent(small, "background") >= 95
    tiny = [score(render(s, 32), caption(s)) for s in scenes(60, seed=22)]
    assert percent(tiny, "color") >= 95 and percent(tiny, "position") >= 90 and percent(tiny, "shape") >= 90
    large = [score(render(s, 512), caption(s)) for s in scenes(3, seed=23)]
    assert all(row["color_ok"] and row["position_ok"] and row["shape_ok"] for row in large)


def test_degraded_renders_still_score_right():
    """Blur, faded colour and grain, like a small model's output. Measured when written (60 scenes, 64 px): 100%
    colour and position, 95% shape (blur rounds square corners: 3 squares read as circles); asserted with a
    margin."""
    rows = [score(degraded(render(s, 64), i), caption(s)) for i, s in enumerate(scenes(60, seed=24))]
    assert percent(rows, "color") >= 95 and percent(rows, "position") >= 90
    assert percent(rows, "shape") >= 85


# ---------------------------------------------------------------------------------------------------------------
# Honesty: an image that ignores its prompt scores at chance
# ---------------------------------------------------------------------------------------------------------------


def test_shuffled_prompts_score_at_chance():
    """A 'model' that draws a correct-looking image for some other prompt. Measured when written: colour 12.9%,
    position 8.1%, shape 25.2% against chance 14.3%, 11.1%, 25% (bands +-3 sigma: 7.0-21.5, 4.6-17.6, 16.0-34.0)."""
    images, prompts = scenes(PAIRS, seed=31), scenes(PAIRS, seed=32)
    random.Random(33).shuffle(prompts)
    rows = [score(render(a, 32), caption(b)) for a, b in zip(images, prompts)]
    chance = chance_levels()
    for attribute in ("color", "position", "shape"):
        low, high = chance_band(chance[attribute], PAIRS)
        assert low <= percent(rows, attribute) <= high, (attribute, percent(rows, attribute), (low, high))


def test_noise_and_blank_images_score_no_better_than_chance():
    """Pure noise reads as some colour (nearly always green, the palette colour with most of the RGB cube near
    it), so against a balanced set of prompts it matches at chance: measured 14.3% colour, 15.2% position. A blank
    gradient shows no object at all and matches nothing."""
    prompts = [caption(s) for s in scenes(PAIRS, seed=41)]
    rng = np.random.default_rng(42)
    noise = [score(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), p) for p in prompts]
    low, high = chance_band(chance_levels()["color"], PAIRS)
    assert low <= percent(noise, "color") <= high
    assert percent(noise, "position") <= chance_band(chance_levels()["position"], PAIRS)[1]

    shade = 1.0 + 0.15 * np.linspace(-1.0, 1.0, 32)[:, None, None]
    blank = []
    for i, prompt in enumerate(prompts):
        base = np.asarray(list(BACKGROUND_COLORS.values())[i % len(BACKGROUND_COLORS)], dtype=np.float64)
        pixels = base * shade + rng.normal(0.0, 3.0, (32, 32, 3))
        blank.append(score(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), prompt))
    assert all(row["detected_color"] is None for row in blank)
    assert percent(blank, "color") == percent(blank, "position") == percent(blank, "shape") == 0.0


def test_detect_reports_where_each_position_is():
    """Every grid cell is read back as itself, for each shape."""
    checked = set()
    for scene in scenes(150, seed=51):
        assert detect(render(scene, 48)).position == scene.position, caption(scene)
        checked.add((scene.position, scene.shape))
    assert len(checked) >= 30 and {position for position, _ in checked} == set(POSITIONS)
