"""`latent-codec`: one installed command over the library, a group of verbs per stage of the mission.

Every verb is a module of latent_codec/commands with HELP (one line), DESCRIPTION (the --help text), add_arguments
(its flags) and run(args) -> exit status. The tree below only names them; this file parses, dispatches and is the
one place a user's mistake becomes one line on stderr and exit status 2 (`run_command`).

`accelerate launch -m latent_codec codec train ...` runs the whole tree in every process of a launch, and
`accelerate launch -m latent_codec.commands.codec_train ...` a single verb: both go through `main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from codec.data.images import UnreadableImage
from codec.data.sources import HubUnavailable
from codec.exchange.pipeline import PRECISIONS as PIPELINE_PRECISIONS
from codec.measurement.metrics import InceptionUnavailable

PROG = "latent-codec"

# group -> verb -> module of latent_codec.commands; a group given as a module name is a verb of its own.
TREE: dict[str, dict[str, str] | str] = {
    "codec": {"train": "codec_train", "evaluate": "codec_evaluate", "export": "codec_export"},
    "shards": {"encode": "shards_encode", "verify": "shards_verify", "convert": "shards_convert"},
    "unet": {"train": "unet_train"},
    "generate": "generate",
    "compress": "compress",
    "decompress": "decompress",
    "entropy": {"fit": "entropy_fit"},
    "analyze": {"latents": "analyze_latents", "rate-distortion": "analyze_rd", "plot-rd": "analyze_plot_rd"},
}

GROUP_HELP = {
    "codec": "train, measure and export the image codec (the KL-VAE)",
    "shards": "encode a dataset into a latent store with a frozen codec, check it, migrate old shards",
    "unet": "train the text-conditioned latent U-Net on shards",
    "entropy": "fit the probability model that entropy-codes a codec's latents into files",
    "analyze": "measure latent spaces and rate-distortion, and plot sweeps",
}

# The mistakes a user can make and we can name: missing or unreadable inputs (OSError), bad values, configs, shards,
# checkpoints and files (ValueError: ConfigError, ShardError, BitstreamError ...), images PIL cannot read, a Hub
# dataset that cannot be reached, and an optional measurement whose weights were not given. Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (OSError, ValueError, UnreadableImage, HubUnavailable, InceptionUnavailable)


# The dtype words of --precision, everywhere: the pipeline's table, which maps them to torch dtypes.
PRECISIONS = tuple(PIPELINE_PRECISIONS)


class CommandError(ValueError):
    """A mistake in the command line itself that argparse cannot see (two flags that exclude each other by value)."""


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as the rest of our errors: one line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f"latent_codec.commands.{name}")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def add_verb(subparsers, verb: str, module: ModuleType) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(verb, help=module.HELP, description=module.DESCRIPTION,
                                   formatter_class=_formatter)
    module.add_arguments(parser)
    parser.set_defaults(run=module.run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG, formatter_class=_formatter,
        description="Train a KL-VAE image codec, encode datasets into latent shards, train a text-conditioned\n"
                    "latent U-Net on them, generate, and entropy-code images into files.\n\n"
                    "Flags mean one thing everywhere: --codec a codec folder, --pipeline a pipeline folder,\n"
                    "--entropy-model a probability-model file, --data input images, --shards latent shards,\n"
                    "--out an output folder; --max-steps training steps, --sample-steps sampler steps, --deltas\n"
                    "quantisation steps; --config NAME|PATH and --set KEY=VALUE on every verb that trains, fits\n"
                    "or encodes. Errors are one line on stderr and exit status 2.",
        epilog=f"`{PROG} <group> <verb> --help` explains each verb. Several GPUs or machines:\n"
               f"`accelerate launch -m latent_codec <group> <verb> ...`.")
    groups = parser.add_subparsers(dest="group", metavar="<group>", required=True)
    for group, verbs in TREE.items():
        if isinstance(verbs, str):
            add_verb(groups, group, command_module(verbs))
            continue
        sub = groups.add_parser(group, help=GROUP_HELP[group], description=GROUP_HELP[group],
                                formatter_class=_formatter)
        verb_parsers = sub.add_subparsers(dest="verb", metavar="<verb>", required=True)
        for verb, module in verbs.items():
            add_verb(verb_parsers, verb, command_module(module))
    return parser


def one_line(exc: BaseException) -> str:
    """An error's message on one line: a user reads it in a terminal or a job log, one line per process."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run_command(run, args: argparse.Namespace, prog: str) -> int:
    """The one error wrapper: a user's mistake is one line naming the input and exit status 2."""
    try:
        return run(args)
    except USER_ERRORS as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = " ".join(filter(None, [PROG, args.group, getattr(args, "verb", None)]))
    return run_command(args.run, args, prog)


def main_for(module: ModuleType, argv: Sequence[str] | None = None) -> int:
    """One verb alone (`python -m latent_codec.commands.<name>`), with the same parser and the same errors."""
    name = (module.__spec__.name if module.__spec__ else module.__name__).rsplit(".", 1)[-1]  # -m: __main__
    return main([*verb_words(name), *(sys.argv[1:] if argv is None else argv)])


def verb_words(module_name: str) -> list[str]:
    """The words that name a verb's module on the command line: ['codec', 'train'], or ['generate']."""
    for group, verbs in TREE.items():
        if verbs == module_name:
            return [group]
        if isinstance(verbs, dict):
            for verb, module in verbs.items():
                if module == module_name:
                    return [group, verb]
    raise KeyError(f"{module_name} is not a verb of the tree")


# ---------------------------------------------------------------------------------------------------------------
# Flags more than one verb takes, defined once so they read the same everywhere
# ---------------------------------------------------------------------------------------------------------------


def preset_names(kind: str) -> list[str]:
    """The presets shipped for `kind` (codec, unet, ...): configs/<kind>/*.yaml, installed as latent_codec.configs."""
    from importlib.resources import files

    folder = files("latent_codec.configs") / kind
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def config_path(value: str, kind: str) -> str:
    """--config: a YAML file, or the name of a shipped preset (`tiny`, `small`, `kl-f8` ...)."""
    from importlib.resources import as_file, files
    from pathlib import Path

    if Path(value).is_file() or value.endswith((".yaml", ".yml")) or "/" in value:
        return value  # a path; a missing one is the config loader's one-line error
    names = preset_names(kind)
    if value not in names:
        presets = f"a {kind} preset ({', '.join(names)})" if names else "a preset (there are none for this verb)"
        raise CommandError(f"--config {value}: neither a YAML file nor {presets}")
    with as_file(files("latent_codec.configs") / kind / f"{value}.yaml") as path:
        return str(path)  # installed packages are plain folders, so the path outlives the context


def add_config_flags(parser: argparse.ArgumentParser, kind: str, required: bool, example: str) -> None:
    """--config and --set, as every verb that trains, fits or encodes takes them."""
    names = ", ".join(preset_names(kind))
    parser.add_argument("--config", required=required, metavar="NAME|PATH" if names else "PATH",
                        help=(f"a preset by name ({names}) or a YAML file of the same keys" if names else
                              "a YAML file of the settings below (their names with _ for -)")
                             + ("" if required else "; default: the built-in defaults"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config value, e.g. --set {example} (repeatable; the value is YAML)")


def add_out(parser: argparse.ArgumentParser, what: str, required: bool = True, default: str | None = None) -> None:
    parser.add_argument("--out", required=required, default=default, metavar="DIR",
                        help=f"output folder (created if missing): {what}"
                             + (f" (default {default})" if default else ""))


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """How long a trainer runs and where it continues from: the two trainers' shared flags."""
    parser.add_argument("--max-steps", type=int, help="optimizer steps to train in total (overrides train.max_steps)")
    parser.add_argument("--resume", metavar="latest|DIR", help="`latest` continues from the newest checkpoint in "
                        "--out (or starts fresh when there is none); a checkpoint folder continues from that one. "
                        "An interrupted run resumed gives the same weights as an uninterrupted one")


def resolution(value: str) -> tuple[int, int]:
    """--resolution: N (a square) or WIDTHxHEIGHT, in pixels; returned as (width, height)."""
    parts = value.lower().split("x")
    try:
        width, height = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not N or WIDTHxHEIGHT (e.g. 512 or 768x512)") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: sides must be positive")
    return width, height


def old_script(words: str) -> None:
    """scripts/<old name>.py, kept for one release: the verb `words` names, with the arguments given (new flags)."""
    sys.exit(main([*words.split(), *sys.argv[1:]]))


def settings_with_flags(load, args: argparse.Namespace, kind: str):
    """A verb's typed settings: the defaults, then --config (a preset name or a file), then --set, then the verb's
    own flags, one per field and None when not given, so the last word wins as in the trainers' --max-steps."""
    settings = load(args.config and config_path(args.config, kind), args.set)
    for field in dataclasses.fields(settings):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(settings, field.name, value)
    return settings
