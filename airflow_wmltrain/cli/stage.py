"""``wmltrain stage MANIFEST.yaml DEST_DIR``: stage a manifest's training data, exactly as a run does.

For users who want to check data access (and see the transfer rate) before submitting; it uses the
same code, settings and cache as the operator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from airflow_wmltrain.cli.arguments import MANIFEST, Positional, add_command
from airflow_wmltrain.cli.output import log_to_stderr
from airflow_wmltrain.errors import EXIT_OK
from airflow_wmltrain.manifest import load_manifest
from airflow_wmltrain.settings import Settings, local_config_lookup
from airflow_wmltrain.storage import open_store
from airflow_wmltrain.storage.cache import ObjectCache
from airflow_wmltrain.storage.staging import stage

DEST_DIR = Positional("dest", "DEST_DIR", "the directory to fill (created if missing)")
#: Loggers whose INFO lines are noise beside staging's own (the amazon provider says, for every store,
#: where an aws connection's credentials came from): the ``[logging] namespace_levels`` this command
#: uses when the machine sets none, as the shipped deployments do (README, "Configuration").
QUIET_NAMESPACES = "airflow.providers.amazon.aws.utils.connection_wrapper=warning"


def register(commands: Any) -> None:
    parser = add_command(commands, "stage", run, MANIFEST, DEST_DIR)
    parser.add_argument("--workers", type=int, help="concurrent transfers ([wmltrain] transfer_workers)")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--cache-dir", help="the staging cache (default: <[wmltrain] staging_dir>/cache)")
    cache.add_argument("--no-cache", action="store_true", help="fetch straight into DEST_DIR")
    parser.add_argument(
        "--verify", choices=("md5", "size"), help="what is checked of each object ([wmltrain] verify)"
    )
    parser.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    """Copy the manifest's training data into a directory, as a training run does.

    Stage every object of the manifest's data bucket (or prefix) into DEST_DIR through the host's
    staging cache, with progress on stderr and a summary line on stdout.
    """
    if local_config_lookup("logging")("namespace_levels", None) is None:
        os.environ["AIRFLOW__LOGGING__NAMESPACE_LEVELS"] = QUIET_NAMESPACES  # read as Airflow is imported
    settings = Settings.from_airflow_config()  # imports Airflow, which may set up logging to stdout
    manifest = load_manifest(args.manifest, settings=settings)
    log = log_to_stderr("airflow_wmltrain.stage")
    cache = None
    if not args.no_cache:
        cache = ObjectCache(
            args.cache_dir or settings.cache_dir,
            max_bytes=settings.cache_max_bytes,
            fetch_slots=settings.transfer_workers,
        )
    with open_store(manifest.data) as store:
        result = stage(
            store,
            args.dest,
            prefix=manifest.data.prefix,
            cache=cache,
            workers=args.workers or settings.transfer_workers,
            log=log,
            progress_interval=args.progress_interval,
            range_size=settings.part_size,
            verify=args.verify or settings.verify,
        )
    print(json.dumps(dataclasses.asdict(result)) if args.json else result.summary())
    return EXIT_OK
