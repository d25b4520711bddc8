"""``TrainingRun``: the one home of a run's lifecycle outside its container.

Every transition and every way a run ends goes through a :class:`TrainingRun`: the start, a failure
before a container exists, a halt (from the task's ``on_kill`` through the detached halter, from the
trigger's ``on_kill``, or after ``wmltrain halt`` marked the task failed), the finish, and the result.
It alone writes ``<training-id>/_status.json`` in the results bucket and publishes the same document as
the task's status XCom.  Failed and halted runs go through ``STORING`` too: their logs always land in
the bucket.  :func:`read_status` is the one reader of a run's status document (the sensor and the
trigger use it too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from docker.errors import DockerException, NotFound
from requests import RequestException

from airflow_wmltrain.charts import LEARNING_CURVE_FILE, learning_curve_png
from airflow_wmltrain.errors import (
    ResultsStoreError,
    RunHaltedError,
    ServerError,
    TrainingFailedError,
    WmlTrainError,
)
from airflow_wmltrain.lifecycle import (
    LOAD_DATA_LOG,
    MANIFEST_FILE,
    STATUS_FILE,
    SUBMITTED_CODE,
    TRAINING_LOG,
    RunState,
    RunStatus,
    results_location,
)
from airflow_wmltrain.metrics import (
    JSONL_CHUNK_BYTES,
    JSONL_FILE,
    MAX_JSONL_BYTES,
    METRICS_FILE,
    MetricsCollector,
    MetricSeries,
    check_metrics_pattern,
    read_container_file,
    read_metrics,
)
from airflow_wmltrain.runtime.workspace import CONTAINER_DIRS, Workspace
from airflow_wmltrain.storage import open_store
from airflow_wmltrain.storage.cache import ObjectCache
from airflow_wmltrain.storage.staging import StagingResult, stage
from airflow_wmltrain.storage.transfer import TransferError
from airflow_wmltrain.storage.upload import unreadable_entries, upload_tree

__all__ = ["METRICS_FILE", "TrainingRun", "halt_run", "read_metrics", "read_status"]

if TYPE_CHECKING:
    from airflow_wmltrain.hooks.docker import ContainerOutcome, TrainingDockerHook
    from airflow_wmltrain.manifest import TrainingManifest
    from airflow_wmltrain.model_definition import ModelDefinition
    from airflow_wmltrain.settings import Settings
    from airflow_wmltrain.storage.base import ObjectStore
    from airflow_wmltrain.submission import Submission

logger = logging.getLogger(__name__)

#: Where a run's logs go under its results folder (``learner-1/``).
LOGS_PREFIX = str(Path(TRAINING_LOG).parent) + "/"
#: The run's own records under its results folder (a folder ends in ``/``): what the training writes
#: under these names (in ``$RESULT_DIR``, or ``$LOG_DIR`` for the logs) is not stored, the run's win.
RESERVED_RESULTS = (
    STATUS_FILE,
    MANIFEST_FILE,
    str(Path(SUBMITTED_CODE).parent) + "/",
    TRAINING_LOG,
    LOAD_DATA_LOG,
    LEARNING_CURVE_FILE,
)
RESERVED_LOGS = tuple(name.removeprefix(LOGS_PREFIX) for name in (TRAINING_LOG, LOAD_DATA_LOG))


def _final_series(jsonl: Path, from_log: MetricSeries, live: tuple[Mapping[str, Any], ...]) -> MetricSeries:
    """A run's metrics per step once it ended: all of ``metrics.jsonl`` (bounded) and the points of the
    log; the points collected while it trained when neither has any (e.g. the file was removed)."""
    from_file = MetricSeries()
    while from_file.offset < MAX_JSONL_BYTES:
        found = read_container_file(
            jsonl, offset=from_file.offset, limit=min(JSONL_CHUNK_BYTES, MAX_JSONL_BYTES - from_file.offset)
        )
        if found is None or not found[0]:
            break
        last = len(found[0]) < JSONL_CHUNK_BYTES or from_file.offset + len(found[0]) >= MAX_JSONL_BYTES
        before = from_file.offset
        from_file = from_file.with_jsonl(found[0], final=last)
        if last or from_file.offset == before:
            break
    series = from_file.merged(from_log)
    return series if series.points else MetricSeries.from_steps(live)


def read_status(store: ObjectStore, training_id: str, *, check_bucket: bool = True) -> RunStatus | None:
    """A run's status document in its results store (blocking: call it in a thread from async code).

    :param check_bucket: when there is no document, make sure the bucket exists (a waiter would wait
        for ever for a typo); the run itself checked its bucket when it was submitted.

    :return: the document, or ``None`` when the run has not written one yet.
    :raises StatusDocumentError: the document cannot be read as this run's status document.
    :raises BucketNotFoundError: the results bucket does not exist.
    :raises CredentialsError: the store refused the credentials.
    :raises TransferError: the store cannot be reached or fails (``transient`` says whether to retry).
    """
    key = f"{training_id}/{STATUS_FILE}"
    status, _headers, body = store.request("GET", key, missing_ok=True)
    if status == 404:
        if check_bucket:
            store.check_bucket()
        return None
    return RunStatus.from_json(body, where=store.describe(key), training_id=training_id)


def submission_digest(submission: Submission) -> str:
    """A digest of what was submitted: the zip, the manifest (secrets redacted) and the hyperparameters."""
    digest = hashlib.sha256()
    digest.update(submission.model_definition.open_bytes())
    digest.update(b"\0" + submission.manifest.to_yaml().encode())
    digest.update(b"\0" + json.dumps(dict(submission.hyperparameters), sort_keys=True, default=str).encode())
    return "sha256:" + digest.hexdigest()


class _FileLog(logging.Handler):
    """Copies a logger's records into a file (``learner-1/load-data.log``), never through a link."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{path} is not a regular file")
        self.stream = os.fdopen(fd, "a", encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()
        super().close()


class _Forward(logging.Handler):
    """Passes records on to another logger (the task's)."""

    def __init__(self, target: logging.Logger | Any) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.log(record.levelno, "%s", record.getMessage())


class TrainingRun:
    """One training run's lifecycle: its status, its files, and every way it ends.

    :param training_id: the run's id.
    :param manifest: the run's (validated) manifest.
    :param settings: the ``[wmltrain]`` settings.
    :param log: the task's logger.
    :param publish: called with the status document after each write (the operator publishes it as the
        XCom :data:`~airflow_wmltrain.lifecycle.STATUS_XCOM_KEY`, which ``wmltrain list``/``show`` read
        through the REST API); ``None`` where there is no task to publish from (the halter).
    :param metrics_pattern: the log pattern of the run's metrics (a DAG author's or an admin's, already
        checked: :func:`~airflow_wmltrain.metrics.check_metrics_pattern`), or ``None``.
    """

    def __init__(
        self,
        *,
        training_id: str,
        manifest: TrainingManifest,
        settings: Settings,
        log: logging.Logger | Any = None,
        publish: Callable[[dict[str, Any]], None] | None = None,
        metrics_pattern: str | None = None,
    ) -> None:
        self.training_id = training_id
        self.metrics_pattern = metrics_pattern
        self.manifest = manifest
        self.settings = settings
        self.log = log or logger
        self.publish = publish
        self.workspace = Workspace.for_run(settings.staging_dir, training_id)
        self.status = RunStatus(
            training_id=training_id,
            name=manifest.name,
            results_location=self.location,
            image=manifest.framework.image,
        )

    # --- the status document -------------------------------------------------------------------------

    @cached_property
    def results_store(self) -> ObjectStore:
        return open_store(self.manifest.results)

    @property
    def prefix(self) -> str:
        return f"{self.training_id}/"

    @property
    def location(self) -> str:
        return results_location(self.manifest.results.type, self.manifest.results.bucket, self.training_id)

    def read_status(self) -> RunStatus | None:
        """The status document in the bucket (:func:`read_status`)."""
        return read_status(self.results_store, self.training_id, check_bucket=False)

    def resume(self) -> RunStatus | None:
        """Take the status in the bucket as this run's (a retry, a resume, a halt); it or ``None``.

        :raises ResultsStoreError: the results store does not answer (``S303``, a retry may succeed).
        :raises CredentialsError: the results store refused the credentials (``C103``, not retried).
        """
        try:
            prior = self.read_status()
        except TransferError as err:
            refused = self.results_store.refused(err, field="training_results_reference.connection")
            if refused is not None:
                raise refused from None
            raise ResultsStoreError(f"cannot read the status of {self.training_id}: {err}") from None
        if prior is not None:
            self.status = prior
        return prior

    def begin(self, **fields: Any) -> RunStatus:
        """Start the run afresh: a new status document, ``PENDING`` (accepted, preparing)."""
        self.status = RunStatus(
            training_id=self.training_id,
            name=self.manifest.name,
            results_location=self.location,
            **fields,
        )
        return self.record(RunState.PENDING)

    def record(self, state: RunState, **changes: Any) -> RunStatus:
        """Enter ``state`` (or stay in it, applying ``changes``) and write the status document."""
        entering = state is not self.status.state or not self.status.history
        self.status = self.status.advance(state, **changes)
        self._write_status()
        if entering:
            self.log.info("Training run %s is %s", self.training_id, state.value)
        return self.status

    def processing(self, outcome: ContainerOutcome, docker_url: str, docker_id: str = "") -> RunStatus:
        """The run's container is there (started, or found by a new try): ``PROCESSING``, with the
        container, its host (URL and daemon id) and its GPUs (from its label) — unless the run is already
        further on."""
        if self.status.terminal or self.status.state.rank >= RunState.PROCESSING.rank:
            return self.status
        container = {"id": outcome.container_id, "docker_url": docker_url}
        if docker_id:
            container["docker_id"] = docker_id
        return self.record(RunState.PROCESSING, gpus=outcome.gpus, container=container, phase="")

    def progress(self, series: MetricSeries) -> RunStatus:
        """Record the metrics of a run that trains (``PROCESSING``): its points so far and the last value
        of each metric, in ``_status.json`` and the status XCom.  A run in any other state is left as it
        is (the metrics of its end are stored with it, :meth:`store`)."""
        if self.status.state is not RunState.PROCESSING or not series.points:
            return self.status
        return self.record(RunState.PROCESSING, steps=series.steps, metrics=series.final())

    def note_phase(self, phase: str) -> RunStatus:
        """Say what the run is doing within its state (e.g. who holds the GPUs it waits for)."""
        if self.status.terminal or phase == self.status.phase:
            return self.status
        return self.record(self.status.state, phase=phase)

    def end(self, state: RunState, error: WmlTrainError | None = None, **changes: Any) -> RunStatus:
        """End the run: ``COMPLETED``, or ``FAILED``/``HALTED`` with the error's code and message.

        An end written meanwhile by another process (a halt racing with the task's own finish) stands:
        terminal states are final.
        """
        try:
            current = self.read_status()
        except WmlTrainError:
            current = None
        if current is not None and current.terminal and current.history[:1] == self.status.history[:1]:
            self.status = current
            return current
        changes.setdefault("phase", "")
        if error is None:
            return self.record(state, **changes)
        self.status = self.status.fail(state, error.code, str(error), **changes)
        self._write_status()
        self.log.info("Training run %s is %s: %s %s", self.training_id, state.value, error.code, error)
        return self.status

    def end_in_task(self, state: RunState, error: WmlTrainError) -> RunStatus:
        """End the run in the task's XCom only, never in the bucket's ``_status.json``: the store is down,
        or the document there belongs to another task instance (a terminal state there would stand)."""
        self.status = self.status.fail(state, error.code, str(error))
        if self.publish is not None:
            self.publish(self.status.to_dict())
        return self.status

    def _write_status(self) -> None:
        document = self.status.to_dict()
        try:
            self.results_store.put_json(self.prefix + STATUS_FILE, document)
        except TransferError as err:
            raise ResultsStoreError(
                f"cannot write {self.results_store.describe(self.prefix + STATUS_FILE)}: {err}"
            ) from None
        finally:  # the XCom always holds the newest status, also when the bucket could not be written
            if self.publish is not None:
                self.publish(document)

    def result(self) -> dict[str, Any]:
        """The task's return value (XCom)."""
        return self.status.result()

    # --- DOWNLOADING ---------------------------------------------------------------------------------

    def download(self, model_definition: ModelDefinition) -> StagingResult:
        """Stage the data, extract the model code, and store the submission (zip and redacted manifest)."""
        self.record(RunState.DOWNLOADING)
        self.workspace.create()
        with self._load_data_log() as log:
            cache = ObjectCache(
                self.settings.cache_dir,
                max_bytes=self.settings.cache_max_bytes,
                fetch_slots=self.settings.transfer_workers,
            )
            log.info("Staging %s into %s", self.manifest.data.describe(), CONTAINER_DIRS["DATA_DIR"])
            with open_store(self.manifest.data) as store:
                result = stage(
                    store,
                    self.workspace.data,
                    prefix=self.manifest.data.prefix,
                    cache=cache,
                    workers=self.settings.transfer_workers,
                    log=log,
                    range_size=self.settings.part_size,
                    verify=self.settings.verify,
                )
        if not self.workspace.model.exists():  # extraction is atomic: a resumed run keeps the earlier one
            model_definition.extract(self.workspace.model)
        store = self.results_store
        try:
            store.put_bytes(
                self.prefix + SUBMITTED_CODE, model_definition.open_bytes(), content_type="application/zip"
            )
            store.put_bytes(
                self.prefix + MANIFEST_FILE, self.manifest.to_yaml().encode(), content_type="application/yaml"
            )
        except TransferError as err:
            raise ResultsStoreError(
                f"cannot store the submission in {store.describe(self.prefix)}: {err}"
            ) from None
        return result

    @contextlib.contextmanager
    def _load_data_log(self) -> Iterator[logging.Logger]:
        """The task's logger, also writing into ``<worker>/load-data.log`` (stored in ``learner-1/``)."""
        handler = _FileLog(self.workspace.worker_dir() / Path(LOAD_DATA_LOG).name)
        log = logging.getLogger(f"airflow_wmltrain.load_data.{self.training_id}")
        log.setLevel(logging.INFO)
        log.propagate = False
        log.addHandler(handler)
        log.addHandler(_Forward(self.log))
        try:
            yield log
        finally:
            for h in list(log.handlers):
                log.removeHandler(h)
                h.close()

    # --- STORING and the end -------------------------------------------------------------------------

    def store(
        self,
        hook: TrainingDockerHook,
        outcome: ContainerOutcome,
        *,
        halted: bool = False,
        halt_reason: str = "",
        mem_limit: object = None,
        skip_exit_codes: frozenset[int] = frozenset(),
    ) -> RunStatus:
        """Store the logs and results of an ended container, end the run, remove the container.

        What the container left is never followed nor read unbounded (:func:`upload_tree`,
        :func:`read_metrics`, ``save_logs``); what it wrote under the names of the run's own records is
        not stored (:data:`RESERVED_RESULTS`); what its root user kept for itself is copied out through
        the Docker API; the workspace is removed whatever the container's user made there.

        When the results store fails, the run ends ``FAILED`` (``S303``) in the task's XCom, and the
        container and the workspace are kept for a retry to store them; the message says where they are.

        :param hook: the run's Docker host.
        :param outcome: how the container ended.
        :param halted: the run was halted (``HALTED`` whatever the exit status).
        :param halt_reason: why, for the message.
        :param mem_limit: the container's memory limit, named when it was killed for lack of memory.
        :param skip_exit_codes: exit statuses that mean "nothing to train" (``skip_on_exit_code``): the
            run ends ``COMPLETED`` with that said in its phase.
        """
        container_id = outcome.container_id
        try:
            self.record(RunState.STORING, exit_code=outcome.exit_code, phase="")
            with self._collected_dirs(hook, container_id) as (results_dir, logs_dir, own_dir):
                pattern = check_metrics_pattern(self.metrics_pattern, field="metrics_pattern")
                from_log = MetricsCollector(pattern, interval=0, publish=lambda series: None, log=self.log)
                tail = hook.save_logs(
                    container_id,
                    own_dir / Path(TRAINING_LOG).name,
                    on_line=from_log.feed_line if pattern else None,
                )
                series = _final_series(results_dir / JSONL_FILE, from_log.series, self.status.steps)
                metrics = series.final(read_metrics(results_dir / METRICS_FILE))
                self._upload(results_dir, self.prefix, "results", reserved=RESERVED_RESULTS)
                self._upload(logs_dir, self.prefix + LOGS_PREFIX, "logs", reserved=RESERVED_LOGS)
                self._upload(own_dir, self.prefix + LOGS_PREFIX, "run's own logs")
            self.store_learning_curve(series.steps)
            error: WmlTrainError | None = None
            state, phase = RunState.COMPLETED, ""
            if halted:
                state, error = RunState.HALTED, RunHaltedError(halt_reason or "the run was halted")
            elif outcome.exit_code in skip_exit_codes and not outcome.oom_killed:
                phase = f"skipped: the training process exited with {outcome.exit_code} (skip_on_exit_code)"
            elif not outcome.succeeded:
                state, error = (
                    RunState.FAILED,
                    TrainingFailedError(outcome.failure(tail, mem_limit=mem_limit)),
                )
            status = self.end(state, error, metrics=metrics, steps=series.steps, phase=phase)
        except ResultsStoreError as err:
            raise self.results_kept(hook, container_id, err) from None
        hook.remove(container_id)
        self.remove_workspace(hook)
        return status

    def store_learning_curve(self, steps: Sequence[Mapping[str, float]] | None = None) -> str | None:
        """Draw the run's metrics per step (``steps``, else ``status.steps``; at least 2 points) and store
        the picture as ``<training-id>/learning-curve.png``; its key, or ``None`` when there is nothing to
        draw.

        A picture is never worth a run: a failure to draw or store it is a warning in the task log.
        """
        key = self.prefix + LEARNING_CURVE_FILE
        try:
            png = learning_curve_png(
                self.status.steps if steps is None else steps,
                training_id=self.training_id,
                hyperparameters=self.status.hyperparameters,
            )
            if png is None:
                return None
            self.results_store.put_bytes(key, png, content_type="image/png")
        except Exception as err:  # drawing must never fail the run
            self.log.warning("Cannot store the learning curve of %s: %s", self.training_id, err)
            return None
        self.log.info("Stored the learning curve in %s", self.results_store.describe(key))
        return key

    def remove_workspace(self, hook: TrainingDockerHook | None = None) -> None:
        """Remove the run's directories; what the container's root user made, through its Docker host."""
        try:
            docker = hook.api_client if hook is not None else None
        except WmlTrainError:
            docker = None
        if not self.workspace.remove(docker, self.manifest.framework.image):
            self.log.warning(
                "Cannot remove %s on %s: the training container left files the worker may not delete; "
                "remove it as root",
                self.workspace.root,
                socket.gethostname(),
            )

    def results_kept(self, hook: TrainingDockerHook, container_id: str, err: WmlTrainError) -> WmlTrainError:
        """The run ends FAILED S303 in the XCom; the error says where its results wait for a retry."""
        if self.workspace.exists():
            where = f"{self.workspace.root} on {socket.gethostname()}"
        else:
            where = f"the container {container_id[:12]} on the Docker host {hook.docker_url}"
        error = ResultsStoreError(f"{err}; the results and logs are kept in {where}, a retry stores them")
        status = self.status
        if status.terminal:  # the end itself could not be written: it did not happen
            status = replace(status, history=status.history[:-1], error=None)
        self.status = status
        self.end_in_task(RunState.FAILED, error)
        self.log.error("Training run %s: %s", self.training_id, error)
        return error

    @contextlib.contextmanager
    def _collected_dirs(
        self, hook: TrainingDockerHook, container_id: str
    ) -> Iterator[tuple[Path, Path, Path]]:
        """The run's results and logs directories, and a folder for the run's own logs that only the
        worker writes: on this machine, or copied out through Docker.

        A directory the worker cannot read all of (files and folders the container's root user kept for
        itself) is copied out of the container too: the Docker daemon reads it as root.  Copies go to a
        folder only the worker may enter (in the run's directory, not mounted, when it is here).
        """
        here = self.workspace.exists()
        with tempfile.TemporaryDirectory(
            prefix=f"{self.training_id}-", dir=self.workspace.root if here else None
        ) as tmp:
            if here:
                own = self.workspace.worker_dir()
                yield (
                    self._readable(hook, container_id, self.workspace.results, "RESULT_DIR", Path(tmp)),
                    self._readable(hook, container_id, self.workspace.logs, "LOG_DIR", Path(tmp)),
                    own,
                )
                return
            self.log.info("The run's directories are not on this machine; copying them out of the container")
            results, logs, own = Path(tmp, "results"), Path(tmp, "logs"), Path(tmp, "worker")
            hook.copy_out(container_id, CONTAINER_DIRS["RESULT_DIR"], results)
            hook.copy_out(container_id, CONTAINER_DIRS["LOG_DIR"], logs)
            own.mkdir(mode=0o700)
            yield results, logs, own

    def _readable(
        self, hook: TrainingDockerHook, container_id: str, path: Path, name: str, tmp: Path
    ) -> Path:
        """``path``, or a copy out of the container where the worker may not read all of it."""
        unreadable = unreadable_entries(path)
        if not unreadable:
            return path
        where = CONTAINER_DIRS[name]
        self.log.warning(
            "The worker may not read %s in $%s (the container's user kept them for itself); "
            "copying %s out of the container",
            ", ".join(entry or "the folder itself" for entry in unreadable[:5])
            + (" ..." if len(unreadable) > 5 else ""),
            name,
            where,
        )
        copy = tmp / name
        try:
            hook.copy_out(container_id, where, copy)
        except (DockerException, RequestException, OSError, tarfile.TarError, ServerError) as err:
            self.log.warning(
                "Cannot copy %s out of the container (%s); storing what the worker may read", where, err
            )
            return path
        return copy

    def _upload(self, source: Path, prefix: str, what: str, *, reserved: tuple[str, ...] = ()) -> None:
        try:
            empty = not source.is_dir() or not any(source.iterdir())
        except OSError:
            empty = False  # the upload says what it cannot read
        if empty:
            self.log.info("No %s to store", what)
            return
        result = upload_tree(
            self.results_store,
            source,
            prefix,
            workers=self.settings.transfer_workers,
            part_size=self.settings.part_size,
            multipart_threshold=self.settings.multipart_threshold,
            log=self.log,
            reserved=reserved,
        )
        self.log.info("Stored the %s in %s: %s", what, self.results_store.describe(prefix), result.summary())

    def end_without_container(self, state: RunState, error: WmlTrainError) -> RunStatus:
        """End a run that has no container (staging failed, no GPU, halted before start...), logs stored."""
        if self.status.terminal:
            return self.status
        try:
            self.record(RunState.STORING, phase="")
            with contextlib.suppress(WmlTrainError):
                self._upload(self.workspace.worker, self.prefix + LOGS_PREFIX, "logs")
            self.end(state, error)
        except ResultsStoreError:  # the store is down too: the XCom still says how the run ended
            self.end_in_task(state, error)
        self.workspace.remove()
        return self.status

    def halt(
        self, hook: TrainingDockerHook, container_id: str | None, *, grace: int, reason: str
    ) -> RunStatus:
        """Halt the run — the one halt, whoever asked: stop the container (SIGTERM, SIGKILL after
        ``grace`` s), store its logs and results, end it ``HALTED``.

        A run already over is left as it is; a container that ended by itself meanwhile is stored as it
        ended; a run without a container ends ``HALTED`` at once.
        """
        self.resume()
        if self.status.terminal:
            self.log.info("Training run %s is already %s", self.training_id, self.status.state.value)
            return self.status
        try:
            outcome = (
                hook.inspect(container_id) if container_id else hook.find_run_container(self.training_id)
            )
        except NotFound:
            outcome = None
        if outcome is None:
            self.log.info("Training run %s has no container: it ends HALTED", self.training_id)
            return self.end_without_container(RunState.HALTED, RunHaltedError(reason))
        training = outcome.running
        if training:
            self.log.info(
                "Halting training run %s: stopping container %s (SIGKILL after %d s)",
                self.training_id,
                outcome.container_id[:12],
                grace,
            )
            hook.stop(outcome.container_id, grace=grace)
            outcome = hook.inspect(outcome.container_id)
        else:
            self.log.info("Training run %s had already ended; storing it as it ended", self.training_id)
        return self.store(hook, outcome, halted=training, halt_reason=reason)


def halt_run(
    *,
    training_id: str,
    container_id: str | None,
    docker_host: Mapping[str, Any],
    manifest: Mapping[str, Any] | str,
    grace: int,
    reason: str,
    metrics_pattern: str | None = None,
) -> dict[str, Any]:
    """Halt a run where no operator holds it: the detached halter and the trigger's ``on_kill``.

    :param training_id: the run's id.
    :param container_id: its container (``None``: found by name).
    :param docker_host: :meth:`TrainingDockerHook.to_dict` of the host running it.
    :param manifest: the run's manifest (as submitted; it names the results bucket and its connection).
    :param grace: seconds between SIGTERM and SIGKILL.
    :param reason: why, for the run's error message.
    :param metrics_pattern: the task's pattern of metrics in the training's output (the stored run's
        metrics per step come from its log too).
    :returns: the run's result (as the task would return it).
    """
    from airflow_wmltrain.hooks.docker import TrainingDockerHook
    from airflow_wmltrain.manifest import load_manifest
    from airflow_wmltrain.settings import Settings

    settings = Settings.from_airflow_config()
    run = TrainingRun(
        training_id=training_id,
        manifest=load_manifest(manifest, settings=settings),
        settings=settings,
        metrics_pattern=metrics_pattern,
    )
    hook = TrainingDockerHook.from_dict(docker_host)
    return run.halt(hook, container_id, grace=grace, reason=reason).result()
