import math

import pytest
import torch
import torchvision

from codec.common.config import ConfigError
from codec.network.model import CodecForTraining, build_autoencoder
from codec.training.config import LossConfig, ModelConfig
from codec.training.losses import (
    CodecLoss,
    LPIPSBackboneMissing,
    PatchDiscriminator,
    adaptive_gan_weight,
    build_lpips,
    build_perceptual,
    discriminator_loss,
    frozen,
    gaussian_nll,
    hinge_d_loss,
    hinge_g_loss,
    kl_divergence,
    kl_weight_at,
    ms_ssim_distance,
    ms_ssim_scales,
    vae_loss,
)

TINY = ModelConfig(block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4,
                   mid_block_add_attention=False)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl_divergence(mean, logvar), expected)


def test_kl_closed_form_values():
    # N(0, 1) against N(0, 1): 0. N(1, 1): ½ per element. N(0, e²): ½(e² − 1 − 2) per element.
    zeros = torch.zeros(1, 2, 2, 2)
    assert kl_divergence(zeros, zeros).item() == 0.0
    assert kl_divergence(zeros + 1, zeros).item() == pytest.approx(8 * 0.5)
    assert kl_divergence(zeros, zeros + 2).item() == pytest.approx(8 * 0.5 * (math.e**2 - 3))


def test_kl_schedules_at_given_steps():
    const = LossConfig(kl_weight=1e-6)
    assert [kl_weight_at(s, const) for s in (0, 10, 10_000)] == [1e-6] * 3
    linear = LossConfig(kl_weight=2e-6, kl_schedule="linear", kl_warmup_steps=100)
    assert [kl_weight_at(s, linear) for s in (0, 25, 100, 500)] == pytest.approx([0, 0.5e-6, 2e-6, 2e-6])
    down = LossConfig(kl_weight=8.0, kl_schedule="linear", kl_warmup_steps=100, kl_start_weight=1000.0)
    assert [kl_weight_at(s, down) for s in (0, 50, 100, 400)] == pytest.approx([1000, 504, 8, 8])
    with pytest.raises(ConfigError, match="kl_start_weight is where the linear schedule starts"):
        LossConfig(kl_weight=8.0, kl_start_weight=1000.0)
    cyc = LossConfig(kl_weight=1.0, kl_schedule="cyclical", kl_cycle_steps=100, kl_cycle_ramp=0.5)
    assert [kl_weight_at(s, cyc) for s in (0, 25, 50, 99, 100, 125, 260)] == pytest.approx([0, 0.5, 1, 1, 0, 0.5, 1])


def test_vae_loss_closed_form_without_perceptual():
    torch.manual_seed(0)
    x, recon = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mean, logvar = torch.randn(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    beta = 0.3
    out = vae_loss(x, recon, mean, logvar, torch.tensor(0.0), beta)
    n = 3 * 8 * 8
    expected = (x - recon).abs().mean() + beta * kl_divergence(mean, logvar).mean() / n
    torch.testing.assert_close(out.total, expected)
    # With a log-scale s: Σ(|x−x̂|/e^s + s)/N.
    s = torch.tensor(0.7)
    out = vae_loss(x, recon, mean, logvar, s, 0.0, pixel="mse")
    torch.testing.assert_close(out.total, ((x - recon).pow(2) / math.exp(0.7) + 0.7).mean())
    torch.testing.assert_close(gaussian_nll(torch.tensor(2.0), s), 2.0 / torch.exp(s) + s)


def test_codec_loss_binds_the_config_and_follows_the_kl_schedule():
    torch.manual_seed(0)
    x, recon = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mean, logvar = torch.randn(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    cfg = LossConfig(pixel="mse", pixel_weight=2.0, kl_weight=0.4, kl_schedule="linear", kl_warmup_steps=10)
    criterion = CodecLoss(cfg, perceptual=None)
    n = 3 * 8 * 8
    at_5 = criterion(x, recon, mean, logvar, torch.tensor(0.0), step=5)
    assert at_5.kl_weight == pytest.approx(0.2)  # half-way up the warm-up
    expected = 2.0 * (x - recon).pow(2).mean() + 0.2 * kl_divergence(mean, logvar).mean() / n
    torch.testing.assert_close(at_5.total, expected)
    at_50 = criterion(x, recon, mean, logvar, torch.tensor(0.0), step=50)
    assert at_50.kl_weight == pytest.approx(0.4)
    torch.testing.assert_close(at_50.total - at_5.total, 0.2 * kl_divergence(mean, logvar).mean() / n)


def test_hinge_losses_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 − r) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    nll = (w**2).sum()  # ∇ = 2w
    g = (3 * w).sum()  # ∇ = 3
    expected = (2 * w).norm() / ((torch.ones(2, 2) * 3).norm() + 1e-4)
    assert adaptive_gan_weight(nll, g, w).item() == pytest.approx(expected.item(), rel=1e-6)
    assert adaptive_gan_weight(nll * 1e9, g, w, max_weight=10.0).item() == 10.0


def test_discriminator_has_no_batchnorm_and_is_per_sample():
    d = PatchDiscriminator(channels=16, layers=3)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in d.modules())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        together = d(x)
        alone = torch.cat([d(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)  # no cross-sample statistics


def _vae_step():
    torch.manual_seed(0)
    model = CodecForTraining(build_autoencoder(TINY))
    disc = PatchDiscriminator(channels=8, layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, mean, logvar = model(x, torch.tensor([0, 1]))
    return model, disc, x, recon, mean, logvar


def test_discriminator_step_leaves_vae_gradients_untouched():
    model, disc, x, recon, mean, logvar = _vae_step()
    vae_loss(x, recon, mean, logvar, model.logvar, 1e-6).total.backward(retain_graph=True)
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert before, "the VAE step should have produced gradients"
    discriminator_loss(disc, x, recon).backward()
    after = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())


def test_generator_gan_term_does_not_train_the_discriminator():
    model, disc, x, recon, mean, logvar = _vae_step()
    with frozen(disc) as d:
        g = hinge_g_loss(d(recon))
    g.backward()
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # restored afterwards
    assert model.vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_learned_logvar_changes_after_an_optimizer_step():
    model, _, x, recon, mean, logvar = _vae_step()
    learned = CodecForTraining(model.vae, learn_logvar=True)
    recon, mean, logvar = learned(x, torch.tensor([0, 1]))
    opt = torch.optim.AdamW([p for p in learned.parameters() if p.requires_grad], lr=1e-2)
    assert any(p is learned.logvar for group in opt.param_groups for p in group["params"])
    before = learned.logvar.item()
    vae_loss(x, recon, mean, logvar, learned.logvar, 1e-6).total.backward()
    opt.step()
    # rec < 1 per element, so the optimum log-scale is negative: the step must lower it.
    assert learned.logvar.item() < before - 1e-3
    fixed = CodecForTraining(model.vae, learn_logvar=False)
    assert not fixed.logvar.requires_grad


def _write_random_alexnet(path):
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)


def test_lpips_from_a_local_backbone_file_passes_gradients(tmp_path):
    backbone = tmp_path / "alexnet.pth"
    _write_random_alexnet(backbone)
    model = build_lpips("alex", str(backbone))
    # The backbone really holds the file's weights.
    state = torch.load(backbone, weights_only=True)
    assert torch.equal(getattr(model.net.slice1, "0").weight, state["features.0.weight"])
    assert torch.equal(getattr(model.net.slice5, "10").weight, state["features.10.weight"])
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    recon = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    perceptual, used = build_perceptual(LossConfig(perceptual="lpips", lpips_backbone=str(backbone)))
    assert used.startswith("lpips-alex")
    value = perceptual(x, recon)
    assert value.shape == (2,) and (value > 0).all()
    value.sum().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in perceptual.parameters())  # LPIPS itself stays frozen
    assert perceptual(x, x).abs().max() < 1e-6


def test_lpips_uses_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    _write_random_alexnet(tmp_path / "checkpoints" / "alexnet-owt-7be5be79.pth")
    _, used = build_perceptual(LossConfig(perceptual="lpips"))
    assert "alexnet-owt-7be5be79.pth" in used


def test_missing_lpips_backbone_follows_the_configured_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(LPIPSBackboneMissing, match=r"alexnet-owt-7be5be79\.pth"):
        build_perceptual(LossConfig(perceptual="lpips", if_lpips_missing="error"))
    perceptual, used = build_perceptual(LossConfig(perceptual="lpips", if_lpips_missing="ms_ssim"))
    assert perceptual.name == "ms_ssim" and used.startswith("ms_ssim instead of lpips")
    perceptual, used = build_perceptual(LossConfig(perceptual="lpips", if_lpips_missing="none"))
    assert perceptual is None and used.startswith("none instead of lpips")


def test_ms_ssim_distance_and_scales():
    assert ms_ssim_scales(256) == 5 and ms_ssim_scales(64) == 3 and ms_ssim_scales(16) == 1
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert ms_ssim_distance(x, x).abs().max() < 1e-5
    noisy = (x + 0.5 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d = ms_ssim_distance(x, noisy)
    assert (d > 0.1).all()
    d.sum().backward()
    assert noisy.grad.abs().sum() > 0
