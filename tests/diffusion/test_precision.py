"""Generation in bf16/fp16: the codec's overflow in reduced precision (SD's VAE gives inf/NaN in fp16) is redone in
float32 with a warning, never returned as a NaN image; bf16 generation stays close to fp32."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from codec.exchange.pipeline import LatentDiffusionPipeline, decode_images, encode_mean


def _overflowing(module):
    """Make `module` behave like SD's VAE decoder in fp16: +-inf/NaN outputs unless its input is float32."""
    real = module.forward

    def forward(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        return out if x.dtype == torch.float32 else out * float("inf")  # 0 * inf: NaN, the rest +-inf

    module.forward = forward
    return module


def _half_pipeline(tiny_pipeline):
    """The tiny pipeline with its own fp16 codec and U-Net, and the fp32 codec those fp16 weights upcast to."""
    vae = copy.deepcopy(tiny_pipeline.vae).to(torch.float16)
    reference = copy.deepcopy(vae).to(torch.float32)  # what an fp32 redo computes with: the same rounded weights
    pipe = LatentDiffusionPipeline(**dict(tiny_pipeline.components, vae=vae,
                                          unet=copy.deepcopy(tiny_pipeline.unet).half()))
    pipe.set_progress_bar_config(disable=True)
    return pipe, reference


def _warnings(caplog, what):
    return [r for r in caplog.records if r.name == "codec.exchange.pipeline" and r.levelno == logging.WARNING
            and what in r.getMessage() and "redoing it in float32" in r.getMessage()]


def test_decoder_overflow_in_fp16_is_redone_in_fp32_with_a_warning(tiny_pipeline, caplog):
    pipe, reference = _half_pipeline(tiny_pipeline)
    _overflowing(pipe.vae.decoder)
    scaled = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(pipe.vae.decode(scaled.half()).sample).any()  # the stand-in really overflows

    with caplog.at_level(logging.WARNING, logger="codec.exchange.pipeline"):
        images = pipe.decode(scaled)
    assert torch.equal(images, decode_images(reference, pipe.unscale_latents(scaled)))  # exactly the fp32 decode
    assert len(_warnings(caplog, "codec decode")) == 1
    assert pipe.vae.dtype == torch.float16  # upcast only for the redo

    # The whole text-to-image call: finite images, the fp32 decode of the latents it denoised in fp16.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="codec.exchange.pipeline"):
        out = pipe("a rocket", num_inference_steps=4, guidance_scale=3.0, seed=0, output_type="pt")
    assert out.latents.dtype == torch.float16 and torch.isfinite(out.images).all()
    assert torch.equal(out.images, decode_images(reference, pipe.unscale_latents(out.latents)))
    assert len(_warnings(caplog, "codec decode")) == 1
    # Prior samples take the same path.
    assert torch.isfinite(pipe.sample_prior(2, seed=1, output_type="pt").images).all()


def test_encoder_overflow_is_redone_in_fp32_for_reconstruction_and_image_to_image(tiny_pipeline, caplog):
    pipe, reference = _half_pipeline(tiny_pipeline)
    _overflowing(pipe.vae.encoder)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1

    with caplog.at_level(logging.WARNING, logger="codec.exchange.pipeline"):
        rec = pipe.reconstruct(image, output_type="pt")
    expected_mean = encode_mean(reference, image)
    assert torch.equal(pipe.unscale_latents(rec.latents), expected_mean)
    assert torch.isfinite(rec.images).all() and len(_warnings(caplog, "codec encode")) == 1

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="codec.exchange.pipeline"):
        out = pipe("a rocket", image=image, strength=0.5, num_inference_steps=4, seed=0, output_type="pt")
    assert torch.isfinite(out.images).all() and len(_warnings(caplog, "codec encode")) == 1


def test_non_finite_latents_are_refused_not_decoded_into_nan_images(tiny_pipeline):
    z = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(FloatingPointError, match="denoised latents are not finite"):
        tiny_pipeline.decode(z)
    # In float32 there is nothing to upcast to: a NaN result is an error, not an image.
    with pytest.raises(FloatingPointError, match="codec decode: non-finite values even in float32"):
        decode_images(tiny_pipeline.vae, z)


def test_bf16_generation_is_finite_and_close_to_fp32(tiny_pipeline, pipeline_dir):
    bf16 = LatentDiffusionPipeline.from_pretrained(pipeline_dir, use_safetensors=True, dtype=torch.bfloat16)
    bf16.set_progress_bar_config(disable=True)
    assert bf16.unet.dtype == bf16.vae.dtype == bf16.text_encoder.dtype == torch.bfloat16
    kwargs = dict(num_inference_steps=6, guidance_scale=4.0, seed=0, output_type="pt")
    low = bf16("a tabby cat looking up", **kwargs).images
    full = tiny_pipeline("a tabby cat looking up", **kwargs).images
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    # Images in [-1, 1]; bf16 keeps 8 bits of mantissa. Measured over seeds 0-2: max |bf16 - fp32| 0.036-0.044,
    # mean 0.0037-0.0054 (the images' own mean magnitude is 0.24).
    diff = (low - full).abs()
    assert diff.max().item() < 0.1 and diff.mean().item() < 0.01, (diff.max().item(), diff.mean().item())

    # Reconstruction of a full-range image goes through encoder and decoder in bf16. Measured: max 0.11-0.20,
    # mean 0.009-0.012, a thirtieth of the untrained codec's own error (mean 0.28-0.30).
    rec_low = bf16.reconstruct(full, output_type="pt").images
    rec_full = tiny_pipeline.reconstruct(full, output_type="pt").images
    diff = (rec_low - rec_full).abs()
    assert torch.isfinite(rec_low).all()
    assert diff.max().item() < 0.4 and diff.mean().item() < 0.03, (diff.max().item(), diff.mean().item())


def test_cli_precision_bf16_writes_what_fp32_writes_within_rounding(generate, pipeline_dir, tiny_codec_dir, tmp_path):
    common = ["--pipeline", str(pipeline_dir), "--prompt", "a red motorcycle", "--sample-steps", "4", "--seed", "3",
              "--device", "cpu"]
    assert generate([*common, "--out", str(tmp_path / "fp32")]) == 0
    assert generate([*common, "--precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    record = json.loads((tmp_path / "bf16" / "txt2img-seed3.json").read_text())
    assert record["settings"]["precision"] == "bf16"
    a, b = (np.asarray(Image.open(tmp_path / d / "txt2img-seed3-0.png"), dtype=np.int16) for d in ("fp32", "bf16"))
    # uint8 pixels (guidance 5, 4 steps); measured: bf16 differs from fp32 by at most 8 levels, 0.67 on average.
    assert np.abs(a - b).max() <= 20 and np.abs(a - b).mean() < 2.0, (np.abs(a - b).max(), np.abs(a - b).mean())

    # A bare codec folder in fp16: prior samples and their record.
    assert generate(["--codec", str(tiny_codec_dir), "--prior-samples", "2", "--seed", "5", "--precision", "fp16",
                     "--device", "cpu", "--out", str(tmp_path / "prior")]) == 0
    assert json.loads((tmp_path / "prior" / "prior-seed5.json").read_text())["settings"]["precision"] == "fp16"
