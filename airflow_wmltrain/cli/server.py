"""How ``wmltrain`` reaches Airflow: the API server's URL and credentials, from flags, environment or a file.

Precedence: ``--api-url``/``--user``/``--password-file``, then ``WMLTRAIN_API_URL``/``WMLTRAIN_USER``/
``WMLTRAIN_PASSWORD``, then the YAML config file (``--config``, ``$WMLTRAIN_CONFIG``, or
``~/.config/wmltrain/config.yaml``) with keys ``api_url``, ``user``, ``password``; a password found
nowhere is asked for when stdin is a terminal.

A password is never taken from the command line: ``--password`` is refused (every user of the machine
sees a process's arguments in ``ps``).  A config file that holds a password must be readable by its
owner only (``chmod 600``), like ssh's keys, or it is refused.
"""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from pathlib import Path
from typing import Any

import yaml

from airflow_wmltrain.errors import ConfigurationError
from airflow_wmltrain.service.api import DEFAULT_TIMEOUT, AirflowApi, TokenCache
from airflow_wmltrain.service.runs import DEFAULT_MAX_OUTAGE, WaitOptions

DEFAULT_URL = "http://localhost:8080"
DEFAULT_CONFIG = Path("~/.config/wmltrain/config.yaml")


def add_server_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Airflow API server")
    group.add_argument("--api-url", help=f"the API server's URL (WMLTRAIN_API_URL; default {DEFAULT_URL})")
    group.add_argument("--user", help="Airflow user (WMLTRAIN_USER)")
    group.add_argument("--password", action=_RefusedPassword, help=argparse.SUPPRESS)
    group.add_argument(
        "--password-file",
        metavar="FILE",
        help="read their password from the first line of FILE ('-': stdin); or WMLTRAIN_PASSWORD, the config "
        "file, or a prompt on a terminal",
    )
    group.add_argument(
        "--config", help="YAML file with api_url, user, password (WMLTRAIN_CONFIG); chmod 600 if it holds one"
    )
    group.add_argument(
        "--api-timeout",
        type=float,
        metavar="SECONDS",
        help=f"seconds one API call may take before it is tried again (default {DEFAULT_TIMEOUT:.0f})",
    )


PASSWORD_ON_COMMAND_LINE = (
    "--password: a password on the command line is visible to every user of this machine (ps, /proc) and "
    "stays in the shell's history; set WMLTRAIN_PASSWORD, give --password-file FILE ('-' reads stdin), "
    f"write it in the config file ({DEFAULT_CONFIG}, chmod 600), or let wmltrain ask for it on a terminal"
)


class _RefusedPassword(argparse.Action):
    """``--password VALUE`` is refused (usage error, exit 2) with the ways that do not show it in ``ps``."""

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.error(PASSWORD_ON_COMMAND_LINE)


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
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode  # of the file read, not of what the path names later
            data = yaml.safe_load(file.read().decode("utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigurationError(f"cannot be read as YAML: {err}", field=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigurationError("must be a mapping with api_url, user, password", field=str(path))
    if data.get("password") is not None and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(
            f"holds a password but its permissions are {stat.S_IMODE(mode):04o}: group or others may read or "
            f"change it; run `chmod 600 {path}` (or move the password to WMLTRAIN_PASSWORD)",
            field=str(path),
        )
    return data


def _password_file(name: str) -> str:
    """The first line of ``--password-file`` (``-``: stdin), without its line end."""
    try:
        if name == "-":
            line = sys.stdin.readline()
        else:
            with open(name, encoding="utf-8") as file:
                line = file.readline()
    except OSError as err:
        raise ConfigurationError(
            f"{name}: cannot be read ({err.strerror})", field="--password-file"
        ) from None
    except UnicodeDecodeError:  # its message would quote the password's bytes
        raise ConfigurationError(f"{name}: not UTF-8 text", field="--password-file") from None
    password = line.rstrip("\r\n")
    if not password:
        raise ConfigurationError(
            f"{'stdin' if name == '-' else name} holds no password on its first line", field="--password-file"
        )
    return password


def api_from_args(args: argparse.Namespace) -> AirflowApi:
    """The API client the options, the environment and the config file describe."""
    file = _config_file(args)

    def pick(flag: str | None, env: str, key: str) -> str | None:
        return flag or os.environ.get(env) or (str(file[key]) if file.get(key) is not None else None)

    url = pick(args.api_url, "WMLTRAIN_API_URL", "api_url") or DEFAULT_URL
    user = pick(args.user, "WMLTRAIN_USER", "user")
    password_file = getattr(args, "password_file", None)
    password = pick(_password_file(password_file) if password_file else None, "WMLTRAIN_PASSWORD", "password")
    if user and password is None and sys.stdin.isatty():
        password = getpass.getpass(f"Airflow password for {user} at {url}: ")
    if not user or password is None:
        raise ConfigurationError(
            "no Airflow credentials: give --user and --password-file, set WMLTRAIN_USER and "
            f"WMLTRAIN_PASSWORD, or write them in {DEFAULT_CONFIG} (chmod 600)",
            field="--user/--password-file",
        )
    timeout = getattr(args, "api_timeout", None) or DEFAULT_TIMEOUT
    return AirflowApi(url, user, password, timeout=timeout, token_cache=token_cache())


def token_cache() -> TokenCache | None:
    """Where the commands keep their tokens: ``WMLTRAIN_TOKEN_CACHE`` (empty: nowhere), else
    ``$XDG_CACHE_HOME/wmltrain`` (``~/.cache/wmltrain``)."""
    chosen = os.environ.get("WMLTRAIN_TOKEN_CACHE")
    if chosen is not None:
        return TokenCache(Path(chosen).expanduser()) if chosen else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return TokenCache(Path(base) / "wmltrain")
