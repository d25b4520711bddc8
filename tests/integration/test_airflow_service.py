"""The real Airflow that ``scripts/services up`` starts: api-server, scheduler, dag-processor and triggerer
(LocalExecutor, SQLite), used only through its REST API v2 with a JWT from ``POST /auth/token``.

The repository's ``dags/`` is its DAGs folder (bundle ``dags-folder``); tests drop their own DAG files into
the second bundle, ``wmltrain-tests`` (``WMLTRAIN_AIRFLOW_TEST_DAGS``), and remove them afterwards.
"""

from __future__ import annotations

import os
import signal
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.service_helpers import api_client, wait_for

PARSE_TIMEOUT_S = 120  # the dag-processor looks for new files every 5 s and parses each at most every 5 s
RUN_TIMEOUT_S = 180

SELFTEST_DAG = """\
from datetime import datetime

from airflow.sdk import DAG, task

with DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         tags=["wmltrain-selftest"]):

    @task
    def one():
        return 1

    @task
    def environment():
        # What the provider's tasks find in the services' environment.
        import os

        from airflow.sdk import BaseHook

        from airflow_wmltrain.frameworks import FrameworkRegistry
        from airflow_wmltrain.settings import Settings

        registry = FrameworkRegistry.from_settings(Settings.from_airflow_config())
        return {{
            "busybox": registry.resolve("busybox", "1").image,
            "pytorch": registry.resolve("pytorch", "2.13-cpu").image,
            "docker_url": os.environ.get("WMLTRAIN_DOCKER_URL"),
            "docker_host": os.environ.get("DOCKER_HOST"),
            "staging_dir": os.environ.get("AIRFLOW__WMLTRAIN__STAGING_DIR"),
            "s3_endpoint": BaseHook.get_connection("wmltrain_store_s3").extra_dejson.get("endpoint_url"),
            "swift_host": BaseHook.get_connection("wmltrain_store_swift").host,
        }}

    one()
    environment()
"""


def task_log(api: httpx.Client, dag_id: str, run_id: str, task_id: str) -> str:
    """The last lines of a task instance's first try's log, as the REST API serves it."""
    response = api.get(
        f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1",
        headers={"Accept": "application/json"},
    )
    if response.status_code != 200:
        return f"(no log: HTTP {response.status_code} {response.text[:300]})"
    lines = []
    for line in response.json()["content"]:
        if not isinstance(line, dict):
            lines.append(str(line))
            continue
        lines.append(str(line.get("event", "")))
        for error in line.get("error_detail") or []:  # an exception: its type and message
            if isinstance(error, dict):
                lines.append(f"  {error.get('exc_type')}: {error.get('exc_value')}")
    return "\n".join(lines)[-4000:]


@pytest.fixture(scope="module")
def airflow_url(services: dict[str, str]) -> str:
    return services["WMLTRAIN_AIRFLOW_URL"]


@pytest.fixture(scope="module")
def api(services: dict[str, str]) -> Iterator[httpx.Client]:
    with api_client(services) as client:
        yield client


def test_api_needs_a_token(services: dict[str, str], airflow_url: str) -> None:
    with httpx.Client(base_url=airflow_url, timeout=30, trust_env=False) as client:
        assert client.get("/api/v2/dags").status_code == 401
        user = services["WMLTRAIN_AIRFLOW_USER"]
        wrong = client.post("/auth/token", json={"username": user, "password": "not-the-password"})
        assert wrong.status_code == 401, wrong.text


def test_health_reports_every_component_healthy(api: httpx.Client) -> None:
    response = api.get("/monitor/health")
    assert response.status_code == 200, response.text
    health = response.json()
    for component in ("metadatabase", "scheduler", "triggerer", "dag_processor"):
        assert health[component]["status"] == "healthy", health


def test_repository_dags_are_parsed(api: httpx.Client) -> None:
    """The dag-processor parsed the repository's dags/ with the provider importable."""

    def parsed() -> dict[str, Any] | None:
        response = api.get("/dags/mnist_training")
        return response.json() if response.status_code == 200 else None

    dag = wait_for("mnist_training to be parsed", PARSE_TIMEOUT_S, parsed)
    assert dag["bundle_name"] == "dags-folder"
    assert not dag["has_import_errors"]
    errors = api.get("/importErrors", params={"limit": 100}).json()["import_errors"]
    assert not [e for e in errors if e["filename"].endswith("mnist_training.py")], errors


@pytest.fixture
def selftest_dag(services: dict[str, str], api: httpx.Client) -> Iterator[str]:
    """A tiny DAG in the ``wmltrain-tests`` bundle (unique id); its file and the DAG removed afterwards."""
    dag_id = f"wmltrain_selftest_{uuid.uuid4().hex[:10]}"
    path = Path(services["WMLTRAIN_AIRFLOW_TEST_DAGS"]) / f"{dag_id}.py"
    tmp = path.with_suffix(".tmp")  # written aside, then renamed: never parsed half-written
    tmp.write_text(textwrap.dedent(SELFTEST_DAG.format(dag_id=dag_id)))
    tmp.rename(path)
    try:
        yield dag_id
    finally:
        path.unlink(missing_ok=True)
        api.delete(f"/dags/{dag_id}")


def test_a_dag_runs_to_success_through_the_scheduler(
    services: dict[str, str], api: httpx.Client, selftest_dag: str
) -> None:
    dag_id = selftest_dag

    def parsed() -> dict[str, Any] | None:
        response = api.get(f"/dags/{dag_id}")
        return response.json() if response.status_code == 200 else None

    dag = wait_for(f"{dag_id} to be parsed", PARSE_TIMEOUT_S, parsed)
    assert dag["bundle_name"] == "wmltrain-tests"
    assert dag["is_paused"], "new DAGs start paused ([core] dags_are_paused_at_creation)"

    response = api.patch(f"/dags/{dag_id}", json={"is_paused": False})
    assert response.status_code == 200, response.text
    response = api.post(f"/dags/{dag_id}/dagRuns", json={"logical_date": None})
    assert response.status_code == 200, response.text
    run_id = response.json()["dag_run_id"]

    def finished() -> dict[str, Any] | None:
        run = api.get(f"/dags/{dag_id}/dagRuns/{run_id}").json()
        return run if run["state"] in ("success", "failed") else None

    run = wait_for(f"run {run_id} of {dag_id} to finish", RUN_TIMEOUT_S, finished)
    tasks = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    states = {ti["task_id"]: ti["state"] for ti in tasks}
    if run["state"] != "success":
        logs = "\n".join(
            f"--- {ti['task_id']} ({ti['state']}):\n{task_log(api, dag_id, run_id, ti['task_id'])}"
            for ti in tasks
            if ti["state"] != "success"
        )
        pytest.fail(f"run {run_id} of {dag_id} ended {run['state']}: {states}\n{logs}", pytrace=False)
    assert states == {"one": "success", "environment": "success"}

    def xcom(task_id: str) -> Any:
        response = api.get(
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
            params={"deserialize": True},
        )
        assert response.status_code == 200, response.text
        return response.json()["value"]

    assert xcom("one") == 1
    home = services["WMLTRAIN_AIRFLOW_HOME"]
    assert xcom("environment") == {
        "busybox": services["WMLTRAIN_TEST_IMAGE"],
        "pytorch": "airflow-wmltrain/pytorch:2.13-cpu",
        "docker_url": services["WMLTRAIN_GPU_DOCKER_HOST"],
        "docker_host": services["DOCKER_HOST"],
        "staging_dir": f"{home}/staging",
        "s3_endpoint": services["WMLTRAIN_S3_ENDPOINT"],
        "swift_host": services["WMLTRAIN_SWIFT_AUTH_URL"],
    }


def test_an_airflow_process_that_exits_is_restarted(services: dict[str, str], api: httpx.Client) -> None:
    """The services' watchdog restarts an Airflow process that exited, as a deployment's restart policy
    does (Airflow 3's dag-processor exits on some database and file errors; without a restart nothing
    is parsed any more): the dag-processor SIGKILLed comes back, healthy, and the watchdog says so."""
    state = Path(services["WMLTRAIN_SERVICES_DIR"])
    pid = int((state / "pids" / "airflow-dag-processor.pid").read_text())
    os.kill(pid, signal.SIGKILL)

    def restarted() -> int | None:
        new = int((state / "pids" / "airflow-dag-processor.pid").read_text())
        if new == pid or not Path(f"/proc/{new}").exists():
            return None
        health = api.get("/monitor/health").json()
        return new if health["dag_processor"]["status"] == "healthy" else None

    new = wait_for("the dag-processor to be restarted and healthy", 120, restarted, interval=1.0)
    log = (state / "logs" / "watchdog.log").read_text(errors="replace")
    assert f"airflow-dag-processor (pid {pid}) exited: restarting it" in log, log[-2000:]
    assert new != pid
