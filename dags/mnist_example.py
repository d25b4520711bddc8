"""What the MNIST example DAGs share (not a DAG: ``.airflowignore`` keeps the dag-processor off it): the
example's manifest, its model zip and the container settings of its runs.

Airflow puts the DAG folder on ``sys.path``, so the DAG files import it as ``mnist_example``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import Param

ROOT = Path(__file__).resolve().parents[1]
#: The example's model-definition zip (``make build/mnist-model.zip``).
MODEL_ZIP = os.environ.get("WMLTRAIN_MNIST_MODEL", str(ROOT / "build" / "mnist-model.zip"))
#: How the example's runs are started: the Docker host of the deployment (``WMLTRAIN_DOCKER_URL``;
#: none: the Docker provider's default), no network (the data is staged), shared memory for PyTorch.
CONTAINER: dict[str, Any] = {
    "docker_url": os.environ.get("WMLTRAIN_DOCKER_URL") or None,
    "network_mode": "none",
    "shm_size": 256 * 1024 * 1024,
}


def manifest(*, data_bucket: str, results_bucket: str, data_prefix: str = "") -> dict[str, Any]:
    """``examples/mnist/manifest.yaml`` with the given buckets (Jinja templates are welcome: the
    operator renders its manifest) and a data prefix (a folder of the data bucket)."""
    document: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "mnist" / "manifest.yaml").read_text())
    document["training_data_reference"][0]["source"].update(bucket=data_bucket, prefix=data_prefix)
    document["training_results_reference"]["target"]["bucket"] = results_bucket
    return document


def params(*, data_bucket: str, data_description: str) -> dict[str, Param]:
    """The form of a DAG that trains the example: its buckets and how long each run trains."""
    return {
        "data_bucket": Param(data_bucket, type="string", description=data_description),
        "results_bucket": Param("mnist-training-models", type="string", description="where runs go"),
        "trainingIters": Param(6000, type="integer", minimum=64, description="examples per run"),
    }
