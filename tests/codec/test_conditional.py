"""The conditional codec (CVAE) and the exact ELBO: the condition reaches both networks, β = 1 is the negative ELBO,
a CVAE trains, saves, loads and resumes, and bad data is refused with one line."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

import codec.training.train as train_module
from codec.common.config import ConfigError
from codec.network.conditional import ConditionalAutoencoderKL, TextConditions, condition_tensor
from codec.network.model import build_codec, encode_posterior, load_codec, reconstruct, sample_prior
from codec.training.config import ModelConfig
from codec.training.losses import kl_divergence, vae_loss
from codec.training.train import train_codec
from experiments.demo.shapes import write_shapes_dataset
from tests.conftest import ROOT, assert_same_safetensors, killed_after_a_checkpoint, reset_accelerate

TINY = dict(block_out_channels=[8, 8, 16, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
            mid_block_add_attention=False)


def _tiny(condition: str, injection: str = "concat", **extra) -> ConditionalAutoencoderKL:
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY, condition=condition, condition_channels=4, condition_injection=injection)
    return build_codec(cfg, class_names=["circle", "square", "star"] if condition == "class" else None, **extra).eval()


def _trained_film(vae: ConditionalAutoencoderKL) -> ConditionalAutoencoderKL:
    """FiLM maps start at zero; give them the nonzero weights training would."""
    for norm in vae._film["encoder"] + vae._film["decoder"]:
        torch.nn.init.normal_(norm.to_scale_shift.weight, std=0.3)
    return vae


@pytest.fixture(scope="module")
def shapes64(tmp_path_factory):
    """24 captioned shapes images at 64 px (columns image, caption, color, shape, ...)."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes") / "shapes", count=24, seed=0, size=64,
                                progress=False)


@pytest.mark.parametrize("injection", ["concat", "film"])
@pytest.mark.parametrize("condition", ["class", "text"])
def test_the_condition_reaches_both_the_encoder_and_the_decoder(condition, injection):
    vae = _tiny(condition, injection)
    if injection == "film":
        vae = _trained_film(vae)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 4, 4)
    if condition == "class":
        c1, c2 = torch.tensor([0, 0]), torch.tensor([1, 2])
    else:
        c1, c2 = torch.randn(2, 384), torch.randn(2, 384)
    # Another condition, the same z: another image. The same x: another posterior.
    decoded = (vae.decode(z, c1).sample - vae.decode(z, c2).sample).abs().mean()
    encoded = (vae.encode(x, c1).latent_dist.mean - vae.encode(x, c2).latent_dist.mean).abs().mean()
    assert decoded > 1e-3 and encoded > 1e-3, (decoded, encoded)
    # Gradients reach the condition's embedding through each network on its own.
    for path in ("encoder", "decoder"):
        vae.zero_grad()
        c = c1.clone().float().requires_grad_() if condition == "text" else c1
        out = vae.encode(x, c).latent_dist.mean if path == "encoder" else vae.decode(z, c).sample
        out.square().sum().backward()
        grad = c.grad if condition == "text" else vae.condition_embedding.weight.grad
        assert grad is not None and grad.abs().sum() > 0, path
        if condition == "class":  # only the rows of the labels used
            assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0
    with pytest.raises(ValueError, match="conditional"):
        vae.decode(z, None)


def test_an_untrained_film_codec_is_the_plain_autoencoder_whatever_the_condition():
    vae = _tiny("class", "film")
    plain = build_codec(ModelConfig(**TINY)).eval()
    # The same weights minus the FiLM maps: the plain AutoencoderKL's state dict, key for key.
    state = {re.sub(r"\.norm\.(weight|bias)$", r".\1", key): value for key, value in vae.state_dict().items()
             if "to_scale_shift" not in key and not key.startswith("condition_embedding")}
    plain.load_state_dict(state)
    z, x = torch.randn(2, 4, 4, 4), torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for label in ([0, 0], [1, 2]):
            c = torch.tensor(label)
            assert torch.allclose(vae.decode(z, c).sample, plain.decode(z).sample, atol=1e-6)
            assert torch.allclose(vae.encode(x, c).latent_dist.mean, plain.encode(x).latent_dist.mean, atol=1e-6)
    assert len(vae._film["encoder"]) > 0 and len(vae._film["decoder"]) > 0


def test_beta_one_exact_loss_is_the_negative_elbo_computed_by_hand():
    # One image of 1x1x2 pixels, one latent number; likelihood N(x̂, σ² = e^s) per pixel, posterior N(μ, v).
    x = torch.tensor([[[[0.5, -0.25]]]])
    recon = torch.tensor([[[[0.25, 0.25]]]])
    mean, logvar = torch.tensor([[[[0.5]]]]), torch.tensor([[[[math.log(0.25)]]]])
    s = torch.tensor(math.log(0.1))
    nll = sum(0.5 * (d * d / 0.1 + math.log(0.1) + math.log(2 * math.pi)) for d in (0.25, -0.5))
    kl = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25))
    parts = vae_loss(x, recon, mean, logvar, s, 1.0, pixel="mse", nll_form="exact")
    assert parts.total.item() * 2 == pytest.approx(nll + kl, rel=1e-6)  # x 2 pixel elements: −ELBO in nats
    assert parts.kl.item() == pytest.approx(kl, rel=1e-6)
    # Laplace of scale b = e^s for l1: |d|/b + log 2b.
    laplace = sum(abs(d) / 0.1 + math.log(0.2) for d in (0.25, -0.5))
    parts = vae_loss(x, recon, mean, logvar, s, 1.0, pixel="l1", nll_form="exact")
    assert parts.total.item() * 2 == pytest.approx(laplace + kl, rel=1e-6)
    # LDM's scaled form is not the ELBO: twice the Gaussian NLL without its constants.
    scaled = vae_loss(x, recon, mean, logvar, s, 1.0, pixel="mse").total.item() * 2
    assert scaled == pytest.approx(2 * nll - 2 * math.log(2 * math.pi) + kl, rel=1e-6)
    assert kl_divergence(mean, logvar).item() == pytest.approx(kl, rel=1e-6)


def test_exact_nll_refuses_a_perceptual_term(tmp_path):
    from codec.training.config import load_codec_config

    with pytest.raises(ConfigError, match="perceptual: none"):
        load_codec_config(ROOT / "configs" / "codec" / "tiny.yaml", ["loss.nll=exact"])


def _cvae_config(tmp_path, shapes, condition, *overrides):
    from codec.training.config import load_codec_config

    return load_codec_config(ROOT / "configs" / "codec" / "tiny.yaml", [
        f"data.train={shapes}", "data.val=null", "data.val_count=4", "data.crop_size=32", "data.resize=32",
        "data.val_size=32", "data.flip=false", f"model.condition={condition}", "model.condition_channels=4",
        "loss.perceptual=none", "loss.pixel=mse", "loss.nll=exact", "loss.kl_weight=1.0", "train.latent_stats_images=8",
        "train.validate_every=0", f"train.output_dir={tmp_path / 'run'}", *overrides])


def test_a_text_cvae_trains_saves_loads_and_resumes(shapes64, tmp_path, monkeypatch):
    common = ("train.max_steps=6", "train.checkpoint_every=3", "optim.warmup_steps=2")
    reset_accelerate()
    straight = train_codec(_cvae_config(tmp_path, shapes64, "text", *common, f"train.output_dir={tmp_path / 'a'}"))
    reset_accelerate()
    interrupted = _cvae_config(tmp_path, shapes64, "text", *common, f"train.output_dir={tmp_path / 'b'}")
    with killed_after_a_checkpoint(monkeypatch, train_module):
        train_codec(interrupted)
    resumed = train_codec(interrupted, resume="latest")
    reset_accelerate()
    assert resumed.step == straight.step == 6
    assert_same_safetensors(tmp_path / "a", tmp_path / "b", ("final/diffusion_pytorch_model.safetensors",))

    # from_pretrained of our diffusers class, and load_codec, give the network that was trained.
    config = json.loads((straight.final / "config.json").read_text())
    assert config["_class_name"] == "ConditionalAutoencoderKL" and config["condition"] == "text"
    loaded = ConditionalAutoencoderKL.from_pretrained(straight.final).eval()
    prompt = "a red circle in the center on a black background"
    c = condition_tensor(loaded, prompt=prompt, count=2)
    assert torch.allclose(c[0], TextConditions("minilm", 32)([prompt])[0])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    again = load_codec(straight.final, allow_conditional=True)
    assert torch.equal(reconstruct(loaded, x, c), reconstruct(again, x, c))
    g = torch.Generator().manual_seed(0)
    assert sample_prior(loaded, 2, 32, 32, generator=g, condition=c).shape == (2, 3, 32, 32)
    info = json.loads((straight.final / "codec_training.json").read_text())
    assert info["config"]["model"]["condition"] == "text" and info["latent_statistics"]["std"] > 0
    # Shards, U-Nets and pipelines take unconditional codecs only, and say so.
    with pytest.raises(ValueError, match="is a conditional codec"):
        load_codec(straight.final)

    # Another condition width is another network: the resume is refused.
    with pytest.raises(ConfigError, match="condition_channels"):
        train_codec(_cvae_config(tmp_path, shapes64, "text", *common, "model.condition_channels=8",
                                 f"train.output_dir={tmp_path / 'b'}"), resume="latest")
    reset_accelerate()


def _class_cvae_trained_two_steps(tmp_path, shapes64, injection: str):
    """A CVAE conditioned on the shapes' `shape` column, trained for two steps: (its export folder, the codec)."""
    reset_accelerate()
    result = train_codec(_cvae_config(tmp_path, shapes64, "class", "data.condition_column=shape", "train.max_steps=2",
                                      f"model.condition_injection={injection}"))
    reset_accelerate()
    vae = load_codec(result.final, allow_conditional=True)
    assert vae.config.injection == injection
    return result.final, vae


def test_a_class_cvae_reads_string_labels_and_samples_each_class(shapes64, tmp_path):
    _, vae = _class_cvae_trained_two_steps(tmp_path, shapes64, "concat")
    assert vae.config.class_names == ["circle", "square", "star", "triangle"]  # sorted
    assert condition_tensor(vae, label="star", count=3).tolist() == [2, 2, 2]
    assert condition_tensor(vae, label="1").tolist() == [1]
    with pytest.raises(ValueError, match="not one of this codec's classes"):
        condition_tensor(vae, label="hexagon")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert encode_posterior(vae, x, condition_tensor(vae, label=0)).mean.shape == (1, 4, 4, 4)


def test_a_film_cvae_trains_its_scale_shift_maps_and_round_trips(shapes64, tmp_path):
    final, vae = _class_cvae_trained_two_steps(tmp_path, shapes64, "film")
    # Two steps move the maps off their zero start, so the condition now changes the decoder's output.
    assert max(n.to_scale_shift.weight.abs().max().item() for n in vae._film["decoder"]) > 0
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        star, circle = (vae.decode(z, condition_tensor(vae, label=k)).sample for k in ("star", "circle"))
    assert (star - circle).abs().max() > 0
    again = ConditionalAutoencoderKL.from_pretrained(final)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    c = condition_tensor(vae, label="square")
    assert torch.equal(reconstruct(vae, x, c), reconstruct(again.eval(), x, c))


def test_a_text_codec_refuses_a_dataset_without_captions_in_one_line(tmp_path, bundled_dir):
    cmd = [sys.executable, "-m", "latent_codec", "codec", "train", "--config", "tiny",
           "--data", str(bundled_dir / "train"), "--out", str(tmp_path / "run"),
           "--set", "model.condition=text", "--set", "loss.perceptual=none"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "'caption'" in last and "set data.condition_column" in last, last
    assert not (tmp_path / "run" / "final").exists()


def test_generate_draws_prior_samples_of_a_cvae_for_a_prompt_and_refuses_a_missing_one(shapes64, tmp_path):
    reset_accelerate()
    result = train_codec(_cvae_config(tmp_path, shapes64, "text", "train.max_steps=1"))
    reset_accelerate()
    script = [sys.executable, "-m", "latent_codec", "generate", "--codec", str(result.final)]
    prompt = "a red circle in the center on a black background"
    for prompt_, out in ((prompt, "a"), (prompt, "b"), ("a blue star at the top on a navy background", "c")):
        done = subprocess.run([*script, "--prior-samples", "3", "--prompt", prompt_, "--seed", "0", "--resolution",
                               "32",
                               "--out", str(tmp_path / out)], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
    import numpy as np
    from PIL import Image

    def pixels(out):
        return np.stack([np.asarray(Image.open(tmp_path / out / f"prior-seed0-{k}.png"), dtype=np.int16)
                         for k in range(3)])

    record = json.loads((tmp_path / "a" / "prior-seed0.json").read_text())
    assert record["settings"]["condition"] == "text" and record["settings"]["prompt"] == prompt
    assert np.array_equal(pixels("a"), pixels("b"))  # same seed, same prompt
    assert np.abs(pixels("a") - pixels("c")).mean() > 0  # same z, another caption: another image
    missing = subprocess.run([*script, "--prior-samples", "2"], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode != 0 and "give a prompt (--prompt)" in missing.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------------
# Prior samples: seeded, and drawn from the caption
# ---------------------------------------------------------------------------------------------------------------


def test_text_conditions_are_standardised_with_the_statistics_fitted_to_them():
    vae = _tiny("text", "film")
    captions = torch.randn(50, 384) * 0.01 + torch.linspace(-3, 3, 384)  # pooled embeddings: close to each other
    vae.fit_condition_statistics(captions)
    standardised = (captions - vae.condition_mean) / vae.condition_std
    torch.testing.assert_close(standardised.mean(0), torch.zeros(384), atol=1e-3, rtol=0)
    torch.testing.assert_close(standardised.std(0, unbiased=False), torch.ones(384), atol=1e-3, rtol=0)
    # what the embedding MLP receives is the standardised caption
    embedded = vae.embed(captions[:2], torch.zeros(2, 3, 8, 8))
    torch.testing.assert_close(embedded, vae.condition_embedding(standardised[:2]))


def test_seeded_prior_sampling_is_reproducible_and_the_seed_matters():
    vae = _trained_film(_tiny("text", "film"))
    c = torch.randn(3, 384)
    first, again, other = (sample_prior(vae, 3, 32, 32, torch.Generator().manual_seed(seed), c) for seed in (5, 5, 6))
    assert torch.equal(first, again)
    assert (first - other).abs().mean() > 1e-3


def test_a_trained_cvae_draws_from_its_caption_more_than_from_its_seed(shapes64, tmp_path):
    """The decoder uses c: for one seed, two captions decode further apart than one caption's samples under
    different seeds. Measured when written (80 steps, β 16): caption distance / seed spread = 4.1; an untrained FiLM
    codec ignores its caption (ratio 0)."""
    reset_accelerate()
    result = train_codec(_cvae_config(
        tmp_path, shapes64, "text", "train.max_steps=80", "optim.warmup_steps=5", "optim.lr=2e-3",
        "train.batch_size=8", "loss.kl_weight=16", "model.condition_coordinates=true", "train.checkpoint_every=1000"))
    reset_accelerate()
    vae = load_codec(result.final, allow_conditional=True)
    assert vae.config.coordinates and vae.config.standardize_condition
    captions = ["a red circle in the center on a black background",
                "a cyan square at the top left on a dark green background"]
    conditions = TextConditions("minilm", 32)(captions)
    # The training captions' standardisation was fitted (22 of the 24 captions; 2 are held out for validation) and
    # exported with the weights.
    from datasets import load_from_disk

    every = TextConditions("minilm", 32)(list(load_from_disk(str(shapes64))["text"]))
    assert ((vae.condition_mean - every.mean(0)).abs() < 0.5 * every.std(0)).all()
    assert (vae.condition_std / every.std(0)).log().abs().median() < 0.1

    def samples(seed: int, caption: int) -> torch.Tensor:
        c = conditions[caption : caption + 1].repeat(4, 1)
        return sample_prior(vae, 4, 32, 32, torch.Generator().manual_seed(seed), c)

    seed_spread = (samples(0, 0) - samples(1, 0)).abs().mean() + (samples(0, 1) - samples(1, 1)).abs().mean()
    caption_distance = (samples(0, 0) - samples(0, 1)).abs().mean() + (samples(1, 0) - samples(1, 1)).abs().mean()
    assert caption_distance > 2 * seed_spread
