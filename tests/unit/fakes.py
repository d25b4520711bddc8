"""Stand-ins for the services a training run talks to, so that unit tests need none.

* :class:`FakeDocker`: a small, stateful Docker Engine API server on loopback (a real HTTP server that
  ``docker.APIClient`` talks to as to a daemon): containers by id and name, create (409 on a taken name),
  start, stop, wait, inspect, remove, logs (the multiplexed stream format of a container without a TTY),
  archive (``docker cp`` out), images, ``/info`` (with the ``wmltrain.gpus`` daemon label), the container
  list with label filters,
  ``/_ping`` and ``/version``.  Tests script how run containers end (exit code, OOM, still running),
  what they write into their results directory, and hooks ("on create, call this").  It can also answer
  ``GET /containers/<id>/json`` from a script of raw answers (the trigger tests' 5xx/404/400 sequences).
* :class:`MemoryStore`: an in-memory :class:`~airflow_wmltrain.storage.base.ObjectStore` (one bucket),
  with :class:`MemoryStores` to hand them out in place of ``open_store``, and :func:`fake_stage` /
  :func:`fake_upload_tree` in place of the transfer engine's staging and upload (which sign real HTTP
  requests; they are tested against real stores elsewhere).
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import os
import re
import ssl
import stat as stat_module
import struct
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from airflow_wmltrain.errors import ResultsStoreError
from airflow_wmltrain.runtime import labels
from airflow_wmltrain.runtime.workspace import CONTAINER_DIRS
from airflow_wmltrain.storage.base import ObjectInfo, ObjectStore
from airflow_wmltrain.storage.staging import StagingResult
from airflow_wmltrain.storage.transfer import TransferError
from airflow_wmltrain.storage.upload import UploadResult, _is_reserved

API_VERSION = "1.43"
NOT_STARTED = "0001-01-01T00:00:00Z"
_VERSION_PREFIX = re.compile(r"^/v[0-9.]+(?=/)")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def frame(data: bytes, stream: int = 1) -> bytes:
    """One frame of Docker's multiplexed log stream (``stream`` 1 is stdout, 2 stderr)."""
    return struct.pack(">BxxxL", stream, len(data)) + data


@dataclass
class RunScript:
    """How a run container behaves once started.

    :param exit_code: its exit status.
    :param oom_killed: the kernel killed it for lack of memory.
    :param running: it keeps running after start, until :meth:`FakeDocker.finish` or a stop.
    :param log: what it writes (stdout).
    :param files: files it writes into its ``$RESULT_DIR`` (the bind mount's source), relative names.
    :param error: the daemon's error for the container (``State.Error``).
    """

    exit_code: int = 0
    oom_killed: bool = False
    running: bool = False
    log: str = "epoch 1\nepoch 2\ndone\n"
    files: Mapping[str, str | bytes] = field(default_factory=dict)
    error: str = ""


@dataclass
class FakeContainer:
    id: str
    name: str
    image: str
    labels: dict[str, str]
    body: dict[str, Any]
    script: RunScript
    status: str = "created"
    exit_code: int = 0
    oom_killed: bool = False
    error: str = ""
    log: bytes = b""
    started_at: str = NOT_STARTED
    finished_at: str = NOT_STARTED
    created: float = field(default_factory=time.time)
    starts: int = 0
    stops: int = 0

    @property
    def role(self) -> str:
        return self.labels.get(labels.ROLE, "")

    def mount_source(self, target: str) -> str | None:
        for mount in (self.body.get("HostConfig") or {}).get("Mounts") or []:
            if mount.get("Target") == target:
                return str(mount.get("Source"))
        return None

    def inspect(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Name": "/" + self.name,
            "Created": datetime.fromtimestamp(self.created, timezone.utc).isoformat(),
            "State": {
                "Status": self.status,
                "Running": self.status == "running",
                "ExitCode": self.exit_code,
                "OOMKilled": self.oom_killed,
                "Error": self.error,
                "StartedAt": self.started_at,
                "FinishedAt": self.finished_at,
            },
            "Config": {"Image": self.image, "Labels": dict(self.labels), "Tty": False},
            "HostConfig": self.body.get("HostConfig") or {},
        }

    def summary(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Names": ["/" + self.name],
            "Image": self.image,
            "Labels": dict(self.labels),
            "State": self.status,
            "Status": self.status,
            "Created": int(self.created),
        }


class DockerError(Exception):
    """Raised by a hook to make the fake answer an HTTP error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Hook = Callable[["FakeDocker", "FakeContainer | None", dict[str, Any]], None]


class FakeDocker:
    """A stand-in Docker Engine API server (see the module's doc).

    :param gpus: the daemon label ``wmltrain.gpus`` (``None``: no such label).
    :param nvidia: whether the daemon accepts GPU device requests (else it refuses them on start, as a
        host without the NVIDIA runtime does).
    :param images: images present on the host.
    :param pullable: images a pull can fetch.
    :param tls: serve the API over TLS with this server context (a remote engine's ``tcp://`` + TLS).
    :param inspect_script: raw answers ``(status, body)`` to ``GET /containers/<id>/json`` (the last
        repeats), instead of the containers' state (the trigger tests).
    """

    def __init__(
        self,
        *,
        gpus: str | None = "0,1,2,3",
        nvidia: bool = True,
        images: tuple[str, ...] = ("busybox:fake",),
        pullable: tuple[str, ...] = (),
        inspect_script: list[tuple[int, Any]] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.gpus = gpus
        self.nvidia = nvidia
        #: ``docker info``'s ``ID``: which engine this is (several may share a URL on different machines).
        self.daemon_id = "FAKE:" + uuid.uuid4().hex.upper()
        self.images = set(images)
        self.pullable = set(pullable)
        self.inspect_script = list(inspect_script) if inspect_script is not None else None
        self.containers: dict[str, FakeContainer] = {}
        self.run_script = RunScript()
        #: Called with (fake, None, create body + ``name``) before a create looks at the name (a hook may
        #: create a conflicting container there), and with (fake, container, body) once it is registered
        #: (before the reply), and on start (before it runs).
        self.before_create: list[Hook] = []
        self.after_create: list[Hook] = []
        self.on_start: list[Hook] = []
        self.requests: list[tuple[str, str]] = []
        self.created: list[str] = []  # names of the containers created, in order (leases, probes too)
        self.started: list[str] = []  # ids of the containers started, in order
        self.started_names: list[str] = []
        self.stopped: list[tuple[str, int | None]] = []
        self.removed: list[str] = []
        self.inspects = 0
        #: The longest a ``/wait`` or a followed log blocks on a container that does not end (seconds).
        self.max_block = 60.0
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._ids = itertools.count(1)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        if tls is not None:  # dockerd --tlsverify: TLS, and the client's certificate checked by ``tls``
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.url = f"tcp://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    # --- lifecycle --------------------------------------------------------------------------------------

    def __enter__(self) -> FakeDocker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.changed:  # release anyone blocked in /wait or a followed log
            for container in self.containers.values():
                if container.status == "running":
                    self._exit(container, 137)
        self.server.shutdown()
        self.server.server_close()

    # --- what tests do --------------------------------------------------------------------------------

    def add_container(
        self,
        name: str,
        *,
        container_labels: Mapping[str, str],
        status: str = "running",
        exit_code: int = 0,
        oom_killed: bool = False,
        log: str = "",
        image: str = "busybox:fake",
        script: RunScript | None = None,
        body: dict[str, Any] | None = None,
        container_id: str | None = None,
    ) -> FakeContainer:
        """A container already on the host (created by "someone else")."""
        with self.changed:
            container = FakeContainer(
                id=container_id or self._new_id(),
                name=name,
                image=image,
                labels=dict(container_labels),
                body=body or {},
                script=script or RunScript(running=status == "running"),
                status=status,
                exit_code=exit_code,
                oom_killed=oom_killed,
                log=log.encode(),
            )
            if status != "created":
                container.started_at = _now()
            if status == "exited":
                container.finished_at = _now()
            self.containers[container.id] = container
            self.changed.notify_all()
            return container

    @property
    def stops(self) -> list[str]:
        """The paths (with the query) of the stop requests received."""
        with self.lock:
            return [path for method, path in self.requests if method == "POST" and "/stop" in path]

    def find(self, ref: str) -> FakeContainer | None:
        """A container by id, id prefix or name (with or without the leading ``/``)."""
        ref = ref.lstrip("/")
        with self.lock:
            if ref in self.containers:
                return self.containers[ref]
            for container in self.containers.values():
                if container.name == ref:
                    return container
            if len(ref) >= 4:
                matches = [c for c in self.containers.values() if c.id.startswith(ref)]
                if len(matches) == 1:
                    return matches[0]
        return None

    def run_containers(self) -> list[FakeContainer]:
        with self.lock:
            return [c for c in self.containers.values() if c.role == labels.ROLE_RUN]

    def finish(self, ref: str, *, exit_code: int | None = None, oom_killed: bool | None = None) -> None:
        """End a running container (as its process exiting would)."""
        with self.changed:
            container = self.find(ref)
            assert container is not None, ref
            if oom_killed is not None:
                container.script.oom_killed = oom_killed
            self._exit(
                container, container.script.exit_code if exit_code is None else exit_code, finished=True
            )

    # --- state changes (under the lock) ---------------------------------------------------------------

    def _new_id(self) -> str:
        return hashlib.sha256(f"fake-{next(self._ids)}-{id(self)}".encode()).hexdigest()

    def _exit(self, container: FakeContainer, code: int, *, finished: bool = False) -> None:
        container.status = "exited"
        container.exit_code = code
        if finished:
            container.oom_killed = container.script.oom_killed
            container.error = container.script.error
        container.finished_at = _now()
        self.changed.notify_all()

    def _start(self, container: FakeContainer) -> None:
        container.starts += 1
        self.started.append(container.id)
        self.started_names.append(container.name)
        container.started_at = _now()
        container.status = "running"
        script = container.script
        container.log += script.log.encode()
        results = container.mount_source(CONTAINER_DIRS["RESULT_DIR"])
        if results is not None:
            for name, content in script.files.items():
                path = Path(results, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content.encode() if isinstance(content, str) else content)
        if container.role != labels.ROLE_RUN:  # probes exit at once, successfully
            self._exit(container, 0)
        elif not script.running:
            self._exit(container, script.exit_code, finished=True)
        self.changed.notify_all()

    # --- the HTTP side --------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def reply(self, status: int, body: Any = None) -> None:
                if body is None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                ctype = "application/json" if not isinstance(body, bytes) else "text/plain"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def error(self, status: int, message: str) -> None:
                self.reply(status, {"message": message})

            def route(self, method: str) -> None:
                parts = urlsplit(self.path)
                path = _VERSION_PREFIX.sub("", parts.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                body: Any = None
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    raw = self.rfile.read(length)
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        body = raw
                with fake.lock:
                    fake.requests.append((method, self.path))
                try:
                    fake._dispatch(self, method, path, query, body)
                except DockerError as err:
                    self.error(err.status, err.message)

            def do_GET(self) -> None:
                self.route("GET")

            def do_POST(self) -> None:
                self.route("POST")

            def do_DELETE(self) -> None:
                self.route("DELETE")

            def do_HEAD(self) -> None:
                self.route("HEAD")

        return Handler

    def _container_or_404(self, ref: str) -> FakeContainer:
        container = self.find(unquote(ref))
        if container is None:
            raise DockerError(404, f"No such container: {unquote(ref)}")
        return container

    def _dispatch(self, h: Any, method: str, path: str, query: dict[str, str], body: Any) -> None:
        if path == "/_ping":
            h.reply(200, b"OK")
            return
        if path == "/version":
            h.reply(200, {"ApiVersion": API_VERSION, "MinAPIVersion": "1.12", "Version": "24.0.0-fake"})
            return
        if path == "/info":
            daemon_labels = [f"{labels.DAEMON_GPUS}={self.gpus}"] if self.gpus is not None else []
            h.reply(
                200,
                {"ID": self.daemon_id, "Name": "fake-docker", "Labels": daemon_labels, "SystemTime": _now()},
            )
            return
        if path.startswith("/images/") and path.endswith("/json") and method == "GET":
            image = unquote(path[len("/images/") : -len("/json")])
            if image in self.images:
                h.reply(
                    200, {"Id": "sha256:" + hashlib.sha256(image.encode()).hexdigest(), "RepoTags": [image]}
                )
            else:
                h.error(404, f"No such image: {image}")
            return
        if path == "/images/create" and method == "POST":
            image = query.get("fromImage", "") + (":" + query["tag"] if query.get("tag") else "")
            if image not in self.pullable:
                h.error(404, f"pull access denied for {image}, repository does not exist")
                return
            self.images.add(image)
            h.reply(200, json.dumps({"status": f"Downloaded newer image for {image}"}).encode() + b"\n")
            return
        if path == "/containers/json" and method == "GET":
            filters = json.loads(query.get("filters") or "{}")
            wanted = filters.get("label") or []
            if isinstance(wanted, dict):
                wanted = [k for k, v in wanted.items() if v]
            with self.lock:
                found = [
                    c.summary()
                    for c in self.containers.values()
                    if (query.get("all") in ("1", "true", "True") or c.status == "running")
                    and all(_label_matches(c.labels, item) for item in wanted)
                ]
            h.reply(200, found)
            return
        if path == "/containers/create" and method == "POST":
            self._create(h, query.get("name", ""), body or {})
            return
        match = re.fullmatch(r"/containers/([^/]+)(?:/([a-z]+))?", path)
        if match is None:
            h.error(404, f"page not found: {method} {path}")
            return
        ref, action = match.group(1), match.group(2) or ""
        if method == "GET" and action == "json":
            self._inspect(h, ref)
        elif method == "POST" and action == "start":
            self._start_request(h, ref)
        elif method == "POST" and action == "stop":
            container = self._container_or_404(ref)
            with self.changed:
                container.stops += 1
                self.stopped.append((container.id, int(query["t"]) if "t" in query else None))
                if container.status != "running":
                    h.reply(304)
                    return
                self._exit(container, 143)
            h.reply(204)
        elif method == "POST" and action == "wait":
            container = self._container_or_404(ref)
            deadline = time.monotonic() + self.max_block
            with self.changed:
                while container.status in ("running", "restarting") and time.monotonic() < deadline:
                    self.changed.wait(0.5)
                code = container.exit_code
            h.reply(200, {"StatusCode": code, "Error": None})
        elif method == "GET" and action == "archive":
            self._archive(h, self._container_or_404(ref), query.get("path", ""))
        elif method == "GET" and action == "logs":
            self._logs(
                h,
                ref,
                follow=query.get("follow") in ("1", "true", "True"),
                timestamps=query.get("timestamps") in ("1", "true", "True"),
                since=int(float(query.get("since") or 0)),
            )
        elif method == "DELETE" and action == "":
            container = self._container_or_404(ref)
            with self.changed:
                if container.status == "running" and query.get("force") not in ("1", "true", "True"):
                    h.error(409, "You cannot remove a running container: stop it or force the removal")
                    return
                del self.containers[container.id]
                self.removed.append(container.id)
                self.changed.notify_all()
            h.reply(204)
        else:
            h.error(404, f"page not found: {method} {path}")

    def _inspect(self, h: Any, ref: str) -> None:
        with self.lock:
            self.inspects += 1
            if self.inspect_script is not None:
                status, body = (
                    self.inspect_script.pop(0) if len(self.inspect_script) > 1 else self.inspect_script[0]
                )
                h.reply(status, body)
                return
            h.reply(200, self._container_or_404(ref).inspect())

    def _create(self, h: Any, name: str, body: dict[str, Any]) -> None:
        for hook in list(self.before_create):
            hook(self, None, {**body, "name": name})
        with self.changed:
            image = str(body.get("Image") or "")
            if name and self.find(name) is not None:
                h.error(
                    409,
                    f'Conflict. The container name "/{name}" is already in use by container '
                    f'"{self.find(name).id}". You have to remove (or rename) that container to be '  # type: ignore[union-attr]
                    "able to reuse that name.",
                )
                return
            if image not in self.images:
                h.error(404, f"No such image: {image}")
                return
            container_labels = dict(body.get("Labels") or {})
            container = FakeContainer(
                id=self._new_id(),
                name=name or f"fake_{next(self._ids)}",
                image=image,
                labels=container_labels,
                body=body,
                script=RunScript(**vars(self.run_script)),
            )
            self.containers[container.id] = container
            self.created.append(container.name)
            self.changed.notify_all()
        for hook in list(self.after_create):
            hook(self, container, body)
        h.reply(201, {"Id": container.id, "Warnings": []})

    def _start_request(self, h: Any, ref: str) -> None:
        container = self._container_or_404(ref)
        for hook in list(self.on_start):
            hook(self, container, container.body)
        with self.changed:
            if container.status == "running":
                h.reply(304)
                return
            requests = (container.body.get("HostConfig") or {}).get("DeviceRequests") or []
            if requests and not self.nvidia:
                h.error(500, 'could not select device driver "" with capabilities: [[gpu]]')
                return
            self._start(container)
        h.reply(204)

    def _stamped_logs(self, h: Any, container: FakeContainer, since: int) -> None:
        with self.lock:
            lines = container.log.decode().splitlines()
        body = b"".join(
            f"{stamp(container, i)} {line}\n".encode()
            for i, line in enumerate(lines)
            if int(container.created) + i // 1000 >= since
        )
        h.send_response(200)
        h.send_header("Content-Type", "application/vnd.docker.multiplexed-stream")
        h.send_header("Content-Length", str(len(body) + 8 if body else 0))
        h.end_headers()
        if body:
            h.wfile.write(frame(body))

    def _file_archive(self, h: Any, container: FakeContainer, source: str) -> bool:
        """``docker cp`` of one file of a mounted folder: a tar of it alone, as Docker sends it (a link
        as a link, with ``linkTarget`` in the stat; a FIFO as a FIFO); ``False`` when it is not one."""
        parent = container.mount_source(str(PurePosixPath(source).parent))
        if parent is None:
            return False
        path = Path(parent, PurePosixPath(source).name)
        if not path.is_symlink() and not path.exists():
            h.error(404, f"Could not find the file {source} in container {container.id}")
            return True
        info = tarfile.TarInfo(path.name)
        mode, link, data = 0o644, "", b""
        if path.is_symlink():
            info.type, link = tarfile.SYMTYPE, os.readlink(path)
            info.linkname, mode = link, 0o777 | (1 << 27)
        elif stat_module.S_ISFIFO(path.lstat().st_mode):
            info.type, mode = tarfile.FIFOTYPE, 0o644 | (1 << 25)
        elif path.is_dir():
            return False
        else:
            data = path.read_bytes()
            info.size = len(data)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.addfile(info, io.BytesIO(data) if data else None)
        header = {"name": path.name, "size": len(data), "mode": mode, "mtime": _now(), "linkTarget": link}
        body = buffer.getvalue()
        h.send_response(200)
        h.send_header("Content-Type", "application/x-tar")
        h.send_header("X-Docker-Container-Path-Stat", base64.b64encode(json.dumps(header).encode()).decode())
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        return True

    def _archive(self, h: Any, container: FakeContainer, source: str) -> None:
        """``docker cp`` out: a tar of ``source`` (its top folder named after it).  The bind mount's
        directory when it has one, else the files its script writes (``$RESULT_DIR``) or nothing."""
        if self._file_archive(h, container, source):
            return
        top = PurePosixPath(source).name or "root"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            folder = tarfile.TarInfo(top)
            folder.type, folder.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(folder)
            mounted = container.mount_source(source)
            files: dict[str, bytes] = {}
            if mounted is not None and Path(mounted).is_dir():
                for path in sorted(Path(mounted).rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        files[path.relative_to(mounted).as_posix()] = path.read_bytes()
            elif source == CONTAINER_DIRS["RESULT_DIR"]:
                files = {
                    k: v.encode() if isinstance(v, str) else v for k, v in container.script.files.items()
                }
            for name, data in files.items():
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        stat = {"name": top, "size": 0, "mode": 2147484141, "mtime": _now(), "linkTarget": ""}
        data = buffer.getvalue()
        h.send_response(200)
        h.send_header("Content-Type", "application/x-tar")
        h.send_header("X-Docker-Container-Path-Stat", base64.b64encode(json.dumps(stat).encode()).decode())
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _logs(self, h: Any, ref: str, *, follow: bool, timestamps: bool = False, since: int = 0) -> None:
        container = self._container_or_404(ref)
        if timestamps:  # each line stamped (a millisecond apart from the container's creation), no follow
            self._stamped_logs(h, container, since)
            return
        h.send_response(200)
        h.send_header("Content-Type", "application/vnd.docker.multiplexed-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        sent = 0
        deadline = time.monotonic() + self.max_block  # a container that never ends does not hang a test
        while True:
            with self.changed:
                data = container.log[sent:]
                sent += len(data)
                done = (
                    not follow
                    or container.status not in ("running", "restarting", "created")
                    or time.monotonic() > deadline
                )
                if not data and not done:
                    self.changed.wait(0.2)
                    continue
            if data:
                h.wfile.write(frame(data))
                h.wfile.flush()
            if done:
                with self.lock:
                    rest = container.log[sent:]
                if rest:
                    h.wfile.write(frame(rest))
                break
        h.close_connection = True


def stamp(container: FakeContainer, index: int) -> str:
    """The time stamp of the ``index``-th line of a container's log (RFC 3339, nanoseconds)."""
    base = int(container.created)
    nanos = index * 1_000_000
    moment = datetime.fromtimestamp(base + nanos // 1_000_000_000, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos % 1_000_000_000:09d}Z"


def _label_matches(container_labels: Mapping[str, str], item: str) -> bool:
    key, sep, value = item.partition("=")
    if not sep:
        return key in container_labels
    return container_labels.get(key) == value


# --- the object store -----------------------------------------------------------------------------------


class MemoryStore(ObjectStore):
    """One bucket in memory: the small requests (``GET``/``PUT``/``HEAD``/``DELETE``) and listings.

    :attr:`down` makes every request fail as an unreachable store does (a transient
    ``TransferError``); :attr:`fail` does the same for the requests it returns ``True`` for.
    """

    kind = "memory"
    min_part_size = 5 * 1024 * 1024

    def __init__(self, bucket: str, *, exists: bool = True) -> None:
        super().__init__(bucket)
        self.objects: dict[str, bytes] = {}
        self.content_types: dict[str, str] = {}
        self.exists = exists
        self.down = False
        self.fail: Callable[[str, str], bool] | None = None
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return "memory://fake-store"

    def _check(self, method: str, key: str) -> None:
        if self.down or (self.fail is not None and self.fail(method, key)):
            raise TransferError(f"{method} {self.describe(key)}: connection refused", transient=True)

    def request(
        self,
        method: str,
        key: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        missing_ok: bool = False,
    ) -> tuple[int, Mapping[str, str], bytes]:
        with self.lock:
            self.requests.append((method, key))
        self._check(method, key)
        if not self.exists:
            if missing_ok:
                return 404, {}, b""
            raise TransferError(f"{method} {self.describe(key)}: HTTP 404", transient=False, status=404)
        if key == "":
            return 200, {}, b""
        with self.lock:
            if method == "PUT":
                data = body or b""
                self.objects[key] = data
                self.content_types[key] = dict(headers or {}).get("content-type", "")
                return 200, {"etag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'}, b""
            if method == "DELETE":
                self.objects.pop(key, None)
                return 204, {}, b""
            if key in self.objects:
                data = self.objects[key]
                return 200, {"content-length": str(len(data))}, b"" if method == "HEAD" else data
        if missing_ok:
            return 404, {}, b""
        raise TransferError(f"{method} {self.describe(key)}: HTTP 404", transient=False, status=404)

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        self._check("GET", prefix)
        with self.lock:
            items = sorted((k, v) for k, v in self.objects.items() if k.startswith(prefix))
        for key, data in items:
            yield ObjectInfo.from_etag(key, len(data), hashlib.md5(data, usedforsecurity=False).hexdigest())

    def integrity_headers(self, md5: bytes) -> dict[str, str]:
        return {}

    def keys(self, prefix: str = "") -> set[str]:
        with self.lock:
            return {k for k in self.objects if k.startswith(prefix)}

    def json(self, key: str) -> Any:
        with self.lock:
            return json.loads(self.objects[key])

    # The transfer engine's signed requests are not served: staging and upload are stubbed.
    def sign(self, method: str, key: str, **kwargs: Any) -> Any:
        raise NotImplementedError(
            "MemoryStore serves no signed HTTP requests (use fake_stage/fake_upload_tree)"
        )

    def start_multipart(self, key: str) -> str:
        raise NotImplementedError

    def sign_part(self, key: str, upload_id: str, number: int, **kwargs: Any) -> Any:
        raise NotImplementedError

    def complete_multipart(self, key: str, upload_id: str, parts: Any) -> str:
        raise NotImplementedError

    def abort_multipart(self, key: str, upload_id: str) -> None:
        raise NotImplementedError


class MemoryStores:
    """The buckets of an in-memory object store, handed out in place of ``open_store(reference)``."""

    def __init__(self) -> None:
        self.buckets: dict[str, MemoryStore] = {}

    def __getitem__(self, bucket: str) -> MemoryStore:
        if bucket not in self.buckets:
            self.buckets[bucket] = MemoryStore(bucket)
        return self.buckets[bucket]

    def open_store(self, reference: Any, **_: Any) -> MemoryStore:
        return self[reference.bucket]


def fake_stage(store: ObjectStore, dest: Path, *, prefix: str = "", **_: Any) -> StagingResult:
    """Copy the objects under ``prefix`` into ``dest`` (stands in for :func:`staging.stage`)."""
    files = size = 0
    for info in store.list_objects(prefix):
        path = Path(dest, info.key[len(prefix) :].lstrip("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        data = store.get_bytes(info.key)
        path.write_bytes(data)
        files, size = files + 1, size + len(data)
    return StagingResult(
        files=files, bytes=size, seconds=0.0, from_cache=0, fetched_files=files, fetched_bytes=size
    )


def fake_upload_tree(
    store: ObjectStore, source: Path, prefix: str, *, reserved: Collection[str] = (), **_: Any
) -> UploadResult:
    """Put every regular file under ``source`` at ``prefix`` but the ``reserved`` names (stands in for
    :func:`upload.upload_tree`, failing as it does: :class:`ResultsStoreError` when the store cannot be
    reached or written)."""
    try:
        store.check_bucket(field="training_results_reference.target.bucket")
    except TransferError as err:
        raise ResultsStoreError(f"cannot reach {store.describe()}: {err}") from None
    files = size = 0
    for root, _dirs, names in os.walk(source):
        for name in sorted(names):
            path = Path(root, name)
            if path.is_symlink() or not path.is_file():
                continue
            if _is_reserved(path.relative_to(source).as_posix(), reserved) is not None:
                continue
            key = prefix + path.relative_to(source).as_posix()
            data = path.read_bytes()
            try:
                store.put_bytes(key, data)
            except TransferError as err:
                raise ResultsStoreError(f"cannot store {path}: {err}") from None
            files, size = files + 1, size + len(data)
    return UploadResult(files=files, bytes=size, seconds=0.0)
