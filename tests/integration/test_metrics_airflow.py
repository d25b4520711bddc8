"""Metrics of a deferred run through the services' Airflow (scheduler, worker, triggerer): while the run
trains, the triggerer publishes its points as the task's status XCom (``SetXCom`` relayed to the API
server), and the REST API serves them while the task is ``deferred``; ``wmltrain metrics`` reads them.

NOTE: the services' Airflow imports the provider from /work/main: this test exercises the provider the
services run, so it only passes once the metrics code is merged there and Airflow restarted
(``scripts/services restart-airflow``).
"""

from __future__ import annotations

import base64
import io
import json
import textwrap
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_wmltrain.lifecycle import STATUS_XCOM_KEY
from tests.integration.service_helpers import (
    api_client,
    drop_buckets,
    make_buckets,
    quote,
    trigger,
    wait_for_dag,
    wait_for_dag_run,
)
from tests.integration.training_helpers import manifest

pytestmark = pytest.mark.integration

PARSE_TIMEOUT_S = 120
RUN_TIMEOUT_S = 420
STEPS = 10
METRICS_INTERVAL_S = 3
# A point every 2 s for 20 s: the run defers at once, the trigger looks every 2 s and publishes every 3 s
# ([wmltrain] metrics_interval, set for this DAG's task below): several times while the run trains.
TRAIN_SH = f"""\
i=1
while [ $i -le {STEPS} ]; do
  echo "{{\\"step\\": $i, \\"loss\\": $((100 - i))}}" >> "$RESULT_DIR/metrics.jsonl"
  echo "step $i acc=$i"
  sleep 2
  i=$((i + 1))
done
"""
DAG = """\
import os
from datetime import datetime

from airflow.sdk import DAG
from airflow_wmltrain.operators.training_run import TrainingRunOperator

# The task runs in a process that parses this file: its [wmltrain] settings come from here, for this DAG
# only (defaults: it would watch the run 30 s before deferring, and publish every 30 s).
os.environ["AIRFLOW__WMLTRAIN__DEFER_AFTER"] = "0"
os.environ["AIRFLOW__WMLTRAIN__METRICS_INTERVAL"] = "{interval}"

with DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    TrainingRunOperator(
        task_id="train",
        manifest={manifest!r},
        model_definition={model!r},
        docker_url=os.environ["WMLTRAIN_DOCKER_URL"],
        network_mode="none",
        deferrable=True,
        poll_interval=2,
        metrics_pattern=r"step (?P<step>\\d+) acc=(?P<accuracy>[0-9]+)",
    )
"""


@pytest.fixture
def api(services: dict[str, str]) -> Iterator[httpx.Client]:
    with api_client(services) as client:
        yield client


@pytest.fixture
def buckets(s3_client: Any) -> Iterator[list[str]]:
    names = make_buckets(s3_client, "data", "results")
    yield names
    drop_buckets(s3_client, names)


@pytest.fixture
def metrics_dag(services: dict[str, str], api: httpx.Client, buckets: list[str]) -> Iterator[str]:
    data, results = buckets
    dag_id = f"wmltrain_metrics_{uuid.uuid4().hex[:10]}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("train.sh", TRAIN_SH)
    source = DAG.format(
        dag_id=dag_id,
        interval=METRICS_INTERVAL_S,
        manifest=manifest(
            command="sh train.sh",
            data_bucket=data,
            results_bucket=results,
            connection={"conn_id": "wmltrain_store_s3"},
        ),
        model="base64:" + base64.b64encode(buffer.getvalue()).decode(),
    )
    path = Path(services["WMLTRAIN_AIRFLOW_TEST_DAGS"]) / f"{dag_id}.py"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(textwrap.dedent(source))
    tmp.rename(path)
    try:
        yield dag_id
    finally:
        path.unlink(missing_ok=True)
        api.delete(f"/dags/{dag_id}")


def test_a_deferred_runs_points_reach_the_xcom_while_it_trains(
    services: dict[str, str], api: httpx.Client, metrics_dag: str
) -> None:
    dag_id = metrics_dag
    wait_for_dag(api, dag_id, PARSE_TIMEOUT_S)
    assert api.patch(f"/dags/{dag_id}", json={"is_paused": False}).status_code == 200
    run_id = trigger(api, dag_id)
    ti_path = f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/train"
    live: list[dict[str, Any]] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        ti = api.get(ti_path).json()
        if ti.get("state") in ("success", "failed"):
            break
        response = api.get(f"{ti_path}/xcomEntries/{STATUS_XCOM_KEY}", params={"deserialize": "true"})
        if ti.get("state") == "deferred" and response.status_code == 200:
            value = response.json().get("value")
            document = json.loads(value) if isinstance(value, str) else value
            if isinstance(document, dict) and document.get("state") == "PROCESSING" and document.get("steps"):
                live.append(document)
        time.sleep(1)
    wait_for_dag_run(api, dag_id, run_id, RUN_TIMEOUT_S)
    assert live, "no point reached the status XCom while the deferred run was PROCESSING"
    assert 1 <= len(live[0]["steps"]) < STEPS
    final = api.get(f"{ti_path}/xcomEntries/{STATUS_XCOM_KEY}", params={"deserialize": "true"}).json()[
        "value"
    ]
    final = json.loads(final) if isinstance(final, str) else final
    assert final["state"] == "COMPLETED"
    assert [p["step"] for p in final["steps"]] == list(range(1, STEPS + 1))
    assert final["steps"][-1] == {"step": STEPS, "loss": 100 - STEPS, "accuracy": STEPS}
