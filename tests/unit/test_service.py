"""The service surface's pure logic: run records, retention, API errors, CLI options and output."""

from __future__ import annotations

import argparse
import base64
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from airflow_wmltrain.cli.runs import _table
from airflow_wmltrain.cli.server import api_from_args
from airflow_wmltrain.errors import ConfigurationError, ModelDefinitionError
from airflow_wmltrain.lifecycle import RunState, RunStatus
from airflow_wmltrain.service.api import AirflowApi, ApiAuthError, ApiNotFoundError, ApiUnreachableError
from airflow_wmltrain.service.retention import expired
from airflow_wmltrain.service.runs import TrainingRunRecord


def record(
    state: str | None, ti_state: str, submitted: str = "2026-11-01T00:00:00.000Z"
) -> TrainingRunRecord:
    status = RunStatus(training_id="training-x", name="n")
    if state:
        status = status.advance(RunState.DOWNLOADING, at=submitted).advance(RunState(state), at=submitted)
    return TrainingRunRecord("training-x", "dag", "run", "train", -1, ti_state, 1, status)


@pytest.mark.parametrize(
    ("doc_state", "ti_state", "shown"),
    [
        ("COMPLETED", "success", "COMPLETED"),
        ("FAILED", "failed", "FAILED"),
        ("PROCESSING", "running", "PROCESSING"),
        ("PROCESSING", "deferred", "PROCESSING"),
        ("PROCESSING", "failed", "HALTED"),  # the task was marked failed while the run trained
        ("DOWNLOADING", "up_for_retry", "DOWNLOADING"),
        (None, "queued", "QUEUED"),
    ],
)
def test_a_records_state_combines_its_document_and_its_task(
    doc_state: str | None, ti_state: str, shown: str
) -> None:
    rec = record(doc_state, ti_state)
    assert rec.state.value == shown
    assert rec.active == (shown not in ("COMPLETED", "FAILED", "HALTED"))


def test_a_halted_record_without_error_says_why() -> None:
    rec = record("PROCESSING", "failed")
    assert rec.error is not None
    assert rec.error["code"] == "C200"


def test_retention_takes_ended_runs_older_than_the_limit_only() -> None:
    now = datetime(2026, 11, 26, tzinfo=timezone.utc)
    old_done = record("COMPLETED", "success", "2026-11-10T00:00:00Z")
    old_running = record("PROCESSING", "running", "2026-11-10T00:00:00Z")
    recent = record("FAILED", "failed", (now - timedelta(days=2)).isoformat())
    assert expired([old_done, old_running, recent], now=now, days=7) == [old_done]
    assert expired([old_done, recent], now=now + timedelta(days=8), days=7) == [old_done, recent]


def test_tables_align_columns() -> None:
    text = _table([["1", "a", "training-xyz"], ["2", "bbbb", "t"]], ["#", "name", "id"])
    lines = text.splitlines()
    assert lines[0].index("name") == lines[1].index("a") == lines[2].index("bbbb")


def _args(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**{"api_url": None, "user": None, "password_file": None, "config": None, **kw})


def test_server_options_flags_then_environment_then_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "wmltrain.yaml"
    config.write_text("api_url: http://file:1\nuser: fileuser\npassword: filepw\n")
    config.chmod(0o600)
    monkeypatch.setenv("WMLTRAIN_CONFIG", str(config))
    monkeypatch.delenv("WMLTRAIN_API_URL", raising=False)
    monkeypatch.delenv("WMLTRAIN_USER", raising=False)
    monkeypatch.delenv("WMLTRAIN_PASSWORD", raising=False)
    assert (api_from_args(_args()).url, api_from_args(_args()).username) == ("http://file:1", "fileuser")
    monkeypatch.setenv("WMLTRAIN_USER", "envuser")
    assert api_from_args(_args()).username == "envuser"
    assert api_from_args(_args(user="flaguser")).username == "flaguser"
    assert "filepw" not in repr(api_from_args(_args()))


def test_missing_credentials_and_a_bad_config_file_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WMLTRAIN_API_URL", "WMLTRAIN_USER", "WMLTRAIN_PASSWORD", "WMLTRAIN_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigurationError, match="no Airflow credentials"):
        api_from_args(_args())
    with pytest.raises(ConfigurationError, match="file not found"):
        api_from_args(_args(config=str(tmp_path / "nope.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigurationError, match="must be a mapping"):
        api_from_args(_args(config=str(bad)))


class _Api(BaseHTTPRequestHandler):
    """A stand-in API server: token for admin/good, 404 for /api/v2/missing, else echo."""

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/auth/token":
            if body == {"username": "admin", "password": "good"}:
                self._reply(201, {"access_token": "tok"})
            else:
                self._reply(401, {"detail": "Invalid credentials"})

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != "Bearer tok":
            self._reply(401, {"detail": "no"})
        elif self.path.startswith("/api/v2/missing"):
            self._reply(404, {"detail": "Not found"})
        elif self.path.startswith("/api/v2/items"):
            offset = int(self.path.split("offset=")[1].split("&")[0])
            self._reply(200, {"items": list(range(offset, min(offset + 100, 250))), "total_entries": 250})


@pytest.fixture
def api_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_api_client_pages_and_names_its_failures(api_server: str) -> None:
    api = AirflowApi(api_server, "admin", "good")
    assert list(api.paginate("/items", "items")) == list(range(250))
    with pytest.raises(ApiNotFoundError, match="Not found"):
        api.call("GET", "/missing")
    with pytest.raises(ApiAuthError, match="refused the credentials of user 'admin'"):
        AirflowApi(api_server, "admin", "bad").call("GET", "/items")
    with pytest.raises(ApiUnreachableError, match="cannot reach the Airflow API server"):
        AirflowApi("http://127.0.0.1:9", "admin", "good", timeout=2, sleep=lambda s: None).call(
            "GET", "/items"
        )


def test_model_definitions_in_base64_are_decoded_or_refused() -> None:
    from airflow_wmltrain.model_source import resolve_model_definition

    manifest: Any = None
    assert (
        resolve_model_definition("base64:" + base64.b64encode(b"PK").decode(), manifest, max_bytes=10)
        == b"PK"
    )
    assert resolve_model_definition("/a/model.zip", manifest, max_bytes=10) == "/a/model.zip"
    with pytest.raises(ModelDefinitionError, match="not valid base64"):
        resolve_model_definition("base64:%%%", manifest, max_bytes=10)


@pytest.mark.parametrize(
    "url", ["s3://evil:8443#/model.zip", "s3://Evil.example/model.zip", "s3://a/model.zip"]
)
def test_a_model_url_with_a_bad_bucket_is_refused_before_any_request(url: str) -> None:
    """A bucket in a model-definition URL reaches the request's host like a manifest's bucket: same rules
    (issue 10, hole 6); refused before the manifest's credentials are even looked at."""
    from airflow_wmltrain.model_source import resolve_model_definition

    with pytest.raises(ModelDefinitionError, match="not a valid") as refused:
        resolve_model_definition(url, None, max_bytes=10)  # type: ignore[arg-type]
    assert refused.value.code == "C102"


def test_hyperparameters_rendered_as_json_text_are_read() -> None:
    from airflow_wmltrain.errors import ManifestError
    from airflow_wmltrain.operators.training_run import _hyperparameters

    assert _hyperparameters('{"lr": 0.1}') == {"lr": 0.1}
    assert _hyperparameters("") is None
    assert _hyperparameters({"a": 1}) == {"a": 1}
    with pytest.raises(ManifestError, match="hyperparameters"):
        _hyperparameters("[1, 2]")
    with pytest.raises(ManifestError, match="not a JSON object"):
        _hyperparameters("lr=0.1")


def test_list_and_show_say_a_run_waits_for_gpus_and_who_holds_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 9: a run waiting for GPUs looked like one staging data; its phase says so, in both."""
    from airflow_wmltrain.cli import runs as cli_runs
    from airflow_wmltrain.cli.main import main

    waiting = "waiting for 1 GPU: GPU 0 held by training-other (PROCESSING)"
    status = RunStatus(training_id="training-w", name="n").advance(RunState.DOWNLOADING, phase=waiting)
    found = TrainingRunRecord("training-w", "dag", "run", "train", -1, "running", 1, status)
    api = AirflowApi("http://airflow.test", "u", "p")
    monkeypatch.setattr(cli_runs, "api_from_args", lambda args: api)
    monkeypatch.setattr(cli_runs, "list_runs", lambda api, state=None, limit=None: [found])
    monkeypatch.setattr(cli_runs, "find_run", lambda api, training_id: found)
    assert main(["list"]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert "DOWNLOADING" in row
    assert "waiting for 1 GPU: GPU 0 held by training-other" in row
    assert main(["show", "training-w"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [line.split(None, 1) for line in shown if line.startswith("phase")] == [["phase", waiting]]


def test_halt_delete_and_logs_print_json_when_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13 item 9: ``--json`` on every command."""
    from airflow_wmltrain.cli import runs as cli_runs
    from airflow_wmltrain.cli.main import main

    status = RunStatus(training_id="training-j", name="n").advance(RunState.PROCESSING)
    active = TrainingRunRecord("training-j", "dag", "run", "train", -1, "running", 1, status)
    over = TrainingRunRecord(
        "training-j", "dag", "run", "train", -1, "success", 1, status.advance(RunState.COMPLETED)
    )
    found = {"record": active}
    api = AirflowApi("http://airflow.test", "u", "p")
    monkeypatch.setattr(cli_runs, "api_from_args", lambda args: api)
    monkeypatch.setattr(cli_runs, "find_run", lambda api, training_id: found["record"])
    monkeypatch.setattr(cli_runs, "request_halt", lambda api, record: None)
    monkeypatch.setattr(cli_runs, "delete_run", lambda api, record: "the DAG run")
    monkeypatch.setattr(cli_runs, "delete_moved_connections", lambda api, training_id: None)
    monkeypatch.setattr(cli_runs, "log_lines", lambda api, record, follow, options: iter(["a", '{"b": 1}']))

    assert main(["halt", "training-j", "--json"]) == 0
    halted = json.loads(capsys.readouterr().out)
    assert (halted["training_id"], halted["halt_requested"]) == ("training-j", True)
    assert halted["state"] == "PROCESSING"
    assert main(["logs", "training-j", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["line"] for line in lines] == ["a", '{"b": 1}']
    assert {line["training_id"] for line in lines} == {"training-j"}
    found["record"] = over
    assert main(["delete", "training-j", "--json"]) == 0
    deleted = json.loads(capsys.readouterr().out)
    assert (deleted["removed"], deleted["halted"]) == ("the DAG run", False)
