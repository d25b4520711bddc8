"""The training container's hardening on the real Docker daemons: what ``docker inspect`` says of a
container created through ``TrainingDockerHook.create_run_container``, and a container trying what the
hardening forbids (writing the data, a Docker socket, device nodes, setuid escalation, a fork bomb, more
memory than its limit).  Each container runs the busybox test image for a second or two; every container
these tests create carries a per-test training id and is removed afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.errors import NotFound
from docker.types import Mount

from airflow_wmltrain.errors import ConfigurationError
from airflow_wmltrain.hooks.docker import TrainingDockerHook
from airflow_wmltrain.runtime import labels
from airflow_wmltrain.runtime.gpus import gpu_device_request
from airflow_wmltrain.runtime.workspace import Workspace
from airflow_wmltrain.settings import Settings

pytestmark = pytest.mark.integration

#: The test daemons have no bridge network (scripts/services): the containers here run without one.
NO_NETWORK = Settings(training_network="none")
#: The capabilities' bits in /proc/<pid>/status (linux/capability.h).
CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7}


class Runner:
    """Runs commands in hardened training containers on one daemon, as the operator creates them."""

    def __init__(self, docker_url: str, image: str, staging: Path) -> None:
        self.hook = TrainingDockerHook(docker_url=docker_url, timeout=120)
        self.image = image
        self.staging = staging
        self.created: list[str] = []

    def workspace(self, training_id: str) -> Workspace:
        workspace = Workspace.for_run(str(self.staging), training_id)
        workspace.create()
        workspace.model.mkdir(exist_ok=True)
        (workspace.data / "input.txt").write_text("the training data\n")
        return workspace

    def create(self, command: str, settings: Settings = NO_NETWORK, **host: Any) -> tuple[str, Workspace]:
        training_id = f"training-it-hard-{uuid.uuid4().hex[:12]}"
        settings = replace(settings, staging_dir=str(self.staging))
        workspace = self.workspace(training_id)
        extra = host.pop("extra_mounts", [])
        user = host.pop("user", None)
        create: dict[str, Any] = {
            "image": self.image,
            "command": ["sh", "-c", command],
            "working_dir": "/job/model-code",
            "labels": {labels.ROLE: labels.ROLE_RUN, labels.TRAINING_ID: training_id},
            "host_config": self.hook.api_client.create_host_config(
                mounts=[*workspace.mounts(), *extra], **host
            ),
        }
        if user is not None:
            create["user"] = user
        outcome, created = self.hook.create_run_container(training_id, settings=settings, **create)
        assert created
        self.created.append(outcome.container_id)
        return outcome.container_id, workspace

    def run(
        self, command: str, settings: Settings = NO_NETWORK, **host: Any
    ) -> tuple[int, str, dict[str, Any]]:
        """Run ``command`` to its end: its exit status, its output, and ``docker inspect``."""
        container_id, _workspace = self.create(command, settings, **host)
        self.hook.start(container_id)
        status = self.hook.api_client.wait(container_id, timeout=60)["StatusCode"]
        output = "\n".join(self.hook.log_lines(container_id))
        return int(status), output, self.hook.api_client.inspect_container(container_id)

    def cleanup(self) -> None:
        for container_id in self.created:
            with contextlib.suppress(NotFound):
                self.hook.api_client.remove_container(container_id, force=True)
        self.hook.close()


@pytest.fixture
def runner(services: dict[str, str], test_image: str, tmp_path: Path) -> Iterator[Runner]:
    value = Runner(services["DOCKER_HOST"], test_image, tmp_path / "staging")
    yield value
    value.cleanup()


@pytest.fixture
def gpu_runner(services: dict[str, str], test_image: str, tmp_path: Path) -> Iterator[Runner]:
    value = Runner(services["WMLTRAIN_GPU_DOCKER_HOST"], test_image, tmp_path / "gpu-staging")
    yield value
    value.cleanup()


def _caps(names: Any) -> list[str]:
    return sorted(str(name).upper().removeprefix("CAP_") for name in names or [])


# --- what docker inspect says -------------------------------------------------------------------------


def test_the_created_containers_host_config_is_hardened(runner: Runner) -> None:
    status, output, info = runner.run("true")
    assert status == 0, output
    host = info["HostConfig"]
    assert _caps(host["CapDrop"]) == ["ALL"]
    assert _caps(host["CapAdd"]) == sorted(CAP_BITS)
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["PidsLimit"] == 4096
    assert host["ShmSize"] == 2 * 1024**3
    memory = runner.hook.api_client.info()["MemTotal"]
    assert host["Memory"] == int(memory * 0.9)
    assert not host["Privileged"]
    assert host["NetworkMode"] == "none"
    assert not host.get("Binds")
    assert not host.get("Devices")
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    assert set(mounts) == {"/mnt/data", "/mnt/results", "/job/model-code", "/job/logs", "/mnt/checkpoints"}
    assert {dest for dest, m in mounts.items() if not m["RW"]} == {"/mnt/data"}
    assert not any("docker.sock" in m["Source"] for m in mounts.values())


# --- what the container cannot do ---------------------------------------------------------------------


def test_the_data_is_read_only_and_there_is_no_docker_socket(runner: Runner) -> None:
    status, output, _info = runner.run(
        "cat /mnt/data/input.txt; "
        "touch /mnt/data/x 2>&1 || echo DATA-READ-ONLY; "
        "ls -l /var/run/docker.sock /run/docker.sock 2>&1 || echo NO-SOCKET; "
        "grep -c docker.sock /proc/mounts || echo NO-SOCKET-MOUNT; "
        "touch /mnt/results/ok && echo RESULTS-WRITABLE"
    )
    assert status == 0, output
    assert "the training data" in output
    assert "Read-only file system" in output
    for word in ("DATA-READ-ONLY", "NO-SOCKET", "NO-SOCKET-MOUNT", "RESULTS-WRITABLE"):
        assert word in output.split(), output


def _ours(runner: Runner) -> list[str]:
    found = runner.hook.api_client.containers(all=True, filters={"label": labels.TRAINING_ID})
    return [c["Id"] for c in found if c["Labels"][labels.TRAINING_ID].startswith("training-it-hard-")]


def test_a_docker_socket_or_host_path_is_refused_before_a_container_exists(runner: Runner) -> None:
    before = _ours(runner)
    for mount in (
        Mount("/var/run/docker.sock", "/var/run/docker.sock", type="bind"),
        Mount("/host", "/", type="bind", read_only=True),
    ):
        with pytest.raises(ConfigurationError, match="not one of the run's workspace"):
            runner.create("true", extra_mounts=[mount])
    with pytest.raises(ConfigurationError, match="privileged"):
        runner.create("true", privileged=True)
    assert runner.created == []
    assert _ours(runner) == before


def test_capabilities_are_dropped_but_the_defaults(runner: Runner) -> None:
    status, output, _info = runner.run(
        "grep CapEff /proc/self/status; "
        "mknod /tmp/null c 1 3 2>&1 && echo MKNOD-WORKED || echo MKNOD-REFUSED; "
        "chown 1000:1000 /mnt/results && echo CHOWN-WORKED"
    )
    assert status == 0, output
    effective = next(line for line in output.splitlines() if line.startswith("CapEff"))
    assert int(effective.split()[1], 16) == sum(1 << bit for bit in CAP_BITS.values())
    assert "MKNOD-REFUSED" in output.split()
    assert "CHOWN-WORKED" in output.split()


def test_no_new_privileges_keeps_a_setuid_program_from_raising_privileges(
    runner: Runner, docker_client: docker.DockerClient, test_image: str
) -> None:
    # An image with a setuid-root busybox and a root account without a password (built here from the
    # test image: nothing is pulled). Without no-new-privileges, user 1000 becomes root through its su.
    tag = f"wmltrain-test/suid:{uuid.uuid4().hex[:8]}"
    maker = docker_client.containers.run(
        test_image,
        [
            "sh",
            "-c",
            "mkdir /suid && cp /bin/busybox /suid/busybox && chmod 4755 /suid/busybox && "
            "printf 'root::0:0:root:/root:/bin/sh\\nu:x:1000:1000::/:/bin/sh\\n' >/etc/passwd",
        ],
        detach=True,
        network_mode="none",
    )
    try:
        assert maker.wait(timeout=60)["StatusCode"] == 0
        maker.commit(*tag.split(":"))
    finally:
        maker.remove(force=True)
    try:
        runner.image = tag
        status, output, _info = runner.run(
            "grep NoNewPrivs /proc/self/status; ls -l /suid/busybox; "
            "/suid/busybox su root -c 'id -u; echo ESCALATED'",
            user="1000:1000",
        )
        assert "NoNewPrivs:\t1" in output
        assert "-rwsr-xr-x" in output  # the program is setuid root ...
        assert "su: must be suid to work properly" in output  # ... and runs without its privileges
        assert "ESCALATED" not in output
        assert status != 0
    finally:
        docker_client.images.remove(tag, force=True)


def test_a_fork_bomb_stops_at_the_pids_limit(runner: Runner) -> None:
    settings = replace(NO_NETWORK, training_pids_limit=32)
    status, output, info = runner.run(
        "i=0; while [ $i -lt 100 ]; do echo STARTING $i; sleep 3 & i=$((i+1)); done; echo ALL-STARTED; wait",
        settings,
    )
    assert info["HostConfig"]["PidsLimit"] == 32
    started = [int(line.split()[1]) for line in output.splitlines() if line.startswith("STARTING")]
    assert max(started) < 32, output
    assert "can't fork" in output
    assert "ALL-STARTED" not in output
    assert status != 0


def test_memory_and_shm_come_from_the_settings(runner: Runner) -> None:
    settings = replace(NO_NETWORK, training_memory="24m", training_shm_size="256m")
    status, output, info = runner.run(
        "df -k /dev/shm | tail -1; echo allocating; x=$(head -c 200000000 /dev/zero | tr '\\0' a); "
        "echo survived ${#x}",
        settings,
    )
    assert info["HostConfig"]["Memory"] == 24 * 1024**2
    assert "262144" in output.split()  # /dev/shm: 256 MiB in 1 KiB blocks
    assert info["State"]["OOMKilled"], output
    assert status == 137
    assert "survived" not in output


def test_the_training_user_runs_the_code_and_writes_the_results(runner: Runner) -> None:
    settings = replace(NO_NETWORK, training_user="1000:1000")
    status, output, info = runner.run(
        "id -u; id -g; cat /mnt/data/input.txt; ls /job/model-code >/dev/null && echo MODEL-READABLE; "
        "for d in /mnt/results /job/logs /mnt/checkpoints; do touch $d/f && echo W; done",
        settings,
    )
    assert status == 0, output
    assert info["Config"]["User"] == "1000:1000"
    assert output.split()[:2] == ["1000", "1000"]
    assert "the training data" in output
    assert "MODEL-READABLE" in output
    assert output.split().count("W") == 3


def test_the_network_setting_none_leaves_only_loopback(runner: Runner) -> None:
    status, output, info = runner.run("ls /sys/class/net")
    assert status == 0, output
    assert output.split() == ["lo"]
    assert info["HostConfig"]["NetworkMode"] == "none"


def test_gpu_device_requests_are_kept(gpu_runner: Runner) -> None:
    status, output, info = gpu_runner.run(
        "echo GPUS=$NVIDIA_VISIBLE_DEVICES", device_requests=[gpu_device_request(["1"])]
    )
    assert status == 0, output
    (request,) = info["HostConfig"]["DeviceRequests"]
    assert request["DeviceIDs"] == ["1"]
    assert "GPUS=1" in output
    assert _caps(info["HostConfig"]["CapDrop"]) == ["ALL"]
