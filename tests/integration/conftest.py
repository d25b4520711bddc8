"""Fixtures for tests against real services: Docker Engine, a stand-in GPU Docker host, Swift + S3.

The ``services`` fixture runs ``scripts/services up`` (idempotent: fast when everything already runs)
and parses the ``export NAME=value`` lines it prints. If the services cannot be started, every test
that needs them errors with the script's reason; nothing is skipped silently.
"""

from __future__ import annotations

import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import docker
import pytest
import swiftclient
from botocore.config import Config

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES_SCRIPT = REPO_ROOT / "scripts" / "services"
INTEGRATION_DIR = Path(__file__).resolve().parent
UP_TIMEOUT_S = 900  # a cold start on a bare machine installs Debian packages first


# The marker itself is registered in pyproject.toml ([tool.pytest.ini_options] markers).
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test under tests/integration gets the marker, so `-m "not integration"` leaves them out.
    for item in items:
        if INTEGRATION_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


def parse_exports(text: str) -> dict[str, str]:
    """Parse the ``export NAME=value`` lines of ``scripts/services`` (values shell-quoted)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) != 2 or words[0] != "export" or "=" not in words[1]:
            raise ValueError(f"unexpected line from {SERVICES_SCRIPT}: {line!r}")
        name, _, value = words[1].partition("=")
        env[name] = value
    return env


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    """Start the services (if not running) and return their settings (``WMLTRAIN_*``, ``DOCKER_HOST``)."""
    try:
        proc = subprocess.run(
            [str(SERVICES_SCRIPT), "up"],
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"{SERVICES_SCRIPT} up could not run: {exc}", pytrace=False)
    if proc.returncode != 0:
        pytest.fail(
            f"{SERVICES_SCRIPT} up failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False
        )
    try:
        env = parse_exports(proc.stdout)
    except ValueError as exc:
        pytest.fail(str(exc), pytrace=False)
    required = (
        "DOCKER_HOST",
        "WMLTRAIN_GPU_DOCKER_HOST",
        "WMLTRAIN_TEST_IMAGE",
        "WMLTRAIN_S3_ENDPOINT",
        "WMLTRAIN_S3_REGION",
        "WMLTRAIN_SWIFT_AUTH_URL",
        "WMLTRAIN_STORE_USER",
        "WMLTRAIN_STORE_KEY",
        "WMLTRAIN_AIRFLOW_URL",
        "WMLTRAIN_AIRFLOW_USER",
        "WMLTRAIN_AIRFLOW_PASSWORD",
        "WMLTRAIN_AIRFLOW_HOME",
        "WMLTRAIN_AIRFLOW_TEST_DAGS",
    )
    missing = [name for name in required if not env.get(name)]
    if missing:
        pytest.fail(f"{SERVICES_SCRIPT} up did not export {', '.join(missing)}", pytrace=False)
    return env


@pytest.fixture(scope="session")
def store_credentials(services: dict[str, str]) -> dict[str, str]:
    """The one account of the Swift all-in-one, for both APIs (S3 access key = Swift user)."""
    return {
        "user": services["WMLTRAIN_STORE_USER"],
        "key": services["WMLTRAIN_STORE_KEY"],
        "s3_endpoint": services["WMLTRAIN_S3_ENDPOINT"],
        "s3_region": services["WMLTRAIN_S3_REGION"],
        "swift_auth_url": services["WMLTRAIN_SWIFT_AUTH_URL"],
    }


@pytest.fixture(scope="session")
def docker_client(services: dict[str, str]) -> Iterator[docker.DockerClient]:
    """The plain Docker daemon (no GPU driver: it refuses GPU device requests)."""
    client = docker.DockerClient(base_url=services["DOCKER_HOST"], timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def gpu_docker_client(services: dict[str, str]) -> Iterator[docker.DockerClient]:
    """The stand-in GPU host: accepts GPU device requests and sets ``NVIDIA_VISIBLE_DEVICES``."""
    client = docker.DockerClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"], timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="session")
def test_image(services: dict[str, str]) -> str:
    """A tiny busybox image present on both daemons (no registry is needed or reachable)."""
    return services["WMLTRAIN_TEST_IMAGE"]


@pytest.fixture(scope="session")
def s3_client(store_credentials: dict[str, str]) -> Any:  # boto3 clients have no static type
    """A boto3 S3 client for Swift's s3api: path-style addressing, SigV4, region us-east-1."""
    return boto3.client(
        "s3",
        endpoint_url=store_credentials["s3_endpoint"],
        region_name=store_credentials["s3_region"],
        aws_access_key_id=store_credentials["user"],
        aws_secret_access_key=store_credentials["key"],
        config=Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


@pytest.fixture(scope="session")
def swift_connection(store_credentials: dict[str, str]) -> Iterator[swiftclient.Connection]:
    """A python-swiftclient connection with tempauth (auth v1)."""
    conn = swiftclient.Connection(
        authurl=store_credentials["swift_auth_url"],
        user=store_credentials["user"],
        key=store_credentials["key"],
        auth_version="1",
        retries=2,
    )
    yield conn
    conn.close()


@pytest.fixture
def bucket(s3_client: Any) -> Iterator[str]:
    """A fresh, empty bucket (= Swift container) with a unique S3-valid name; removed with its objects."""
    name = f"wmltrain-it-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    # One DELETE per object: Swift 2.30's s3api wants Content-MD5 on DeleteObjects, which boto3 >= 1.36
    # no longer sends (see test_services.py).
    paginator = s3_client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        for obj in page.get("Contents", []):
            s3_client.delete_object(Bucket=name, Key=obj["Key"])
    s3_client.delete_bucket(Bucket=name)


# --- staging and upload tests (tests/integration/storage_helpers.py) ------------------------------------


@pytest.fixture
def proxy_log(services: dict[str, str]) -> Any:
    """The Swift proxy's access log from now on (a ``storage_helpers.ProxyLog``), to count requests."""
    from tests.integration.storage_helpers import ProxyLog

    path = Path(services["WMLTRAIN_SERVICES_DIR"]) / "logs" / "swift-proxy.log"
    return ProxyLog(path, services["WMLTRAIN_S3_ENDPOINT"])


@pytest.fixture
def segments_cleanup(bucket: str, swift_connection: swiftclient.Connection) -> Iterator[str]:
    """``bucket``, whose large objects and segment containers are removed after the test: s3api's
    ``<bucket>+segments`` and python-swiftclient's ``<bucket>_segments`` (which the ``bucket`` fixture
    does not know about)."""
    import contextlib

    yield bucket
    with contextlib.suppress(swiftclient.ClientException):
        for obj in swift_connection.get_container(bucket, full_listing=True)[1]:
            if obj.get("slo_etag"):
                swift_connection.delete_object(bucket, obj["name"], query_string="multipart-manifest=delete")
    for container in (f"{bucket}+segments", f"{bucket}_segments"):
        with contextlib.suppress(swiftclient.ClientException):
            for obj in swift_connection.get_container(container, full_listing=True)[1]:
                with contextlib.suppress(swiftclient.ClientException):
                    swift_connection.delete_object(container, obj["name"])
            swift_connection.delete_container(container)


@pytest.fixture
def creds(store_credentials: dict[str, str]) -> dict[str, str]:
    """The store's user and key (shared by the staging and upload tests)."""
    return store_credentials
