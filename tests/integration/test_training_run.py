"""TrainingRunOperator end to end: real Airflow (``dag.test()`` in a worker-like subprocess), the real
Docker daemons (plain and stand-in GPU) and the real Swift + S3 store.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from airflow_wmltrain.runtime import labels
from tests.integration.training_helpers import AirflowRunner, manifest, model_zip

CONN_ID = "wmltrain_it_s3"
SWIFT_CONN_ID = "wmltrain_it_swift"

TRAIN_SH = """\
echo "start $(cat /proc/uptime | cut -d' ' -f1)"
echo "GPUS=$NVIDIA_VISIBLE_DEVICES GPU_COUNT=$GPU_COUNT TRAINING_ID=$TRAINING_ID"
echo "args: $*"
ls "$DATA_DIR"
cat "$DATA_DIR/input.txt" > "$RESULT_DIR/copy.txt"
mkdir -p "$RESULT_DIR/model" && echo weights > "$RESULT_DIR/model/weights.bin"
echo '{"accuracy": 0.75, "loss": 0.5}' > "$RESULT_DIR/metrics.json"
touch "$DATA_DIR/should-fail" 2>/dev/null && echo "DATA WRITABLE" || echo "data is read-only"
sleep "${SLEEP:-0}"
echo "$NVIDIA_VISIBLE_DEVICES $(cat /proc/uptime | cut -d' ' -f1) $END" > /dev/null
echo "end $(cat /proc/uptime | cut -d' ' -f1)"
"""
TIMES_SH = """\
start=$(cut -d' ' -f1 /proc/uptime)
sleep "$1"
end=$(cut -d' ' -f1 /proc/uptime)
echo "$NVIDIA_VISIBLE_DEVICES $start $end" > "$RESULT_DIR/times.txt"
echo "GPUS=$NVIDIA_VISIBLE_DEVICES"
"""
FAIL_SH = 'echo "loading"; echo "about to fail with 3" >&2; exit 3\n'
SLEEP_SH = 'echo "sleeping $1"; sleep "$1"; echo "finished sleeping"\n'


@pytest.fixture(scope="module")
def airflow_runner(
    services: dict[str, str], store_credentials: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AirflowRunner:
    """A migrated Airflow home to copy for each run, and the environment of a worker."""
    work = tmp_path_factory.mktemp("airflow")
    template = work / "template-home"
    template.mkdir()
    env = {
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__WMLTRAIN__FRAMEWORKS": json.dumps(
            {"busybox": {"1": {"image": services["WMLTRAIN_TEST_IMAGE"]}}}
        ),
        "AIRFLOW__WMLTRAIN__STAGING_DIR": str(work / "staging"),
        "AIRFLOW__WMLTRAIN__GPU_POLL_INTERVAL": "1",
        "AIRFLOW__WMLTRAIN__HALT_GRACE_PERIOD": "2",
        f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(
            {
                "conn_type": "aws",
                "login": store_credentials["user"],
                "password": store_credentials["key"],
                "extra": {
                    "endpoint_url": services["WMLTRAIN_S3_ENDPOINT"],
                    "region_name": services["WMLTRAIN_S3_REGION"],
                },
            }
        ),
        f"AIRFLOW_CONN_{SWIFT_CONN_ID.upper()}": json.dumps(
            {
                "conn_type": "swift",
                "host": services["WMLTRAIN_SWIFT_AUTH_URL"],
                "login": store_credentials["user"],
                "password": store_credentials["key"],
            }
        ),
        "DOCKER_HOST": services["DOCKER_HOST"],
        "WMLTRAIN_GPU_DOCKER_HOST": services["WMLTRAIN_GPU_DOCKER_HOST"],
    }
    migrate_env = {**os.environ, **env, "AIRFLOW_HOME": str(template)}
    migrate_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{template}/airflow.db"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env=migrate_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return AirflowRunner(template_home=template, work=work, env=env)


@pytest.fixture
def buckets(s3_client: Any) -> Iterator[tuple[str, str]]:
    """A data bucket holding ``input.txt`` and an empty results bucket (removed afterwards)."""
    names = (f"wmltrain-it-data-{uuid.uuid4().hex[:10]}", f"wmltrain-it-res-{uuid.uuid4().hex[:10]}")
    for name in names:
        s3_client.create_bucket(Bucket=name)
    s3_client.put_object(Bucket=names[0], Key="input.txt", Body=b"the training data\n")
    yield names
    for name in names:
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for obj in page.get("Contents", []):
                s3_client.delete_object(Bucket=name, Key=obj["Key"])
        s3_client.delete_bucket(Bucket=name)


def _dag(runner: AirflowRunner, name: str, *, man: dict[str, Any], zip_path: Path, **operator: Any) -> Path:
    folder = runner.work / f"dags-{name}"
    folder.mkdir(exist_ok=True)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in operator.items())
    body = f"""
    import os
    with DAG(dag_id={name!r}, schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        TrainingRunOperator(task_id="train", manifest={man!r}, model_definition={str(zip_path)!r},
                            network_mode="none", {kwargs})
    """
    runner.work, saved = folder, runner.work
    try:
        return runner.write_dag(name, body)
    finally:
        runner.work = saved


def _script_dag(
    runner: AirflowRunner,
    tmp_path: Path,
    name: str,
    files: dict[str, str],
    **manifest_args: Any,
) -> Path:
    """A DAG running ``manifest_args['command']`` on a zip of ``files``; extra ``_dag`` keywords pass on."""
    extra = {k: manifest_args.pop(k) for k in list(manifest_args) if k not in _MANIFEST_ARGS}
    zip_path = model_zip(tmp_path / f"{name}.zip", files)
    return _dag(runner, name, man=manifest(**manifest_args), zip_path=zip_path, **extra)


_MANIFEST_ARGS = {"command", "data_bucket", "results_bucket", "connection", "store_type", "resource", "name"}


def _wait_until_no_run_holds_a_gpu(cli: docker.APIClient, timeout: float = 180) -> None:
    """Other tests' runs (e.g. through the services' Airflow) may still hold GPUs of the shared host."""
    deadline = time.monotonic() + timeout
    while cli.containers(filters={"label": f"{labels.ROLE}={labels.ROLE_RUN}", "status": "running"}):
        assert time.monotonic() < deadline, "the stand-in GPU host never became idle"
        time.sleep(1)


def _env_for(dag_file: Path) -> dict[str, str]:
    return {"AIRFLOW__CORE__DAGS_FOLDER": str(dag_file.parent)}


def _objects(s3_client: Any, bucket: str, prefix: str = "") -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _wait_for_phase(
    s3_client: Any, bucket: str, training_id: str, phase: str, timeout: float
) -> dict[str, Any]:
    """The run's status document once its phase says ``phase``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(s3_client, bucket, training_id)
        if status is not None and phase in status.get("phase", ""):
            return status
        time.sleep(0.5)
    raise AssertionError(
        f"{training_id} never said {phase!r}; last status: {_status(s3_client, bucket, training_id)}"
    )


def _status(s3_client: Any, bucket: str, training_id: str) -> dict[str, Any] | None:
    try:
        body = s3_client.get_object(Bucket=bucket, Key=f"{training_id}/_status.json")["Body"].read()
    except s3_client.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def _wait_for_state(
    s3_client: Any, bucket: str, training_id: str, states: set[str], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = _status(s3_client, bucket, training_id)
        if status and status["state"] in states:
            return status
        time.sleep(0.3)
    raise AssertionError(f"{training_id} never reached {states}; last status: {status}")


def _training_id(output: str) -> str:
    for word in output.split():
        if word.startswith("training-") and len(word) > 12:
            return word.rstrip(",.:)")
    raise AssertionError("no training id in the task log:\n" + output[-4000:])


def _conn(conn_id: str = CONN_ID) -> dict[str, str]:
    return {"conn_id": conn_id}


def test_a_run_completes_with_the_results_layout(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_complete",
        {"train.sh": TRAIN_SH},
        command="sh train.sh --lr 0.1",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
        hyperparameters={"lr": 0.02},
    )
    states, output = airflow_runner.run(dag_file, home="complete", env=_env_for(dag_file))
    assert states == {"train": "success"}, output[-6000:]
    training_id = _training_id(output)
    files = _objects(s3_client, results, f"{training_id}/")
    expected = {
        "_submitted_code/model.zip",
        "_manifest.yml",
        "_status.json",
        "learner-1/training-log.txt",
        "learner-1/load-data.log",
        "copy.txt",
        "model/weights.bin",
        "metrics.json",
    }
    assert {key.removeprefix(f"{training_id}/") for key in files} == expected
    assert files[f"{training_id}/copy.txt"] == b"the training data\n"
    assert files[f"{training_id}/_submitted_code/model.zip"] == (tmp_path / "it_complete.zip").read_bytes()
    assert yaml.safe_load(files[f"{training_id}/_manifest.yml"])["model_definition"]["name"] == "test-run"
    log = files[f"{training_id}/learner-1/training-log.txt"].decode()
    assert f"TRAINING_ID={training_id}" in log
    assert "GPU_COUNT=1" in log
    assert "args: --lr 0.02" in log  # the hyperparameter override reached the command
    assert "data is read-only" in log
    assert "DATA WRITABLE" not in log
    assert "staged 1 files" in files[f"{training_id}/learner-1/load-data.log"].decode()
    status = json.loads(files[f"{training_id}/_status.json"])
    assert [h["state"] for h in status["history"]] == [
        "PENDING",
        "DOWNLOADING",
        "PROCESSING",
        "STORING",
        "COMPLETED",
    ]
    assert status["metrics"] == {"accuracy": 0.75, "loss": 0.5}
    assert len(status["gpus"]) == 1
    assert f"GPUS={status['gpus'][0]} " in log
    assert status["results_location"] == f"s3://{results}/{training_id}/"
    assert status["error"] is None
    assert status["exit_code"] == 0
    # The training log also reached the task log, and the container is gone.
    assert "args: --lr 0.02" in output
    cli = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"])
    assert not cli.containers(all=True, filters={"label": f"{labels.TRAINING_ID}={training_id}"})


def test_a_failing_script_ends_failed_c201_with_logs_stored(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_fail",
        {"fail.sh": FAIL_SH},
        command="sh fail.sh",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
    )
    states, output = airflow_runner.run(dag_file, home="fail", env=_env_for(dag_file))
    assert states == {"train": "failed"}, output[-6000:]
    training_id = _training_id(output)
    status = _status(s3_client, results, training_id)
    assert status is not None
    assert status["state"] == "FAILED"
    assert [h["state"] for h in status["history"]][-2:] == ["STORING", "FAILED"]
    assert status["error"]["code"] == "C201"
    assert "exited with status 3" in status["error"]["message"]
    assert "about to fail with 3" in status["error"]["message"]
    assert status["exit_code"] == 3
    log = _objects(s3_client, results, f"{training_id}/learner-1/training-log.txt")
    assert b"about to fail with 3" in next(iter(log.values()))
    assert "C201" in output or "exited with status 3" in output


def test_a_halted_run_ends_halted_with_its_container_gone_and_logs_stored(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    training_id = f"training-halt{uuid.uuid4().hex[:8]}"
    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_halt",
        {"sleep.sh": SLEEP_SH},
        command="sh sleep.sh 300",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        training_id=training_id,
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
    )
    proc = airflow_runner.popen(dag_file, home="halt", env=_env_for(dag_file))
    try:
        _wait_for_state(s3_client, results, training_id, {"PROCESSING"})
        time.sleep(1)
        # Airflow stopping a task it moves (its state is still "running"): not a halt, the run goes on.
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(3)
        assert _status(s3_client, results, training_id)["state"] == "PROCESSING"
        # A person marks the task failed; Airflow's supervisor then stops it: a halt.
        with sqlite3.connect(airflow_runner.home("halt") / "airflow.db") as db:
            db.execute("UPDATE task_instance SET state = 'failed' WHERE dag_id = 'it_halt'")
        os.kill(proc.pid, signal.SIGTERM)
        status = _wait_for_state(
            s3_client, results, training_id, {"HALTED", "FAILED", "COMPLETED"}, timeout=90
        )
    finally:
        proc.kill()
        proc.wait()
    assert status["state"] == "HALTED", status
    assert [h["state"] for h in status["history"]][-2:] == ["STORING", "HALTED"]
    log = _objects(s3_client, results, f"{training_id}/learner-1/training-log.txt")
    assert b"sleeping 300" in next(iter(log.values()))
    cli = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"])
    assert not cli.containers(all=True, filters={"label": f"{labels.TRAINING_ID}={training_id}"})


def test_a_retried_task_reattaches_to_its_container(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    training_id = f"training-retry{uuid.uuid4().hex[:8]}"
    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_retry",
        {"sleep.sh": SLEEP_SH},
        command="sh sleep.sh 6",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        training_id=training_id,
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
    )
    cli = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"])
    since = int(time.time()) - 1
    # Both processes run the same task instance (same logical date, so the same run id): a retry.
    env = {**_env_for(dag_file), "WMLTRAIN_TEST_LOGICAL_DATE": "2026-01-02T03:04:05+00:00"}
    first = airflow_runner.popen(dag_file, home="retry", env=env)
    _wait_for_state(s3_client, results, training_id, {"PROCESSING"})
    os.killpg(first.pid, signal.SIGKILL)  # the worker dies while the container trains
    first.wait()
    assert cli.containers(filters={"label": f"{labels.TRAINING_ID}={training_id}"}), (
        "the container kept running"
    )
    states, output = airflow_runner.run(dag_file, home="retry", env=env)
    assert states == {"train": "success"}, output[-6000:]
    assert "Re-attaching to the container" in output
    status = _status(s3_client, results, training_id)
    assert status is not None
    assert status["state"] == "COMPLETED"
    log = next(iter(_objects(s3_client, results, f"{training_id}/learner-1/training-log.txt").values()))
    assert b"finished sleeping" in log
    created = [
        event
        for event in cli.events(
            since=since,
            until=int(time.time()) + 1,
            filters={"type": "container", "event": "create", "label": f"{labels.TRAINING_ID}={training_id}"},
            decode=True,
        )
        if event.get("Actor", {}).get("Attributes", {}).get(labels.ROLE) == labels.ROLE_RUN
    ]
    assert len(created) == 1, created


def test_a_deferred_run_on_swift_completes(
    airflow_runner: AirflowRunner, tmp_path: Path, services: dict[str, str], s3_client: Any
) -> None:
    data, results = f"wmltrain-it-sd-{uuid.uuid4().hex[:8]}", f"wmltrain-it-sr-{uuid.uuid4().hex[:8]}"
    for name in (data, results):
        s3_client.create_bucket(Bucket=name)
    s3_client.put_object(Bucket=data, Key="input.txt", Body=b"the training data\n")
    try:
        dag_file = _script_dag(
            airflow_runner,
            tmp_path,
            "it_defer",
            {"train.sh": TRAIN_SH},
            command="sleep 3 && sh train.sh",  # still training when the operator looks: it defers
            data_bucket=data,
            results_bucket=results,
            connection=_conn(SWIFT_CONN_ID),
            store_type="bluemix_objectstore",
            deferrable=True,
            poll_interval=1,
            docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
        )
        env = {**_env_for(dag_file), "AIRFLOW__WMLTRAIN__DEFER_AFTER": "0"}  # defer at once, no watch
        states, output = airflow_runner.run(dag_file, home="defer", env=env)
        assert states == {"train": "success"}, output[-6000:]
        assert "DEFERRED" in output
        training_id = _training_id(output)
        files = _objects(s3_client, results, f"{training_id}/")
        assert f"{training_id}/copy.txt" in files
        assert f"{training_id}/learner-1/training-log.txt" in files
        assert json.loads(files[f"{training_id}/_status.json"])["state"] == "COMPLETED"
        # deferrable mode shows the training log in the task log when the task resumes
        assert f"TRAINING_ID={training_id}" in output
    finally:
        for name in (data, results):
            for key in _objects(s3_client, name):
                s3_client.delete_object(Bucket=name, Key=key)
            s3_client.delete_bucket(Bucket=name)


def test_six_concurrent_small_runs_never_share_a_gpu_and_large_gets_four(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_grid",
        {"times.sh": TIMES_SH},
        command="sh times.sh 3",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
    )

    _wait_until_no_run_holds_a_gpu(docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"]))

    def one(i: int) -> tuple[dict[str, str], str]:
        return airflow_runner.run(dag_file, home=f"grid-{i}", env=_env_for(dag_file))

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(one, range(6)))
    intervals: list[tuple[str, float, float]] = []
    for states, output in outcomes:
        assert states == {"train": "success"}, output[-6000:]
        training_id = _training_id(output)
        status = _status(s3_client, results, training_id)
        assert status is not None
        assert len(status["gpus"]) == 1
        times = (
            s3_client.get_object(Bucket=results, Key=f"{training_id}/times.txt")["Body"]
            .read()
            .decode()
            .split()
        )
        visible, start, end = times[0], float(times[1]), float(times[2])
        assert [visible] == status["gpus"]  # what the container saw is what the run recorded
        intervals.append((visible, start, end))
    for i, (gpu_a, start_a, end_a) in enumerate(intervals):
        for gpu_b, start_b, end_b in intervals[i + 1 :]:
            if gpu_a == gpu_b:
                assert end_a <= start_b or end_b <= start_a, f"GPU {gpu_a} shared: {intervals}"
    assert len({gpu for gpu, _s, _e in intervals}) == 4  # all four GPUs were used

    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_large",
        {"times.sh": TIMES_SH},
        command="sh times.sh 0",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        resource="large",
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
    )
    states, output = airflow_runner.run(dag_file, home="large", env=_env_for(dag_file))
    assert states == {"train": "success"}, output[-6000:]
    training_id = _training_id(output)
    visible = (
        s3_client.get_object(Bucket=results, Key=f"{training_id}/times.txt")["Body"]
        .read()
        .decode()
        .split()[0]
    )
    assert sorted(visible.split(",")) == ["0", "1", "2", "3"]


def test_a_host_without_nvidia_runtime_is_refused_clearly_unless_cpu_fallback(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_nogpu",
        {"train.sh": TRAIN_SH},
        command="sh train.sh",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        docker_url=services["DOCKER_HOST"],
    )
    states, output = airflow_runner.run(dag_file, home="nogpu", env=_env_for(dag_file))
    assert states == {"train": "failed"}, output[-6000:]
    assert "no NVIDIA runtime" in output
    assert "could not select device driver" not in output
    training_id = _training_id(output)
    status = _status(s3_client, results, training_id)
    assert status is not None
    assert status["state"] == "FAILED"
    assert status["error"]["code"] == "S100"
    assert [h["state"] for h in status["history"]] == ["PENDING", "STORING", "FAILED"]

    states, output = airflow_runner.run(
        dag_file, home="cpu-fallback", env={**_env_for(dag_file), "AIRFLOW__WMLTRAIN__CPU_FALLBACK": "True"}
    )
    assert states == {"train": "success"}, output[-6000:]
    assert "NO GPU" in output
    status = _status(s3_client, results, _training_id(output))
    assert status is not None
    assert status["state"] == "COMPLETED"
    assert status["gpus"] == []


def test_no_secret_reaches_the_bucket_or_the_task_log(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
    store_credentials: dict[str, str],
) -> None:
    data, results = buckets
    secret = store_credentials["key"]
    inline = {
        "endpoint_url": services["WMLTRAIN_S3_ENDPOINT"],
        "aws_access_key_id": store_credentials["user"],
        "aws_secret_access_key": secret,
    }
    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_secret",
        {"train.sh": TRAIN_SH},
        command="sh train.sh",
        data_bucket=data,
        results_bucket=results,
        connection=inline,
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
    )
    states, output = airflow_runner.run(dag_file, home="secret", env=_env_for(dag_file))
    assert states == {"train": "success"}, output[-6000:]
    training_id = _training_id(output)
    for key, body in _objects(s3_client, results, f"{training_id}/").items():
        if not key.endswith(".zip"):
            assert secret.encode() not in body, key
    task_log = output.split("[DAG TEST] running task", 1)[1]
    assert f"aws_secret_access_key': '{secret}'" not in task_log
    assert f": {secret}" not in task_log


def test_derived_training_ids_are_stable_per_task_instance() -> None:
    from airflow_wmltrain.training_id import PATTERN, derive_training_id

    first = derive_training_id("dag", "manual__1", "train", 3)
    assert first == derive_training_id("dag", "manual__1", "train", 3)
    assert first != derive_training_id("dag", "manual__1", "train", 4)
    assert first != derive_training_id("dag", "manual__2", "train", 3)
    assert PATTERN.match(first)


def test_an_oom_killed_run_is_named_as_such(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    hog = 'echo "allocating"; x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo "survived ${#x}"\n'
    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_oom",
        {"hog.sh": hog},
        command="sh hog.sh",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        mem_limit="32m",
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
    )
    states, output = airflow_runner.run(dag_file, home="oom", env=_env_for(dag_file))
    assert states == {"train": "failed"}, output[-6000:]
    status = _status(s3_client, results, _training_id(output))
    assert status is not None
    assert status["state"] == "FAILED"
    assert status["error"]["code"] == "C201"
    assert "lack of memory (out of memory (mem_limit 32m))" in status["error"]["message"]
    assert "allocating" in status["error"]["message"]


def test_no_free_gpu_reschedules_the_task_when_configured(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    """Every GPU is held (by leases of another allocation); the task gives its slot back and comes back."""
    import threading

    data, results = buckets
    cli = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"])
    holder = f"training-holder{uuid.uuid4().hex[:6]}"
    leases = [
        cli.create_container(
            services["WMLTRAIN_TEST_IMAGE"],
            command=["true"],
            name=labels.gpu_lease_name(gpu),
            labels={labels.ROLE: labels.ROLE_GPU_LEASE, labels.TRAINING_ID: holder, labels.GPUS: gpu},
            host_config=cli.create_host_config(network_mode="none"),
        )["Id"]
        for gpu in ("0", "1", "2", "3")
    ]

    training_id = f"training-resched{uuid.uuid4().hex[:6]}"
    seen: dict[str, Any] = {}

    def free_the_gpus() -> None:
        # The run says, in its status, that it waits for GPUs and who holds them; then they free up.
        try:
            seen.update(_wait_for_phase(s3_client, results, training_id, "waiting for 1 GPU(s)", timeout=120))
        finally:
            for lease in leases:
                cli.remove_container(lease, force=True)

    dag_file = _script_dag(
        airflow_runner,
        tmp_path,
        "it_resched",
        {"train.sh": TRAIN_SH},
        command="sh train.sh",
        data_bucket=data,
        results_bucket=results,
        connection=_conn(),
        training_id=training_id,
        docker_url=services["WMLTRAIN_GPU_DOCKER_HOST"],
    )
    freer = threading.Thread(target=free_the_gpus)
    freer.start()
    try:
        states, output = airflow_runner.run(
            dag_file, home="resched", env={**_env_for(dag_file), "AIRFLOW__WMLTRAIN__GPU_WAIT": "reschedule"}
        )
    finally:
        freer.join()
    assert states == {"train": "success"}, output[-6000:]
    assert seen["state"] == "DOWNLOADING"  # data staged; no GPU held while it waited
    assert f"lease of {holder}" in seen["phase"]
    assert "trying again in 1 s" in output
    assert "UP_FOR_RESCHEDULE" in output.upper().replace(" ", "_") or "reschedul" in output.lower()
    status = _status(s3_client, results, _training_id(output))
    assert status is not None
    assert status["state"] == "COMPLETED"


def test_a_model_definition_given_as_an_s3_url_is_read_with_the_manifests_credentials(
    airflow_runner: AirflowRunner,
    buckets: tuple[str, str],
    s3_client: Any,
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    zipped = model_zip(tmp_path / "model.zip", {"train.sh": TRAIN_SH})
    s3_client.put_object(Bucket=results, Key="submitted/model.zip", Body=zipped.read_bytes())
    man = manifest(command="sh train.sh", data_bucket=data, results_bucket=results, connection=_conn())
    url = f"s3://{results}/submitted/model.zip"
    folder = airflow_runner.work / "dags-it_url"
    folder.mkdir(exist_ok=True)
    body = f"""
    with DAG(dag_id="it_url", schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        TrainingRunOperator(task_id="train", manifest={man!r}, model_definition={url!r},
                            network_mode="none", docker_url={services["WMLTRAIN_GPU_DOCKER_HOST"]!r})
        TrainingRunOperator(task_id="missing", manifest={man!r}, model_definition={url + ".nope"!r},
                            network_mode="none", docker_url={services["WMLTRAIN_GPU_DOCKER_HOST"]!r})
    """
    saved, airflow_runner.work = airflow_runner.work, folder
    try:
        dag_file = airflow_runner.write_dag("it_url", body)
    finally:
        airflow_runner.work = saved
    states, output = airflow_runner.run(dag_file, home="url", env=_env_for(dag_file))
    assert states == {"train": "success", "missing": "failed"}, output[-6000:]
    assert f"{url}.nope does not exist; upload the zip there first" in output
