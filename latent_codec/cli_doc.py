"""docs/cli.md, written from the parser itself: `python -m latent_codec.cli_doc > docs/cli.md`.

tests/test_cli.py fails when the file and the parser disagree, so the page is never stale.
"""

from __future__ import annotations

import argparse
import sys

from latent_codec.cli import PROG, TREE, build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its sub-commands here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    """'codec train' -> its parser, for every verb of the tree, in the tree's order."""
    groups = _subparsers(build_parser())
    found = {}
    for group, verbs in TREE.items():
        if isinstance(verbs, str):
            found[group] = groups[group]
        else:
            sub = _subparsers(groups[group])
            found.update({f"{group} {verb}": sub[verb] for verb in verbs})
    return found


def markdown() -> str:
    parts = [f"# `{PROG}`: every command and flag",
             "",
             "Written by `python -m latent_codec.cli_doc > docs/cli.md` from the parser itself; a test fails when "
             "this page and the command disagree.",
             "",
             "```", build_parser().format_help().rstrip(), "```"]
    for words, parser in verb_parsers().items():
        parts += ["", f"## `{PROG} {words}`", "", "```", parser.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
