"""Reconstruction metrics, per image, on images in [-1, 1] quantised to uint8 like a saved PNG would be."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from codec.common.precision import in_fp32


def to_uint8_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> {0, ..., 255} as float: metrics see exactly the pixels a user would save."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round()


@in_fp32
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """10·log10(255² / MSE) per image on uint8-quantised RGB; identical images give +inf."""
    mse = (to_uint8_range(x) - to_uint8_range(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0**2 / mse)


def mean_psnr(values: torch.Tensor) -> float:
    """Mean of per-image PSNRs with identical pairs (+inf) counted at 100 dB, so one perfect image does not make the
    mean inf."""
    return float(values.clamp(max=100.0).mean())


@in_fp32
def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SSIM per image (Gaussian window 11, σ 1.5, the standard constants) on uint8-quantised RGB."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        to_uint8_range(y), to_uint8_range(x), data_range=255.0, reduction="none"
    )


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256 levels a saved PNG holds, staying in [-1, 1]: every metric sees the same
    pixels."""
    return to_uint8_range(images) / 127.5 - 1.0


def ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MS-SSIM per image on uint8-quantised RGB, with as many of the standard 5 scales as the image size allows
    (the weights truncated and renormalised, as in codec.training.losses.ms_ssim_scales); 1 means identical. Shares
    codec.training.losses.ms_ssim_distance, so torchmetrics' normalize="relu" applies: a coarse scale with negative
    contrast-structure counts as 0 instead of making the product NaN."""
    from codec.training.losses import ms_ssim_distance

    return 1.0 - ms_ssim_distance(quantise(x), quantise(y))


@torch.no_grad()
@in_fp32
def lpips_distance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS per image (lower is closer) on uint8-quantised RGB; `model` is training.losses.build_lpips'."""
    return model(quantise(x), quantise(y)).flatten()


class InceptionUnavailable(RuntimeError):
    """rFID was asked for but cannot be computed here (missing package or weights file)."""


def _tensors_only_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InceptionUnavailable(
            f"Inception weights file {path} does not exist; pass the FID InceptionV3 state dict "
            f"(torch-fidelity's weights-inception-2015-12-05-6726825d.pth, or a .safetensors copy of it)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionUnavailable(f"{path} is not a state dict of tensors; pass the InceptionV3 weights file itself")
    return state


def fid_inception(weights_path: str | Path) -> torch.nn.Module:
    """The FID InceptionV3 (TF-ported weights, pool features 2048) from a local file, as torchmetrics' own
    extractor, for torchmetrics.image.fid.FrechetInceptionDistance(feature=...). Takes uint8 (B, 3, H, W).

    torchmetrics builds it through torch-fidelity, which unpickles the weights file with weights_only=False
    (a pickle can run code). We read the file safely ourselves and hand torch-fidelity a copy we wrote from
    plain tensors, so nothing from the original pickle is ever executed.
    """
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' extractor is a torch-fidelity class)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as exc:
        raise InceptionUnavailable(
            "rFID needs the torch-fidelity package (torchmetrics' FID network is built from it): "
            "pip install torch-fidelity"
        ) from exc
    state = _tensors_only_state_dict(Path(weights_path).expanduser())
    with tempfile.TemporaryDirectory() as tmp:
        safe_copy = Path(tmp) / "inception.pth"
        torch.save(state, safe_copy)
        return NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(safe_copy)
        )
