"""``wmltrain pools`` against the real services: the pool of the stand-in GPU daemon (4 GPUs, daemon label
``wmltrain.gpus=0,1,2,3``) is created on the real Airflow through its REST API v2, updated when it
differs, and left alone when it does not."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.service_helpers import Cli, api_client, quote


@pytest.fixture(scope="module")
def cli(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Cli:
    return Cli.for_services(services, tmp_path_factory.mktemp("pools-airflow-home"))


@pytest.fixture
def api(services: dict[str, str]) -> Iterator[httpx.Client]:
    client = api_client(services)
    yield client
    client.close()


@pytest.fixture
def pool(api: httpx.Client) -> Iterator[str]:
    """A pool name of this test only; the pool is deleted afterwards."""
    name = f"wmltrain_gpus_test_{uuid.uuid4().hex[:8]}"
    yield name
    api.delete(f"/pools/{quote(name)}")


def test_pools_creates_the_gpu_pool_of_the_stand_in_gpu_host(
    cli: Cli, api: httpx.Client, services: dict[str, str], pool: str, tmp_path: Path
) -> None:
    gpu_host = services["WMLTRAIN_GPU_DOCKER_HOST"]
    common = ("pools", "--docker-url", gpu_host, "--pool", pool)

    dry = cli.ok(*common, "--dry-run", "--json")
    [planned] = json.loads(dry.stdout)
    assert planned["action"] == "create"
    assert planned["dry_run"] is True
    assert planned["slots"] == 4
    assert api.get(f"/pools/{quote(pool)}").status_code == 404, "a dry run created the pool"

    created = cli.ok(*common, "--json")
    [change] = json.loads(created.stdout)
    assert change["action"] == "create"
    assert change["gpus"] == ["0", "1", "2", "3"]
    assert change["docker_url"] == gpu_host
    found = api.get(f"/pools/{quote(pool)}").json()
    assert found["slots"] == 4
    assert found["include_deferred"] is True
    assert gpu_host in found["description"]

    again = cli.ok(*common)
    assert again.stdout.startswith(f"{pool}: unchanged: 4 slots, include_deferred"), again.describe()

    # Someone shrank it and turned include_deferred off: the command puts it back, keeping the description.
    patched = api.patch(
        f"/pools/{quote(pool)}",
        params={"update_mask": ["slots", "include_deferred", "description"]},
        json={"pool": pool, "slots": 1, "include_deferred": False, "description": "our GPUs"},
    )
    assert patched.status_code == 200, patched.text
    fixed = cli.ok(*common, "--json")
    [change] = json.loads(fixed.stdout)
    assert change["action"] == "update"
    assert change["previous"] == {"slots": 1, "include_deferred": False}
    found = api.get(f"/pools/{quote(pool)}").json()
    assert (found["slots"], found["include_deferred"], found["description"]) == (4, True, "our GPUs")


def test_pools_refuses_an_unreachable_host_in_one_line(cli: Cli, api: httpx.Client, pool: str) -> None:
    result = cli.run("pools", "--docker-url", "unix:///nonexistent/docker.sock", "--pool", pool)
    assert result.code == 3, result.describe()
    assert result.stderr.startswith("error S100: no Docker host answered"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert api.get(f"/pools/{quote(pool)}").status_code == 404
