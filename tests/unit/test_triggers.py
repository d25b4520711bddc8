"""Triggers, sensor and link without the real services: serialization, and the container trigger's loop
against a small stand-in Docker Engine API (a real HTTP server on loopback that answers what a daemon
answers: 5xx, 404, 400, then the container's state).  The same loops against a real Docker daemon and a
real object store are in ``tests/integration/test_triggers.py`` and ``tests/integration/test_sensor.py``.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from airflow.sdk.module_loading import import_string
from airflow.sdk.serde import deserialize, serialize

from airflow_wmltrain.hooks.docker import TrainingDockerHook
from airflow_wmltrain.lifecycle import RunState, RunStatus, results_location
from airflow_wmltrain.links.training_run import RESULTS_LOCATION_KEY, TrainingResultsLink
from airflow_wmltrain.manifest import ConnectionId
from airflow_wmltrain.sensors.training_run import TrainingRunSensor
from airflow_wmltrain.triggers.training_run import (
    TrainingRunTrigger,
    TrainingStatusTrigger,
    results_reference,
)
from tests.unit.fakes import FakeDocker as StandInDocker

CONTAINER = "f" * 64
RUNNING = {
    "State": {"Status": "running", "ExitCode": 0, "OOMKilled": False, "FinishedAt": "0001-01-01T00:00:00Z"}
}
EXITED = {
    "State": {"Status": "exited", "ExitCode": 3, "OOMKilled": False, "FinishedAt": "2025-01-02T03:04:05.6Z"}
}


def run_trigger(trigger: Any, timeout: float = 60) -> list[dict[str, Any]]:
    """Every event a trigger fires until its ``run()`` returns (a single-event trigger stops after one)."""

    async def collect() -> list[dict[str, Any]]:
        events = []
        async for event in trigger.run():
            events.append(event.payload)
        return events

    return asyncio.run(asyncio.wait_for(collect(), timeout))


def round_trip(trigger: Any) -> tuple[str, dict[str, Any]]:
    """Serialize a trigger as the task runner does, through JSON, and build it again as the triggerer does."""
    classpath, kwargs = trigger.serialize()
    stored = json.loads(json.dumps(serialize(kwargs)))
    rebuilt = import_string(classpath)(**deserialize(stored))
    assert type(rebuilt) is type(trigger)
    result: tuple[str, dict[str, Any]] = rebuilt.serialize()
    return result


# --- serialization ----------------------------------------------------------------------------------------


def test_training_run_trigger_round_trips() -> None:
    trigger = TrainingRunTrigger(
        training_id="training-abc_1",
        container_id=CONTAINER,
        docker_host=TrainingDockerHook(
            docker_url="tcp://gpu-host:2376", tls_verify=True, tls_hostname=False
        ).to_dict(),
        poll_interval=10.0,
        halt={"training_id": "training-abc_1", "grace": 30, "manifest": {"a": [1, 2]}},
        metrics={"interval": 30.0, "owner": {"dag_id": "d", "run_id": "r", "task_id": "t", "map_index": 2}},
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_wmltrain.triggers.training_run.TrainingRunTrigger"
    assert set(kwargs) == {
        "training_id",
        "container_id",
        "docker_host",
        "poll_interval",
        "halt",
        "metrics",
        "deferred_at",
    }
    assert round_trip(trigger) == (classpath, kwargs)


def test_training_run_trigger_round_trips_without_halt() -> None:
    trigger = TrainingRunTrigger(
        training_id="training-x",
        container_id=CONTAINER,
        docker_host={"docker_url": "unix:///d.sock"},
        poll_interval=1,
    )
    assert trigger.serialize()[1]["halt"] is None
    assert round_trip(trigger) == trigger.serialize()


def test_training_run_trigger_repr_leaves_out_the_halt_kwargs() -> None:
    trigger = TrainingRunTrigger(
        training_id="training-x",
        container_id=CONTAINER,
        docker_host={"docker_url": "unix:///d.sock"},
        poll_interval=1,
        halt={"manifest": {"password": "s3cr3t-value"}},
    )
    assert "s3cr3t-value" not in repr(trigger)
    assert "training-x" in repr(trigger)


def test_training_status_trigger_round_trips() -> None:
    trigger = TrainingStatusTrigger(
        training_id="training-abc",
        results={"type": "swift", "bucket": "results", "conn_id": "swift_results"},
        poll_interval=30.0,
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_wmltrain.triggers.training_run.TrainingStatusTrigger"
    assert kwargs == {
        "training_id": "training-abc",
        "results": {"type": "swift", "bucket": "results", "conn_id": "swift_results"},
        "poll_interval": 30.0,
        "deferred_at": trigger.deferred_at,
    }
    assert round_trip(trigger) == (classpath, kwargs)


def test_results_reference_holds_only_a_connection_id() -> None:
    ref = results_reference("s3", "my-results", "aws_results")
    assert (ref.type, ref.bucket) == ("s3", "my-results")
    assert ref.connection == ConnectionId(conn_id="aws_results")
    assert results_reference("swift", "c", "swift_default").type == "swift"
    assert results_location("swift", "c", "training-1") == "swift://c/training-1/"
    with pytest.raises(ValueError, match="not one of s3, swift"):
        results_reference("gcs", "b", "c")
    with pytest.raises(ValueError, match="connection id is empty"):
        results_reference("s3", "b", "")


def test_status_trigger_with_a_bad_store_fires_an_error() -> None:
    trigger = TrainingStatusTrigger(
        training_id="training-abc", results={"type": "ftp", "bucket": "b", "conn_id": "c"}, poll_interval=0.01
    )
    [event] = run_trigger(trigger)
    assert event["status"] == "error"
    assert "not one of s3, swift" in event["message"]


# --- sensor and link pieces -------------------------------------------------------------------------------


def test_failure_message_carries_code_and_message() -> None:
    status = RunStatus(training_id="training-abc").advance(RunState.PENDING)
    failed = status.fail(RunState.FAILED, "C201", "the training process exited with status 3")
    assert failed.failure_message() == "training-abc FAILED: C201 the training process exited with status 3"
    halted = status.advance(RunState.HALTED)
    assert halted.failure_message() == "training-abc HALTED: no reason was recorded"


def test_sensor_refuses_an_unknown_results_type() -> None:
    with pytest.raises(ValueError, match="'s3' or 'swift'"):
        TrainingRunSensor(task_id="wait", training_id="training-a", results_bucket="b", results_type="gcs")
    sensor = TrainingRunSensor(
        task_id="wait", training_id="training-a", results_bucket="b", results_type="swift"
    )
    assert sensor.conn_id == "swift_default"
    assert sensor.location == "swift://b/training-a/"
    assert set(sensor.template_fields) == {"training_id", "results_bucket", "results_conn_id"}
    assert [link.name for link in sensor.operator_extra_links] == ["Training results"]


class RecordingTi:
    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def test_link_persist_pushes_the_location_and_the_link_itself() -> None:
    ti = RecordingTi()
    TrainingResultsLink.persist({"ti": ti}, "s3://results/training-a/")  # type: ignore[typeddict-item]
    assert ti.pushed == {
        RESULTS_LOCATION_KEY: "s3://results/training-a/",
        "_link_TrainingResultsLink": "s3://results/training-a/",
    }
    assert TrainingResultsLink().name == "Training results"


# --- the container trigger against a stand-in Docker Engine API --------------------------------------------


class FakeDocker(StandInDocker):
    """The stand-in daemon holding one running container, ``CONTAINER``, whose ``GET /containers/<id>/json``
    is answered from a script of (status, body) answers (the last one repeats)."""

    def __init__(self, script: list[tuple[int, dict[str, Any]]]) -> None:
        super().__init__(inspect_script=script)
        self.add_container("wmltrain-training-fake", container_labels={}, container_id=CONTAINER)

    def trigger(self, **kwargs: Any) -> TrainingRunTrigger:
        return TrainingRunTrigger(
            training_id="training-fake",
            container_id=CONTAINER,
            docker_host=TrainingDockerHook(docker_url=self.url, api_version="1.41", timeout=5).to_dict(),
            poll_interval=0.02,
            **kwargs,
        )


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TrainingRunTrigger, "max_backoff", 0.05)


def test_container_trigger_retries_5xx_then_fires_one_exited_event(
    fast_backoff: None, capfd: pytest.CaptureFixture[str]
) -> None:
    script = [(500, {"message": "daemon busy"})] * 3 + [(200, RUNNING)] * 2 + [(200, EXITED)]
    with FakeDocker(script) as docker_api:
        events = run_trigger(docker_api.trigger())
    assert events == [
        {
            "status": "exited",
            "training_id": "training-fake",
            "docker_url": docker_api.url,
            "container_id": CONTAINER,
            "container_status": "exited",
            "exit_code": 3,
            "oom_killed": False,
            "finished_at": "2025-01-02T03:04:05.6Z",
            "docker_error": "",
        }
    ]
    assert docker_api.inspects == 6
    out, err = capfd.readouterr()  # Airflow's structlog writes the trigger's log lines to the console
    text = out + err
    assert "Waiting for container ffffffffffff of training run training-fake" in text
    assert "try 3 of 10" in text
    assert "answers again" in text


def test_container_trigger_reports_a_removed_container(fast_backoff: None) -> None:
    with FakeDocker([(200, RUNNING), (404, {"message": f"No such container: {CONTAINER}"})]) as docker_api:
        [event] = run_trigger(docker_api.trigger())
    assert event["status"] == "error"
    assert event["training_id"] == "training-fake"
    assert event["container_id"] == CONTAINER
    assert f"no longer exists on {docker_api.url}" in event["message"]


def test_container_trigger_does_not_retry_a_client_error(fast_backoff: None) -> None:
    with FakeDocker([(400, {"message": "bad parameter"})]) as docker_api:
        [event] = run_trigger(docker_api.trigger())
    assert event["status"] == "error"
    assert "refused to inspect" in event["message"]
    assert docker_api.inspects == 1


def test_container_trigger_gives_up_after_ten_failed_tries(fast_backoff: None) -> None:
    with FakeDocker([(503, {"message": "unavailable"})]) as docker_api:
        [event] = run_trigger(docker_api.trigger())
    assert event["status"] == "error"
    assert "no answer in 10 tries" in event["message"]
    assert docker_api.inspects == 10


def test_container_trigger_survives_an_unreachable_host(fast_backoff: None) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    trigger = TrainingRunTrigger(
        training_id="training-x",
        container_id=CONTAINER,
        docker_host=TrainingDockerHook(
            docker_url=f"tcp://127.0.0.1:{port}", api_version="1.41", timeout=2
        ).to_dict(),
        poll_interval=0.01,
    )
    [event] = run_trigger(trigger)
    assert event["status"] == "error"
    assert "in 10 tries" in event["message"]


def test_on_kill_without_halt_kwargs_stops_the_container(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__HALT_GRACE_PERIOD", "7")
    with FakeDocker([(200, RUNNING)]) as docker_api:
        asyncio.run(docker_api.trigger().on_kill())
    assert len(docker_api.stops) == 1
    assert docker_api.stops[0].endswith(f"/containers/{CONTAINER}/stop?t=7")


def test_on_kill_stops_the_container_when_halt_run_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__HALT_GRACE_PERIOD", "5")
    with FakeDocker([(200, RUNNING)]) as docker_api:
        # halt_run refuses kwargs it does not know: the container is stopped all the same.
        asyncio.run(docker_api.trigger(halt={"not_a_halt_run_argument": 1}).on_kill())
    assert [path.rsplit("/", 1)[-1] for path in docker_api.stops] == ["stop?t=5"]


# --- the hold after a deferral (Airflow's stale defer-exit race) --------------------------------------------


@pytest.mark.trigger_settle
def test_an_answer_right_after_the_deferral_is_held_until_the_settle_time(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Airflow 3.3 fails a deferred task whose trigger fires before the scheduler has read the executor's
    success of the try that deferred (apache/airflow#72716): the container trigger must not fire an
    answer it has at once (the container ended right after the deferral) before ``settle`` seconds."""
    import time

    monkeypatch.setattr(TrainingRunTrigger, "settle", 1.5)
    with FakeDocker([(200, EXITED)]) as docker_api:
        trigger = docker_api.trigger()
        began = time.time()
        [event] = run_trigger(trigger)
        waited = time.time() - began
    assert event["status"] == "exited"
    assert waited >= 1.5 - (began - trigger.deferred_at) - 0.05
    captured = capfd.readouterr()
    assert "once Airflow has seen the deferred try leave" in captured.out + captured.err


@pytest.mark.trigger_settle
def test_a_trigger_rebuilt_long_after_its_deferral_does_not_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """``deferred_at`` travels in the kwargs: after a triggerer restart the hold is not served again."""
    import time

    monkeypatch.setattr(TrainingRunTrigger, "settle", 30.0)
    with FakeDocker([(200, EXITED)]) as docker_api:
        kwargs = docker_api.trigger().serialize()[1]
        trigger = TrainingRunTrigger(**{**kwargs, "deferred_at": time.time() - 60})
        began = time.time()
        [event] = run_trigger(trigger, timeout=10)
    assert event["status"] == "exited"
    assert time.time() - began < 10
