"""``TrainingRunTrigger`` against the real Docker daemon: the exit event, a container removed while
watched, and ``on_kill`` (a plain stop, and the real ``halt_run`` storing the logs and ``HALTED`` in the
real object store)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from airflow_wmltrain.hooks.docker import TrainingDockerHook
from airflow_wmltrain.lifecycle import STATUS_FILE, TRAINING_LOG
from airflow_wmltrain.triggers.training_run import TrainingRunTrigger
from tests.integration.storage_helpers import inline_connection, manifest_document

pytestmark = pytest.mark.integration

GRACE = 2


@pytest.fixture
def containers(docker_client: docker.DockerClient) -> Iterator[list[Any]]:
    """Containers a test starts; removed (forced) at the end."""
    started: list[Any] = []
    yield started
    for container in started:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


@pytest.fixture
def start(docker_client: docker.DockerClient, test_image: str, containers: list[Any]) -> Any:
    def start(command: str, **kwargs: Any) -> Any:
        container = docker_client.containers.run(
            test_image,
            ["sh", "-c", command],
            detach=True,
            network_mode="none",
            name=f"wmltrain-it-trigger-{uuid.uuid4().hex[:10]}",
            labels={"wmltrain.test": "triggers"},
            **kwargs,
        )
        containers.append(container)
        return container

    return start


def trigger_for(services: dict[str, str], container: Any, **kwargs: Any) -> TrainingRunTrigger:
    return TrainingRunTrigger(
        training_id=f"training-it{uuid.uuid4().hex[:8]}",
        container_id=container.id,
        docker_host=TrainingDockerHook(docker_url=services["DOCKER_HOST"]).to_dict(),
        poll_interval=0.2,
        **kwargs,
    )


async def collect(trigger: TrainingRunTrigger) -> list[dict[str, Any]]:
    events = []
    async for event in trigger.run():
        events.append(event.payload)
    await trigger.cleanup()
    return events


def test_one_exited_event_with_the_exit_code(services: dict[str, str], start: Any) -> None:
    container = start("sleep 1; exit 3")
    trigger = trigger_for(services, container)
    began = time.monotonic()
    events = asyncio.run(asyncio.wait_for(collect(trigger), 60))
    assert time.monotonic() - began >= 0.5  # it waited for the container, which sleeps 1 s
    assert len(events) == 1
    [event] = events
    assert event["status"] == "exited"
    assert event["training_id"] == trigger.training_id
    assert event["container_id"] == container.id
    assert event["exit_code"] == 3
    assert event["oom_killed"] is False
    assert event["finished_at"].startswith("20")
    json.dumps(event)  # an event payload is plain JSON


def test_a_container_removed_while_watched_is_an_error(
    services: dict[str, str], start: Any, docker_client: docker.DockerClient
) -> None:
    container = start("sleep 300")
    trigger = trigger_for(services, container)

    async def scenario() -> list[dict[str, Any]]:
        watching = asyncio.create_task(collect(trigger))
        await asyncio.sleep(1)
        assert not watching.done()  # still running: no event yet
        await asyncio.to_thread(container.remove, force=True)
        return await asyncio.wait_for(watching, 30)

    [event] = asyncio.run(scenario())
    assert event["status"] == "error"
    assert event["container_id"] == container.id
    assert f"no longer exists on {services['DOCKER_HOST']}" in event["message"]
    assert container.id[:12] in event["message"]


def test_on_kill_stops_the_container_within_the_grace(
    services: dict[str, str], start: Any, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__HALT_GRACE_PERIOD", str(GRACE))
    container = start("exec sleep 300")  # PID 1 ignores SIGTERM: only the SIGKILL after the grace ends it
    trigger = trigger_for(services, container)

    async def scenario() -> float:
        # What the triggerer does when the user marks the deferred task failed: cancel run(), then call
        # on_kill() bounded by [triggerer] on_kill_timeout.
        watching = asyncio.create_task(collect(trigger))
        await asyncio.sleep(0.5)
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        began = time.monotonic()
        await asyncio.wait_for(trigger.on_kill(), 30)
        return time.monotonic() - began

    took = asyncio.run(scenario())
    assert GRACE - 0.5 <= took < GRACE + 10
    container.reload()
    assert container.status == "exited"
    assert container.attrs["State"]["ExitCode"] == 137  # SIGKILL


def test_on_kill_halts_the_run_with_halt_run(
    services: dict[str, str],
    start: Any,
    docker_client: docker.DockerClient,
    bucket: str,
    creds: dict[str, str],
    s3_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__STAGING_DIR", str(tmp_path / "staging"))
    container = start(
        "mkdir -p /mnt/results /job/logs; echo trained > /mnt/results/model.txt; "
        "echo training started; exec sleep 300"
    )
    manifest = manifest_document("s3", bucket, inline_connection("s3", creds))
    trigger_id = f"training-it{uuid.uuid4().hex[:8]}"
    trigger = TrainingRunTrigger(
        training_id=trigger_id,
        container_id=container.id,
        docker_host=TrainingDockerHook(docker_url=services["DOCKER_HOST"]).to_dict(),
        poll_interval=0.2,
        halt={
            "training_id": trigger_id,
            "container_id": container.id,
            "docker_host": TrainingDockerHook(docker_url=services["DOCKER_HOST"]).to_dict(),
            "manifest": manifest,
            "grace": GRACE,
            "reason": "its deferred task was marked failed",
        },
    )
    time.sleep(0.5)  # the container has written its log line
    began = time.monotonic()
    asyncio.run(asyncio.wait_for(trigger.on_kill(), 60))
    assert time.monotonic() - began < GRACE + 30

    status = json.loads(s3_client.get_object(Bucket=bucket, Key=f"{trigger_id}/{STATUS_FILE}")["Body"].read())
    assert status["state"] == "HALTED"
    assert status["error"]["code"] == "C200"
    assert "marked failed" in status["error"]["message"]
    log = s3_client.get_object(Bucket=bucket, Key=f"{trigger_id}/{TRAINING_LOG}")["Body"].read().decode()
    assert "training started" in log
    with pytest.raises(docker.errors.NotFound):  # halt_run removes the container once stored
        docker_client.containers.get(container.id)
