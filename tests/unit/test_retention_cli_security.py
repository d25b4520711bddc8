"""Issue 10, holes 9, 10 and 11 (CLI): retention's ``as_of`` and dry run; the staging cache across
principals; the CLI's password and config file."""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from airflow_wmltrain.cli import server
from airflow_wmltrain.cli.main import build_parser, main
from airflow_wmltrain.cli.server import api_from_args
from airflow_wmltrain.errors import ConfigurationError, DataLoadError
from airflow_wmltrain.lifecycle import RunState, RunStatus
from airflow_wmltrain.service import retention
from airflow_wmltrain.service.retention import drop_expired_runs, retention_moment
from airflow_wmltrain.service.runs import TrainingRunRecord
from airflow_wmltrain.storage.cache import ObjectCache
from airflow_wmltrain.storage.s3 import S3Store
from airflow_wmltrain.storage.sigv4 import Credentials
from airflow_wmltrain.storage.staging import stage
from airflow_wmltrain.storage.transfer import RetryPolicy

NOW = datetime(2026, 11, 26, tzinfo=timezone.utc)

# --- hole 9: retention -----------------------------------------------------------------------------------


def _record(training_id: str, submitted: datetime) -> TrainingRunRecord:
    at = submitted.isoformat()
    status = RunStatus(training_id=training_id, name="n")
    status = status.advance(RunState.DOWNLOADING, at=at).advance(RunState.COMPLETED, at=at)
    return TrainingRunRecord(training_id, "dag", "run", "train", -1, "success", 1, status)


@pytest.fixture
def history(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Two ended runs, 10 and 2 days old; what retention deleted and swept is recorded."""
    runs = [
        _record("training-old", NOW - timedelta(days=10)),
        _record("training-new", NOW - timedelta(days=2)),
    ]
    calls: dict[str, list[str]] = {"deleted": [], "swept": []}

    def delete_run(api: Any, record: TrainingRunRecord) -> str:
        calls["deleted"].append(record.training_id)
        runs.remove(record)
        return "gone"

    def sweep(api: Any, live: set[str]) -> list[str]:
        calls["swept"].append(",".join(sorted(live)))
        return []

    monkeypatch.setattr(retention, "list_runs", lambda api: list(runs))
    monkeypatch.setattr(retention, "delete_run", delete_run)
    monkeypatch.setattr(retention, "sweep_moved_connections", sweep)
    return calls


def test_a_dry_run_lists_what_retention_would_remove_and_removes_nothing(
    history: dict[str, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        would = drop_expired_runs(object(), now=NOW, days=7, dry_run=True)  # type: ignore[arg-type]
    assert would == ["training-old"]
    assert history == {"deleted": [], "swept": []}, "a dry run deletes nothing, connections included"
    assert "Would remove training-old" in caplog.text
    assert "dry run: nothing removed" in caplog.text
    # The same call without the dry run does remove it.
    assert drop_expired_runs(object(), now=NOW, days=7) == ["training-old"]  # type: ignore[arg-type]
    assert history["deleted"] == ["training-old"]


def test_an_as_of_in_the_future_is_refused_unless_a_dry_run() -> None:
    future = (NOW + timedelta(days=30)).isoformat()
    with pytest.raises(ConfigurationError, match="in the future") as refused:
        retention_moment(future, dry_run=False, now=NOW)
    assert refused.value.field == "as_of"
    assert "dry_run" in str(refused.value)
    assert retention_moment(future, dry_run=True, now=NOW) == NOW + timedelta(days=30)
    past = NOW - timedelta(days=3)
    assert retention_moment(past.isoformat(), dry_run=False, now=NOW) == past
    assert retention_moment(None, dry_run=False, now=NOW) == NOW
    with pytest.raises(ConfigurationError, match="not an ISO 8601 time"):
        retention_moment("next tuesday", dry_run=True, now=NOW)


def test_the_retention_dag_refuses_a_future_as_of_before_reaching_the_api(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dag = retention.build_retention_dag("retention_under_test")
    assert dag.params["dry_run"] is False
    task = dag.get_task("drop_expired_runs")
    reached: list[str] = []
    monkeypatch.setattr("airflow.sdk.BaseHook.get_connection", reached.append)
    future = (datetime.now(timezone.utc) + timedelta(days=8)).isoformat()
    with pytest.raises(ConfigurationError, match="in the future"):
        task.python_callable(params={"as_of": future, "dry_run": False})  # type: ignore[attr-defined]
    assert reached == [], "refused before the API connection is even looked up"


# --- hole 11: the command line's password --------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("WMLTRAIN_API_URL", "WMLTRAIN_USER", "WMLTRAIN_PASSWORD", "WMLTRAIN_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"api_url": None, "user": None, "password_file": None, "config": None, **kw})


def test_a_password_on_the_command_line_is_refused(
    clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["list", "--password", "s3cr3t-marker"], ["show", "training-x", "--password=s3cr3t-marker"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "--password: a password on the command line is visible" in err
        assert "WMLTRAIN_PASSWORD" in err
        assert "--password-file" in err
        assert "s3cr3t-marker" not in err
    assert "--password-file" in _help("list")


def _help(command: str) -> str:
    out = io.StringIO()
    parser = build_parser()
    parser._subparsers._group_actions[0].choices[command].print_help(out)  # type: ignore[union-attr]
    return out.getvalue()


def test_the_password_comes_from_a_file_stdin_or_a_prompt(
    clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("file-pw\nignored\n")
    assert api_from_args(_args(user="u", password_file=str(secret))).password == "file-pw"
    monkeypatch.setattr("sys.stdin", io.StringIO("stdin-pw\n"))
    assert api_from_args(_args(user="u", password_file="-")).password == "stdin-pw"
    with pytest.raises(ConfigurationError, match="cannot be read") as missing:
        api_from_args(_args(user="u", password_file=str(tmp_path / "none")))
    assert missing.value.field == "--password-file"
    monkeypatch.setenv("WMLTRAIN_PASSWORD", "env-pw")  # the documented variable still works
    assert api_from_args(_args(user="u")).password == "env-pw"
    monkeypatch.delenv("WMLTRAIN_PASSWORD")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    asked: list[str] = []
    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr(server.getpass, "getpass", lambda prompt: asked.append(prompt) or "typed-pw")
    assert api_from_args(_args(user="u")).password == "typed-pw"
    assert asked
    assert "u" in asked[0]


def test_a_config_file_with_a_password_must_be_private(
    clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("api_url: http://file:1\nuser: fileuser\npassword: filepw\n")
    for mode in (0o644, 0o640, 0o604, 0o620):
        config.chmod(mode)
        with pytest.raises(ConfigurationError, match=f"permissions are {mode:04o}") as refused:
            api_from_args(_args(config=str(config)))
        assert refused.value.field == str(config)
        assert f"chmod 600 {config}" in str(refused.value)
        assert "filepw" not in str(refused.value)
    config.chmod(0o600)
    assert api_from_args(_args(config=str(config))).password == "filepw"
    config.write_text("api_url: http://file:1\nuser: fileuser\n")  # no password: its mode does not matter
    config.chmod(0o644)
    monkeypatch.setenv("WMLTRAIN_PASSWORD", "env-pw")
    assert api_from_args(_args(config=str(config))).username == "fileuser"


def test_the_default_config_file_is_checked_too(clean_env: None, tmp_path: Path) -> None:
    default = tmp_path / ".config" / "wmltrain" / "config.yaml"
    default.parent.mkdir(parents=True)
    default.write_text("user: me\npassword: pw\n")
    default.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        api_from_args(_args())


# --- hole 10: the staging cache and principals ----------------------------------------------------------

_OBJECTS = {"open/a.bin": b"anyone may read this", "secret/model.bin": b"only the owner may read this"}
_READABLE = {"owner": set(_OBJECTS), "reader": {"open/a.bin"}}  # both may list the bucket


class _PermissionsS3(BaseHTTPRequestHandler):
    """A stand-in S3 bucket ``b`` with per-object permissions by access key id (from ``Authorization``):
    both principals list and HEAD the bucket, only the owner GETs ``secret/model.bin``."""

    def log_message(self, *args: Any) -> None:
        pass

    def _principal(self) -> str:
        return self.headers.get("authorization", "").partition("Credential=")[2].partition("/")[0]

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"content-length": str(len(body)), **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._reply(200 if self.path.split("?")[0] == "/b" else 404)

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/b":
            prefix = parse_qs(query).get("prefix", [""])[0]
            items = "".join(
                f"<Contents><Key>{key}</Key><Size>{len(data)}</Size>"
                f'<ETag>"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"</ETag></Contents>'
                for key, data in _OBJECTS.items()
                if key.startswith(prefix)
            )
            xml = f'<ListBucketResult xmlns="{_S3_NS}"><IsTruncated>false</IsTruncated>{items}'
            xml += "</ListBucketResult>"
            self._reply(200, xml.encode())
            return
        key = path.removeprefix("/b/")
        if key not in _READABLE.get(self._principal(), set()):
            self._reply(403, b"<Error><Code>AccessDenied</Code></Error>")
            return
        data = _OBJECTS[key]
        self._reply(200, data, {"etag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'})


_S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


@pytest.fixture
def permissions_s3() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PermissionsS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_cache_gives_no_principal_bytes_it_could_not_get_itself(
    permissions_s3: str, tmp_path: Path
) -> None:
    def store(access_key: str) -> S3Store:
        keys = Credentials(access_key, "secret-of-" + access_key)
        return S3Store(
            "b", credentials=lambda: keys, endpoint_url=permissions_s3, retry=RetryPolicy(attempts=1)
        )

    cache = ObjectCache(tmp_path / "cache", max_bytes=1 << 30)
    owner = stage(store("owner"), tmp_path / "owner", cache=cache)
    assert owner.fetched_files == 2
    # What the reader may read it fetches itself (the owner's entry is not linked), then re-stages warm.
    first = stage(store("reader"), tmp_path / "reader-1", prefix="open/", cache=cache)
    again = stage(store("reader"), tmp_path / "reader-2", prefix="open/", cache=cache)
    assert (first.fetched_files, first.from_cache) == (1, 0)
    assert (again.fetched_files, again.from_cache) == (0, 1)
    # What it may list but not read, it does not get: its own GET is refused, whatever the cache holds.
    with pytest.raises(DataLoadError, match=r"secret/model\.bin"):
        stage(store("reader"), tmp_path / "reader", cache=cache)
    staged = [p.read_bytes() for p in (tmp_path / "reader").rglob("*") if p.is_file()]
    assert _OBJECTS["secret/model.bin"] not in staged, "the reader got the owner's object through the cache"
    assert stage(store("owner"), tmp_path / "owner-2", cache=cache).from_cache == 2, "the owner's stays warm"
