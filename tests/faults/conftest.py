"""Fixtures of the fault-injection tests (issue 9): those of tests/integration (the real services), plus
the REST API client, the ``wmltrain`` command line, the model zip of every scenario and a recorder of the
GPU daemon's container ``create`` events.

Every test here is marked ``integration`` (they need ``scripts/services up``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.fault_helpers import SCRIPTS, CreateEvents
from tests.integration import conftest as integration
from tests.integration.service_helpers import Cli, api_client, wait_for
from tests.integration.training_helpers import model_zip

FAULTS_DIR = Path(__file__).resolve().parent

# The fixtures of tests/integration (the real services and their clients), registered here by name.
services = integration.services
store_credentials = integration.store_credentials
s3_client = integration.s3_client
gpu_docker_client = integration.gpu_docker_client
test_image = integration.test_image


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test under tests/faults gets the marker, so `-m "not integration"` leaves them out.
    for item in items:
        if FAULTS_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def api(services: dict[str, str]) -> Iterator[httpx.Client]:
    client = api_client(services)
    _wait_until_warm(client)
    yield client
    client.close()


def _wait_until_warm(client: httpx.Client, timeout: float = 300) -> None:
    """Wait until Airflow has parsed the repository's DAGs once: right after `scripts/services up` (the
    first thing CI does) its dag-processor and api-server are busy with that, and the scenarios, which
    start a score of tasks at once, would meet an api-server that does not answer in time."""

    def parsed() -> bool:
        try:
            return client.get("/dags/wmltrain_training").status_code == 200
        except httpx.TransportError:
            return False

    wait_for("Airflow to have parsed the repository's DAGs", timeout, parsed, interval=2.0)


@pytest.fixture(scope="module")
def cli(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli.for_services(services, tmp_path_factory.mktemp("faults-cli-home"))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model definition of every scenario: one zip, a script per behaviour."""
    return model_zip(tmp_path_factory.mktemp("faults") / "model.zip", SCRIPTS)


@pytest.fixture(scope="module")
def gpu_events(services: dict[str, str]) -> Iterator[CreateEvents]:
    """Every container ``create`` on the shared stand-in GPU daemon from the module's start on."""
    events = CreateEvents(services["WMLTRAIN_GPU_DOCKER_HOST"])
    yield events
    events.close()
