"""``TrainingRunSensor`` and ``TrainingStatusTrigger`` against real status documents in the real object
store (Swift all-in-one, through its S3 API and its Swift API, reached through Airflow connections), and
the sensor run by a real Airflow with ``dag.test()``: deferrable (trigger run inline), poke and reschedule
modes, a failed run, templated fields, the XCom and the "Training results" link.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

from airflow_wmltrain.errors import BucketNotFoundError
from airflow_wmltrain.lifecycle import STATUS_FILE, RunState, RunStatus
from airflow_wmltrain.sensors.training_run import TrainingRunSensor
from airflow_wmltrain.triggers.training_run import TrainingStatusTrigger
from tests.integration.airflow_fixtures import AirflowDb, airflow_db, airflow_home  # noqa: F401 - fixtures
from tests.integration.storage_helpers import KINDS, ProxyLog, airflow_connection_json

pytestmark = pytest.mark.integration

C201 = "the training process exited with status 3: Traceback ... ValueError: bad learning rate"


# --- status documents -------------------------------------------------------------------------------------


def status_document(training_id: str, state: RunState, location: str = "", **changes: Any) -> dict[str, Any]:
    """A real status document, through the lifecycle's transitions up to ``state``."""
    status = RunStatus(training_id=training_id, name="mnist", results_location=location)
    for step in (RunState.PENDING, RunState.DOWNLOADING, RunState.PROCESSING, RunState.STORING):
        if step.rank > state.rank:
            break
        status = status.advance(step)
    if state is RunState.FAILED:
        status = status.fail(RunState.FAILED, "C201", C201, exit_code=3)
    elif state is RunState.HALTED:
        status = status.fail(RunState.HALTED, "C200", "the run was halted")
    elif state is RunState.COMPLETED:
        status = status.advance(RunState.COMPLETED, **changes)
    return status.to_dict()


class Store:
    """Writes ``<training-id>/_status.json`` documents into a bucket (through the S3 API)."""

    def __init__(self, s3_client: Any, bucket: str) -> None:
        self.s3 = s3_client
        self.bucket = bucket

    def put(self, training_id: str, document: dict[str, Any] | bytes) -> None:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.s3.put_object(Bucket=self.bucket, Key=f"{training_id}/{STATUS_FILE}", Body=body)

    def put_state(self, training_id: str, state: RunState, **changes: Any) -> None:
        self.put(training_id, status_document(training_id, state, **changes))

    def later(self, delay: float, training_id: str, state: RunState, **changes: Any) -> threading.Thread:
        """Write a state after ``delay`` seconds, in the background (a run progressing meanwhile)."""

        def write() -> None:
            time.sleep(delay)
            self.put_state(training_id, state, **changes)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def store(s3_client: Any, bucket: str) -> Store:
    return Store(s3_client, bucket)


@pytest.fixture(params=KINDS)
def kind_conn(
    request: pytest.FixtureRequest, creds: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """``(results_type, conn_id)``: an Airflow connection (``AIRFLOW_CONN_*``) to the store, per API."""
    kind: str = request.param
    conn_id = f"wmltrain_it_results_{kind}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", airflow_connection_json(kind, creds))
    return kind, conn_id


def new_id() -> str:
    return f"training-{uuid.uuid4().hex[:10]}"


def make_sensor(
    kind_conn: tuple[str, str], bucket: str, training_id: str, **kwargs: Any
) -> TrainingRunSensor:
    kind, conn_id = kind_conn
    return TrainingRunSensor(
        task_id=f"wait_{uuid.uuid4().hex[:6]}",
        training_id=training_id,
        results_bucket=bucket,
        results_type=kind,
        results_conn_id=conn_id,
        **kwargs,
    )


class RecordingTi:
    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def run_trigger(trigger: TrainingStatusTrigger, timeout: float = 60) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    return asyncio.run(asyncio.wait_for(collect(), timeout))


# --- poke -------------------------------------------------------------------------------------------------


def test_poke_waits_while_missing_and_running_then_returns_the_result(
    kind_conn: tuple[str, str], bucket: str, store: Store, capfd: pytest.CaptureFixture[str]
) -> None:
    training_id = new_id()
    sensor = make_sensor(kind_conn, bucket, training_id)
    assert not sensor.poke({})  # type: ignore[arg-type]
    assert not sensor.poke({})  # type: ignore[arg-type]
    out = "".join(capfd.readouterr())
    assert out.count(f"No run with id {training_id} has written a status") == 1  # said once

    store.put_state(training_id, RunState.PROCESSING)
    assert not sensor.poke({})  # type: ignore[arg-type]

    location = f"{kind_conn[0]}://{bucket}/{training_id}/"
    store.put_state(
        training_id, RunState.COMPLETED, location=location, metrics={"accuracy": 0.97, "loss": 0.1}
    )
    done = sensor.poke({})  # type: ignore[arg-type]
    assert done
    assert done.xcom_value == {  # type: ignore[union-attr]
        "training_id": training_id,
        "state": "COMPLETED",
        "results_location": location,
        "gpus": [],
        "hyperparameters": {},
        "metrics": {"accuracy": 0.97, "loss": 0.1},
    }


@pytest.mark.parametrize(
    ("state", "expected"),
    [(RunState.FAILED, f"FAILED: C201 {C201}"), (RunState.HALTED, "HALTED: C200 the run was halted")],
)
def test_poke_fails_an_unsuccessful_run_with_its_code_and_message(
    kind_conn: tuple[str, str], bucket: str, store: Store, state: RunState, expected: str
) -> None:
    training_id = new_id()
    store.put_state(training_id, state)
    sensor = make_sensor(kind_conn, bucket, training_id)
    with pytest.raises(AirflowFailException) as info:
        sensor.poke({})  # type: ignore[arg-type]
    assert str(info.value) == f"{training_id} {expected}"


def test_poke_fails_on_an_unreadable_status_document(
    kind_conn: tuple[str, str], bucket: str, store: Store
) -> None:
    training_id = new_id()
    store.put(training_id, b'{"training_id": "' + training_id.encode() + b'", "history": [')
    sensor = make_sensor(kind_conn, bucket, training_id)
    with pytest.raises(AirflowException, match=rf"cannot read the status of {training_id}: .*is not JSON"):
        sensor.poke({})  # type: ignore[arg-type]

    store.put(training_id, {"training_id": training_id, "history": [{"state": "SLEEPING", "at": "x"}]})
    with pytest.raises(AirflowException, match="not a training-run status document"):
        sensor.poke({})  # type: ignore[arg-type]


def test_poke_fails_when_the_bucket_does_not_exist(kind_conn: tuple[str, str], bucket: str) -> None:
    sensor = make_sensor(kind_conn, f"{bucket}-missing", new_id())
    with pytest.raises(AirflowFailException, match="does not exist") as info:  # a retry cannot fix it
        sensor.poke({})  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, BucketNotFoundError)


# --- execute: poke mode, deferrable mode ------------------------------------------------------------------


def test_execute_in_poke_mode_waits_for_the_end(
    kind_conn: tuple[str, str], bucket: str, store: Store
) -> None:
    training_id = new_id()
    store.put_state(training_id, RunState.PROCESSING)
    writer = store.later(1.5, training_id, RunState.COMPLETED, metrics={"accuracy": 0.9})
    sensor = make_sensor(kind_conn, bucket, training_id, poke_interval=0.3, timeout=60)
    ti = RecordingTi()
    result = sensor.execute({"ti": ti})  # type: ignore[typeddict-item]
    writer.join()
    assert result["state"] == "COMPLETED"
    assert result["metrics"] == {"accuracy": 0.9}
    location = f"{kind_conn[0]}://{bucket}/{training_id}/"
    assert ti.pushed["results_location"] == location
    assert ti.pushed["_link_TrainingResultsLink"] == location


def test_execute_deferrable_defers_then_completes(
    kind_conn: tuple[str, str], bucket: str, store: Store
) -> None:
    training_id = new_id()
    store.put_state(training_id, RunState.PROCESSING)
    sensor = make_sensor(kind_conn, bucket, training_id, deferrable=True, poke_interval=0.3, timeout=600)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({"ti": RecordingTi()})  # type: ignore[typeddict-item]
    trigger = deferred.value.trigger
    assert isinstance(trigger, TrainingStatusTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.timeout == timedelta(seconds=600)
    kind, conn_id = kind_conn
    assert trigger.serialize()[1] == {
        "training_id": training_id,
        "results": {"type": kind, "bucket": bucket, "conn_id": conn_id},
        "poll_interval": 0.3,
        "deferred_at": trigger.deferred_at,
    }

    writer = store.later(1.0, training_id, RunState.COMPLETED, metrics={"accuracy": 0.95})
    [event] = run_trigger(trigger)
    writer.join()
    assert (event["status"], event["training_id"]) == ("success", training_id)
    assert event["run"]["state"] == "COMPLETED"
    assert event["run"]["error"] is None
    assert sensor.execute_complete({}, event) == {  # type: ignore[arg-type]
        "training_id": training_id,
        "state": "COMPLETED",
        "results_location": f"{kind}://{bucket}/{training_id}/",
        "gpus": [],
        "hyperparameters": {},
        "metrics": {"accuracy": 0.95},
    }


def test_execute_deferrable_returns_at_once_when_already_over(
    kind_conn: tuple[str, str], bucket: str, store: Store
) -> None:
    training_id = new_id()
    store.put_state(training_id, RunState.COMPLETED)
    sensor = make_sensor(kind_conn, bucket, training_id, deferrable=True)
    assert sensor.execute({"ti": RecordingTi()})["state"] == "COMPLETED"  # type: ignore[typeddict-item]


def test_deferred_wait_for_a_failed_run_fails_with_c201(
    kind_conn: tuple[str, str], bucket: str, store: Store
) -> None:
    training_id = new_id()
    kind, conn_id = kind_conn
    trigger = TrainingStatusTrigger(
        training_id=training_id,
        results={"type": kind, "bucket": bucket, "conn_id": conn_id},
        poll_interval=0.2,
    )
    writer = store.later(0.8, training_id, RunState.FAILED)  # missing first: the trigger keeps waiting
    [event] = run_trigger(trigger)
    writer.join()
    assert event["status"] == "failed"
    assert event["run"]["state"] == "FAILED"
    assert event["run"]["error"] == {"code": "C201", "message": C201}
    sensor = make_sensor(kind_conn, bucket, training_id, deferrable=True)
    with pytest.raises(
        AirflowFailException, match=f"^{training_id} FAILED: C201 the training process exited"
    ):
        sensor.execute_complete({}, event)  # type: ignore[arg-type]


def test_status_trigger_errors(kind_conn: tuple[str, str], bucket: str, store: Store) -> None:
    kind, conn_id = kind_conn
    training_id = new_id()
    store.put(training_id, b"not json")
    [event] = run_trigger(
        TrainingStatusTrigger(
            training_id=training_id,
            results={"type": kind, "bucket": bucket, "conn_id": conn_id},
            poll_interval=0.1,
        )
    )
    assert event["status"] == "error"
    assert "is not JSON" in event["message"]

    [event] = run_trigger(
        TrainingStatusTrigger(
            training_id=training_id,
            results={"type": kind, "bucket": f"{bucket}-missing", "conn_id": conn_id},
            poll_interval=0.1,
        )
    )
    assert event["status"] == "error"
    assert "does not exist" in event["message"]
    sensor = make_sensor(kind_conn, bucket, training_id)
    with pytest.raises(AirflowException, match="does not exist"):
        sensor.execute_complete({}, event)  # type: ignore[arg-type]


# --- in a real Airflow: dag.test() ------------------------------------------------------------------------

DAG_SOURCE = """
from __future__ import annotations

import datetime

from airflow.sdk import DAG, BaseOperator

from airflow_wmltrain.links.training_run import TrainingResultsLink
from airflow_wmltrain.sensors.training_run import TrainingRunSensor


# Pushes the XComs the link reads, without TrainingResultsLink.persist: Airflow's own call of get_link()
# at the end of the task is then the only thing that can store the link.
class PushesResultXComs(BaseOperator):

    operator_extra_links = (TrainingResultsLink(),)

    def execute(self, context):
        context["ti"].xcom_push(key="results_location", value="s3://results/training-link/")

with DAG(
    "wmltrain_sensor_it",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1),
    params={"bucket": "", "conn_id": ""},
) as dag:
    common = dict(
        results_bucket="{{ params.bucket }}",
        results_conn_id="{{ params.conn_id }}",
        poke_interval=0.5,
        timeout=120,
    )
    TrainingRunSensor(
        task_id="wait_deferred", training_id="{{ dag_run.conf['deferred'] }}", deferrable=True, **common
    )
    TrainingRunSensor(
        task_id="wait_rescheduled",
        training_id="{{ dag_run.conf['rescheduled'] }}",
        mode="reschedule",
        **common,
    )
    TrainingRunSensor(task_id="wait_failed", training_id="{{ dag_run.conf['failed'] }}", **common)
    PushesResultXComs(task_id="link")
"""


@pytest.fixture
def s3_conn(creds: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    conn_id = "wmltrain_it_dag_results"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", airflow_connection_json("s3", creds))
    return conn_id


def complete_when_read_twice(
    proxy_log: ProxyLog, store: Store, runs: dict[str, dict[str, Any]], timeout: float = 180
) -> threading.Thread:
    """Write ``COMPLETED`` for each run once its status document has been read twice: the sensor's first
    look, then one after it deferred (the trigger's) or was rescheduled; so both surely happened."""

    def watch() -> None:
        pending = dict(runs)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            gets = proxy_log.object_gets(store.bucket)
            for training_id in list(pending):
                if gets.count(f"{training_id}/{STATUS_FILE}") >= 2:
                    store.put_state(training_id, RunState.COMPLETED, **pending.pop(training_id))
            time.sleep(0.3)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sensor_in_a_real_airflow_dag_run(
    airflow_db: AirflowDb,  # noqa: F811 - the fixture imported above
    bucket: str,
    store: Store,
    s3_conn: str,
    proxy_log: ProxyLog,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = {"deferred": new_id(), "rescheduled": new_id(), "failed": new_id()}
    store.put_state(ids["deferred"], RunState.PROCESSING)
    store.put_state(ids["rescheduled"], RunState.DOWNLOADING)
    store.put_state(ids["failed"], RunState.FAILED)
    proxy_log.mark()
    watcher = complete_when_read_twice(
        proxy_log, store, {ids["deferred"]: {"metrics": {"accuracy": 0.99}}, ids["rescheduled"]: {}}
    )
    dag = airflow_db.load_dag(airflow_db.write_dag("wmltrain_sensor_it.py", DAG_SOURCE), "wmltrain_sensor_it")
    dag_run = dag.test(run_conf={**ids, "bucket": bucket, "conn_id": s3_conn})
    watcher.join(timeout=5)
    output = "".join(capfd.readouterr())

    assert airflow_db.task_states(dag_run) == {
        "wait_deferred": "success",
        "wait_rescheduled": "success",
        "wait_failed": "failed",
        "link": "success",
    }
    location = f"s3://{bucket}/{ids['deferred']}/"
    assert airflow_db.xcom(dag_run, "wait_deferred") == {
        "training_id": ids["deferred"],
        "state": "COMPLETED",
        "results_location": location,
        "gpus": [],
        "hyperparameters": {},
        "metrics": {"accuracy": 0.99},
    }
    assert airflow_db.xcom(dag_run, "wait_deferred", "results_location") == location
    # Stored by Airflow itself at the end of the task: what the UI's "Training results" button opens.
    assert airflow_db.xcom(dag_run, "wait_deferred", "_link_TrainingResultsLink") == location
    assert airflow_db.xcom(dag_run, "wait_rescheduled")["state"] == "COMPLETED"
    # get_link() run by Airflow, reading the XCom through the Task SDK.
    assert airflow_db.xcom(dag_run, "link", "_link_TrainingResultsLink") == "s3://results/training-link/"
    # dag.test() logs through logging (caplog); the tasks' and the trigger's lines reach the console (capfd).
    assert "running trigger in line" in caplog.text
    assert "up_for_reschedule" in caplog.text
    assert f"Waiting for training run {ids['deferred']} to end" in output
    assert f"{ids['failed']} FAILED: C201 the training process exited with status 3" in output
