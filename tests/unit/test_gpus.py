"""GPU allocation decisions (airflow_wmltrain.runtime.gpus) against a small in-memory Docker daemon."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest
import requests
from docker.errors import APIError, ImageNotFound, NotFound

from airflow_wmltrain.errors import GpuCapacityError, ImageMissingError
from airflow_wmltrain.runtime import gpus, labels

NO_DRIVER = 'could not select device driver "" with capabilities: [[gpu]]'
URL = "unix:///fake.sock"
INVENTORY = ["0", "1", "2", "3"]
IMAGE = "busybox"


def api_error(status: int, text: str) -> APIError:
    response = requests.Response()
    response.status_code = status
    return APIError(f"{status} Client Error", response=response, explanation=text)


class FakeDocker:
    """The few ``docker.APIClient`` calls the allocator makes, on a dict of containers."""

    def __init__(self) -> None:
        self.containers_: dict[str, dict[str, Any]] = {}
        self.now = 1_700_000_000.0
        self.daemon_labels: list[str] = []
        self.gpu_driver = True
        self.probe_output = b"0\n1\n"
        self.probe_exit = 0
        self.images = {IMAGE}
        self.info_calls = 0
        self.probes = 0
        self.removed: list[str] = []
        self.on_create: Callable[[FakeDocker, str], None] | None = None
        self._ids = itertools.count(1)

    # state helpers ------------------------------------------------------------------------------------
    def add(
        self, name: str, role: str, training_id: str, gpu_ids: str, state: str = "created", age: float = 0
    ) -> str:
        cid = f"c{next(self._ids)}"
        self.containers_[cid] = {
            "Id": cid,
            "Names": [f"/{name}"],
            "State": state,
            "Created": int(self.now - age),
            "Labels": {labels.ROLE: role, labels.TRAINING_ID: training_id, labels.GPUS: gpu_ids},
            "HostConfig": {},
            "Command": [],
        }
        return cid

    def add_run(self, training_id: str, gpu_ids: str, state: str = "running") -> str:
        return self.add(labels.run_container_name(training_id), labels.ROLE_RUN, training_id, gpu_ids, state)

    def add_lease(self, gpu: str, training_id: str, age: float = 0) -> str:
        return self.add(labels.gpu_lease_name(gpu), labels.ROLE_GPU_LEASE, training_id, gpu, age=age)

    def leases(self) -> dict[str, str]:
        return {
            c["Labels"][labels.GPUS]: c["Labels"][labels.TRAINING_ID]
            for c in self.containers_.values()
            if c["Labels"].get(labels.ROLE) == labels.ROLE_GPU_LEASE
        }

    # the API ------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        self.info_calls += 1
        return {"Labels": list(self.daemon_labels), "SystemTime": "2023-11-14T22:13:20.123456789Z"}

    def containers(self, all: bool = False, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        wanted = (filters or {}).get("label", [])
        wanted = [wanted] if isinstance(wanted, str) else wanted
        found = []
        for c in self.containers_.values():
            if not all and c["State"] != "running":
                continue
            ok = True
            for item in wanted:
                key, sep, value = item.partition("=")
                if key not in c["Labels"] or (sep and c["Labels"][key] != value):
                    ok = False
            if ok:
                found.append(dict(c))
        return found

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs

    def create_container(
        self,
        image: str,
        command: list[str] | None = None,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        host_config: dict[str, Any] | None = None,
    ) -> dict[str, str]:
        if image not in self.images:
            raise ImageNotFound(f"No such image: {image}")
        if name and any(c["Names"] == [f"/{name}"] for c in self.containers_.values()):
            raise api_error(409, f'Conflict. The container name "/{name}" is already in use')
        cid = f"c{next(self._ids)}"
        self.containers_[cid] = {
            "Id": cid,
            "Names": [f"/{name or cid}"],
            "State": "created",
            "Created": int(self.now),
            "Labels": dict(labels or {}),
            "HostConfig": host_config or {},
            "Command": command or [],
        }
        if self.on_create:
            self.on_create(self, name or "")
        return {"Id": cid}

    def start(self, container_id: str) -> None:
        c = self.containers_[container_id]
        if c["HostConfig"].get("device_requests") and not self.gpu_driver:
            raise api_error(500, NO_DRIVER)
        self.probes += 1
        c["State"] = "exited"

    def wait(self, container_id: str, timeout: int | None = None) -> dict[str, int]:
        return {
            "StatusCode": self.probe_exit if "nvidia-smi" in self.containers_[container_id]["Command"] else 0
        }

    def logs(self, container_id: str, stdout: bool = True, stderr: bool = True) -> bytes:
        return self.probe_output if "nvidia-smi" in self.containers_[container_id]["Command"] else b""

    def remove_container(self, container_id: str, force: bool = False) -> None:
        if container_id not in self.containers_:
            raise NotFound(f"No such container: {container_id}")
        del self.containers_[container_id]
        self.removed.append(container_id)


class ListLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, msg: str, *args: Any) -> None:
        self.lines.append(("info", msg % args))

    def warning(self, msg: str, *args: Any) -> None:
        self.lines.append(("warning", msg % args))


@pytest.fixture
def fake() -> FakeDocker:
    return FakeDocker()


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    gpus.clear_caches()
    yield
    gpus.clear_caches()


def allocate(client: FakeDocker, training_id: str, count: int, **kwargs: Any) -> gpus.GpuAllocation:
    kwargs.setdefault("inventory", INVENTORY)
    return gpus.try_allocate_gpus(client, training_id, count, image=IMAGE, docker_url=URL, **kwargs)


# --- helpers ------------------------------------------------------------------------------------------------


def test_gpu_ids_sort_numerically_then_by_name() -> None:
    assert gpus.sort_gpu_ids(["10", "2", "GPU-b", "0", "GPU-a"]) == ["0", "2", "10", "GPU-a", "GPU-b"]
    assert gpus.parse_gpu_ids(" 3, 1,,1 ,10") == ["1", "3", "10"]
    assert gpus.parse_gpu_ids("") == []


def test_device_request_names_the_ids() -> None:
    request = gpus.gpu_device_request(["2", "3"])
    assert request["DeviceIDs"] == ["2", "3"]
    assert request["Capabilities"] == [["gpu"]]
    assert "Count" not in request or not request["Count"]


def test_no_driver_error_is_recognised_and_translated() -> None:
    assert gpus.is_no_driver_error(api_error(500, NO_DRIVER))
    assert not gpus.is_no_driver_error(api_error(500, "no space left on device"))
    assert not gpus.is_no_driver_error(RuntimeError(NO_DRIVER))
    exc = gpus.no_nvidia_runtime_error("tcp://gpu-host:2376")
    assert isinstance(exc, GpuCapacityError)
    assert exc.code == "S100"
    assert str(exc) == (
        "the Docker host tcp://gpu-host:2376 has no NVIDIA runtime: install the NVIDIA Container Toolkit "
        "there, or set [wmltrain] cpu_fallback = True to run without GPUs"
    )


def test_docker_host_url_of_real_clients() -> None:
    unix = docker.APIClient(base_url="unix:///run/x/docker.sock", version="1.41")
    tcp = docker.APIClient(base_url="tcp://10.0.0.5:2375", version="1.41")
    try:
        assert gpus.docker_host_url(unix) == "unix:///run/x/docker.sock"
        assert gpus.docker_host_url(tcp) == "http://10.0.0.5:2375"
    finally:
        unix.close()
        tcp.close()


def test_daemon_time_is_parsed_with_nanoseconds_and_offsets() -> None:
    assert gpus._parse_rfc3339("2023-11-14T22:13:20.123456789Z") == pytest.approx(1_700_000_000.123456)
    assert gpus._parse_rfc3339("2023-11-14T23:13:20+01:00") == 1_700_000_000.0
    assert gpus._parse_rfc3339("yesterday") is None


# --- inventory and runtime ----------------------------------------------------------------------------------


def test_inventory_from_the_setting_needs_no_daemon(fake: FakeDocker) -> None:
    assert gpus.gpu_inventory(fake, "3,1, 0", image=IMAGE) == ["0", "1", "3"]
    assert fake.info_calls == 0


def test_inventory_auto_reads_the_daemon_label_once(fake: FakeDocker) -> None:
    fake.daemon_labels = ["other=x", "wmltrain.gpus=0,1,2,3"]
    assert gpus.gpu_inventory(fake, "auto", image=IMAGE, docker_url=URL) == INVENTORY
    assert gpus.gpu_inventory(fake, "AUTO", image=IMAGE, docker_url=URL) == INVENTORY
    assert fake.info_calls == 1
    assert fake.probes == 0


def test_inventory_auto_probes_nvidia_smi_without_a_label(fake: FakeDocker) -> None:
    fake.probe_output = b"1\n0\n"
    assert gpus.gpu_inventory(fake, "auto", image=IMAGE, docker_url=URL) == ["0", "1"]
    assert fake.probes == 1
    assert fake.containers_ == {}  # the probe container is removed


def test_inventory_probe_without_nvidia_runtime(fake: FakeDocker) -> None:
    fake.gpu_driver = False
    with pytest.raises(gpus.NoNvidiaRuntimeError) as info:
        gpus.gpu_inventory(fake, "auto", image=IMAGE, docker_url=URL)
    assert "has no NVIDIA runtime" in str(info.value)
    assert fake.containers_ == {}


def test_inventory_probe_failure_says_how_to_fix(fake: FakeDocker) -> None:
    fake.probe_exit = 127
    fake.probe_output = b"sh: nvidia-smi: not found\n"
    with pytest.raises(GpuCapacityError) as info:
        gpus.gpu_inventory(fake, "auto", image=IMAGE, docker_url=URL)
    assert "exited with 127" in str(info.value)
    assert "set [wmltrain] gpu_ids" in str(info.value)
    # a failure is not cached
    fake.probe_exit, fake.probe_output = 0, b"0\n"
    assert gpus.gpu_inventory(fake, "auto", image=IMAGE, docker_url=URL) == ["0"]


def test_inventory_probe_needs_the_image(fake: FakeDocker) -> None:
    with pytest.raises(ImageMissingError):
        gpus.gpu_inventory(fake, "auto", image="missing:1", docker_url=URL)


def test_has_nvidia_runtime_probes_once_per_host(fake: FakeDocker) -> None:
    assert gpus.has_nvidia_runtime(fake, IMAGE, docker_url=URL) is True
    assert gpus.has_nvidia_runtime(fake, IMAGE, docker_url=URL) is True
    assert fake.probes == 1
    other = FakeDocker()
    other.gpu_driver = False
    assert gpus.has_nvidia_runtime(other, IMAGE, docker_url="unix:///other.sock") is False
    assert other.containers_ == {}


def test_probed_facts_are_shared_by_the_processes_of_a_worker(fake: FakeDocker, tmp_path: Any) -> None:
    # Each Airflow task is a new process: without the shared answer every run pays a probe container.
    assert gpus.has_nvidia_runtime(fake, IMAGE, docker_url=URL, cache_dir=tmp_path) is True
    fake.probe_output = b"1\n0\n"
    assert gpus.gpu_inventory(fake, "auto", image=IMAGE, docker_url=URL, cache_dir=tmp_path) == ["0", "1"]
    assert fake.probes == 2
    gpus.clear_caches()  # as in the next task's process
    assert gpus.has_nvidia_runtime(fake, IMAGE, docker_url=URL, cache_dir=tmp_path) is True
    assert gpus.gpu_inventory(fake, "auto", image=IMAGE, docker_url=URL, cache_dir=tmp_path) == ["0", "1"]
    assert fake.probes == 2
    # another host is probed on its own, and a host without runtime is remembered as such
    other = FakeDocker()
    other.gpu_driver = False
    assert gpus.has_nvidia_runtime(other, IMAGE, docker_url="unix:///other.sock", cache_dir=tmp_path) is False
    other.gpu_driver = True  # a probe now would say True: the shared answer says False
    gpus.clear_caches()
    assert gpus.has_nvidia_runtime(other, IMAGE, docker_url="unix:///other.sock", cache_dir=tmp_path) is False
    assert gpus.has_nvidia_runtime(fake, IMAGE, docker_url=URL, cache_dir=tmp_path) is True
    assert fake.probes == 2


def test_shared_facts_expire_and_are_never_followed(
    fake: FakeDocker, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert gpus.has_nvidia_runtime(fake, IMAGE, docker_url=URL, cache_dir=tmp_path) is True
    (facts,) = tmp_path.glob("gpu-host-*.json")
    now = time.time()
    monkeypatch.setattr(gpus.time, "time", lambda: now + gpus.HOST_FACTS_TTL + 1)
    gpus.clear_caches()
    assert gpus.has_nvidia_runtime(fake, IMAGE, docker_url=URL, cache_dir=tmp_path) is True
    assert fake.probes == 2  # too old: probed again
    monkeypatch.undo()
    # a link in place of the file is not read (and a broken or foreign file is a miss, not an error)
    target = tmp_path / "elsewhere.json"
    target.write_text(facts.read_text())
    facts.unlink()
    facts.symlink_to(target)
    gpus.clear_caches()
    assert gpus.has_nvidia_runtime(fake, IMAGE, docker_url=URL, cache_dir=tmp_path) is True
    assert fake.probes == 3
    facts.unlink()
    facts.write_text("{not json")
    gpus.clear_caches()
    assert gpus.has_nvidia_runtime(fake, IMAGE, docker_url=URL, cache_dir=tmp_path) is True
    assert fake.probes == 4
    assert json.loads(facts.read_text())["nvidia_runtime"]["value"] is True


# --- allocation ---------------------------------------------------------------------------------------------


def test_allocates_the_lowest_free_gpus_and_leases_them(fake: FakeDocker) -> None:
    result = allocate(fake, "t1", 2)
    assert result.granted
    assert result.gpu_ids == ("0", "1")
    assert fake.leases() == {"0": "t1", "1": "t1"}
    assert "GPU 0: leased to t1" in result.describe()
    assert gpus.release_leases(fake, "t1") == ["0", "1"]
    assert fake.leases() == {}


def test_live_runs_and_foreign_leases_are_busy_but_exited_runs_are_not(fake: FakeDocker) -> None:
    fake.add_run("r-running", "0")
    fake.add_run("r-paused", "1", state="paused")
    fake.add_run("r-exited", "2,3", state="exited")
    fake.add_run("r-dead", "2", state="dead")
    fake.add_lease("3", "t-other")
    result = allocate(fake, "t1", 1)
    assert result.gpu_ids == ("2",)
    refused = allocate(fake, "t2", 2)
    assert not refused.granted
    assert refused.gpu_ids == ()
    assert dict(refused.holders) == {
        "0": "run r-running (running)",
        "1": "run r-paused (paused)",
        "2": "lease of t1",
        "3": "lease of t-other",
    }
    assert refused.describe() == (
        "GPU 0: run r-running (running); GPU 1: run r-paused (paused); GPU 2: lease of t1; "
        "GPU 3: lease of t-other"
    )
    assert fake.leases() == {"2": "t1", "3": "t-other"}  # t2 took and kept nothing


def test_not_enough_releases_what_it_took(fake: FakeDocker) -> None:
    fake.add_run("big", "0,1,2")
    result = allocate(fake, "t1", 2)
    assert not result.granted
    assert result.free == ("3",)
    assert fake.leases() == {}


def test_own_leases_are_reused_not_counted_against_itself(fake: FakeDocker) -> None:
    first = allocate(fake, "t1", 2)
    again = allocate(fake, "t1", 2)
    assert again.granted
    assert again.gpu_ids == first.gpu_ids
    assert fake.leases() == {"0": "t1", "1": "t1"}
    fewer = allocate(fake, "t1", 1)
    assert fewer.gpu_ids == ("0",)
    assert fake.leases() == {"0": "t1"}


def test_lease_of_a_training_with_a_run_container_is_stale(fake: FakeDocker) -> None:
    fake.add_run("t-old", "0,1,2", state="exited")
    fake.add_lease("3", "t-old")  # the worker died between creating the container and releasing
    log = ListLog()
    result = allocate(fake, "t1", 4, log=log)
    assert result.gpu_ids == ("0", "1", "2", "3")
    expected = (
        "removing the stale GPU lease wmltrain-gpu-lease-3 (GPU 3, training t-old): "
        "training t-old already has its run container"
    )
    assert ("warning", expected) in log.lines


def test_old_lease_without_run_container_is_stale_young_one_is_not(fake: FakeDocker) -> None:
    fake.add_lease("0", "t-dead", age=121)
    fake.add_lease("1", "t-busy", age=30)
    log = ListLog()
    result = allocate(fake, "t1", 2, log=log)
    assert result.gpu_ids == ("0", "2")
    assert fake.leases() == {"0": "t1", "1": "t-busy", "2": "t1"}
    warnings = [line for level, line in log.lines if level == "warning"]
    assert len(warnings) == 1
    assert "GPU 0, training t-dead" in warnings[0]
    assert "created 121 s ago" in warnings[0]


def test_stale_after_is_configurable(fake: FakeDocker) -> None:
    fake.add_lease("0", "t-other", age=30)
    assert allocate(fake, "t1", 4, stale_after=10).granted


def test_taken_lease_is_skipped(fake: FakeDocker) -> None:
    # Between our listing and our lease, another worker leases GPU 0: we get 409 and move on.
    original_create = fake.create_container
    state = {"raced": False}

    def create_container(*args: Any, **kwargs: Any) -> dict[str, str]:
        if not state["raced"]:
            state["raced"] = True
            fake.add_lease("0", "t-fast")
        return original_create(*args, **kwargs)

    fake.create_container = create_container  # type: ignore[method-assign]
    result = allocate(fake, "t1", 1)
    assert result.gpu_ids == ("1",)
    assert fake.leases() == {"0": "t-fast", "1": "t1"}


def test_lease_whose_gpu_a_run_took_meanwhile_is_dropped(fake: FakeDocker) -> None:
    # A run created its container on GPU 0 and dropped its lease between our listing and our lease:
    # the confirming listing sees it, and the allocator moves on to GPU 1.
    def run_takes_gpu0(client: FakeDocker, name: str) -> None:
        if name == labels.gpu_lease_name("0"):
            client.on_create = None
            client.add_run("t-quick", "0")

    fake.on_create = run_takes_gpu0
    result = allocate(fake, "t1", 1)
    assert result.gpu_ids == ("1",)
    assert fake.leases() == {"1": "t1"}


def test_more_than_the_host_has_is_refused_at_once(fake: FakeDocker) -> None:
    with pytest.raises(GpuCapacityError) as info:
        allocate(fake, "t1", 5, resource_class="huge")
    assert info.value.code == "S100"
    message = str(info.value)
    assert "resource class 'huge' needs 5 GPU(s)" in message
    assert f"{URL} offers only 4 (GPUs 0,1,2,3)" in message
    assert "choose a resource class with at most 4 GPU(s)" in message
    assert fake.containers_ == {}


def test_zero_gpus_is_granted_without_leases(fake: FakeDocker) -> None:
    result = allocate(fake, "t1", 0, inventory=[])
    assert result.granted
    assert result.gpu_ids == ()
    assert fake.containers_ == {}


def test_missing_lease_image_is_s103(fake: FakeDocker) -> None:
    with pytest.raises(ImageMissingError):
        gpus.try_allocate_gpus(fake, "t1", 1, inventory=INVENTORY, image="nope", docker_url=URL)


def test_a_failure_midway_releases_the_leases_taken(fake: FakeDocker) -> None:
    calls = {"n": 0}
    original = fake.create_container

    def flaky(*args: Any, **kwargs: Any) -> dict[str, str]:
        calls["n"] += 1
        if calls["n"] == 2:
            raise api_error(500, "disk full")
        return original(*args, **kwargs)

    fake.create_container = flaky  # type: ignore[method-assign]
    with pytest.raises(APIError):
        allocate(fake, "t1", 2)
    assert fake.leases() == {}


def test_gpus_outside_the_inventory_are_not_handed_out(fake: FakeDocker) -> None:
    result = allocate(fake, "t1", 2, inventory=["1", "3"])
    assert result.gpu_ids == ("1", "3")


def test_release_leases_only_touches_that_training(fake: FakeDocker) -> None:
    fake.add_lease("0", "t1")
    fake.add_lease("1", "t2")
    fake.add_run("t1", "0")
    assert gpus.release_leases(fake, "t1") == ["0"]
    assert fake.leases() == {"1": "t2"}
    assert len(fake.containers(all=True, filters={"label": labels.ROLE})) == 2


# --- waiting ------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[float], None] | None = None

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        if self.on_sleep:
            self.on_sleep(self.t)


def test_wait_gets_the_gpus_when_a_run_ends(fake: FakeDocker) -> None:
    run = fake.add_run("r1", "0,1,2,3")
    clock = Clock()

    def run_ends(t: float) -> None:
        if t >= 130:
            fake.containers_[run]["State"] = "exited"

    clock.on_sleep = run_ends
    log = ListLog()
    got = gpus.wait_for_gpus(
        fake,
        "t1",
        2,
        inventory=INVENTORY,
        image=IMAGE,
        timeout=3600,
        poll_interval=10,
        log=log,
        docker_url=URL,
        sleep=clock.sleep,
        monotonic=clock.monotonic,
    )
    assert got == ["0", "1"]
    waits = [line for level, line in log.lines if line.startswith("waiting")]
    # reported at 0 s, 60 s and 120 s: at most once a minute, although it polled every 10 s
    assert len(waits) == 3
    assert waits[0] == (
        f"waiting for 2 free GPU(s) on {URL} (0 of 3600 s waited): GPU 0: run r1 (running); "
        "GPU 1: run r1 (running); GPU 2: run r1 (running); GPU 3: run r1 (running)"
    )
    assert log.lines[-1] == ("info", "got GPU(s) 0,1 after waiting 130 s")
    assert set(clock.sleeps) == {10}


def test_wait_times_out_with_s100(fake: FakeDocker) -> None:
    fake.add_run("r1", "0,1,2")
    clock = Clock()
    with pytest.raises(GpuCapacityError) as info:
        gpus.wait_for_gpus(
            fake,
            "t1",
            2,
            inventory=INVENTORY,
            image=IMAGE,
            timeout=25,
            poll_interval=10,
            log=logging.getLogger("test"),
            resource_class="medium",
            docker_url=URL,
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
    assert info.value.code == "S100"
    assert clock.sleeps == [10, 10, 5]  # the last sleep ends at the deadline
    assert str(info.value) == (
        f"no 2 free GPU(s) for resource class 'medium' on the Docker host {URL} after waiting 25 s "
        "(GPU 0: run r1 (running); GPU 1: run r1 (running); GPU 2: run r1 (running); GPU 3: free): "
        "try again later, or raise [wmltrain] gpu_wait_timeout"
    )
    assert fake.leases() == {}


def test_wait_refuses_an_impossible_request_without_waiting(fake: FakeDocker) -> None:
    clock = Clock()
    with pytest.raises(GpuCapacityError, match="needs 8 GPU"):
        gpus.wait_for_gpus(
            fake,
            "t1",
            8,
            inventory=INVENTORY,
            image=IMAGE,
            timeout=3600,
            poll_interval=10,
            log=ListLog(),
            docker_url=URL,
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
    assert clock.sleeps == []


def test_the_wait_for_gpus_sleeps_its_time_when_events_cannot_be_followed() -> None:
    class NoEvents:
        def events(self, **_: Any) -> Any:
            raise APIError("events are not available")

    sleep = gpus.until_gpus_may_free(NoEvents())  # type: ignore[arg-type]
    started = time.monotonic()
    sleep(0.2)
    assert time.monotonic() - started >= 0.2


def test_tasks_starting_together_probe_the_host_once(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A grid starts many tasks at once: one probes, the others wait for its answer (a lock per host).
    import threading

    probes: list[int] = []

    def slow_probe(*_: Any) -> tuple[int, str]:
        probes.append(1)
        time.sleep(0.3)
        return 0, ""

    monkeypatch.setattr(gpus, "_run_probe", slow_probe)
    answers: list[bool] = []

    def task() -> None:
        answers.append(gpus.has_nvidia_runtime(FakeDocker(), IMAGE, docker_url=URL, cache_dir=tmp_path))

    gpus.clear_caches()
    threads = [threading.Thread(target=task) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert answers == [True] * 6
    assert len(probes) == 1
