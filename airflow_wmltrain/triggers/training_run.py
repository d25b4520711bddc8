"""Triggers: the deferred waits of a training run, in the triggerer (loop: :class:`PollingTrigger`).

:class:`TrainingRunTrigger` watches a run's Docker container until it exits (the operator's deferrable
wait: no worker slot is held while the model trains); :class:`TrainingStatusTrigger` watches a run's
status document, ``<results-bucket>/<training-id>/_status.json``, until the run is over (the sensor's
deferrable mode; the sensor's ``poke`` is the same look).

A trigger's kwargs are stored in the metadata database and shown to whoever can see the trigger: they
hold connection ids and Docker parameters, never a credential.  The halt of a run whose manifest holds
inline credentials needs them to store the run: they travel sealed with Airflow's Fernet key
(:func:`seal_halt`), which the worker and the triggerer share; the kwargs show the redacted manifest.
The results store is given as a plain dict ``{"type": "s3" | "swift", "bucket": ..., "conn_id": ...}``
(:func:`~airflow_wmltrain.storage.results_reference` turns it into
the :class:`~airflow_wmltrain.manifest.StoreReference` the storage layer opens).
"""

from __future__ import annotations

import asyncio
import logging
from functools import cached_property
from typing import Any

import requests
from airflow.sdk.exceptions import AirflowException
from docker.errors import APIError, DockerException, NotFound

from airflow_wmltrain.errors import WmlTrainError
from airflow_wmltrain.hooks.docker import LogCursor, TrainingDockerHook
from airflow_wmltrain.lifecycle import STATUS_FILE, STATUS_XCOM_KEY, RunState, results_location
from airflow_wmltrain.metrics import JSONL_FILE, MetricsCollector, MetricSeries, check_metrics_pattern
from airflow_wmltrain.runtime.run import TrainingRun, read_status
from airflow_wmltrain.runtime.workspace import CONTAINER_DIRS
from airflow_wmltrain.storage import ObjectStore, open_store, results_reference
from airflow_wmltrain.triggers.base import LookFailed, PollingTrigger

__all__ = ["TrainingRunTrigger", "TrainingStatusTrigger", "seal_halt"]

#: ``$RESULT_DIR/metrics.jsonl`` in the container.
JSONL_PATH = f"{CONTAINER_DIRS['RESULT_DIR']}/{JSONL_FILE}"
#: Terminal state → the ``status`` of :class:`TrainingStatusTrigger`'s event.
EVENT_STATUS = {RunState.COMPLETED: "success", RunState.FAILED: "failed", RunState.HALTED: "halted"}


def set_xcom(key: str, value: Any, *, dag_id: str, run_id: str, task_id: str, map_index: int) -> None:
    """Set a task instance's XCom from the triggerer (Airflow 3's triggerer relays ``SetXCom`` to the API
    server; called from a look's thread)."""
    from airflow.sdk.execution_time.xcom import XCom

    XCom.set(key, value, dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index)


def seal_halt(halt: dict[str, Any]) -> dict[str, Any]:
    """The kwargs of :func:`~airflow_wmltrain.runtime.run.halt_run` as a trigger may hold them: the
    manifest redacted, and, when it holds inline credentials, the whole manifest encrypted with
    Airflow's Fernet key under ``sealed_manifest`` (:meth:`TrainingRunTrigger.halt_kwargs` opens it).

    Without a Fernet key (``[core] fernet_key`` empty or invalid) nothing secret is kept: a halt from the
    triggerer then stops the container but cannot store the run (the task log says so when it defers).
    """
    import json

    from airflow.sdk.crypto import get_fernet

    from airflow_wmltrain.manifest import redact_manifest, secret_values_of

    manifest = halt.get("manifest")
    sealed = {**halt, "manifest": redact_manifest(manifest)}
    if not secret_values_of(manifest):
        return sealed
    try:
        fernet = get_fernet()
    except AirflowException:  # a [core] fernet_key that is no Fernet key
        fernet = None
    if fernet is None or not fernet.is_encrypted:
        logging.getLogger(__name__).warning(
            "Airflow has no usable Fernet key ([core] fernet_key): the manifest's inline credentials are not "
            "handed to the triggerer, so a halt of this deferred run stops its container but cannot store "
            "its logs; use Airflow connections (conn_id) in the manifest, or set a Fernet key"
        )
        return sealed
    sealed["sealed_manifest"] = fernet.encrypt(json.dumps(manifest).encode()).decode("ascii")
    return sealed


# --- the container ------------------------------------------------------------------------------------


class TrainingRunTrigger(PollingTrigger):
    """Wait in the triggerer until a training run's container exits.

    Fires one event: ``{"status": "exited", "training_id": ..., "docker_url": ..., "container_id": ...,
    "container_status": "exited", "exit_code": 3, "oom_killed": False, "finished_at": "...",
    "docker_error": ""}`` (:meth:`ContainerOutcome.to_event`), or ``{"status": "error", "training_id":
    ..., "docker_url": ..., "container_id": ..., "message": "..."}`` when the container is gone or the
    Docker host stays unreachable or refuses to answer.  A triggerer that restarts picks the trigger up
    again from its kwargs: nothing is lost, the container keeps running.

    :param training_id: the run's id.
    :param container_id: the id of the run's container.
    :param docker_host: the Docker host's parameters (:meth:`TrainingDockerHook.to_dict`).
    :param poll_interval: seconds between two looks at the container.
    :param halt: keyword arguments of :func:`airflow_wmltrain.runtime.run.halt_run` as
        :func:`seal_halt` makes them (no credential in the clear), used by :meth:`on_kill` when a person
        marks the deferred task failed or success; without them :meth:`on_kill` only stops the container.
    :param metrics: ``{"interval": 30.0, "owner": {"dag_id": ..., "run_id": ..., "task_id": ...,
        "map_index": ...}}``: collect the run's metrics while it trains — the container's new log lines
        (matched by ``halt``'s ``metrics_pattern``) and ``$RESULT_DIR/metrics.jsonl``, both through the
        Docker API and bounded — and publish them at most every ``interval`` seconds, in the run's
        ``_status.json`` and the status XCom of the task ``owner`` (:meth:`TrainingRun.progress`, the
        run rebuilt from ``halt``).  ``None``: no metrics while it trains.
    """

    def __init__(
        self,
        *,
        training_id: str,
        container_id: str,
        docker_host: dict[str, Any],
        poll_interval: float,
        halt: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        deferred_at: float | None = None,
    ) -> None:
        super().__init__(poll_interval=poll_interval, deferred_at=deferred_at)
        self.training_id = training_id
        self.container_id = container_id
        self.docker_host = docker_host
        self.halt = halt
        self.metrics = metrics
        self._collector: MetricsCollector | None = None
        self._log_cursor: LogCursor | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "training_id": self.training_id,
            "container_id": self.container_id,
            "docker_host": self.docker_host,
            "halt": self.halt,
            "metrics": self.metrics,
        }

    def __repr__(self) -> str:
        # Not the default (every kwarg): ``halt`` holds the run's manifest.
        return (
            f"<{self.serialize()[0]} training_id={self.training_id} container_id={self.container_id} "
            f"docker_url={self.docker_url} poll_interval={self.poll_interval}>"
        )

    @property
    def docker_url(self) -> str:
        return str(self.docker_host.get("docker_url", ""))

    @property
    def waiting_for(self) -> str:
        return f"container {self.container_id[:12]} of training run {self.training_id} on {self.docker_url}"

    @cached_property
    def hook(self) -> TrainingDockerHook:
        """The Docker host, rebuilt from plain parameters (its client is built on first use)."""
        return TrainingDockerHook.from_dict(self.docker_host)

    def _payload(self, status: str, **payload: Any) -> dict[str, Any]:
        return {
            **payload,
            "status": status,
            "training_id": self.training_id,
            "docker_url": self.docker_url,
            "container_id": self.container_id,
        }

    def error_payload(self, message: str) -> dict[str, Any]:
        return self._payload("error", message=message)

    def look(self) -> dict[str, Any] | str:
        try:
            outcome = self.hook.inspect(self.container_id)
        except NotFound:
            raise LookFailed(
                f"the training container {self.container_id[:12]} of {self.training_id} no longer exists on "
                f"{self.docker_url}; it was removed before the run ended (docker rm, or the Docker host lost "
                "its containers)",
                retry=False,
            ) from None
        except APIError as exc:
            if not exc.is_server_error():
                raise LookFailed(
                    f"the Docker host {self.docker_url} refused to inspect the training container "
                    f"{self.container_id[:12]} of {self.training_id}: {exc}",
                    retry=False,
                ) from None
            raise LookFailed(str(exc), retry=True) from None
        except (DockerException, requests.RequestException, OSError, AirflowException, WmlTrainError) as exc:
            raise LookFailed(str(exc) or type(exc).__name__, retry=True) from None
        if not outcome.ended:
            self.collect_metrics()
            return outcome.status or "in an unknown state"
        self.log.info(
            "Container %s of training run %s is %s, exit code %d",
            self.container_id[:12],
            self.training_id,
            outcome.status,
            outcome.exit_code,
        )
        return self._payload("exited", **outcome.to_event())

    # --- metrics while the run trains -----------------------------------------------------------------

    def collect_metrics(self) -> None:
        """Read the run's new metrics and publish them, at most every ``metrics["interval"]`` seconds
        (blocking; part of a look).  Never raises: metrics never end a wait nor fail a run."""
        if not self.metrics or not self.halt:
            return
        try:
            collector = self._metrics_collector()
            if not collector.due():
                return
            lines, self._log_cursor = self.hook.log_lines_since(self.container_id, self._log_cursor)
            collector.feed_lines(lines)
            collector.read_jsonl_with(
                lambda offset, limit: self.hook.read_file(
                    self.container_id, JSONL_PATH, offset=offset, limit=limit
                )
            )
            collector.publish_if_due()
        except Exception as err:
            self.log.warning(
                "Could not collect the metrics of %s (%s); the wait goes on", self.training_id, err
            )

    def _metrics_collector(self) -> MetricsCollector:
        if self._collector is None:
            halt = self.halt or {}
            self._collector = MetricsCollector(
                check_metrics_pattern(halt.get("metrics_pattern"), field="metrics_pattern"),
                interval=float((self.metrics or {}).get("interval") or 30.0),
                publish=self._publish_metrics,
                log=self.log,
            )
        return self._collector

    @cached_property
    def _run(self) -> TrainingRun:
        """The run, rebuilt as :func:`~airflow_wmltrain.runtime.run.halt_run` does, publishing its status
        as the XCom of the task that deferred (the triggerer sends it to the API server)."""
        from airflow_wmltrain.manifest import load_manifest
        from airflow_wmltrain.settings import Settings

        settings = Settings.from_airflow_config()
        kwargs = self.halt_kwargs()
        return TrainingRun(
            training_id=self.training_id,
            manifest=load_manifest(kwargs["manifest"], settings=settings),
            settings=settings,
            log=self.log,
            publish=self._publish_status,
            metrics_pattern=kwargs.get("metrics_pattern"),
        )

    def _publish_status(self, document: dict[str, Any]) -> None:
        owner = dict((self.metrics or {}).get("owner") or {})
        set_xcom(
            STATUS_XCOM_KEY,
            document,
            dag_id=str(owner["dag_id"]),
            run_id=str(owner["run_id"]),
            task_id=str(owner["task_id"]),
            map_index=int(owner.get("map_index", -1)),
        )

    def _publish_metrics(self, series: MetricSeries) -> None:
        """The run as its bucket says now (a halt or the task may have moved it on), with the metrics."""
        run = self._run
        run.resume()
        run.progress(series)

    def after_failure(self) -> None:
        # A client that failed may hold a dead connection pool: build a new one on the next look.
        self.hook.close()

    def halt_kwargs(self) -> dict[str, Any]:
        """The kwargs of :func:`~airflow_wmltrain.runtime.run.halt_run`, the sealed manifest opened."""
        import json

        from airflow.sdk.crypto import get_fernet

        kwargs = dict(self.halt or {})
        sealed = kwargs.pop("sealed_manifest", None)
        if sealed:
            kwargs["manifest"] = json.loads(get_fernet().decrypt(sealed.encode("ascii")))
        return kwargs

    def _halt(self) -> None:
        from airflow_wmltrain.runtime.run import halt_run

        halt_run(**self.halt_kwargs())

    def _stop_container(self) -> None:
        from airflow_wmltrain.settings import Settings

        grace = Settings.from_airflow_config().halt_grace_period
        self.log.info("Stopping %s (SIGTERM, SIGKILL after %ds)", self.waiting_for, grace)
        self.hook.stop(self.container_id, grace=grace)

    async def on_kill(self) -> None:
        """Halt the run: a person marked the deferred task failed or success (the triggerer calls this
        only on such a user action, never when a triggerer restarts or hands the trigger over).

        With ``halt`` kwargs, :func:`~airflow_wmltrain.runtime.run.halt_run` stops the container, stores
        the logs and records ``HALTED``; without them, or if that fails, the container is only stopped.
        """
        # The triggerer bounds this coroutine with ``[triggerer] on_kill_timeout`` (30 s by default); a
        # thread cannot be cancelled, so the halt goes on inside the triggerer process after that.
        if self.halt is not None:
            self.log.info(
                "Halting training run %s (its deferred task was stopped by a person)", self.training_id
            )
            try:
                await asyncio.to_thread(self._halt)
                return
            except Exception:
                self.log.exception("Halting training run %s failed; stopping its container", self.training_id)
        await asyncio.to_thread(self._stop_container)

    async def cleanup(self) -> None:
        self.hook.close()


# --- the status document ------------------------------------------------------------------------------


class TrainingStatusTrigger(PollingTrigger):
    """Wait in the triggerer until a training run's status document says that the run is over.

    A missing document means that the run has not written one yet: it keeps waiting (the deferral's
    ``timeout`` bounds the wait).  When the run is over it fires ``{"status": "success" | "failed" |
    "halted", "training_id": ..., "run": <the status document>}``, and ``{"status": "error",
    "training_id": ..., "message": "..."}`` when the document cannot be read, the bucket does not exist,
    the credentials are refused, or the store stays unreachable.

    :param training_id: the run's id.
    :param results: the results store, ``{"type": "s3" | "swift", "bucket": ..., "conn_id": ...}``.
    :param poll_interval: seconds between two reads.
    """

    def __init__(
        self,
        *,
        training_id: str,
        results: dict[str, str],
        poll_interval: float,
        deferred_at: float | None = None,
    ) -> None:
        super().__init__(poll_interval=poll_interval, deferred_at=deferred_at)
        self.training_id = training_id
        self.results = results
        self._last_state: RunState | None = None
        self._reported_missing = False

    def fields(self) -> dict[str, Any]:
        return {"training_id": self.training_id, "results": self.results}

    @property
    def location(self) -> str:
        return results_location(self.results["type"], self.results["bucket"], self.training_id)

    @property
    def waiting_for(self) -> str:
        return f"training run {self.training_id} to end ({self.location}{STATUS_FILE})"

    def error_payload(self, message: str) -> dict[str, Any]:
        return {"status": "error", "training_id": self.training_id, "message": message}

    @cached_property
    def store(self) -> ObjectStore:
        """The results store, kept from one look to the next: its connections and its credentials (one
        STS call per assumed role's lifetime, not one per poll) until a look fails."""
        try:
            reference = results_reference(
                self.results["type"], self.results["bucket"], self.results["conn_id"]
            )
        except (KeyError, ValueError) as exc:
            raise LookFailed(f"bad results store {self.results!r}: {exc}", retry=False) from None
        return open_store(reference)

    def after_failure(self) -> None:
        self._drop_store()

    def _drop_store(self) -> None:
        store = self.__dict__.pop("store", None)
        if store is not None:
            store.close()

    async def cleanup(self) -> None:
        self._drop_store()

    def look(self) -> dict[str, Any] | str:
        try:
            status = read_status(self.store, self.training_id)
        except WmlTrainError as exc:
            raise LookFailed(
                f"cannot read the status of {self.training_id}: {exc}", retry=exc.retryable
            ) from exc
        except (requests.RequestException, OSError) as exc:
            raise LookFailed(str(exc) or type(exc).__name__, retry=True) from None
        if status is None:
            if not self._reported_missing:
                self._reported_missing = True
                self.log.info(
                    "No run with id %s has written a status at %s yet; waiting",
                    self.training_id,
                    self.location,
                )
            return "no status yet"
        if status.state is not self._last_state:
            self._last_state = status.state
            self.log.info("Training run %s is %s", self.training_id, status.state.value)
        if status.terminal:
            return {
                "status": EVENT_STATUS[status.state],
                "training_id": self.training_id,
                "run": status.to_dict(),
            }
        return status.state.value
