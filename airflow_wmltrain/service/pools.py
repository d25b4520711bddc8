"""GPU capacity as Airflow capacity: one Airflow pool per Docker host, one slot per GPU.

Runs then queue in Airflow for GPUs instead of waiting on a worker (or failing with ``S100`` after
``[wmltrain] gpu_wait_timeout``), and the scheduler never starts more GPU work on a host than it has
GPUs.  The set-up:

* **a pool per Docker host**, its slots the host's GPUs — the inventory the operator itself uses
  (``[wmltrain] gpu_ids``, or for ``auto`` the daemon's label ``wmltrain.gpus`` or ``nvidia-smi``:
  :meth:`~airflow_wmltrain.hooks.docker.TrainingDockerHook.gpu_inventory`) — and
  ``include_deferred=True``: a deferrable run waits for its container in the triggerer, and its GPUs
  stay taken all that time, so its slots must too;
* **a task's** ``pool_slots`` **= the GPUs of its resource class** (``[wmltrain] resource_classes``,
  :func:`pool_slots`);
* ``pool`` and ``pool_slots`` are not mappable: they come from ``partial()``, so a grid has **one mapped
  task per resource class**::

      TrainingRunOperator.partial(
          task_id="grid_medium",
          pool="wmltrain_gpus",
          pool_slots=pool_slots("medium"),
          manifest=...,
          model_definition=...,
      ).expand(hyperparameters=grid)

The operator's own per-GPU leases (:mod:`airflow_wmltrain.runtime.gpus`) stay the guard that no two
runs share a GPU — also against runs outside the pool; the pool only keeps the queue in Airflow.

**Staging ahead** (``ahead``, ``wmltrain pools --ahead N``): N slots more than the host's GPUs let N
GPUs' worth of runs start while the GPUs are busy: such a run starts its task, stages its data and then
waits in the worker for its GPU lease (``[wmltrain] gpu_wait = wait``), which it gets the moment a run's
container exits.  Airflow's own per-task start and the staging then happen during the previous runs'
training instead of between them: for a grid of short runs, or runs with large data, the GPUs stay busy.
The cost is a worker slot and the staged data of each run that waits.  0 (the default) keeps one slot
per GPU.

:func:`sync_pools` creates (or updates) the pools through the REST API v2 (``wmltrain pools``).
"""

from __future__ import annotations

import re
import string
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from airflow_wmltrain.errors import ClientError, GpuCapacityError, ResourceError

if TYPE_CHECKING:
    from airflow_wmltrain.service.api import AirflowApi
    from airflow_wmltrain.settings import Settings

#: The pool of a deployment with one Docker host.
DEFAULT_POOL = "wmltrain_gpus"
#: The pool name pattern of several Docker hosts (``{host}``: the host's name, ``{index}``: 1, 2, ...).
DEFAULT_POOL_PATTERN = "wmltrain_gpus_{host}"
#: ... when two of them have the same ``{host}`` (two local sockets).
DEFAULT_POOL_INDEXED = "wmltrain_gpus_{index}"
#: The Docker host a ``TrainingRunOperator`` uses when its task names none (the Docker provider's default).
DEFAULT_DOCKER_URL = "unix://var/run/docker.sock"
#: What a pool name may hold (it goes into URLs and ``pool=`` arguments as it is).
POOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")
PLACEHOLDERS = ("host", "index")
CREATE, UPDATE, UNCHANGED = "create", "update", "unchanged"


def pool_slots(resource: str, settings: Settings | None = None) -> int:
    """The ``pool_slots`` of a task whose runs ask for resource class ``resource``: its GPUs.

    :param resource: a resource class of ``[wmltrain] resource_classes`` (``small``, ``medium``...).
    :param settings: the ``[wmltrain]`` settings (default: Airflow's configuration).
    :return: the class's number of GPUs (``small=1,medium=2,large=4`` by default).
    :raises ResourceError: the class is unknown, or has no GPU (``C104``): such runs take no GPU slot,
        give their task no GPU pool.
    """
    if settings is None:
        from airflow_wmltrain.settings import Settings

        settings = Settings.from_airflow_config()
    classes = settings.resource_classes
    field = "pool_slots(resource)"
    if resource not in classes:
        known = ", ".join(f"{name} ({count} GPU(s))" for name, count in classes.items())
        raise ResourceError(
            f"'{resource}' is not a resource class of [wmltrain] resource_classes; use one of {known}",
            field=field,
        )
    count = classes[resource]
    if count < 1:
        raise ResourceError(
            f"resource class '{resource}' asks for no GPU, so its runs take no GPU slot: give its task "
            "no GPU pool (Airflow's default_pool)",
            field=field,
        )
    return count


def host_slug(docker_url: str) -> str:
    """The ``{host}`` of a pool name pattern: ``gpu_host_1`` for ``tcp://gpu-host-1:2376``; a local
    socket (``unix://``, ``npipe://``) is ``local``."""
    parsed = urllib.parse.urlsplit(docker_url if "://" in docker_url else f"tcp://{docker_url}")
    host = "" if parsed.scheme in ("unix", "npipe", "http+unix") else parsed.hostname or ""
    return re.sub(r"[^A-Za-z0-9]+", "_", host).strip("_").lower() or "local"


def pool_names(docker_urls: Sequence[str], pattern: str | None = None) -> list[str]:
    """The pool of each Docker host, from ``pattern`` (default :data:`DEFAULT_POOL` for one host,
    :data:`DEFAULT_POOL_PATTERN` for several, or ``wmltrain_gpus_{index}`` when two hosts have the same
    ``{host}``, e.g. two local sockets).

    :raises ClientError: the pattern has an unknown placeholder, gives a name Airflow cannot take in a
        URL, or the same name to two hosts (``C100``, field ``--pool``).
    """
    field = "--pool"
    if not docker_urls:
        raise ClientError("no Docker host given; give --docker-url URL", field="--docker-url")
    if len(set(docker_urls)) != len(docker_urls):
        raise ClientError("a Docker host is given twice; give each once", field="--docker-url")
    if pattern is None:
        if len(docker_urls) == 1:
            pattern = DEFAULT_POOL
        elif len({host_slug(url) for url in docker_urls}) == len(docker_urls):
            pattern = DEFAULT_POOL_PATTERN
        else:
            pattern = DEFAULT_POOL_INDEXED
    try:
        used = {name for _text, name, _spec, _conv in string.Formatter().parse(pattern) if name is not None}
    except ValueError as err:
        raise ClientError(f"'{pattern}' is not a name pattern ({err})", field=field) from None
    unknown = used - set(PLACEHOLDERS)
    if unknown:
        raise ClientError(
            f"'{pattern}' has the unknown placeholder(s) {', '.join(sorted(unknown))}; use {{host}} or "
            "{index}, e.g. wmltrain_gpus_{host}",
            field=field,
        )
    names = [pattern.format(host=host_slug(url), index=n) for n, url in enumerate(docker_urls, 1)]
    for name in names:
        if not POOL_NAME.match(name):
            raise ClientError(
                f"'{name}' is not a pool name: use letters, digits, '_', '.', '-' (at most 256)", field=field
            )
    if len(set(names)) != len(names):
        raise ClientError(
            f"'{pattern}' gives two Docker hosts the same pool ({', '.join(names)}); put {{index}} or "
            "{host} in it, e.g. wmltrain_gpus_{index}",
            field=field,
        )
    return names


@dataclass(frozen=True)
class HostGpus:
    """A Docker host and the GPUs runs may use on it."""

    docker_url: str
    gpus: tuple[str, ...]


def host_gpus(docker_url: str, settings: Settings, *, image: str | None = None) -> HostGpus:
    """The GPUs of a Docker host, as the operator sees them (``[wmltrain] gpu_ids``; for ``auto`` the
    daemon's label ``wmltrain.gpus``, else ``nvidia-smi`` in a probe container of ``image``).

    :raises DockerHostError: the host does not answer (``S100``).
    :raises GpuCapacityError: ``auto`` needs a probe but no ``image`` was given, the probe failed, or
        the host offers no GPU (``S100``).
    """
    from docker.errors import DockerException

    from airflow_wmltrain.hooks.docker import DockerHostError, TrainingDockerHook
    from airflow_wmltrain.runtime import gpus, labels

    hook = TrainingDockerHook(docker_url=docker_url)
    try:
        # The probe needs an image with nvidia-smi; the daemon's label needs none.
        if (
            settings.gpu_ids == "auto"
            and not image
            and gpus._daemon_label(hook.api_client.info(), labels.DAEMON_GPUS) is None
        ):
            raise GpuCapacityError(
                f"the Docker host {docker_url} has no label {labels.DAEMON_GPUS} and [wmltrain] gpu_ids "
                "is auto: give --image IMAGE (an image there with nvidia-smi) to count its GPUs, set "
                f"[wmltrain] gpu_ids (e.g. 0,1,2,3), or start its dockerd with --label "
                f"{labels.DAEMON_GPUS}=0,1,2,3"
            )
        found = hook.gpu_inventory(settings.gpu_ids, image=image or "")
    except DockerException as err:
        raise DockerHostError(f"the Docker host {docker_url} failed: {err}") from None
    finally:
        hook.close()
    return capacity(docker_url, found)


def capacity(docker_url: str, found: Sequence[str]) -> HostGpus:
    """A host's GPUs as a pool's capacity.

    :raises GpuCapacityError: the host offers none (``S100``): a pool without slots holds every task.
    """
    if not found:
        raise GpuCapacityError(
            f"the Docker host {docker_url} offers no GPU ([wmltrain] gpu_ids or its daemon label "
            "wmltrain.gpus is empty): a pool without slots would hold every task forever; leave this host "
            "out, or list its GPUs"
        )
    return HostGpus(docker_url, tuple(found))


@dataclass(frozen=True)
class PoolChange:
    """What :func:`sync_pools` did (or, dry, would do) to one pool.

    :param pool: the pool's name.
    :param docker_url: the Docker host it stands for.
    :param gpus: the host's GPUs.
    :param slots: the pool's slots now (the number of GPUs, plus ``ahead``).
    :param include_deferred: always ``True``: deferred runs keep their slots.
    :param action: ``create``, ``update`` or ``unchanged``.
    :param previous: the slots and ``include_deferred`` the pool had before an update.
    :param dry_run: nothing was changed.
    :param too_large: the resource classes that ask for more GPUs than the pool has (never scheduled).
    """

    pool: str
    docker_url: str
    gpus: tuple[str, ...]
    slots: int
    include_deferred: bool
    action: str
    previous: dict[str, Any] | None
    dry_run: bool
    too_large: tuple[str, ...] = ()
    ahead: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus"] = list(self.gpus)
        data["too_large"] = list(self.too_large)
        return data

    def describe(self) -> str:
        """One line, e.g. ``wmltrain_gpus: created: 4 slots, include_deferred, for GPUs 0,1,2,3 of URL``."""
        done = {CREATE: "created", UPDATE: "updated", UNCHANGED: "unchanged"}[self.action]
        if self.dry_run and self.action != UNCHANGED:
            done = f"would be {done}"
        was = ""
        if self.previous is not None:
            before = self.previous
            was = f" (was {before['slots']} slots, include_deferred {before['include_deferred']})"
        staged = f" (+{self.ahead} to stage runs ahead)" if self.ahead else ""
        line = (
            f"{self.pool}: {done}: {self.slots} slots{staged}{was}, include_deferred, for GPUs "
            f"{','.join(self.gpus)} of {self.docker_url}"
        )
        if self.too_large:
            line += f"; resource class(es) {', '.join(self.too_large)} need more GPUs and never run there"
        return line


def _current(api: AirflowApi, name: str) -> dict[str, Any] | None:
    from airflow_wmltrain.service.api import ApiNotFoundError, quote

    try:
        found = api.call("GET", f"/pools/{quote(name)}")
    except ApiNotFoundError:
        return None
    return found if isinstance(found, dict) else None


def _update(api: AirflowApi, name: str, slots: int) -> None:
    from airflow_wmltrain.service.api import quote

    api.call(
        "PATCH",
        f"/pools/{quote(name)}",
        params={"update_mask": ["slots", "include_deferred"]},
        body={"pool": name, "slots": slots, "include_deferred": True},  # Airflow 3.3 wants the name
        idempotent=True,
    )


def sync_pool(
    api: AirflowApi, name: str, host: HostGpus, *, settings: Settings, dry_run: bool = False, ahead: int = 0
) -> PoolChange:
    """Make the pool ``name`` have one slot per GPU of ``host`` (plus ``ahead``, see the module) and
    ``include_deferred=True``: create it, update its slots and ``include_deferred`` (its description
    stays), or leave it as it is.

    :raises ClientError: ``ahead`` is negative (``C100``, field ``--ahead``).
    :raises ApiError: the REST API refused or failed (``S200``).
    """
    from airflow_wmltrain.service.api import ApiConflictError

    if ahead < 0:
        raise ClientError(f"--ahead must be 0 or more, not {ahead}", field="--ahead")
    too_large = tuple(c for c, n in settings.resource_classes.items() if n > len(host.gpus))
    slots = len(host.gpus) + ahead
    current = _current(api, name)
    previous = None
    if current is None:
        action = CREATE
        if not dry_run:
            body = {
                "name": name,
                "slots": slots,
                "include_deferred": True,
                "description": f"GPUs of the Docker host {host.docker_url} (wmltrain pools)",
            }
            try:
                api.call("POST", "/pools", body=body)
            except ApiConflictError:  # created meanwhile (another `wmltrain pools`): set it as wanted
                _update(api, name, slots)
    elif int(current.get("slots", -2)) == slots and current.get("include_deferred") is True:
        action = UNCHANGED
    else:
        action = UPDATE
        previous = {"slots": current.get("slots"), "include_deferred": current.get("include_deferred")}
        if not dry_run:
            _update(api, name, slots)
    return PoolChange(
        name, host.docker_url, host.gpus, slots, True, action, previous, dry_run, too_large, ahead
    )


def sync_pools(
    api: AirflowApi,
    docker_urls: Sequence[str],
    *,
    settings: Settings,
    pattern: str | None = None,
    image: str | None = None,
    dry_run: bool = False,
    ahead: int = 0,
    shared: bool = False,
) -> list[PoolChange]:
    """Create or update the GPU pool of each Docker host (:func:`sync_pool`), or with ``shared`` one pool
    for all of them, its slots the sum of their GPUs: the pool of GPU hosts whose Celery workers share a
    queue (a task cannot choose its pool by the host it lands on; the workers' ``--concurrency`` and the
    operator's per-GPU leases keep each host within its GPUs).

    Every name and every host's GPUs are checked first: nothing is changed when one of them fails.

    :param api: the Airflow REST API.
    :param docker_urls: the Docker hosts (each gets its own pool).
    :param settings: the ``[wmltrain]`` settings (``gpu_ids``, ``resource_classes``).
    :param pattern: the pool name pattern (:func:`pool_names`).
    :param image: an image with ``nvidia-smi`` on the hosts, for ``auto`` without the daemon label.
    :param dry_run: only say what would change.
    :param ahead: slots beyond each host's GPUs (with ``shared``: beyond their sum), for runs staged ahead
        (see the module).
    :param shared: one pool (``pattern``, default :data:`DEFAULT_POOL`) for all the hosts.
    :return: what was done to each pool, in the order of ``docker_urls`` (``shared``: the one pool).
    """
    if shared:
        name = pool_names([", ".join(docker_urls)], pattern)[0]  # a plain name: no {host} to fill in
        pool_names(docker_urls, "{index}")  # each host given once
        hosts = [host_gpus(url, settings, image=image) for url in docker_urls]
        union = HostGpus(", ".join(docker_urls), tuple(gpu for host in hosts for gpu in host.gpus))
        change = sync_pool(api, name, union, settings=settings, dry_run=dry_run, ahead=ahead)
        largest = max(len(host.gpus) for host in hosts)  # a run's GPUs are on one host
        too_large = tuple(c for c, n in settings.resource_classes.items() if n > largest)
        return [replace(change, too_large=too_large)]
    names = pool_names(docker_urls, pattern)
    hosts = [host_gpus(url, settings, image=image) for url in docker_urls]
    return [
        sync_pool(api, name, host, settings=settings, dry_run=dry_run, ahead=ahead)
        for name, host in zip(names, hosts, strict=True)
    ]
