"""Checkpoints shared by the codec and U-Net trainers: accelerate's save_state written atomically, resume,
and EMA weights kept as safetensors and swapped in for validation and export."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from codec.common.atomic import folder_temp_name, replace_folder
from codec.common.config import ConfigError


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def read_trainer_state(checkpoint: Path | None) -> dict:
    """What save_checkpoint recorded beside accelerate's state: at least `step`."""
    if checkpoint is None:
        return {"step": 0}
    return json.loads((checkpoint / "trainer_state.json").read_text())


def _resolve_here(output_dir: Path, resume: str | None, model: dict | None) -> tuple[Path | None, int]:
    """resolve_resume as this process's own filesystem answers it."""
    if not resume:
        return None, 0
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            return None, 0
        path = found[-1]
    else:
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (trainer_state.json missing)")
    state = read_trainer_state(path)
    recorded = state.get("model")
    if model is not None and recorded is None:
        logging.getLogger(__name__).warning(
            "%s records no network settings (written before checkpoints kept them): it is resumed unchecked, so it "
            "must come from the same model section of the config", path)
    if model is not None and recorded is not None and recorded != model:
        differences = "; ".join(f"{key}: {recorded.get(key)!r} in the checkpoint, {model.get(key)!r} now"
                                for key in sorted(set(recorded) | set(model)) if recorded.get(key) != model.get(key))
        raise ConfigError(
            f"--resume {resume}: {path} was written by a different network ({differences}). Resume with the "
            f"checkpoint's values, or train the new network in another output directory"
        )
    return path, state["step"]


def resolve_resume(output_dir: Path, resume: str | None, model: dict | None = None,
                   accelerator: Accelerator | None = None) -> tuple[Path | None, int]:
    """`latest` -> newest complete checkpoint under output_dir (none yet: start fresh); a path -> that one.

    `model` is the architecture section of the config, as save_checkpoint recorded it: a checkpoint written with
    different values is refused. Some changes keep every parameter's shape (the U-Net's head count, say), so
    loading would succeed and silently continue a different network.

    Each process resolves from its own filesystem; with `accelerator` the processes then compare what they found
    and all refuse together (see same_resume_on_every_rank)."""
    several = accelerator is not None and accelerator.num_processes > 1
    error = None
    try:
        path, step = _resolve_here(output_dir, resume, model)
    except (ConfigError, FileNotFoundError) as exc:
        if not several:
            raise
        path, step, error = None, 0, exc
    if several:
        same_resume_on_every_rank(accelerator, resume, path, step, error)
    return path, step


def _describe(found: dict) -> str:
    if found["error"] is not None:
        return f"error ({found['error']})"
    return "no checkpoint (fresh start)" if found["name"] is None else f"{found['name']} (step {found['step']})"


def resume_disagreement(resume: str | None, found: list[dict]) -> str | None:
    """The refusal for what each rank resolved (`found[rank]`: name, step, error), or None when they agree.

    Decided from the gathered list, which every rank holds identically, so every rank takes the same decision."""
    if all(f == found[0] for f in found):
        return None
    ranks = ", ".join(f"rank {rank}: {_describe(f)}" for rank, f in enumerate(found))
    return (f"--resume {resume}: the processes resolved different checkpoints ({ranks}). Resume needs a shared "
            f"filesystem: every node must see the same train.output_dir (or the same --resume path)")


def same_resume_on_every_rank(accelerator: Accelerator, resume: str | None, path: Path | None, step: int,
                              error: Exception | None = None) -> None:
    """Raise on every rank unless all ranks resolved the same checkpoint.

    On several machines without a shared filesystem `latest` is each node's own newest folder (or none): ranks
    would load different steps, run different numbers of steps, and one would wait in an all-reduce for good. A
    rank whose own resolution failed takes part too, so the others do not wait for it until the timeout."""
    mine = {"name": None if path is None else path.name, "step": step,
            "error": None if error is None else f"{type(error).__name__}: {error}"}
    found = gather_object([mine])
    refusal = resume_disagreement(resume, found)
    if refusal is not None:
        raise ConfigError(refusal) from error
    if error is not None:  # every rank failed alike: each raises its own, unchanged
        raise error


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int,
                    extra: dict | None = None) -> None:
    """save_state into a temporary folder, renamed when complete: a kill mid-save never leaves a checkpoint
    that `--resume latest` would pick up half-written."""
    root = output_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = folder_temp_name(final)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({**(extra or {}), "step": step}))
        replace_folder(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


EMA_FILE = "ema.safetensors"


def keep_ema_in_checkpoints(accelerator: Accelerator, ema: EMAModel, model: torch.nn.Module) -> None:
    """Save the EMA weights into every checkpoint as safetensors, and restore them on resume.

    Through accelerate's save/load hooks rather than register_for_checkpointing, whose loader unpickles the
    object (torch.load with weights_only=False): checkpoints load weights from safetensors only."""
    names = [name for name, _ in model.named_parameters()]

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            tensors = {name: p.detach().cpu().contiguous() for name, p in zip(names, ema.shadow_params)}
            save_file(tensors, str(Path(output_dir) / EMA_FILE),
                      metadata={"optimization_step": str(ema.optimization_step)})

    def load(models, input_dir):
        path = Path(input_dir) / EMA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {input_dir} has no {EMA_FILE} although train.ema_decay is set; resume "
                                    f"with the ema_decay the run was started with (null if it had no EMA)")
        with safe_open(str(path), framework="pt") as handle:
            step = int(handle.metadata()["optimization_step"])
        tensors = load_file(str(path))
        with torch.no_grad():
            for name, shadow in zip(names, ema.shadow_params):
                shadow.copy_(tensors[name])
        ema.optimization_step = step

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


@contextmanager
def ema_weights(ema: EMAModel | None, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` in eval mode holding the EMA weights (when kept), restored to its training weights and mode after.
    Validation measures the weights that will be exported, and training continues from its own."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    try:
        yield model
    finally:
        model.train()
        if ema is not None:
            ema.restore(model.parameters())
