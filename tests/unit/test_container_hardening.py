"""The training container's hardening (``airflow_wmltrain.runtime.hardening``): what the created container
gets by default, what a DAG author may change, and what is refused.  The real daemon's view of it (the
container's ``HostConfig``, and a container trying what it forbids) is in
``tests/integration/test_container_hardening.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from docker import APIClient
from docker.types import Mount

from airflow_wmltrain.errors import ConfigurationError
from airflow_wmltrain.hooks.docker import TrainingDockerHook
from airflow_wmltrain.operators.training_run import TrainingRunOperator
from airflow_wmltrain.runtime import hardening, labels
from airflow_wmltrain.runtime.workspace import Workspace
from airflow_wmltrain.settings import Settings
from tests.unit.conftest import IMAGE, FakeTi, manifest_doc
from tests.unit.fakes import FakeDocker

TRAINING_ID = "training-hardening-unit"
HOST_MEMORY = 64 * 1024**3
DEFAULT_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID"]
#: Docker's default capabilities that training containers do not get back by default.
LEFT_OUT = {"NET_RAW", "MKNOD", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "AUDIT_WRITE"}

_CLIENT = APIClient(version="1.43")  # builds host configs only: never connects


def harden(settings: Settings, *, user: Any = None, **host_config: Any) -> dict[str, Any]:
    workspace = Workspace.for_run(settings.staging_dir, TRAINING_ID)
    host_config.setdefault("mounts", workspace.mounts())
    create = {"image": IMAGE, "host_config": _CLIENT.create_host_config(**host_config)}
    if user is not None:
        create["user"] = user
    return hardening.harden(
        create, settings=settings, workspace_mounts=workspace.mounts(), host_memory=lambda: HOST_MEMORY
    )


# --- the defaults -------------------------------------------------------------------------------------


def test_defaults_drop_every_capability_but_a_few_and_set_the_limits(settings: Settings) -> None:
    created = harden(settings)
    host = created["host_config"]
    assert host["CapDrop"] == ["ALL"]
    assert host["CapAdd"] == DEFAULT_CAPS
    assert not LEFT_OUT & set(host["CapAdd"])
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["PidsLimit"] == 4096
    assert host["Memory"] == int(HOST_MEMORY * 0.9)
    assert host["ShmSize"] == 2 * 1024**3
    assert host["NetworkMode"] == "bridge"
    assert "user" not in created  # the image's own user
    assert "Privileged" not in host


def test_the_data_is_the_one_read_only_mount_and_all_are_the_workspace(settings: Settings) -> None:
    mounts = harden(settings)["host_config"]["Mounts"]
    root = str(Workspace.for_run(settings.staging_dir, TRAINING_ID).root.resolve())
    assert {m["Target"]: m["ReadOnly"] for m in mounts} == {
        "/mnt/data": True,
        "/mnt/results": False,
        "/job/model-code": False,
        "/job/logs": False,
        "/mnt/checkpoints": False,
    }
    assert all(m["Type"] == "bind" and m["Source"].startswith(root + "/") for m in mounts)


def test_settings_set_the_network_user_capabilities_and_limits(settings: Settings) -> None:
    tuned = Settings(
        staging_dir=settings.staging_dir,
        training_network="none",
        training_user="1000:1000",
        training_cap_add=("CHOWN",),
        training_pids_limit=64,
        training_memory="8g",
        training_shm_size="512m",
    )
    created = harden(tuned)
    host = created["host_config"]
    assert created["user"] == "1000:1000"
    assert (host["NetworkMode"], host["CapAdd"], host["PidsLimit"]) == ("none", ["CHOWN"], 64)
    assert (host["Memory"], host["ShmSize"]) == (8 * 1024**3, 512 * 1024**2)


def test_no_limits_when_the_settings_say_0(settings: Settings) -> None:
    unlimited = Settings(
        staging_dir=settings.staging_dir, training_pids_limit=0, training_memory="", training_shm_size=""
    )
    host = harden(unlimited)["host_config"]
    assert not {"PidsLimit", "Memory", "ShmSize"} & set(host)


def test_a_share_of_a_host_whose_memory_is_unknown_sets_no_limit(settings: Settings) -> None:
    workspace = Workspace.for_run(settings.staging_dir, TRAINING_ID)
    created = hardening.harden(
        {"host_config": _CLIENT.create_host_config(mounts=workspace.mounts())},
        settings=settings,
        workspace_mounts=workspace.mounts(),
        host_memory=lambda: None,
    )
    assert "Memory" not in created["host_config"]


# --- what a DAG author may change -------------------------------------------------------------------------


def test_the_dag_authors_arguments_take_the_place_of_the_settings(settings: Settings) -> None:
    created = harden(
        settings, user=0, network_mode="none", mem_limit="1g", shm_size=256 * 1024**2, cap_add=["NET_RAW"]
    )
    host = created["host_config"]
    assert created["user"] == 0  # root, asked for by the DAG author
    assert (host["NetworkMode"], host["Memory"], host["ShmSize"]) == ("none", 1024**3, 256 * 1024**2)
    assert host["CapAdd"] == [*DEFAULT_CAPS, "NET_RAW"]  # added to the settings' ones
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]


def test_named_volumes_and_tmpfs_are_allowed(settings: Settings) -> None:
    workspace = Workspace.for_run(settings.staging_dir, TRAINING_ID)
    extra = [Mount("/cache", "pip-cache", type="volume"), Mount("/scratch", None, type="tmpfs")]
    host = harden(settings, mounts=[*workspace.mounts(), *extra])["host_config"]
    assert len(host["Mounts"]) == 7


# --- what is refused ----------------------------------------------------------------------------------


def _workspace_mounts(settings: Settings) -> list[Mount]:
    return Workspace.for_run(settings.staging_dir, TRAINING_ID).mounts()


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"privileged": True}, "privileged"),
        ({"extra_mounts": [Mount("/var/run/docker.sock", "/var/run/docker.sock", type="bind")]}, "mounts"),
        ({"extra_mounts": [Mount("/host", "/", type="bind", read_only=True)]}, "mounts"),
        ({"extra_mounts": [Mount("/etc-of-worker", "/etc", type="bind")]}, "mounts"),
        (
            {
                "extra_mounts": [
                    Mount(
                        "/v", "v", type="volume", driver_config={"Name": "local", "Options": {"device": "/"}}
                    )
                ]
            },
            "mounts",
        ),
        ({"binds": {"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"}}}, "volumes"),
        ({"devices": ["/dev/sda:/dev/sda"]}, "devices"),
        ({"network_mode": "host"}, "network_mode"),
        ({"network_mode": "container:airflow-worker"}, "network_mode"),
        ({"ipc_mode": "host"}, "ipc_mode"),
        ({"pid_mode": "host"}, "pid_mode"),
        ({"userns_mode": "host"}, "userns_mode"),
        ({"cap_add": ["SYS_ADMIN"]}, "cap_add"),
        ({"cap_add": ["ALL"]}, "cap_add"),
        ({"security_opt": ["seccomp=unconfined"]}, "security_opt"),
        ({"security_opt": ["apparmor:unconfined"]}, "security_opt"),
        ({"security_opt": ["no-new-privileges:false"]}, "security_opt"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_escapes_from_the_container_are_refused(
    settings: Settings, arguments: dict[str, Any], field: str
) -> None:
    arguments = dict(arguments)
    mounts = [*_workspace_mounts(settings), *arguments.pop("extra_mounts", [])]
    with pytest.raises(ConfigurationError) as refused:
        harden(settings, mounts=mounts, **arguments)
    assert refused.value.field == field
    assert refused.value.code == "S001"
    assert not refused.value.retryable


def test_the_data_mounted_writable_is_refused(settings: Settings) -> None:
    mounts = _workspace_mounts(settings)
    data = next(m for m in mounts if m["Target"] == "/mnt/data")
    writable = Mount(data["Target"], data["Source"], type="bind", read_only=False)
    with pytest.raises(ConfigurationError, match="not one of the run's workspace"):
        harden(settings, mounts=[writable, *[m for m in mounts if m is not data]])


def test_another_runs_workspace_is_refused(settings: Settings) -> None:
    other = Workspace.for_run(settings.staging_dir, "training-someone-else").mounts()
    with pytest.raises(ConfigurationError, match="not one of the run's workspace"):
        harden(settings, mounts=other)


# --- the settings ---------------------------------------------------------------------------------


def test_settings_are_read_from_airflow_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for option, value in {
        "TRAINING_NETWORK": "none",
        "TRAINING_USER": "nobody",
        "TRAINING_CAP_ADD": "cap_chown, setuid",
        "TRAINING_PIDS_LIMIT": "0",
        "TRAINING_MEMORY": "50pct",
        "TRAINING_SHM_SIZE": "1g",
    }.items():
        monkeypatch.setenv(f"AIRFLOW__WMLTRAIN__{option}", value)
    settings = Settings.from_airflow_config()
    assert settings.training_network == "none"
    assert settings.training_user == "nobody"
    assert settings.training_cap_add == ("CHOWN", "SETUID")
    assert settings.training_pids_limit == 0
    assert settings.training_memory == "50pct"
    assert settings.training_shm_size == "1g"


def test_default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_airflow_config()
    assert settings.training_network == "bridge"
    assert settings.training_user == ""
    assert list(settings.training_cap_add) == DEFAULT_CAPS
    assert (settings.training_pids_limit, settings.training_memory, settings.training_shm_size) == (
        4096,
        "90pct",
        "2g",
    )
    assert Settings().training_cap_add == settings.training_cap_add


def test_an_empty_cap_add_gives_no_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__TRAINING_CAP_ADD", "")
    assert Settings.from_airflow_config().training_cap_add == ()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("TRAINING_CAP_ADD", "CHOWN,SYS_ADMIN", "capability 'SYS_ADMIN' is not given"),
        ("TRAINING_CAP_ADD", "SYS_PTRACE", "capability 'SYS_PTRACE' is not given"),
        ("TRAINING_NETWORK", "host", "shares a network namespace"),
        ("TRAINING_NETWORK", "container:worker", "shares a network namespace"),
        ("TRAINING_MEMORY", "lots", "is not a size"),
        ("TRAINING_MEMORY", "150pct", "is not a size"),
        ("TRAINING_SHM_SIZE", "50pct", "is not a size"),
        ("TRAINING_PIDS_LIMIT", "-1", "must be at least 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_option(
    monkeypatch: pytest.MonkeyPatch, option: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"AIRFLOW__WMLTRAIN__{option}", value)
    with pytest.raises(ConfigurationError, match=message) as refused:
        Settings.from_airflow_config()
    assert refused.value.field == f"[wmltrain] {option.lower()}"


# --- through the hook and the operator -----------------------------------------------------------------


def _created_host_config(docker_api: FakeDocker) -> tuple[dict[str, Any], dict[str, Any]]:
    (container,) = docker_api.run_containers()
    return dict(container.body["HostConfig"]), container.body


def _record_run_bodies(docker_api: FakeDocker) -> list[dict[str, Any]]:
    """The create requests of run containers (the operator removes its container once stored)."""
    bodies: list[dict[str, Any]] = []

    def record(_fake: FakeDocker, _container: Any, body: dict[str, Any]) -> None:
        if (body.get("Labels") or {}).get(labels.ROLE) == labels.ROLE_RUN:
            bodies.append(body)

    docker_api.after_create.append(record)
    return bodies


def test_the_hook_hardens_every_container_it_creates(docker_api: FakeDocker, settings: Settings) -> None:
    hook = TrainingDockerHook(docker_url=docker_api.url, api_version="1.43", timeout=10)
    workspace = Workspace.for_run(settings.staging_dir, TRAINING_ID)
    hook.create_run_container(
        TRAINING_ID,
        settings=settings,
        image=IMAGE,
        command=["sh", "-c", "true"],
        host_config=hook.api_client.create_host_config(mounts=workspace.mounts()),
        labels={labels.ROLE: labels.ROLE_RUN, labels.TRAINING_ID: TRAINING_ID},
    )
    host, _body = _created_host_config(docker_api)
    assert (host["CapDrop"], host["CapAdd"]) == (["ALL"], DEFAULT_CAPS)
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["PidsLimit"] == 4096
    assert host["ShmSize"] == 2 * 1024**3
    # The stand-in daemon's /info has no MemTotal: a share of an unknown memory sets no limit.
    assert "Memory" not in host


def test_the_hook_creates_nothing_it_refuses(docker_api: FakeDocker, settings: Settings) -> None:
    hook = TrainingDockerHook(docker_url=docker_api.url, api_version="1.43", timeout=10)
    socket = Mount("/var/run/docker.sock", "/var/run/docker.sock", type="bind")
    with pytest.raises(ConfigurationError, match=r"/var/run/docker\.sock"):
        hook.create_run_container(
            TRAINING_ID,
            settings=settings,
            image=IMAGE,
            host_config=hook.api_client.create_host_config(mounts=[socket]),
        )
    assert docker_api.created == []


@pytest.mark.usefixtures("stores")
def test_the_operators_container_is_hardened_with_the_settings(
    monkeypatch: pytest.MonkeyPatch, docker_api: FakeDocker, wmltrain_env: Path, model_zip: Path, ti: FakeTi
) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__TRAINING_USER", "1000:1000")
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__TRAINING_NETWORK", "none")
    operator = TrainingRunOperator(
        task_id="train",
        manifest=manifest_doc(),
        model_definition=str(model_zip),
        docker_url=docker_api.url,
        api_version="1.43",
        timeout=10,
        deferrable=False,
        mem_limit="3g",
    )
    bodies = _record_run_bodies(docker_api)
    operator.execute({"ti": ti, "task_instance": ti})  # type: ignore[arg-type]
    (body,) = bodies
    host = body["HostConfig"]
    assert body["User"] == "1000:1000"
    assert (host["NetworkMode"], host["Memory"]) == ("none", 3 * 1024**3)
    assert (host["CapDrop"], host["SecurityOpt"], host["PidsLimit"]) == (
        ["ALL"],
        ["no-new-privileges:true"],
        4096,
    )


def test_the_operator_refuses_privileged_when_the_task_is_built() -> None:
    with pytest.raises(ValueError, match=r"does not take privileged \(the training code is not trusted"):
        TrainingRunOperator(task_id="t", manifest={}, model_definition="m.zip", privileged=True)


def test_allowed_capabilities_never_include_an_escape() -> None:
    escapes = {"SYS_ADMIN", "SYS_MODULE", "SYS_PTRACE", "SYS_RAWIO", "DAC_READ_SEARCH", "NET_ADMIN", "BPF"}
    assert not escapes & hardening.ALLOWED_CAPABILITIES
