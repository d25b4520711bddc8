"""Triggers: the deferred waits of a training run, in the triggerer.

:class:`TrainingRunTrigger` watches a run's Docker container until it exits (the operator's deferrable
wait: no worker slot is held while the model trains); :class:`TrainingStatusTrigger` watches a run's
status document, ``<results-bucket>/<training-id>/_status.json``, until the run is over (the sensor's
deferrable mode).  Every blocking call (the Docker Engine API, the object store) runs in a thread
(:func:`asyncio.to_thread`), never in the triggerer's event loop.

A trigger's kwargs are stored in the metadata database and shown to whoever can see the trigger: they
hold connection ids and Docker parameters, never a credential.  The results store is given as a plain
dict ``{"type": "s3" | "swift", "bucket": ..., "conn_id": ...}`` (:func:`results_reference` turns it into
the :class:`~airflow_wmltrain.manifest.StoreReference` the storage layer opens).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import requests
from airflow.sdk.exceptions import AirflowException
from airflow.triggers.base import BaseTrigger, TriggerEvent
from docker.errors import APIError, DockerException, NotFound

from airflow_wmltrain.errors import WmlTrainError
from airflow_wmltrain.lifecycle import STATUS_FILE, RunState, RunStatus, results_location
from airflow_wmltrain.manifest import ConnectionId, StoreReference, StoreType
from airflow_wmltrain.runtime.docker_host import DockerHost
from airflow_wmltrain.storage.transfer import TransferError

if TYPE_CHECKING:
    from docker import APIClient

__all__ = [
    "StatusDocumentError",
    "TrainingRunTrigger",
    "TrainingStatusTrigger",
    "read_status",
    "results_reference",
]

#: Consecutive failed looks (Docker host or object store unreachable, 5xx) before a trigger gives up.
MAX_CONSECUTIVE_FAILURES = 10
#: The longest wait between two tries after failures, in seconds.
MAX_BACKOFF = 300.0
#: How often a trigger says that it is still waiting, in seconds.
STILL_WAITING_EVERY = 600.0

_RESULTS_TYPES = ("s3", "swift")
#: Terminal state → the ``status`` of :class:`TrainingStatusTrigger`'s event.
_EVENT_STATUS = {RunState.COMPLETED: "success", RunState.FAILED: "failed", RunState.HALTED: "halted"}


# --- the results store --------------------------------------------------------------------------------


def results_reference(type_: str, bucket: str, conn_id: str) -> StoreReference:
    """The results store of a run, reached through an Airflow connection.

    :param type_: ``s3`` (an ``aws`` connection) or ``swift`` (a ``swift`` connection).
    :param bucket: the results bucket (S3) or container (Swift).
    :param conn_id: the Airflow connection id.
    :raises ValueError: an unknown type, an empty bucket or connection id.
    """
    if type_ not in _RESULTS_TYPES:
        raise ValueError(f"results type '{type_}' is not one of {', '.join(_RESULTS_TYPES)}")
    if not bucket:
        raise ValueError("the results bucket is empty; give the bucket (S3) or container (Swift) name")
    if not conn_id:
        raise ValueError("the results connection id is empty; give an Airflow connection id")
    kind: StoreType = "s3" if type_ == "s3" else "swift"
    return StoreReference(type=kind, bucket=bucket, connection=ConnectionId(conn_id=conn_id))


class StatusDocumentError(ValueError):
    """A run's ``_status.json`` exists but is not a status document (not JSON, wrong shape, other id)."""


def read_status(reference: StoreReference, training_id: str) -> RunStatus | None:
    """Read a run's status document (blocking: call it in a thread from async code).

    :param reference: the results store.
    :param training_id: the run.
    :return: the document, or ``None`` when the run has not written one yet.
    :raises StatusDocumentError: the document cannot be read as a status document.
    :raises BucketNotFoundError: the results bucket does not exist.
    :raises CredentialsError: the store refused the connection's credentials.
    :raises TransferError: the store cannot be reached or fails (``transient`` says whether to retry).
    """
    from airflow_wmltrain.storage import open_store

    key = f"{training_id}/{STATUS_FILE}"
    with open_store(reference) as store:
        status, _, body = store.request("GET", key, missing_ok=True)
        if status == 404:
            # A missing document means "not yet", unless the bucket itself is missing: say so rather
            # than wait forever for a typo.
            store.check_bucket()
            return None
        where = store.describe(key)
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise StatusDocumentError(
            f"{where} is not JSON ({exc}); it is not a training-run status document"
        ) from None
    if not isinstance(document, Mapping):
        raise StatusDocumentError(f"{where} is JSON but not an object; it is not a status document")
    try:
        run = RunStatus.from_dict(document)
    except ValueError as exc:
        raise StatusDocumentError(f"{where}: {exc}") from None
    if run.training_id != training_id:
        raise StatusDocumentError(f"{where} is the status of {run.training_id}, not of {training_id}")
    return run


def _trigger_event(payload: dict[str, Any]) -> TriggerEvent:
    return TriggerEvent(payload)  # type: ignore[no-untyped-call]


def _backoff(poll_interval: float, failures: int) -> float:
    """Seconds before the next try after ``failures`` consecutive failures (doubling, capped)."""
    return float(min(MAX_BACKOFF, max(poll_interval, 0.01) * 2 ** (failures - 1)))


class _Retry(Exception):
    """A look failed in a way worth trying again (the host or the store did not answer)."""


class _GiveUp(Exception):
    """A look failed for good: the trigger ends with this message."""


async def _poll(
    trigger: Any,
    look: Callable[[], Awaitable[TriggerEvent | str]],
    *,
    failing: Callable[[int, str], str],
    retrying: Callable[[int, float, str], None],
    still: Callable[[str, float], None],
    after_failure: Callable[[], None] | None = None,
) -> AsyncIterator[TriggerEvent]:
    """The loop both triggers run: look every ``poll_interval`` until an event, backing off on failures.

    :param trigger: the trigger (its ``poll_interval`` and ``_error``).
    :param look: one look: an event ends the loop, a string says what is awaited (for the reports);
        raises :class:`_Retry` or :class:`_GiveUp`.
    :param failing: the message after :data:`MAX_CONSECUTIVE_FAILURES` failures in a row.
    :param retrying: logs a failure that will be tried again (failures, delay, reason).
    :param still: logs that the wait goes on (what is awaited, minutes waited), every
        :data:`STILL_WAITING_EVERY` seconds.
    :param after_failure: called after each failure (e.g. to drop a client with a dead pool).
    """
    started = last_report = time.monotonic()
    failures = 0
    while True:
        try:
            outcome = await look()
        except _GiveUp as exc:
            yield trigger._error(str(exc))
            return
        except _Retry as exc:
            failures += 1
            if failures >= MAX_CONSECUTIVE_FAILURES:
                yield trigger._error(failing(failures, str(exc)))
                return
            delay = _backoff(trigger.poll_interval, failures)
            retrying(failures, delay, str(exc))
            if after_failure is not None:
                after_failure()
            await asyncio.sleep(delay)
            continue
        if isinstance(outcome, TriggerEvent):
            yield outcome
            return
        failures = 0
        now = time.monotonic()
        if now - last_report >= STILL_WAITING_EVERY:
            last_report = now
            still(outcome, (now - started) // 60)
        await asyncio.sleep(trigger.poll_interval)


# --- the container ------------------------------------------------------------------------------------


class TrainingRunTrigger(BaseTrigger):
    """Wait in the triggerer until a training run's container exits.

    Looks at the container every ``poll_interval`` seconds (``docker inspect``, in a thread) and fires
    one event when it is ``exited`` or ``dead``::

        {"status": "exited", "training_id": ..., "container_id": ..., "exit_code": 3,
         "oom_killed": False, "finished_at": "2025-01-01T00:00:00.123Z", "docker_error": ""}

    or, when the container no longer exists or the Docker host stays unreachable or refuses to answer::

        {"status": "error", "training_id": ..., "container_id": ..., "message": "..."}

    Transient failures (connection refused, timeouts, 5xx) are retried with a doubling backoff and
    logged; the error event comes after :data:`MAX_CONSECUTIVE_FAILURES` in a row.  A triggerer that
    restarts picks the trigger up again from its kwargs: nothing is lost, the container keeps running.

    :param training_id: the run's id.
    :param container_id: the id of the run's container.
    :param docker_host: the Docker host's parameters (:meth:`DockerHost.to_dict`).
    :param poll_interval: seconds between two looks at the container.
    :param halt: keyword arguments of :func:`airflow_wmltrain.runtime.run.halt_run`, called by
        :meth:`on_kill` when a user marks the deferred task failed or clears it; without them
        :meth:`on_kill` only stops the container.
    """

    def __init__(
        self,
        *,
        training_id: str,
        container_id: str,
        docker_host: dict[str, Any],
        poll_interval: float,
        halt: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.training_id = training_id
        self.container_id = container_id
        self.docker_host = docker_host
        self.poll_interval = poll_interval
        self.halt = halt

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "training_id": self.training_id,
                "container_id": self.container_id,
                "docker_host": self.docker_host,
                "poll_interval": self.poll_interval,
                "halt": self.halt,
            },
        )

    def __repr__(self) -> str:
        # Not the default (every kwarg): ``halt`` holds the run's manifest, which may hold credentials.
        return (
            f"<{self.serialize()[0]} training_id={self.training_id} container_id={self.container_id} "
            f"docker_url={self.docker_url} poll_interval={self.poll_interval}>"
        )

    @property
    def docker_url(self) -> str:
        return str(self.docker_host.get("docker_url", ""))

    @cached_property
    def client(self) -> APIClient:
        """The Docker client (built, and pinged, on first use: call it in a thread)."""
        return DockerHost.from_dict(self.docker_host).client()

    def _inspect(self) -> dict[str, Any]:
        state: dict[str, Any] = self.client.inspect_container(self.container_id).get("State") or {}
        return state

    def _event(self, status: str, **payload: Any) -> TriggerEvent:
        return _trigger_event(
            {
                "status": status,
                "training_id": self.training_id,
                "container_id": self.container_id,
                **payload,
            }
        )

    def _error(self, message: str) -> TriggerEvent:
        self.log.error("%s", message)
        return self._event("error", message=message)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        short_id = self.container_id[:12]
        self.log.info(
            "Watching container %s of training run %s on %s (a look every %ss)",
            short_id,
            self.training_id,
            self.docker_url,
            self.poll_interval,
        )
        answered = True

        async def look() -> TriggerEvent | str:
            nonlocal answered
            try:
                state = await asyncio.to_thread(self._inspect)
            except NotFound:
                raise _GiveUp(
                    f"the training container {short_id} of {self.training_id} no longer exists on "
                    f"{self.docker_url}; it was removed before the run ended (docker rm, or the Docker "
                    "host lost its containers)"
                ) from None
            except APIError as exc:
                if not exc.is_server_error():
                    raise _GiveUp(
                        f"the Docker host {self.docker_url} refused to inspect the training container "
                        f"{short_id} of {self.training_id}: {exc}"
                    ) from None
                answered = False
                raise _Retry(str(exc)) from None
            except (DockerException, requests.RequestException, OSError, AirflowException) as exc:
                answered = False
                raise _Retry(str(exc) or type(exc).__name__) from None
            if not answered:
                answered = True
                self.log.info("The Docker host %s answers again", self.docker_url)
            status = str(state.get("Status") or "")
            if status not in ("exited", "dead"):
                return status or "in an unknown state"
            exit_code = int(state.get("ExitCode") or 0)
            self.log.info(
                "Container %s of training run %s is %s, exit code %d",
                short_id,
                self.training_id,
                status,
                exit_code,
            )
            return self._event(
                "exited",
                exit_code=exit_code,
                oom_killed=bool(state.get("OOMKilled")),
                finished_at=str(state.get("FinishedAt") or ""),
                docker_error=str(state.get("Error") or ""),
            )

        async for event in _poll(
            self,
            look,
            failing=lambda failures, reason: (
                f"the Docker host {self.docker_url} did not answer about the training container "
                f"{short_id} of {self.training_id} in {failures} tries: {reason}"
            ),
            retrying=lambda failures, delay, reason: self.log.warning(
                "Could not inspect container %s on %s (try %d of %d, again in %.1fs): %s",
                short_id,
                self.docker_url,
                failures,
                MAX_CONSECUTIVE_FAILURES,
                delay,
                reason,
            ),
            still=lambda status, minutes: self.log.info(
                "Training run %s is still running: container %s is %s (watched for %d min)",
                self.training_id,
                short_id,
                status,
                minutes,
            ),
            # A client that failed may hold a dead connection pool: build a new one on the next try.
            after_failure=self._drop_client,
        ):
            yield event

    def _stop_container(self) -> None:
        from airflow_wmltrain.settings import Settings

        grace = Settings.from_airflow_config().halt_grace_period
        self.log.info(
            "Stopping container %s of training run %s on %s (SIGTERM, SIGKILL after %ds)",
            self.container_id[:12],
            self.training_id,
            self.docker_url,
            grace,
        )
        try:
            self.client.stop(self.container_id, timeout=grace)
        except NotFound:
            self.log.info("Container %s is already gone", self.container_id[:12])

    def _halt(self) -> None:
        from airflow_wmltrain.runtime.run import halt_run

        halt_run(**(self.halt or {}))

    async def on_kill(self) -> None:
        """Halt the run: the user marked the deferred task failed (or cleared it, or marked it success).

        With ``halt`` kwargs, :func:`~airflow_wmltrain.runtime.run.halt_run` stops the container
        (SIGTERM, SIGKILL after the grace period), stores the logs and records ``HALTED``; without them,
        the container is only stopped.  If ``halt_run`` fails, the container is stopped anyway.
        """
        # The triggerer bounds this coroutine with ``[triggerer] on_kill_timeout`` (30 s by default):
        # ``asyncio.wait_for`` may cancel the await below, but a thread cannot be cancelled, so the halt
        # keeps running to completion inside the triggerer process (unless the process itself exits).
        if self.halt is not None:
            self.log.info("Halting training run %s (the task was killed while deferred)", self.training_id)
            try:
                await asyncio.to_thread(self._halt)
                return
            except Exception:
                self.log.exception("Halting training run %s failed; stopping its container", self.training_id)
        await asyncio.to_thread(self._stop_container)

    def _drop_client(self) -> None:
        client = self.__dict__.pop("client", None)
        if client is not None:
            client.close()

    async def cleanup(self) -> None:
        self._drop_client()


# --- the status document ------------------------------------------------------------------------------


class TrainingStatusTrigger(BaseTrigger):
    """Wait in the triggerer until a training run's status document says that the run is over.

    Reads ``<training-id>/_status.json`` in the results bucket every ``poll_interval`` seconds (in a
    thread).  A missing document means that the run has not written one yet: it keeps waiting (the
    deferral's ``timeout`` bounds the wait).  When the run is ``COMPLETED``, ``FAILED`` or ``HALTED``
    it fires::

        {"status": "success" | "failed" | "halted", "training_id": ..., "state": "COMPLETED",
         "error": None | {"code": "C201", "message": "..."}, "results_location": "s3://bucket/id/",
         "metrics": {...}}

    and ``{"status": "error", "training_id": ..., "state": None, "error": None, "results_location": ...,
    "metrics": {}, "message": "..."}`` when the document cannot be read, the bucket does not exist, the
    credentials are refused, or the store stays unreachable (:data:`MAX_CONSECUTIVE_FAILURES` tries).

    :param training_id: the run's id.
    :param results: the results store, ``{"type": "s3" | "swift", "bucket": ..., "conn_id": ...}``.
    :param poll_interval: seconds between two reads.
    """

    def __init__(self, *, training_id: str, results: dict[str, str], poll_interval: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.training_id = training_id
        self.results = results
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"training_id": self.training_id, "results": self.results, "poll_interval": self.poll_interval},
        )

    @property
    def location(self) -> str:
        return results_location(self.results["type"], self.results["bucket"], self.training_id)

    def _error(self, message: str) -> TriggerEvent:
        self.log.error("%s", message)
        return _trigger_event(
            {
                "status": "error",
                "training_id": self.training_id,
                "state": None,
                "error": None,
                "results_location": self.location,
                "metrics": {},
                "message": message,
            }
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            reference = results_reference(
                self.results["type"], self.results["bucket"], self.results["conn_id"]
            )
        except (KeyError, ValueError) as exc:
            yield self._error(f"bad results store {self.results!r}: {exc}")
            return
        self.log.info(
            "Waiting for training run %s to end: reading %s%s every %ss",
            self.training_id,
            self.location,
            STATUS_FILE,
            self.poll_interval,
        )
        last_state: RunState | None = None
        reported_missing = False

        async def look() -> TriggerEvent | str:
            nonlocal last_state, reported_missing
            try:
                run = await asyncio.to_thread(read_status, reference, self.training_id)
            except (StatusDocumentError, WmlTrainError) as exc:
                raise _GiveUp(str(exc)) from None
            except TransferError as exc:
                if not exc.transient:
                    raise _GiveUp(f"cannot read the status of {self.training_id}: {exc}") from None
                raise _Retry(str(exc)) from None
            except (requests.RequestException, OSError) as exc:
                raise _Retry(str(exc) or type(exc).__name__) from None
            if run is None:
                if not reported_missing:
                    reported_missing = True
                    self.log.info(
                        "No run with id %s has written a status at %s yet; waiting",
                        self.training_id,
                        self.location,
                    )
                return "no status yet"
            if run.terminal:
                self.log.info("Training run %s is %s", self.training_id, run.state.value)
                return _trigger_event(
                    {
                        "status": _EVENT_STATUS[run.state],
                        "training_id": self.training_id,
                        "state": run.state.value,
                        "error": dict(run.error) if run.error else None,
                        "results_location": run.results_location or self.location,
                        "metrics": dict(run.metrics),
                    }
                )
            if run.state is not last_state:
                last_state = run.state
                self.log.info("Training run %s is %s", self.training_id, run.state.value)
            return run.state.value

        async for event in _poll(
            self,
            look,
            failing=lambda failures, reason: (
                f"cannot read the status of {self.training_id} at {self.location} "
                f"({failures} tries): {reason}"
            ),
            retrying=lambda failures, delay, reason: self.log.warning(
                "Could not read the status of %s (try %d of %d, again in %.1fs): %s",
                self.training_id,
                failures,
                MAX_CONSECUTIVE_FAILURES,
                delay,
                reason,
            ),
            still=lambda state, minutes: self.log.info(
                "Still waiting for training run %s (%s; %d min)", self.training_id, state, minutes
            ),
        ):
            yield event
