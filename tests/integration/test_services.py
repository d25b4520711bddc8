"""The real services behave as the provider relies on: one Swift serving S3 and Swift v1 on the same
objects, a stand-in GPU Docker host that turns device requests into ``NVIDIA_VISIBLE_DEVICES``, a
plain Docker host that refuses GPU requests, and an Airflow whose metadata database is PostgreSQL."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import shlex
import subprocess
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import docker
import docker.errors
import pytest
import sqlalchemy
import swiftclient
from boto3.s3.transfer import TransferConfig
from docker.types import DeviceRequest

from tests.integration.service_helpers import api_client

# A key with a space, a sub-"directory" and non-ASCII characters, as training outputs may have.
ODD_KEY = "results dir/ünïcødé ✓ model.bin"
KEYS = ["plain.txt", ODD_KEY, "empty"]


def _payload(key: str) -> bytes:
    return b"" if key == "empty" else os.urandom(1000) + key.encode()


def test_s3_upload_is_visible_through_swift(
    bucket: str, s3_client: Any, swift_connection: swiftclient.Connection
) -> None:
    payloads = {key: _payload(key) for key in KEYS}
    for key, data in payloads.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)

    for key, data in payloads.items():
        headers, body = swift_connection.get_object(bucket, key)
        assert body == data
        assert int(headers["content-length"]) == len(data)
        assert headers["etag"] == hashlib.md5(data).hexdigest()

    _, listing = swift_connection.get_container(bucket)
    assert {obj["name"]: obj["bytes"] for obj in listing} == {k: len(v) for k, v in payloads.items()}


def test_swift_upload_is_visible_through_s3(
    bucket: str, s3_client: Any, swift_connection: swiftclient.Connection
) -> None:
    payloads = {key: _payload(key) for key in KEYS}
    for key, data in payloads.items():
        swift_connection.put_object(bucket, key, contents=data)

    for key, data in payloads.items():
        got = s3_client.get_object(Bucket=bucket, Key=key)
        assert got["Body"].read() == data
        assert got["ContentLength"] == len(data)
        assert s3_client.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(data)

    listed = s3_client.list_objects_v2(Bucket=bucket)["Contents"]
    assert {obj["Key"]: obj["Size"] for obj in listed} == {k: len(v) for k, v in payloads.items()}
    top = s3_client.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["results dir/"]
    inner = s3_client.list_objects_v2(Bucket=bucket, Prefix="results dir/")["Contents"]
    assert [obj["Key"] for obj in inner] == [ODD_KEY]


def test_s3_multipart_upload_reads_whole_through_swift(
    bucket: str, s3_client: Any, swift_connection: swiftclient.Connection
) -> None:
    # s3api stores a multipart upload as a Swift static large object (segments in "<bucket>+segments").
    data = os.urandom(11 * 1024 * 1024)
    part = 5 * 1024 * 1024  # S3's (and s3api's) minimum part size
    config = TransferConfig(multipart_threshold=part, multipart_chunksize=part)
    s3_client.upload_fileobj(io.BytesIO(data), bucket, ODD_KEY, Config=config)

    headers, body = swift_connection.get_object(bucket, ODD_KEY)
    assert int(headers["content-length"]) == len(data)
    assert body == data
    assert s3_client.head_object(Bucket=bucket, Key=ODD_KEY)["ContentLength"] == len(data)


def test_s3_delete_objects_needs_content_md5(bucket: str, s3_client: Any) -> None:
    """Documents a quirk: Swift 2.30's s3api requires Content-MD5 on DeleteObjects, and boto3 >= 1.36
    sends a CRC32 checksum instead. Adding the header before signing makes bulk deletes work."""
    keys = ["a", ODD_KEY]
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=b"x")
    delete = {"Objects": [{"Key": key} for key in keys]}

    if tuple(int(x) for x in boto3.__version__.split(".")[:2]) >= (1, 36):
        with pytest.raises(botocore.exceptions.ClientError, match="Content-MD5"):
            s3_client.delete_objects(Bucket=bucket, Delete=delete)

    def add_content_md5(request: Any, **_: Any) -> None:
        body = request.body if isinstance(request.body, bytes) else (request.body or "").encode()
        request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()

    event = "before-sign.s3.DeleteObjects"
    s3_client.meta.events.register(event, add_content_md5)
    try:
        result = s3_client.delete_objects(Bucket=bucket, Delete=delete)
    finally:
        s3_client.meta.events.unregister(event, add_content_md5)
    assert sorted(d["Key"] for d in result["Deleted"]) == sorted(keys)
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket)


def _visible_devices(client: docker.DockerClient, image: str, request: DeviceRequest) -> str:
    out: bytes = client.containers.run(
        image,
        ["sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES"],
        device_requests=[request],
        network_mode="none",
        remove=True,
    )
    return out.decode().strip()


@pytest.mark.parametrize(
    ("request_kwargs", "expected"),
    [
        ({"device_ids": ["2", "3"]}, "2,3"),
        ({"count": 2}, "0,1"),  # Docker does no GPU scheduling: count=N always means the first N
        ({"count": -1}, "all"),
    ],
    ids=["device_ids", "count", "all"],
)
def test_gpu_host_sets_visible_devices(
    gpu_docker_client: docker.DockerClient,
    test_image: str,
    services: dict[str, str],
    request_kwargs: dict[str, Any],
    expected: str,
) -> None:
    hook_log = Path(services["WMLTRAIN_SERVICES_DIR"]) / "logs" / "gpu-hook.log"
    calls_before = len(hook_log.read_text().splitlines()) if hook_log.exists() else 0

    request = DeviceRequest(capabilities=[["gpu"]], **request_kwargs)
    assert _visible_devices(gpu_docker_client, test_image, request) == expected

    # The daemon ran the stand-in nvidia-container-runtime-hook as an OCI prestart hook.
    assert len(hook_log.read_text().splitlines()) > calls_before


def test_gpu_host_env_without_network(gpu_docker_client: docker.DockerClient, test_image: str) -> None:
    out = gpu_docker_client.containers.run(
        test_image,
        ["env"],
        device_requests=[DeviceRequest(device_ids=["1"], capabilities=[["gpu"]])],
        network_disabled=True,
        remove=True,
    )
    env_lines = out.decode().splitlines()
    assert [line for line in env_lines if line.startswith("NVIDIA_VISIBLE_DEVICES=")] == [
        "NVIDIA_VISIBLE_DEVICES=1"
    ]


def test_plain_docker_refuses_gpu_requests(docker_client: docker.DockerClient, test_image: str) -> None:
    """The operator has to translate this error into a clear "this host has no GPU support" message."""
    name = f"wmltrain-it-nogpu-{uuid.uuid4().hex[:8]}"

    def create_and_start() -> None:
        container = docker_client.containers.create(
            test_image,
            ["true"],
            name=name,
            device_requests=[DeviceRequest(count=1, capabilities=[["gpu"]])],
            network_mode="none",
        )
        container.start()  # Docker 20.10 refuses here, at start, not at create

    try:
        with pytest.raises(docker.errors.APIError, match="could not select device driver"):
            create_and_start()
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.containers.get(name).remove(force=True)


def _airflow_environment(services: dict[str, str]) -> dict[str, str]:
    """The environment of the services' Airflow processes, from the ``airflow.env`` next to its config."""
    env: dict[str, str] = {}
    airflow_env = Path(services["WMLTRAIN_AIRFLOW_HOME"]) / "airflow.env"
    for line in airflow_env.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words:
            assert words[0] == "export", line
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


def test_airflow_metadata_database_is_postgres(services: dict[str, str]) -> None:
    """Airflow, as its own CLI reads the services' configuration, uses the services' PostgreSQL, and the
    running scheduler heartbeats into that database (so the daemons use it too, not only the config)."""
    proc = subprocess.run(
        ["airflow", "config", "get-value", "database", "sql_alchemy_conn"],
        env=_airflow_environment(services),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    url = sqlalchemy.engine.make_url(proc.stdout.strip())
    # (no URL in the messages: it holds the password)
    assert url.drivername == "postgresql+psycopg2", url.drivername
    assert url.host == "127.0.0.1", url.host

    with api_client(services) as api:
        health = api.get("/monitor/health")
    assert health.status_code == 200, health.text
    assert health.json()["metadatabase"]["status"] == "healthy", health.json()

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            version = connection.execute(sqlalchemy.text("SELECT version()")).scalar_one()
            latest = connection.execute(
                sqlalchemy.text(
                    "SELECT max(latest_heartbeat) FROM job"
                    " WHERE job_type = 'SchedulerJob' AND state = 'running'"
                )
            ).scalar_one()
    finally:
        engine.dispose()
    assert version.startswith("PostgreSQL "), version
    assert latest is not None, "no running scheduler job in the PostgreSQL database"
    if latest.tzinfo is None:
        latest = latest.replace(tzinfo=timezone.utc)
    assert datetime.now(timezone.utc) - latest < timedelta(seconds=60), latest
