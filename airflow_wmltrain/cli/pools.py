"""``wmltrain pools``: one Airflow pool per Docker host, one slot per GPU.

The logic is :mod:`airflow_wmltrain.service.pools`.

Airflow and Docker are imported only when the command runs, so the command line starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from airflow_wmltrain.cli.arguments import add_command
from airflow_wmltrain.cli.server import add_server_options, api_from_args
from airflow_wmltrain.errors import EXIT_OK


def default_docker_url() -> str:
    """The Docker host of a ``TrainingRunOperator`` task that names none, as a worker here resolves it:
    ``[wmltrain] docker_url``, else ``$DOCKER_HOST``, else the local socket."""
    from airflow_wmltrain.service.pools import DEFAULT_DOCKER_URL
    from airflow_wmltrain.settings import Settings

    return Settings.from_airflow_config().docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL


def register(commands: Any) -> None:
    parser = add_command(commands, "pools", run)
    parser.add_argument(
        "--docker-url",
        action="append",
        metavar="URL",
        help="a Docker host of the training runs (repeat for several; default: $DOCKER_HOST, else "
        "unix://var/run/docker.sock, as TrainingRunOperator)",
    )
    parser.add_argument(
        "--pool",
        metavar="PATTERN",
        help="the pool's name: wmltrain_gpus for one host; with several hosts a pattern with {host} (the "
        "host's name) or {index} (1, 2, ...), default wmltrain_gpus_{host} (wmltrain_gpus_{index} when "
        "two hosts have the same name)",
    )
    parser.add_argument(
        "--image",
        help="an image on the hosts with nvidia-smi, to count their GPUs when [wmltrain] gpu_ids is auto "
        "and a daemon has no wmltrain.gpus label",
    )
    parser.add_argument(
        "--ahead",
        type=int,
        default=0,
        metavar="N",
        help="N slots more than the GPUs: that many GPUs' worth of runs start early, stage their data and "
        "wait in the worker for a GPU, which they get the moment a run ends (keeps the GPUs busy in grids "
        "of short runs or runs with large data; costs a worker slot per waiting run); default 0",
    )
    parser.add_argument(
        "--shared",
        action="store_true",
        help="one pool for all the --docker-url hosts, its slots the sum of their GPUs (plus --ahead): for "
        "GPU hosts whose Celery workers consume one shared queue (docs/deployment.md)",
    )
    parser.add_argument("--dry-run", action="store_true", help="only say what would be created or updated")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_server_options(parser)


def run(args: argparse.Namespace) -> int:
    """Create or update the GPU pools of the Docker hosts.

    Each Docker host gets an Airflow pool with one slot per GPU runs may use there (as the operator
    counts them: [wmltrain] gpu_ids, or for auto the daemon's label wmltrain.gpus or nvidia-smi) and
    include_deferred, so that deferred runs keep their slots; --ahead N adds N slots for runs that stage
    their data while the GPUs are busy and wait in the worker for one. Give a TrainingRunOperator task
    that pool and pool_slots=pool_slots(resource_class) in partial(): the runs then queue in Airflow for
    GPUs.
    An existing pool gets the slots and include_deferred; its description stays.
    """
    from airflow_wmltrain.service.pools import sync_pools
    from airflow_wmltrain.settings import Settings

    api = api_from_args(args)  # missing credentials are refused before anything slow
    settings = Settings.from_airflow_config()
    changes = sync_pools(
        api,
        args.docker_url or [default_docker_url()],
        settings=settings,
        pattern=args.pool,
        image=args.image,
        dry_run=args.dry_run,
        ahead=args.ahead,
        shared=args.shared,
    )
    if not args.json:
        for change in changes:
            print(change.describe())  # names the resource classes too large for the pool
        return EXIT_OK
    print(json.dumps([change.to_dict() for change in changes], indent=2))
    for change in changes:
        if change.too_large:
            print(
                f"note: pool {change.pool} has {change.slots} slots: tasks of resource class(es) "
                f"{', '.join(change.too_large)} never get enough of them there",
                file=sys.stderr,
            )
    return EXIT_OK
