import json

import pytest
import torch
from safetensors.torch import load_file

from codec.exchange.pipeline import LatentDiffusionPipeline, guided_prediction
from codec.network.model import reconstruct, sample_prior

STEPS = 6


def _generate(pipe, prompt="a tabby cat looking up", **kwargs):
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 4.0, "seed": 0, "output_type": "pt", **kwargs}
    return pipe(prompt, **kwargs)


def test_guidance_formula():
    uncond, cond = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    assert torch.equal(guided_prediction(uncond, cond, 1.0), cond)
    assert torch.equal(guided_prediction(uncond, cond, 0.0), uncond)
    assert torch.allclose(guided_prediction(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond))


def test_guidance_one_equals_the_conditional_model(tiny_pipeline):
    """Scale 1 is the conditional prediction: the pipeline at guidance 1 equals a hand-written loop that only
    ever asks the U-Net for the conditional prediction, and the batched two-branch path agrees to rounding."""
    pipe = tiny_pipeline
    out = _generate(pipe, guidance_scale=1.0)

    cond = pipe.encode_prompt(["a tabby cat looking up"])
    uncond = pipe.encode_prompt([""])
    pipe.scheduler.set_timesteps(STEPS)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * pipe.scheduler.init_noise_sigma
    two_branch = latents.clone()
    for t in pipe.scheduler.timesteps:
        eps = pipe.unet(latents, t, encoder_hidden_states=cond).sample
        latents = pipe.scheduler.step(eps, t, latents).prev_sample
    assert torch.equal(out.latents, latents)

    pipe.scheduler.set_timesteps(STEPS)
    for t in pipe.scheduler.timesteps:
        both = pipe.unet(torch.cat([two_branch] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        two_branch = pipe.scheduler.step(guided_prediction(*both.chunk(2), 1.0), t, two_branch).prev_sample
    assert (two_branch - latents).abs().max().item() < 1e-4

    guided = _generate(pipe, guidance_scale=4.0)
    assert (guided.latents - out.latents).abs().max().item() > 1e-2  # guidance really changes the result


def test_same_seed_same_image_other_seed_or_prompt_other_image(tiny_pipeline):
    a = _generate(tiny_pipeline).images
    b = _generate(tiny_pipeline).images
    assert torch.equal(a, b)
    other_seed = _generate(tiny_pipeline, seed=1).images
    other_prompt = _generate(tiny_pipeline, "galaxies in deep space").images
    # Measured mean absolute pixel differences (images in [-1, 1]): seed ~0.2, prompt ~0.02 (an untrained
    # U-Net's cross-attention moves the prediction a little; guidance 4 amplifies it).
    assert (a - other_seed).abs().mean().item() > 1e-2
    assert (a - other_prompt).abs().mean().item() > 1e-3
    negative = _generate(tiny_pipeline, negative_prompt="a rocket").images
    assert (a - negative).abs().mean().item() > 1e-3


def test_output_reports_shapes_and_the_element_ratio(tiny_pipeline):
    out = _generate(tiny_pipeline, num_images_per_prompt=2)
    assert out.images.shape == (2, 3, 64, 64) and out.latents.shape == (2, 4, 8, 8)
    assert out.info["image_shape"] == [3, 64, 64] and out.info["latent_shape"] == [4, 8, 8]
    assert out.info["compression_ratio"] == 48.0
    assert not torch.equal(out.images[0], out.images[1])  # two draws of noise, not one image twice
    assert tiny_pipeline.shapes_info(512, 512) == {"image_shape": [3, 512, 512], "latent_shape": [4, 64, 64],
                                                   "compression_ratio": 48.0}


@pytest.mark.parametrize("sampler", ["dpm", "euler"])
def test_other_samplers_keep_the_training_schedule(tiny_pipeline, sampler):
    pipe = LatentDiffusionPipeline(**tiny_pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.use_sampler(sampler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012
    if sampler == "dpm":
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    out = _generate(pipe)
    assert torch.isfinite(out.latents).all() and out.info["sampler"] == type(pipe.scheduler).__name__


def test_image_to_image_strength(tiny_pipeline):
    pipe = tiny_pipeline
    image = _generate(pipe).images[:1]
    # strength 0: no step runs, so image-to-image is exactly encode -> decode.
    unchanged = pipe("a rocket", image=image, strength=0.0, num_inference_steps=STEPS, seed=0, output_type="pt")
    assert unchanged.info["denoising_steps_run"] == 0
    assert torch.allclose(unchanged.images, reconstruct(pipe.vae, image).clamp(-1, 1), atol=1e-6)
    half = pipe("a rocket", image=image, strength=0.5, num_inference_steps=STEPS, seed=0, output_type="pt")
    full = pipe("a rocket", image=image, strength=1.0, num_inference_steps=STEPS, seed=0, output_type="pt")
    assert half.info["denoising_steps_run"] == STEPS // 2 and full.info["denoising_steps_run"] == STEPS
    # More strength, further from the start image.
    d_half = (half.images - unchanged.images).abs().mean().item()
    d_full = (full.images - unchanged.images).abs().mean().item()
    assert 0 < d_half < d_full, (d_half, d_full)


def test_reconstruction_and_prior_samples(tiny_pipeline):
    pipe = tiny_pipeline
    image = _generate(pipe).images
    rec = pipe.reconstruct(image, output_type="pt")
    assert rec.info["mode"] == "reconstruction" and rec.info["compression_ratio"] == 48.0
    assert torch.allclose(rec.images, reconstruct(pipe.vae, image).clamp(-1, 1), atol=1e-6)
    # The latents it reports are in the U-Net's (scaled) space: unscaling gives the posterior mean back.
    mean = pipe.vae.encode(image).latent_dist.mean
    assert torch.allclose(pipe.unscale_latents(rec.latents), mean, atol=1e-5)
    prior = pipe.sample_prior(3, seed=7, output_type="pt")
    expected = sample_prior(pipe.vae, 3, 64, 64, generator=torch.Generator().manual_seed(7)).clamp(-1, 1)
    assert prior.images.shape == (3, 3, 64, 64) and torch.equal(prior.images, expected)


def test_latent_scaling_follows_the_vae_config(tiny_pipeline):
    pipe = LatentDiffusionPipeline(**tiny_pipeline.components)
    z = torch.randn(2, 4, 8, 8)
    assert torch.allclose(pipe.unscale_latents(pipe.scale_latents(z)), z, atol=1e-6)
    factor = pipe.vae.config.scaling_factor
    assert torch.allclose(pipe.scale_latents(z), z * factor)


def test_pipeline_folder_round_trip(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    weights = sorted(p.relative_to(tmp_path / "pipe").as_posix() for p in (tmp_path / "pipe").rglob("*")
                     if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    assert weights == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors"]
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    # [file, class]: the folder's pipeline.py, so stock diffusers loads it too (tests/diffusion/test_stock_diffusers.py)
    assert index["_class_name"] == ["pipeline", "LatentDiffusionPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    loaded = LatentDiffusionPipeline.from_pretrained(tmp_path / "pipe", use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer.model_max_length == 16
    assert torch.equal(_generate(loaded).images, _generate(tiny_pipeline).images)
    unet = load_file(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, tiny_pipeline.unet.state_dict()[k]) for k, v in unet.items())


# A codec whose latents the pipeline must shift as well as scale (SD3/Flux), and one with per-channel statistics
# (SDXL-style), both with scaling_factor != 1: the tiny codec's 1.0 cannot tell z · s from z / s.
SHIFTED = {"scaling_factor": 0.5, "shift_factor": 0.3, "latents_mean": None, "latents_std": None}
PER_CHANNEL = {"scaling_factor": 0.5, "shift_factor": None, "latents_mean": [0.1, -0.2, 0.3, 0.0],
               "latents_std": [2.0, 0.5, 1.0, 4.0]}


def _by_hand(z: torch.Tensor, norm: dict) -> torch.Tensor:
    """diffusers' formulas, written out: (z - shift) · s, or (z - mean_c) · s / std_c."""
    if norm["latents_mean"] is None:
        return (z - norm["shift_factor"]) * norm["scaling_factor"]
    mean, std = (torch.tensor(norm[k]).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))
    return (z - mean) * norm["scaling_factor"] / std


@pytest.mark.parametrize("norm", [SHIFTED, PER_CHANNEL], ids=["shift", "per_channel"])
def test_encode_and_reconstruct_normalise_with_the_shift_and_statistics_and_decode_the_latent_back(
        tiny_pipeline, tiny_codec_dir, norm):
    from codec.exchange.pipeline import decode_images, encode_mean
    from codec.network.model import load_codec

    vae = load_codec(tiny_codec_dir)
    vae.register_to_config(**norm)
    pipe = LatentDiffusionPipeline(**{**tiny_pipeline.components, "vae": vae})
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = encode_mean(vae, image)

    rec = pipe.reconstruct(image, output_type="pt")
    expected = _by_hand(mean, norm)
    gap = float((rec.latents - expected).abs().max())
    assert gap < 1e-6, f"reconstruct's latents are {gap:.4g} from diffusers' normalisation {norm}"
    # Decoding undoes it exactly: the same images as decoding the posterior mean itself ...
    back = pipe.unscale_latents(rec.latents)
    assert float((back - mean).abs().max()) < 1e-5
    torch.testing.assert_close(rec.images, decode_images(vae, mean).cpu(), rtol=0, atol=1e-5)
    # ... which the wrong direction (z / s on the way in) would not give.
    wrong = (mean - (norm["shift_factor"] or 0.0)) / norm["scaling_factor"]
    assert float((rec.latents - wrong).abs().max()) > 0.1
    # Text-to-image decodes its scaled latents with the same inverse.
    torch.testing.assert_close(pipe.decode(rec.latents), decode_images(vae, mean), rtol=0, atol=1e-5)
