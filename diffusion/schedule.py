"""The forward diffusion process and the training loss: DDPM noise schedule, SNR, Min-SNR-γ weights, targets.

Small pure functions, each tested against its closed form in tests/diffusion/test_schedule.py.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffusion.config import DiffusionConfig


def build_noise_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """SD 1.x's training schedule (1000 steps, scaled-linear betas 0.00085 -> 0.012) unless the config says otherwise.

    `timestep_spacing="trailing"` only matters to the samplers built from this config: their first step is then
    t = T-1, the step training saw as the noisiest (Lin et al. 2024; needed for zero terminal SNR)."""
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        timestep_spacing="trailing",
        clip_sample=False,  # latents are not confined to [-1, 1]; clipping x0 there would distort them
    )


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t), in float64 then float32: 0 exactly at t=T with zero-terminal-SNR betas."""
    alpha_bar = scheduler.alphas_cumprod.to(torch.float64)[timesteps.cpu().long()]
    return (alpha_bar / (1.0 - alpha_bar)).float().to(timesteps.device)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) for the MSE in the model's own prediction space.

    The paper weighs the x0-space loss by min(SNR, γ). An epsilon MSE is SNR times an x0 MSE, so its weight is
    min(SNR, γ) / SNR, and a v MSE is (SNR + 1) times an x0 MSE, so its weight is min(SNR, γ) / (SNR + 1).

    epsilon:      w = γ / max(SNR, γ)        the same number as min(SNR, γ)/SNR for SNR > 0, and its limit 1 at
                                             SNR = 0 (zero terminal SNR), where min(SNR, γ)/SNR is 0/0 = NaN.
    v_prediction: w = min(SNR, γ) / (SNR + 1)  finite everywhere; 0 at SNR = 0, as the paper's x0 weight is.
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_weight: gamma must be > 0, got {gamma}")
    if prediction_type == "epsilon":
        return gamma / snr_t.clamp_min(gamma)
    if prediction_type == "v_prediction":
        return snr_t.clamp_max(gamma) / (snr_t + 1.0)
    raise ValueError(f"min_snr_weight: prediction_type {prediction_type!r} is not epsilon or v_prediction")


def training_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the U-Net learns to output: the noise (epsilon) or v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not epsilon or v_prediction")


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The MSE of each sample of the batch, in fp32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of (per-sample weight x per-sample MSE); weights None means plain MSE."""
    per_sample = per_sample_mse(prediction, target)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def training_loss(scheduler: DDPMScheduler, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
    """The U-Net trainer's loss: MSE to the scheduler's target (epsilon or v), each sample weighted by Min-SNR-γ
    for that prediction type, so that it equals min(SNR, γ) times the x0-space MSE (Hang et al. 2023).
    snr_gamma None: plain MSE."""
    target = training_target(scheduler, latents, noise, timesteps)
    weights = None
    if snr_gamma is not None:
        weights = min_snr_weight(snr(scheduler, timesteps), snr_gamma, scheduler.config.prediction_type)
    return diffusion_loss(prediction, target, weights)
