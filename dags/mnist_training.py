"""The example training run: the seed's MNIST example (PyTorch) as one Airflow task.

``make demo`` runs it end to end (``airflow dags test mnist_training``) on the local services: the
Swift+S3 store (connection ``wmltrain_store_s3``), the local Docker engine and the image built by
``images/build``.  Trigger it from the UI to change the learning rate or the number of iterations: the
form's values are applied to the manifest's command as hyperparameters.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import DAG, Param
from mnist_example import CONTAINER, MODEL_ZIP, ROOT

from airflow_wmltrain.operators.training_run import TrainingRunOperator

EXAMPLE = ROOT / "examples" / "mnist"

with DAG(
    dag_id="mnist_training",
    description="Train the MNIST example (a small PyTorch CNN) on the GPUs of a Docker host",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["wmltrain", "example"],
    params={
        "learningRate": Param(0.001, type="number", exclusiveMinimum=0, description="Adam learning rate"),
        "trainingIters": Param(10000, type="integer", minimum=64, description="training examples to process"),
    },
    doc_md=__doc__,
) as dag:
    TrainingRunOperator(
        task_id="train",
        manifest=os.environ.get("WMLTRAIN_MNIST_MANIFEST", str(EXAMPLE / "manifest.yaml")),
        model_definition=MODEL_ZIP,
        hyperparameters={
            "learningRate": "{{ params.learningRate }}",
            "trainingIters": "{{ params.trainingIters }}",
        },
        **CONTAINER,
    )
