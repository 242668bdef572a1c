"""Losses, metrics and the adaptive GAN weight under mixed precision: CPU bf16 autocast stands in for CUDA bf16, CPU
fp16 autocast for CUDA fp16. Each must give what it gives in fp32, within the stated tolerance."""

import copy
import math

import lpips
import pytest
import torch
import torch.nn.functional as F

from codec.common.precision import autocast_off, in_fp32, runs_in_fp32
from codec.measurement.metrics import ssim
from codec.network.model import CodecForTraining, build_autoencoder, latent_statistics, per_sample_noise
from codec.training.config import ModelConfig
from codec.training.losses import (
    PerceptualLoss,
    adaptive_gan_weight,
    generator_gan_loss,
    kl_divergence,
    ms_ssim_distance,
    vae_loss,
)
from tests.codec.test_losses import TINY  # the same tiny codec the losses are tested on


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def smooth_pair(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two smooth, nearly equal images: the case where bf16 rounding swamps the small structural difference."""
    torch.manual_seed(0)
    x = F.interpolate(torch.rand(2, 3, 8, 8), size=size, mode="bicubic", align_corners=False).clamp(0, 1) * 2 - 1
    y = (x + 0.02 * F.interpolate(torch.randn(2, 3, 8, 8), size=size, mode="bicubic", align_corners=False)).clamp(-1, 1)
    return x, y


def test_autocast_off_and_in_fp32_compute_in_float32_and_restore_autocast():
    conv, x = torch.nn.Conv2d(3, 3, 3), torch.randn(1, 3, 8, 8)
    with bf16():
        assert conv(x).dtype == torch.bfloat16
        with autocast_off():
            assert conv(x).dtype == torch.float32
        assert conv(x).dtype == torch.bfloat16  # restored
        assert in_fp32(conv)(x.bfloat16()).dtype == torch.float32


def test_ms_ssim_distance_and_its_gradient_under_bf16_equal_fp32():
    x, y = smooth_pair()
    y32, y16 = y.clone().requires_grad_(), y.clone().requires_grad_()
    d32 = ms_ssim_distance(x, y32)
    d32.sum().backward()
    with bf16():
        d16 = ms_ssim_distance(x, y16)
    d16.sum().backward()
    assert d16.dtype == torch.float32
    # Without autocast off, these distances (about 2e-3) came out with the wrong sign and a gradient cosine of 0.77.
    torch.testing.assert_close(d16, d32, rtol=1e-5, atol=1e-7)
    cosine = F.cosine_similarity(y16.grad.flatten(), y32.grad.flatten(), dim=0)
    assert cosine > 0.9999, cosine


def test_lpips_under_bf16_equals_fp32():
    torch.manual_seed(0)
    net = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval().requires_grad_(False)
    perceptual = PerceptualLoss("lpips", net)
    x, y = smooth_pair()
    d32 = perceptual(x, y)
    with bf16():
        d16 = perceptual(x, y)
    torch.testing.assert_close(d16, d32, rtol=1e-5, atol=1e-7)


def test_kl_and_vae_loss_of_bf16_model_outputs_are_summed_in_fp32():
    """Under autocast a model's outputs may be bf16 tensors: the KL over 4x32x32 latents is then a sum whose bf16
    result keeps 3 significant digits. Upcast first, it equals the fp32 sum of the same values."""
    torch.manual_seed(0)
    mean, logvar = (torch.randn(2, 4, 32, 32) * 3).bfloat16(), (torch.randn(2, 4, 32, 32) - 4).bfloat16()
    expected = kl_divergence(mean.float(), logvar.float())
    with bf16():
        got = kl_divergence(mean, logvar)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)

    x, _ = smooth_pair(32)
    recon = (x + 0.05 * torch.randn_like(x)).bfloat16()
    settings = dict(pixel="l1", perceptual=PerceptualLoss("ms_ssim"), perceptual_weight=0.5)
    want = vae_loss(x, recon.float(), mean.float(), logvar.float(), torch.tensor(0.0), 1e-3, **settings)
    with bf16():
        have = vae_loss(x, recon, mean, logvar, torch.tensor(0.0), 1e-3, **settings)
    for name in ("total", "nll", "rec", "perceptual", "kl"):
        torch.testing.assert_close(getattr(have, name), getattr(want, name), rtol=1e-6, atol=1e-8, msg=name)


def test_ssim_metric_under_bf16_equals_fp32():
    x, y = smooth_pair()
    want = ssim(x, y)
    with bf16():
        have = ssim(x, y)
    torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


def test_latent_statistics_under_bf16_equal_fp32():
    torch.manual_seed(0)
    vae = build_autoencoder(TINY).eval()
    images = [torch.rand(2, 3, 32, 32) * 2 - 1]
    want = latent_statistics(vae, images)
    with bf16():
        have = latent_statistics(vae, images)
    assert have["std"] == pytest.approx(want["std"], rel=1e-5)
    assert have["channel_mean"] == pytest.approx(want["channel_mean"], rel=1e-4, abs=1e-6)


def _gan_weight(model: CodecForTraining, disc: torch.nn.Module, images: torch.Tensor,
                scale: float = 1.0) -> torch.Tensor:
    recon, mean, logvar = model(images)
    nll = scale * (recon - images).abs().mean()
    return adaptive_gan_weight(nll, scale * generator_gan_loss(disc, recon), model.vae.decoder.conv_out.weight)


def test_codec_training_runs_its_last_layer_in_fp32_with_the_same_parameters():
    torch.manual_seed(0)
    vae = build_autoencoder(TINY)
    names = sorted(vae.state_dict())
    model = CodecForTraining(vae)
    assert runs_in_fp32(vae.decoder.conv_out) and sorted(vae.state_dict()) == names
    with bf16():
        recon, mean, _ = model(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert recon.dtype == torch.float32 and mean.dtype == torch.bfloat16
    copied = copy.deepcopy(vae)  # a copy's last layer is in fp32 too, and computes with its own weights
    with torch.no_grad():
        copied.decoder.conv_out.weight.zero_()
        copied.decoder.conv_out.bias.zero_()
    assert runs_in_fp32(copied.decoder.conv_out)
    assert copied.decoder.conv_out(torch.ones(1, 8, 4, 4)).abs().max() == 0


def _codec_and_disc():
    torch.manual_seed(0)
    model = CodecForTraining(build_autoencoder(TINY))
    disc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 2, 1), torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(8, 1, 4, 1, 1))
    return model, disc, torch.rand(2, 3, 64, 64) * 2 - 1


def test_adaptive_gan_weight_under_bf16_is_the_fp32_weight():
    model, disc, images = _codec_and_disc()
    want = _gan_weight(model, disc, images)
    with bf16():
        have = _gan_weight(model, disc, images)
    # What remains is the bf16 activations of the decoder's other layers: measured 0.2-2.3% apart over 4 seeds.
    assert have.item() == pytest.approx(want.item(), rel=0.05)


def test_adaptive_gan_weight_under_fp16_does_not_underflow():
    """Both losses scaled by 1e-3: a gradient of 4e-8 per output pixel, the size a batch of 8 images of 512² gives,
    below float16's smallest normal (6e-5). The ratio λ does not depend on the scale. Before the last layer and D's
    generator pass ran in fp32, fp16 gave 1.02 where fp32 gives 0.48."""
    model, disc, images = _codec_and_disc()
    want = _gan_weight(model, disc, images, 1e-3)
    with torch.autocast("cpu", dtype=torch.float16):
        have = _gan_weight(model, disc, images, 1e-3)
    assert have.item() == pytest.approx(want.item(), rel=0.01)  # measured 0.2%


def test_adaptive_gan_weight_reduces_gradients_before_their_norms():
    """Two 'ranks' with one image each: λ from the averaged gradients equals λ of both images in one batch."""
    w = torch.nn.Parameter(torch.randn(5))
    a, b = torch.randn(2, 5), torch.randn(2, 5)

    def losses(rows):
        return (w * a[rows]).sum(1).mean(), (w * b[rows]).pow(2).sum(1).mean()

    whole = adaptive_gan_weight(*losses([0, 1]), w)
    # Rank 1's two gradients, in the order adaptive_gan_weight reduces them (nll's, then the GAN loss's).
    others = iter(torch.autograd.grad(loss, w)[0] for loss in losses([1]))

    def reduce_mean(grad):  # what accelerate's reduce gives rank 0: the mean of both ranks' gradients
        return (grad + next(others)) / 2

    both = adaptive_gan_weight(*losses([0]), w, reduce_mean=reduce_mean)
    alone = adaptive_gan_weight(*losses([0]), w)
    torch.testing.assert_close(both, whole)
    assert abs(alone.item() - whole.item()) > 1e-2 * whole.item()


def test_in_fp32_keeps_float64_inputs_in_float64():
    """KL of a posterior barely off the prior, μ = 0 and log σ² = s = 2⁻¹² (exact in float32): ½(e^s − 1 − s) per
    element is 1.5e-8, below float32's resolution of e^s ≈ 1, so the float32 sum is 0. rate_bits and
    kl_bits_per_pixel pass float64 to get the exact value; in_fp32 must not cast it back down."""
    import math

    from experiments.demo.beta_study import rate_bits

    mean = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    logvar = torch.full_like(mean, 2**-12)
    exact = mean[0].numel() * 0.5 * (math.expm1(2**-12) - 2**-12)  # closed form, 3.815e-06 nats
    got = kl_divergence(mean, logvar)
    assert got.item() == pytest.approx(exact, rel=1e-9)  # cast to float32 it was 0.0
    assert got.dtype == torch.float64
    assert rate_bits(mean.float(), logvar.float()).item() == pytest.approx(exact / math.log(2), rel=1e-9)
    with bf16():  # a bf16 tensor is still upcast to float32, and float64 stays float64 under autocast too
        assert kl_divergence(mean.bfloat16(), logvar.bfloat16()).dtype == torch.float32
        assert kl_divergence(mean, logvar).item() == pytest.approx(exact, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# The posterior sample z = μ + σ·ε under mixed precision
# ---------------------------------------------------------------------------------------------------------------

POSTERIOR_MEAN, POSTERIOR_LOGVAR = 3.9, -10.0  # raw latent magnitudes of a trained codec, a confident encoder


def _posterior_fixed(vae) -> None:
    """quant_conv outputs μ = 3.9, log σ² = -10 everywhere, whatever the image. bf16's step at 3.9 is 1/64: a σ of
    e⁻⁵ = 0.0067 is below half of it, so in bf16 most of μ + σ·ε rounds back to μ."""
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.copy_(torch.tensor([POSTERIOR_MEAN] * c + [POSTERIOR_LOGVAR] * c))


def _latents_decoded(vae) -> list[torch.Tensor]:
    """Records each z that reaches the decoder (post_quant_conv's input)."""
    seen = []
    vae.post_quant_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen


def _check_sample(z: torch.Tensor, mean: torch.Tensor, noise: torch.Tensor | None) -> None:
    sigma = math.exp(POSTERIOR_LOGVAR / 2)
    on_mean = (z == mean).double().mean().item()
    assert on_mean < 0.01, f"{on_mean:.1%} of the sampled latents equal the posterior mean"
    spread = ((z.double() - mean.double()) / sigma).std().item()
    assert spread == pytest.approx(1.0, abs=0.05), spread  # std of (z − μ) / σ
    if noise is not None:  # exactly the keyed noise, scaled by σ
        torch.testing.assert_close((z - mean).double(), sigma * noise.double(), rtol=1e-2, atol=1e-5)


def test_training_forward_samples_the_posterior_in_fp32_under_bf16():
    torch.manual_seed(0)
    vae = build_autoencoder(TINY)
    _posterior_fixed(vae)
    model, seen = CodecForTraining(vae, seed=3), _latents_decoded(vae)
    draws = torch.tensor([5, 9])
    with bf16():
        _, mean, logvar = model(torch.rand(2, 3, 128, 128) * 2 - 1, draws)
    assert mean.dtype == torch.bfloat16 and logvar.dtype == torch.bfloat16  # the encoder did run in bf16
    noise = per_sample_noise(tuple(mean.shape), draws, 3, "cpu", torch.float32)
    _check_sample(seen[0], mean, noise)


def test_conditional_codec_forward_samples_the_posterior_in_fp32_under_bf16():
    from codec.network.model import build_codec

    torch.manual_seed(0)
    cfg = ModelConfig(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4,
                      mid_block_add_attention=False, condition="class", condition_channels=4)
    vae = build_codec(cfg, class_names=["circle", "square"])
    _posterior_fixed(vae)
    seen = _latents_decoded(vae)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with bf16():
        mean = vae.encode(x, torch.tensor([0, 1])).latent_dist.mean
        vae(x, torch.tensor([0, 1]), sample_posterior=True, generator=torch.Generator().manual_seed(0))
    _check_sample(seen[0], mean, None)
