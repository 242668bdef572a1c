import pytest
import torch

from codec.common.config import ConfigError
from diffusion.config import DiffusionConfig
from diffusion.schedule import (
    build_noise_scheduler,
    diffusion_loss,
    min_snr_weight,
    snr,
    training_loss,
    training_target,
)


def test_noise_schedule_is_sd_scaled_linear():
    scheduler = build_noise_scheduler(DiffusionConfig())
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    assert scheduler.config.num_train_timesteps == 1000
    assert torch.allclose(scheduler.betas, betas)
    assert torch.allclose(scheduler.alphas_cumprod, torch.cumprod(1 - betas, 0))
    # SD's schedule never reaches pure noise: SNR(999) = 0.0047 (the flaw zero-terminal-SNR fixes).
    assert snr(scheduler, torch.tensor([999])).item() == pytest.approx(0.004682, rel=1e-3)


def test_zero_terminal_snr_reaches_exactly_zero():
    scheduler = build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True))
    values = snr(scheduler, torch.arange(1000))
    assert values[-1].item() == 0.0
    assert (values[:-1] > 0).all() and (values[:-1].diff() < 0).all()


def test_at_zero_terminal_snr_x_t_is_the_noise_and_the_v_target_is_minus_x0():
    """At t = T-1 with zero terminal SNR, ᾱ = 0: x_t = √ᾱ x0 + √(1-ᾱ) ε = ε and v = √ᾱ ε - √(1-ᾱ) x0 = -x0, the
    same as the scheduler's get_velocity. The trainer's loss there, unweighted, is the MSE to -x0."""
    scheduler = build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True))
    g = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    last = torch.tensor([999, 999])
    assert scheduler.alphas_cumprod[999].item() == 0.0 and snr(scheduler, last).tolist() == [0.0, 0.0]
    torch.testing.assert_close(scheduler.add_noise(x0, eps, last), eps, rtol=0, atol=0)
    target = training_target(scheduler, x0, eps, last)
    torch.testing.assert_close(target, -x0, rtol=0, atol=0)
    torch.testing.assert_close(target, scheduler.get_velocity(x0, eps, last), rtol=0, atol=0)
    assert training_loss(scheduler, pred, x0, eps, last, None).item() == pytest.approx((pred + x0).pow(2).mean().item())
    # Min-SNR-γ's v weight is min(SNR, γ)/(SNR + 1) = 0 there: with snr_gamma set the terminal step trains nothing.
    assert training_loss(scheduler, pred, x0, eps, last, 5.0).item() == 0.0


def test_min_snr_weights_match_the_closed_form_and_stay_finite_at_snr_zero():
    gamma = 5.0
    s = torch.tensor([0.0, 1e-8, 0.5, 4.9, 5.0, 5.1, 100.0, 1e6])
    eps = min_snr_weight(s, gamma, "epsilon")
    v = min_snr_weight(s, gamma, "v_prediction")
    positive = s > 0
    # Closed forms where they are defined: min(SNR, γ)/SNR and min(SNR, γ)/(SNR + 1).
    assert torch.allclose(eps[positive], torch.minimum(s, torch.tensor(gamma))[positive] / s[positive])
    assert torch.allclose(v, torch.minimum(s, torch.tensor(gamma)) / (s + 1))
    # At SNR = 0 the naive epsilon formula is 0/0; ours gives its limit, 1. The v weight is 0 there.
    naive = torch.minimum(s, torch.tensor(gamma)) / s
    assert torch.isnan(naive[0])
    assert eps[0].item() == 1.0 and v[0].item() == 0.0
    assert torch.isfinite(eps).all() and torch.isfinite(v).all()
    assert eps.tolist()[:4] == [1.0, 1.0, 1.0, 1.0]  # below γ nothing is down-weighted
    assert eps[-1].item() == pytest.approx(5e-6)  # far above γ: γ/SNR


def test_min_snr_weights_over_a_zero_terminal_schedule_give_a_finite_loss():
    for kind in ("epsilon", "v_prediction"):
        # The weight function itself accepts any schedule; the config refuses epsilon with zero terminal SNR.
        scheduler = build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True))
        t = torch.tensor([0, 500, 998, 999])
        w = min_snr_weight(snr(scheduler, t), 5.0, kind)
        assert torch.isfinite(w).all(), (kind, w)
        loss = diffusion_loss(torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), w)
        assert torch.isfinite(loss)


def test_v_target_is_alpha_eps_minus_sigma_x0():
    scheduler = build_noise_scheduler(DiffusionConfig(prediction_type="v_prediction"))
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([10, 400, 990])
    a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(training_target(scheduler, x0, eps, t), a * eps - s * x0, atol=1e-6)
    eps_scheduler = build_noise_scheduler(DiffusionConfig())
    assert training_target(eps_scheduler, x0, eps, t) is eps


def test_weighted_loss_is_the_mean_of_weighted_per_sample_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2  # per-sample MSE: 1 and 4
    assert diffusion_loss(pred, target).item() == pytest.approx(2.5)
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)


def test_config_refuses_epsilon_with_zero_terminal_snr():
    with pytest.raises(ConfigError, match="v_prediction"):
        DiffusionConfig(rescale_betas_zero_snr=True)
    DiffusionConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True)


def _x0_mse_per_sample(scheduler, prediction, noisy, x0, timesteps):
    """diffusers' own x0 estimate from a prediction (the scheduler step's pred_original_sample), per-sample MSE."""
    rows = []
    for i, t in enumerate(timesteps.tolist()):
        x0_hat = scheduler.step(prediction[i : i + 1], t, noisy[i : i + 1]).pred_original_sample
        rows.append((x0_hat.double() - x0[i : i + 1].double()).pow(2).mean())
    return torch.stack(rows)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_loss_is_min_snr_gamma_times_the_x0_space_mse(prediction_type):
    """Hang et al. 2023 weigh the x0-space MSE by min(SNR, γ). The trainer's loss, in the model's own space, must be
    that number: min(SNR, γ)/SNR x eps-MSE for epsilon, min(SNR, γ)/(SNR + 1) x v-MSE for v (diffusers'
    train_text_to_image uses the same two weights)."""
    scheduler = build_noise_scheduler(DiffusionConfig(prediction_type=prediction_type))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    prediction = torch.randn(5, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 120, 300, 650, 999])  # SNR from 1e3 down to 0.005, on both sides of γ = 2
    gamma = 2.0
    noisy = scheduler.add_noise(x0, eps, timesteps)

    loss = training_loss(scheduler, prediction, x0, eps, timesteps, gamma)

    alpha_bar = scheduler.alphas_cumprod.double()[timesteps]
    snr_t = alpha_bar / (1 - alpha_bar)
    expected = (torch.clamp(snr_t, max=gamma) * _x0_mse_per_sample(scheduler, prediction, noisy, x0, timesteps)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The closed form in the model's own space gives the same number.
    target = (eps if prediction_type == "epsilon"
              else alpha_bar.sqrt().view(-1, 1, 1, 1) * eps - (1 - alpha_bar).sqrt().view(-1, 1, 1, 1) * x0)
    own_mse = (prediction.double() - target).pow(2).flatten(1).mean(1)
    denominator = snr_t if prediction_type == "epsilon" else snr_t + 1
    assert loss.item() == pytest.approx((torch.clamp(snr_t, max=gamma) / denominator * own_mse).mean().item(), rel=1e-5)
    # snr_gamma null: the plain MSE in the model's space.
    assert training_loss(scheduler, prediction, x0, eps, timesteps, None).item() == pytest.approx(own_mse.mean().item(),
                                                                                                  rel=1e-5)
