"""scripts/compress.py and scripts/fit_entropy_model.py as a user runs them: any image size round-trips, --bpp
picks the finest step that fits, and every bad input is one `error:` line naming it with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from codec.entropy import coder
from codec.entropy.bitstream import unpack
from codec.entropy.coder import compress_latent, decode_latent, encode_latent, step_ladder
from codec.entropy.models import FactorizedModel, load_model, save_model
from codec.entropy.symbols import dequantize, quantize
from codec.network.model import codec_identity, encoder_identity, load_codec
from tests.codec.entropy.conftest import MODELS
from tests.conftest import command


@pytest.fixture(scope="module")
def compress_main():
    return command("compress")


@pytest.fixture(scope="module")
def decompress_main():
    return command("decompress")


@pytest.fixture
def images(tmp_path, photo, odd_photo):
    folder = tmp_path / "images"
    folder.mkdir()
    photo.save(folder / "cat.png")
    odd_photo.save(folder / "rocket.png")
    return folder


def run(main, argv, capsys) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def refused(main, argv, capsys, name) -> str:
    """Run argv, expect exit 2 and one stderr line `latent-codec <verb>: error: ...` naming `name`."""
    status, _, err = run(main, argv, capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latent-codec ") and ": error: " in lines[0], err
    assert str(name) in lines[0], err
    return lines[0]


def nothing_in(folder) -> bool:
    return not folder.exists() or not any(folder.iterdir())


@pytest.mark.parametrize("kind", MODELS)
def test_any_size_image_round_trips_to_the_encoders_latent(compress_main, decompress_main, images, tmp_path,
                                                           model_files, tiny_codec_dir, capsys, kind):
    packed, decoded = tmp_path / "packed", tmp_path / "decoded"
    common = ["--codec", tiny_codec_dir, "--entropy-model", model_files[kind]]
    assert run(compress_main, [images / "rocket.png", *common, "--out", packed, "--delta", 0.25], capsys)[0] == 0
    assert run(decompress_main, [packed / "rocket.lcc", *common, "--out", decoded], capsys)[0] == 0
    result = Image.open(decoded / "rocket.png")
    assert result.size == (53, 37)
    # Bit for bit what the decoder makes of the encoder's own quantised latent.
    vae, model = load_codec(tiny_codec_dir), load_model(model_files[kind])
    z, size = encode_latent(vae, Image.open(images / "rocket.png"))
    header, _ = unpack((packed / "rocket.lcc").read_bytes(), "rocket.lcc")
    y = quantize(model.normalise(z), header.step)
    expected = decode_latent(vae, model.denormalise(dequantize(y, header.step)), size)
    assert np.array_equal(np.asarray(result), np.asarray(expected))


def test_a_large_image_is_coded_in_tiles(compress_main, decompress_main, tmp_path, photo, model_files, tiny_codec_dir,
                                         capsys, monkeypatch):
    wide = photo.resize((523, 20))  # padded to 528 x 24: above the 512-pixel tile, a 66-wide latent above 64
    wide.save(tmp_path / "wide.png")
    calls = []
    for name in ("tiled_encode", "tiled_decode"):
        real = getattr(coder, name)
        monkeypatch.setattr(coder, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    common = ["--codec", tiny_codec_dir, "--entropy-model", model_files["factorized"]]
    assert run(compress_main, [tmp_path / "wide.png", *common, "--out", tmp_path, "--delta", 0.5], capsys)[0] == 0
    assert run(decompress_main, [tmp_path / "wide.lcc", *common, "--out", tmp_path / "d"], capsys)[0] == 0
    assert calls == ["tiled_encode", "tiled_decode"]
    assert Image.open(tmp_path / "d" / "wide.png").size == (523, 20)


def test_bpp_picks_the_finest_ladder_step_that_fits(compress_main, images, tmp_path, model_files, tiny_codec_dir,
                                                    capsys):
    vae, model = load_codec(tiny_codec_dir), load_model(model_files["context"])
    identity = codec_identity(vae)
    z, size = encode_latent(vae, Image.open(images / "cat.png"))
    pixels = size[0] * size[1]
    ladder = step_ladder(model)
    files = [compress_latent(model, model.normalise(z), step, size, identity, "cat") for step in ladder]
    bpp = files[len(ladder) // 2].bits / pixels  # a rate the middle of the ladder meets exactly
    finest_fit = min(i for i, f in enumerate(files) if f.bits <= bpp * pixels)

    status, out, _ = run(compress_main, [images / "cat.png", "--codec", tiny_codec_dir, "--entropy-model",
                                         model_files["context"], "--out", tmp_path, "--bpp", bpp], capsys)
    assert status == 0 and "bpp" in out
    data = (tmp_path / "cat.lcc").read_bytes()
    assert data == files[finest_fit].data
    assert 8 * len(data) <= bpp * pixels < files[finest_fit - 1].bits

    line = refused(compress_main, [images / "cat.png", "--codec", tiny_codec_dir, "--entropy-model",
                                   model_files["context"], "--out", tmp_path / "none", "--bpp", 0.01],
                   capsys, images / "cat.png")
    assert "coarsest" in line and nothing_in(tmp_path / "none")


def test_damaged_and_foreign_files_are_refused_and_nothing_is_written(compress_main, decompress_main, images, tmp_path,
                                                                      model_files, tiny_codec_dir, capsys):
    common = ["--codec", tiny_codec_dir, "--entropy-model", model_files["context"]]
    assert run(compress_main, [images / "cat.png", *common, "--out", tmp_path, "--delta", 0.3], capsys)[0] == 0
    good = (tmp_path / "cat.lcc").read_bytes()
    damaged = {
        "truncated.lcc": good[:-7],
        "flipped.lcc": good[:60] + bytes([good[60] ^ 1]) + good[61:],
        "foreign.lcc": (images / "cat.png").read_bytes(),
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"out-{name}"
        # The good file first: it must not be written either, as every file is checked before any is decoded.
        refused(decompress_main, [tmp_path / "cat.lcc", tmp_path / name, *common, "--out", out], capsys,
                tmp_path / name)
        assert nothing_in(out)


def test_a_file_of_another_codec_and_missing_or_mismatched_models_are_refused(
        compress_main, decompress_main, images, tmp_path, model_files, tiny_codec_dir, other_codec_dir, capsys):
    other_vae = load_codec(other_codec_dir)
    other_model = tmp_path / "other.safetensors"  # an (untrained) model of the other codec, so it can compress
    save_model(FactorizedModel(4), other_model, codec_identity=codec_identity(other_vae),
               encoder_identity=encoder_identity(other_vae), normalisation={"scaling_factor": 1.0},
               fit={"step_range": [0.1, 1.0]})
    assert run(compress_main, [images / "cat.png", "--codec", other_codec_dir, "--entropy-model", other_model, "--out",
                               tmp_path / "other", "--delta", 0.5], capsys)[0] == 0
    ours = ["--codec", tiny_codec_dir, "--entropy-model", model_files["factorized"]]
    out = tmp_path / "out"
    line = refused(decompress_main, [tmp_path / "other" / "cat.lcc", *ours, "--out", out], capsys,
                   tmp_path / "other" / "cat.lcc")
    assert "codec" in line

    assert run(compress_main, [images / "cat.png", *ours, "--out", tmp_path, "--delta", 0.5], capsys)[0] == 0
    refused(decompress_main, [tmp_path / "cat.lcc", "--codec", tiny_codec_dir, "--entropy-model",
                            model_files["context"], "--out", out], capsys, tmp_path / "cat.lcc")  # another model
    missing = tmp_path / "missing.safetensors"
    refused(decompress_main, [tmp_path / "cat.lcc", "--codec", tiny_codec_dir, "--entropy-model", missing,
                            "--out", out], capsys, missing)
    refused(compress_main, [images / "cat.png", "--codec", tiny_codec_dir, "--entropy-model", other_model, "--out", out,
                            "--delta", 0.5], capsys, other_model)  # a model fit for another codec
    assert nothing_in(out)


def test_unreadable_images_and_bad_steps_are_refused(compress_main, images, tmp_path, model_files, tiny_codec_dir,
                                                     capsys):
    common = ["--codec", tiny_codec_dir, "--entropy-model", model_files["factorized"]]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    refused(compress_main, [tmp_path / "broken.png", *common, "--out", out, "--delta", 0.5], capsys,
            tmp_path / "broken.png")
    refused(compress_main, [images / "cat.png", *common, "--out", out, "--delta", -1], capsys, images / "cat.png")
    assert nothing_in(out)


def test_fit_script_writes_a_model_and_refuses_bad_settings(tiny_shards, tmp_path, capsys):
    fit_main = command("entropy fit")
    out = tmp_path / "m" / "entropy-model.safetensors"
    status, stdout, _ = run(fit_main, ["--shards", tiny_shards, "--out", out.parent, "--kind", "factorized",
                                       "--max-steps", 3, "--batch-size", 2], capsys)
    assert status == 0 and load_model(out).kind == "factorized" and load_model(out).identity in stdout
    refused(fit_main, ["--shards", tiny_shards, "--out", tmp_path / "x", "--delta-min", 0], capsys, "delta_min")
    refused(fit_main, ["--shards", tmp_path / "nowhere", "--out", tmp_path / "x"], capsys, tmp_path / "nowhere")
    assert not (tmp_path / "x").exists()
