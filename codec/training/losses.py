"""The codec's losses: small functions named after what they compute, each testable against its formula.

The objective follows latent-diffusion's `LPIPSWithDiscriminator`:
    rec  = pixel(x, x̂) + w_p · perceptual(x, x̂)
    nll  = rec / exp(s) + s                  (s: a scalar log-variance, optionally learned)
    loss = Σ_pixels nll + β · KL(q(z|x) || N(0, I))      per sample, averaged over the batch
We divide that per-sample sum by the number of pixel elements: the optimum and β's meaning (1e-6 as in
the field) are unchanged, and gradient norms no longer grow with the image size, so clipping means the
same at 64² and 512².
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from codec.common.precision import in_fp32
from codec.training.config import LossConfig

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------
# VAE terms
# ---------------------------------------------------------------------------------------------------------


@in_fp32
def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) || N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over all but the batch dimension."""
    return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=tuple(range(1, mean.dim())))


def pixel_loss(x: torch.Tensor, recon: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-element |x − x̂| (l1) or (x − x̂)² (mse), same shape as x."""
    if kind == "l1":
        return (x - recon).abs()
    if kind == "mse":
        return (x - recon).pow(2)
    raise ValueError(f"pixel loss {kind!r}: expected l1 or mse")


def gaussian_nll(rec: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """rec / exp(s) + s: the reconstruction as a Laplace/Gaussian NLL with a scalar log-scale s.
    With s learned, its optimum is s = log(mean rec), which balances reconstruction against KL by itself."""
    return rec / logvar.exp() + logvar


def exact_nll(x: torch.Tensor, recon: torch.Tensor, logvar: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """−log p(x | x̂) per element, a density over pixels in [-1, 1]: for mse a Gaussian N(x̂, e^s),
    ½((x − x̂)²/e^s + s + log 2π); for l1 a Laplace of scale b = e^s, |x − x̂|/e^s + s + log 2.

    `gaussian_nll` of the same error is this without its constant (Laplace), or twice it (Gaussian): the optimum of
    s is the same, but only this form makes Σ nll + KL the negative ELBO, so that β = 1 means the article's VAE."""
    if kind == "mse":
        return 0.5 * ((x - recon).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi))
    if kind == "l1":
        return (x - recon).abs() / logvar.exp() + logvar + math.log(2.0)
    raise ValueError(f"pixel loss {kind!r}: expected l1 or mse")


def kl_weight_at(step: int, cfg: LossConfig) -> float:
    """β at an optimizer step. constant: β. linear: from β₀ = kl_start_weight to β over the warm-up,
    β₀ + (β − β₀)·min(1, step/warmup) (β₀ = 0 is KL annealing; β₀ > β anneals down).
    cyclical (Fu et al. 2019): within each cycle of `kl_cycle_steps`, ramp 0 -> β over the first
    `kl_cycle_ramp` fraction, then hold β."""
    beta = cfg.kl_weight
    if cfg.kl_schedule == "constant":
        return beta
    if cfg.kl_schedule == "linear":
        if cfg.kl_warmup_steps <= 0:
            return beta
        start = cfg.kl_start_weight
        return start + (beta - start) * min(1.0, step / cfg.kl_warmup_steps)
    if cfg.kl_schedule == "cyclical":
        phase = (step % cfg.kl_cycle_steps) / cfg.kl_cycle_steps
        ramp = max(cfg.kl_cycle_ramp, 1e-12)
        return beta * min(1.0, phase / ramp)
    raise ValueError(f"kl_schedule {cfg.kl_schedule!r}")


@dataclass
class VAELoss:
    total: torch.Tensor  # what is backpropagated (per pixel element, batch mean)
    nll: torch.Tensor  # Σ nll / N_pix, batch mean: the part the adaptive GAN weight balances against
    rec: torch.Tensor  # mean pixel term (for logs)
    perceptual: torch.Tensor  # mean perceptual term (for logs; 0 when off)
    kl: torch.Tensor  # KL summed per sample, batch mean (the field's unit)
    kl_weight: float  # the β it was weighted with
    equivariance: torch.Tensor | None = None  # the equivariance term before its weight (for logs; None when off)


@in_fp32
def vae_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    nll_logvar: torch.Tensor,
    kl_weight: float,
    *,
    pixel: str = "l1",
    pixel_weight: float = 1.0,
    perceptual: "PerceptualLoss | None" = None,
    perceptual_weight: float = 1.0,
    nll_form: str = "scaled",
) -> VAELoss:
    """nll_form scaled: LDM's rec/e^s + s with any perceptual term. exact: the likelihood's own NLL (`exact_nll`, no
    perceptual term), so that at kl_weight 1, total x pixels per image = −ELBO in nats (one posterior sample)."""
    if nll_form == "exact":
        if perceptual is not None and perceptual_weight > 0 or pixel_weight != 1.0:
            raise ValueError("nll_form exact is a likelihood: no perceptual term and pixel_weight 1")
        pixels_per_sample = x[0].numel()
        nll = exact_nll(x, recon, nll_logvar, pixel).flatten(1).sum(1) / pixels_per_sample
        kl = kl_divergence(mean, logvar)
        total = (nll + kl_weight * kl / pixels_per_sample).mean()
        return VAELoss(total=total, nll=nll.mean(), rec=pixel_loss(x, recon, pixel).mean().detach(),
                       perceptual=torch.zeros((), device=x.device), kl=kl.mean().detach(), kl_weight=kl_weight)
    if nll_form != "scaled":
        raise ValueError(f"nll_form {nll_form!r}: expected scaled or exact")
    rec_map = pixel_weight * pixel_loss(x, recon, pixel)
    if perceptual is not None and perceptual_weight > 0:
        p = perceptual(x, recon).view(-1, 1, 1, 1)  # one value per image, broadcast over its pixels as in LDM
        rec_map = rec_map + perceptual_weight * p
    else:
        p = torch.zeros((), device=x.device)
    pixels_per_sample = x[0].numel()
    nll = gaussian_nll(rec_map, nll_logvar).flatten(1).sum(1) / pixels_per_sample
    kl = kl_divergence(mean, logvar)
    total = (nll + kl_weight * kl / pixels_per_sample).mean()
    return VAELoss(total=total, nll=nll.mean(), rec=pixel_loss(x, recon, pixel).mean().detach(),
                   perceptual=p.mean().detach(), kl=kl.mean().detach(), kl_weight=kl_weight)


# LPIPS's AlexNet pools its input down 32x before the last layer it reads: smaller images have no features there.
PERCEPTUAL_MIN_SIDE = 64


@in_fp32
def equivariance_loss(target: torch.Tensor, transformed: torch.Tensor, nll_logvar: torch.Tensor, *, pixel: str = "l1",
                      pixel_weight: float = 1.0, perceptual: "PerceptualLoss | None" = None,
                      perceptual_weight: float = 1.0) -> torch.Tensor:
    """The reconstruction term of `vae_loss` (scaled form) for τ(x) against D(τ(z)), without the constant s:
    mean over elements of (w_pix · pixel + w_p · perceptual) / e^s. The perceptual term joins only when the
    transformed images are at least PERCEPTUAL_MIN_SIDE a side. Weighted by 1 it counts as much as the plain
    reconstruction of an image of that size."""
    rec_map = pixel_weight * pixel_loss(target, transformed, pixel)
    if perceptual is not None and perceptual_weight > 0 and min(target.shape[-2:]) >= PERCEPTUAL_MIN_SIDE:
        rec_map = rec_map + perceptual_weight * perceptual(target, transformed).view(-1, 1, 1, 1)
    return (rec_map / nll_logvar.exp()).mean()


class CodecLoss:
    """`vae_loss` with the settings of `cfg.loss` bound once and β taken from its schedule at each step, so the
    training loop's call names only what changes: the batch, its reconstruction, the posterior and the step.
    With loss.equivariance_weight > 0, `equivariant` (D(τ(z)), τ(x)) adds w · `equivariance_loss` to the total."""

    def __init__(self, cfg: LossConfig, perceptual: "PerceptualLoss | None"):
        self.cfg, self.perceptual = cfg, perceptual

    def __call__(self, x: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
                 nll_logvar: torch.Tensor, step: int,
                 equivariant: tuple[torch.Tensor, torch.Tensor] | None = None) -> VAELoss:
        cfg = self.cfg
        parts = vae_loss(x, recon, mean, logvar, nll_logvar, kl_weight_at(step, cfg), pixel=cfg.pixel,
                         pixel_weight=cfg.pixel_weight, perceptual=self.perceptual,
                         perceptual_weight=cfg.perceptual_weight, nll_form=cfg.nll)
        if equivariant is None or cfg.equivariance_weight == 0:
            return parts
        transformed, target = equivariant
        term = equivariance_loss(target, transformed, nll_logvar, pixel=cfg.pixel, pixel_weight=cfg.pixel_weight,
                                 perceptual=self.perceptual, perceptual_weight=cfg.perceptual_weight)
        return replace(parts, total=parts.total + cfg.equivariance_weight * term, equivariance=term.detach())


# ---------------------------------------------------------------------------------------------------------
# Perceptual terms: LPIPS (needs an ImageNet backbone file) or MS-SSIM (weight-free)
# ---------------------------------------------------------------------------------------------------------

# torchvision's file names for the ImageNet weights LPIPS builds on; torch hub caches them under these names.
LPIPS_BACKBONE_FILES = {
    "alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth"),
}


class LPIPSBackboneMissing(FileNotFoundError):
    pass


def lpips_backbone_path(net: str, override: str | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net][1]


def build_lpips(net: str = "alex", backbone: str | None = None) -> nn.Module:
    """LPIPS with its linear heads from the `lpips` package and the ImageNet backbone from a local file.

    The package would download the backbone at run time; this machine (and many clusters) has no internet,
    so we never let it: the backbone network is built empty and loaded from `backbone` or torch hub's cache.
    """
    import lpips
    import torchvision

    path = lpips_backbone_path(net, backbone)
    if not path.is_file():
        tv_name, file_name = LPIPS_BACKBONE_FILES[net]
        raise LPIPSBackboneMissing(
            f"LPIPS ({net}) needs the ImageNet weights of torchvision's {tv_name} at {path}. Place the file "
            f"{file_name} there (or set loss.lpips_backbone to its path), or choose a weight-free perceptual "
            f"term with loss.perceptual: ms_ssim or loss.if_lpips_missing: ms_ssim."
        )
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    reference = getattr(torchvision.models, LPIPS_BACKBONE_FILES[net][0])(weights=None)
    reference.load_state_dict(state)
    # lpips keeps torchvision's `features[i]` as `sliceK.<i>`: copy each layer by its index.
    for slice_module in model.net.children():
        for index, layer in slice_module.named_children():
            layer.load_state_dict(reference.features[int(index)].state_dict())
    model.eval().requires_grad_(False)
    return model


def ms_ssim_scales(size: int, kernel: int = 11, max_scales: int = 5) -> int:
    """How many MS-SSIM scales fit an image side: each scale halves it and must stay larger than the kernel."""
    scales = 1
    while scales < max_scales and size // (2**scales) > kernel - 1:
        scales += 1
    return scales


@in_fp32
def ms_ssim_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 − MS-SSIM per image, for images in [-1, 1]; the standard 5 weights truncated and renormalised when
    the image is too small for 5 scales."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim

    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[: ms_ssim_scales(min(x.shape[-2:]))]
    betas = tuple(b / sum(betas) for b in betas)
    score = ms_ssim(y, x, data_range=2.0, betas=betas, reduction="none", normalize="relu")
    return 1.0 - score


class PerceptualLoss(nn.Module):
    """One value per image pair; `name` records which perceptual term is really in use."""

    def __init__(self, name: str, lpips_model: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.lpips = lpips_model

    @in_fp32
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.name == "lpips":
            return self.lpips(x, y).flatten()
        return ms_ssim_distance(x, y)


def build_perceptual(cfg: LossConfig) -> tuple[PerceptualLoss | None, str]:
    """The perceptual term the config asks for, and a sentence saying what is really used and why."""
    if cfg.perceptual == "none" or cfg.perceptual_weight == 0:
        return None, "none (disabled in config)"
    if cfg.perceptual == "ms_ssim":
        return PerceptualLoss("ms_ssim"), "ms_ssim (chosen in config)"
    try:
        model = build_lpips(cfg.lpips_net, cfg.lpips_backbone)
        return PerceptualLoss("lpips", model), (f"lpips-{cfg.lpips_net} "
                                                f"(backbone {lpips_backbone_path(cfg.lpips_net, cfg.lpips_backbone)})")
    except LPIPSBackboneMissing as exc:
        if cfg.if_lpips_missing == "error":
            raise
        why = (f"LPIPS backbone missing at {lpips_backbone_path(cfg.lpips_net, cfg.lpips_backbone)}; "
               f"loss.if_lpips_missing={cfg.if_lpips_missing}")
        log.warning("%s", exc)
        if cfg.if_lpips_missing == "ms_ssim":
            return PerceptualLoss("ms_ssim"), f"ms_ssim instead of lpips ({why})"
        return None, f"none instead of lpips ({why})"


# ---------------------------------------------------------------------------------------------------------
# Patch-GAN
# ---------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer patch discriminator. GroupNorm instead of BatchNorm: per-sample statistics behave the
    same on one process or many and need no SyncBatchNorm."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(math.gcd(32, out), out),
                       nn.LeakyReLU(0.2, True)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@in_fp32
def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def discriminator_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D's hinge loss on real images and *detached* reconstructions: its backward reaches D only. (The public
    script fed undetached reconstructions here and leaked gradients into the VAE's next step.)"""
    return hinge_d_loss(disc(real), disc(fake.detach()))


@in_fp32
def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """−E[D(x̂)]: the generator's side of the hinge GAN."""
    return -logits_fake.mean()


@in_fp32
def generator_gan_loss(disc: nn.Module, recon: torch.Tensor) -> torch.Tensor:
    """The generator's hinge term −E[D(x̂)] with D frozen (it must not be trained by the generator's loss), in fp32.

    fp32 because the adaptive GAN weight differentiates this loss at the decoder's last layer through D: in fp16
    without the loss scaler that gradient underflows inside D's backward (measured: λ 1.0 instead of 0.48 at
    a realistic per-pixel gradient size), and D is small beside the codec."""
    with frozen(disc):
        return hinge_g_loss(disc(recon))


@in_fp32
def adaptive_gan_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4,
                        reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """λ = ||∇_w nll|| / (||∇_w g_loss|| + 1e-4), clamped to [0, max_weight], w = the decoder's last conv weight
    (Esser et al., taming-transformers): the GAN gradient is scaled to the size of the reconstruction's.

    `reduce_mean` averages each gradient over the processes (accelerate's reduce): `autograd.grad` sees only this
    process's batch, and DDP averages nothing it computes, so without it every rank would weight the GAN by its
    own λ and N processes would not train like one with N times the batch. The codec runs `last_layer`'s
    convolution in fp32 (codec.common.precision.run_in_fp32), so these gradients neither underflow in fp16 nor
    lose bits in bf16."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    if reduce_mean is not None:
        nll_grad, g_grad = reduce_mean(nll_grad), reduce_mean(g_grad)
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


@contextmanager
def frozen(module: nn.Module):
    """Stop gradients from reaching `module`'s parameters (the generator's GAN term must not train D)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
