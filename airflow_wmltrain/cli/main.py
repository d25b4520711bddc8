"""``wmltrain``: the command line of airflow-wmltrain (also ``python -m airflow_wmltrain``).

Exit codes (:func:`airflow_wmltrain.errors.exit_status`, the one place that maps errors to them): 0 ok,
1 the run failed, 2 bad input or usage, 3 server or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from airflow_wmltrain import __version__
from airflow_wmltrain.cli import pools, runs, stage, train, validate
from airflow_wmltrain.errors import WmlTrainError, exit_status
from airflow_wmltrain.service.api import ApiError

Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wmltrain",
        description="Deep-learning training runs on GPU Docker hosts, orchestrated by Apache Airflow.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    validate.register(commands)
    stage.register(commands)
    train.register(commands)
    runs.register(commands)
    pools.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (README, "Shell completion")
        import argcomplete

        argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    command: Command = args.handler
    try:
        return command(args)
    except WmlTrainError as err:  # the API's errors are shown without a code: their message says it all
        print(f"error: {err}" if isinstance(err, ApiError) else f"error {err.code}: {err}", file=sys.stderr)
        return exit_status(err)
    except KeyboardInterrupt as err:
        return exit_status(err)


if __name__ == "__main__":
    sys.exit(main())
