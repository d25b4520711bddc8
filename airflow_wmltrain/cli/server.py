"""How ``wmltrain`` reaches Airflow: the API server's URL and credentials, from flags, environment or a file.

Precedence: ``--api-url``/``--user``/``--password``, then ``WMLTRAIN_API_URL``/``WMLTRAIN_USER``/
``WMLTRAIN_PASSWORD``, then the YAML config file (``--config``, ``$WMLTRAIN_CONFIG``, or
``~/.config/wmltrain/config.yaml``) with keys ``api_url``, ``user``, ``password``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from airflow_wmltrain.errors import ConfigurationError
from airflow_wmltrain.service.api import DEFAULT_TIMEOUT, AirflowApi
from airflow_wmltrain.service.runs import DEFAULT_MAX_OUTAGE, WaitOptions

DEFAULT_URL = "http://localhost:8080"
DEFAULT_CONFIG = Path("~/.config/wmltrain/config.yaml")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Airflow API server")
    group.add_argument("--api-url", help=f"the API server's URL (WMLTRAIN_API_URL; default {DEFAULT_URL})")
    group.add_argument("--user", help="Airflow user (WMLTRAIN_USER)")
    group.add_argument("--password", help="their password (WMLTRAIN_PASSWORD; better in the environment)")
    group.add_argument("--config", help="YAML file with api_url, user, password (WMLTRAIN_CONFIG)")
    group.add_argument(
        "--api-timeout",
        type=float,
        metavar="SECONDS",
        help=f"seconds one API call may take before it is tried again (default {DEFAULT_TIMEOUT:.0f})",
    )


def add_wait_options(parser: argparse.ArgumentParser) -> None:
    """``--timeout`` and ``--max-outage`` of the commands that wait (``train --wait``, ``logs --follow``)."""
    group = parser.add_argument_group("waiting")
    group.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up waiting after this long (exit 3; the run goes on); default: as long as the run lasts",
    )
    group.add_argument(
        "--max-outage",
        type=float,
        default=DEFAULT_MAX_OUTAGE,
        metavar="SECONDS",
        help="how long API time-outs and failures in a row are ridden out before giving up (exit 3; "
        f"the run goes on); default {DEFAULT_MAX_OUTAGE:.0f}",
    )


def _note(line: str) -> None:
    print(f"note: {line}", file=sys.stderr, flush=True)


def wait_options(args: argparse.Namespace) -> WaitOptions:
    """How the command waits (its ``--timeout``/``--max-outage``); API failures ridden out are noted on
    stderr."""
    return WaitOptions(
        timeout=getattr(args, "timeout", None),
        max_outage=getattr(args, "max_outage", DEFAULT_MAX_OUTAGE),
        notify=_note,
    )


def _config_file(args: argparse.Namespace) -> dict[str, Any]:
    explicit = args.config or os.environ.get("WMLTRAIN_CONFIG")
    path = Path(explicit or DEFAULT_CONFIG).expanduser()
    if not path.is_file():
        if explicit:
            raise ConfigurationError(
                "file not found; give the path of a YAML file with api_url, user, password", field=str(path)
            )
        return {}
    try:
        data = yaml.safe_load(path.read_text("utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigurationError(f"cannot be read as YAML: {err}", field=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigurationError("must be a mapping with api_url, user, password", field=str(path))
    return data


def api_from_args(args: argparse.Namespace) -> AirflowApi:
    """The API client the options, the environment and the config file describe."""
    file = _config_file(args)

    def pick(flag: str | None, env: str, key: str) -> str | None:
        return flag or os.environ.get(env) or (str(file[key]) if file.get(key) is not None else None)

    url = pick(args.api_url, "WMLTRAIN_API_URL", "api_url") or DEFAULT_URL
    user = pick(args.user, "WMLTRAIN_USER", "user")
    password = pick(args.password, "WMLTRAIN_PASSWORD", "password")
    if not user or password is None:
        raise ConfigurationError(
            "no Airflow credentials: give --user and --password, set WMLTRAIN_USER and WMLTRAIN_PASSWORD, or "
            f"write them in {DEFAULT_CONFIG}",
            field="--user/--password",
        )
    timeout = getattr(args, "api_timeout", None) or DEFAULT_TIMEOUT
    return AirflowApi(url, user, password, timeout=timeout)
