"""Metrics collected while a run trains, on the real services: ``TrainingRunOperator`` run in-process
(a stand-in task instance records its XComs) against the stand-in GPU Docker daemon and the services' S3.
A training script writes ``$RESULT_DIR/metrics.jsonl`` and log lines for a few seconds; points must be
published in ``_status.json`` and the status XCom while the run is ``PROCESSING`` — by the worker's log
follower and watcher, and by the trigger's looks (the container's new log lines since a time stamp and
``metrics.jsonl`` through the Docker archive API) — and stored in full at the end.  These tests run this
checkout's code (no Airflow scheduler involved).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import TaskDeferred

from airflow_wmltrain.hooks.docker import TrainingDockerHook
from airflow_wmltrain.lifecycle import STATUS_FILE
from airflow_wmltrain.operators.training_run import TrainingRunOperator
from airflow_wmltrain.runtime.workspace import CONTAINER_DIRS
from airflow_wmltrain.training_id import derive_training_id
from airflow_wmltrain.triggers import training_run as trigger_module
from tests.integration.test_training_run import (
    _conn,
    _env_for,
    _script_dag,
    _training_id,
    airflow_runner,  # noqa: F401  (fixture)
    buckets,  # noqa: F401  (fixture)
)
from tests.integration.training_helpers import REPO_ROOT, AirflowRunner, manifest, model_zip, parse_states
from tests.unit.conftest import FakeTi

pytestmark = pytest.mark.integration

STEPS = 6
TRAIN_SH = f"""\
i=1
while [ $i -le {STEPS} ]; do
  echo "{{\\"step\\": $i, \\"loss\\": 0.$((10 - i))}}" >> "$RESULT_DIR/metrics.jsonl"
  echo "step $i acc=0.$i"
  sleep 1
  i=$((i + 1))
done
echo '{{"accuracy": 0.99}}' > "$RESULT_DIR/metrics.json"
"""
PATTERN = r"step (?P<step>\d+) acc=(?P<accuracy>[0-9.]+)"
EXPECTED = [{"step": i, "loss": (10 - i) / 10, "accuracy": i / 10} for i in range(1, STEPS + 1)]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """The staging directory: a folder the Docker daemon mounts into the training container."""
    path = Path(tempfile.mkdtemp(prefix="wmltrain-metrics-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_op(
    services: dict[str, str],
    store_credentials: dict[str, str],
    bucket: str,
    shared_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., TrainingRunOperator]:
    for option, value in {
        "STAGING_DIR": str(shared_dir / "staging"),
        "FRAMEWORKS": json.dumps({"busybox": {"1": {"image": services["WMLTRAIN_TEST_IMAGE"]}}}),
        "GPU_POLL_INTERVAL": "1",
        "HALT_GRACE_PERIOD": "2",
        "METRICS_INTERVAL": "1",
    }.items():
        monkeypatch.setenv(f"AIRFLOW__WMLTRAIN__{option}", value)
    connection = {
        "endpoint_url": store_credentials["s3_endpoint"],
        "aws_access_key_id": store_credentials["user"],
        "aws_secret_access_key": store_credentials["key"],
    }
    zip_path = model_zip(tmp_path / "model.zip", {"train.sh": TRAIN_SH})

    def make(**kwargs: Any) -> TrainingRunOperator:
        params: dict[str, Any] = {
            "task_id": "train",
            "manifest": manifest(
                command="sh train.sh", data_bucket=bucket, results_bucket=bucket, connection=connection
            ),
            "model_definition": str(zip_path),
            "docker_url": services["WMLTRAIN_GPU_DOCKER_HOST"],
            "timeout": 60,
            "network_mode": "none",
            "metrics_pattern": PATTERN,
            "deferrable": False,
        }
        params.update(kwargs)
        return TrainingRunOperator(**params)

    return make


def new_ti() -> FakeTi:
    return FakeTi(dag_id="metrics_it", run_id=f"manual__{uuid.uuid4().hex[:8]}")


def status_in(s3_client: Any, bucket: str, ti: FakeTi) -> dict[str, Any] | None:
    training_id = derive_training_id(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
    try:
        body = s3_client.get_object(Bucket=bucket, Key=f"{training_id}/{STATUS_FILE}")["Body"].read()
    except s3_client.exceptions.NoSuchKey:
        return None
    document: dict[str, Any] = json.loads(body)
    return document


def check_final(result: dict[str, Any], document: dict[str, Any] | None) -> None:
    assert result["state"] == "COMPLETED"
    assert result["metrics"] == {"loss": 0.4, "accuracy": 0.99}  # metrics.json wins
    assert document is not None
    assert document["state"] == "COMPLETED"
    assert document["steps"] == EXPECTED


def test_the_worker_publishes_points_while_the_run_trains(
    make_op: Callable[..., TrainingRunOperator], s3_client: Any, bucket: str
) -> None:
    ti = new_ti()
    op = make_op()
    outcome: list[Any] = []
    errors: list[BaseException] = []

    def execute() -> None:
        try:
            outcome.append(op.execute({"ti": ti, "task_instance": ti}))  # type: ignore[arg-type]
        except BaseException as err:
            errors.append(err)

    worker = threading.Thread(target=execute, daemon=True)
    worker.start()
    seen_in_bucket: list[dict[str, Any]] = []
    deadline = time.monotonic() + 600  # the shared GPU host may be busy with others' runs first
    while worker.is_alive() and time.monotonic() < deadline:
        document = status_in(s3_client, bucket, ti)
        if document is not None and document["state"] == "PROCESSING" and document["steps"]:
            seen_in_bucket.append(document)
        time.sleep(0.3)
    worker.join(timeout=60)
    assert not worker.is_alive(), "the run did not end in time"
    assert not errors, errors
    live = [d for d in ti.published() if d["state"] == "PROCESSING" and d["steps"]]
    assert live, "no point was published while the run was PROCESSING"
    assert seen_in_bucket, "_status.json never held points while the run was PROCESSING"
    assert 1 <= len(live[0]["steps"]) < STEPS  # published during the run, not only at its end
    assert all(point in EXPECTED for d in live for point in d["steps"][:-1])  # the last may be partial
    [result] = outcome
    check_final(result, status_in(s3_client, bucket, ti))


@pytest.fixture
def fernet_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The triggerer writes ``_status.json`` with the manifest's inline credentials, sealed with Airflow's
    Fernet key (as a halt from the triggerer does); a deployment has one."""
    from airflow.sdk.crypto import get_fernet
    from cryptography.fernet import Fernet

    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
    get_fernet.cache_clear()
    yield
    get_fernet.cache_clear()


@pytest.mark.usefixtures("fernet_key")
def test_the_trigger_publishes_points_while_the_run_trains(
    make_op: Callable[..., TrainingRunOperator],
    s3_client: Any,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    xcoms: list[dict[str, Any]] = []
    monkeypatch.setattr(trigger_module, "set_xcom", lambda key, value, **where: xcoms.append(value))
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__DEFER_AFTER", "0")  # defer at once: the trigger is under test
    ti = new_ti()
    op = make_op(deferrable=True)
    context: Any = {"ti": ti, "task_instance": ti}
    with pytest.raises(TaskDeferred) as caught:
        op.execute(context)
    trigger = caught.value.trigger
    assert isinstance(trigger, trigger_module.TrainingRunTrigger)
    event: Any = None
    deadline = time.monotonic() + 120
    seen_in_bucket: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        event = trigger.look()
        if isinstance(event, dict):
            break
        document = status_in(s3_client, bucket, ti)
        if document is not None and document["state"] == "PROCESSING" and document["steps"]:
            seen_in_bucket.append(document)
        time.sleep(0.5)
    trigger.hook.close()
    assert isinstance(event, dict), event
    live = [d for d in xcoms if d["state"] == "PROCESSING" and d["steps"]]
    assert live, "the trigger published no point while the run was PROCESSING"
    assert seen_in_bucket, "_status.json never held points while the run was PROCESSING"
    assert 1 <= len(live[0]["steps"]) < STEPS
    last = live[-1]["steps"]
    assert [p["step"] for p in last] == list(range(1, len(last) + 1))  # each line once, in order
    result = op.execute_complete(context, event)
    check_final(result, status_in(s3_client, bucket, ti))


def test_the_archive_read_refuses_a_link_and_reads_a_regular_file(services: dict[str, str]) -> None:
    hook = TrainingDockerHook(docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"], timeout=60)
    client = hook.api_client
    where = CONTAINER_DIRS["RESULT_DIR"]
    script = (
        f"mkdir -p {where} && ln -s /etc/passwd {where}/metrics.jsonl && printf 'abcdef' > {where}/ok.jsonl"
    )
    container = client.create_container(
        services["WMLTRAIN_TEST_IMAGE"], command=["sh", "-c", script + " && sleep 30"]
    )
    try:
        client.start(container["Id"])
        deadline = time.monotonic() + 30
        found = None
        while time.monotonic() < deadline and found is None:
            found = hook.read_file(container["Id"], f"{where}/ok.jsonl", offset=2, limit=3)
            time.sleep(0.2)
        assert found == b"cde"
        assert hook.read_file(container["Id"], f"{where}/metrics.jsonl", offset=0, limit=100) is None
        lines, cursor = hook.log_lines_since(container["Id"], None)
        assert lines == []
        assert cursor is None
    finally:
        client.remove_container(container["Id"], force=True)
        hook.close()


# --- through Airflow's own task runner and inline trigger: dag.test() in a worker-like subprocess -------


def test_a_deferred_run_under_dag_test_publishes_from_its_trigger(
    airflow_runner: AirflowRunner,  # noqa: F811
    tmp_path: Path,
    services: dict[str, str],
    s3_client: Any,
    buckets: tuple[str, str],  # noqa: F811
) -> None:
    """The trigger runs where Airflow runs it (``dag.test()``'s inline trigger): its points reach
    ``_status.json`` while the run is ``PROCESSING``, and setting the status XCom from the trigger
    through the Task SDK works (a failure would be warned in the task log)."""
    data, results = buckets
    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_metrics_defer",
        {"train.sh": TRAIN_SH},
        command="sh train.sh",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        deferrable=True,
        poll_interval=1,
        metrics_pattern=PATTERN,
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
    )
    env = {
        **_env_for(dag_file),
        "AIRFLOW__WMLTRAIN__METRICS_INTERVAL": "1",
        "AIRFLOW__WMLTRAIN__DEFER_AFTER": "0",  # defer at once: the trigger is under test
        # This checkout's provider, also where the venv's editable install points at another one.
        "PYTHONPATH": str(REPO_ROOT),
    }
    log = airflow_runner.work / "metrics-defer.log"
    proc = airflow_runner.popen(dag_file, home="metrics-defer", env=env, log=log)
    live: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=results):
                for obj in page.get("Contents", []):
                    if obj["Key"].endswith("/" + STATUS_FILE):
                        body = s3_client.get_object(Bucket=results, Key=obj["Key"])["Body"].read()
                        document = json.loads(body)
                        if document["state"] == "PROCESSING" and document["steps"]:
                            live.append(document)
            time.sleep(0.5)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text(errors="replace")
    assert parse_states(output) == {"train": "success"}, output[-6000:]
    assert "DEFERRED" in output
    assert "Could not publish the run's metrics" not in output, output[-6000:]
    assert "Could not collect the metrics" not in output, output[-6000:]
    assert live, "_status.json never held points while the deferred run was PROCESSING"
    assert 1 <= len(live[0]["steps"]) < STEPS
    training_id = _training_id(output)
    final = json.loads(
        s3_client.get_object(Bucket=results, Key=f"{training_id}/{STATUS_FILE}")["Body"].read()
    )
    assert final["state"] == "COMPLETED"
    assert final["steps"] == EXPECTED
