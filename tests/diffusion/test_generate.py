import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from codec.exchange.pipeline import LatentDiffusionPipeline
from tests.conftest import ROOT


def _record(out, stem):
    return json.loads((out / f"{stem}.json").read_text())


def test_text_to_image_writes_pngs_and_settings_and_is_reproducible(generate, pipeline_dir, tiny_pipeline, tmp_path):
    out = tmp_path / "out"
    assert generate(["--pipeline", str(pipeline_dir), "--prompt", "a red motorcycle", "--sample-steps", "4",
                     "--guidance", "3",
                     "--seed", "3", "--num-images", "2", "--scheduler", "dpm", "--device", "cpu",
                     "--out", str(out)]) == 0
    record = _record(out, "txt2img-seed3")
    assert record["files"] == ["txt2img-seed3-0.png", "txt2img-seed3-1.png"]
    assert record["settings"]["scheduler"] == "dpm" and record["settings"]["guidance"] == 3.0
    assert record["output"]["sampler"] == "DPMSolverMultistepScheduler"
    assert record["output"]["image_shape"] == [3, 64, 64] and record["output"]["latent_shape"] == [4, 8, 8]
    assert record["output"]["compression_ratio"] == 48.0
    # The PNG is what the pipeline gives for the same seed and settings.
    pipe = LatentDiffusionPipeline(**tiny_pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.use_sampler("dpm")
    expected = pipe("a red motorcycle", num_inference_steps=4, guidance_scale=3.0, seed=3, num_images_per_prompt=2)
    written = np.asarray(Image.open(out / "txt2img-seed3-1.png"))
    assert np.array_equal(written, np.asarray(expected.images[1]))


def test_image_to_image_reconstruction_and_prior(generate, pipeline_dir, tiny_codec_dir, tmp_path, capsys):
    out = tmp_path / "out"
    photo = tmp_path / "odd.png"
    Image.fromarray((np.random.default_rng(0).random((66, 70, 3)) * 255).astype("uint8")).save(photo)

    assert generate(["--pipeline", str(pipeline_dir), "--prompt", "a cat", "--init-image", str(photo), "--strength",
                     "0.5", "--sample-steps", "4", "--seed", "0", "--out", str(out)]) == 0
    record = _record(out, "img2img-seed0")
    assert record["output"]["mode"] == "image-to-image" and record["output"]["denoising_steps_run"] == 2
    assert record["output"]["image_shape"] == [3, 64, 64] and "cropped from 70x66 to 64x64" in record["input_note"]

    assert generate(["--pipeline", str(pipeline_dir), "--reconstruct", str(photo), "--out", str(out)]) == 0
    record = _record(out, "reconstruction-odd")
    assert record["output"]["mode"] == "reconstruction" and np.isfinite(record["output"]["psnr_db"])
    assert Image.open(out / "reconstruction-odd-0.png").size == (64, 64)

    # Prior samples need only the codec: a codec folder.
    assert generate(["--codec", str(tiny_codec_dir), "--prior-samples", "2", "--seed", "5", "--resolution", "48x32",
                     "--out", str(out)]) == 0
    record = _record(out, "prior-seed5")
    assert record["output"]["latent_shape"] == [4, 4, 6] and len(record["files"]) == 2
    assert Image.open(out / "prior-seed5-0.png").size == (48, 32)
    assert generate(["--pipeline", str(tiny_codec_dir), "--prompt", "a cat", "--out", str(out)]) == 2
    assert "needs a pipeline folder" in capsys.readouterr().err


def test_interpolation_between_two_images_starts_and_ends_at_their_reconstructions(generate, tiny_codec_dir,
                                                                                  tmp_path, capsys):
    from codec.data import pil_to_tensor
    from codec.network.model import latent_blend, load_codec, reconstruct

    rng = np.random.default_rng(1)
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray((rng.random((32, 40, 3)) * 255).astype("uint8")).save(paths[-1])
    out = tmp_path / "out"
    assert generate(["--codec", str(tiny_codec_dir), "--interpolate", *map(str, paths), "--frames", "4",
                     "--out", str(out)]) == 0
    record = _record(out, "interpolation-a-b")
    assert record["output"]["mode"] == "interpolation" and len(record["files"]) == 4
    frames = [pil_to_tensor(Image.open(out / f"interpolation-a-b-{k}.png")) for k in range(4)]
    vae = load_codec(tiny_codec_dir)
    with torch.no_grad():
        ends = reconstruct(vae, torch.stack([pil_to_tensor(Image.open(p)) for p in paths])).clamp(-1, 1)
    # The first and last frames are the two images' reconstructions (to the PNGs' 8 bits); the middle ones differ.
    for frame, end in ((frames[0], ends[0]), (frames[-1], ends[1])):
        assert (frame - end).abs().max() <= 1.01 / 127.5
    assert (frames[1] - frames[0]).abs().mean() > 1e-3 and (frames[2] - frames[3]).abs().mean() > 1e-3
    blend = latent_blend(torch.zeros(1, 2, 1, 1), torch.ones(1, 2, 1, 1), 5)
    assert blend[:, 0, 0, 0].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")).save(tmp_path / "c.png")
    assert generate(["--codec", str(tiny_codec_dir), "--interpolate", str(paths[0]), str(tmp_path / "c.png"),
                     "--out", str(out)]) == 2
    assert "give --resolution" in capsys.readouterr().err


def test_help_explains_every_flag():
    proc = subprocess.run([sys.executable, "-m", "latent_codec", "generate", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0
    for flag in ("--pipeline", "--prompt", "--negative-prompt", "--sample-steps", "--guidance", "--seed",
                 "--num-images",
                 "--scheduler", "--init-image", "--strength", "--reconstruct", "--prior-samples", "--precision",
                 "--device", "--out", "--interpolate", "--frames", "--codec", "--label"):
        assert flag in proc.stdout
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "{fp32,bf16,fp16}" in text and "redone in fp32 with a warning" in text
    bad = subprocess.run([sys.executable, "-m", "latent_codec", "generate", "--pipeline", "m", "--reconstruct", "x",
                          "--init-image", "y"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--init-image is image-to-image with a pipeline" in bad.stderr
