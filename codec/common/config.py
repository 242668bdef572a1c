"""The strict YAML loader every config of the toolkit goes through.

YAML holds values only; objects are built in plain Python from typed dataclasses. Unknown or misspelled
keys are an error that names the key, because a typo that silently falls back to a default (say
`kl_weigth: 1e-4`) wastes a whole training run.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that does not match the typed schema."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        # `int | list[int]`: a YAML list takes the list branch, anything else the first one.
        lists = [a for a in non_none if typing.get_origin(a) in (list, tuple)]
        chosen = lists[0] if lists and isinstance(value, (list, tuple)) else non_none[0]
        return _coerce(value, chosen, where)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation in (int, float):
        # PyYAML reads `1e-6` (no dot) as a string; accept any text that is a number of the right kind.
        try:
            number = annotation(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (annotation is int and float(value) != number):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `--set dotted.key=value` to a nested dict; the value is parsed as YAML (`[1,2]`, `1e-4`, `null`)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, for example train.max_steps=100")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(cls: type, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read YAML at `path` (or start from defaults when None), apply `--set` overrides, build `cls`."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


def exit_status(command: Callable[[], int]) -> int:
    """A command's exit status: a ConfigError (in the config, or found later with the data in hand, such as a
    checkpoint of another network) is one line on stderr and status 2, not a traceback."""
    try:
        return command()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def trainer_overrides(sets: list[str], max_steps: int | None) -> list[str]:
    """A trainer command's `--set key=value` list, with `--max-steps N` as the last word on train.max_steps."""
    return [*sets, *([f"train.max_steps={max_steps}"] if max_steps is not None else [])]


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


PRECISIONS = ("auto", "no", "bf16", "fp16")  # auto: bf16 on CUDA, fp32 on CPU (codec.common.distributed)


def check_loop_settings(train) -> None:
    """The checks every trainer's `train:` section shares (precision, per-process batch, accumulation)."""
    check_choice("train.mixed_precision", train.mixed_precision, PRECISIONS)
    if train.batch_size < 1 or train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
    if not train.process_group_timeout_minutes > 0:
        raise ConfigError(f"train.process_group_timeout_minutes must be > 0, got {train.process_group_timeout_minutes}")
