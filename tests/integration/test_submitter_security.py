"""The trigger row of a deferred run holds no credential, and its halt still stores the run (issue 10,
hole 11), against the real Docker daemon and the real S3 store: the store refuses the redacted
credentials the row shows, so only the sealed copy (Airflow's Fernet key) can store the halted run."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from airflow_wmltrain.hooks.docker import TrainingDockerHook
from airflow_wmltrain.lifecycle import STATUS_FILE, TRAINING_LOG
from airflow_wmltrain.triggers.training_run import TrainingRunTrigger, seal_halt
from tests.integration.storage_helpers import inline_connection, manifest_document

pytestmark = pytest.mark.integration

GRACE = 2


@pytest.fixture
def fernet_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from airflow.sdk.crypto import get_fernet
    from cryptography.fernet import Fernet

    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
    get_fernet.cache_clear()
    yield
    get_fernet.cache_clear()


@pytest.fixture
def container(docker_client: docker.DockerClient, test_image: str) -> Iterator[Any]:
    started = docker_client.containers.run(
        test_image,
        [
            "sh",
            "-c",
            "mkdir -p /mnt/results /job/logs; echo trained > /mnt/results/model.txt; "
            "echo training started; exec sleep 300",
        ],
        detach=True,
        network_mode="none",
        name=f"wmltrain-it-sealed-{uuid.uuid4().hex[:10]}",
        labels={"wmltrain.test": "submitter-security"},
    )
    yield started
    with contextlib.suppress(docker.errors.NotFound):
        started.remove(force=True)


@pytest.mark.usefixtures("fernet_key")
def test_a_trigger_row_without_credentials_still_halts_and_stores_the_run(
    services: dict[str, str],
    container: Any,
    bucket: str,
    creds: dict[str, str],
    s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__STAGING_DIR", str(tmp_path / "staging"))
    training_id = f"training-it{uuid.uuid4().hex[:8]}"
    docker_host = TrainingDockerHook(docker_url=services["DOCKER_HOST"]).to_dict()
    halt = seal_halt(
        {
            "training_id": training_id,
            "container_id": container.id,
            "docker_host": docker_host,
            "manifest": manifest_document("s3", bucket, inline_connection("s3", creds)),
            "grace": GRACE,
            "reason": "its deferred task was marked failed",
        }
    )
    trigger = TrainingRunTrigger(
        training_id=training_id,
        container_id=container.id,
        docker_host=docker_host,
        poll_interval=0.2,
        halt=halt,
    )
    row = json.dumps(trigger.serialize()[1])
    secret = creds["key"]
    for form in (secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote(secret, safe="")):
        assert form not in row

    # The triggerer rebuilds the trigger from its row; a person marks the deferred task failed.
    rebuilt = TrainingRunTrigger(**json.loads(row))
    time.sleep(0.5)  # the container has written its log line
    asyncio.run(asyncio.wait_for(rebuilt.on_kill(), 60))

    stored = s3_client.get_object(Bucket=bucket, Key=f"{training_id}/{STATUS_FILE}")
    status = json.loads(stored["Body"].read())
    assert status["state"] == "HALTED"
    log = s3_client.get_object(Bucket=bucket, Key=f"{training_id}/{TRAINING_LOG}")["Body"].read().decode()
    assert "training started" in log
