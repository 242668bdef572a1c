"""The rate-distortion sweep: bits per pixel of real files against PSNR and MS-SSIM, for the codec with each
probability model over steps Δ and for JPEG and WebP over quality, on the same images
(`latent-codec analyze rate-distortion`).

Rate is what a user stores: a file's bytes x 8 / (H·W), header included (our 52-byte header and CRC, bitstream.py;
JPEG's and WebP's own headers). Distortion is scored on the decoded uint8 image against the original
(measurement/metrics.py); speed is wall time per image of the whole path, PIL image -> bytes (encode, the VAE encoder
included) and bytes -> PIL image (decode, the VAE decoder included); every number is a mean over the images.

A curve is a list of points (dicts with "bpp", "psnr", "ms_ssim", ...) sorted by bpp. Pure functions on curves
first (tested on made-up curves), then the measurements, then the plot and the report.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import torch
from PIL import Image

from codec.common.atomic import save_figure, write_bytes_atomically, write_text_atomically
from codec.data import pil_to_tensor, tensor_to_pil
from codec.entropy.bitstream import OVERHEAD_BYTES
from codec.entropy.coder import compress_image, decompress_image, read_compressed
from codec.entropy.models import ProbabilityModel
from codec.entropy.transform import pad_to_factor
from codec.measurement.evaluate import _cell
from codec.measurement.metrics import mean_psnr, ms_ssim, psnr
from codec.measurement.quality import encode_jpeg, encode_webp
from codec.network.model import downsample_factor, encode_posterior
from codec.training.losses import kl_divergence, ms_ssim_scales

TARGET_BPP = 0.25  # issue 19: at equal rate, above JPEG at every rate up to here
TARGET_SAVING = 0.10  # issue 19: the context model saves at least this share of the factorized model's bits
REFERENCES = {"jpeg": encode_jpeg, "webp": encode_webp}
SUFFIXES = {"jpeg": ".jpg", "webp": ".webp"}
METRICS = {"psnr": "PSNR (dB)", "ms_ssim": "MS-SSIM"}


def bits_per_pixel(n_bytes: int, height: int, width: int) -> float:
    return 8 * n_bytes / (height * width)


def geometric_steps(low: float, high: float, count: int = 8) -> list[float]:
    """`count` steps from `low` to `high` (both included), equally spaced in log Δ."""
    if not 0 < low <= high or count < 1:
        raise ValueError(f"geometric_steps: need 0 < low <= high and count >= 1, got {low}, {high}, {count}")
    if count == 1:
        return [low]
    return [low * (high / low) ** (i / (count - 1)) for i in range(count)]


# ---------------------------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------------------------


def interpolate(curve: list[dict], x_key: str, y_key: str, x: float) -> float | None:
    """curve's y_key at x_key = x, linear between consecutive points sorted by x_key; None outside their range."""
    points = sorted(curve, key=lambda p: p[x_key])
    if not points or not points[0][x_key] <= x <= points[-1][x_key]:
        return None
    for a, b in zip(points, points[1:]):
        if a[x_key] <= x <= b[x_key]:
            if b[x_key] == a[x_key]:
                return a[y_key]
            t = (x - a[x_key]) / (b[x_key] - a[x_key])
            return a[y_key] + t * (b[y_key] - a[y_key])
    return points[0][y_key]  # a single point, at x


def interpolate_psnr_at(curve: list[dict], bpp: float) -> float | None:
    """PSNR of a curve at `bpp`, linear in bpp between its points; None below its lowest or above its highest rate."""
    return interpolate(curve, "bpp", "psnr", bpp)


def above_at_every_rate(ours: list[dict], reference: list[dict], max_bpp: float, metric: str = "psnr") -> dict:
    """Does our curve lie above the reference at every rate up to `max_bpp`?

    Compared at each of our points with bpp <= max_bpp, at each reference point within our range and below
    max_bpp, and at max_bpp itself when our curve reaches past it: two piecewise-linear curves that are ordered at
    every vertex of both are ordered everywhere between them, and max_bpp closes the last interval. margin = ours -
    reference (dB for PSNR); None where the reference has no point that low (or that high):
    "not comparable", which is never counted as a win. holds: True (every rate compared, every margin > 0),
    False (some margin <= 0), None (not established: a rate not comparable, or no point of ours <= max_bpp)."""
    mine = [p["bpp"] for p in ours if p["bpp"] <= max_bpp]
    low, high = (min(p["bpp"] for p in ours), max(p["bpp"] for p in ours)) if ours else (0.0, -1.0)
    theirs = [p["bpp"] for p in reference if low <= p["bpp"] <= min(high, max_bpp) and p["bpp"] not in mine]
    # The curves may cross between the last vertex below max_bpp and max_bpp: compare at the end too.
    end = [max_bpp] if low <= max_bpp <= high and max_bpp not in mine + theirs else []
    rows = []
    for bpp, at in sorted([(b, "ours") for b in mine] + [(b, "reference") for b in theirs] + [(b, "end") for b in end]):
        value, other = interpolate(ours, "bpp", metric, bpp), interpolate(reference, "bpp", metric, bpp)
        rows.append({"bpp": bpp, "at": at, "ours": value, "reference": other,
                     "margin": None if other is None else value - other})
    losses = [r for r in rows if r["margin"] is not None and r["margin"] <= 0]
    missing = [r for r in rows if r["margin"] is None]
    if losses:
        holds, verdict = False, f"no: not above at {_rates(losses)} bpp"
    elif not rows:
        holds, verdict = None, f"not established: no point of ours at or below {max_bpp:g} bpp"
    elif missing:
        lowest = min((p["bpp"] for p in reference), default=None)
        compared = len(rows) - len(missing)
        won = f"above at the {compared} of {len(rows)} rates compared, but " if compared else ""
        holds = None
        verdict = (f"not established: {won}not comparable at {_rates(missing)} bpp, where the reference has no "
                   f"point (its lowest: {_cell(lowest, 4)} bpp)")
    else:
        holds, verdict = True, f"yes: above at all {len(rows)} rates compared up to {max_bpp:g} bpp"
    return {"metric": metric, "max_bpp": max_bpp, "holds": holds, "verdict": verdict, "points": rows}


def _rates(rows: list[dict]) -> str:
    return ", ".join(f"{r['bpp']:.4f}" for r in rows)


def bits_saving_at_equal_psnr(context_curve: list[dict], factorized_curve: list[dict]) -> dict:
    """1 - bpp_context / bpp_factorized at equal PSNR, over the PSNR range both curves cover.

    At the same Δ both models code the same symbols, which decode to the same image, so the two curves' points
    pair up at equal PSNR and the saving is just the ratio of file sizes. It is computed by interpolating bpp
    against PSNR (linear, points sorted by PSNR: curves taken as monotone) at every PSNR level of either curve
    within the common range, so it also holds for curves measured at different steps. min and mean are over
    those levels; None when the curves share no PSNR range."""
    lows = [min(p["psnr"] for p in c) for c in (context_curve, factorized_curve) if c]
    highs = [max(p["psnr"] for p in c) for c in (context_curve, factorized_curve) if c]
    if len(lows) < 2 or max(lows) > min(highs):
        return {"psnr_range": None, "levels": [], "min": None, "mean": None}
    low, high = max(lows), min(highs)
    levels = sorted({p["psnr"] for c in (context_curve, factorized_curve) for p in c if low <= p["psnr"] <= high})
    rows = []
    for level in levels:
        context = interpolate(context_curve, "psnr", "bpp", level)
        factorized = interpolate(factorized_curve, "psnr", "bpp", level)
        rows.append({"psnr": level, "bpp_context": context, "bpp_factorized": factorized,
                     "saving": 1.0 - context / factorized})
    savings = [r["saving"] for r in rows]
    return {"psnr_range": [low, high], "levels": rows, "min": min(savings), "mean": sum(savings) / len(savings)}


def compare_curves(curves: dict[str, list[dict]], kinds: dict[str, str], max_bpp: float = TARGET_BPP) -> dict:
    """Every codec curve against every reference (both metrics) up to max_bpp, and every context model against
    every factorized one. kinds: curve label -> "factorized", "context", "jpeg" or "webp"."""
    codecs = [label for label, kind in kinds.items() if kind not in REFERENCES]
    above = [dict(above_at_every_rate(curves[ours], curves[ref], max_bpp, metric), ours=ours, reference=ref)
             for ours in codecs for ref in REFERENCES if ref in curves for metric in METRICS]
    savings = [dict(bits_saving_at_equal_psnr(curves[c], curves[f]), context=c, factorized=f)
               for c in codecs if kinds[c] == "context" for f in codecs if kinds[f] == "factorized"]
    return {"above_references": above, "context_savings": savings}


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def kl_bits_per_pixel(vae, images: torch.Tensor) -> float:
    """Mean over images of KL(q(z|x) || N(0, I)) in bits (nats / ln 2), summed over the latent, per image pixel.

    What it means: the expected rate of sending a *sample* z ~ q(z|x), the noisy latent the decoder was trained
    on, with an ideal relative-entropy coder (bits-back / channel simulation) that shares the prior N(0, I): the
    rate term of the VAE's ELBO. It is not the rate of our files, which send the quantised posterior *mean*
    under a learned model at a chosen Δ. With LDM's β = 1e-6 the encoder is barely pushed toward the prior (tiny
    posterior variances, means not shaped to N(0, I)), so this number is large. Each image is padded to the
    codec's factor as the coder pads it (edges repeated); the bits are divided by the unpadded pixels."""
    f = downsample_factor(vae)
    bits = []
    for x in images:
        height, width = x.shape[-2:]
        x = pad_to_factor(x[None].to(vae.device, vae.dtype), f)
        posterior = encode_posterior(vae, x)
        nats = kl_divergence(posterior.mean.double(), posterior.logvar.double())[0]
        bits.append(float(nats) / math.log(2) / (height * width))
    if not bits:
        raise ValueError("kl_bits_per_pixel: no images")
    return sum(bits) / len(bits)


def _point(method: str, setting: dict, originals: torch.Tensor, decoded: list[Image.Image], sizes: list[int],
           encode_seconds: list[float], decode_seconds: list[float], **extra) -> dict:
    """The means over images of one (method, setting): bpp of the files, PSNR and MS-SSIM of the decoded images
    (uint8, as a viewer sees them), seconds per image; and each image's bytes."""
    height, width = originals.shape[-2:]
    candidates = torch.stack([pil_to_tensor(img) for img in decoded])
    n = len(sizes)
    return {
        "method": method, **setting,
        "bpp": sum(bits_per_pixel(size, height, width) for size in sizes) / n,
        "psnr": mean_psnr(psnr(originals.float(), candidates)),  # identical images count as 100 dB, not inf
        "ms_ssim": float(ms_ssim(originals.float(), candidates).mean()),
        "encode_seconds": sum(encode_seconds) / n, "decode_seconds": sum(decode_seconds) / n,
        "bytes": sizes, **extra,
    }


def _save(files_dir: Path | None, name: str, data: bytes) -> None:
    if files_dir is not None:
        files_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(files_dir / name, data)


@torch.no_grad()
def codec_point(vae, model: ProbabilityModel, label: str, images: torch.Tensor, step: float, identity: str,
                files_dir: Path | None = None) -> dict:
    """The codec with `model` at step Δ on images (N, 3, H, W) in [-1, 1] (uint8 levels): each image through
    compress_image (the bytes `latent-codec compress` writes) and back through read_compressed + decompress_image.
    With files_dir, the files are kept there as <index>.lcc."""
    factor = downsample_factor(vae)
    sizes, encode_s, decode_s, decoded, model_bits = [], [], [], [], []
    for index, x in enumerate(images):
        image, source = tensor_to_pil(x), f"image {index}"
        tick = time.perf_counter()
        result = compress_image(vae, model, image, identity, source, step=step)
        tock = time.perf_counter()
        header, words = read_compressed(result.data, source, model, identity, factor)
        decoded.append(decompress_image(vae, model, header, words, source))
        done = time.perf_counter()
        _save(files_dir, f"{index}.lcc", result.data)
        sizes.append(len(result.data))
        encode_s.append(tock - tick)
        decode_s.append(done - tock)
        model_bits.append(result.model_bits)
    pixels = images.shape[-2] * images.shape[-1]
    return _point(label, {"step": result.step}, images, decoded, sizes, encode_s, decode_s,
                  model_bpp=sum(model_bits) / len(model_bits) / pixels)


def pillow_point(method: str, images: torch.Tensor, quality: int, files_dir: Path | None = None) -> dict:
    """JPEG or WebP (REFERENCES[method]) at `quality` on the same images, decoded by Pillow; with files_dir, the
    files are kept there as <index>.jpg / .webp."""
    encode = REFERENCES[method]
    sizes, encode_s, decode_s, decoded = [], [], [], []
    for index, x in enumerate(images):
        image = tensor_to_pil(x)
        tick = time.perf_counter()
        data = encode(image, quality)
        tock = time.perf_counter()
        decoded.append(Image.open(io.BytesIO(data)).convert("RGB"))  # convert loads: the whole decode is timed
        done = time.perf_counter()
        _save(files_dir, f"{index}{SUFFIXES[method]}", data)
        sizes.append(len(data))
        encode_s.append(tock - tick)
        decode_s.append(done - tock)
    return _point(method, {"quality": quality}, images, decoded, sizes, encode_s, decode_s)


def sweep(vae, models: dict[str, ProbabilityModel], images: torch.Tensor, steps: list[float],
          jpeg_qualities: list[int], webp_qualities: list[int], identity: str, files_dir: Path | None = None,
          log=print) -> dict:
    """Every curve on the same images, their comparisons and the codec's KL rate: the JSON-ready result.

    Each method first makes one untimed round trip: the first call pays for lazy initialisation (CUDA context,
    cuDNN's algorithm search, allocator growth, libwebp's tables), which is not the method's speed."""
    curves: dict[str, list[dict]] = {}
    kinds = {label: model.kind for label, model in models.items()}
    for label, model in models.items():
        codec_point(vae, model, label, images[:1], steps[0], identity)  # untimed warm-up
        points = []
        for step in steps:
            where = None if files_dir is None else files_dir / label / f"step{step:.6g}"
            points.append(codec_point(vae, model, label, images, step, identity, where))
            log(_point_line(points[-1]))
        curves[label] = sorted(points, key=lambda p: p["bpp"])
    for method, qualities in (("jpeg", jpeg_qualities), ("webp", webp_qualities)):
        pillow_point(method, images[:1], qualities[0])  # untimed warm-up
        points = []
        for quality in qualities:
            where = None if files_dir is None else files_dir / method / f"q{quality}"
            points.append(pillow_point(method, images, quality, where))
            log(_point_line(points[-1]))
        curves[method] = sorted(points, key=lambda p: p["bpp"])
        kinds[method] = method
    height, width = images.shape[-2:]
    return {
        "images": len(images), "resolution": [height, width], "overhead_bytes": OVERHEAD_BYTES,
        "ms_ssim_scales": ms_ssim_scales(min(height, width)), "device": str(vae.device),
        "models": {label: {"path": m.path, "kind": m.kind, "identity": m.identity, "step_range": list(m.step_range)}
                   for label, m in models.items()},
        "kinds": kinds, "curves": curves, "target_bpp": TARGET_BPP, "target_saving": TARGET_SAVING,
        **compare_curves(curves, kinds, TARGET_BPP),
        "kl_bits_per_pixel": kl_bits_per_pixel(vae, images),
        "speed": speed(curves),
    }


def speed(curves: dict[str, list[dict]]) -> dict:
    """Per method, the mean over its points of the encode and decode seconds per image."""
    return {label: {stage: sum(p[stage] for p in points) / len(points)
                    for stage in ("encode_seconds", "decode_seconds")}
            for label, points in curves.items() if points}


def _setting(point: dict) -> str:
    return f"Δ={point['step']:.4g}" if "step" in point else f"q={point['quality']}"


def _point_line(point: dict) -> str:
    return (f"{point['method']} {_setting(point)}: {point['bpp']:.4f} bpp, PSNR {point['psnr']:.2f} dB, "
            f"MS-SSIM {point['ms_ssim']:.4f}")


# ---------------------------------------------------------------------------------------------------------------
# Plot and report
# ---------------------------------------------------------------------------------------------------------------


def plot_rate_distortion(result: dict, out: str | Path, max_bpp: float = 1.0) -> Path:
    """PSNR vs bpp and MS-SSIM vs bpp, one line per method, x from 0 to max_bpp (y fitted to the points shown),
    a dotted line at the target rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, name) in zip(axes, METRICS.items()):
        shown = []
        for label, points in result["curves"].items():
            kind = result["kinds"][label]
            line = "--" if kind in REFERENCES else "-"
            ax.plot([p["bpp"] for p in points], [p[metric] for p in points], line, marker="o", ms=3,
                    label=label if kind in REFERENCES or label == kind else f"{label} ({kind})")
            shown += [p[metric] for p in points if p["bpp"] <= max_bpp]
            edge = interpolate(points, "bpp", metric, max_bpp)  # where a line leaves the plot
            shown += [] if edge is None else [edge]
        ax.axvline(result["target_bpp"], color="gray", lw=0.8, ls=":")
        ax.set_xlim(0, max_bpp)
        if shown:
            pad = 0.05 * (max(shown) - min(shown)) or 0.01 * max(abs(max(shown)), 1.0)
            ax.set_ylim(min(shown) - pad, max(shown) + pad)
        ax.set_xlabel("bits per pixel (whole file, header included)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    height, width = result["resolution"]
    fig.suptitle(f"Rate-distortion on {result['images']} images at {height}x{width}")
    fig.tight_layout()
    return save_figure(fig, out, dpi=120)


def _margin(value: float | None, digits: int, unit: str) -> str:
    return "not comparable" if value is None else f"{value:+.{digits}f}{unit}"


def _points_table(result: dict) -> list[str]:
    rows = ["| method | setting | bpp | PSNR (dB) | MS-SSIM | encode s/image | decode s/image |",
            "|---|---|---|---|---|---|---|"]
    for label, points in result["curves"].items():
        for p in points:
            rows.append(f"| {label} | {_setting(p)} | {p['bpp']:.4f} | {p['psnr']:.2f} | {p['ms_ssim']:.4f} | "
                        f"{p['encode_seconds']:.4f} | {p['decode_seconds']:.4f} |")
    return rows


def _above_section(result: dict) -> list[str]:
    target = result["target_bpp"]
    text = [f"## At or below {target:g} bpp: above JPEG and WebP?", "",
            "Compared at each of our points at or below the target rate and at each reference point within our "
            "range, linear in bpp between points: two such curves ordered at every vertex of both are ordered "
            "everywhere between. *Not comparable*: the reference has no point that low (or that high); such a "
            "rate is not counted as a win.", "",
            "| ours | reference | metric | verdict |", "|---|---|---|---|"]
    text += [f"| {c['ours']} | {c['reference']} | {METRICS[c['metric']]} | {c['verdict']} |"
             for c in result["above_references"]]
    pairs = {(c["ours"], c["reference"]): {} for c in result["above_references"]}
    for c in result["above_references"]:
        pairs[c["ours"], c["reference"]][c["metric"]] = c["points"]  # the same rates for either metric
    for (ours, reference), by_metric in pairs.items():
        psnr_rows, ssim_rows = by_metric.get("psnr", []), by_metric.get("ms_ssim", [])
        if not psnr_rows or len(psnr_rows) != len(ssim_rows):
            continue
        text += ["", f"**{ours} vs {reference}**", "",
                 "| bpp | at a point of | PSNR ours | PSNR reference | margin | MS-SSIM ours | MS-SSIM reference | "
                 "margin |", "|---|---|---|---|---|---|---|---|"]
        text += [f"| {p['bpp']:.4f} | {p['at']} | {p['ours']:.2f} | {_cell(p['reference'], 2)} | "
                 f"{_margin(p['margin'], 2, ' dB')} | {m['ours']:.4f} | {_cell(m['reference'], 4)} | "
                 f"{_margin(m['margin'], 4, '')} |" for p, m in zip(psnr_rows, ssim_rows)]
    return text + [""]


def _saving_section(result: dict) -> list[str]:
    text = ["## Context model vs factorized, at equal PSNR", "",
            "At one step Δ both models code the same symbols, so the decoded images and PSNR are the same and the "
            "saving is the ratio of file sizes; it is read here by interpolating bpp against PSNR over the PSNR "
            f"range both curves cover. Target: a saving of at least {100 * result['target_saving']:.0f}%.", ""]
    if not result["context_savings"]:
        return text + ["No pair of a context and a factorized model was swept.", ""]
    for s in result["context_savings"]:
        if s["min"] is None:
            text += [f"- {s['context']} vs {s['factorized']}: the curves share no PSNR range.", ""]
            continue
        low, high = s["psnr_range"]
        meets = "meets the target at every level" if s["min"] >= result["target_saving"] else "misses the target"
        text.append(f"- {s['context']} vs {s['factorized']}, over {low:.2f}–{high:.2f} dB ({len(s['levels'])} "
                    f"levels): saving min {100 * s['min']:.1f}%, mean {100 * s['mean']:.1f}% ({meets}).")
    return text + [""]


def _kl_section(result: dict) -> list[str]:
    kl = result["kl_bits_per_pixel"]
    codecs = {label: points for label, points in result["curves"].items()
              if result["kinds"][label] not in REFERENCES}
    text = ["## The posterior's KL beside the measured rate", "",
            f"KL(q(z|x) ‖ N(0, I)) of the codec: **{kl:.4f} bpp** (bits summed over the latent, per image pixel, "
            "mean over the images)."]
    measured = [p["bpp"] for points in codecs.values() for p in points]
    if measured:
        finest = {label: min(points, key=lambda p: p["step"]) for label, points in codecs.items()}
        at_finest = ", ".join(f"{label} {p['bpp']:.4f} bpp (Δ={p['step']:.4g}, PSNR {p['psnr']:.2f} dB, KL / file "
                              f"rate = {kl / p['bpp']:.3g})" for label, p in finest.items())
        text[-1] += (f" The files measured here take {min(measured):.4f}–{max(measured):.4f} bpp; at the finest "
                     f"step swept {at_finest}.")
    text += ["",
             "What the KL means: the expected rate of sending a *sample* z ~ q(z|x), the noisy latent the decoder "
             "was trained on, with an ideal relative-entropy coder (bits-back, channel simulation) that shares the "
             "prior N(0, I) with the decoder; it is the rate term of the VAE's ELBO. It is not the rate of these "
             "files, which send the quantised posterior *mean* at a chosen step Δ under a probability model learned "
             "on the latents. The two answer different questions: the KL prices the posterior's own noise level "
             "against a fixed prior, the files price the precision Δ against a learned one. A codec trained with the "
             "LDM's KL weight β = 1e-6 is barely pushed toward the prior (posterior variances far below 1, means not "
             "shaped to N(0, I)), so its KL is large: it counts bits for a precision and a departure from N(0, I) "
             "that the learned model and the step Δ need not pay, and says that N(0, I) is a poor code for its "
             "latents, not how small a file of the mean can be.", ""]
    return text


def _speed_section(result: dict) -> list[str]:
    height, width = result["resolution"]
    text = [f"## Speed per {height}x{width} image", "",
            f"Mean over each method's points of the wall time per image, from the same run (codec on "
            f"`{result['device']}`, after one untimed round trip; JPEG and WebP in Pillow on the CPU, one image at "
            "a time). Encode: PIL image -> file bytes (the VAE encoder, quantisation and range coding included); "
            "decode: file bytes -> PIL image (the VAE decoder included).", "",
            "| method | encode s/image | decode s/image |", "|---|---|---|"]
    text += [f"| {label} | {s['encode_seconds']:.4f} | {s['decode_seconds']:.4f} |"
             for label, s in result["speed"].items()]
    return text + [""]


def report_markdown(result: dict) -> str:
    height, width = result["resolution"]
    models = ", ".join(f"{label}: {m['kind']} model {m['identity']} (`{m['path']}`, fit for Δ "
                       f"{m['step_range'][0]:g}–{m['step_range'][1]:g})" for label, m in result["models"].items())
    overhead = bits_per_pixel(result["overhead_bytes"], height, width)
    text = [
        f"# Rate-distortion: {result.get('codec', 'codec')}", "",
        f"{result['images']} images from `{result.get('data', '?')}`, shorter side resized to {height} and "
        f"centre-cropped {height}x{width}. Rate: each file's bytes x 8 / (H·W), headers included (ours: "
        f"{result['overhead_bytes']} bytes of header and CRC, {overhead:.4f} bpp at this size). PSNR and MS-SSIM "
        f"({result['ms_ssim_scales']} scales) of the decoded uint8 image against the original; means over the "
        f"images. Models: {models}. JPEG: Pillow, optimised Huffman tables, 4:2:0; WebP: Pillow (libwebp), "
        "method 6.", "",
        "![rate-distortion](rd.png)", "",
        *_above_section(result), *_saving_section(result), *_kl_section(result), *_speed_section(result),
        "## Every point", "", *_points_table(result), "",
    ]
    return "\n".join(text)


def write_outputs(result: dict, out_dir: str | Path, max_bpp: float = 1.0) -> dict[str, Path]:
    """rd.json, rd.png and report.md in out_dir, each written atomically. Non-finite numbers are refused, not
    written as JSON's non-standard Infinity/NaN."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("rd.json", "rd.png", "report.md")}
    write_text_atomically(paths["rd.json"], json.dumps(result, indent=2, allow_nan=False) + "\n")
    plot_rate_distortion(result, paths["rd.png"], max_bpp)
    write_text_atomically(paths["report.md"], report_markdown(result))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Several sweeps in one plot
# ---------------------------------------------------------------------------------------------------------------


def load_sweep(spec: str) -> tuple[str, dict]:
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"{spec}: expected LABEL=rd.json")
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable rd.json ({exc})") from None
    if not isinstance(result, dict) or not {"curves", "kinds", "resolution", "images", "data"} <= result.keys():
        raise ValueError(f"{path}: not an rd.json written by `latent-codec analyze rate-distortion`")
    return label, result


def merge_sweeps(sweeps: list[tuple[str, dict]], curves: list[str] | None = None) -> dict:
    """One result whose curves are each sweep's codec curves, labelled "LABEL: curve", and the first sweep's
    reference curves; `curves` keeps only the named curves (codec model names or jpeg / webp).
    Backs `latent-codec analyze plot-rd`."""
    first_label, first = sweeps[0]
    for label, result in sweeps[1:]:
        for key in ("resolution", "images", "data"):
            if result[key] != first[key]:
                raise ValueError(f"{label}: swept {key} {result[key]!r}, but {first_label} swept {first[key]!r}; "
                                 "only sweeps of the same images compare")
    merged = {**first, "curves": {}, "kinds": {}}
    for label, result in sweeps:
        for name, points in result["curves"].items():
            kind = result["kinds"][name]
            if curves is not None and name not in curves:
                continue
            if kind in REFERENCES:
                if label == first_label:
                    merged["curves"][name], merged["kinds"][name] = points, kind
                continue
            merged["curves"][f"{label}: {name}"], merged["kinds"][f"{label}: {name}"] = points, kind
    return merged
