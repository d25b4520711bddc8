"""``wmltrain validate MODEL.zip MANIFEST.yaml``: the offline check a user runs before submitting."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from airflow_wmltrain.cli.arguments import MANIFEST, MODEL_ZIP, add_command
from airflow_wmltrain.errors import EXIT_OK, ManifestError, WmlTrainError, exit_status
from airflow_wmltrain.settings import Settings
from airflow_wmltrain.submission import check_submission


def register(commands: Any) -> None:
    parser = add_command(commands, "validate", run, MODEL_ZIP, MANIFEST)
    add_hyperparameter_option(parser, "-p", "--hyperparameter")
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of text")


def add_hyperparameter_option(parser: argparse.ArgumentParser, *flags: str) -> None:
    """The repeatable ``NAME=VALUE`` option (``flags``, e.g. ``-p``) read by :func:`parse_hyperparameters`."""
    parser.add_argument(
        *flags,
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="override an option of the command (repeatable), e.g. -p learningRate=0.01",
    )


def parse_hyperparameters(pairs: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "debug=true"]`` → ``{"lr": 0.01, "debug": True}`` (values read as YAML scalars)."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ManifestError(
                f"'{pair}' is not NAME=VALUE, e.g. learningRate=0.01", field="--hyperparameter"
            )
        try:
            parsed[name.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed[name.strip()] = value
    return parsed


def run(args: argparse.Namespace) -> int:
    """Check a model-definition zip and a training manifest without submitting anything.

    Check a model-definition zip and a training manifest offline: exit 0 with a summary, or exit 2 with
    the first problem (its code and the field at fault).
    """
    try:
        settings = Settings.from_airflow_config()
        submission = check_submission(
            args.model_definition,
            args.manifest,
            hyperparameters=parse_hyperparameters(args.hyperparameter),
            settings=settings,
        )
    except WmlTrainError as err:
        if not args.json:
            raise
        print(json.dumps({"valid": False, "error": err.to_dict()}, indent=2))
        return exit_status(err)
    summary = submission.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    gpus = summary["gpus"]
    model = summary["model_definition"]
    rows = [
        ("name", summary["name"]),
        (
            "framework",
            f"{summary['framework']['name']} {summary['framework']['version']} -> "
            f"{summary['framework']['image']}",
        ),
        ("resource", f"{summary['resource']} -> {gpus} GPU{'s' if gpus != 1 else ''}"),
        ("command", summary["command"]),
        ("data", summary["data"]["location"]),
        ("results", summary["results"]["location"]),
        (
            "model",
            f"{model['name']}: {model['files']} files, {model['uncompressed_bytes']:,} bytes uncompressed",
        ),
    ]
    print(f"valid: {args.model_definition} + {args.manifest}")
    for label, value in rows:
        print(f"  {label:<10} {value}")
    if any(summary[ref]["credentials"] == "inline" for ref in ("data", "results")):
        print(
            "note: the manifest holds credentials inline; an Airflow connection "
            "(connection: {conn_id: ...}) keeps them out of the manifest",
            file=sys.stderr,
        )
    return EXIT_OK
