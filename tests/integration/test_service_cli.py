"""Acceptance tests of the training service (issue 5): the real ``wmltrain`` command line, run as a
subprocess against the real Airflow of ``scripts/services up`` (api-server, scheduler, dag-processor,
triggerer), whose training containers run on the stand-in GPU daemon and store their results in the
real Swift + S3 store.

Runs take a few seconds each; the slow ones (the run to halt, the failing run, the grid DAG that the
dag-processor must first parse) are started as soon as the module starts, so they progress while the
fast tests run.  Retention is tested last: it drops every ended run submitted before its cut-off.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import httpx
import pytest
import yaml

from airflow_wmltrain.runtime import labels
from airflow_wmltrain.training_id import derive_training_id
from tests.integration.service_helpers import (
    RETENTION_DAG_ID,
    TRAINING_DAG_ID,
    TRAINING_ID,
    Cli,
    api_client,
    drop_buckets,
    free_port,
    iso_utc,
    keys,
    leaks,
    make_buckets,
    parse_time,
    quote,
    read,
    row_of,
    task_log,
    training_id_of,
    trigger,
    values_equal_to,
    wait_for,
    wait_for_dag,
    wait_for_dag_run,
)
from tests.integration.training_helpers import manifest, model_zip

STORE_CONN = {"conn_id": "wmltrain_store_s3"}  # an Airflow connection of the services' Airflow
RUN_TIMEOUT_S = 120  # a run takes ~5-15 s once the scheduler picked it up
PARSE_TIMEOUT_S = 120  # the dag-processor looks for new files every 5 s
HALT_TIMEOUT_S = 60
RETENTION_DAYS = 7  # [wmltrain] retention_days of the services' Airflow (the default)
ENDED = {"COMPLETED", "FAILED", "HALTED"}

TRAIN_SH = """\
echo "hello from training $TRAINING_ID"
echo "args: $*"
ls "$DATA_DIR"
cat "$DATA_DIR/input.txt" > "$RESULT_DIR/copy.txt"
echo '{"accuracy": 0.9}' > "$RESULT_DIR/metrics.json"
echo "trained with $*" > "$RESULT_DIR/result.txt"
"""
FAIL_SH = 'echo "loading the data"; echo "about to fail with 3" >&2; exit 3\n'
# Stops at once on SIGTERM (as training code should), so a halt does not wait for the grace period.
SLEEP_SH = """\
trap 'echo "stopped by SIGTERM"; exit 143' TERM
echo "sleeping $1 s"
sleep "$1" &
wait $!
echo "woke up"
"""

TEST_DAG = """\
import os
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_wmltrain.operators.training_run import TrainingRunOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         tags=["wmltrain-it"]):
    TrainingRunOperator{partial}(
        task_id="train",
        manifest={manifest!r},
        model_definition={model!r},
        docker_url=os.environ["WMLTRAIN_DOCKER_URL"],
        network_mode="none",
        {operator}
    ){expand}
"""
GRID = [{"lr": 0.1}, {"lr": 0.01}, {"lr": 0.001}]


@contextlib.contextmanager
def dropped_dag(
    services: dict[str, str],
    api: httpx.Client,
    model: Path,
    s3_client: Any,
    *,
    kind: str,
    command: str,
    operator: str = "",
    grid: list[dict[str, Any]] | None = None,
) -> Iterator[SimpleNamespace]:
    """A DAG of one ``TrainingRunOperator`` (mapped over ``grid`` when given) dropped into the services'
    test bundle, with its own buckets; removed afterwards with everything it made."""
    dag_id = f"wmltrain_it_{kind}_{uuid.uuid4().hex[:10]}"
    data, results = make_buckets(s3_client, "data", "res")
    files = Path(services["WMLTRAIN_AIRFLOW_TEST_DAGS"]).parent / "test-files"  # not a DAG folder
    files.mkdir(parents=True, exist_ok=True)
    zip_path = files / f"{dag_id}.zip"
    zip_path.write_bytes(model.read_bytes())
    document = manifest(command=command, data_bucket=data, results_bucket=results, connection=STORE_CONN)
    document["model_definition"]["name"] = f"it-{kind}"
    dag_file = Path(services["WMLTRAIN_AIRFLOW_TEST_DAGS"]) / f"{dag_id}.py"
    tmp = dag_file.with_suffix(".tmp")  # written aside, then renamed: never parsed half-written
    tmp.write_text(
        TEST_DAG.format(
            dag_id=dag_id,
            manifest=document,
            model=str(zip_path),
            partial=".partial" if grid else "",
            operator=operator,
            expand=f".expand(hyperparameters={grid!r})" if grid else "",
        )
    )
    tmp.rename(dag_file)
    made = SimpleNamespace(dag_id=dag_id, results=results, training_ids=[])
    try:
        yield made
    finally:
        dag_file.unlink(missing_ok=True)
        api.delete(f"/dags/{dag_id}")
        zip_path.unlink(missing_ok=True)
        gpu = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"], timeout=60)
        for training_id in made.training_ids:
            for info in run_containers(gpu, training_id):
                gpu.remove_container(info["Id"], force=True)
        drop_buckets(s3_client, [data, results])


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli.for_services(services, tmp_path_factory.mktemp("cli-airflow-home"))


@pytest.fixture(scope="module")
def api(services: dict[str, str]) -> Iterator[httpx.Client]:
    client = api_client(services)
    yield client
    client.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="module")
def model(work: Path) -> Path:
    """The model definition of every run here: one zip, a script per behaviour."""
    return model_zip(work / "model.zip", {"train.sh": TRAIN_SH, "fail.sh": FAIL_SH, "sleep.sh": SLEEP_SH})


def write_manifest(
    work: Path, name: str, command: str, data: str, results: str, connection: dict[str, Any] = STORE_CONN
) -> Path:
    path = work / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
    document = manifest(command=command, data_bucket=data, results_bucket=results, connection=connection)
    document["model_definition"]["name"] = name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture
def buckets(s3_client: Any) -> Iterator[tuple[str, str]]:
    """A data bucket (``input.txt``) and an empty results bucket, for one test."""
    names = make_buckets(s3_client, "data", "res")
    yield names[0], names[1]
    drop_buckets(s3_client, names)


@pytest.fixture(scope="module")
def gpu_docker(services: dict[str, str]) -> Iterator[docker.APIClient]:
    client = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"], timeout=60)
    yield client
    client.close()


def run_containers(gpu_docker: docker.APIClient, training_id: str) -> list[dict[str, Any]]:
    return list(gpu_docker.containers(all=True, filters={"label": f"{labels.TRAINING_ID}={training_id}"}))


@pytest.fixture(scope="module")
def sleeping_run(
    cli: Cli, model: Path, work: Path, s3_client: Any, gpu_docker: docker.APIClient
) -> Iterator[SimpleNamespace]:
    """A run whose script sleeps 300 s (to be halted), submitted at once."""
    data, results = make_buckets(s3_client, "data", "res")
    path = write_manifest(work, "it-sleeper", "sh sleep.sh 300", data, results)
    training_id = cli.train(model, path)
    yield SimpleNamespace(id=training_id, results=results)
    cli.run("halt", training_id)  # when the halt test did not run or failed; a no-op after a halt
    for info in run_containers(gpu_docker, training_id):  # never leave it holding a GPU for 5 minutes
        gpu_docker.remove_container(info["Id"], force=True)
    drop_buckets(s3_client, [data, results])


@pytest.fixture(scope="module")
def failing_run(cli: Cli, model: Path, work: Path, s3_client: Any) -> Iterator[SimpleNamespace]:
    """``wmltrain train --wait`` of a run whose script exits 3, started at once in the background."""
    data, results = make_buckets(s3_client, "data", "res")
    path = write_manifest(work, "it-failing", "sh fail.sh", data, results)
    proc = cli.popen("train", str(model), str(path), "--wait")
    yield SimpleNamespace(proc=proc, results=results)
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
    drop_buckets(s3_client, [data, results])


@pytest.fixture(scope="module")
def grid_dag(
    services: dict[str, str], api: httpx.Client, model: Path, s3_client: Any
) -> Iterator[SimpleNamespace]:
    """A DAG of a mapped ``TrainingRunOperator`` (3 hyperparameter sets) dropped into the test bundle."""
    with dropped_dag(
        services, api, model, s3_client, kind="grid", command="sh train.sh --lr 1", grid=GRID
    ) as made:
        yield made


@pytest.fixture(scope="module", autouse=True)
def _start_slow_things_first(request: pytest.FixtureRequest) -> None:
    """Start the background runs and the grid DAG's parsing before the first test (when selected)."""
    wanted = {
        name
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        for name in getattr(item, "fixturenames", ())
    }
    for name in ("sleeping_run", "failing_run", "grid_dag"):
        if name in wanted:
            request.getfixturevalue(name)


def start_dropped_dag(api: httpx.Client, made: SimpleNamespace) -> tuple[str, str]:
    """Wait until a dropped DAG is parsed, unpause and trigger it: its run id and training id."""
    wait_for_dag(api, made.dag_id, PARSE_TIMEOUT_S)
    assert api.patch(f"/dags/{made.dag_id}", json={"is_paused": False}).status_code == 200
    run_id = trigger(api, made.dag_id)
    training_id = derive_training_id(made.dag_id, run_id, "train", -1)
    made.training_ids.append(training_id)
    return run_id, training_id


def one_line_error(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    return str(lines[0])


# --- error paths (fast) -------------------------------------------------------------------------------


def test_cli_error_paths(cli: Cli, model: Path, work: Path, buckets: tuple[str, str]) -> None:
    unknown = "training-doesNotExist0"
    for command in ("show", "logs", "delete", "halt"):
        result = cli.run(command, unknown)
        assert result.code == 2, result.describe()
        assert f"no training run {unknown}" in one_line_error(result)

    result = cli.run("list", env={"WMLTRAIN_PASSWORD": "not-the-password"})
    assert result.code == 3, result.describe()
    assert "refused the credentials" in one_line_error(result)

    url = f"http://127.0.0.1:{free_port()}"
    result = cli.run("list", "--api-url", url)
    assert result.code == 3, result.describe()
    assert f"cannot reach the Airflow API server at {url}" in one_line_error(result)

    # Bad input is refused locally, before anything reaches Airflow.
    data, results = buckets
    bad = write_manifest(work, "it-bad", "sh train.sh", data, results)
    document = yaml.safe_load(bad.read_text())
    document["model_definition"]["framework"] = {"name": "no-such-framework", "version": "9"}
    bad.write_text(yaml.safe_dump(document))
    result = cli.run("train", str(model), str(bad))
    assert result.code == 2, result.describe()
    assert one_line_error(result).startswith("error C10"), result.describe()
    assert "Model-ID" not in result.stdout
    assert "Submitting" not in result.stderr  # refused before an id was even picked
    # Other runs may start meanwhile (the services are shared): none of this manifest's.
    assert not [r for r in cli.listing() if r["name"] == "it-bad"]


def test_delete_of_a_running_run_is_refused(cli: Cli, sleeping_run: SimpleNamespace) -> None:
    training_id = sleeping_run.id
    cli.wait_until_state(training_id, {"PROCESSING"}, RUN_TIMEOUT_S)
    result = cli.run("delete", training_id)
    assert result.code == 2, result.describe()
    assert f"wmltrain halt {training_id}" in one_line_error(result)
    assert cli.state(training_id) == "PROCESSING"


# --- halt -----------------------------------------------------------------------------------------------


def test_halt_ends_a_running_run_halted_with_its_logs_stored(
    cli: Cli,
    services: dict[str, str],
    sleeping_run: SimpleNamespace,
    s3_client: Any,
    gpu_docker: docker.APIClient,
) -> None:
    training_id, results = sleeping_run.id, sleeping_run.results
    cli.wait_until_state(training_id, {"PROCESSING"}, RUN_TIMEOUT_S)
    assert run_containers(gpu_docker, training_id), "the run's container should be running"

    result = cli.ok("halt", training_id)
    assert f"Halting {training_id}" in result.stdout
    document = cli.wait_until_state(training_id, ENDED, 20)
    assert document["state"] == "HALTED", document
    assert document["error"]["code"] == "C200", document
    row = row_of(cli.ok("list").stdout, training_id)
    assert row is not None, "a halted run stays listed"
    assert "HALTED" in row, row
    assert "C200" in row, row

    # The task's on_kill hands the halt to a detached process: the container is stopped and removed,
    # the logs land in the bucket, the bucket's status says HALTED.
    log_key = f"{training_id}/learner-1/training-log.txt"
    deadline = time.monotonic() + HALT_TIMEOUT_S
    while True:
        containers = run_containers(gpu_docker, training_id)
        stored = keys(s3_client, results, f"{training_id}/")
        status = json.loads(read(s3_client, results, f"{training_id}/_status.json"))
        if not containers and log_key in stored and status.get("state") == "HALTED":
            break
        if time.monotonic() > deadline:
            halter = Path(services["WMLTRAIN_AIRFLOW_HOME"]) / "staging" / "halts" / f"{training_id}.log"
            halter_log = halter.read_text(errors="replace")[-3000:] if halter.exists() else "(none)"
            for info in containers:  # free its GPU for the tests that follow
                gpu_docker.remove_container(info["Id"], force=True)
            pytest.fail(
                f"{HALT_TIMEOUT_S}s after `wmltrain halt {training_id}`: containers "
                f"{[(c['Id'][:12], c['State']) for c in containers]}, bucket {sorted(stored)}, "
                f"status {status.get('state')}; the halter's log ({halter}):\n{halter_log}",
                pytrace=False,
            )
        time.sleep(2)
    assert "sleeping 300 s" in read(s3_client, results, log_key)
    assert "woke up" not in read(s3_client, results, log_key)
    assert cli.show(training_id)["task_state"] == "failed"


def test_halt_of_a_deferred_run_goes_through_the_triggerer(
    cli: Cli,
    services: dict[str, str],
    api: httpx.Client,
    model: Path,
    s3_client: Any,
    gpu_docker: docker.APIClient,
) -> None:
    """While deferred no task process exists: the trigger's on_kill stops the container, stores the logs."""
    with dropped_dag(
        services,
        api,
        model,
        s3_client,
        kind="deferred",
        command="sh sleep.sh 300",
        operator="deferrable=True, poll_interval=2,",
    ) as made:
        dag_id, results = made.dag_id, made.results
        run_id, training_id = start_dropped_dag(api, made)
        wait_for(
            "the task to defer while its run trains",
            RUN_TIMEOUT_S,
            lambda: (
                api.get(f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/train").json().get("state")
                == "deferred"
            ),
        )
        assert cli.show(training_id)["state"] == "PROCESSING"
        cli.ok("halt", training_id)
        log_key = f"{training_id}/learner-1/training-log.txt"
        wait_for(
            "the triggerer to stop the container and store the logs",
            HALT_TIMEOUT_S,
            lambda: (
                not run_containers(gpu_docker, training_id)
                and log_key in keys(s3_client, results, f"{training_id}/")
                and json.loads(read(s3_client, results, f"{training_id}/_status.json")).get("state")
                == "HALTED"
            ),
            interval=2,
        )
        assert "sleeping 300 s" in read(s3_client, results, log_key)
        assert cli.show(training_id)["state"] == "HALTED"


def test_an_airflow_retry_reattaches_to_the_running_container(
    services: dict[str, str],
    api: httpx.Client,
    model: Path,
    s3_client: Any,
    gpu_docker: docker.APIClient,
) -> None:
    """The task's process is killed while its run trains; Airflow retries the task instance, and the
    retry (same training id) re-attaches to the container instead of starting a second one."""
    import os
    import signal

    since = int(time.time()) - 1
    with dropped_dag(
        services,
        api,
        model,
        s3_client,
        kind="retry",
        command="sh sleep.sh 15",
        operator="retries=1, retry_delay=timedelta(seconds=1),",
    ) as made:
        dag_id, results = made.dag_id, made.results
        run_id, training_id = start_dropped_dag(api, made)
        ti_path = f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/train"
        wait_for("the run's container", RUN_TIMEOUT_S, lambda: run_containers(gpu_docker, training_id))
        pid = wait_for("the task's pid", 30, lambda: api.get(ti_path).json().get("pid"))
        os.kill(int(pid), signal.SIGKILL)  # the worker's task process dies; the container trains on
        final = wait_for_dag_run(api, dag_id, run_id, RUN_TIMEOUT_S + 60)
        assert final["state"] == "success", final
        ti = api.get(ti_path).json()
        assert ti["try_number"] == 2, ti
        status = json.loads(read(s3_client, results, f"{training_id}/_status.json"))
        assert status["state"] == "COMPLETED", status
        assert "woke up" in read(s3_client, results, f"{training_id}/learner-1/training-log.txt")
        created = [
            event
            for event in gpu_docker.events(
                since=since,
                until=int(time.time()) + 1,
                filters={
                    "type": "container",
                    "event": "create",
                    "label": f"{labels.TRAINING_ID}={training_id}",
                },
                decode=True,
            )
            if event.get("Actor", {}).get("Attributes", {}).get(labels.ROLE) == labels.ROLE_RUN
        ]
        assert len(created) == 1, created


# --- the whole life of a run ----------------------------------------------------------------------------


def test_train_list_logs_show_delete(
    cli: Cli, model: Path, work: Path, buckets: tuple[str, str], s3_client: Any
) -> None:
    data, results = buckets
    path = write_manifest(work, "it-e2e", "sh train.sh --epochs 1", data, results)
    result = cli.ok("train", str(model), str(path))
    training_id = training_id_of(result.stdout)
    assert TRAINING_ID.match(training_id)

    row = row_of(cli.ok("list").stdout, training_id)  # listed at once, also while still queued
    assert row is not None, f"{training_id} is not listed"
    assert TRAINING_DAG_ID in row, row
    assert training_id in {r["training_id"] for r in cli.listing()}

    logs = cli.run("logs", training_id, "--follow", timeout=RUN_TIMEOUT_S + 60)  # ends by itself
    assert logs.code == 0, logs.describe()
    assert f"hello from training {training_id}" in logs.stdout, logs.stdout
    assert "args: --epochs 1" in logs.stdout

    document = cli.wait_until_state(training_id, ENDED, 30)
    location = f"s3://{results}/{training_id}/"
    assert document["state"] == "COMPLETED", document
    assert document["results_location"] == location
    assert document["dag_id"] == TRAINING_DAG_ID
    assert document["run_id"] == training_id
    assert document["metrics"] == {"accuracy": 0.9}
    assert len(document["gpus"]) == 1
    assert [h["state"] for h in document["history"]][-3:] == ["PROCESSING", "STORING", "COMPLETED"]
    assert document["error"] is None
    shown = cli.ok("show", training_id).stdout
    assert re.search(rf"^id\s+{training_id}$", shown, re.MULTILINE), shown
    assert re.search(r"^state\s+COMPLETED$", shown, re.MULTILINE), shown
    assert re.search(rf"^results\s+{re.escape(location)}$", shown, re.MULTILINE), shown
    assert re.search(r"^url\s+http://\S+/dags/wmltrain_training/runs/", shown, re.MULTILINE), shown
    row = row_of(cli.ok("list").stdout, training_id)
    assert row is not None, f"{training_id} is not listed"
    assert re.search(rf"^\d+\s+it-e2e\s+{training_id}\s+COMPLETED\s+\S+\s+{TRAINING_DAG_ID}$", row), row

    stored = keys(s3_client, results)
    expected = {
        f"{training_id}/{name}"
        for name in (
            "_status.json",
            "_manifest.yml",
            "_submitted_code/model.zip",
            "learner-1/training-log.txt",
            "result.txt",
            "copy.txt",
            "metrics.json",
        )
    }
    assert expected <= stored, sorted(stored)
    assert f"hello from training {training_id}" in read(
        s3_client, results, f"{training_id}/learner-1/training-log.txt"
    )
    assert read(s3_client, results, f"{training_id}/result.txt").strip() == "trained with --epochs 1"
    assert json.loads(read(s3_client, results, f"{training_id}/_status.json"))["state"] == "COMPLETED"

    result = cli.ok("delete", training_id)
    assert f"Deleted {training_id}" in result.stdout
    assert training_id not in {r["training_id"] for r in cli.listing()}
    assert row_of(cli.ok("list").stdout, training_id) is None
    assert cli.run("show", training_id).code == 2
    assert keys(s3_client, results) == stored, "the files in the bucket stay"


def test_a_failed_run_stays_listed_with_its_reason(
    cli: Cli, failing_run: SimpleNamespace, s3_client: Any
) -> None:
    try:
        stdout, stderr = failing_run.proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"wmltrain train --wait did not end within {RUN_TIMEOUT_S}s", pytrace=False)
    assert failing_run.proc.returncode == 1, (stdout, stderr)
    training_id = training_id_of(stdout)
    assert f"{training_id} FAILED: C201" in stderr, stderr

    row = row_of(cli.ok("list").stdout, training_id)
    assert row is not None, "a failed run stays listed"
    assert re.search(r"\sFAILED\s.*\sC201 the training process exited with status 3", row), row
    record = next(r for r in cli.listing() if r["training_id"] == training_id)
    assert record["state"] == "FAILED", record
    assert record["error"]["code"] == "C201", record
    assert record["exit_code"] == 3
    failed = [r["training_id"] for r in json.loads(cli.ok("list", "--json", "--state", "failed").stdout)]
    assert training_id in failed

    shown = cli.ok("show", training_id).stdout
    assert re.search(r"^state\s+FAILED$", shown, re.MULTILINE), shown
    error = re.search(r"^error\s+(.*)$", shown, re.MULTILINE)
    assert error, shown
    assert error.group(1).startswith("C201 the training process exited with status 3"), shown
    assert "about to fail with 3" in error.group(1)
    # A failed run's logs land in the bucket too.
    log = read(s3_client, failing_run.results, f"{training_id}/learner-1/training-log.txt")
    assert "about to fail with 3" in log


# --- runs of other DAGs -----------------------------------------------------------------------------------


def test_the_runs_of_a_mapped_grid_dag_are_listed(
    cli: Cli, api: httpx.Client, grid_dag: SimpleNamespace, s3_client: Any
) -> None:
    dag_id = grid_dag.dag_id
    dag = wait_for_dag(api, dag_id, PARSE_TIMEOUT_S)
    assert dag["bundle_name"] == "wmltrain-tests"
    response = api.patch(f"/dags/{dag_id}", json={"is_paused": False})
    assert response.status_code == 200, response.text
    run_id = trigger(api, dag_id)
    wait_for_dag_run(api, dag_id, run_id, RUN_TIMEOUT_S + 60)

    records = sorted((r for r in cli.listing() if r["dag_id"] == dag_id), key=lambda r: r["map_index"])
    assert [r["map_index"] for r in records] == [0, 1, 2], records
    for index, record in enumerate(records):
        assert record["training_id"] == derive_training_id(dag_id, run_id, "train", index)
        assert record["run_id"] == run_id
        assert record["task_id"] == "train"
        assert record["state"] == "COMPLETED", record
        assert record["command"] == f"sh train.sh --lr {GRID[index]['lr']}", record
        assert record["results_location"] == f"s3://{grid_dag.results}/{record['training_id']}/"
        assert f"{record['training_id']}/_status.json" in keys(s3_client, grid_dag.results)

    table = cli.ok("list").stdout
    for index, record in enumerate(records):
        row = row_of(table, record["training_id"])
        assert row is not None, f"{record['training_id']} is not listed"
        assert f"{dag_id}[{index}]" in row, row
        assert "COMPLETED" in row, row

    one = records[1]["training_id"]
    # A run's task log has no error and no line per store about the connection's credentials (issue 13
    # item 11): what the services' [logging] namespace_levels does, as the shipped deployments do.
    task_log = cli.ok("logs", one).stdout
    assert "credentials retrieved" not in task_log, task_log
    assert "XCom not found" not in task_log, task_log
    document = cli.show(one)
    assert (document["state"], document["map_index"], document["dag_id"]) == ("COMPLETED", 1, dag_id)
    shown = cli.ok("show", one).stdout
    assert re.search(rf"^dag\s+{dag_id} / {re.escape(run_id)} / train\[1\]$", shown, re.MULTILINE), shown
    assert re.search(r"^url\s+\S+/mapped/1$", shown, re.MULTILINE), shown

    # What `list` asked: the provider's endpoint on the API server, all runs in one answer, and only
    # for a caller Airflow authenticated.
    endpoint = str(api.base_url.copy_with(path="/wmltrain/runs"))
    answer = api.get(endpoint, params={"training_id": one})
    assert answer.status_code == 200, answer.text
    [row] = answer.json()["runs"]
    assert (row["dag_id"], row["map_index"], row["state"]) == (dag_id, 1, "success")
    assert row["value"]["training_id"] == one
    with httpx.Client(trust_env=False) as anonymous:
        assert anonymous.get(endpoint).status_code == 401
        forged = anonymous.get(endpoint, headers={"Authorization": "Bearer not-a-token"})
        assert forged.status_code in (401, 403)


# --- the bundled DAG's form, as the UI uses it --------------------------------------------------------


def test_the_bundled_dag_triggered_with_its_form(
    cli: Cli, api: httpx.Client, model: Path, work: Path, buckets: tuple[str, str], s3_client: Any
) -> None:
    import base64

    response = api.get(f"/dags/{TRAINING_DAG_ID}/details")
    assert response.status_code == 200, response.text
    params = response.json()["params"]
    assert {"manifest", "model_definition", "hyperparameters"} <= set(params), params
    assert params["manifest"]["schema"]["type"] == "string"
    assert params["model_definition"]["schema"]["type"] == "string"
    assert params["hyperparameters"]["schema"]["type"] == "object"

    data, results = buckets
    text = write_manifest(work, "it-form", "sh train.sh --epochs 1", data, results).read_text()
    response = api.patch(f"/dags/{TRAINING_DAG_ID}", json={"is_paused": False})
    assert response.status_code == 200, response.text
    conf = {
        "manifest": text,
        "model_definition": "base64:" + base64.b64encode(model.read_bytes()).decode("ascii"),
        "hyperparameters": {"epochs": 2},
    }
    run_id = trigger(api, TRAINING_DAG_ID, conf)
    assert run_id.startswith("manual__"), run_id
    wait_for_dag_run(api, TRAINING_DAG_ID, run_id, RUN_TIMEOUT_S)

    records = [r for r in cli.listing() if r["dag_id"] == TRAINING_DAG_ID and r["run_id"] == run_id]
    assert len(records) == 1, records
    record = records[0]
    training_id = record["training_id"]
    assert training_id == derive_training_id(TRAINING_DAG_ID, run_id, "train", -1)
    assert TRAINING_ID.match(training_id)
    assert record["state"] == "COMPLETED", record
    assert record["name"] == "it-form"
    assert record["command"] == "sh train.sh --epochs 2", record
    assert cli.show(training_id)["results_location"] == f"s3://{results}/{training_id}/"
    stored = keys(s3_client, results, f"{training_id}/")
    assert {f"{training_id}/_status.json", f"{training_id}/learner-1/training-log.txt"} <= stored, stored
    assert read(s3_client, results, f"{training_id}/result.txt").strip() == "trained with --epochs 2"

    cli.ok("delete", training_id)
    assert training_id not in {r["training_id"] for r in cli.listing()}


# --- secrets ------------------------------------------------------------------------------------------------


def test_no_secret_of_a_manifest_leaks(
    cli: Cli,
    api: httpx.Client,
    model: Path,
    work: Path,
    buckets: tuple[str, str],
    s3_client: Any,
    store_credentials: dict[str, str],
) -> None:
    secret = store_credentials["key"]
    data, results = buckets
    inline = {
        "endpoint_url": store_credentials["s3_endpoint"],
        "aws_access_key_id": store_credentials["user"],
        "aws_secret_access_key": secret,
    }
    path = write_manifest(work, "it-secret", "sh train.sh --epochs 1", data, results, connection=inline)
    assert f"aws_secret_access_key: {secret}" in path.read_text()  # what must not get out

    outputs: dict[str, str] = {}
    result = cli.ok("train", str(model), str(path))
    outputs["train"] = result.stdout + result.stderr
    training_id = training_id_of(result.stdout)
    moved = [f"wmltrain_{training_id.replace('-', '_')}_{role}" for role in ("data", "results")]
    assert all(conn_id in result.stderr for conn_id in moved), result.describe()
    for conn_id in moved:
        assert api.get(f"/connections/{conn_id}").status_code == 200

    for args in (("logs", training_id, "--follow"), ("list",), ("list", "--json")):
        result = cli.run(*args, timeout=RUN_TIMEOUT_S + 60)
        assert result.code == 0, result.describe()
        outputs[" ".join(args)] = result.stdout + result.stderr
    document = cli.wait_until_state(training_id, ENDED, 30)
    assert document["state"] == "COMPLETED", document  # the moved credentials work
    for args in (("show", training_id), ("show", training_id, "--json")):
        outputs[" ".join(args)] = cli.ok(*args).stdout
    for name, text in outputs.items():
        assert not leaks(text, secret), f"wmltrain {name} shows the secret: {leaks(text, secret)}"

    run = api.get(f"/dags/{TRAINING_DAG_ID}/dagRuns/{quote(training_id)}").json()
    conf = run["conf"]
    assert not list(values_equal_to(conf, secret)), conf
    assert not leaks(json.dumps(conf), secret)
    submitted = yaml.safe_load(conf["manifest"])
    assert submitted["training_data_reference"][0]["connection"] == {"conn_id": moved[0]}
    assert submitted["training_results_reference"]["connection"] == {"conn_id": moved[1]}

    log = task_log(api, TRAINING_DAG_ID, training_id, "train")
    assert f"hello from training {training_id}" in log  # the log is there, and it is whole
    assert not leaks(log, secret), leaks(log, secret)
    ti = api.get(f"/dags/{TRAINING_DAG_ID}/dagRuns/{quote(training_id)}/taskInstances/train").json()
    assert not list(values_equal_to(ti.get("rendered_fields"), secret)), ti.get("rendered_fields")
    stored_manifest = read(s3_client, results, f"{training_id}/_manifest.yml")
    assert not leaks(stored_manifest, secret)
    assert not list(values_equal_to(yaml.safe_load(stored_manifest), secret))

    cli.ok("delete", training_id)
    for conn_id in moved:
        assert api.get(f"/connections/{conn_id}").status_code == 404, f"{conn_id} outlived its run"


# --- retention (last: it drops every ended run submitted before its cut-off) ------------------------------


@pytest.fixture
def api_connection(services: dict[str, str], api: httpx.Client) -> Iterator[None]:
    """The ``wmltrain_api`` connection the retention task reaches the API with (made here if missing)."""
    conn_id = "wmltrain_api"
    created = False
    if api.get(f"/connections/{conn_id}").status_code == 404:
        response = api.post(
            "/connections",
            json={
                "connection_id": conn_id,
                "conn_type": "http",
                "host": services["WMLTRAIN_AIRFLOW_URL"],
                "login": services["WMLTRAIN_AIRFLOW_USER"],
                "password": services["WMLTRAIN_AIRFLOW_PASSWORD"],
            },
        )
        assert response.status_code in (200, 201), response.text
        created = True
    yield
    if created:
        api.delete(f"/connections/{conn_id}")


def test_retention_previews_old_runs_by_time_travel_and_refuses_a_future_as_of(
    cli: Cli,
    api: httpx.Client,
    model: Path,
    work: Path,
    buckets: tuple[str, str],
    s3_client: Any,
    api_connection: None,
) -> None:
    data, results = buckets
    old = cli.train(model, write_manifest(work, "it-old", "sh train.sh", data, results))
    started = wait_for(f"{old} to start", RUN_TIMEOUT_S, lambda: cli.show(old)["history"], interval=0.5)
    time.sleep(1.5)
    new = cli.train(model, write_manifest(work, "it-new", "sh train.sh", data, results))
    assert started
    for training_id in (old, new):
        assert cli.wait_until_state(training_id, ENDED, RUN_TIMEOUT_S)["state"] == "COMPLETED"
    old_at, new_at = parse_time(cli.show(old)["submitted_at"]), parse_time(cli.show(new)["submitted_at"])
    assert new_at > old_at
    old_files = keys(s3_client, results, f"{old}/")
    assert f"{old}/_status.json" in old_files

    # "Now" moved 7 days ahead of a moment between the two runs: the old one is past retention.  A dry
    # run lists it and removes nothing; the same as_of without the dry run is refused (it lies in the
    # future) and removes nothing either.
    as_of = old_at + timedelta(days=RETENTION_DAYS) + (new_at - old_at) / 2
    was_paused = api.get(f"/dags/{RETENTION_DAG_ID}").json()["is_paused"]
    try:
        if was_paused:
            assert api.patch(f"/dags/{RETENTION_DAG_ID}", json={"is_paused": False}).status_code == 200
        preview = trigger(api, RETENTION_DAG_ID, {"as_of": iso_utc(as_of), "dry_run": True})
        wait_for_dag_run(api, RETENTION_DAG_ID, preview, RUN_TIMEOUT_S)
        refused = trigger(api, RETENTION_DAG_ID, {"as_of": iso_utc(as_of)})
        ended = wait_for(
            f"run {refused} of {RETENTION_DAG_ID} to end",
            RUN_TIMEOUT_S,
            lambda: (
                api.get(f"/dags/{RETENTION_DAG_ID}/dagRuns/{quote(refused)}").json().get("state")
                in ("success", "failed")
            ),
        )
        assert ended
    finally:
        if was_paused:
            api.patch(f"/dags/{RETENTION_DAG_ID}", json={"is_paused": True})
    response = api.get(
        f"/dags/{RETENTION_DAG_ID}/dagRuns/{quote(preview)}/taskInstances/drop_expired_runs/xcomEntries/"
        "return_value",
        params={"deserialize": True},
    )
    assert response.status_code == 200, response.text
    would = response.json()["value"]
    assert old in would, would
    assert new not in would, would
    assert api.get(f"/dags/{RETENTION_DAG_ID}/dagRuns/{quote(refused)}").json()["state"] == "failed"
    assert "is in the future" in task_log(api, RETENTION_DAG_ID, refused, "drop_expired_runs")

    listed = {r["training_id"] for r in cli.listing()}
    assert {old, new} <= listed, "neither the dry run nor the refused run removed anything"
    assert keys(s3_client, results, f"{old}/") == old_files, "retention never touches the bucket"
    cli.ok("delete", old)
    cli.ok("delete", new)


def test_the_services_env_is_all_the_cli_needs(services: dict[str, str], tmp_path: Path) -> None:
    # What the README says: after `eval "$(scripts/services up)"` (or `env`), `wmltrain list` works in a
    # fresh shell — the services export the CLI's own variable names, not only their own.
    repo = Path(__file__).resolve().parents[2]
    script = (
        f'eval "$({repo}/scripts/services env)" && exec {sys.executable} -m airflow_wmltrain list --limit 1'
    )
    done = subprocess.run(
        ["bash", "-c", script],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr.strip()}"
    assert "no Airflow credentials" not in done.stderr


# --- a framework added while the deployment runs ------------------------------------------------------


def test_a_framework_added_to_the_registry_file_is_used_without_a_restart(
    cli: Cli, model: Path, work: Path, buckets: tuple[str, str], services: dict[str, str]
) -> None:
    """The deployment appends a framework to its ``[wmltrain] frameworks_file``: the bundled DAG
    publishes it at its next parse, ``wmltrain train`` accepts it, and the run uses its image."""
    registry = Path(services["WMLTRAIN_AIRFLOW_HOME"]) / "frameworks.yaml"
    before = registry.read_text()
    name = f"added-{uuid.uuid4().hex[:6]}"
    data, results = buckets
    path = write_manifest(work, "it-added", "sh train.sh --epochs 1", data, results)
    document = yaml.safe_load(path.read_text())
    document["model_definition"]["framework"] = {"name": name, "version": "1"}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    refused = cli.run("train", str(model), str(path))
    assert refused.code == 2, refused.describe()
    assert f"'{name}'" in refused.stderr, refused.describe()
    try:
        registry.write_text(
            before + f"\n{name}:\n  '1': {{image: {json.dumps(services['WMLTRAIN_TEST_IMAGE'])}}}\n"
        )
        deadline = time.monotonic() + PARSE_TIMEOUT_S
        while True:  # the dag-processor parses the bundled DAG again every few seconds
            attempt = cli.run("train", str(model), str(path))
            if attempt.code == 0:
                break
            assert time.monotonic() < deadline, f"{name} was never published: {attempt.describe()}"
            time.sleep(3)
        training_id = training_id_of(attempt.stdout)
        ended = cli.wait_until_state(training_id, ENDED, RUN_TIMEOUT_S)
        assert ended["state"] == "COMPLETED", ended
        assert ended["image"] == services["WMLTRAIN_TEST_IMAGE"], ended
    finally:
        registry.write_text(before)
