"""The Markdown report (docs/benchmark.md) of one benchmark run's results dict, as run.py measures it or as
--json saved it. The text is report_template.md; this module only picks and derives the values it shows."""

from __future__ import annotations

import re
import string
from functools import cache
from pathlib import Path

from experiments.benchmark.common import MEMORY_SIDE, SIDE

TEMPLATE = Path(__file__).with_name("report_template.md")
CODEC_LABELS = {"tiny": "tiny preset", "small": "small preset", "kl-f8": "kl-f8 preset (= SD's AutoencoderKL)",
                "taesd": "TAESD shape (AutoencoderTiny())"}
# How the template's pieces join: paragraphs and tables are a blank line apart, list items and rows a line.
PARAGRAPH, LINE = "\n\n", "\n"


class _Formatter(string.Formatter):
    """str.format, except that None (a row not measured, such as kl-f8's decode in --quick) shows as "–"."""

    def format_field(self, value, format_spec: str) -> str:
        return "–" if value is None else super().format_field(value, format_spec)


_FORMATTER = _Formatter()


@cache
def template_blocks(path: Path = TEMPLATE) -> dict[str, str]:
    """The template's blocks by name: the text after each `<!-- name -->` line up to the next one."""
    parts = re.split(r"^<!-- ([a-z_0-9]+) -->$", path.read_text(), flags=re.MULTILINE)
    return {name: text.strip("\n") for name, text in zip(parts[1::2], parts[2::2])}


def fill(block: str, /, **values) -> str:
    """The template's `block` with `values` in its placeholders."""
    return _FORMATTER.vformat(template_blocks()[block], (), values)


def fill_rows(block: str, items) -> str:
    """One `block` (a table row) per item, a line each."""
    return LINE.join(fill(block, **item) for item in items)


def markdown(results: dict) -> str:
    """The whole report: the template's `report` block filled from `results`."""
    values = {"side": SIDE, "memory_side": MEMORY_SIDE, "repeats": results["repeats"], "date": results["date"],
              **_environment(results), **_codecs(results), **_memory(results), **_shards(results),
              **_training(results), **_heads(results), **_diffusion(results), **_scale(results)}
    return fill("report", **values) + LINE


def _environment(results: dict) -> dict:
    env = results["environment"]
    return {"quick_flag": " --quick" if results["quick"] else "", "env": env, "matmul": results["matmul"],
            "cpu_capability": env.get("cpu_capability"),
            "bf16_flags": ", ".join(env.get("cpu_bf16_flags") or []) or "none"}


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _codecs(results: dict) -> dict:
    codecs = [{**r, "label": CODEC_LABELS[r["codec"]], "encode_percent": _percent(r["encode_fraction_of_peak"]),
               "decode_percent": _percent(r["decode_fraction_of_peak"])} for r in results["codecs"]]
    notes = [fill("codec_note", **r) for r in results["codecs"] if r.get("decode_note")]
    by_name = {r["codec"]: r for r in results["codecs"]}
    small, kl_f8 = by_name["small"], by_name["kl-f8"]
    kl_f8_target = (fill("kl_f8_target", speedup=kl_f8["decode_s"] / small["decode_s"]) + LINE
                    if kl_f8["decode_s"] else "")
    return {"codec_rows": fill_rows("codec_row", codecs), "codec_notes": PARAGRAPH + LINE.join(notes) if notes else "",
            "kl_f8_target": kl_f8_target, "h2h": results["head_to_head"],
            "small_decode_percent": _percent(small["decode_fraction_of_peak"])}


def _memory(results: dict) -> dict:
    opts = results.get("inference_options")
    return {"memory_rows": fill_rows("memory_row", results["memory"]),
            "memory_quick_note": PARAGRAPH + fill("memory_quick_note") if results["quick"] else "",
            "inference_options": PARAGRAPH + _inference_options(opts) if opts else ""}


def _inference_options(opts: dict) -> str:
    table = [{"part": part, **r} for part, part_rows in opts["parts"].items() for r in part_rows]
    compiled = opts.get("compile_first_call_s")
    return fill("inference_options", side=SIDE, repeats=opts["repeats"], rows=fill_rows("inference_row", table),
                compile_note=PARAGRAPH + fill("compile_note", **compiled) if compiled else "")


def key_value_table(result: dict) -> str:
    """Every field of `result`, floats to 4 significant digits."""
    shown = [{"key": key, "value": f"{value:.4g}" if isinstance(value, float) else str(value)}
             for key, value in result.items()]
    return fill("key_value_table", rows=fill_rows("key_value_row", shown))


def _shards(results: dict) -> dict:
    shard = results["shard_encoding"]
    return {"shard": shard, "shard_fixed_seconds": shard["setup_seconds"] + shard["finalize_seconds"],
            "shard_table": key_value_table(shard)}


def _training(results: dict) -> dict:
    table = []
    for r in results["training"]:
        step_s = 1 / r["shards_images_per_s"]
        table.append({**r, "codec_parameters_m": r["codec_parameters"] / 1e6,
                      "unet_parameters_m": r["unet_parameters"] / 1e6, "step_s": step_s,
                      "encoder_s": 1 / r["on_the_fly_images_per_s"] - step_s})
    verdicts = [fill("training_verdict", codec=r["codec"], encoder_steps=r["speedup"] - 1, speedup=r["speedup"],
                     verdict="meets" if r["meets_target"] else "under") for r in results["training"]]
    return {"training_rows": fill_rows("training_row", table), "training_verdicts": "; ".join(verdicts)}


def _heads(results: dict) -> dict:
    return {"heads_rows": fill_rows("heads_row",
                                    ({**r, "parameters_m": r["parameters"] / 1e6} for r in results["heads"]))}


def _diffusion(results: dict) -> dict:
    diffusion = results["diffusion"]
    measured = diffusion.get("status") == "measured"
    return {"diffusion": key_value_table(diffusion) if measured else diffusion["status"]}


def _scale(results: dict) -> dict:
    """The at-scale section, where the run measured it (runs saved before it existed have none)."""
    scale = results.get("scale")
    command = "python -m experiments.benchmark" + (" --quick" if results["quick"] else "")
    return {"scale": PARAGRAPH + scale_section(scale, command) if scale else ""}


def _verdict(met: bool) -> str:
    return "meets the target" if met else "misses the target"


def scale_section(scale: dict, command: str) -> str:
    """The at-scale section (experiments.benchmark.scale) of a results dict: in the whole report, or alone as
    `python -m experiments.benchmark.scale` writes it."""
    verdicts = [fill("scale_startup_verdict", **s, startup_verdict=_verdict(s["startup_met"]),
                     memory_verdict=_verdict(s["memory_met"]), spread_verdict=_verdict(s["spread_met"]),
                     spread_target=scale["targets"]["memory_spread_mb"]) for s in scale["startup_summary"]]
    wait = scale["wait"]
    worst = max(max(r["wait_percent_in_loop"], r["wait_percent_epoch"]) for r in wait)
    wait_verdict = (f"The largest wait is {worst:.2f}% of the step: "
                    f"{_verdict(all(r['met'] for r in wait))} (<= {scale['targets']['wait_percent']:.0f}%).")
    gpu = scale["gpu"]
    if gpu.get("status") == "measured":
        gpu_text = fill("scale_gpu", **gpu, verdict=_verdict(gpu["met"]))
    else:
        gpu_text = gpu["status"] + "."
    return fill("scale", **{
        **scale, "command": command, "startup_shape": "x".join(map(str, scale["startup_latent_shape"])),
        "read_shape": "x".join(map(str, scale["read_store"]["latent_shape"])),
        "startup_rows": fill_rows("scale_startup_row", scale["startup"]), "startup_verdicts": LINE.join(verdicts),
        "read_rows": fill_rows("scale_read_row", scale["reads"]["rows"]),
        "wait_rows": fill_rows("scale_wait_row", wait), "wait_steps": wait[0]["steps"],
        "wait_batch": wait[0]["batch_size"], "wait_workers": wait[0]["num_workers"], "wait_verdict": wait_verdict,
        "gpu": gpu_text})
