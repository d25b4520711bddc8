"""``TrainingDockerHook``: the one home of everything a training run asks of its Docker host.

The operator, the trigger, the halt path and the GPU allocator all go through it: the image check and
pull, the GPU inventory and leases, creating/starting/following/stopping/removing the run's container,
and reading what ``docker inspect`` says (:class:`ContainerOutcome`).  It is the Docker provider's
``DockerHook`` (its cached ``api_client``, TLS and registry login) with the parameters kept in a plain,
serialisable form (:meth:`TrainingDockerHook.to_dict`), so the trigger and the detached halter rebuild
the same hook — for the daemon the operator actually connected to, also when ``docker_url`` was a list.

A run has at most one container per daemon, named :func:`~airflow_wmltrain.runtime.labels.run_container_name`
and labelled with the task instance that owns it (dag, run, task, map index).  A name conflict on
create means "the run's container already exists": the caller re-attaches to it, never starts a second.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import shutil
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from airflow.providers.docker.hooks.docker import DockerHook
from docker import APIClient
from docker.constants import DEFAULT_TIMEOUT_SECONDS
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from requests.exceptions import ConnectionError as RequestsConnectionError
from requests.exceptions import ReadTimeout, RequestException

from airflow_wmltrain.errors import ImageMissingError, RunConflictError, ServerError
from airflow_wmltrain.lifecycle import TRAINING_LOG
from airflow_wmltrain.runtime import hardening, labels
from airflow_wmltrain.runtime.workspace import Workspace

if TYPE_CHECKING:
    from airflow_wmltrain.runtime.gpus import GpuAllocation
    from airflow_wmltrain.settings import Settings

#: Docker states in which a container may still run (and holds the GPUs of its label).
LIVE_STATES = frozenset({"created", "running", "restarting", "paused"})
#: Log lines quoted in a failure message, and the characters kept of each.
TAIL_LINES = 20
TAIL_LINE_CHARS = 1000
#: The longest log line kept as one line; a longer one (or output without line ends) is cut.
MAX_LINE_CHARS = 16 * 1024
#: How much of the training's output goes into the task log (the stored log has more).
TASK_LOG_BYTES = 16 * 1024 * 1024
#: How much of the training's output the stored log keeps from its start ...
STORED_LOG_BYTES = 128 * 1024 * 1024
#: ... and how many of its last lines, after a line saying how much was left out between.
STORED_TAIL_LINES = 2000
_STORED_LOG_NAME = TRAINING_LOG
#: How much of the training's output one look of the triggerer reads (the next look reads on).
LOOK_LOG_BYTES = 4 * 1024 * 1024
#: Room for the tar headers around a file read through the archive API.
_TAR_SLACK = 64 * 1024
#: Go's ``os.FileMode`` bits of what is not a regular file (the archive API's ``mode``): directory,
#: symlink, device, named pipe, socket, char device, irregular.
_NOT_REGULAR = (1 << 31) | (1 << 27) | (1 << 26) | (1 << 25) | (1 << 24) | (1 << 21) | (1 << 19)
#: A trigger event's container fields: (event key, ``ContainerOutcome`` attribute, type).
_EVENT_FIELDS: tuple[tuple[str, str, type], ...] = (
    ("container_id", "container_id", str),
    ("container_status", "status", str),
    ("exit_code", "exit_code", int),
    ("oom_killed", "oom_killed", bool),
    ("finished_at", "finished_at", str),
    ("docker_error", "error", str),
)
#: ``DockerHook.construct_tls_config`` argument ← the hook's TLS parameter.
_TLS_ARGUMENTS = (
    ("ca_cert", "tls_ca_cert"),
    ("client_cert", "tls_client_cert"),
    ("client_key", "tls_client_key"),
    ("verify", "tls_verify"),
    ("assert_hostname", "tls_hostname"),
    ("ssl_version", "tls_ssl_version"),
)


def _keep_daemon_tls(client: APIClient) -> None:
    """Verify a TLS daemon with the TLS parameters' CA (or not at all, ``tls_verify=False``) whatever the
    environment says: ``requests`` puts ``$REQUESTS_CA_BUNDLE`` / ``$CURL_CA_BUNDLE`` (set on many hosts and
    images to the system's bundle) in place of a session's own CA (psf/requests#3829), and a daemon whose
    certificate a private CA signed is then refused ("self-signed certificate in certificate chain").
    The environment's proxies still apply."""
    merge = client.merge_environment_settings

    def merged(url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        settings = merge(url, proxies, stream, verify, cert)
        if verify is None:  # no per-request choice: the session's, which TLSConfig set
            settings["verify"] = client.verify
        return settings

    client.merge_environment_settings = merged


class DockerHostError(ServerError):
    """The Docker host failed or refused an operation on a run's container (``S100``)."""


@dataclass(frozen=True)
class ContainerOutcome:
    """What ``docker inspect`` says of a training container: the one parser of its state.

    :param container_id: the container's id.
    :param status: Docker's state (``running``, ``exited``, ``dead``...).
    :param exit_code: the training process's exit status.
    :param oom_killed: the kernel killed it for lack of memory.
    :param finished_at: when it ended, as Docker says it.
    :param error: the daemon's own error for the container (e.g. it could not be started).
    :param labels: the container's labels (owner, GPUs).
    """

    container_id: str
    status: str
    exit_code: int = 0
    oom_killed: bool = False
    finished_at: str = ""
    error: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_inspect(cls, info: Mapping[str, Any]) -> ContainerOutcome:
        state = info.get("State") or {}
        return cls(
            container_id=str(info.get("Id") or ""),
            status=str(state.get("Status", "")),
            exit_code=int(state.get("ExitCode") or 0),
            oom_killed=bool(state.get("OOMKilled")),
            finished_at=str(state.get("FinishedAt") or ""),
            error=str(state.get("Error") or ""),
            labels=dict((info.get("Config") or {}).get("Labels") or {}),
        )

    def to_event(self) -> dict[str, Any]:
        """The trigger event's fields (plain JSON; labels are not sent)."""
        return {key: getattr(self, attr) for key, attr, _kind in _EVENT_FIELDS}

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> ContainerOutcome:
        """The outcome a trigger event carries (:meth:`to_event`).

        :raises ValueError: the event does not carry one.
        """
        try:
            return cls(**{attr: kind(event[key]) for key, attr, kind in _EVENT_FIELDS})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the event carries no container outcome ({exc})") from None

    @property
    def running(self) -> bool:
        """Whether it may still run (created, running, restarting, paused)."""
        return self.status in LIVE_STATES

    @property
    def ended(self) -> bool:
        """Whether it has ended for good (exited or dead); a container being removed has neither."""
        return self.status in ("exited", "dead")

    @property
    def gpus(self) -> tuple[str, ...]:
        from airflow_wmltrain.runtime.gpus import parse_gpu_ids

        return tuple(parse_gpu_ids(self.labels.get(labels.GPUS, "")))

    @property
    def succeeded(self) -> bool:
        return not self.running and self.exit_code == 0 and not self.oom_killed and not self.error

    def owner(self) -> dict[str, str]:
        """The task instance the container belongs to, from its labels."""
        return {key: self.labels.get(label, "") for key, label in labels.OWNER_LABELS.items()}

    def failure(self, tail: Iterable[str], *, mem_limit: object = None) -> str:
        """The C201 message: what ended the process, and the last lines it wrote."""
        if self.oom_killed:
            limit = f" (mem_limit {mem_limit})" if mem_limit else ""
            what = f"the training process was killed for lack of memory (out of memory{limit}); "
            what += "give the container more memory (mem_limit) or use a smaller batch size"
        elif self.error:
            what = f"the training container failed: {self.error}"
        elif self.exit_code > 128:
            signal = self.exit_code - 128
            what = f"the training process was killed by signal {signal} (exit status {self.exit_code})"
        else:
            what = f"the training process exited with status {self.exit_code}"
        lines = [line for line in tail if line.strip()]
        if lines:
            what += "; last log lines:\n" + "\n".join(lines)
        return what


def _lines(chunks: Iterable[bytes | str]) -> Iterator[str]:
    """The lines of a stream of output, none longer than :data:`MAX_LINE_CHARS` (a longer one is cut):
    the training writes what it likes, the worker holds at most one line of it at a time."""
    buffer = ""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in chunks:
        buffer += decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        *lines, buffer = buffer.split("\n")
        for line in lines:
            if len(line) <= MAX_LINE_CHARS:
                yield line.rstrip("\r")
                continue
            for start in range(0, len(line), MAX_LINE_CHARS):
                yield line[start : start + MAX_LINE_CHARS].rstrip("\r")
        while len(buffer) >= MAX_LINE_CHARS:
            yield buffer[:MAX_LINE_CHARS]
            buffer = buffer[MAX_LINE_CHARS:]
    buffer += decoder.decode(b"", final=True)
    if buffer:
        yield buffer.rstrip("\r")


def _tee(lines: Iterable[str], on_line: Callable[[str], None] | None) -> Iterator[str]:
    for line in lines:
        if on_line is not None:
            on_line(line)
        yield line


@dataclass(frozen=True)
class LogCursor:
    """Where a reader of a container's output stands: the time stamp of the last line it read, and how
    many lines of that very time stamp it read (Docker gives ``since`` to the second; lines share
    time stamps)."""

    seconds: int
    nanos: int
    count: int = 1

    @property
    def key(self) -> tuple[int, int]:
        return (self.seconds, self.nanos)

    @classmethod
    def parse(cls, stamp: str) -> LogCursor | None:
        """The cursor of a line's RFC 3339 time stamp (``2026-12-01T10:21:45.123456789Z``)."""
        from datetime import datetime, timezone

        whole, _, fraction = stamp.rstrip("Z").partition(".")
        if not fraction.isdigit() and fraction:
            return None
        try:
            moment = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
        except ValueError:
            return None
        return cls(int(moment.timestamp()), int((fraction or "0")[:9].ljust(9, "0")))

    def seen(self) -> LogCursor:
        """The cursor after one more line of its own time stamp."""
        return replace(self, count=self.count + 1)


class _ChunkReader(io.RawIOBase):
    """A file over a stream of chunks that never reads more than ``max_bytes`` of it."""

    def __init__(self, chunks: Iterable[bytes], *, max_bytes: int) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""
        self._left = max_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._buffer and self._left > 0:
            try:
                self._buffer = next(self._chunks)[: self._left]
            except StopIteration:
                break
            self._left -= len(self._buffer)
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        super().close()


def _left_out(count: int, where: str) -> str:
    return f"[wmltrain] {count} characters of the training's output left out of {where}"


def remove_container(client: APIClient, container_id: str) -> None:
    """Remove a container (forced), taking "already gone" and "removal in progress" as done."""
    try:
        client.remove_container(container_id, force=True)
    except NotFound:
        pass
    except APIError as exc:
        if getattr(exc, "status_code", None) != 409:
            raise


class TrainingDockerHook(DockerHook):
    """The Docker host of training runs.

    :param docker_url: the daemon's URL, or a list of them (the first that answers is used, and is then
        :attr:`docker_url`).
    :param docker_conn_id: an Airflow ``docker`` connection (registry login), or ``None``.
    :param api_version: the Engine API version, ``auto`` or ``None``.
    :param tls_ca_cert: path of the CA certificate.
    :param tls_client_cert: path of the client certificate.
    :param tls_client_key: path of the client key.
    :param tls_verify: verify the daemon's certificate.
    :param tls_hostname: the name to check the certificate against (or ``False``).
    :param tls_ssl_version: the TLS version.
    :param timeout: seconds before an API call times out.
    """

    hook_name = "Docker (wmltrain training host)"

    def __init__(
        self,
        *,
        docker_url: str | Sequence[str],
        docker_conn_id: str | None = None,
        api_version: str | None = None,
        tls_ca_cert: str | None = None,
        tls_client_cert: str | None = None,
        tls_client_key: str | None = None,
        tls_verify: bool = True,
        tls_hostname: str | bool | None = None,
        tls_ssl_version: str | None = None,
        timeout: int = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.docker_urls = [docker_url] if isinstance(docker_url, str) else list(docker_url)
        self.params: dict[str, Any] = {
            "docker_conn_id": docker_conn_id,
            "api_version": api_version,
            "tls_ca_cert": tls_ca_cert,
            "tls_client_cert": tls_client_cert,
            "tls_client_key": tls_client_key,
            "tls_verify": tls_verify,
            "tls_hostname": tls_hostname,
            "tls_ssl_version": tls_ssl_version,
            "timeout": timeout,
        }
        self.tls_config = DockerHook.construct_tls_config(
            **{argument: self.params[name] for argument, name in _TLS_ARGUMENTS}
        )
        super().__init__(
            docker_conn_id=docker_conn_id,
            base_url=self.docker_urls,
            version=api_version,
            tls=self.tls_config,
            timeout=timeout,
        )
        if self.tls_config:
            self.docker_urls = [self._redact_tls_schema(url) for url in self.docker_urls]
        self._connected_url: str | None = None

    # --- the connection -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The plain parameters (a trigger's kwargs, the halter's input), pinned to the daemon in use."""
        return {"docker_url": self.docker_url, **self.params}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingDockerHook:
        return cls(**dict(data))

    def pinned(self, docker_url: str) -> TrainingDockerHook:
        """The same parameters, for one daemon of :attr:`docker_urls` (the one a run lives on)."""
        return type(self)(docker_url=docker_url, **self.params)

    @property
    def docker_url(self) -> str:
        """The daemon in use: the one that answered (after :attr:`api_client`), else the first given."""
        return self._connected_url or self.docker_urls[0]

    @cached_property
    def api_client(self) -> APIClient:
        """The low-level client of the first daemon that answers (cached, like ``DockerHook``'s)."""
        failures = []
        for url in self.docker_urls:
            try:
                client = APIClient(
                    base_url=url,
                    version=self.params["api_version"],
                    tls=self.tls_config,
                    timeout=self.params["timeout"],
                )
                if self.tls_config:
                    _keep_daemon_tls(client)
                client.ping()
                if self.docker_conn_id:
                    self._DockerHook__login(client, self.get_connection(self.docker_conn_id))  # type: ignore[attr-defined]
            except APIError:
                raise
            except (DockerException, RequestException, OSError) as exc:  # unreachable: try the next
                failures.append(f"{url}: {exc}")
                continue
            self._connected_url = url
            self._client_created = True
            return client
        raise DockerHostError(f"no Docker host answered ({'; '.join(failures)})")

    @cached_property
    def daemon_id(self) -> str:
        """The daemon's own id (``docker info``'s ``ID``), empty when it gives none: which engine a run's
        container lives on, also where several hosts reach their engine by the same URL (every host's
        ``unix:///var/run/docker.sock``)."""
        return str(self.api_client.info().get("ID") or "")

    def close(self) -> None:
        """Drop the client (a failed one may hold a dead connection pool); the next use builds another."""
        client = self.__dict__.pop("api_client", None)
        if client is not None:
            client.close()

    # --- the image ------------------------------------------------------------------------------------

    def ensure_image(self, image: str, *, force_pull: bool, framework: str, log: Any) -> None:
        """Make sure ``image`` is on the host: inspect it, pull it when missing (or ``force_pull``).

        :raises ImageMissingError: neither there nor pullable (``S103``).
        """
        cli = self.api_client
        if not force_pull:
            try:
                cli.inspect_image(image)
                return
            except ImageNotFound:
                pass
        log.info("Pulling the image %s", image)
        try:
            for output in cli.pull(image, stream=True, decode=True):
                if isinstance(output, dict) and "status" in output and "id" not in output:
                    log.info("%s", output["status"])
        except (APIError, NotFound) as err:
            raise ImageMissingError(
                f"the image {image} of framework {framework} is not on the Docker host "
                f"{self.docker_url} and cannot be pulled ({err.explanation or err}); build or "
                "load it there (see images/), or map the framework to another image in "
                "[wmltrain] frameworks_file",
                field="model_definition.framework",
            ) from None

    # --- GPUs -----------------------------------------------------------------------------------------

    def has_nvidia_runtime(self, image: str, *, cache_dir: str | None = None) -> bool:
        from airflow_wmltrain.runtime import gpus

        return gpus.has_nvidia_runtime(
            self.api_client, image, docker_url=self.docker_url, cache_dir=cache_dir
        )

    def gpu_inventory(self, setting: str, *, image: str, cache_dir: str | None = None) -> list[str]:
        from airflow_wmltrain.runtime import gpus

        return gpus.gpu_inventory(
            self.api_client, setting, image=image, docker_url=self.docker_url, cache_dir=cache_dir
        )

    def try_allocate_gpus(self, training_id: str, count: int, **kwargs: Any) -> GpuAllocation:
        from airflow_wmltrain.runtime import gpus

        return gpus.try_allocate_gpus(
            self.api_client, training_id, count, docker_url=self.docker_url, **kwargs
        )

    def wait_for_gpus(self, training_id: str, count: int, **kwargs: Any) -> list[str]:
        from airflow_wmltrain.runtime import gpus

        return gpus.wait_for_gpus(self.api_client, training_id, count, docker_url=self.docker_url, **kwargs)

    def release_leases(self, training_id: str) -> list[str]:
        from airflow_wmltrain.runtime import gpus

        return gpus.release_leases(self.api_client, training_id)

    # --- the run's container --------------------------------------------------------------------------

    def find_run_container(
        self, training_id: str, owner: Mapping[str, Any] | None = None
    ) -> ContainerOutcome | None:
        """The run's container, or ``None`` when the run has none on this daemon.

        :param owner: the task instance asking (dag, run, task, map index): a container labelled with
            another one is refused, never handed over (``None``: the caller owns the run already).
        :raises RunConflictError: a container has the run's name but another training id, or belongs to
            another task instance.
        """
        name = labels.run_container_name(training_id)
        try:
            info: dict[str, Any] = self.api_client.inspect_container(name)
        except NotFound:
            return None
        found = ContainerOutcome.from_inspect(info)
        if found.labels.get(labels.TRAINING_ID) != training_id:
            raise RunConflictError(
                f"container {name} exists on the Docker host {self.docker_url} but does not belong to "
                f"{training_id}; remove it (docker rm) or choose another training id"
            )
        if owner is not None:
            labels.check_owner(training_id, owner, found.owner(), "the container")
        return found

    def inspect(self, container_id: str) -> ContainerOutcome:
        return ContainerOutcome.from_inspect(self.api_client.inspect_container(container_id))

    def wait_ended(self, container_id: str, timeout: float) -> ContainerOutcome | None:
        """Block up to ``timeout`` seconds until the container ends (Docker's ``/wait``); how it ended,
        or ``None`` when it still runs (or the host did not answer in time: look again later)."""
        if timeout <= 0:
            return None
        try:
            self.api_client.wait(container_id, timeout=timeout)
        except (ReadTimeout, RequestsConnectionError):
            return None
        outcome = self.inspect(container_id)
        return None if outcome.running else outcome

    def create_run_container(
        self, training_id: str, *, settings: Settings, **create: Any
    ) -> tuple[ContainerOutcome, bool]:
        """Create the run's container (named after ``training_id``), or find it when it already exists.

        The container is hardened first (:func:`~airflow_wmltrain.runtime.hardening.harden`): no host
        path but the run's workspace, no privilege, the ``[wmltrain] training_*`` limits.

        :param settings: the ``[wmltrain]`` settings (the hardening, the run's workspace).
        :param create: ``APIClient.create_container`` arguments (the name is set here; ``labels`` name the
            task instance that owns the run).
        :returns: the container, and whether this call created it (``False``: a container of the run
            was there already — another try of the same task instance made it: re-attach to it).
        :raises RunConflictError: the container there belongs to another task instance (left untouched).
        :raises ConfigurationError: ``create`` gives the container what the hardening refuses (``S001``).
        """
        create = hardening.harden(
            create,
            settings=settings,
            workspace_mounts=Workspace.for_run(settings.staging_dir, training_id).mounts(),
            host_memory=lambda: self.api_client.info().get("MemTotal"),
        )
        try:
            created = self.api_client.create_container(name=labels.run_container_name(training_id), **create)
        except APIError as err:
            if getattr(err, "status_code", None) != 409:
                raise
            mine = dict(create.get("labels") or {})
            owner = {key: mine.get(label, "") for key, label in labels.OWNER_LABELS.items()}
            existing = self.find_run_container(training_id, owner)
            if existing is None:  # removed between the conflict and the look: a transient race
                raise DockerHostError(
                    f"the Docker host {self.docker_url} reported a conflict creating the container of "
                    f"{training_id}, but it is gone; try again"
                ) from None
            return existing, False
        # Just created: its state and labels are known without asking the daemon again.
        return ContainerOutcome(str(created["Id"]), "created", labels=dict(create.get("labels") or {})), True

    def start(self, container_id: str) -> None:
        """Start a created container; on refusal it is removed.

        :raises NoNvidiaRuntimeError: the daemon has no NVIDIA runtime (``S100``).
        :raises DockerHostError: any other refusal.
        """
        from airflow_wmltrain.runtime import gpus

        try:
            self.api_client.start(container_id)
        except APIError as err:
            self.remove(container_id)
            if gpus.is_no_driver_error(err):
                raise gpus.no_nvidia_runtime_error(self.docker_url) from None
            raise DockerHostError(
                f"the Docker host {self.docker_url} could not start the training container: {err}"
            ) from None

    def follow_logs(
        self, container_id: str, log: Any, *, on_line: Callable[[str], None] | None = None
    ) -> None:
        """Copy the container's output into ``log``, line by line as it comes, until it stops.

        Only its first :data:`TASK_LOG_BYTES` go into ``log`` (then one line says so); the rest is read
        and dropped, so that a flood of output neither fills the task log nor the worker's memory.

        :param on_line: also given each line (all of them), e.g. to collect metrics.
        """
        stream = self.api_client.logs(container_id, stdout=True, stderr=True, stream=True, follow=True)
        self._to_log(_tee(_lines(stream), on_line), log)

    def log_lines_since(
        self, container_id: str, cursor: LogCursor | None, *, max_bytes: int = LOOK_LOG_BYTES
    ) -> tuple[list[str], LogCursor | None]:
        """The container's output after ``cursor`` (a look from the triggerer): at most about
        ``max_bytes`` of it (the next look reads on), and the cursor after the last line given.

        Asks Docker for the lines since the cursor's second, with their timestamps, and drops those
        the cursor has seen.
        """
        since = cursor.seconds if cursor is not None else None
        stream = self.api_client.logs(
            container_id, stdout=True, stderr=True, stream=True, follow=False, timestamps=True, since=since
        )
        lines: list[str] = []
        read = repeats = 0  # repeats: lines of the cursor's own time stamp met in this read
        start = cursor
        try:
            for line in _lines(stream):
                stamp, _, text = line.partition(" ")
                at = LogCursor.parse(stamp)
                if at is None:  # a piece of a line cut at MAX_LINE_CHARS: it has no time stamp
                    continue
                if start is not None and at.key <= start.key:
                    if at.key < start.key:
                        continue
                    repeats += 1
                    if repeats <= start.count:  # read before
                        continue
                cursor = cursor.seen() if cursor is not None and cursor.key == at.key else at
                lines.append(text)
                read += len(line) + 1
                if read >= max_bytes:
                    break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return lines, cursor

    def read_file(self, container_id: str, path: str, *, offset: int, limit: int) -> bytes | None:
        """Up to ``limit`` bytes from ``offset`` of the file ``path`` of a container, through the Docker
        API (the triggerer may be on another machine than the run's workspace): only a regular file
        (the archive's one member, a regular file of that name — never a link, a FIFO or a device), and
        never more than ``offset + limit`` bytes of it read.

        :returns: the bytes, or ``None`` when there is no such regular file.
        """
        try:
            stream, info = self.api_client.get_archive(container_id, path)
        except NotFound:
            return None
        mode = int(info.get("mode") or 0) if isinstance(info, Mapping) else _NOT_REGULAR
        if mode & _NOT_REGULAR or info.get("linkTarget"):
            return None
        reader = _ChunkReader(stream, max_bytes=offset + limit + _TAR_SLACK)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                member = tar.next()
                if member is None or not member.isreg() or member.name != PurePosixPath(path).name:
                    return None
                handle = tar.extractfile(member)
                if handle is None:
                    return None
                skip = offset
                while skip > 0:  # what was read before: read through, never held
                    skipped = len(handle.read(min(skip, 1024 * 1024)))
                    if not skipped:
                        return b""
                    skip -= skipped
                return handle.read(limit)
        except (tarfile.TarError, OSError, EOFError):
            return None
        finally:
            reader.close()

    def log_lines(self, container_id: str) -> Iterator[str]:
        """The container's output so far, line by line (streamed, not held in memory): its first
        :data:`TASK_LOG_BYTES`, then one line saying how much was left out (the task log's copy)."""
        written = left_out = 0
        for line in self._output(container_id):
            if written < TASK_LOG_BYTES:
                written += len(line) + 1
                yield line
            else:
                left_out += len(line) + 1
        if left_out:
            yield _left_out(left_out, f"the task log (the stored {_STORED_LOG_NAME} has more)")

    @staticmethod
    def _to_log(lines: Iterable[str], log: Any) -> None:
        written = left_out = 0
        for line in lines:
            if written < TASK_LOG_BYTES:
                written += len(line) + 1
                log.info("%s", line)
                if written >= TASK_LOG_BYTES:
                    log.warning(
                        "[wmltrain] the task log shows no more of the training's output "
                        "(over %d characters); the stored %s has more",
                        TASK_LOG_BYTES,
                        _STORED_LOG_NAME,
                    )
            else:
                left_out += len(line) + 1
        if left_out:
            log.warning("%s", _left_out(left_out, "the task log"))

    def _output(self, container_id: str) -> Iterator[str]:
        return _lines(self.api_client.logs(container_id, stdout=True, stderr=True, stream=True, follow=False))

    def save_logs(
        self, container_id: str, path: Path, *, on_line: Callable[[str], None] | None = None
    ) -> list[str]:
        """Write the container's output to ``path``; its last :data:`TAIL_LINES` lines (for a failure
        message: each cut to :data:`TAIL_LINE_CHARS`).

        The file keeps the output's first :data:`STORED_LOG_BYTES` characters and its last
        :data:`STORED_TAIL_LINES` lines, with a line between saying how much was left out: a flood of
        output bounds neither the file nor the worker's memory.  ``path`` should lie in a folder only
        the worker writes; whatever is there under that name anyway (a link to a file of the worker, a
        FIFO, a folder) is removed, never followed, and the file is created afresh.

        :param on_line: also given each line (all of them), e.g. to collect metrics.
        """
        last: deque[str] = deque(maxlen=TAIL_LINES)
        tail: deque[str] = deque(maxlen=STORED_TAIL_LINES)  # the lines after the first part
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        written = left_out = 0
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as out:
            for line in _tee(self._output(container_id), on_line):
                last.append(line)
                if written < STORED_LOG_BYTES:
                    out.write(line + "\n")
                    written += len(line) + 1
                    continue
                if len(tail) == tail.maxlen:
                    left_out += len(tail[0]) + 1
                tail.append(line)
            if left_out:
                out.write(_left_out(left_out, "this file; its last lines follow") + "\n")
            out.writelines(line + "\n" for line in tail)
        return [line if len(line) <= TAIL_LINE_CHARS else line[:TAIL_LINE_CHARS] + " [...]" for line in last]

    def wait(self, container_id: str) -> ContainerOutcome:
        """Block until the container stops; how it ended."""
        self.api_client.wait(container_id)
        return self.inspect(container_id)

    def copy_out(self, container_id: str, source: str, dest: Path) -> None:
        """Copy a directory out of a (stopped) container into ``dest`` through the Docker API."""
        stream, _stat = self.api_client.get_archive(container_id, source)
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=dest) as archive:  # results can be large: never in memory
            for chunk in stream:
                archive.write(chunk)
            archive.seek(0)
            _extract(archive, dest)

    def stop(self, container_id: str, *, grace: int) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (Docker's ``stop``); a gone container is fine."""
        with contextlib.suppress(NotFound):
            self.api_client.stop(container_id, timeout=grace)

    def remove(self, container_id: str) -> None:
        """Remove the container (forced); a gone container is fine."""
        remove_container(self.api_client, container_id)


def _extract(archive: IO[bytes], dest: Path) -> None:
    with tarfile.open(fileobj=archive) as tar:
        # The archive's top folder is the basename of ``source``: strip it.
        members = []
        for member in tar.getmembers():
            _top, _sep, rest = member.name.partition("/")
            if not rest or not (member.isfile() or member.isdir()):
                continue
            member.name = rest
            members.append(member)
        tar.extractall(dest, members=members, filter="data")
