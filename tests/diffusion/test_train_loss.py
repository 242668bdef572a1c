"""The Min-SNR-γ weights as the U-Net trainer applies them: on a real v-prediction training step, the loss it
backpropagates equals the closed form mean_i min(SNR_i, γ)/(SNR_i + 1) x MSE_i(v), with γ from the config."""

import pytest
import torch

import diffusion.train as train_module
from diffusion.config import load_unet_config
from tests.conftest import CONFIGS


def test_trainer_loss_is_the_v_prediction_min_snr_closed_form(tiny_shards, tiny_codec_dir, tmp_path,
                                                                fresh_accelerate_state, monkeypatch):
    seen = []
    real_loss = train_module.training_loss

    def spy(scheduler, prediction, latents, noise, timesteps, snr_gamma):
        loss = real_loss(scheduler, prediction, latents, noise, timesteps, snr_gamma)
        seen.append((scheduler, prediction.detach().clone(), latents, noise, timesteps, snr_gamma, loss.item()))
        return loss

    monkeypatch.setattr(train_module, "training_loss", spy)
    gamma = 2.0  # not the default 5: the trainer must pass the config's γ
    cfg = load_unet_config(CONFIGS / "unet" / "tiny.yaml", [
        f"shards={tiny_shards}", f"codec={tiny_codec_dir}", f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=1", "train.batch_size=8", "train.ema_decay=null",
        "diffusion.prediction_type=v_prediction", f"diffusion.snr_gamma={gamma}"])
    train_module.train_unet(cfg)

    (scheduler, prediction, x0, eps, t, snr_gamma, loss), = seen
    assert snr_gamma == gamma and scheduler.config.prediction_type == "v_prediction"
    alpha_bar = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    v = alpha_bar.sqrt() * eps.double() - (1 - alpha_bar).sqrt() * x0.double()
    snr_t = (alpha_bar / (1 - alpha_bar)).flatten()
    weights = torch.clamp(snr_t, max=gamma) / (snr_t + 1)
    expected = (weights * (prediction.double() - v).pow(2).flatten(1).mean(1)).mean().item()
    assert loss == pytest.approx(expected, rel=1e-5)
    # 8 timesteps drawn over 0..999: the weights really vary, so a wrong formula could not pass by chance.
    assert weights.max() / weights.min() > 2
