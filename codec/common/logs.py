"""A run's human-readable and machine-readable records: console + train.log, history.jsonl, tracker hparams."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

import torch

from codec.common.atomic import write_text_atomically


def start_run_logging(log: logging.Logger, main: bool, output_dir: Path) -> logging.Handler | None:
    """INFO to stdout and <output_dir>/train.log on the main process, warnings only on the others. Returns the
    file handler for stop_run_logging, so a second run in the same process does not write into this run's log."""
    log.setLevel(logging.INFO if main else logging.WARNING)
    if not log.handlers:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
    if not main:
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def stop_run_logging(log: logging.Logger, handler: logging.Handler | None) -> None:
    if handler is not None:
        log.removeHandler(handler)
        handler.close()


def append_history(output_dir: Path, record: dict) -> None:
    """One JSON line per log or validation event (loss curves and PSNR-vs-time plots are drawn from it)."""
    with open(output_dir / "history.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def read_history(output_dir: Path) -> list[dict]:
    """The records append_history wrote, oldest first; empty when the run logged nothing yet."""
    path = Path(output_dir) / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def truncate_history(output_dir: Path, step: int) -> None:
    """Drop the records after `step`: a run resumed from its checkpoint at `step` makes those steps again and logs
    them anew (a run stopped after logging past its last checkpoint would otherwise log them twice)."""
    path = Path(output_dir) / "history.jsonl"
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomically(path, "".join(line + "\n" for line in kept))


class IntervalMeans:
    """Each logged loss as its mean over every micro-batch since the last log, on every process.

    A log of the last batch alone keeps one batch in log_every, with all of its noise, and of several processes
    only one's (measured on the β study's β = 1 run, steps 16,000-20,000: the logged curve's standard deviation 362
    nats so, 223 as means of 25). The sums stay on the device (no synchronisation per step); `means` averages them
    over the processes, so it must be called on every process at the same step, as the log step is."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """One micro-batch's values (the same keys at every call)."""
        for key, value in values.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
        self._count += 1

    def means(self, reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The means since the last call (or since the run started or resumed), averaged over processes with
        reduce_mean (accelerator.reduce(..., reduction="mean")); the sums start again."""
        if not self._count:
            raise RuntimeError("IntervalMeans.means: nothing was added since the last log")
        keys = list(self._sums)
        averaged = reduce_mean(torch.stack([self._sums[key] for key in keys]) / self._count)
        self._sums, self._count = {}, 0
        return dict(zip(keys, averaged.tolist()))


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """A nested config as the flat {dotted.key: scalar} mapping tensorboard's hparams accept."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
