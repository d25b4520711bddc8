"""Issue 11 items 4 and 5 through real Airflow: a mapped grid of three training runs (``dag.test()`` on a
migrated SQLite database, the stand-in GPU daemon, the real S3 store) in which one run fails, and a
``BestRunOperator`` after it.

What Airflow 3.3 hands the downstream task: the mapped task's return values as a ``LazyXComSequence``
holding only the map indexes that returned one — the failed run is absent, not ``None`` — so the
operator names the failed run from the grid's status XComs and counts the grid's task instances.

The DAG runs in a subprocess with this checkout first on ``PYTHONPATH`` (the package is installed in the
virtualenv as an editable install of the main checkout).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from tests.integration.test_training_run import (
    CONN_ID,
    AirflowRunner,
    _env_for,
    _objects,
    airflow_runner,  # noqa: F401  (fixture)
    buckets,  # noqa: F401  (fixture)
)
from tests.integration.training_helpers import REPO_ROOT, manifest, model_zip

#: ``--lr 0.1`` fails (exit 3); the others complete with an accuracy that depends on the learning rate.
GRID_SH = """\
lr="$2"
echo "training with lr=$lr"
case "$lr" in
  0.1) echo "diverged" >&2; exit 3 ;;
  0.01) accuracy=0.93 ;;
  *) accuracy=0.81 ;;
esac
echo "{\\"accuracy\\": $accuracy, \\"loss\\": 0.2}" > "$RESULT_DIR/metrics.json"
echo "not a picture" > "$RESULT_DIR/learning-curve.png"
echo weights > "$RESULT_DIR/model.bin"
"""


def _grid_dag(runner: AirflowRunner, tmp_path: Path, name: str, data: str, results: str, gpu: str) -> Path:
    man = manifest(
        command="sh train.sh --lr 0.5",
        data_bucket=data,
        results_bucket=results,
        connection={"conn_id": CONN_ID},
    )
    zip_path = model_zip(tmp_path / f"{name}.zip", {"train.sh": GRID_SH})
    folder = runner.work / f"dags-{name}"
    folder.mkdir(exist_ok=True)
    body = f"""
    from airflow_wmltrain.grid import MAP_INDEX_TEMPLATE, grid
    from airflow_wmltrain.operators.best_run import BestRunOperator

    with DAG(dag_id={name!r}, schedule=None, start_date=datetime(2026, 1, 1)) as dag:
        train = TrainingRunOperator.partial(
            task_id="train", manifest={man!r}, model_definition={str(zip_path)!r}, network_mode="none",
            docker_url={gpu!r}, map_index_template=MAP_INDEX_TEMPLATE,
        ).expand(hyperparameters=grid(product={{"lr": [0.1, 0.01, 0.001]}}))
        BestRunOperator(task_id="best", runs=train.output, metric="accuracy", mode="max",
                        min_completed=2, conn_id={CONN_ID!r})
    """
    runner.work, saved = folder, runner.work
    try:
        return runner.write_dag(name, body)
    finally:
        runner.work = saved


def _returned(runner: AirflowRunner, home: str, task_id: str) -> Any:
    """A task's return value, from the run's metadata database."""
    with sqlite3.connect(runner.home(home) / "airflow.db") as db:
        row = db.execute(
            "SELECT value FROM xcom WHERE task_id = ? AND key = 'return_value'", (task_id,)
        ).fetchone()
    assert row is not None, f"{task_id} returned nothing"
    value = json.loads(row[0])
    return json.loads(value) if isinstance(value, str) else value


def test_the_best_run_of_a_grid_with_a_failed_run_and_its_chart(
    airflow_runner: AirflowRunner,  # noqa: F811
    buckets: tuple[str, str],  # noqa: F811
    tmp_path: Path,
    services: dict[str, str],
    s3_client: Any,
) -> None:
    data, results = buckets
    dag_file = _grid_dag(
        airflow_runner, tmp_path, "it_best_run", data, results, services["WMLTRAIN_GPU_DOCKER_HOST"]
    )
    env = {**_env_for(dag_file), "PYTHONPATH": str(REPO_ROOT)}
    states, output = airflow_runner.run(dag_file, home="best_run", env=env, timeout=420)
    assert states == {
        "train[0]": "failed",
        "train[1]": "success",
        "train[2]": "success",
        "best": "success",
    }, output[-6000:]
    best = _returned(airflow_runner, "best_run", "best")
    assert best["metric"] == "accuracy"
    assert best["mode"] == "max"
    assert best["value"] == 0.93
    assert best["hyperparameters"] == {"lr": 0.01}
    assert (best["completed"], best["considered"]) == (2, 3)
    assert [run["value"] for run in best["ranking"]] == [0.93, 0.81]
    training_id = best["training_id"]
    assert best["results_location"] == f"s3://{results}/{training_id}/"
    assert best["chart_location"] == f"s3://{results}/{training_id}/grid-accuracy.png"
    stored = _objects(s3_client, results, f"{training_id}/")
    assert stored[f"{training_id}/grid-accuracy.png"].startswith(b"\x89PNG\r\n\x1a\n")
    head = s3_client.head_object(Bucket=results, Key=f"{training_id}/grid-accuracy.png")
    assert head["ContentType"] == "image/png"
    # the training's own learning-curve.png is not stored: the name is the run's (no steps, no curve)
    assert stored[f"{training_id}/model.bin"] == b"weights\n"
    assert f"{training_id}/learning-curve.png" not in stored
    # the failed run is named in the task log, with its error
    assert "Left out training-" in output
    assert "its task failed: the run is FAILED: C201" in output
