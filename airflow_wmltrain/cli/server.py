"""How ``wmltrain`` reaches Airflow: the API server's URL and credentials, from flags, environment or a file.

Precedence: ``--api-url``/``--user``/``--password``, then ``WMLTRAIN_API_URL``/``WMLTRAIN_USER``/
``WMLTRAIN_PASSWORD``, then the YAML config file (``--config``, ``$WMLTRAIN_CONFIG``, or
``~/.config/wmltrain/config.yaml``) with keys ``api_url``, ``user``, ``password``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from airflow_wmltrain.errors import ConfigurationError
from airflow_wmltrain.service.api import AirflowApi

DEFAULT_URL = "http://localhost:8080"
DEFAULT_CONFIG = Path("~/.config/wmltrain/config.yaml")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Airflow API server")
    group.add_argument("--api-url", help=f"the API server's URL (WMLTRAIN_API_URL; default {DEFAULT_URL})")
    group.add_argument("--user", help="Airflow user (WMLTRAIN_USER)")
    group.add_argument("--password", help="their password (WMLTRAIN_PASSWORD; better in the environment)")
    group.add_argument("--config", help="YAML file with api_url, user, password (WMLTRAIN_CONFIG)")


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
    return AirflowApi(url, user, password)
