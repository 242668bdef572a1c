"""The exported pipeline folder loads with stock diffusers, outside this project, and generates what it does here.

The loading runs in a subprocess started with `python -I -S`: no site-packages .pth files, so the editable
install's finder never runs and neither `codec` nor `diffusion` can be imported there (the child asserts it).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codec.exchange.pipeline import LatentDiffusionPipeline, encode_prompts
from diffusion.train import export_pipeline
from tests.conftest import ROOT

PROMPT = "a red motorcycle in a room"
T2I = dict(num_inference_steps=4, guidance_scale=3.0, seed=7, output_type="pt")

# Runs in the child. argv: site-packages, exported folder, legacy-index folder, RGBA photo, output .pt file.
CHILD = r"""
import importlib.util, sys
sys.path.append(sys.argv[1])  # the venv's packages, without the .pth file that puts our packages on the path
hidden = {name: importlib.util.find_spec(name) is None for name in ("codec", "diffusion")}
assert all(hidden.values()), f"our packages are importable in the child: {hidden}"

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import AutoModel, AutoTokenizer

torch.set_num_threads(1)  # as the parent test runs: the same reduction order, so equal outputs
folder, legacy, photo, out = sys.argv[2:6]
prompt, t2i = sys.argv[6], dict(num_inference_steps=4, guidance_scale=3.0, seed=7, output_type="pt")
try:
    DiffusionPipeline.from_pretrained(folder)
    refusal = ""
except ValueError as error:
    refusal = str(error)

results = {"refusal": refusal}
# The folder as exported (model_index.json names ["pipeline", class]), and an old-style index (the class name
# alone) that finds the code only through custom_pipeline=FOLDER: diffusers then takes the one DiffusionPipeline
# subclass defined in FOLDER/pipeline.py.
routes = (("trust_remote_code", folder, {}), ("custom_pipeline", legacy, {"custom_pipeline": legacy}))
for route, path, kwargs in routes:
    pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    generated = pipe(prompt, **t2i)
    results[route] = {
        "class": f"{type(pipe).__module__}.{type(pipe).__name__}",
        "images": generated.images, "latents": generated.latents,
        "reconstruction": pipe.reconstruct(Image.open(photo), output_type="pt").images,
    }

tokenizer = AutoTokenizer.from_pretrained(f"{folder}/tokenizer")
text_encoder = AutoModel.from_pretrained(f"{folder}/text_encoder").eval()
tokens = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                   return_tensors="pt")
with torch.no_grad():
    results["text_states"] = text_encoder(**tokens).last_hidden_state
results["text_encoder_class"] = type(text_encoder).__name__
results["ours_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("codec", "diffusion"))
torch.save(results, out)
"""


@pytest.fixture(scope="module")
def exported(tiny_pipeline, tmp_path_factory) -> Path:
    """The tiny pipeline written by the trainer's export function."""
    return export_pipeline(tiny_pipeline, tmp_path_factory.mktemp("export"), {"steps": 0})


def legacy_copy(folder: Path, dest: Path, keep_code: bool) -> Path:
    """`folder` as exports before this change were: model_index.json names the class alone (hard links: no copy)."""
    shutil.copytree(folder, dest, copy_function=os.link)
    index = dest / "model_index.json"
    config = json.loads(index.read_text())
    config["_class_name"] = "LatentDiffusionPipeline"
    index.unlink()  # a hard link: rewriting it in place would change the export too
    index.write_text(json.dumps(config, indent=2))
    if not keep_code:
        (dest / "pipeline.py").unlink()
    return dest


def rgba_photo(path: Path) -> Path:
    pixels = (np.random.default_rng(0).random((64, 64, 4)) * 255).astype("uint8")
    Image.fromarray(pixels, "RGBA").save(path)  # alpha: the child composites it on white, as to_rgb does here
    return path


def test_export_carries_the_pipeline_code_and_names_it(exported):
    config = json.loads((exported / "model_index.json").read_text())
    assert config["_class_name"] == ["pipeline", "LatentDiffusionPipeline"]
    # One implementation: the folder's code is our files, byte for byte.
    assert (exported / "pipeline.py").read_bytes() == (ROOT / "codec" / "exchange" / "pipeline.py").read_bytes()
    assert sorted(p.name for p in exported.glob("*.py")) == ["pipeline.py"]  # one file carries all the code
    assert config["text_encoder"] == ["transformers", "BertModel"]


def test_stock_diffusers_loads_the_folder_and_generates_the_same(exported, tmp_path):
    photo = rgba_photo(tmp_path / "photo.png")
    legacy = legacy_copy(exported, tmp_path / "legacy_with_code", keep_code=True)
    out = tmp_path / "child.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    child = subprocess.run(
        [sys.executable, "-I", "-S", "-c", CHILD, sysconfig.get_paths()["purelib"], str(exported), str(legacy),
         str(photo), str(out), PROMPT],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    assert results["ours_imported"] == []
    assert "trust_remote_code=True" in results["refusal"]  # custom code runs only when asked for
    assert results["text_encoder_class"] == "BertModel"

    pipe = LatentDiffusionPipeline.from_pretrained(exported)
    pipe.set_progress_bar_config(disable=True)
    here = pipe(PROMPT, **T2I)
    reconstruction = pipe.reconstruct(Image.open(photo), output_type="pt").images
    for route in ("trust_remote_code", "custom_pipeline"):
        there = results[route]
        assert there["class"] == "diffusers_modules.local.pipeline.LatentDiffusionPipeline"  # diffusers' own loader
        # Measured: 0.0 for images, latents and reconstructions (same code, same weights, one CPU thread each).
        assert (there["latents"] - here.latents).abs().max().item() <= 1e-6
        assert (there["images"] - here.images).abs().max().item() <= 1e-6
        assert (there["reconstruction"] - reconstruction).abs().max().item() <= 1e-6
    assert here.images.std().item() > 1e-2  # not a blank image that would match anything

    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    states = encode_prompts(tokenizer, text_encoder, [PROMPT], tokenizer.model_max_length)
    assert results["text_states"].shape == states.shape == (1, 16, 384)
    assert (results["text_states"] - states).abs().max().item() <= 1e-6


def test_the_folder_and_older_exports_load_in_the_project(exported, tiny_pipeline, tmp_path):
    """In the project the class asked for is ours (no trust_remote_code, no second copy of the code); a folder
    exported before this change, whose model_index.json names the class alone, loads and generates the same."""
    pipe = LatentDiffusionPipeline.from_pretrained(exported)
    assert type(pipe) is LatentDiffusionPipeline
    old = LatentDiffusionPipeline.from_pretrained(legacy_copy(exported, tmp_path / "legacy", keep_code=False))
    assert type(old) is LatentDiffusionPipeline
    for p in (pipe, old, tiny_pipeline):
        p.set_progress_bar_config(disable=True)
    expected = tiny_pipeline(PROMPT, **T2I).images
    assert torch.equal(pipe(PROMPT, **T2I).images, expected)
    assert torch.equal(old(PROMPT, **T2I).images, expected)
    # Saving the old folder's pipeline again makes it portable.
    resaved = tmp_path / "resaved"
    old.save_pretrained(resaved)
    resaved_index = json.loads((resaved / "model_index.json").read_text())
    assert resaved_index["_class_name"] == ["pipeline", "LatentDiffusionPipeline"]
