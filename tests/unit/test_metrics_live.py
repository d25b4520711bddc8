"""Metrics collected while a run trains, through ``TrainingRunOperator`` against the stand-in Docker
daemon and the in-memory store: in the worker (the log follower and a watcher of ``metrics.jsonl``) and
in the triggerer (:class:`TrainingRunTrigger`'s looks: the container's new log lines and
``metrics.jsonl`` through the Docker API), published in ``_status.json`` and the status XCom while the
run is ``PROCESSING``, and stored with the run at its end.  Also the Docker reads the trigger uses, and
the refusal of a bad pattern (operator argument, ``[wmltrain]`` setting)."""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_wmltrain.errors import ConfigurationError
from airflow_wmltrain.hooks.docker import LogCursor, TrainingDockerHook
from airflow_wmltrain.lifecycle import STATUS_FILE, STATUS_XCOM_KEY
from airflow_wmltrain.operators.training_run import TrainingRunOperator
from airflow_wmltrain.runtime import labels
from airflow_wmltrain.runtime.workspace import CONTAINER_DIRS
from airflow_wmltrain.settings import Settings
from airflow_wmltrain.training_id import derive_training_id
from airflow_wmltrain.triggers import training_run as trigger_module
from tests.unit.conftest import FakeTi, manifest_doc
from tests.unit.fakes import FakeContainer, FakeDocker, MemoryStore, RunScript

pytestmark = pytest.mark.usefixtures("wmltrain_env", "stores")

PATTERN = r"step (?P<step>\d+) acc=(?P<accuracy>[0-9.]+)"
LOG = "starting\nstep 1 acc=0.5\nnoise\nstep 2 acc=0.75\n"
JSONL = '{"step": 1, "loss": 0.9}\n{"step": 2, "loss": 0.6}\n{"step": 3, "lo'  # the last line unfinished


def training_id_of(ti: FakeTi) -> str:
    return derive_training_id(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)


@pytest.fixture
def make_op(make_op: Callable[..., TrainingRunOperator]) -> Callable[..., TrainingRunOperator]:
    """The operator of tests/unit/conftest.py, collecting metrics from its log lines."""
    return functools.partial(make_op, manifest=manifest_doc(command="sh train.sh"), metrics_pattern=PATTERN)


@pytest.fixture
def fast_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__METRICS_INTERVAL", "1")


def context(ti: FakeTi) -> Any:
    return {"ti": ti, "task_instance": ti}


def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def processing_with_steps(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in documents if d["state"] == "PROCESSING" and d["steps"]]


EXPECTED_LIVE = [
    {"step": 1, "loss": 0.9, "accuracy": 0.5},
    {"step": 2, "loss": 0.6, "accuracy": 0.75},
]


def finish_with_the_last_line(docker_api: FakeDocker, container: FakeContainer) -> None:
    """The training writes the rest of its last line, then ends."""
    results_dir = container.mount_source(CONTAINER_DIRS["RESULT_DIR"])
    assert results_dir is not None
    with Path(results_dir, "metrics.jsonl").open("a") as out:
        out.write('ss": 0.4}\n')
    docker_api.finish(container.id)


# --- in the worker ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fast_metrics")
def test_metrics_are_published_while_the_run_trains_in_the_worker(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    docker_api.run_script = RunScript(running=True, log=LOG, files={"metrics.jsonl": JSONL})
    op = make_op()
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(op.execute(context(ti))), daemon=True)
    worker.start()
    try:
        live = wait_for(lambda: processing_with_steps(ti.published()))
        assert live[-1]["steps"] == EXPECTED_LIVE
        assert live[-1]["metrics"] == {"loss": 0.6, "accuracy": 0.75}
        stored = results.json(f"{training_id_of(ti)}/{STATUS_FILE}")
        assert stored["state"] == "PROCESSING"
        assert stored["steps"] == EXPECTED_LIVE
    finally:
        [container] = docker_api.run_containers()
        finish_with_the_last_line(docker_api, container)
        worker.join(timeout=30)
    [result] = outcome
    assert result["state"] == "COMPLETED"
    assert result["metrics"] == {"loss": 0.4, "accuracy": 0.75}
    final = results.json(f"{training_id_of(ti)}/{STATUS_FILE}")
    assert final["steps"] == [*EXPECTED_LIVE, {"step": 3, "loss": 0.4}]
    assert ti.published()[-1]["steps"] == final["steps"]


def test_a_run_that_writes_no_metrics_has_none(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    docker_api.run_script = RunScript(log="epoch 1\n")
    result = make_op(metrics_pattern=None).execute(context(ti))
    assert result["metrics"] == {}
    assert results.json(f"{training_id_of(ti)}/{STATUS_FILE}")["steps"] == []


def test_metrics_json_wins_over_the_last_points_at_the_end(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi
) -> None:
    docker_api.run_script = RunScript(
        log=LOG, files={"metrics.jsonl": JSONL + 'ss": 0.4}\n', "metrics.json": '{"accuracy": 0.8}'}
    )
    result = make_op().execute(context(ti))
    assert result["metrics"] == {"loss": 0.4, "accuracy": 0.8}


# --- in the triggerer -------------------------------------------------------------------------------------


@pytest.fixture
def xcoms(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The XComs the trigger sets (in the triggerer, ``XCom.set`` goes to the API server)."""
    calls: list[dict[str, Any]] = []

    def set_xcom(key: str, value: Any, **where: Any) -> None:
        calls.append({"key": key, "value": value, **where})

    monkeypatch.setattr(trigger_module, "set_xcom", set_xcom)
    return calls


def test_metrics_are_published_while_the_run_trains_in_the_triggerer(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    xcoms: list[dict[str, Any]],
) -> None:
    ti = FakeTi(map_index=3)
    docker_api.run_script = RunScript(running=True, log=LOG, files={"metrics.jsonl": JSONL})
    op = make_op(deferrable=True)
    with pytest.raises(TaskDeferred) as caught:
        op.execute(context(ti))
    trigger = caught.value.trigger
    assert isinstance(trigger, trigger_module.TrainingRunTrigger)
    kwargs = trigger.serialize()[1]
    assert kwargs["metrics"]["owner"] == {
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": "train",
        "map_index": 3,
    }
    assert kwargs["halt"]["metrics_pattern"] == PATTERN

    assert trigger.look() == "running"
    [xcom] = xcoms
    assert {k: xcom[k] for k in ("key", "dag_id", "run_id", "task_id", "map_index")} == {
        "key": STATUS_XCOM_KEY,
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": "train",
        "map_index": 3,
    }
    assert xcom["value"]["state"] == "PROCESSING"
    assert xcom["value"]["steps"] == EXPECTED_LIVE
    assert results.json(f"{training_id_of(ti)}/{STATUS_FILE}")["steps"] == EXPECTED_LIVE

    assert trigger.look() == "running"  # within the interval: nothing read, nothing published
    assert len(xcoms) == 1

    [container] = docker_api.run_containers()
    finish_with_the_last_line(docker_api, container)
    event = trigger.look()
    assert isinstance(event, dict)
    assert event["status"] == "exited"
    result = op.execute_complete(context(ti), event)
    assert result["metrics"] == {"loss": 0.4, "accuracy": 0.75}
    final = results.json(f"{training_id_of(ti)}/{STATUS_FILE}")
    assert final["state"] == "COMPLETED"
    assert final["steps"] == [*EXPECTED_LIVE, {"step": 3, "loss": 0.4}]


def test_a_trigger_whose_publication_fails_goes_on_waiting(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the API server refused the XCom")

    monkeypatch.setattr(trigger_module, "set_xcom", refuse)
    docker_api.run_script = RunScript(running=True, log=LOG, files={"metrics.jsonl": JSONL})
    with pytest.raises(TaskDeferred) as caught:
        make_op(deferrable=True).execute(context(ti))
    trigger = caught.value.trigger
    assert trigger.look() == "running"  # no exception: metrics never end a wait


# --- the Docker reads of the trigger ----------------------------------------------------------------------


@pytest.fixture
def hook(docker_api: FakeDocker) -> Iterator[TrainingDockerHook]:
    hook = TrainingDockerHook(docker_url=docker_api.url, api_version="1.43", timeout=10)
    yield hook
    hook.close()


def running_container(docker_api: FakeDocker, tmp_path: Path, log: str) -> tuple[FakeContainer, Path]:
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    container = docker_api.add_container(
        "run-x",
        container_labels={labels.ROLE: labels.ROLE_RUN},
        status="running",
        log=log,
        body={
            "HostConfig": {"Mounts": [{"Target": CONTAINER_DIRS["RESULT_DIR"], "Source": str(results_dir)}]}
        },
    )
    return container, results_dir


def test_log_lines_since_gives_each_line_once(
    hook: TrainingDockerHook, docker_api: FakeDocker, tmp_path: Path
) -> None:
    container, _ = running_container(docker_api, tmp_path, "a\nb\n")
    lines, cursor = hook.log_lines_since(container.id, None)
    assert lines == ["a", "b"]
    assert hook.log_lines_since(container.id, cursor)[0] == []
    with docker_api.lock:
        container.log += b"c\nd\n"
    lines, cursor = hook.log_lines_since(container.id, cursor, max_bytes=1)
    assert lines == ["c"]  # bounded: the next look reads on
    assert hook.log_lines_since(container.id, cursor)[0] == ["d"]


def test_a_log_cursor_counts_the_lines_of_one_time_stamp() -> None:
    first = LogCursor.parse("2026-12-01T10:00:00.5Z")
    assert first == LogCursor(seconds=first.seconds if first else 0, nanos=500_000_000)
    assert LogCursor.parse("not a time") is None


def test_read_file_reads_a_regular_file_from_an_offset(
    hook: TrainingDockerHook, docker_api: FakeDocker, tmp_path: Path
) -> None:
    container, results_dir = running_container(docker_api, tmp_path, "")
    (results_dir / "metrics.jsonl").write_bytes(b"0123456789")
    path = f"{CONTAINER_DIRS['RESULT_DIR']}/metrics.jsonl"
    assert hook.read_file(container.id, path, offset=0, limit=100) == b"0123456789"
    assert hook.read_file(container.id, path, offset=4, limit=3) == b"456"
    assert hook.read_file(container.id, f"{CONTAINER_DIRS['RESULT_DIR']}/gone", offset=0, limit=3) is None


def test_read_file_refuses_a_link_and_a_fifo(
    hook: TrainingDockerHook, docker_api: FakeDocker, tmp_path: Path
) -> None:
    import os

    container, results_dir = running_container(docker_api, tmp_path, "")
    (results_dir / "metrics.jsonl").symlink_to("/etc/passwd")
    os.mkfifo(results_dir / "fifo.jsonl")
    where = CONTAINER_DIRS["RESULT_DIR"]
    assert hook.read_file(container.id, f"{where}/metrics.jsonl", offset=0, limit=100) is None
    assert hook.read_file(container.id, f"{where}/fifo.jsonl", offset=0, limit=100) is None


# --- the pattern comes from a DAG author or an admin, and is checked --------------------------------------


def test_a_bad_metrics_pattern_is_refused_when_the_task_is_built(
    make_op: Callable[..., TrainingRunOperator],
) -> None:
    with pytest.raises(
        ValueError, match=r"TrainingRunOperator 'train': metrics_pattern: .* not a regular expression"
    ):
        make_op(metrics_pattern="step (?P<step>")


def test_a_bad_metrics_log_pattern_setting_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__METRICS_LOG_PATTERN", "loss=([0-9.]+)")
    with pytest.raises(ConfigurationError, match=r"\[wmltrain\] metrics_log_pattern.*no named group"):
        Settings.from_airflow_config()
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__METRICS_LOG_PATTERN", "loss=(?P<loss>[0-9.]+)")
    assert Settings.from_airflow_config().metrics_log_pattern == "loss=(?P<loss>[0-9.]+)"


def test_metrics_pattern_is_not_a_template_field() -> None:
    """A submitted run (the bundled DAG's conf or params) cannot give a pattern through a template."""
    assert "metrics_pattern" not in TrainingRunOperator.template_fields


def test_the_setting_is_the_default_pattern(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__METRICS_LOG_PATTERN", PATTERN)
    docker_api.run_script = RunScript(log=LOG)
    result = make_op(metrics_pattern=None).execute(context(ti))
    assert result["metrics"] == {"accuracy": 0.75}
    assert json.dumps(result)  # plain JSON


@pytest.mark.parametrize("key", ["metrics_pattern", "evaluation_metrics"])
def test_a_submitted_manifest_cannot_give_a_pattern(key: str, settings: Settings) -> None:
    from airflow_wmltrain.errors import ManifestError
    from airflow_wmltrain.manifest import load_manifest

    document = manifest_doc(command="sh train.sh")
    document["model_definition"]["execution"][key] = "(a+)+$"
    with pytest.raises(ManifestError, match=key):
        load_manifest(document, settings=settings)
