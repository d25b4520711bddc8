"""GPU allocation against the real stand-in GPU Docker host (GPUs 0-3) and the plain daemon.

Every container these tests create carries a training id with a per-test prefix; a finalizer removes
them from both daemons.  Other test sessions may use the GPU host at the same time, so the tests wait
for GPUs where they need all four, and check the invariants (distinct ids, no overlap) rather than
exact counts where another session's run could take a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from docker.errors import APIError, NotFound

from airflow_wmltrain.errors import GpuCapacityError
from airflow_wmltrain.runtime import gpus, labels

pytestmark = pytest.mark.integration

INVENTORY = ["0", "1", "2", "3"]
SPAWN = multiprocessing.get_context("spawn")


class ListLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str, *args: Any) -> None:
        self.lines.append(("info", msg % args))

    def warning(self, msg: str, *args: Any) -> None:
        self.lines.append(("warning", msg % args))


@pytest.fixture
def gpu_api(services: dict[str, str]) -> Iterator[docker.APIClient]:
    client = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"], timeout=120)
    yield client
    client.close()


@pytest.fixture
def plain_api(services: dict[str, str]) -> Iterator[docker.APIClient]:
    client = docker.APIClient(base_url=services["DOCKER_HOST"], timeout=120)
    yield client
    client.close()


def remove_ours(client: docker.APIClient, prefix: str) -> None:
    for container in client.containers(all=True, filters={"label": labels.TRAINING_ID}):
        if (container.get("Labels") or {}).get(labels.TRAINING_ID, "").startswith(prefix):
            with contextlib.suppress(NotFound):
                client.remove_container(container["Id"], force=True)


@pytest.fixture
def prefix(gpu_api: docker.APIClient, plain_api: docker.APIClient) -> Iterator[str]:
    """A unique training-id prefix; every container with such a training id is removed afterwards."""
    gpus.clear_caches()
    value = f"it-gpus-{uuid.uuid4().hex[:10]}-"
    yield value
    gpus.clear_caches()
    remove_ours(gpu_api, value)
    remove_ours(plain_api, value)


def run_container(
    client: docker.APIClient, image: str, training_id: str, gpu_ids: list[str], command: list[str]
) -> str:
    """Create a run container as the operator does: explicit device ids and the GPUS label."""
    container = client.create_container(
        image,
        command=command,
        name=labels.run_container_name(training_id),
        labels={
            labels.ROLE: labels.ROLE_RUN,
            labels.TRAINING_ID: training_id,
            labels.GPUS: ",".join(gpu_ids),
        },
        host_config=client.create_host_config(
            device_requests=[gpus.gpu_device_request(gpu_ids)], network_mode="none"
        ),
    )
    return str(container["Id"])


# --- worker processes (module level: pickled by reference for the spawn start method) ----------------


def _grab_one(url: str, image: str, training_id: str, barrier: Any, results: Any) -> None:
    """One worker: wait for the others, then try once to lease 1 GPU, and keep it."""
    client = docker.APIClient(base_url=url, timeout=120)
    try:
        barrier.wait(timeout=60)
        allocation = gpus.try_allocate_gpus(client, training_id, 1, inventory=INVENTORY, image=image)
        results.put((training_id, list(allocation.gpu_ids), dict(allocation.holders)))
    except Exception as exc:
        results.put((training_id, None, repr(exc)))
        raise
    finally:
        client.close()


def _churn(url: str, image: str, prefix: str, worker: int, rounds: int, barrier: Any, results: Any) -> None:
    """One worker doing what the operator does, ``rounds`` times: allocate 1-2 GPUs (waiting), create
    the run container, drop the leases, hold the GPUs a moment, remove the container.  Reports
    ``(gpu ids, start, end)``: the time from "allocated" to just before the removal, which lies within
    the real holding time (lease created .. container removed)."""
    client = docker.APIClient(base_url=url, timeout=120)
    rng = random.Random(worker)
    spans: list[tuple[list[str], float, float]] = []
    try:
        barrier.wait(timeout=60)
        for i in range(rounds):
            training_id = f"{prefix}churn-{worker}-{i}"
            got = gpus.wait_for_gpus(
                client,
                training_id,
                rng.choice((1, 1, 2)),
                inventory=INVENTORY,
                image=image,
                timeout=120,
                poll_interval=0.05,
                log=ListLog(),
            )
            start = time.time()
            container_id = run_container(client, image, training_id, got, ["true"])
            gpus.release_leases(client, training_id)
            time.sleep(rng.uniform(0.02, 0.15))
            end = time.time()
            client.remove_container(container_id, force=True)
            spans.append((got, start, end))
        results.put((worker, spans, None))
    except Exception as exc:
        results.put((worker, spans, repr(exc)))
        raise
    finally:
        client.close()


def _collect(results: Any, processes: list[Any], timeout: float = 240) -> list[Any]:
    collected = [results.get(timeout=timeout) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0, f"worker {process.name} exited with {process.exitcode}"
    return collected


# --- tests -------------------------------------------------------------------------------------------


def test_inventory_from_the_daemon_label(gpu_api: docker.APIClient, test_image: str, prefix: str) -> None:
    assert "wmltrain.gpus=0,1,2,3" in gpu_api.info()["Labels"]
    assert gpus.gpu_inventory(gpu_api, "auto", image=test_image) == INVENTORY
    assert gpus.gpu_inventory(gpu_api, "2,0", image=test_image) == ["0", "2"]
    assert gpus.has_nvidia_runtime(gpu_api, test_image) is True
    # the runtime probe removed its container
    assert gpu_api.containers(all=True, filters={"label": f"{labels.ROLE}={labels.ROLE_GPU_PROBE}"}) == []


def test_concurrent_allocations_from_processes_never_share_a_gpu(
    services: dict[str, str], gpu_api: docker.APIClient, test_image: str, prefix: str
) -> None:
    url = services["WMLTRAIN_GPU_DOCKER_HOST"]
    barrier = SPAWN.Barrier(6)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=_grab_one, args=(url, test_image, f"{prefix}p{i}", barrier, results), name=f"grab-{i}"
        )
        for i in range(6)
    ]
    for process in processes:
        process.start()
    outcomes = _collect(results, processes)
    errors = [outcome for outcome in outcomes if outcome[1] is None]
    assert not errors, errors
    granted = {training_id: ids for training_id, ids, _ in outcomes if ids}
    handed_out = [gpu for ids in granted.values() for gpu in ids]
    assert 1 <= len(granted) <= 4
    assert all(len(ids) == 1 for ids in granted.values())
    assert len(set(handed_out)) == len(handed_out), f"a GPU was handed out twice: {granted}"
    assert set(handed_out) <= set(INVENTORY)
    # A worker is refused only when every GPU was held by someone (a lease or a run).
    for training_id, ids, holders in outcomes:
        if not ids:
            assert set(holders) == set(INVENTORY), (training_id, holders)

    # The winners create their run containers with those device ids, drop their leases, and run.
    containers = {}
    for training_id, ids in granted.items():
        containers[training_id] = run_container(
            gpu_api, test_image, training_id, ids, ["sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES; sleep 2"]
        )
        assert gpus.release_leases(gpu_api, training_id) == ids
    for container_id in containers.values():
        gpu_api.start(container_id)

    # While they run, their GPUs are busy for everyone (held by the run containers now, not leases).
    late = gpus.try_allocate_gpus(
        gpu_api, f"{prefix}late", len(INVENTORY), inventory=INVENTORY, image=test_image
    )
    assert not late.granted
    for training_id, ids in granted.items():
        assert late.holders[ids[0]] == f"run {training_id} (running)"

    for training_id, container_id in containers.items():
        assert gpu_api.wait(container_id, timeout=60)["StatusCode"] == 0
        shown = gpu_api.logs(container_id, stdout=True, stderr=False).decode().strip()
        assert shown == granted[training_id][0]

    # Exited run containers hold nothing: those GPUs can be allocated again.
    again = gpus.try_allocate_gpus(gpu_api, f"{prefix}again", 1, inventory=INVENTORY, image=test_image)
    assert again.granted
    gpus.release_leases(gpu_api, f"{prefix}again")


def test_allocate_create_release_churn_has_no_overlap(
    services: dict[str, str], test_image: str, prefix: str
) -> None:
    url = services["WMLTRAIN_GPU_DOCKER_HOST"]
    workers, rounds = 6, 5
    barrier = SPAWN.Barrier(workers)
    results = SPAWN.Queue()
    processes = [
        SPAWN.Process(
            target=_churn, args=(url, test_image, prefix, w, rounds, barrier, results), name=f"churn-{w}"
        )
        for w in range(workers)
    ]
    for process in processes:
        process.start()
    outcomes = _collect(results, processes)
    assert [error for _, _, error in outcomes if error] == []
    spans = [span for _, worker_spans, _ in outcomes for span in worker_spans]
    assert len(spans) == workers * rounds
    by_gpu: dict[str, list[tuple[float, float]]] = {}
    for ids, start, end in spans:
        assert len(set(ids)) == len(ids)
        for gpu in ids:
            by_gpu.setdefault(gpu, []).append((start, end))
    for gpu, intervals in by_gpu.items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, f"GPU {gpu} was held by two runs at once"


def test_a_stale_lease_is_reclaimed(gpu_api: docker.APIClient, test_image: str, prefix: str) -> None:
    # (a) The worker of "dead" leased a GPU, created its run container and died before dropping the
    # lease (the run has ended since): the lease is stale at once, as the run container says which
    # GPUs the run has.
    dead = f"{prefix}dead"
    lease = gpus.wait_for_gpus(
        gpu_api, dead, 1, inventory=INVENTORY, image=test_image, timeout=60, poll_interval=0.2, log=ListLog()
    )
    run_container_id = run_container(gpu_api, test_image, dead, lease, ["true"])
    gpu_api.start(run_container_id)
    assert gpu_api.wait(run_container_id, timeout=60)["StatusCode"] == 0  # exited: holds no GPU
    log = ListLog()
    got = gpus.wait_for_gpus(
        gpu_api,
        f"{prefix}heir",
        len(INVENTORY),
        inventory=INVENTORY,
        image=test_image,
        timeout=60,
        poll_interval=0.2,
        log=log,
    )
    assert got == INVENTORY
    assert (
        "warning",
        f"removing the stale GPU lease {labels.gpu_lease_name(lease[0])} (GPU {lease[0]}, training {dead}): "
        f"training {dead} already has its run container",
    ) in log.lines
    assert gpus.release_leases(gpu_api, f"{prefix}heir") == INVENTORY
    assert gpus.release_leases(gpu_api, dead) == []

    # (b) The worker of "gone" leased a GPU and died before creating its container: the lease is
    # stale once older than stale_after (1 s here; 120 s by default).
    gone = f"{prefix}gone"
    lease = gpus.wait_for_gpus(
        gpu_api, gone, 1, inventory=INVENTORY, image=test_image, timeout=60, poll_interval=0.2, log=ListLog()
    )
    young = gpus.try_allocate_gpus(
        gpu_api, f"{prefix}heir2", len(INVENTORY), inventory=INVENTORY, image=test_image
    )
    assert not young.granted
    assert young.holders[lease[0]] == f"lease of {gone}"
    time.sleep(2.2)
    log = ListLog()
    got = gpus.wait_for_gpus(
        gpu_api,
        f"{prefix}heir2",
        len(INVENTORY),
        inventory=INVENTORY,
        image=test_image,
        timeout=60,
        poll_interval=0.2,
        log=log,
        stale_after=1,
    )
    assert got == INVENTORY
    stale = [line for level, line in log.lines if level == "warning" and f"training {gone}" in line]
    assert len(stale) == 1
    assert "has no run container: its worker is gone" in stale[0]
    assert gpus.release_leases(gpu_api, gone) == []


def test_large_gets_four_distinct_gpus_and_five_is_refused_at_once(
    gpu_api: docker.APIClient, test_image: str, prefix: str
) -> None:
    large = f"{prefix}large"
    got = gpus.wait_for_gpus(
        gpu_api,
        large,
        4,
        inventory=INVENTORY,
        image=test_image,
        timeout=60,
        poll_interval=0.2,
        log=ListLog(),
        resource_class="large",
    )
    assert got == INVENTORY
    container_id = run_container(
        gpu_api, test_image, large, got, ["sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES"]
    )
    gpus.release_leases(gpu_api, large)
    gpu_api.start(container_id)
    assert gpu_api.wait(container_id, timeout=60)["StatusCode"] == 0
    assert gpu_api.logs(container_id, stdout=True, stderr=False).decode().strip() == "0,1,2,3"

    before = time.monotonic()
    with pytest.raises(GpuCapacityError) as info:
        gpus.wait_for_gpus(
            gpu_api,
            f"{prefix}huge",
            5,
            inventory=gpus.gpu_inventory(gpu_api, "auto", image=test_image),
            image=test_image,
            timeout=3600,
            poll_interval=1,
            log=ListLog(),
            resource_class="huge",
        )
    assert time.monotonic() - before < 5
    assert info.value.code == "S100"
    assert "resource class 'huge' needs 5 GPU(s)" in str(info.value)
    assert "offers only 4 (GPUs 0,1,2,3)" in str(info.value)
    assert gpus.release_leases(gpu_api, f"{prefix}huge") == []


def test_plain_daemon_has_no_nvidia_runtime(
    services: dict[str, str], plain_api: docker.APIClient, test_image: str, prefix: str
) -> None:
    assert gpus.has_nvidia_runtime(plain_api, test_image) is False
    url = gpus.docker_host_url(plain_api)
    assert url == services["DOCKER_HOST"]
    with pytest.raises(gpus.NoNvidiaRuntimeError) as info:
        gpus.gpu_inventory(plain_api, "auto", image=test_image)
    assert str(info.value) == (
        f"the Docker host {url} has no NVIDIA runtime: install the NVIDIA Container Toolkit there, "
        "or set [wmltrain] cpu_fallback = True to run without GPUs"
    )
    # What the operator sees when it creates and starts a run container there anyway.
    training_id = f"{prefix}cpu-host"
    container_id = run_container(plain_api, test_image, training_id, ["0"], ["true"])  # create: accepted
    with pytest.raises(APIError) as refused:
        plain_api.start(container_id)
    assert gpus.is_no_driver_error(refused.value)
    translated = gpus.no_nvidia_runtime_error(url)
    assert isinstance(translated, GpuCapacityError)
    assert translated.code == "S100"


def test_a_waiting_run_wakes_when_a_run_ends_not_at_the_next_poll(
    gpu_api: docker.APIClient, test_image: str, prefix: str
) -> None:
    # The GPUs of a run are free the moment its container exits: a run waiting for them must not sleep
    # out its poll interval (a GPU idle for seconds per hand-over in a grid of short runs).
    training_id = f"{prefix}ending"
    container_id = run_container(gpu_api, test_image, training_id, ["0"], ["sleep", "1"])
    sleep = gpus.until_gpus_may_free(gpu_api)
    gpu_api.start(container_id)
    started = time.monotonic()
    sleep(60)
    woke_after = time.monotonic() - started
    assert gpu_api.inspect_container(container_id)["State"]["Status"] == "exited"
    assert woke_after < 30, f"slept {woke_after:.1f} s: the container's end did not wake the wait"
