"""The demo's last two stages: generate for the fixed prompts and score adherence; write report.md.

Adherence is measured three ways on the same prompts and the same starting noise: the trained model with its
prompt (classifier-free guidance), the same model with an empty prompt (its unconditional branch: what it
draws when told nothing), and the analytic chance level of a generator that ignores the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from diffusion.adherence import score, summarise  # noqa: E402

ATTRIBUTES = ("color", "position", "shape", "background")


def _row_grid(images: list[Image.Image], gap: int = 4) -> Image.Image:
    w, h = images[0].size
    grid = Image.new("RGB", (len(images) * w + (len(images) - 1) * gap, h), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img, (i * (w + gap), 0))
    return grid


@torch.no_grad()  # a decorator, not torch.set_grad_enabled(False): that would leak into the caller's process
def generate_and_score(pipeline_dir: Path, gen, out_dir: Path) -> dict:
    """One PNG per prompt (conditional row | unconditional row) and adherence.json with both summaries."""
    from diffusion.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(str(pipeline_dir))
    pipe.use_sampler(gen.sampler)
    out_dir.mkdir(parents=True, exist_ok=True)
    conditional, unconditional, files = [], [], []
    for i, prompt in enumerate(gen.prompts):
        seed = gen.seed + i  # the same noise for both rows: only the text differs
        cond = pipe(prompt, num_images_per_prompt=gen.images_per_prompt, num_inference_steps=gen.steps,
                    guidance_scale=gen.guidance, seed=seed).images
        uncond = pipe("", num_images_per_prompt=gen.images_per_prompt, num_inference_steps=gen.steps,
                      guidance_scale=1.0, seed=seed).images
        conditional += [score(img, prompt) for img in cond]
        unconditional += [score(img, prompt) for img in uncond]
        top, bottom = _row_grid(cond), _row_grid(uncond)
        sheet = Image.new("RGB", (top.width, top.height * 2 + 4), (255, 255, 255))
        sheet.paste(top, (0, 0))
        sheet.paste(bottom, (0, top.height + 4))
        name = f"prompt_{i:02d}.png"
        sheet.save(out_dir / name)
        files.append(name)
        print(f"  [{i + 1}/{len(gen.prompts)}] {prompt}: colour right in "
              f"{sum(r['color_ok'] for r in conditional[-gen.images_per_prompt:])}/{gen.images_per_prompt}", flush=True)
    result = {
        "settings": {"steps": gen.steps, "guidance": gen.guidance, "sampler": gen.sampler, "seed": gen.seed,
                     "images_per_prompt": gen.images_per_prompt, "size": list(cond[0].size)},
        "files": files, "conditional": summarise(conditional), "unconditional": summarise(unconditional),
        "rows": conditional,
    }
    tmp = out_dir / "adherence.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out_dir / "adherence.json")
    return result


def _history(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def plot_curves(codec_history: Path, unet_history: Path, out: Path) -> Path:
    """Codec: training loss and held-out PSNR against training time; U-Net: denoising loss against step."""
    codec, unet = _history(codec_history), _history(unet_history)
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
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def shape_table(vae_config: dict, size: int) -> str:
    """Image vs latent: shape, element count, bytes (uint8 image, fp16 image, fp16 latent)."""
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    channels = vae_config["latent_channels"]
    image, latent = 3 * size * size, channels * (size // factor) ** 2
    return "\n".join([
        "| | shape | numbers | bytes |",
        "|---|---|---|---|",
        f"| image | 3x{size}x{size} | {image:,} | {image:,} (uint8), {2 * image:,} (fp16) |",
        f"| latent | {channels}x{size // factor}x{size // factor} | {latent:,} | {2 * latent:,} (fp16) |",
        f"| ratio | | **{image / latent:.0f}x** fewer numbers | {image / (2 * latent):.0f}x vs the uint8 image |",
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
    evaluation = json.loads((paths.evaluation / "summary.json").read_text())
    adherence = json.loads((paths.generated / "adherence.json").read_text())
    vae_config = json.loads((paths.codec / "config.json").read_text())
    plot = plot_curves(paths.codec_run / "history.jsonl", paths.unet_run / "history.jsonl", root / "curves.png")
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
        shape_table(vae_config, 512),
        "",
        f"At the demo's U-Net resolution ({cfg.encode.resolution}²) the same codec gives:",
        "",
        shape_table(vae_config, cfg.encode.resolution),
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
        lines += ["Training samples at the last step (input | reconstruction | codec prior samples | interpolation):", "",
                  f"![codec samples]({samples[-1].relative_to(root)})", ""]
    lines += [
        "## Prompt adherence",
        "",
        f"{cond['n']} images ({adherence['settings']['images_per_prompt']} per prompt, {adherence['settings']['steps']} "
        f"{adherence['settings']['sampler']} steps, guidance {adherence['settings']['guidance']}), each checked against "
        "its prompt by pixel analysis (diffusion/adherence.py): the object's colour by its pixels' nearest palette "
        "colour, its position by its centroid's third of the image, its shape by its fill of the bounding box, the "
        "background by the border's colour.",
        "",
        "| | " + " | ".join(ATTRIBUTES) + " |",
        "|---|" + "---|" * len(ATTRIBUTES),
        "| trained model, with the prompt | " + " | ".join(_pct(cond["percent"][a]) for a in ATTRIBUTES) + " |",
        "| same model, empty prompt (unconditional) | " + " | ".join(_pct(uncond["percent"][a]) for a in ATTRIBUTES) + " |",
        "| chance (prompt ignored) | " + " | ".join(_pct(chance[a]) for a in ATTRIBUTES) + " |",
        "",
        "Per prompt (trained model):",
        "",
        "| prompt | " + " | ".join(ATTRIBUTES) + " |",
        "|---|" + "---|" * len(ATTRIBUTES),
        *[f"| {p['prompt']} | " + " | ".join(_pct(p[a]) for a in ATTRIBUTES) + " |" for p in cond["prompts"]],
        "",
        "Each sheet: the model with the prompt (top row) and with an empty prompt from the same noise (bottom row).",
        "",
    ]
    for prompt, name in zip(cfg.generate.prompts, adherence["files"]):
        lines += [f"**{prompt}**", "", f"![{prompt}](generated/{name})", ""]
    lines += ["## Training curves", "", f"![curves]({plot.relative_to(root)})", ""]
    report = root / "report.md"
    tmp = root / "report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(report)
    return report
