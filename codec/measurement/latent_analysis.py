"""What a codec's latent space looks like to a diffusion model: statistics, spectrum, equivariance, reconstruction.

"Improving the Diffusability of Autoencoders" (Skorokhodov et al., 2025) finds that latents with more power at
high spatial frequencies than images have are harder for a diffusion model to learn; EQ-VAE (Kouzelis et al.,
2025) that latents which transform like their images (D(τ(z)) ≈ τ(x)) are easier. This module measures both for
any unconditional codec on any images, with the reconstruction it costs:

- per latent channel: mean, std, largest |value| of the posterior means, and the mean posterior σ;
- the radially averaged power spectrum of the latents (each map's mean removed, channels and images averaged),
  with the same spectrum of the images' luma at the latent's size for reference, and the share of power above
  half the Nyquist frequency (radius > 0.25 cycles per sample);
- the equivariance error: PSNR of D(τ(z)) against τ(x) for each τ of codec.measurement.equivariance.analysis_transforms;
- PSNR and SSIM of the plain reconstruction.

Pure functions first (tested against closed forms), then `analyze_codec`, then the plot.
"""

from __future__ import annotations

from pathlib import Path

import torch

from codec.common.atomic import save_figure
from codec.common.precision import in_fp32
from codec.measurement.equivariance import Transform, analysis_transforms, resize, transform_image, transform_latent
from codec.measurement.metrics import mean_psnr, psnr, ssim
from codec.network.model import decode_latents, downsample_factor, encode_posterior

HALF_NYQUIST = 0.25  # cycles per sample: half of the highest frequency a sampled map holds
LUMA = (0.299, 0.587, 0.114)


def radius_grid(height: int, width: int) -> torch.Tensor:
    """|f| in cycles per sample at every point of a (height, width) FFT grid."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.fftfreq(width, dtype=torch.float64).view(1, -1)
    return (fy.pow(2) + fx.pow(2)).sqrt()


@in_fp32
def power_spectrum_2d(maps: torch.Tensor) -> torch.Tensor:
    """Mean |FFT|² / (H·W)² over every map of `maps` (..., H, W), each map's mean removed first (the DC term says
    nothing about texture). By Parseval its sum is the maps' mean variance."""
    maps = maps.double().flatten(0, -3)
    maps = maps - maps.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(maps).abs().pow(2) / (maps.shape[-2] * maps.shape[-1]) ** 2
    return power.mean(0)


def high_frequency_share(power: torch.Tensor, cutoff: float = HALF_NYQUIST) -> float:
    """The share of a 2D power spectrum at radius > `cutoff` cycles per sample."""
    total = power.sum()
    if total <= 0:
        return 0.0
    return float(power[radius_grid(*power.shape) > cutoff].sum() / total)


def radial_profile(power: torch.Tensor) -> tuple[list[float], list[float]]:
    """The radially averaged spectrum: mean power in rings of width 1/N (N = the shorter side) from 0 to the
    Nyquist frequency 0.5, normalised to sum to 1 over all rings (codecs with latents of any scale compare).
    Returns (ring centres in cycles per sample, normalised power)."""
    n = min(power.shape)
    ring = (radius_grid(*power.shape) * n).round().long()
    rings = n // 2 + 1
    inside = ring < rings
    sums = torch.zeros(rings, dtype=torch.float64).index_add_(0, ring[inside], power[inside])
    counts = torch.zeros(rings, dtype=torch.float64).index_add_(0, ring[inside], torch.ones_like(power[inside]))
    mean = sums / counts.clamp_min(1)
    mean = mean / mean.sum().clamp_min(1e-30)
    return [k / n for k in range(rings)], [float(v) for v in mean]


def luma(images: torch.Tensor) -> torch.Tensor:
    return sum(w * images[:, c] for c, w in enumerate(LUMA))


# ---------------------------------------------------------------------------------------------------------
# A codec on a set of images
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def analyze_codec(vae, batches, transforms: list[Transform] | None = None, resample: str = "area") -> dict:
    """Every number of the module docstring for `vae` on `batches` of images in [-1, 1] (N, 3, H, W): a
    JSON-ready dict. The latent analysed is the posterior mean, the latent a diffusion model's shards centre on."""
    transforms = analysis_transforms() if transforms is None else transforms
    factor = downsample_factor(vae)
    latents, sigmas, image_luma, rec_psnr, rec_ssim = [], [], [], [], []
    tau_psnr: dict[str, list[torch.Tensor]] = {tau.name: [] for tau in transforms}
    for images in batches:
        images = images.to(vae.device, vae.dtype)
        posterior = encode_posterior(vae, images)
        z = posterior.mode()
        latents.append(z.float().cpu())
        sigmas.append(posterior.std.float().cpu())
        image_luma.append(resize(luma(images.float()).unsqueeze(1), tuple(z.shape[-2:])).cpu())
        recon = decode_latents(vae, z).clamp(-1, 1)
        rec_psnr.append(psnr(images, recon).cpu())
        rec_ssim.append(ssim(images, recon).cpu())
        for tau in transforms:
            target = transform_image(images, tau, factor, tuple(z.shape[-2:]), resample)
            decoded = decode_latents(vae, transform_latent(z, tau, resample)).clamp(-1, 1)
            tau_psnr[tau.name].append(psnr(target, decoded).cpu())
    if not latents:
        raise ValueError("analyze_codec: no images given")
    z, sigma = torch.cat(latents), torch.cat(sigmas)
    per_channel = z.transpose(0, 1).flatten(1)
    latent_power = power_spectrum_2d(z)
    image_power = power_spectrum_2d(torch.cat(image_luma))
    freqs, latent_profile = radial_profile(latent_power)
    _, image_profile = radial_profile(image_power)
    plain = torch.cat(rec_psnr)
    equivariance = {name: mean_psnr(torch.cat(values)) for name, values in tau_psnr.items()}
    return {
        "images": int(z.shape[0]),
        "latent_shape": list(z.shape[1:]),
        "channels": {
            "mean": per_channel.mean(1).tolist(),
            "std": per_channel.std(1).tolist(),
            "abs_max": per_channel.abs().amax(1).tolist(),
            "posterior_sigma": sigma.transpose(0, 1).flatten(1).mean(1).tolist(),
        },
        "spectrum": {
            "frequency": freqs,  # cycles per latent sample; 0.5 is Nyquist
            "latent": latent_profile,
            "image_luma_at_latent_size": image_profile,
            "latent_high_frequency_share": high_frequency_share(latent_power),
            "image_high_frequency_share": high_frequency_share(image_power),
        },
        "equivariance_psnr": equivariance,
        "equivariance_psnr_mean": sum(equivariance.values()) / len(equivariance) if equivariance else None,
        "equivariance_resample": resample,
        "reconstruction": {"psnr": mean_psnr(plain), "ssim": float(torch.cat(rec_ssim).mean())},
    }


def plot_spectra(analyses: dict[str, dict], out: str | Path, title: str = "Radially averaged power spectrum") -> Path:
    """One line per codec's latents (and the images' luma of the first, dashed) against frequency, log power."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    first = next(iter(analyses.values()))
    spectrum = first["spectrum"]
    ax.plot(spectrum["frequency"][1:], spectrum["image_luma_at_latent_size"][1:], "k--",
            label="images (luma, latent size)")
    for name, analysis in analyses.items():
        s = analysis["spectrum"]
        ax.plot(s["frequency"][1:], s["latent"][1:], marker="o", ms=3,
                label=f"{name} (>{HALF_NYQUIST:g} c/s: {100 * s['latent_high_frequency_share']:.0f}%)")
    ax.axvline(HALF_NYQUIST, color="gray", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("frequency (cycles per latent sample; Nyquist = 0.5)")
    ax.set_ylabel("mean power per ring (rings sum to 1)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def named_codec(value: str) -> tuple[str, str]:
    """A command line's NAME=FOLDER, or FOLDER (named after the folder, or its parent when it is a run's `final`)."""
    if "=" in value:
        name, folder = value.split("=", 1)
        return name, folder
    path = Path(value)
    return (path.parent.name if path.name == "final" else path.name) or value, value


def analysis_table(analyses: dict[str, dict]) -> str:
    """One Markdown row per codec: reconstruction, high-frequency share, equivariance PSNR per τ."""
    names = list(next(iter(analyses.values()))["equivariance_psnr"])
    head = ["codec", "PSNR", "SSIM", "latent power > ¼ c/s", "images' > ¼ c/s", "channel std",
            *[f"D(τz) vs τx, {n}" for n in names]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, a in analyses.items():
        s = a["spectrum"]
        cells = [name, f"{a['reconstruction']['psnr']:.2f}", f"{a['reconstruction']['ssim']:.3f}",
                 f"{100 * s['latent_high_frequency_share']:.1f}%", f"{100 * s['image_high_frequency_share']:.1f}%",
                 " / ".join(f"{v:.2f}" for v in a["channels"]["std"]),
                 *[f"{a['equivariance_psnr'][n]:.2f}" for n in names]]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def load_images(data: str, resolution: int, limit: int | None,
                bundled_dir: str | Path = "data/bundled_photos") -> torch.Tensor:
    """Centre crops of `data` (anything codec.data.load_image_dataset reads, or `bundled`: the held-out bundled
    photos) at `resolution`, as one (N, 3, R, R) tensor in [-1, 1]."""
    from codec.data import CenterCrops, bundled_photos, load_image_dataset

    source = str(bundled_photos(bundled_dir)[1]) if data == "bundled" else str(data)
    dataset, column = load_image_dataset(source)
    crops = CenterCrops(dataset, column, resolution, limit=limit)
    if len(crops) == 0:
        raise ValueError(f"--data {data}: no readable images")
    return torch.stack([crops[i]["pixels"] for i in range(len(crops))])


def analyze_codecs(codecs: dict[str, str], images: torch.Tensor, out_dir: str | Path, batch_size: int = 8,
                   scales: list[float] = (0.5, 0.25), resample: str = "area") -> dict[str, dict]:
    """`analyze_codec` for each named codec folder on the same images; writes analysis.json, analysis.md and
    spectrum.png (every codec's spectrum on one plot) to `out_dir`."""
    import json

    from codec.common.atomic import write_text_atomically
    from codec.network.model import load_codec

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    analyses = {}
    for name, folder in codecs.items():
        vae = load_codec(folder)
        analyses[name] = dict(analyze_codec(vae, images.split(batch_size), analysis_transforms(list(scales)), resample),
                              codec=str(folder))
    write_text_atomically(out_dir / "analysis.json", json.dumps(analyses, indent=2))
    plot_spectra(analyses, out_dir / "spectrum.png")
    write_text_atomically(out_dir / "analysis.md", "# Latent analysis\n\n" + analysis_table(analyses) + (
        f"\n\n{len(images)} images at {images.shape[-1]} px. Power shares: above half the Nyquist frequency of the "
        f"latent grid. τ: downscale ({resample}) or quarter turn; PSNR in dB of the decoded transformed latent against "
        f"the transformed image. ![spectra](spectrum.png)\n"))
    return analyses


__all__ = ["analysis_table", "analyze_codec", "analyze_codecs", "load_images", "named_codec", "high_frequency_share",
           "plot_spectra", "power_spectrum_2d", "radial_profile", "radius_grid", "HALF_NYQUIST"]
