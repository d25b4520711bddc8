"""What a training container may do on its Docker host: the one home of its hardening.

The training code is not trusted (anything can run in the container, as its image's user).  Every
training container is created with:

* no host path but the run's own workspace (:meth:`~airflow_wmltrain.runtime.workspace.Workspace.mounts`,
  the data read-only): never a Docker socket, never a path of the worker or the host;
* no privileges: ``--privileged``, host devices and the host's (or another container's) namespaces are
  refused; every capability is dropped and only those of ``[wmltrain] training_cap_add`` (plus a DAG
  author's ``cap_add``) are given back, from :data:`ALLOWED_CAPABILITIES` only;
* ``no-new-privileges``: a setuid program or file capability never raises the privileges of a process;
* limits: ``[wmltrain] training_pids_limit`` processes and threads, ``training_memory`` of memory and
  ``training_shm_size`` of ``/dev/shm``;
* ``[wmltrain] training_network`` (``none`` cuts it off from every network) and ``training_user``.

A DAG author's operator arguments (``network_mode``, ``user``, ``mem_limit``, ``shm_size``,
``cap_add``) take the place of the settings for their task, within the same limits; a submitter (DAG run
conf, ``wmltrain train``) sets none of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from docker.errors import DockerException
from docker.utils import parse_bytes

from airflow_wmltrain.errors import ConfigurationError

if TYPE_CHECKING:
    from docker.types import Mount

    from airflow_wmltrain.settings import Settings

#: Capabilities a training container may be given: Docker's default set, which framework images are
#: made for, and ``IPC_LOCK``/``SYS_NICE`` (pinned memory and NUMA placement of RDMA/NCCL).  Never one
#: that reaches past the container (``SYS_ADMIN``, ``SYS_MODULE``, ``SYS_PTRACE``, ``DAC_READ_SEARCH``,
#: ``NET_ADMIN``, ``SYS_RAWIO``...).
ALLOWED_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "IPC_LOCK",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
        "SYS_NICE",
    }
)
#: The security options every training container gets.
SECURITY_OPTIONS = ("no-new-privileges:true",)
#: Namespace modes that would share the host's (or another container's) namespace.
_SHARED_NAMESPACE = ("host", "container:")
_NAMESPACE_KEYS = {
    "NetworkMode": "network_mode",
    "IpcMode": "ipc_mode",
    "PidMode": "pid_mode",
    "UTSMode": "uts_mode",
    "UsernsMode": "userns_mode",
    "CgroupnsMode": "cgroupns_mode",
}
#: Host-config keys that give the container host paths or devices: never set for a training container.
_REFUSED_KEYS = {
    "Binds": "volumes (host paths)",
    "VolumesFrom": "volumes_from (another container's volumes)",
    "Devices": "devices (host devices)",
    "DeviceCgroupRules": "device_cgroup_rules (host devices)",
}


def parse_capabilities(text: str | Iterable[str], *, field: str) -> tuple[str, ...]:
    """``CHOWN,SETUID`` (or a list) as capability names (``CAP_`` prefix and case optional), checked.

    :raises ConfigurationError: a name that is not in :data:`ALLOWED_CAPABILITIES` (``field`` names
        where it came from).
    """
    items = text.split(",") if isinstance(text, str) else [str(item) for item in text]
    names = []
    for item in items:
        name = item.strip().upper().removeprefix("CAP_")
        if not name:
            continue
        if name not in ALLOWED_CAPABILITIES:
            raise ConfigurationError(
                f"capability {item.strip()!r} is not given to training containers (the training code is "
                f"not trusted); allowed: {', '.join(sorted(ALLOWED_CAPABILITIES))}",
                field=field,
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_memory(text: str, *, field: str) -> str:
    """A memory size as Docker takes it (``16g``, ``512m``, bytes), a share of the Docker host's memory
    (``90pct``), or ``0``/empty for no limit; returned normalised (``""`` for no limit).

    :raises ConfigurationError: anything else.
    """
    value = str(text or "").strip().lower()
    if value in ("", "0"):
        return ""
    try:
        if value.endswith("pct"):
            share = float(value[:-3])
            if not 0 < share <= 100:
                raise ValueError
        elif parse_bytes(value) <= 0:
            raise ValueError
    except (ValueError, DockerException):
        raise ConfigurationError(
            f"{text!r} is not a size (e.g. 16g, 512m), a share of the host's memory (e.g. 90pct) or 0 "
            "(no limit)",
            field=field,
        ) from None
    return value


def memory_bytes(value: str, host_memory: Callable[[], int | None]) -> int | None:
    """The limit in bytes of a :func:`parse_memory` value (``None``: no limit, or a share of a host
    whose memory is not known)."""
    if not value:
        return None
    if value.endswith("pct"):
        total = host_memory()
        return int(total * float(value[:-3]) / 100) if total else None
    return int(parse_bytes(value))


def harden(
    create: Mapping[str, Any],
    *,
    settings: Settings,
    workspace_mounts: Sequence[Mount],
    host_memory: Callable[[], int | None],
) -> dict[str, Any]:
    """The ``create_container`` arguments of a training container, hardened.

    :param create: the arguments as the operator built them (``host_config`` from
        ``create_host_config``, with the DAG author's ``network_mode``, ``mem_limit``, ``cap_add``...).
    :param settings: the ``[wmltrain]`` settings (the defaults of what the DAG author did not set).
    :param workspace_mounts: the run's own bind mounts, the only host paths the container may see.
    :param host_memory: the Docker host's memory in bytes (asked only for a ``pct`` memory limit).
    :raises ConfigurationError: the arguments give the container a host path, a device, privileges, a
        capability or a namespace it may not have (``S001``: the DAG is to be fixed, a retry cannot).
    """
    hardened = dict(create)
    host_config: dict[str, Any] = dict(create.get("host_config") or {})
    _refuse_escapes(host_config, workspace_mounts)
    if host_config.get("NetworkMode") in (None, "", "default"):
        host_config["NetworkMode"] = settings.training_network
    host_config["CapDrop"] = ["ALL"]
    host_config["CapAdd"] = list(
        dict.fromkeys(
            [
                *settings.training_cap_add,
                *parse_capabilities(host_config.get("CapAdd") or (), field="cap_add"),
            ]
        )
    )
    host_config["SecurityOpt"] = list(
        dict.fromkeys([*SECURITY_OPTIONS, *(host_config.get("SecurityOpt") or [])])
    )
    if not host_config.get("PidsLimit") and settings.training_pids_limit > 0:
        host_config["PidsLimit"] = settings.training_pids_limit
    if not host_config.get("Memory"):
        limit = memory_bytes(settings.training_memory, host_memory)
        if limit:
            host_config["Memory"] = limit
    if not host_config.get("ShmSize") and settings.training_shm_size:
        host_config["ShmSize"] = int(parse_bytes(settings.training_shm_size))
    hardened["host_config"] = host_config
    if hardened.get("user") in (None, "") and settings.training_user:
        hardened["user"] = settings.training_user
    return hardened


def _refuse_escapes(host_config: Mapping[str, Any], workspace_mounts: Sequence[Mount]) -> None:
    def refuse(what: str, field: str) -> ConfigurationError:
        return ConfigurationError(
            f"{what}: a training container runs untrusted code and gets no host path but its run's "
            "workspace, no device but its GPUs, and no privilege; remove it from the task",
            field=field,
        )

    if host_config.get("Privileged"):
        raise refuse(
            "privileged=True gives the container every device and capability of the host", "privileged"
        )
    for key, what in _REFUSED_KEYS.items():
        if host_config.get(key):
            raise refuse(f"{what} may not be given", what.split(" ", 1)[0])
    for key, field in _NAMESPACE_KEYS.items():
        mode = str(host_config.get(key) or "")
        if mode.startswith(_SHARED_NAMESPACE):
            raise refuse(f"{field}={mode!r} shares a namespace of the host or of another container", field)
    for option in host_config.get("SecurityOpt") or []:
        text = str(option).replace("=", ":").lower()
        if "unconfined" in text or text.startswith(("no-new-privileges:false", "label:disable")):
            raise refuse(f"security_opt {option!r} weakens the container's confinement", "security_opt")
    allowed = {_mount_key(mount) for mount in workspace_mounts}
    for mount in host_config.get("Mounts") or []:
        kind = str(mount.get("Type") or "volume")
        if kind == "bind" and _mount_key(mount) not in allowed:
            raise refuse(
                f"the bind mount of {mount.get('Source')!r} on {mount.get('Target')!r} is not one of the "
                "run's workspace (a Docker socket or a host path gives the training code the host)",
                "mounts",
            )
        if kind == "volume" and (mount.get("VolumeOptions") or {}).get("DriverConfig"):
            raise refuse(
                f"the volume mount on {mount.get('Target')!r} has a driver configuration (a local volume "
                "with driver options can bind any host path); use a named volume made by an admin",
                "mounts",
            )
        if kind not in ("bind", "volume", "tmpfs"):
            raise refuse(f"a {kind} mount on {mount.get('Target')!r} may not be given", "mounts")


def _mount_key(mount: Mapping[str, Any]) -> tuple[str, str, bool]:
    return (
        os.path.normpath(str(mount.get("Source") or "")),
        os.path.normpath(str(mount.get("Target") or "")),
        bool(mount.get("ReadOnly")),
    )
