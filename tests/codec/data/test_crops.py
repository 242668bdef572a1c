"""codec/data/crops.py: draw-keyed training crops and centre crops."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from codec.common.draws import DrawSampler
from codec.data import CenterCrops, TrainCrops, pil_to_tensor, tensor_to_pil
from tests.codec.data.helpers import COLOURS, records, write_colour_folder


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


def test_a_text_codecs_mirrored_crops_are_conditioned_on_their_mirrored_captions(tmp_path):
    # A text CVAE trained with data.flip (the default) must not learn "on the left" from a shape on the right: a
    # mirrored crop comes with the embedding of its mirrored caption (the rule of codec/shards/encode.py --flip).
    from codec.network.conditional import TextConditions
    from codec.training.config import load_codec_config
    from codec.data.crops import mirror_caption
    from codec.training.train import load_data
    from experiments.demo.adherence import detect, parse_prompt
    from experiments.demo.shapes import write_shapes_dataset
    from tests.conftest import ROOT

    shapes = write_shapes_dataset(tmp_path / "shapes", count=12, seed=0, size=32)
    cfg = load_codec_config(ROOT / "configs" / "codec" / "tiny.yaml", [
        f"data.train={shapes}", "data.val=null", "data.val_count=2", "data.crop_size=32", "data.resize=32",
        "data.val_size=32", "model.condition=text", "model.condition_channels=4"])
    assert cfg.data.flip  # the default
    data = load_data(cfg.data, seed=0, model=cfg.model)
    captions = data.train_dataset["text"]
    text = TextConditions(cfg.model.text_encoder, cfg.model.text_max_length)
    mirrored = contradictions = 0
    for draw in range(40):
        item = data.train[draw]
        caption = captions[data.train.item_index(draw)]
        pixels = item["pixels"].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        shown = detect(pixels).position
        true = caption if parse_prompt(caption).position == shown else mirror_caption(caption)
        assert parse_prompt(true).position == shown  # a crop of the whole image, mirrored or not
        mirrored += true != caption
        contradictions += not torch.allclose(item["condition"], text([true])[0], atol=1e-5)
    print(f"{mirrored} of 40 crops mirrored a caption's side, {contradictions} conditioned on a contradicting caption")
    assert mirrored == 9  # the crops' draws keyed by (seed 0, draw) mirror 9 side-naming captions of 40
    assert contradictions == 0
