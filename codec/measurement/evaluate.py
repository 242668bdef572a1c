"""Measure a codec on held-out images and draw what it does: reconstructions, prior samples, interpolation;
and the full evaluation against reference lines (thumbnail, JPEG at the latent's size) that
`latent-codec codec evaluate` runs."""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torchvision.utils import make_grid

from codec.common.atomic import write_atomically
from codec.data import CenterCrops, bundled_photos, load_image_dataset, pil_to_tensor, tensor_to_pil
from codec.measurement.metrics import fid_inception, lpips_distance, ms_ssim, psnr, ssim, to_uint8_range
from codec.measurement.quality import (
    JpegAtBudget,
    jpeg_at_budget,
    latent_budgets,
    thumbnail_baseline,
    thumbnail_numbers,
)
from codec.network.fast import prepare_for_inference
from codec.network.model import downsample_factor, interpolate, latent_shape, reconstruct, sample_prior
from codec.network.tiling import tiled_decode, tiled_encode
from codec.training.losses import LPIPSBackboneMissing, build_lpips, lpips_backbone_path, ms_ssim_scales


@torch.no_grad()
def evaluate_reconstructions(vae: AutoencoderKL, batches, perceptual=None) -> dict:
    """Mean L1 (in [-1, 1] units), PSNR and SSIM (uint8 RGB), and LPIPS when an LPIPS module is given,
    of posterior-mean reconstructions over `batches` of images."""
    l1, p, s, lp, count = 0.0, 0.0, 0.0, 0.0, 0
    for batch in batches:  # images, or (images, conditions) for a conditional codec
        images, condition = batch if isinstance(batch, (tuple, list)) else (batch, None)
        images = images.to(vae.device, vae.dtype)
        recon = reconstruct(vae, images, condition).clamp(-1, 1)
        l1 += (images - recon).abs().flatten(1).mean(1).sum().item()
        p += psnr(images, recon).sum().item()
        s += ssim(images, recon).sum().item()
        if perceptual is not None and perceptual.name == "lpips":
            lp += perceptual(images, recon).sum().item()
        count += images.shape[0]
    if not count:
        raise ValueError("evaluate_reconstructions: no validation images")
    metrics = {"val/l1": l1 / count, "val/psnr": p / count, "val/ssim": s / count}
    if perceptual is not None and perceptual.name == "lpips":
        metrics["val/lpips"] = lp / count
    return metrics


@torch.no_grad()
def validation_grid(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0, n_prior: int | None = None,
                    condition: torch.Tensor | None = None) -> Image.Image:
    """Rows: inputs | reconstructions | decoded prior samples z ~ N(0, I) | interpolation from the first image
    to the second. The prior row shows what the VAE alone generates, next to what its latents can hold.

    With a conditional codec (`condition`: one per image) the prior row decodes z ~ N(0, I) with the inputs' own
    conditions, so each column shows what the CVAE draws for the caption or class of the image above it, and the
    interpolation row is left out (two images' conditions need not blend)."""
    images = images.to(vae.device, vae.dtype)
    n, _, h, w = images.shape
    rows = [images, reconstruct(vae, images, condition)]
    g = torch.Generator().manual_seed(seed)
    rows.append(sample_prior(vae, n if condition is not None else (n_prior or n), h, w, generator=g,
                             condition=condition))
    if n >= 2 and condition is None:
        rows.append(interpolate(vae, images[0], images[1], steps=n))
    tiles = torch.cat([r.float().clamp(-1, 1).cpu() for r in rows])
    grid = make_grid((tiles + 1) / 2, nrow=n, padding=2, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write atomically: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Codec evaluation against reference lines (`latent-codec codec evaluate`)
# ---------------------------------------------------------------------------------------------------------------

# Every row of the report, in order: the codec, then what else keeps about as little (codec.measurement.quality).
METHODS = ("codec", "thumbnail", "jpeg_fp16_size", "jpeg_8bit_size")
METHOD_LABELS = {
    "codec": "codec (posterior mean)",
    "thumbnail": "thumbnail (box down, bicubic up)",
    "jpeg_fp16_size": "JPEG at the fp16 latent's size",
    "jpeg_8bit_size": "JPEG at the 8-bit latent's size",
}
SCORES = ("psnr", "ssim", "ms_ssim", "lpips")


@dataclass
class QualityRun:
    """What measure_quality found: one row per (image, method), a summary, and the worst reconstructions."""

    rows: list[dict]
    summary: dict
    worst: list[tuple[float, str, torch.Tensor]] = field(default_factory=list)  # (codec psnr, name, uint8 stack)


def reconstruct_posterior_mean(vae: AutoencoderKL, images: torch.Tensor, tile_size: int | None = None,
                               tile_norm: str = "tile") -> torch.Tensor:
    """Encode -> posterior mean -> decode, in overlapping tiles of tile_size pixels when the image is larger
    (overlap tile_size / 8, rounded to the codec's factor); tile_norm as codec.network.tiling's `norm`."""
    if tile_size is None or max(images.shape[-2:]) <= tile_size:
        return reconstruct(vae, images)
    f = downsample_factor(vae)
    overlap = max(f, tile_size // 8 // f * f)
    latents = tiled_encode(vae, images, tile=tile_size, overlap=overlap, norm=tile_norm).mode()
    return tiled_decode(vae, latents, tile_latent=tile_size // f, overlap_latent=overlap // f, norm=tile_norm)


def _scores(originals: torch.Tensor, candidates: torch.Tensor, lpips_model) -> dict[str, torch.Tensor]:
    scores = {"psnr": psnr(originals, candidates), "ssim": ssim(originals, candidates),
              "ms_ssim": ms_ssim(originals, candidates)}
    if lpips_model is not None:
        scores["lpips"] = lpips_distance(lpips_model, originals, candidates)
    return scores


def _candidates(images: torch.Tensor, recon: torch.Tensor, factor: int, budgets: dict[str, int]):
    """Per method, one [-1, 1] image or None (a JPEG budget no quality fits) per input image; and per JPEG
    method the search results, which say why."""
    candidates: dict[str, list[torch.Tensor | None]] = {"codec": list(recon),
                                                        "thumbnail": list(thumbnail_baseline(images, factor))}
    fits: dict[str, list[JpegAtBudget]] = {}
    pils = [tensor_to_pil(x) for x in images]
    for precision, budget in budgets.items():
        method = f"jpeg_{precision}_size"
        fits[method] = [jpeg_at_budget(img, budget) for img in pils]
        candidates[method] = [pil_to_tensor(fit.decoded()) if fit.reachable else None for fit in fits[method]]
    return candidates, fits


class _Frechet:
    """One torchmetrics FrechetInceptionDistance per method, sharing one Inception network."""

    def __init__(self, inception: torch.nn.Module):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metrics = {m: FrechetInceptionDistance(feature=inception) for m in METHODS}

    def update(self, method: str, originals: torch.Tensor, candidates: torch.Tensor) -> None:
        as_uint8 = lambda x: to_uint8_range(x).to(torch.uint8)  # noqa: E731
        self.metrics[method].update(as_uint8(originals), real=True)
        self.metrics[method].update(as_uint8(candidates), real=False)

    def compute(self) -> dict[str, float | None]:
        return {
            m: float(metric.compute()) if int(metric.fake_features_num_samples) >= 2 else None
            for m, metric in self.metrics.items()
        }


@torch.no_grad()
def measure_quality(
    vae: AutoencoderKL,
    batches,
    lpips_model: torch.nn.Module | None = None,
    inception: torch.nn.Module | None = None,
    tile_size: int | None = None,
    worst_count: int = 8,
    tile_norm: str = "tile",
) -> QualityRun:
    """Score the codec's posterior-mean reconstructions and the reference lines on the same images.

    `batches` yields (images in [-1, 1], names). Scores are per image on uint8-quantised RGB: PSNR, SSIM,
    MS-SSIM, LPIPS when `lpips_model` is given; rFID per method when `inception` (metrics.fid_inception) is.
    A JPEG budget no quality fits is recorded as unreachable for that image, and its means leave it out.
    """
    factor = downsample_factor(vae)
    rows: list[dict] = []
    worst: list[tuple[float, str, torch.Tensor]] = []
    frechet = _Frechet(inception) if inception is not None else None
    seconds, count, size = 0.0, 0, None
    for images, names in batches:
        images = images.to(vae.device, vae.dtype)
        size = tuple(images.shape[-2:])
        tick = time.perf_counter()
        recon = reconstruct_posterior_mean(vae, images, tile_size, tile_norm).float().clamp(-1, 1)
        seconds += time.perf_counter() - tick
        images = images.float()
        candidates, fits = _candidates(images, recon, factor, latent_budgets(vae, *size))
        for method in METHODS:
            made = [i for i, x in enumerate(candidates[method]) if x is not None]
            scores: dict[str, torch.Tensor] = {}
            if made:
                outputs = torch.stack([candidates[method][i] for i in made])
                scores = _scores(images[made], outputs, lpips_model)
                if method == "codec":
                    codec_psnr = scores["psnr"]  # the codec reconstructs every image
                if frechet is not None:
                    frechet.update(method, images[made], outputs)
            for i, name in enumerate(names):
                row = {"image": name, "method": method}
                if i in made:
                    row.update({k: float(v[made.index(i)]) for k, v in scores.items()})
                if method in fits:
                    fit = fits[method][i]
                    row.update(budget_bytes=fit.budget, bytes=len(fit.encoded) if fit.reachable else None,
                               jpeg_quality=fit.quality, bytes_at_quality_1=fit.bytes_at_quality_1)
                rows.append(row)
        blank = torch.full_like(images[0], -1.0)  # black where a JPEG budget was unreachable
        for i, name in enumerate(names):
            stack = torch.stack([images[i],
                                 *(blank if candidates[m][i] is None else candidates[m][i] for m in METHODS)])
            worst.append((float(codec_psnr[i]), name, to_uint8_range(stack).to(torch.uint8)))
        worst = sorted(worst, key=lambda item: item[0])[:worst_count]
        count += len(names)
    if not count:
        raise ValueError("measure_quality: no images to evaluate")
    summary = _summarise(rows, vae, size, count, seconds, frechet.compute() if frechet else None)
    return QualityRun(rows=rows, summary=summary, worst=worst)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summarise(rows: list[dict], vae: AutoencoderKL, size: tuple[int, int], count: int, seconds: float,
               rfid: dict | None) -> dict:
    factor = downsample_factor(vae)
    shape = latent_shape(vae, *size)
    latent_numbers = math.prod(shape)
    lines: dict[str, dict] = {}
    for method in METHODS:
        scored = [r for r in rows if r["method"] == method and "psnr" in r]
        line = {s: _mean([r[s] for r in scored if s in r]) for s in SCORES}
        line["rfid"] = rfid[method] if rfid else None
        line["images"] = len(scored)
        if method == "codec":
            line.update(kept=f"{'x'.join(map(str, shape))} latent", numbers_per_image=latent_numbers,
                        bytes_per_image_fp16=2 * latent_numbers, bytes_per_image_8bit=latent_numbers)
        elif method == "thumbnail":
            numbers = thumbnail_numbers(*size, factor)
            line.update(kept=f"3x{size[0] // factor}x{size[1] // factor} pixels, 8-bit", numbers_per_image=numbers,
                        bytes_per_image=numbers)
        else:
            mine = [r for r in rows if r["method"] == method]
            line.update(budget_bytes=mine[0]["budget_bytes"], mean_bytes=_mean([r["bytes"] for r in scored]),
                        mean_quality=_mean([r["jpeg_quality"] for r in scored]),
                        unreachable=sum(r["jpeg_quality"] is None for r in mine))
        lines[method] = line
    codec = lines["codec"]
    return {
        "images": count, "resolution": list(size), "latent_shape": list(shape), "downsample_factor": factor,
        "psnr": codec["psnr"], "ssim": codec["ssim"], "ms_ssim": codec["ms_ssim"], "lpips": codec["lpips"],
        "rfid": codec["rfid"], "ms_ssim_scales": ms_ssim_scales(min(size)),
        "codec_seconds_per_image": seconds / count, "reference_lines": lines,
    }


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _kept(method: str, line: dict) -> str:
    if method == "codec":
        return (f"{line['kept']}: {line['numbers_per_image']} numbers ({line['bytes_per_image_fp16']} B fp16, "
                f"{line['bytes_per_image_8bit']} B 8-bit)")
    if method == "thumbnail":
        return f"{line['kept']}: {line['numbers_per_image']} numbers ({line['bytes_per_image']} B)"
    quality = f", quality {line['mean_quality']:.1f}" if line["mean_quality"] is not None else ""
    unreachable = f"; unreachable for {line['unreachable']} image(s)" if line["unreachable"] else ""
    return f"mean {_cell(line['mean_bytes'], 0)} B of a {line['budget_bytes']} B budget{quality}{unreachable}"


def quality_table(summary: dict) -> str:
    """The codec and its reference lines as a Markdown table; LPIPS and rFID columns only when measured."""
    lines = summary["reference_lines"]
    extra = [s for s in ("lpips", "rfid") if summary.get(s) is not None]
    head = ["method", "images", "PSNR", "SSIM", "MS-SSIM", *[{"lpips": "LPIPS", "rfid": "rFID"}[s] for s in extra],
            "kept per image"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in METHODS:
        line = lines[method]
        cells = [METHOD_LABELS[method], str(line["images"]), _cell(line["psnr"], 2), _cell(line["ssim"], 4),
                 _cell(line["ms_ssim"], 4), *[_cell(line[s], 4 if s == "lpips" else 2) for s in extra],
                 _kept(method, line)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def worst_grid(run: QualityRun) -> Image.Image:
    """One row per worst reconstruction (lowest codec PSNR first): original, then each method in METHODS order."""
    tiles = torch.cat([stack for _, _, stack in run.worst]).float() / 255
    grid = make_grid(tiles, nrow=1 + len(METHODS), padding=2, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def _summary_markdown(summary: dict, run: QualityRun) -> str:
    worst = ", ".join(f"{name} ({value:.2f} dB)" for value, name, _ in run.worst)
    text = [
        f"# Codec evaluation: {summary['codec']}",
        "",
        f"{summary['images']} images from `{summary['data']}`, shorter side resized to {summary['resolution'][0]} "
        f"and centre-cropped; reconstructions from the posterior mean"
        f"{', in tiles of ' + str(summary['tile_size']) + ' px' if summary.get('tile_size') else ''}. Scores on "
        f"uint8 RGB; MS-SSIM with {summary['ms_ssim_scales']} scale(s). "
        f"Latent {'x'.join(map(str, summary['latent_shape']))}.",
        "",
        quality_table(summary),
        "",
        f"- lpips: {summary['lpips_note']}",
        f"- rfid: {summary['rfid_note']}",
        "- JPEG rows: per image the highest Pillow quality (1..95, optimised Huffman tables, 4:2:0) whose file "
        "fits the budget; means leave out images where even quality 1 does not fit.",
        f"- codec: {summary['codec_seconds_per_image']:.3f} s per image "
        f"(encode + decode, batch {summary['batch_size']}).",
        f"- worst.png, one row per image, columns original | {' | '.join(METHODS)}: {worst}.",
    ]
    if summary.get("rejected"):
        text.append(f"- skipped unreadable images: {summary['rejected']}")
    return "\n".join(text) + "\n"


def write_quality_report(run: QualityRun, out_dir: str | Path) -> dict[str, Path]:
    """per_image.csv, summary.json, summary.md and worst.png under out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("per_image.csv", "summary.json", "summary.md", "worst.png")}
    columns = ["image", "method", *SCORES, "budget_bytes", "bytes", "jpeg_quality", "bytes_at_quality_1"]
    with open(paths["per_image.csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in run.rows)
    paths["summary.json"].write_text(json.dumps(run.summary, indent=2))
    paths["summary.md"].write_text(_summary_markdown(run.summary, run))
    save_png(worst_grid(run), paths["worst.png"])
    return paths


def _image_name(record, index: int) -> str:
    path = record.get("path") if isinstance(record, dict) else None
    return Path(path).name if path else f"#{index}"


def _lpips_or_note(backbone: str | None) -> tuple[torch.nn.Module | None, str]:
    try:
        model = build_lpips("alex", backbone)
    except LPIPSBackboneMissing:
        return None, f"not measured (backbone file missing at {lpips_backbone_path('alex', backbone)})"
    return model, f"LPIPS-alex, backbone {lpips_backbone_path('alex', backbone)}"


def evaluate_codec(
    codec_dir: str | Path,
    data: str,
    resolution: int = 256,
    out_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    inception: str | Path | None = None,
    lpips_backbone: str | None = None,
    tile_size: int | None = None,
    bundled_dir: str | Path = "data/bundled_photos",
    split: str = "train",
    tile_norm: str = "tile",
) -> tuple[QualityRun, dict[str, Path]]:
    """Evaluate a diffusers codec folder on `data` (anything codec.data.load_image_dataset takes, or `bundled`:
    the held-out bundled photos) and write the report to out_dir (default: evaluation-<resolution> next to
    the codec folder). rFID is computed only from an explicit Inception weights file; asking for it where it
    cannot be computed is an error rather than a silently missing number."""
    from codec.network.model import load_codec

    inception_model = fid_inception(inception) if inception is not None else None  # fail before the long part
    vae = prepare_for_inference(load_codec(codec_dir))
    source = str(bundled_photos(bundled_dir)[1]) if data == "bundled" else str(data)
    dataset, column = load_image_dataset(source, split=split)
    crops = CenterCrops(dataset, column, resolution, limit=limit)
    names = [_image_name(dataset[crops[i]["index"]][column], crops[i]["index"]) for i in range(len(crops))]
    lpips_model, lpips_note = _lpips_or_note(lpips_backbone)

    def batches():
        for start in range(0, len(crops), batch_size):
            picked = range(start, min(start + batch_size, len(crops)))
            yield torch.stack([crops[i]["pixels"] for i in picked]), [names[i] for i in picked]

    with torch.inference_mode():
        run = measure_quality(vae, batches(), lpips_model, inception_model, tile_size, tile_norm=tile_norm)
    if inception is None:
        rfid_note = "not measured (no --inception weights file given)"
    else:
        rfid_note = (
            f"FID between the {len(crops)} originals and their reconstructions (torchmetrics, Inception weights "
            f"{inception}); published rFIDs use 5k-50k images, with fewer the number is biased upward "
            "and not comparable"
        )
    run.summary.update(
        codec=str(codec_dir), data=source if data != "bundled" else f"bundled ({source})", batch_size=batch_size,
        tile_size=tile_size, tile_norm=tile_norm if tile_size else None, lpips_note=lpips_note, rfid_note=rfid_note,
        rejected=[f"{index}: {reason}" for index, reason in crops.rejected],
    )
    out_dir = Path(out_dir) if out_dir is not None else Path(codec_dir).resolve().parent / f"evaluation-{resolution}"
    return run, write_quality_report(run, out_dir)
