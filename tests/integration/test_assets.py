"""Issue 11 item 6 end to end: a run that completes through real Airflow (``dag.test()`` on a migrated
database, the stand-in GPU daemon, the real S3 store) records its asset events, and the DAGs scheduled on
them are queued; a failed run records none."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from tests.integration.test_training_run import (
    CONN_ID,
    FAIL_SH,
    TRAIN_SH,
    AirflowRunner,
    _env_for,
    _training_id,
    airflow_runner,  # noqa: F401  (fixture)
    buckets,  # noqa: F401  (fixture)
)
from tests.integration.training_helpers import manifest, model_zip

NOT_PAUSED = {"AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False"}


def _dags(
    runner: AirflowRunner, tmp_path: Path, name: str, script: str, data: str, results: str, gpu: str
) -> Path:
    """A training DAG with an alias and the results bucket as outlets, and two DAGs scheduled on them."""
    man = manifest(
        command="sh train.sh --lr 0.1",
        data_bucket=data,
        results_bucket=results,
        connection={"conn_id": CONN_ID},
    )
    zip_path = model_zip(tmp_path / f"{name}.zip", {"train.sh": script})
    folder = runner.work / f"dags-{name}"
    folder.mkdir(exist_ok=True)
    body = f"""
    from airflow.sdk import AssetAlias
    from airflow_wmltrain.assets import results_asset

    MODELS = AssetAlias("{name}-models")
    BUCKET = results_asset("s3://{results}/")
    with DAG(dag_id={name!r}, schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        TrainingRunOperator(task_id="train", manifest={man!r}, model_definition={str(zip_path)!r},
                            network_mode="none", docker_url={gpu!r}, outlets=[MODELS, BUCKET])
    with DAG(dag_id="{name}_on_alias", schedule=[MODELS], start_date=datetime(2026, 1, 1)):
        pass
    with DAG(dag_id="{name}_on_bucket", schedule=[BUCKET], start_date=datetime(2026, 1, 1)):
        pass
    """
    runner.work, saved = folder, runner.work
    try:
        return runner.write_dag(name, body)
    finally:
        runner.work = saved


def _recorded(runner: AirflowRunner, home: str) -> tuple[list[tuple[str, dict[str, Any]]], set[str]]:
    """The asset events (URI, extra) and the DAGs queued by them, from the run's metadata database."""
    with sqlite3.connect(runner.home(home) / "airflow.db") as db:
        events = [
            (uri, json.loads(extra or "{}"))
            for uri, extra in db.execute(
                "SELECT a.uri, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id ORDER BY a.uri"
            )
        ]
        queued = {row[0] for row in db.execute("SELECT target_dag_id FROM asset_dag_run_queue")}
    return events, queued


def test_a_completed_run_records_its_asset_events_and_queues_the_dags_scheduled_on_them(
    airflow_runner: AirflowRunner,  # noqa: F811
    buckets: tuple[str, str],  # noqa: F811
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    dag_file = _dags(
        airflow_runner, tmp_path, "it_assets", TRAIN_SH, data, results, services["WMLTRAIN_GPU_DOCKER_HOST"]
    )
    states, output = airflow_runner.run(dag_file, home="assets", env={**_env_for(dag_file), **NOT_PAUSED})
    assert states == {"train": "success"}, output[-6000:]
    training_id = _training_id(output)
    events, queued = _recorded(airflow_runner, "assets")
    extra = {
        "training_id": training_id,
        "results_location": f"s3://{results}/{training_id}/",
        "metrics": {"accuracy": 0.75, "loss": 0.5},
    }
    assert events == [(f"s3://{results}/", extra), (f"s3://{results}/{training_id}", extra)], output[-6000:]
    assert queued == {"it_assets_on_alias", "it_assets_on_bucket"}


def test_a_failed_run_records_no_asset_event(
    airflow_runner: AirflowRunner,  # noqa: F811
    buckets: tuple[str, str],  # noqa: F811
    tmp_path: Path,
    services: dict[str, str],
) -> None:
    data, results = buckets
    dag_file = _dags(
        airflow_runner,
        tmp_path,
        "it_assets_fail",
        FAIL_SH,
        data,
        results,
        services["WMLTRAIN_GPU_DOCKER_HOST"],
    )
    states, output = airflow_runner.run(
        dag_file, home="assets_fail", env={**_env_for(dag_file), **NOT_PAUSED}
    )
    assert states == {"train": "failed"}, output[-6000:]
    assert _recorded(airflow_runner, "assets_fail") == ([], set())
