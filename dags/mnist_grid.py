"""A learning-rate × batch-size grid of the MNIST example, its best run, and the pictures.

Six training runs (3 learning rates × 2 batch sizes), one mapped task: Airflow runs them as GPUs free up
(the pool ``wmltrain_gpus``: ``wmltrain pools`` creates it, one slot per GPU of the Docker host) and
shows each as ``learningRate=0.001,batchSize=64`` in the grid view. Every run stores its model, its
metrics per step and a learning curve (``learning-curve.png``) under its training id; ``best`` picks
the run with the highest test accuracy — runs that failed do not stop it — and stores a chart of the
whole grid beside that run's results. Each completed run also emits an asset event on the alias
``mnist-models``, which schedules ``mnist_evaluate``.

Trigger it from the UI (or ``airflow dags trigger mnist_grid``); the form chooses the buckets and the
length of each run.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, AssetAlias
from mnist_example import CONTAINER, MODEL_ZIP, manifest, params

from airflow_wmltrain.grid import MAP_INDEX_TEMPLATE, grid
from airflow_wmltrain.operators.best_run import BestRunOperator
from airflow_wmltrain.operators.training_run import TrainingRunOperator
from airflow_wmltrain.service.pools import DEFAULT_POOL, pool_slots

with DAG(
    dag_id="mnist_grid",
    description="MNIST: a learning-rate x batch-size grid, the best run, learning curves and a grid chart",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["wmltrain", "example"],
    params=params(data_bucket="mnist-training-data", data_description="the MNIST files"),
    doc_md=__doc__,
) as dag:
    train = TrainingRunOperator.partial(
        task_id="train",
        manifest=manifest(
            data_bucket="{{ params.data_bucket }}", results_bucket="{{ params.results_bucket }}"
        ),
        model_definition=MODEL_ZIP,
        map_index_template=MAP_INDEX_TEMPLATE,
        pool=os.environ.get("WMLTRAIN_POOL", DEFAULT_POOL),
        pool_slots=pool_slots("small"),
        deferrable=True,
        outlets=[AssetAlias("mnist-models")],
        **CONTAINER,
    ).expand(
        hyperparameters=grid(
            product={"learningRate": [0.0003, 0.001, 0.003], "batchSize": [32, 64]},
            fixed={"trainingIters": "{{ params.trainingIters }}"},
        )
    )
    BestRunOperator(
        task_id="best",
        runs=train.output,
        metric="accuracy",
        mode="max",
        conn_id="wmltrain_store_s3",
    )
