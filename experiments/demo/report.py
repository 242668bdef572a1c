"""The demo's last two stages: generate for the fixed prompts and score adherence; write report.md.

Adherence is measured three ways on the same prompts and the same starting noise: the trained model with its
prompt (classifier-free guidance), the same model with an empty prompt (its unconditional branch: what it
draws when told nothing), and the analytic chance level of a generator that ignores the prompt.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image  # noqa: E402

from codec.common.atomic import save_figure, write_text_atomically  # noqa: E402
from codec.common.logs import read_history  # noqa: E402
from codec.measurement.evaluate import save_png  # noqa: E402
from codec.network.model import compression_ratio, latent_shape  # noqa: E402
from experiments.demo.adherence import ATTRIBUTES, score, summarise  # noqa: E402


def _sheet(rows: list[list[Image.Image]], gap: int = 4) -> Image.Image:
    """Equal-sized images in rows, on white, `gap` pixels apart."""
    w, h = rows[0][0].size
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * (w + gap) - gap, len(rows) * (h + gap) - gap), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet.paste(img, (c * (w + gap), r * (h + gap)))
    return sheet


@torch.no_grad()  # a decorator, not torch.set_grad_enabled(False): that would leak into the caller's process
def generate_and_score(pipeline_dir: Path, gen, out_dir: Path, cvae_dir: Path | None = None) -> dict:
    """One PNG per prompt (conditional row | unconditional row | CVAE prior row) and adherence.json with the
    summaries. The CVAE row decodes z ~ N(0, I) with the prompt as the conditional codec's condition: the article's
    text-to-image without a diffusion model."""
    from codec.data import tensor_to_pil
    from codec.exchange.pipeline import LatentDiffusionPipeline
    from codec.network.conditional import condition_tensor
    from codec.network.model import load_codec, sample_prior

    pipe = LatentDiffusionPipeline.from_pretrained(str(pipeline_dir))
    pipe.use_sampler(gen.sampler)
    cvae = (load_codec(cvae_dir, allow_conditional=True)
            if cvae_dir is not None and (cvae_dir / "config.json").is_file() else None)
    if cvae is not None:
        cvae_size = trained_size(cvae_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    conditional, unconditional, cvae_rows, files = [], [], [], []
    for i, prompt in enumerate(gen.prompts):
        seed = gen.seed + i  # the same noise for both rows: only the text differs
        cond = pipe(prompt, num_images_per_prompt=gen.images_per_prompt, num_inference_steps=gen.steps,
                    guidance_scale=gen.guidance, seed=seed).images
        uncond = pipe("", num_images_per_prompt=gen.images_per_prompt, num_inference_steps=gen.steps,
                      guidance_scale=1.0, seed=seed).images
        conditional += [score(img, prompt) for img in cond]
        unconditional += [score(img, prompt) for img in uncond]
        rows = [cond, uncond]
        if cvae is not None:
            c = condition_tensor(cvae, prompt=prompt, count=gen.images_per_prompt)
            drawn = sample_prior(cvae, gen.images_per_prompt, cvae_size, cvae_size,
                                 torch.Generator().manual_seed(seed), c)
            prior = [tensor_to_pil(x) for x in drawn]  # scored at the size it was trained at, shown at the sheet's
            cvae_rows += [score(img, prompt) for img in prior]
            rows.append([img.resize(cond[0].size, Image.NEAREST) for img in prior])
        name = f"prompt_{i:02d}.png"
        save_png(_sheet(rows), out_dir / name)
        files.append(name)
        print(f"  [{i + 1}/{len(gen.prompts)}] {prompt}: colour right in "
              f"{sum(r['color_ok'] for r in conditional[-gen.images_per_prompt:])}/{gen.images_per_prompt}", flush=True)
    result = {
        "settings": {"steps": gen.steps, "guidance": gen.guidance, "sampler": gen.sampler, "seed": gen.seed,
                     "images_per_prompt": gen.images_per_prompt, "size": list(cond[0].size)},
        "files": files, "conditional": summarise(conditional), "unconditional": summarise(unconditional),
        "rows": conditional,
    }
    if cvae is not None:
        result["cvae_prior"] = summarise(cvae_rows)
        result["cvae"] = str(cvae_dir)
    write_text_atomically(out_dir / "adherence.json", json.dumps(result, indent=2))
    return result


def vae_claims(results: list[dict], cvae_prior: dict | None) -> list[str]:
    """The article's three claims about the VAE, each with the study's measured number and its target: prior samples
    that are pictures (β = 1), a CVAE that draws its prompt, and rate and distortion both falling as β rises (over
    the unconditional runs with a constant β)."""
    unconditional = [r for r in results if r["condition"] == "none" and r["schedule"] == "constant"]
    # One kind of latent per claim: the article's VAE (one vector per image) where the study has one, else the grid.
    kind = "global" if any(r.get("latent") == "global" for r in unconditional) else "grid"
    points = sorted((r for r in unconditional if r.get("latent", "grid") == kind), key=lambda r: r["beta"])
    lines = ["| claim | measured | target | met |", "|---|---|---|---|"]
    elbo = [r for r in points if r["beta"] == 1]
    if elbo:
        share = elbo[0]["prior_one_shape_percent"]
        lines.append(f"| β = 1 VAE ({kind} latent): prior samples show one shape | {share:.0f}% | ≥ 50% | "
                     f"{'yes' if share >= 50 else 'no'} |")
    if cvae_prior is not None:
        percent = [cvae_prior["percent"][a] for a in ATTRIBUTES]
        lines.append("| CVAE prior samples follow the prompts, " + " / ".join(ATTRIBUTES) + " | "
                     + " / ".join(f"{p:.0f}%" for p in percent) + " | ≥ 80% each | "
                     + ("yes" if min(percent) >= 80 else "no") + " |")
    if len(points) >= 2:
        rates, psnrs = [r["rate_bits"] for r in points], [r["psnr_db"] for r in points]
        steps = list(zip(points, points[1:]))
        rate_falls = all(b["rate_bits"] < a["rate_bits"] for a, b in steps)
        psnr_falls = all(b["psnr_db"] < a["psnr_db"] for a, b in steps)
        apart = all(a["psnr_db"] - b["psnr_db"] >= 1 or b["rate_bits"] <= 0.8 * a["rate_bits"] for a, b in steps)
        betas = " / ".join(f"{r['beta']:g}" for r in points)
        lines.append(f"| β {betas}: rate and PSNR both fall, each step ≥ 1 dB or ≥ 20% of the rate apart | "
                     f"rate {' / '.join(f'{v:.0f}' for v in rates)} bits, PSNR "
                     f"{' / '.join(f'{v:.2f}' for v in psnrs)} dB | both fall | "
                     f"{'yes' if rate_falls and psnr_falls and apart else 'no'} |")
    return lines


def trained_size(codec_dir: Path) -> int:
    """The image side a codec export was trained and validated at (its codec_training.json): a conditional VAE's
    prior samples are drawn there, since its decoder has never seen another latent grid."""
    return int(json.loads((codec_dir / "codec_training.json").read_text())["config"]["data"]["val_size"])


def plot_curves(codec_run: Path, unet_run: Path, out: Path) -> Path:
    """Codec: training loss and held-out PSNR against training time; U-Net: denoising loss against step."""
    codec, unet = read_history(codec_run), read_history(unet_run)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    logs = [h for h in codec if "loss" in h]
    axes[0].plot([h["train_seconds"] / 60 for h in logs], [h["loss"] for h in logs])
    axes[0].set(title="codec training loss", xlabel="training minutes", ylabel="loss")
    val = [h for h in codec if "val/psnr" in h]
    axes[1].plot([h["train_seconds"] / 60 for h in val], [h["val/psnr"] for h in val], marker="o")
    axes[1].set(title="codec held-out PSNR", xlabel="training minutes", ylabel="dB")
    unet_logs = [h for h in unet if "loss" in h]
    axes[2].plot([h["step"] for h in unet_logs], [h["loss"] for h in unet_logs])
    axes[2].set(title="U-Net denoising loss", xlabel="step", ylabel="loss", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out, dpi=90)


def shape_table(vae: AutoencoderKL, size: int) -> str:
    """Image vs latent: shape, element count, bytes (uint8 image, fp16 image, fp16 latent)."""
    shape = latent_shape(vae, size, size)
    image, latent = 3 * size * size, math.prod(shape)
    return "\n".join([
        "| | shape | numbers | bytes |",
        "|---|---|---|---|",
        f"| image | 3x{size}x{size} | {image:,} | {image:,} (uint8), {2 * image:,} (fp16) |",
        f"| latent | {'x'.join(map(str, shape))} | {latent:,} | {2 * latent:,} (fp16) |",
        f"| ratio | | **{compression_ratio(vae, size, size):.0f}x** fewer numbers | "
        f"{image / (2 * latent):.0f}x vs the uint8 image |",
    ])


def _demote(markdown: str) -> str:
    """Headings of an embedded document go below the report's own."""
    return "\n".join("###" + line if line.startswith("#") else line for line in markdown.splitlines())


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}%"


def _stage_rows(seconds: dict) -> list[str]:
    rows, total = [], 0.0
    for name, info in seconds.items():
        s = info.get("seconds")
        total += s or 0.0
        note = " (reused from an earlier run)" if info.get("reused") else ""
        rows.append(f"| {name} | {'–' if s is None else f'{s / 60:.1f} min'}{note} |")
    rows.append(f"| **total** | **{total / 60:.1f} min** |")
    return rows


def write_report(cfg, paths, seconds: dict) -> Path:
    root = paths.root
    adherence = json.loads((paths.generated / "adherence.json").read_text())
    vae = AutoencoderKL.from_pretrained(paths.codec)
    plot = plot_curves(paths.codec_run, paths.unet_run, root / "curves.png")
    samples = sorted((paths.codec_run / "samples").glob("step_*.png"))
    cond, uncond = adherence["conditional"], adherence["unconditional"]
    chance = cond["chance_percent"]
    lines = [
        "# Demo report",
        "",
        "Everything below was made by `make demo` on this machine from bundled data only: a codec trained on the "
        "bundled photos and the shapes world, evaluated on two photos it never saw, then a text-conditioned U-Net "
        "trained on the shapes world's latents and asked to draw fixed prompts.",
        "",
        "## Stages",
        "",
        "| stage | time |",
        "|---|---|",
        *_stage_rows(seconds),
        "",
        "## What the codec keeps",
        "",
        shape_table(vae, 512),
        "",
        f"At the demo's U-Net resolution ({cfg.encode.resolution}²) the same codec gives:",
        "",
        shape_table(vae, cfg.encode.resolution),
        "",
        f"## Codec quality on held-out photos ({cfg.evaluate.resolution}², posterior mean)",
        "",
        _demote((paths.evaluation / "summary.md").read_text().strip()),
        "",
        "PSNR (dB, higher is better) measures pixel error; SSIM (0–1) structural similarity; LPIPS (lower is better) "
        "a learned perceptual distance, shown only when its AlexNet weights are on this machine. The thumbnail line "
        "keeps a box-downsampled image of about the latent's size; the JPEG lines get the latent's byte budget.",
        "",
        f"![worst reconstructions]({(paths.evaluation / 'worst.png').relative_to(root)})",
        "",
    ]
    if samples:
        lines += ["Training samples at the last step (input | reconstruction | codec prior samples | interpolation):",
                  "",
                  f"![codec samples]({samples[-1].relative_to(root)})", ""]
    lines += [
        "## Prompt adherence",
        "",
        f"{cond['n']} images ({adherence['settings']['images_per_prompt']} per prompt, "
        f"{adherence['settings']['steps']} {adherence['settings']['sampler']} steps, "
        f"guidance {adherence['settings']['guidance']}), each checked against its prompt by pixel analysis "
        "(experiments/demo/adherence.py): the object's colour by its pixels' nearest palette colour, its position by "
        "its centroid's third of the image, its shape by its fill of the bounding box, the background by the "
        "border's colour.",
        "",
        "| | " + " | ".join(ATTRIBUTES) + " |",
        "|---|" + "---|" * len(ATTRIBUTES),
        "| trained model, with the prompt | " + " | ".join(_pct(cond["percent"][a]) for a in ATTRIBUTES) + " |",
        "| same model, empty prompt (unconditional) | "
        + " | ".join(_pct(uncond["percent"][a]) for a in ATTRIBUTES) + " |",
        *(["| CVAE prior samples, z ~ N(0, I) decoded with the prompt | "
           + " | ".join(_pct(adherence["cvae_prior"]["percent"][a]) for a in ATTRIBUTES) + " |"]
          if "cvae_prior" in adherence else []),
        "| chance (prompt ignored) | " + " | ".join(_pct(chance[a]) for a in ATTRIBUTES) + " |",
        "",
        "Per prompt (trained model):",
        "",
        "| prompt | " + " | ".join(ATTRIBUTES) + " |",
        "|---|" + "---|" * len(ATTRIBUTES),
        *[f"| {p['prompt']} | " + " | ".join(_pct(p[a]) for a in ATTRIBUTES) + " |" for p in cond["prompts"]],
        "",
        "Each sheet: the model with the prompt (top row), with an empty prompt from the same noise (middle row), and "
        "the conditional VAE's prior samples for the prompt (bottom row, when the VAE study made one).",
        "",
    ]
    for prompt, name in zip(cfg.generate.prompts, adherence["files"]):
        lines += [f"**{prompt}**", "", f"![{prompt}](generated/{name})", ""]
    study = paths.vae_study / "report.md"
    if study.is_file():
        results = json.loads((paths.vae_study / "results.json").read_text())["runs"]
        lines += ["## The VAE itself: β and a conditional VAE", "",
                  "Codecs trained for one budget at several β with the exact likelihood (β = 1 is the ELBO), and a "
                  "conditional VAE; measured on held-out shapes (experiments/demo/beta_study.py).", "",
                  *vae_claims(results, adherence.get("cvae_prior")), "",
                  _demote(study.read_text().strip().replace("](", f"]({paths.vae_study.relative_to(root)}/")), ""]
    lines += ["## Training curves", "", f"![curves]({plot.relative_to(root)})", ""]
    report = root / "report.md"
    write_text_atomically(report, "\n".join(lines))
    return report
