"""Daily retraining of the MNIST example on that day's data.

Each DAG run trains on the files under ``<data bucket>/<logical date>/`` (``2026-11-28/train-images...``):
the manifest's data prefix is ``{{ ds }}/``. Every run has its own training id (derived from the DAG run),
so a backfill creates one distinct run per date::

    airflow backfill create --dag-id mnist_retraining --from-date 2026-11-01 --to-date 2026-11-07

Completed runs emit an asset event on ``mnist-models`` (see ``mnist_evaluate``).
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, AssetAlias
from mnist_example import CONTAINER, MODEL_ZIP, manifest, params

from airflow_wmltrain.operators.training_run import TrainingRunOperator
from airflow_wmltrain.service.pools import DEFAULT_POOL, pool_slots

with DAG(
    dag_id="mnist_retraining",
    description="Retrain the MNIST example every day on that day's data",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=2,
    tags=["wmltrain", "example"],
    params=params(data_bucket="mnist-daily-data", data_description="one folder per day"),
    doc_md=__doc__,
) as dag:
    TrainingRunOperator(
        task_id="train",
        manifest=manifest(
            data_bucket="{{ params.data_bucket }}",
            results_bucket="{{ params.results_bucket }}",
            data_prefix="{{ ds }}/",
        ),
        model_definition=MODEL_ZIP,
        hyperparameters={"trainingIters": "{{ params.trainingIters }}"},
        pool=os.environ.get("WMLTRAIN_POOL", DEFAULT_POOL),
        pool_slots=pool_slots("small"),
        deferrable=True,
        outlets=[AssetAlias("mnist-models")],
        **CONTAINER,
    )
