"""How a ``wmltrain`` command is added, and the positional arguments the commands share."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple


class Positional(NamedTuple):
    """A positional argument: where argparse puts it, how usage lines show it, and its help."""

    dest: str
    metavar: str
    help: str


MODEL_ZIP = Positional("model_definition", "MODEL.zip", "the zipped training code")
MANIFEST = Positional("manifest", "MANIFEST.yaml", "the training manifest (YAML)")


def add_command(
    commands: Any, name: str, handler: Callable[[argparse.Namespace], int], *positionals: Positional
) -> argparse.ArgumentParser:
    """Add the command ``name``, run by ``handler``, with its positional arguments.

    The handler's docstring is the command's text: its first line (first letter lower-cased, period
    dropped) is the command's line in ``wmltrain --help``; the rest is the description in
    ``wmltrain NAME --help``.
    """
    summary, _, description = (inspect.getdoc(handler) or "").partition("\n")
    summary = summary[:1].lower() + summary[1:].removesuffix(".")
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=description.strip() or None
    )
    for positional in positionals:
        parser.add_argument(positional.dest, metavar=positional.metavar, help=positional.help)
    parser.set_defaults(handler=handler)
    return parser
