"""A run's training container through the Docker Engine API: find it, follow it, judge it, stop it.

Everything here takes a low-level ``docker.APIClient`` (``DockerHook.api_client``), so the operator, the
trigger and the halt path share it.  A run has at most one container per daemon, named
:func:`~airflow_wmltrain.runtime.labels.run_container_name`; finding it by name is how a retry
re-attaches instead of starting a second run.
"""

from __future__ import annotations

import contextlib
import logging
import tarfile
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from docker.errors import APIError, NotFound

from airflow_wmltrain.runtime import labels

if TYPE_CHECKING:
    from docker import APIClient

#: Log lines quoted in a failure message.
TAIL_LINES = 20
_RUNNING = {"created", "running", "restarting", "paused"}


@dataclass(frozen=True)
class ContainerOutcome:
    """How a training container ended.

    :param status: Docker's state (``exited``, ``dead``...).
    :param exit_code: the training process's exit status.
    :param oom_killed: the kernel killed it for lack of memory.
    :param finished_at: when, as Docker says it.
    :param error: the daemon's own error for the container (e.g. it could not be started).
    """

    status: str
    exit_code: int
    oom_killed: bool = False
    finished_at: str = ""
    error: str = ""

    @classmethod
    def from_inspect(cls, info: dict[str, Any]) -> ContainerOutcome:
        state = info.get("State") or {}
        return cls(
            status=str(state.get("Status", "")),
            exit_code=int(state.get("ExitCode") or 0),
            oom_killed=bool(state.get("OOMKilled")),
            finished_at=str(state.get("FinishedAt") or ""),
            error=str(state.get("Error") or ""),
        )

    @property
    def running(self) -> bool:
        return self.status in _RUNNING

    @property
    def succeeded(self) -> bool:
        return not self.running and self.exit_code == 0 and not self.oom_killed and not self.error

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


def find_run_container(cli: APIClient, training_id: str) -> dict[str, Any] | None:
    """The run's container (``inspect`` data), or ``None`` when it has none on this daemon."""
    try:
        info: dict[str, Any] = cli.inspect_container(labels.run_container_name(training_id))
    except NotFound:
        return None
    if (info.get("Config", {}).get("Labels") or {}).get(labels.TRAINING_ID) != training_id:
        raise APIError(
            f"container {labels.run_container_name(training_id)} exists on this Docker host but does not "
            f"belong to {training_id}; remove it (docker rm) or choose another training id"
        )
    return info


def inspect(cli: APIClient, container_id: str) -> ContainerOutcome:
    return ContainerOutcome.from_inspect(cli.inspect_container(container_id))


def _lines(chunks: Iterable[bytes | str]) -> Iterator[str]:
    buffer = ""
    for chunk in chunks:
        buffer += chunk.decode("utf-8", "replace") if isinstance(chunk, bytes) else chunk
        *lines, buffer = buffer.split("\n")
        yield from (line.rstrip("\r") for line in lines)
    if buffer:
        yield buffer.rstrip("\r")


def follow_logs(cli: APIClient, container_id: str, log: logging.Logger | Any) -> int:
    """Copy the container's output into the task log, line by line as it comes, until it stops.

    :returns: the number of lines shown.
    """
    count = 0
    stream = cli.logs(container_id, stdout=True, stderr=True, stream=True, follow=True)
    for line in _lines(stream):
        log.info("%s", line)
        count += 1
    return count


def log_lines(cli: APIClient, container_id: str) -> Iterator[str]:
    """The container's whole output so far, line by line (streamed, not held in memory)."""
    yield from _lines(cli.logs(container_id, stdout=True, stderr=True, stream=True, follow=False))


def save_logs(cli: APIClient, container_id: str, path: Path) -> list[str]:
    """Write the container's whole output to ``path``.

    :returns: its last :data:`TAIL_LINES` lines.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for line in log_lines(cli, container_id):
            out.write(line + "\n")
            tail.append(line)
    return list(tail)


def copy_out(cli: APIClient, container_id: str, source: str, dest: Path) -> None:
    """Copy a directory out of a (stopped) container into ``dest`` through the Docker API."""
    stream, _stat = cli.get_archive(container_id, source)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=dest) as archive:  # results can be large: never in memory
        for chunk in stream:
            archive.write(chunk)
        archive.seek(0)
        _extract(archive, dest)


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


def stop(cli: APIClient, container_id: str, *, grace: int) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (Docker's ``stop``); a gone container is fine."""
    with contextlib.suppress(NotFound):
        cli.stop(container_id, timeout=grace)


def remove(cli: APIClient, container_id: str) -> None:
    """Remove the container (forced); a gone container is fine."""
    with contextlib.suppress(NotFound):
        cli.remove_container(container_id, force=True)
