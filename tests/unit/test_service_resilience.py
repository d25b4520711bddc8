"""The service surface under load (issue 9): safe submission, patient waits costing one API call per
look, a cheaper ``list``, retried idempotent calls, halt requests that write no status, one exit-code map,
and the bundled DAG's retries."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from airflow_wmltrain.errors import EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_SERVER_ERROR, exit_status
from airflow_wmltrain.lifecycle import STATUS_XCOM_KEY, RunState, RunStatus
from airflow_wmltrain.service import runs
from airflow_wmltrain.service.api import (
    PUBLIC_API,
    AirflowApi,
    ApiConflictError,
    ApiError,
    ApiNotFoundError,
    ApiServerError,
    ApiTimeoutError,
    ApiUnreachableError,
)
from airflow_wmltrain.service.runs import (
    HALT_NOTE,
    SubmissionError,
    TrainingRunRecord,
    WaitOptions,
    find_run,
    list_runs,
    log_lines,
    request_halt,
    submit_run,
    wait_until_over,
)
from airflow_wmltrain.waiting import Backoff, WaitTimeoutError

SEED_MANIFEST = Path(__file__).resolve().parents[2] / "examples" / "seed" / "manifest-s3.yml"
Handler = Callable[[str, str, dict[str, Any], Any], Any]


class FakeApi(AirflowApi):
    """An ``AirflowApi`` whose calls are answered by ``handler`` (which may raise) and logged."""

    def __init__(self, handler: Handler, *, plugin: bool = False) -> None:
        super().__init__("http://airflow.test", "admin", "pw", sleep=self._sleep)
        self.handler = handler
        self.plugin = plugin  # whether the server has the provider's endpoint (else 404, as before it)
        self.log: list[tuple[str, str]] = []  # ("call", "GET /path") and ("sleep", "2")

    def _sleep(self, seconds: float) -> None:
        self.log.append(("sleep", f"{seconds:g}"))

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Any = None,
        body: Any = None,
        idempotent: bool | None = None,
        under: str = PUBLIC_API,
    ) -> Any:
        if under != PUBLIC_API:
            path = under + path
            if not self.plugin:
                raise ApiNotFoundError("HTTP 404: Not Found", status=404)
        self.log.append(("call", f"{method} {path}"))
        return self.handler(method, path, dict(params or {}), body)

    @property
    def calls(self) -> list[str]:
        return [what for kind, what in self.log if kind == "call"]


def status(training_id: str, *states: str, **extra: Any) -> dict[str, Any]:
    document = RunStatus(training_id=training_id, name="n")
    for state in states:
        document = document.advance(RunState(state), at="2026-11-30T10:00:00.000Z")
    return {**document.to_dict(), **extra}


def fake_options(api: FakeApi, **kw: Any) -> WaitOptions:
    clock = [0.0]

    def sleep(seconds: float) -> None:
        api.log.append(("sleep", f"{seconds:g}"))
        clock[0] += seconds

    return WaitOptions(
        backoff=Backoff(interval=2.0, max_interval=30.0), sleep=sleep, clock=lambda: clock[0], **kw
    )


def one_call_per_look(api: FakeApi, *, final_calls: int = 1) -> None:
    """Between two sleeps there is exactly one API call (the last look may cost ``final_calls``)."""
    groups: list[int] = [0]
    for kind, _ in api.log:
        if kind == "sleep":
            groups.append(0)
        else:
            groups[-1] += 1
    assert all(n == 1 for n in groups[:-1]), api.log
    assert 1 <= groups[-1] <= final_calls, api.log


# --- submission -----------------------------------------------------------------------------------------

RUNS = "/dags/wmltrain_training/dagRuns"


def test_a_submit_that_timed_out_is_sent_again_and_its_409_is_ours() -> None:
    conf = {"manifest": "m: 1\n", "model_definition": "s3://b/model.zip", "hyperparameters": {}}
    posts: list[Any] = []

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if method == "POST" and path == RUNS:
            posts.append(body)
            if len(posts) == 1:  # the server made the run but the answer did not come back in time
                raise ApiTimeoutError("the Airflow API server did not answer within 30 s")
            raise ApiConflictError("POST failed: HTTP 409: already exists", status=409)
        if method == "GET" and path == f"{RUNS}/training-abc":
            return {"dag_run_id": "training-abc", "conf": {**conf, "extra_param_default": 1}}
        return None

    api = FakeApi(handler)
    submit_run(api, "training-abc", conf, note="wmltrain train: n")
    assert len(posts) == 2
    assert posts[0] == posts[1]
    assert posts[0]["dag_run_id"] == "training-abc"


def test_a_409_for_somebody_elses_run_is_a_failure_that_created_nothing() -> None:
    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if method == "POST":
            raise ApiConflictError("HTTP 409", status=409)
        if method == "GET":
            return {"conf": {"manifest": "another"}}
        return None

    with pytest.raises(SubmissionError) as caught:
        submit_run(FakeApi(handler), "training-abc", {"manifest": "mine"})
    assert not caught.value.may_exist
    assert "different DAG run" in str(caught.value)


@pytest.mark.parametrize(
    ("failure", "may_exist"),
    [
        (ApiTimeoutError("did not answer in time"), True),
        (ApiServerError("HTTP 503", status=503), True),
        (ApiUnreachableError("connection refused", maybe_sent=False), False),
    ],
)
def test_a_submit_that_keeps_failing_says_whether_the_run_may_exist(
    failure: ApiError, may_exist: bool
) -> None:
    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if method == "POST":
            raise failure
        return None

    api = FakeApi(handler)
    with pytest.raises(SubmissionError) as caught:
        submit_run(api, "training-abc", {"manifest": "m"}, tries=3)
    assert caught.value.may_exist is may_exist
    assert "training-abc" in str(caught.value)
    assert api.calls.count(f"POST {RUNS}") == 3
    assert exit_status(caught.value) == EXIT_SERVER_ERROR


def _train_args(tmp_path: Path, *extra: str) -> list[str]:
    # The seed's stores are not reachable from here: only the submission is tested.
    return [
        "train",
        "s3://bucket/model.zip",
        str(SEED_MANIFEST),
        "--api-url",
        "http://x",
        "--no-store-check",
        *extra,
    ]


@pytest.fixture
def cli_api(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], FakeApi]:
    """Makes the command line use a ``FakeApi`` (and the default settings, without Airflow)."""
    from airflow_wmltrain.cli import runs as cli_runs
    from airflow_wmltrain.cli import train as cli_train
    from airflow_wmltrain.settings import Settings

    monkeypatch.setattr(Settings, "from_airflow_config", classmethod(lambda cls: cls()))
    monkeypatch.setattr(Settings, "from_local_config", classmethod(lambda cls, environ=None: cls()))

    def install(handler: Handler) -> FakeApi:
        api = FakeApi(handler)
        monkeypatch.setattr(cli_train, "api_from_args", lambda args: api)
        monkeypatch.setattr(cli_runs, "api_from_args", lambda args: api)
        return api

    return install


def test_train_prints_its_id_first_and_once_after_a_submit_timed_out(
    cli_api: Callable[[Handler], FakeApi], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from airflow_wmltrain.cli.main import main

    sent: dict[str, Any] = {}
    connections: list[str] = []

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if method == "POST" and path == "/connections":
            if body["connection_id"] in connections:
                raise ApiConflictError("HTTP 409", status=409)
            connections.append(body["connection_id"])
            if len(connections) == 1:
                raise ApiTimeoutError("timed out")  # made, but the answer was lost
            return body
        if method == "POST" and path == RUNS:
            if sent:
                raise ApiConflictError("HTTP 409", status=409)
            sent.update(body)
            raise ApiTimeoutError("timed out")
        if method == "GET" and path.startswith(f"{RUNS}/"):
            return {"dag_run_id": sent["dag_run_id"], "conf": sent["conf"]}
        return None

    api = cli_api(handler)
    assert main(_train_args(tmp_path)) == 0
    out, err = capsys.readouterr()
    training_id = sent["dag_run_id"]
    assert out.count("Model-ID is") == 1
    assert f"Model-ID is '{training_id}'" in out
    assert err.index(f"Submitting {training_id}") == err.index("Submitting")
    assert len(connections) == 2, connections  # each made once, the repeated one patched
    assert any(call.startswith("PATCH /connections/") for call in api.calls)
    assert not any(call.startswith("DELETE") for call in api.calls)


def test_train_that_could_not_submit_names_the_id_and_keeps_connections_only_if_the_run_may_exist(
    cli_api: Callable[[Handler], FakeApi], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from airflow_wmltrain.cli.main import main

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if method == "POST" and path == RUNS:
            raise ApiUnreachableError("cannot reach the Airflow API server", maybe_sent=False)
        return body

    api = cli_api(handler)
    assert main(_train_args(tmp_path)) == EXIT_SERVER_ERROR
    out, err = capsys.readouterr()
    assert "Model-ID" not in out
    training_id = err.split("Submitting ")[1].split()[0]
    assert f"{training_id} was not submitted" in err
    assert sum(call.startswith("DELETE /connections/") for call in api.calls) == 2  # rolled back

    def timing_out(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if method == "POST" and path == RUNS:
            raise ApiTimeoutError("did not answer within 30 s")
        return body

    api = cli_api(timing_out)
    assert main(_train_args(tmp_path)) == EXIT_SERVER_ERROR
    out, err = capsys.readouterr()
    training_id = err.split("Submitting ")[1].split()[0]
    assert f"{training_id} may have been created" in err
    assert f"wmltrain show {training_id}" in err
    assert not any(call.startswith("DELETE") for call in api.calls)  # the run may need them


# --- waits ----------------------------------------------------------------------------------------------

TI = "/dags/wmltrain_training/dagRuns/training-w/taskInstances/train"
XCOM = f"{TI}/xcomEntries/{STATUS_XCOM_KEY}"


def scripted(script: dict[str, list[Any]]) -> Handler:
    """Answers per path, in turn (the last one repeated); an exception in the list is raised."""

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        answers = script[path]
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return handler


def test_wait_rides_out_a_timeout_and_costs_one_call_per_look() -> None:
    api = FakeApi(
        scripted(
            {
                f"{RUNS}/training-w": [{"state": "queued"}, {"state": "running"}],
                TI: [
                    {"state": "queued", "try_number": 1},
                    ApiTimeoutError("did not answer within 30 s"),
                    ApiServerError("HTTP 500: database is locked", status=500),
                    {"state": "running", "try_number": 1},
                    {"state": "running", "try_number": 1},
                    {"state": "success", "try_number": 1},
                ],
                XCOM: [
                    {"value": status("training-w", "DOWNLOADING")},
                    {"value": status("training-w", "DOWNLOADING", "PROCESSING")},
                    {"value": status("training-w", "DOWNLOADING", "PROCESSING", "STORING", "COMPLETED")},
                ],
            }
        )
    )
    seen: list[str] = []
    final = wait_until_over(
        api, "training-w", options=fake_options(api), on_change=lambda r: seen.append(r.state.value)
    )
    assert final.state is RunState.COMPLETED
    assert seen == ["QUEUED", "DOWNLOADING", "PROCESSING", "COMPLETED"]
    one_call_per_look(api, final_calls=2)  # the end: the task instance, then the final document
    assert not any("xcomEntries?" in c or c.endswith("/xcomEntries") for c in api.calls)  # no wildcard


def test_wait_gives_up_after_a_long_outage_with_a_clear_message() -> None:
    api = FakeApi(scripted({TI: [ApiTimeoutError("did not answer within 30 s")]}))
    record = TrainingRunRecord("training-w", "wmltrain_training", "training-w", "train")
    with pytest.raises(
        ApiUnreachableError, match=r"has failed for \d+ s .*wmltrain show training-w"
    ) as caught:
        wait_until_over(api, "training-w", record=record, options=fake_options(api, max_outage=300))
    assert exit_status(caught.value) == EXIT_SERVER_ERROR
    with pytest.raises(WaitTimeoutError):
        wait_until_over(
            api, "training-w", record=record, options=fake_options(api, max_outage=None, timeout=600)
        )


def test_a_halted_run_ends_the_wait_halted() -> None:
    api = FakeApi(
        scripted(
            {
                TI: [
                    {"state": "running", "try_number": 1},
                    {"state": "failed", "try_number": 1, "note": HALT_NOTE},
                ],
                XCOM: [{"value": status("training-w", "DOWNLOADING", "PROCESSING")}],
            }
        )
    )
    record = TrainingRunRecord("training-w", "wmltrain_training", "training-w", "train")
    final = wait_until_over(api, "training-w", record=record, options=fake_options(api))
    assert final.state is RunState.HALTED
    assert final.error == {"code": "C200", "message": "the run was halted (wmltrain halt)"}


def test_logs_follow_costs_one_call_per_look_and_ends_with_the_run() -> None:
    pages = [
        {"content": [{"event": "line 1"}], "continuation_token": "t1"},
        {"content": [], "continuation_token": "t1"},
        ApiTimeoutError("did not answer within 30 s"),
        {"content": [{"event": "line 2"}, {"event": "::group::"}], "continuation_token": "t2"},
        {"content": [], "continuation_token": "t2"},
        {"content": [{"event": "last line"}]},  # no token: the end of the log
    ]
    api = FakeApi(
        scripted(
            {
                f"{TI}/logs/1": pages,
                TI: [{"state": "running", "try_number": 1}, {"state": "success", "try_number": 1}],
                XCOM: [{"value": status("training-w", "COMPLETED")}],
            }
        )
    )
    record = TrainingRunRecord("training-w", "wmltrain_training", "training-w", "train", try_number=1)
    lines = list(log_lines(api, record, follow=True, options=fake_options(api)))
    assert lines == ["line 1", "line 2", "last line"]
    one_call_per_look(api, final_calls=3)  # the end: the task, the final document, the last page


def test_logs_follow_never_reads_a_complete_log_again() -> None:
    """Once a page comes without a continuation token the try's log is complete: asking again would
    send all of it again, so only the task is looked at until it ends (or a retry starts its own log)."""
    api = FakeApi(
        scripted(
            {
                f"{TI}/logs/1": [{"content": [{"event": "all of try 1"}]}],
                f"{TI}/logs/2": [
                    {"content": [{"event": "all of try 2"}], "continuation_token": "u1"},
                    {"content": []},
                ],
                TI: [
                    {"state": "up_for_retry", "try_number": 1},
                    {"state": "up_for_retry", "try_number": 1},
                    {"state": "running", "try_number": 2},
                    {"state": "success", "try_number": 2},
                ],
                XCOM: [{"value": status("training-w", "COMPLETED")}],
            }
        )
    )
    record = TrainingRunRecord("training-w", "wmltrain_training", "training-w", "train", try_number=1)
    lines = list(log_lines(api, record, follow=True, options=fake_options(api)))
    assert lines == ["all of try 1", "all of try 2"]
    assert api.calls.count(f"GET {TI}/logs/1") == 1
    assert api.calls.count(f"GET {TI}/logs/2") == 2
    one_call_per_look(api, final_calls=2)


def test_logs_follow_reads_on_after_a_reschedule_without_repeating_lines() -> None:
    """A rescheduled task (no free GPU) runs again in the same try: its log goes on where it stopped."""
    api = FakeApi(
        scripted(
            {
                f"{TI}/logs/1": [
                    {"content": [{"event": "a"}], "continuation_token": "t1"},
                    {"content": [{"event": "b"}]},  # up for reschedule: the end, for now
                    {"content": [{"event": "b"}, {"event": "c"}], "continuation_token": "t2"},
                    {"content": [], "continuation_token": "t2"},
                ],
                TI: [
                    {"state": "up_for_reschedule", "try_number": 1},
                    {"state": "running", "try_number": 1},
                    {"state": "success", "try_number": 1},
                ],
                XCOM: [{"value": status("training-w", "COMPLETED")}],
            }
        )
    )
    record = TrainingRunRecord("training-w", "wmltrain_training", "training-w", "train", try_number=1)
    assert list(log_lines(api, record, follow=True, options=fake_options(api))) == ["a", "b", "c"]


# --- list, halt -----------------------------------------------------------------------------------------


def test_list_fetches_the_task_instances_in_one_batch_call() -> None:
    entries = [{"dag_id": "grid", "run_id": "r1", "task_id": "train", "map_index": i} for i in range(3)] + [
        {"dag_id": "wmltrain_training", "run_id": "training-b", "task_id": "train", "map_index": -1}
    ]
    tis = [
        {
            "dag_id": e["dag_id"],
            "dag_run_id": e["run_id"],
            "task_id": "train",
            "map_index": e["map_index"],
            "state": "success",
            "try_number": 1,
        }
        for e in entries
    ]
    batch_bodies: list[Any] = []

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if path.endswith("/taskInstances/~/xcomEntries"):
            return {"xcom_entries": entries, "total_entries": len(entries)}
        if path == "/dags/~/dagRuns/~/taskInstances/list":
            assert method == "POST"
            batch_bodies.append(body)
            return {"task_instances": tis, "total_entries": len(tis)}
        if path.endswith(f"/xcomEntries/{STATUS_XCOM_KEY}"):
            run_id = path.split("/dagRuns/")[1].split("/", maxsplit=1)[0]
            tid = "training-b" if run_id == "training-b" else f"training-g{params['map_index']}"
            return {"value": status(tid, "COMPLETED")}
        if path == RUNS:
            return {"dag_runs": [{"dag_run_id": "training-q", "state": "queued"}], "total_entries": 1}
        raise AssertionError(f"unexpected call {method} {path}")

    api = FakeApi(handler)
    records = list_runs(api)
    assert {r.training_id for r in records} == {
        "training-g0",
        "training-g1",
        "training-g2",
        "training-b",
        "training-q",
    }
    assert len(batch_bodies) == 1
    assert set(batch_bodies[0]["dag_ids"]) == {"grid", "wmltrain_training"}
    assert len(api.calls) == len(entries) + 3  # the entries, one batch, a document each, the DAG's runs
    assert not any(
        c.startswith("GET /dags/grid/dagRuns/r1/taskInstances/train/") and "xcom" not in c for c in api.calls
    )


def test_list_rides_out_a_transient_failure_of_a_read() -> None:
    answers: list[Any] = [
        ApiServerError("HTTP 503", status=503),
        {"task_instances": [], "total_entries": 0},
    ]
    calls: list[str] = []

    class Flaky(AirflowApi):
        def _send(
            self, method: str, path: str, *, body: Any = None, token: str | None = None
        ) -> tuple[int, bytes]:
            calls.append(f"{method} {path}")
            if path.startswith("/api/v2/dags/~/dagRuns/~/taskInstances/list"):
                answer = answers.pop(0)
                if isinstance(answer, ApiServerError):
                    return 503, b'{"detail": "busy"}'
                return 200, json.dumps(answer).encode()
            if "xcomEntries" in path:
                return 200, json.dumps(
                    {"xcom_entries": [{"dag_id": "d", "run_id": "r", "task_id": "t"}], "total_entries": 1}
                ).encode()
            return 404, b'{"detail": "no"}'

    api = Flaky("http://x", "u", "p", sleep=lambda s: None, _token="tok")
    assert list_runs(api) == []
    assert sum(c.startswith("POST /api/v2/dags/~/dagRuns/~/taskInstances/list") for c in calls) == 2


def test_a_halt_request_marks_the_task_failed_and_writes_no_status() -> None:
    api = FakeApi(lambda method, path, params, body: None)
    document = RunStatus.from_dict(status("training-h", "DOWNLOADING", "PROCESSING"))
    record = TrainingRunRecord("training-h", "dag", "run", "train", -1, "running", 1, document)
    request_halt(api, record)
    assert api.calls == ["PATCH /dags/dag/dagRuns/run/taskInstances/train"]
    assert not any("xcom" in call.lower() for call in api.calls)
    # Until the worker writes the run's end, the halt shows as requested, derived in memory.
    halted = TrainingRunRecord(
        "training-h", "dag", "run", "train", -1, "failed", 1, document, ti_note=HALT_NOTE
    )
    assert halted.state is RunState.HALTED
    assert halted.error == {"code": "C200", "message": "the run was halted (wmltrain halt)"}
    assert halted.status.state is RunState.PROCESSING  # the document itself is untouched
    assert halted.to_dict()["history"][-1]["state"] == "HALTED"
    assert not hasattr(runs, "halt_run")
    assert not hasattr(runs, "TERMINAL_STATES")
    assert not hasattr(runs, "ACTIVE_TI_STATES")


def test_delete_of_an_active_run_is_refused_with_the_bad_input_status(
    cli_api: Callable[[Handler], FakeApi], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from airflow_wmltrain.cli import runs as cli_runs
    from airflow_wmltrain.cli.main import main

    document = RunStatus.from_dict(status("training-d", "PROCESSING"))
    cli_api(lambda *a: None)
    monkeypatch.setattr(
        cli_runs,
        "find_run",
        lambda api, tid: TrainingRunRecord(tid, "d", "r", "t", -1, "running", 1, document),
    )
    assert main(["delete", "training-d"]) == EXIT_BAD_INPUT
    assert "is PROCESSING; halt it first" in capsys.readouterr().err


# --- the API client -------------------------------------------------------------------------------------


class _Flaky(BaseHTTPRequestHandler):
    """Token for anyone; ``/api/v2/flaky`` fails (503, or answers late) ``failures`` times, then 200."""

    failures = 0
    slow = False
    seen: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self) -> None:
        if self.path == "/auth/token":
            self.rfile.read(int(self.headers["Content-Length"]))
            self._reply(201, {"access_token": "tok"})
            return
        type(self).seen.append(f"{self.command} {self.path}")
        if type(self).failures > 0:
            type(self).failures -= 1
            if type(self).slow:
                time.sleep(1.0)  # the client gave up meanwhile: no answer
                return
            self._reply(503, {"detail": "database is locked"})
            return
        if self.command == "DELETE" and len(type(self).seen) > 1:
            self._reply(404, {"detail": "gone"})
            return
        self._reply(200, {"ok": True})

    do_GET = do_POST = do_DELETE = _answer


@pytest.fixture
def flaky() -> Iterator[tuple[str, type[_Flaky]]]:
    handler = type("Flaky", (_Flaky,), {"failures": 0, "slow": False, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


def test_the_api_client_retries_idempotent_calls_only(flaky: tuple[str, type[_Flaky]]) -> None:
    url, handler = flaky
    api = AirflowApi(url, "admin", "pw", sleep=lambda s: None)
    handler.failures = 2
    assert api.call("GET", "/flaky") == {"ok": True}
    assert len(handler.seen) == 3
    handler.failures, handler.seen[:] = 1, []
    with pytest.raises(ApiServerError, match="HTTP 503"):
        api.call("POST", "/flaky", body={})
    assert len(handler.seen) == 1
    handler.failures, handler.seen[:] = 1, []
    assert api.call("POST", "/flaky", body={}, idempotent=True) == {"ok": True}
    handler.failures, handler.seen[:] = 9, []
    with pytest.raises(ApiServerError):
        api.call("GET", "/flaky")
    assert len(handler.seen) == api.tries


def test_the_api_client_times_out_and_a_repeated_delete_that_finds_nothing_is_done(
    flaky: tuple[str, type[_Flaky]],
) -> None:
    url, handler = flaky
    handler.failures, handler.slow = 1, True
    api = AirflowApi(url, "admin", "pw", timeout=0.3, sleep=lambda s: None)
    assert api.call("DELETE", "/flaky") is None  # the first try timed out (and did it): 404 then
    assert len(handler.seen) == 2
    handler.failures, handler.seen[:] = 1, []
    with pytest.raises(ApiTimeoutError, match="did not answer GET /api/v2/flaky within 0 s"):
        AirflowApi(url, "admin", "pw", timeout=0.3, tries=1).call("GET", "/flaky")


# --- errors, exit codes ---------------------------------------------------------------------------------


def test_api_errors_are_part_of_the_error_tree() -> None:
    from airflow_wmltrain.errors import WmlTrainError

    assert issubclass(ApiError, WmlTrainError)
    assert exit_status(ApiNotFoundError("no run")) == EXIT_BAD_INPUT
    assert exit_status(ApiUnreachableError("down")) == EXIT_SERVER_ERROR
    assert ApiUnreachableError("down").retryable
    assert ApiServerError("503").retryable
    assert not ApiNotFoundError("x").retryable
    assert not ApiConflictError("x").retryable


def test_the_cli_modules_take_their_exit_codes_from_errors_only() -> None:
    import re

    cli = Path(__file__).resolve().parents[2] / "airflow_wmltrain" / "cli"
    for name in ("main.py", "runs.py", "train.py", "validate.py", "stage.py"):
        text = (cli / name).read_text()
        assert not re.search(r"\breturn\s+\d", text), name
        assert not re.search(r"^EXIT_\w+\s*(,|=)", text, re.MULTILINE), name


def test_a_failed_run_exits_1_after_wait(
    cli_api: Callable[[Handler], FakeApi],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow_wmltrain.cli.main import main

    monkeypatch.setattr(runs, "POLL_BACKOFF", Backoff(interval=0.0))
    monkeypatch.setattr(runs.WaitOptions, "__init__", _no_sleep_init(runs.WaitOptions.__init__))
    failed = status("x", "PROCESSING")

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if method == "POST" or method == "PATCH":
            return body
        if path.endswith("/taskInstances/train"):
            return {"state": "failed", "try_number": 1}
        if path.endswith(STATUS_XCOM_KEY):
            tid = path.split("/dagRuns/")[1].split("/", maxsplit=1)[0]
            document = RunStatus.from_dict({**failed, "training_id": tid})
            return {"value": document.fail(RunState.FAILED, "C201", "exited 3").to_dict()}
        if "/dagRuns/" in path:
            return {"state": "failed"}
        return None

    cli_api(handler)
    assert main(_train_args(tmp_path, "--wait")) == EXIT_RUN_FAILED
    assert "FAILED: C201 exited 3" in capsys.readouterr().err


def _no_sleep_init(init: Callable[..., None]) -> Callable[..., None]:
    def wrapped(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        self.sleep = lambda seconds: None

    return wrapped


# --- the bundled DAG's retries --------------------------------------------------------------------------


def test_the_training_dag_retries_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import timedelta

    from airflow_wmltrain.service.training_dag import build_training_dag
    from airflow_wmltrain.settings import Settings

    assert (Settings().training_retries, Settings().training_retry_delay) == (2, 30)
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__TRAINING_RETRIES", "3")
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__TRAINING_RETRY_DELAY", "5")
    task = build_training_dag().get_task("train")
    assert task.retries == 3
    assert task.retry_delay == timedelta(seconds=5)
    assert build_training_dag(retries=0).get_task("train").retries == 0


def test_no_hand_written_polling_loop_is_left() -> None:
    import re

    root = Path(__file__).resolve().parents[2] / "airflow_wmltrain"
    for name in ("service/runs.py", "service/api.py", "cli/runs.py", "cli/train.py"):
        assert not re.search(r"time\.sleep\(", (root / name).read_text()), name


def test_retention_logs_the_state_by_its_name() -> None:
    from datetime import datetime, timezone

    from airflow_wmltrain.service.retention import drop_expired_runs

    entry = {"dag_id": "wmltrain_training", "run_id": "training-old", "task_id": "train", "map_index": -1}
    ti = {**entry, "dag_run_id": "training-old", "state": "success", "try_number": 1}

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if path.endswith("/taskInstances/~/xcomEntries"):
            return {"xcom_entries": [entry], "total_entries": 1}
        if path == "/dags/~/dagRuns/~/taskInstances/list":
            return {"task_instances": [ti], "total_entries": 1}
        if path.endswith(STATUS_XCOM_KEY):
            return {"value": status("training-old", "COMPLETED")}
        return {"dag_runs": [], "connections": [], "total_entries": 0}

    messages: list[str] = []

    class Log:
        def info(self, message: str, *args: Any) -> None:
            messages.append(message % args)

    now = datetime(2026, 12, 30, tzinfo=timezone.utc)
    assert drop_expired_runs(FakeApi(handler), now=now, days=7, log=Log()) == ["training-old"]
    assert "(n, COMPLETED, submitted 2026-11-30T10:00:00.000Z)" in messages[0], messages


def test_waits_for_a_task_to_start_and_to_stop_cost_one_call_per_look() -> None:
    record = TrainingRunRecord("training-w", "wmltrain_training", "training-w", "train")
    running = {"state": "running", "try_number": 1}
    api = FakeApi(scripted({TI: [{"state": "queued"}, running], XCOM: [None]}))
    assert runs.wait_for_task(api, record, options=fake_options(api)).ti_state == "running"
    one_call_per_look(api)

    api = FakeApi(
        scripted({TI: [running, {"state": "restarting"}, {"state": "failed", "try_number": 1}], XCOM: [None]})
    )
    assert runs.wait_not_running(api, record, options=fake_options(api)).ti_state == "failed"
    one_call_per_look(api, final_calls=2)  # the end: the task instance, then the final document
    with pytest.raises(WaitTimeoutError, match="training-w to stop"):
        runs.wait_not_running(
            FakeApi(scripted({TI: [running], XCOM: [None]})), record, options=fake_options(api, timeout=60)
        )


def test_moved_connections_are_deleted_for_one_run_and_swept_for_runs_gone() -> None:
    listed = [
        "wmltrain_training_a_data",
        "wmltrain_training_a_results",
        "wmltrain_training_gone_data",
        "wmltrain_training_gone_results",
        "wmltrain_other_data",  # not made by wmltrain train
        "aws_default",
    ]

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if method == "GET":
            return {"connections": [{"connection_id": c} for c in listed], "total_entries": len(listed)}
        if path.endswith("_results"):
            raise ApiNotFoundError("HTTP 404")  # already gone: not counted as removed
        return None

    api = FakeApi(handler)
    assert runs.delete_moved_connections(api, "training-a") == ["wmltrain_training_a_data"]
    assert api.calls == [
        "DELETE /connections/wmltrain_training_a_data",
        "DELETE /connections/wmltrain_training_a_results",
    ]
    api = FakeApi(handler)
    assert runs.sweep_moved_connections(api, {"training-a"}) == ["wmltrain_training_gone_data"]
    assert [c for c in api.calls if c.startswith("DELETE")] == [
        "DELETE /connections/wmltrain_training_gone_data",
        "DELETE /connections/wmltrain_training_gone_results",
    ]


def test_list_asks_the_providers_endpoint_once_for_every_run() -> None:
    rows = [
        {
            "dag_id": "grid",
            "run_id": "r1",
            "task_id": "train",
            "map_index": i,
            "value": status(f"training-g{i}", "COMPLETED"),
            "state": "success",
            "try_number": 2,
            "note": "",
            "end_date": "2026-12-01T10:00:00+00:00",
        }
        for i in range(500)
    ]
    asked: list[dict[str, Any]] = []

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if path == "/wmltrain/runs":
            asked.append(params)
            wanted = params.get("training_id")
            found = [r for r in rows if wanted in (None, r["value"]["training_id"])]
            return {"runs": found, "total_entries": len(found)}
        if path == RUNS:
            return {"dag_runs": [], "total_entries": 0}
        raise AssertionError(f"unexpected call {method} {path}")

    api = FakeApi(handler, plugin=True)
    records = list_runs(api)
    assert len(records) == 500
    assert {r.try_number for r in records} == {2}
    assert api.calls == ["GET /wmltrain/runs", f"GET {RUNS}"]
    assert find_run(api, "training-g7").map_index == 7
    assert asked[-1] == {"training_id": "training-g7"}


def test_a_server_without_the_endpoint_answers_the_ui_page_and_the_public_api_is_asked() -> None:
    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if path == "/wmltrain/runs":
            return "<!doctype html><html>Airflow</html>"  # the UI's catch-all route
        if path.endswith("/taskInstances/~/xcomEntries"):
            return {"xcom_entries": [], "total_entries": 0}
        if path == RUNS:
            return {"dag_runs": [], "total_entries": 0}
        raise AssertionError(f"unexpected call {method} {path}")

    api = FakeApi(handler, plugin=True)
    assert list_runs(api) == []
    assert "GET /dags/~/dagRuns/~/taskInstances/~/xcomEntries" in api.calls
