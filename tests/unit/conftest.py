"""Fixtures of the service-free tests of ``TrainingRun`` and ``TrainingRunOperator``: the stand-in Docker
daemon, the in-memory object store, the ``[wmltrain]`` settings and a minimal task instance."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_wmltrain.operators.training_run import TrainingRunOperator
from airflow_wmltrain.runtime import gpus
from airflow_wmltrain.settings import Settings
from tests.conftest import zip_bytes
from tests.unit.fakes import FakeDocker, MemoryStore, MemoryStores, fake_stage, fake_upload_tree

IMAGE = "busybox:fake"
FRAMEWORKS = {"busybox": {"1": {"image": IMAGE}}}
DATA_BUCKET = "unit-data"
RESULTS_BUCKET = "unit-results"
TRAIN_SH = "echo training\n"
#: The command of the operator's runs in these tests (a hyperparameter to apply).
OPERATOR_COMMAND = "sh train.sh --learningRate 0.1"


def manifest_doc(
    *, command: str = "sh train.sh", resource: str = "small", name: str = "unit-run"
) -> dict[str, Any]:
    """A training manifest (seed spelling) of the busybox test framework, inline S3 credentials."""
    connection = {
        "endpoint_url": "http://s3.invalid:9000",
        "aws_access_key_id": "unit-access-key",
        "aws_secret_access_key": "unit-secret-key-0123456789",
    }
    return {
        "model_definition": {
            "name": name,
            "framework": {"name": "busybox", "version": "1"},
            "execution": {"command": command, "resource": resource},
        },
        "training_data_reference": [
            {"connection": connection, "source": {"bucket": DATA_BUCKET, "type": "s3"}}
        ],
        "training_results_reference": {
            "connection": connection,
            "target": {"bucket": RESULTS_BUCKET, "type": "s3"},
        },
    }


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-ins listen on loopback: never reach them through an ``http_proxy`` of the machine."""
    for name in ("no_proxy", "NO_PROXY"):
        current = [item for item in os.environ.get(name, "").split(",") if item.strip()]
        monkeypatch.setenv(name, ",".join([*current, "127.0.0.1", "localhost"]))


@pytest.fixture
def stores(monkeypatch: pytest.MonkeyPatch) -> MemoryStores:
    """The in-memory object store, in place of every store a run opens; staging and upload stubbed."""
    memory = MemoryStores()
    monkeypatch.setattr("airflow_wmltrain.runtime.run.open_store", memory.open_store)
    monkeypatch.setattr("airflow_wmltrain.runtime.run.stage", fake_stage)
    monkeypatch.setattr("airflow_wmltrain.runtime.run.upload_tree", fake_upload_tree)
    memory[DATA_BUCKET].objects["input.txt"] = b"the training data\n"
    memory.buckets[RESULTS_BUCKET] = memory[RESULTS_BUCKET]  # the results bucket exists
    return memory


@pytest.fixture
def docker_api() -> Iterator[FakeDocker]:
    """The stand-in Docker daemon (GPUs 0-3 by its label, NVIDIA runtime accepted)."""
    gpus.clear_caches()
    with FakeDocker() as fake:
        yield fake
    gpus.clear_caches()


@pytest.fixture
def staging_dir(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def settings(staging_dir: Path) -> Settings:
    return Settings(staging_dir=str(staging_dir), frameworks=json.dumps(FRAMEWORKS), halt_grace_period=1)


@pytest.fixture
def wmltrain_env(monkeypatch: pytest.MonkeyPatch, staging_dir: Path) -> Path:
    """``AIRFLOW__WMLTRAIN__*`` settings for the operator (it reads them through Airflow's conf)."""
    for option, value in {
        "STAGING_DIR": str(staging_dir),
        "FRAMEWORKS": json.dumps(FRAMEWORKS),
        "GPU_POLL_INTERVAL": "1",
        "GPU_WAIT_TIMEOUT": "5",
        "HALT_GRACE_PERIOD": "1",
        "POLL_INTERVAL": "1",
        "DEFER_AFTER": "0",  # defer at once; the watch before deferring has its own tests
    }.items():
        monkeypatch.setenv(f"AIRFLOW__WMLTRAIN__{option}", value)
    return staging_dir


@pytest.fixture
def model_zip(tmp_path: Path) -> Path:
    path = tmp_path / "model.zip"
    path.write_bytes(zip_bytes({"train.sh": TRAIN_SH}))
    return path


class FakeTi:
    """The task instance as ``TrainingRunOperator`` uses it: identity, XCom pushes, task states."""

    def __init__(
        self,
        *,
        dag_id: str = "unit_dag",
        run_id: str = "manual__1",
        task_id: str = "train",
        map_index: int = -1,
    ) -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index = dag_id, run_id, task_id, map_index
        self.try_number = 1
        self.xcoms: dict[str, Any] = {}
        self.pushes: list[tuple[str, Any]] = []
        #: What ``get_task_states`` answers for this task instance (``Exception``: it raises it).
        self.state: Any = "running"

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value
        self.pushes.append((key, value))

    def get_task_states(
        self, *, dag_id: str, map_index: int | None, task_ids: list[str], run_ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        if isinstance(self.state, Exception):
            raise self.state
        assert (dag_id, task_ids, run_ids) == (self.dag_id, [self.task_id], [self.run_id])
        assert map_index == (None if self.map_index < 0 else self.map_index)
        # As Airflow's execution API answers: a mapped task instance is keyed "<task_id>_<map_index>".
        key = self.task_id if self.map_index < 0 else f"{self.task_id}_{self.map_index}"
        return {self.run_id: {key: self.state}}

    def owner(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "map_index": self.map_index,
        }

    def published(self) -> list[dict[str, Any]]:
        """The status documents published, in order."""
        from airflow_wmltrain.lifecycle import STATUS_XCOM_KEY

        return [value for key, value in self.pushes if key == STATUS_XCOM_KEY]


@pytest.fixture
def ti() -> FakeTi:
    return FakeTi()


@pytest.fixture
def results(stores: MemoryStores) -> MemoryStore:
    """The results bucket of the runs."""
    return stores[RESULTS_BUCKET]


@pytest.fixture
def make_op(docker_api: FakeDocker, model_zip: Path) -> Callable[..., TrainingRunOperator]:
    """A ``TrainingRunOperator`` on the stand-in Docker daemon (keyword arguments override)."""

    def make(**kwargs: Any) -> TrainingRunOperator:
        params: dict[str, Any] = {
            "task_id": "train",
            "manifest": manifest_doc(command=OPERATOR_COMMAND),
            "model_definition": str(model_zip),
            "docker_url": docker_api.url,
            "api_version": "1.43",
            "timeout": 10,
            "deferrable": False,
            "network_mode": "none",
        }
        params.update(kwargs)
        return TrainingRunOperator(**params)

    return make
