"""GPU allocation on a Docker host: explicit device ids, never shared by two concurrent runs.

Docker does no GPU scheduling (``DeviceRequest(count=N)`` gives every container the same first N GPUs),
so each run gets explicit ``device_ids``.  The Docker daemon is the only source of truth, shared by
every worker (process or machine) that talks to it:

* a GPU is **busy** when a run container (label :data:`~airflow_wmltrain.runtime.labels.ROLE` =
  ``run``) in state created/running/restarting/paused (or being removed) names it in its
  :data:`~airflow_wmltrain.runtime.labels.GPUS` label, or when its **lease** exists: a container named
  :func:`~airflow_wmltrain.runtime.labels.gpu_lease_name` (created, never started; labels ROLE =
  ``gpu-lease``, TRAINING_ID, GPUS = that one GPU).  Exited and dead run containers hold no GPU.
* to allocate N GPUs for a training id, :func:`try_allocate_gpus` lists our containers, creates the
  leases of free GPUs (a container name is unique per daemon, so the daemon answers ``409 Conflict`` to
  all but one of several workers creating the same lease: that is the atomic step), then lists again
  and drops any lease whose GPU a run container took meanwhile (a run that created its container and
  dropped its lease between our listing and our lease).  With fewer than N leases it releases them all
  (no worker holds some GPUs while waiting for more, so no two can block each other) and says who
  holds what.
* the caller creates its run container with ``GPUS=<ids>`` and :func:`gpu_device_request`, then calls
  :func:`release_leases`.  A lease whose training id already has a run container, or older than
  ``stale_after`` seconds (the worker died between lease and container), is stale: the next
  allocation removes it and says so in the log.

A training id that already has a run container keeps its GPUs (the operator re-attaches and does not
allocate); the leases of a training id never count against that training id, so allocating again for it
reuses them.

The GPUs a host offers come from the ``[wmltrain] gpu_ids`` setting or, for ``auto``, from the
daemon's label ``wmltrain.gpus`` or ``nvidia-smi`` in a probe container (:func:`gpu_inventory`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from docker.errors import APIError, ImageNotFound
from docker.types import DeviceRequest

from airflow_wmltrain.errors import GpuCapacityError, ImageMissingError
from airflow_wmltrain.hooks.docker import LIVE_STATES, remove_container
from airflow_wmltrain.runtime import labels
from airflow_wmltrain.waiting import Backoff, WaitTimeoutError, wait_until

if TYPE_CHECKING:
    from docker import APIClient

__all__ = [
    "BUSY_STATES",
    "DEFAULT_STALE_AFTER",
    "GpuAllocation",
    "NoNvidiaRuntimeError",
    "check_capacity",
    "clear_caches",
    "docker_host_url",
    "gpu_device_request",
    "gpu_inventory",
    "gpu_wait_timeout_error",
    "has_nvidia_runtime",
    "is_no_driver_error",
    "no_nvidia_runtime_error",
    "parse_gpu_ids",
    "release_leases",
    "sort_gpu_ids",
    "try_allocate_gpus",
    "until_gpus_may_free",
    "wait_for_gpus",
]

_LOG = logging.getLogger(__name__)

#: Seconds after which a lease whose training id has no run container is taken as abandoned.
DEFAULT_STALE_AFTER = 120.0
#: States in which a run container holds the GPUs of its ``GPUS`` label (live, or being removed).
BUSY_STATES = LIVE_STATES | {"removing"}
#: What dockerd answers to a GPU device request when it has no NVIDIA runtime.
NO_DRIVER_TEXT = "could not select device driver"
#: How often :func:`wait_for_gpus` says who holds the GPUs while it waits.
REPORT_EVERY = 60.0
#: Seconds a probe container may take.
PROBE_TIMEOUT = 120
#: Seconds a host's probed facts (NVIDIA runtime, ``nvidia-smi`` GPUs) are shared by a worker's processes.
HOST_FACTS_TTL = 600.0
#: The largest host-facts file read back (it holds a few booleans and ids).
_HOST_FACTS_LIMIT = 64 * 1024

# One allocation lists, leases, lists again (confirm) and may try the GPUs left a second time.
_ROUNDS = 3

_cache_lock = threading.Lock()
_inventory_cache: dict[str, tuple[str, ...]] = {}
_runtime_cache: dict[str, bool] = {}


class LogLike(Protocol):
    """What this module needs of a logger (``logging.Logger``, an Airflow task's ``self.log``)."""

    def info(self, msg: str, *args: Any) -> Any: ...

    def warning(self, msg: str, *args: Any) -> Any: ...


class NoNvidiaRuntimeError(GpuCapacityError):
    """The Docker host has no NVIDIA runtime: it refuses GPU device requests (``S100``).

    :param docker_url: the Docker host, for the message.
    """

    def __init__(self, docker_url: str) -> None:
        self.docker_url = docker_url
        super().__init__(
            f"the Docker host {docker_url} has no NVIDIA runtime: install the NVIDIA Container Toolkit "
            "there, or set [wmltrain] cpu_fallback = True to run without GPUs"
        )


# --- small helpers ------------------------------------------------------------------------------------------


def _gpu_sort_key(gpu_id: str) -> tuple[int, int, str]:
    return (0, int(gpu_id), "") if gpu_id.isdigit() else (1, 0, gpu_id)


def sort_gpu_ids(gpu_ids: Iterable[str]) -> list[str]:
    """GPU ids in order: numeric ids by value (``2`` before ``10``), then the others (UUIDs) by name.

    :param gpu_ids: the ids.
    :return: a new, sorted list.
    """
    return sorted(gpu_ids, key=_gpu_sort_key)


def parse_gpu_ids(text: str | None) -> list[str]:
    """The distinct GPU ids of a comma-separated list (``"0, 1,2"``), in numeric order.

    :param text: the list, e.g. a :data:`~airflow_wmltrain.runtime.labels.GPUS` label or ``gpu_ids``.
    :return: the ids, without blanks and duplicates.
    """
    return sort_gpu_ids({item.strip() for item in (text or "").split(",") if item.strip()})


def gpu_device_request(gpu_ids: Sequence[str]) -> DeviceRequest:
    """The device request that gives a run container exactly these GPUs.

    :param gpu_ids: the ids :func:`try_allocate_gpus` or :func:`wait_for_gpus` returned.
    :return: ``DeviceRequest(device_ids=[...], capabilities=[["gpu"]])``.
    """
    return DeviceRequest(device_ids=list(gpu_ids), capabilities=[["gpu"]])


def docker_host_url(client: APIClient) -> str:
    """The URL of the daemon a client talks to, for messages and as the key of the per-host caches.

    ``APIClient.base_url`` is ``http+docker://localhost`` for every Unix socket; the socket's path is on
    the client's transport adapter.

    :param client: a low-level Docker client.
    :return: e.g. ``unix:///var/run/docker.sock`` or ``https://gpu-host:2376``.
    """
    adapter = getattr(client, "_custom_adapter", None)
    socket_path = getattr(adapter, "socket_path", None)
    if isinstance(socket_path, str) and socket_path:
        return f"unix://{socket_path}"
    npipe_path = getattr(adapter, "npipe_path", None)
    if isinstance(npipe_path, str) and npipe_path:
        return f"npipe://{npipe_path}"
    ssh_params = getattr(adapter, "ssh_params", None)
    if isinstance(ssh_params, dict) and ssh_params.get("hostname"):
        port = f":{ssh_params['port']}" if ssh_params.get("port") else ""
        return f"ssh://{ssh_params['hostname']}{port}"
    return str(getattr(client, "base_url", "") or "the Docker host")


def is_no_driver_error(exc: BaseException) -> bool:
    """Whether ``exc`` is dockerd refusing a GPU device request for want of an NVIDIA runtime.

    The daemon answers ``could not select device driver "" with capabilities: [[gpu]]``.

    :param exc: any exception (usually a ``docker.errors.APIError``).
    :return: ``True`` for that refusal.
    """
    if not isinstance(exc, APIError):
        return False
    texts = [str(exc), str(getattr(exc, "explanation", "") or "")]
    return any(NO_DRIVER_TEXT in text for text in texts)


def no_nvidia_runtime_error(docker_url: str) -> NoNvidiaRuntimeError:
    """The error (``S100``) for a Docker host without NVIDIA runtime, naming both ways out.

    :param docker_url: the Docker host.
    :return: the exception, to raise (``raise no_nvidia_runtime_error(url) from exc``).
    """
    return NoNvidiaRuntimeError(docker_url)


def clear_caches() -> None:
    """Forget the detected inventories and runtime probes of every host, in this process (tests; a changed
    host: delete the ``gpu-host-*.json`` files of the cache directory too, or wait :data:`HOST_FACTS_TTL`)."""
    with _cache_lock:
        _inventory_cache.clear()
        _runtime_cache.clear()


# --- probed facts shared by the processes of a worker -------------------------------------------------------
#
# Every Airflow task is a new process, so an in-process cache alone probes the host once per run: a probe
# container is about a second of a short run's GPU time.  The answer is also kept for HOST_FACTS_TTL
# seconds in a small file per host in the worker's cache directory ([wmltrain] staging_dir/cache, never
# mounted into a training container), written atomically (temporary file + rename).


def _facts_path(cache_dir: str | os.PathLike[str], url: str) -> Path:
    return Path(cache_dir) / f"gpu-host-{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"


def _shared_fact(cache_dir: str | os.PathLike[str] | None, url: str, key: str) -> Any:
    """A fact another process probed less than :data:`HOST_FACTS_TTL` seconds ago, or ``None``."""
    if cache_dir is None:
        return None
    try:
        fd = os.open(_facts_path(cache_dir, url), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as handle:
            facts = json.loads(handle.read(_HOST_FACTS_LIMIT))
    except (OSError, ValueError):
        return None
    entry = facts.get(key) if isinstance(facts, dict) and facts.get("docker_url") == url else None
    if not isinstance(entry, dict) or not isinstance(entry.get("at"), (int, float)):
        return None
    if not 0 <= time.time() - entry["at"] <= HOST_FACTS_TTL:
        return None
    return entry.get("value")


@contextlib.contextmanager
def _probing(cache_dir: str | os.PathLike[str] | None, url: str) -> Iterator[None]:
    """Hold the host's probe lock: the tasks a grid starts at once probe once, not each (the others wait
    for the answer, at most :data:`PROBE_TIMEOUT` seconds, then probe themselves)."""
    if cache_dir is None:
        yield
        return
    path = _facts_path(cache_dir, url).with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        yield
        return

    def locked() -> bool | None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # another process probes
        return True

    try:
        with contextlib.suppress(WaitTimeoutError):  # a hung prober: probe without the lock
            wait_until(
                locked,
                what=f"the GPU probe lock of {url}",
                timeout=PROBE_TIMEOUT,
                backoff=Backoff(interval=0.05, max_interval=0.05),
            )
        yield
    finally:
        os.close(fd)  # releases the lock


def _probed_once(
    cache_dir: str | os.PathLike[str] | None,
    url: str,
    key: str,
    valid: Callable[[Any], bool],
    probe: Callable[[], Any],
) -> Any:
    """A host fact: another process's answer when it is fresh, else ``probe()``'s, shared."""
    shared = _shared_fact(cache_dir, url, key)
    if valid(shared):
        return shared
    with _probing(cache_dir, url):
        shared = _shared_fact(cache_dir, url, key)  # probed while this process waited
        if valid(shared):
            return shared
        value = probe()
        _share_fact(cache_dir, url, key, value)
        return value


def _share_fact(cache_dir: str | os.PathLike[str] | None, url: str, key: str, value: Any) -> None:
    """Keep a probed fact for the worker's other processes (best effort: a failure only costs a probe)."""
    if cache_dir is None:
        return
    path = _facts_path(cache_dir, url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        facts: dict[str, Any] = {"docker_url": url}
        try:
            with path.open("rb") as handle:
                known = json.loads(handle.read(_HOST_FACTS_LIMIT))
            if isinstance(known, dict) and known.get("docker_url") == url:
                facts.update(known)
        except (OSError, ValueError):
            pass
        facts[key] = {"value": value, "at": time.time()}
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps(facts), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        _LOG.debug("could not keep the GPU host facts of %s in %s: %s", url, path, exc)


def _is_conflict(exc: APIError) -> bool:
    return getattr(exc, "status_code", None) == 409


# --- inventory and runtime probes ---------------------------------------------------------------------------


def _daemon_label(info: Mapping[str, Any], key: str) -> str | None:
    for item in info.get("Labels") or []:
        name, sep, value = str(item).partition("=")
        if sep and name.strip() == key:
            return value.strip()
    return None


def _run_probe(client: APIClient, image: str, command: list[str], capabilities: list[str]) -> tuple[int, str]:
    """Create, start and remove a container asking for all GPUs; its exit code and output."""
    host_config = client.create_host_config(
        device_requests=[DeviceRequest(count=-1, capabilities=[capabilities])], network_mode="none"
    )
    try:
        container = client.create_container(
            image,
            command=command,
            labels={labels.ROLE: labels.ROLE_GPU_PROBE},
            host_config=host_config,
        )
    except ImageNotFound as exc:
        raise ImageMissingError(
            f"the image {image} is not on the Docker host {docker_host_url(client)}; pull it first"
        ) from exc
    container_id = container["Id"]
    try:
        client.start(container_id)
        status = client.wait(container_id, timeout=PROBE_TIMEOUT)
        output = client.logs(container_id, stdout=True, stderr=True)
    finally:
        remove_container(client, container_id)
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else str(output)
    return int(status.get("StatusCode", -1)), text


def has_nvidia_runtime(
    client: APIClient,
    image: str,
    *,
    docker_url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> bool:
    """Whether the Docker host accepts GPU device requests (it has an NVIDIA runtime).

    Probes once per host and process, and once per :data:`HOST_FACTS_TTL` seconds for all the processes
    sharing ``cache_dir``: a container of ``image`` asking for all GPUs runs ``true`` and is removed.
    Only the daemon's refusal (:func:`is_no_driver_error`) means ``False``; any other failure is raised
    and not remembered.

    :param client: a low-level Docker client of the host.
    :param image: an image present on the host that has ``true`` (the run's image).
    :param docker_url: the host's URL (cache key); derived from ``client`` when omitted.
    :param cache_dir: the worker's cache directory (``[wmltrain] staging_dir``/cache), shared by its
        processes; ``None``: this process only.
    :return: ``True`` when the host has an NVIDIA runtime.
    :raises ImageMissingError: ``image`` is not on the host.
    :raises docker.errors.APIError: the probe failed for another reason.
    """
    url = docker_url or docker_host_url(client)
    with _cache_lock:
        known = _runtime_cache.get(url)
    if known is not None:
        return known

    def probe() -> bool:
        try:
            _run_probe(client, image, ["true"], ["gpu"])
        except APIError as exc:
            if not is_no_driver_error(exc):
                raise
            return False
        return True

    found = bool(_probed_once(cache_dir, url, "nvidia_runtime", lambda v: isinstance(v, bool), probe))
    with _cache_lock:
        _runtime_cache[url] = found
    return found


def gpu_inventory(
    client: APIClient,
    setting: str,
    *,
    image: str,
    docker_url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The GPUs of the Docker host that runs may use.

    ``setting`` is ``[wmltrain] gpu_ids``: a list (``0,1,2,3``) is taken as it is; ``auto`` asks the
    host, once per host and process: the daemon's label ``wmltrain.gpus=0,1,2,3`` when it has one, else
    ``nvidia-smi --query-gpu=index --format=csv,noheader`` in a probe container of ``image`` given all
    GPUs (that answer is shared, like :func:`has_nvidia_runtime`'s, through ``cache_dir``).

    :param client: a low-level Docker client of the host.
    :param setting: ``auto`` or a comma-separated list of GPU ids.
    :param image: an image present on the host, with ``nvidia-smi`` (the run's image); used only when
        ``auto`` finds no daemon label.
    :param docker_url: the host's URL (cache key and messages); derived from ``client`` when omitted.
    :param cache_dir: see :func:`has_nvidia_runtime`.
    :return: the GPU ids in numeric order (empty when the daemon label is empty).
    :raises NoNvidiaRuntimeError: the host refuses GPU device requests (``S100``).
    :raises GpuCapacityError: ``nvidia-smi`` failed or listed nothing usable (``S100``).
    :raises ImageMissingError: ``image`` is not on the host (``S103``).
    """
    if setting.strip().lower() != "auto":
        return parse_gpu_ids(setting)
    url = docker_url or docker_host_url(client)
    with _cache_lock:
        cached = _inventory_cache.get(url)
    if cached is not None:
        return list(cached)
    label = _daemon_label(client.info(), labels.DAEMON_GPUS)
    if label is not None:
        found = parse_gpu_ids(label)
    else:
        found = sort_gpu_ids(
            _probed_once(
                cache_dir,
                url,
                "nvidia_smi_gpus",
                lambda v: isinstance(v, list) and bool(v) and all(isinstance(item, str) for item in v),
                lambda: _probe_inventory(client, image, url),
            )
        )
    with _cache_lock:
        _inventory_cache[url] = tuple(found)
    return list(found)


def _probe_inventory(client: APIClient, image: str, url: str) -> list[str]:
    fix = (
        f"set [wmltrain] gpu_ids to the host's GPU ids (e.g. 0,1,2,3), or start its dockerd with "
        f"--label {labels.DAEMON_GPUS}=0,1,2,3"
    )
    try:
        code, output = _run_probe(
            client, image, ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], ["gpu", "utility"]
        )
    except APIError as exc:
        if is_no_driver_error(exc):
            raise no_nvidia_runtime_error(url) from exc
        raise GpuCapacityError(
            f"could not list the GPUs of the Docker host {url} with nvidia-smi in {image} "
            f"({exc.explanation or exc}): {fix}"
        ) from exc
    ids = [line.strip() for line in output.splitlines() if line.strip()]
    if code != 0 or not ids or not all(item.isdigit() for item in ids):
        shown = " ".join(output.split())[:200] or "no output"
        raise GpuCapacityError(
            f"could not list the GPUs of the Docker host {url}: nvidia-smi in {image} exited with {code} "
            f"({shown}): {fix}"
        )
    return sort_gpu_ids(set(ids))


# --- what the daemon says -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Lease:
    container_id: str
    name: str
    gpu: str
    training_id: str
    created: float


@dataclass
class _Snapshot:
    #: busy GPU -> (training id, state) of the run container holding it
    run_gpus: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: training ids that have a run container, in any state
    run_ids: set[str] = field(default_factory=set)
    leases: list[_Lease] = field(default_factory=list)


def _snapshot(client: APIClient) -> _Snapshot:
    snap = _Snapshot()
    for container in client.containers(all=True, filters={"label": labels.ROLE}) or []:
        container_labels = container.get("Labels") or {}
        role = container_labels.get(labels.ROLE)
        training_id = container_labels.get(labels.TRAINING_ID, "")
        gpus = parse_gpu_ids(container_labels.get(labels.GPUS))
        if role == labels.ROLE_RUN:
            snap.run_ids.add(training_id)
            state = str(container.get("State") or "").lower()
            if state in BUSY_STATES:
                for gpu in gpus:
                    snap.run_gpus[gpu] = (training_id, state)
        elif role == labels.ROLE_GPU_LEASE and gpus:
            names = container.get("Names") or [""]
            snap.leases.append(
                _Lease(
                    container_id=str(container["Id"]),
                    name=str(names[0]).lstrip("/"),
                    gpu=gpus[0],
                    training_id=training_id,
                    created=float(container.get("Created") or 0),
                )
            )
    return snap


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def _parse_rfc3339(text: str) -> float | None:
    """Seconds since the epoch of a timestamp as dockerd writes it (nanoseconds, ``Z`` or offset)."""
    match = _RFC3339.match(text.strip())
    if not match:
        return None
    base, fraction, zone = match.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    stamp = datetime.fromisoformat(f"{base}.{(fraction or '0')[:6].ljust(6, '0')}{zone}")
    return stamp.astimezone(timezone.utc).timestamp()


def _daemon_now(client: APIClient) -> float:
    """The daemon's clock (a lease's ``Created`` is on it, and the worker's may differ)."""
    try:
        parsed = _parse_rfc3339(str(client.info().get("SystemTime") or ""))
    except APIError:
        parsed = None
    return parsed if parsed is not None else time.time()


def _stale_reason(lease: _Lease, snap: _Snapshot, now: float | None, stale_after: float) -> str | None:
    if lease.training_id in snap.run_ids:
        return f"training {lease.training_id} already has its run container"
    if now is not None and now - lease.created > stale_after:
        return (
            f"created {now - lease.created:.0f} s ago (more than {stale_after:.0f} s) and training "
            f"{lease.training_id} has no run container: its worker is gone"
        )
    return None


# --- allocation ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuAllocation:
    """The outcome of one allocation attempt.

    :param training_id: the training id GPUs were asked for.
    :param requested: how many GPUs were asked for.
    :param gpu_ids: the GPUs leased to ``training_id``, in numeric order; empty unless granted.
    :param inventory: the GPUs of the host.
    :param holders: each busy GPU (not granted to ``training_id``) -> who holds it, e.g.
        ``"run train-1 (running)"`` or ``"lease of train-2"``.
    :param docker_url: the host.
    """

    training_id: str
    requested: int
    gpu_ids: tuple[str, ...]
    inventory: tuple[str, ...]
    holders: Mapping[str, str]
    docker_url: str

    @property
    def granted(self) -> bool:
        """Whether ``training_id`` now holds the leases of :attr:`gpu_ids` (all it asked for)."""
        return len(self.gpu_ids) == self.requested

    @property
    def free(self) -> tuple[str, ...]:
        """The GPUs of the inventory that neither ``training_id`` nor anybody else held."""
        return tuple(g for g in self.inventory if g not in self.holders and g not in self.gpu_ids)

    def describe(self) -> str:
        """Who holds what, for the log: ``GPU 0: run t1 (running); GPU 1: lease of t2; GPU 2: free``."""
        parts = []
        for gpu in self.inventory:
            if gpu in self.gpu_ids:
                parts.append(f"GPU {gpu}: leased to {self.training_id}")
            else:
                parts.append(f"GPU {gpu}: {self.holders.get(gpu, 'free')}")
        return "; ".join(parts) if parts else "no GPUs"


def _capacity_message(count: int, inventory: Sequence[str], resource_class: str | None, url: str) -> str:
    what = f"resource class '{resource_class}' needs" if resource_class else "the run needs"
    offers = f"only {len(inventory)} (GPUs {','.join(inventory)})" if inventory else "no GPUs"
    return (
        f"{what} {count} GPU(s) but the Docker host {url} offers {offers}: choose a resource class "
        f"with at most {len(inventory)} GPU(s), or run on a host with more GPUs ([wmltrain] gpu_ids, or "
        f"the daemon label {labels.DAEMON_GPUS}, lists the GPUs runs may use)"
    )


def check_capacity(
    count: int, inventory: Sequence[str], *, resource_class: str | None = None, docker_url: str = ""
) -> None:
    """Refuse at once a run that asks for more GPUs than the host has at all.

    :param count: GPUs asked for.
    :param inventory: the host's GPUs (:func:`gpu_inventory`).
    :param resource_class: the run's resource class, for the message.
    :param docker_url: the host, for the message.
    :raises GpuCapacityError: ``count`` exceeds the inventory (``S100``); waiting would not help.
    """
    if count < 0:
        raise ValueError(f"a GPU count cannot be negative: {count}")
    if count > len(inventory):
        raise GpuCapacityError(
            _capacity_message(count, list(inventory), resource_class, docker_url or "the Docker host")
        )


def _create_lease(client: APIClient, gpu: str, training_id: str, image: str, url: str) -> str | None:
    """Create the lease of ``gpu``; its container id, or ``None`` when someone else holds it."""
    try:
        container = client.create_container(
            image,
            command=["true"],
            name=labels.gpu_lease_name(gpu),
            labels={
                labels.ROLE: labels.ROLE_GPU_LEASE,
                labels.TRAINING_ID: training_id,
                labels.GPUS: gpu,
            },
            host_config=client.create_host_config(network_mode="none"),
        )
    except ImageNotFound as exc:
        raise ImageMissingError(f"the image {image} is not on the Docker host {url}; pull it first") from exc
    except APIError as exc:
        if _is_conflict(exc):
            return None
        raise
    return str(container["Id"])


def try_allocate_gpus(
    client: APIClient,
    training_id: str,
    count: int,
    *,
    inventory: Sequence[str],
    image: str,
    resource_class: str | None = None,
    docker_url: str | None = None,
    stale_after: float = DEFAULT_STALE_AFTER,
    log: LogLike | None = None,
) -> GpuAllocation:
    """Try once to lease ``count`` free GPUs of the host for ``training_id``.

    Atomic against concurrent allocations on the same host by any worker (see the module's doc).  On
    success the caller creates its run container at once (label ``GPUS=",".join(gpu_ids)``,
    :func:`gpu_device_request`) and then calls :func:`release_leases`; leases older than
    ``stale_after`` whose training id has no run container are taken as abandoned by other workers, so
    pull the image *before* allocating.  The leases ``training_id`` already holds are reused.  Stale
    leases are removed (logged as warnings).

    :param client: a low-level Docker client of the host.
    :param training_id: the run's training id (label of its leases and run container).
    :param count: GPUs wanted (``0``: granted at once with none).
    :param inventory: the host's GPUs (:func:`gpu_inventory`).
    :param image: an image present on the host (the run's image): leases are created, never started,
        containers of it.
    :param resource_class: the run's resource class, for messages.
    :param docker_url: the host's URL, for messages; derived from ``client`` when omitted.
    :param stale_after: seconds after which a lease without a run container is abandoned.
    :param log: where to log (default: this module's logger).
    :return: the outcome; :attr:`GpuAllocation.granted` says whether ``training_id`` now holds
        :attr:`GpuAllocation.gpu_ids`; when not, it holds no lease and :attr:`GpuAllocation.holders`
        says who holds what.
    :raises GpuCapacityError: ``count`` exceeds the inventory (``S100``: waiting would not help).
    :raises ImageMissingError: ``image`` is not on the host (``S103``).
    :raises docker.errors.APIError: the daemon failed otherwise.
    """
    log = log or _LOG
    url = docker_url or docker_host_url(client)
    inv = tuple(sort_gpu_ids(dict.fromkeys(inventory)))
    check_capacity(count, inv, resource_class=resource_class, docker_url=url)
    if count == 0:
        return GpuAllocation(training_id, 0, (), inv, MappingProxyType({}), url)

    held: dict[str, str] = {}  # our leases: GPU -> lease container id
    holders: dict[str, str] = {}
    try:
        for attempt in range(_ROUNDS):
            snap = _snapshot(client)
            held, holders = _reconcile(
                client, snap, training_id, inventory=inv, stale_after=stale_after, log=log
            )
            if len(held) >= count:
                keep = sort_gpu_ids(held)[:count]
                for gpu in sort_gpu_ids(held)[count:]:
                    remove_container(client, held.pop(gpu))
                log.info("leased GPU(s) %s on %s for training %s", ",".join(keep), url, training_id)
                return GpuAllocation(training_id, count, tuple(keep), inv, MappingProxyType(holders), url)
            if attempt == _ROUNDS - 1:
                break
            candidates = [gpu for gpu in inv if gpu not in held and gpu not in holders]
            created = False
            for gpu in candidates:
                if len(held) >= count:
                    break
                lease_id = _create_lease(client, gpu, training_id, image, url)
                if lease_id is None:
                    holders[gpu] = "lease of a concurrent allocation"
                else:
                    held[gpu] = lease_id
                    created = True
            # Not enough, and nothing new to confirm: give up now (a later try looks again).
            if not created and len(held) < count:
                break
    except BaseException:
        for lease_id in held.values():
            _remove_quietly(client, lease_id)
        raise
    for lease_id in held.values():
        remove_container(client, lease_id)
    holders = {gpu: who for gpu, who in holders.items() if gpu in inv}
    return GpuAllocation(training_id, count, (), inv, MappingProxyType(holders), url)


def _remove_quietly(client: APIClient, container_id: str) -> None:
    try:
        remove_container(client, container_id)
    except Exception:  # best effort while another error propagates
        _LOG.warning("could not remove the GPU lease %s", container_id, exc_info=True)


def _reconcile(
    client: APIClient,
    snap: _Snapshot,
    training_id: str,
    *,
    inventory: Sequence[str],
    stale_after: float,
    log: LogLike,
) -> tuple[dict[str, str], dict[str, str]]:
    """Remove stale leases and our own leases that a run took; our leases and the other holders."""
    holders: dict[str, str] = {}
    for gpu, (owner, state) in snap.run_gpus.items():
        if owner != training_id:
            holders[gpu] = f"run {owner} ({state})"
    foreign = [lease for lease in snap.leases if lease.training_id != training_id]
    now = _daemon_now(client) if any(lease.training_id not in snap.run_ids for lease in foreign) else None
    for lease in foreign:
        reason = _stale_reason(lease, snap, now, stale_after)
        if reason is None:
            holders.setdefault(lease.gpu, f"lease of {lease.training_id}")
            continue
        log.warning(
            "removing the stale GPU lease %s (GPU %s, training %s): %s",
            lease.name,
            lease.gpu,
            lease.training_id,
            reason,
        )
        remove_container(client, lease.container_id)
    held: dict[str, str] = {}
    for lease in snap.leases:
        if lease.training_id != training_id:
            continue
        if lease.gpu in holders or lease.gpu not in inventory:
            # A run took this GPU between our listing and our lease, or it is no longer offered.
            remove_container(client, lease.container_id)
            continue
        held[lease.gpu] = lease.container_id
    return held, holders


def release_leases(client: APIClient, training_id: str) -> list[str]:
    """Remove the GPU leases of a training id: call it once its run container exists (or on failure).

    :param client: a low-level Docker client of the host.
    :param training_id: the run's training id.
    :return: the GPUs whose leases were removed, in numeric order.
    """
    found = client.containers(
        all=True,
        filters={"label": [f"{labels.ROLE}={labels.ROLE_GPU_LEASE}", f"{labels.TRAINING_ID}={training_id}"]},
    )
    released: list[str] = []
    for container in found or []:
        remove_container(client, str(container["Id"]))
        released.extend(parse_gpu_ids((container.get("Labels") or {}).get(labels.GPUS)))
    return sort_gpu_ids(released)


def gpu_wait_timeout_error(
    allocation: GpuAllocation, waited: float, *, resource_class: str | None = None
) -> GpuCapacityError:
    """The error (``S100``) for a run that waited ``waited`` seconds for GPUs in vain.

    :param allocation: the last, not granted, attempt.
    :param waited: seconds waited.
    :param resource_class: the run's resource class, for the message.
    :return: the exception, to raise.
    """
    what = f"resource class '{resource_class}'" if resource_class else f"training {allocation.training_id}"
    return GpuCapacityError(
        f"no {allocation.requested} free GPU(s) for {what} on the Docker host {allocation.docker_url} "
        f"after waiting {waited:.0f} s ({allocation.describe()}): try again later, or raise "
        "[wmltrain] gpu_wait_timeout"
    )


def until_gpus_may_free(client: APIClient) -> Callable[[float], None]:
    """A sleep that ends early when a GPU of the host may have freed up.

    It follows the daemon's events for at most the given seconds and returns at the first ``die`` or
    ``destroy`` of one of our containers (a run ended, a lease or probe went).  When the events cannot be
    followed it sleeps the whole time (the caller's poll is the fallback).

    :param client: a low-level Docker client of the host.
    :return: ``sleep(seconds)``.
    """
    filters = {"type": "container", "event": ["die", "destroy"], "label": [labels.ROLE]}

    def sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        woken = False
        try:
            stream = client.events(decode=True, filters=filters)
        except Exception:  # the poll is the fallback
            stream = None
        if stream is not None:
            timer = threading.Timer(max(seconds, 0.0), stream.close)  # close() ends a blocked read
            timer.daemon = True
            timer.start()
            try:
                woken = next(iter(stream), None) is not None
            except Exception as exc:  # closed by the timer, or the daemon went away
                _LOG.debug("stopped following the events of the Docker host: %s", exc)
            finally:
                timer.cancel()
                stream.close()
        left = deadline - time.monotonic()
        if not woken and left > 0:
            time.sleep(left)

    return sleep


def wait_for_gpus(
    client: APIClient,
    training_id: str,
    count: int,
    *,
    inventory: Sequence[str],
    image: str,
    timeout: float,
    poll_interval: float,
    log: LogLike,
    resource_class: str | None = None,
    docker_url: str | None = None,
    stale_after: float = DEFAULT_STALE_AFTER,
    report_every: float = REPORT_EVERY,
    sleep: Callable[[float], object] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    on_wait: Callable[[GpuAllocation], None] | None = None,
) -> list[str]:
    """Lease ``count`` GPUs for ``training_id``, waiting up to ``timeout`` seconds for them to free up.

    Tries :func:`try_allocate_gpus` again as soon as a run container of the host ends or a lease goes
    (the daemon's events: a GPU is handed over in a fraction of a second), and at least every
    ``poll_interval`` seconds; says who holds the GPUs at the first wait and then at most every
    ``report_every`` seconds.  The caller then creates its run
    container and calls :func:`release_leases`, as after :func:`try_allocate_gpus`.

    :param client: a low-level Docker client of the host.
    :param training_id: the run's training id.
    :param count: GPUs wanted.
    :param inventory: the host's GPUs (:func:`gpu_inventory`).
    :param image: an image present on the host (the run's image).
    :param timeout: seconds to wait (``[wmltrain] gpu_wait_timeout``).
    :param poll_interval: seconds between tries (``[wmltrain] gpu_poll_interval``).
    :param log: the task's logger.
    :param resource_class: the run's resource class, for messages.
    :param docker_url: the host's URL, for messages; derived from ``client`` when omitted.
    :param stale_after: see :func:`try_allocate_gpus`.
    :param report_every: seconds between two "still waiting" lines.
    :param sleep: how to wait between two tries (default: :func:`until_gpus_may_free`; tests).
    :param monotonic: the clock (tests).
    :param on_wait: told of each "still waiting" report (who holds the GPUs), e.g. to publish it.
    :return: the leased GPU ids, in numeric order.
    :raises GpuCapacityError: the host has fewer GPUs than ``count`` (at once), or none freed up in
        ``timeout`` seconds (``S100``).
    :raises ImageMissingError: ``image`` is not on the host (``S103``).
    """
    start = monotonic()
    reports: list[float] = []  # when "still waiting" was last said
    last: list[GpuAllocation] = []

    def look() -> list[str] | None:
        allocation = try_allocate_gpus(
            client,
            training_id,
            count,
            inventory=inventory,
            image=image,
            resource_class=resource_class,
            docker_url=docker_url,
            stale_after=stale_after,
            log=log,
        )
        now = monotonic()
        if allocation.granted:
            if reports:
                log.info("got GPU(s) %s after waiting %.0f s", ",".join(allocation.gpu_ids), now - start)
            return list(allocation.gpu_ids)
        last[:] = [allocation]
        if not reports or now - reports[-1] >= report_every:
            log.info(
                "waiting for %d free GPU(s) on %s (%.0f of %.0f s waited): %s",
                count,
                allocation.docker_url,
                now - start,
                timeout,
                allocation.describe(),
            )
            reports.append(now)
            if on_wait is not None:
                on_wait(allocation)
        return None

    try:
        return wait_until(
            look,
            what=f"{count} free GPU(s) for {training_id}",
            timeout=timeout,
            backoff=Backoff(interval=poll_interval, max_interval=poll_interval),
            sleep=sleep or until_gpus_may_free(client),
            clock=monotonic,
        )
    except WaitTimeoutError:
        raise gpu_wait_timeout_error(last[0], monotonic() - start, resource_class=resource_class) from None
