"""One training run's phases outside the container: its status document, data staging, results storing.

:class:`TrainingRun` is used by the operator (``DOWNLOADING`` → container → ``STORING`` → end), by the
operator's deferred resume, and by :func:`halt_run` (the trigger's ``on_kill`` and ``wmltrain halt``).
Every transition rewrites ``<training-id>/_status.json`` in the results bucket.  Failed and halted runs
go through ``STORING`` too: their logs always land in the bucket.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from docker.errors import NotFound

from airflow_wmltrain.errors import ResultsStoreError, WmlTrainError
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
from airflow_wmltrain.runtime import container
from airflow_wmltrain.runtime.workspace import CONTAINER_DIRS, Workspace
from airflow_wmltrain.storage import open_store
from airflow_wmltrain.storage.cache import ObjectCache
from airflow_wmltrain.storage.staging import StagingResult, stage
from airflow_wmltrain.storage.transfer import TransferError
from airflow_wmltrain.storage.upload import upload_tree

if TYPE_CHECKING:
    from docker import APIClient

    from airflow_wmltrain.manifest import TrainingManifest
    from airflow_wmltrain.model_definition import ModelDefinition
    from airflow_wmltrain.settings import Settings
    from airflow_wmltrain.storage.base import ObjectStore

logger = logging.getLogger(__name__)

#: ``$RESULT_DIR/metrics.json``: the final metrics a training script reports (kept when small).
METRICS_FILE = "metrics.json"
_MAX_METRICS_BYTES = 64 * 1024


def read_metrics(path: Path) -> dict[str, Any]:
    """The scalar entries of a small ``metrics.json`` (anything else is ignored, not an error)."""
    try:
        if path.stat().st_size > _MAX_METRICS_BYTES:
            return {}
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {str(k): v for k, v in document.items() if isinstance(v, (int, float, str, bool)) or v is None}


class _FileLog(logging.Handler):
    """Copies a logger's records into a file (``learner-1/load-data.log``)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = path.open("a", encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream.write(self.format(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()
        super().close()


class TrainingRun:
    """The bookkeeping of one run: where its files are and what state it is in.

    :param training_id: the run's id.
    :param manifest: the run's (validated) manifest.
    :param settings: the ``[wmltrain]`` settings.
    :param log: the task's logger.
    :param status: the status so far (read from the bucket on a resume); a fresh one when ``None``.
    :param on_status: called with the status document after each write (the operator publishes it as the
        XCom :data:`STATUS_XCOM_KEY`, which ``wmltrain list``/``show`` read through the REST API).
    """

    def __init__(
        self,
        *,
        training_id: str,
        manifest: TrainingManifest,
        settings: Settings,
        log: logging.Logger | Any = None,
        status: RunStatus | None = None,
        on_status: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.training_id = training_id
        self.on_status = on_status
        self.manifest = manifest
        self.settings = settings
        self.log = log or logger
        self.workspace = Workspace.for_run(settings.staging_dir, training_id)
        self.status = status or RunStatus(
            training_id=training_id,
            name=manifest.name,
            results_location=results_location(manifest.results.type, manifest.results.bucket, training_id),
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
        """The status document in the bucket, or ``None`` when the run has not written one."""
        status, _headers, body = self.results_store.request("GET", self.prefix + STATUS_FILE, missing_ok=True)
        if status == 404:
            return None
        try:
            return RunStatus.from_dict(json.loads(body))
        except ValueError as err:
            self.log.warning("Ignoring an unreadable %s: %s", self.prefix + STATUS_FILE, err)
            return None

    def record(self, state: RunState, **changes: Any) -> RunStatus:
        """Enter ``state`` and write the status document."""
        self.status = self.status.advance(state, **changes)
        self._write_status()
        self.log.info("Training run %s is %s", self.training_id, state.value)
        return self.status

    def record_end(self, state: RunState, error: WmlTrainError | None = None, **changes: Any) -> RunStatus:
        """End the run: ``COMPLETED``, or ``FAILED``/``HALTED`` with the error's code and message.

        An end written meanwhile by another process (a halt racing with the task's own finish) stands:
        terminal states are final.
        """
        current = self.read_status()
        if current is not None and current.terminal and current.history[:1] == self.status.history[:1]:
            self.status = current
            return current
        if error is None:
            return self.record(state, **changes)
        self.status = self.status.fail(state, error.code, str(error), **changes)
        self._write_status()
        self.log.info("Training run %s is %s: %s %s", self.training_id, state.value, error.code, error)
        return self.status

    def _write_status(self) -> None:
        document = self.status.to_dict()
        try:
            self.results_store.put_json(self.prefix + STATUS_FILE, document)
        except TransferError as err:
            raise ResultsStoreError(
                f"cannot write {self.results_store.describe(self.prefix + STATUS_FILE)}: {err}"
            ) from None
        if self.on_status is not None:
            self.on_status(document)

    # --- DOWNLOADING ---------------------------------------------------------------------------------

    def download(self, model_definition: ModelDefinition) -> StagingResult:
        """Stage the data, extract the model code, and store the submission (zip and redacted manifest)."""
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
        """The task's logger, also writing into ``<logs>/load-data.log``."""
        handler = _FileLog(self.workspace.logs / Path(LOAD_DATA_LOG).name)
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

    # --- STORING -------------------------------------------------------------------------------------

    def store(
        self,
        cli: APIClient,
        container_id: str,
        *,
        halted: bool = False,
        mem_limit: object = None,
    ) -> RunStatus:
        """Store the logs and results of an ended container, then end the run and remove the container.

        :param cli: the Docker host's client.
        :param container_id: the run's container (stopped).
        :param halted: the run was halted (``HALTED`` whatever the exit status).
        :param mem_limit: the container's memory limit, named when it was killed for lack of memory.
        """
        outcome = container.inspect(cli, container_id)
        self.record(RunState.STORING, exit_code=outcome.exit_code)
        with self._collected_dirs(cli, container_id) as (results_dir, logs_dir):
            tail = container.save_logs(cli, container_id, logs_dir / Path(TRAINING_LOG).name)
            metrics = read_metrics(results_dir / METRICS_FILE)
            self._upload(results_dir, self.prefix, "results")
            self._upload(logs_dir, self.prefix + str(Path(TRAINING_LOG).parent) + "/", "logs")
        error: WmlTrainError | None = None
        state = RunState.COMPLETED
        if halted:
            state, error = RunState.HALTED, _halted_error()
        elif not outcome.succeeded:
            from airflow_wmltrain.errors import TrainingFailedError

            state, error = RunState.FAILED, TrainingFailedError(outcome.failure(tail, mem_limit=mem_limit))
        status = self.record_end(state, error, metrics=metrics)
        container.remove(cli, container_id)
        self.workspace.remove()
        return status

    @contextlib.contextmanager
    def _collected_dirs(self, cli: APIClient, container_id: str) -> Iterator[tuple[Path, Path]]:
        """The run's results and logs directories: on this machine, or copied out through Docker."""
        if self.workspace.exists():
            yield self.workspace.results, self.workspace.logs
            return
        self.log.info("The run's directories are not on this machine; copying them out of the container")
        with tempfile.TemporaryDirectory(prefix=f"{self.training_id}-") as tmp:
            results, logs = Path(tmp, "results"), Path(tmp, "logs")
            container.copy_out(cli, container_id, CONTAINER_DIRS["RESULT_DIR"], results)
            container.copy_out(cli, container_id, CONTAINER_DIRS["LOG_DIR"], logs)
            yield results, logs

    def _upload(self, source: Path, prefix: str, what: str) -> None:
        if not any(source.iterdir()):
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
        )
        self.log.info("Stored the %s in %s: %s", what, self.results_store.describe(prefix), result.summary())

    def end_without_container(self, state: RunState, error: WmlTrainError) -> RunStatus:
        """End a run that never got a container (staging failed, no GPU...), its logs stored."""
        if not self.status.terminal:
            self.record(RunState.STORING)
        logs = self.workspace.logs
        if logs.is_dir():
            with contextlib.suppress(WmlTrainError):
                self._upload(logs, self.prefix + str(Path(TRAINING_LOG).parent) + "/", "logs")
        status = self.record_end(state, error) if not self.status.terminal else self.status
        self.workspace.remove()
        return status

    def result(self) -> dict[str, Any]:
        """The task's return value (XCom): small and JSON."""
        return {
            "training_id": self.training_id,
            "state": self.status.state.value,
            "results_location": self.location,
            "gpus": list(self.status.gpus),
            "metrics": dict(self.status.metrics),
        }


class _Forward(logging.Handler):
    """Passes records on to another logger (the task's)."""

    def __init__(self, target: logging.Logger | Any) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.log(record.levelno, "%s", record.getMessage())


def _halted_error() -> WmlTrainError:
    from airflow_wmltrain.errors import RunHaltedError

    return RunHaltedError("the run was halted (its task was marked failed or cleared, or it was halted)")


def halt_run(
    *,
    training_id: str,
    container_id: str,
    docker_host: Mapping[str, Any],
    manifest: Mapping[str, Any] | str,
    grace: int,
) -> dict[str, Any]:
    """Halt a run: stop its container (SIGTERM, SIGKILL after ``grace`` s), store its logs, end it HALTED.

    Used where no operator instance holds the run: the trigger's ``on_kill`` and ``wmltrain halt``.

    :param training_id: the run's id.
    :param container_id: its container.
    :param docker_host: :meth:`DockerHost.to_dict` of the host running it.
    :param manifest: the run's manifest (as submitted; it names the results bucket and its credentials).
    :param grace: seconds between SIGTERM and SIGKILL.
    :returns: the run's result (as the task would return it).
    """
    from airflow_wmltrain.manifest import load_manifest
    from airflow_wmltrain.runtime.docker_host import DockerHost
    from airflow_wmltrain.settings import Settings

    settings = Settings.from_airflow_config()
    loaded = load_manifest(manifest, settings=settings)
    cli = DockerHost.from_dict(dict(docker_host)).client()
    run = TrainingRun(training_id=training_id, manifest=loaded, settings=settings)
    run.status = run.read_status() or run.status
    if run.status.terminal:
        return run.result()
    try:
        training = container.inspect(cli, container_id).running
    except NotFound:
        logger.info("Training run %s has no container any more: nothing to halt", training_id)
        return run.result()
    if training:
        logger.info("Halting training run %s: stopping container %s", training_id, container_id[:12])
        container.stop(cli, container_id, grace=grace)
    else:
        logger.info("Training run %s had already ended; storing it as it ended", training_id)
    run.store(cli, container_id, halted=training)
    return run.result()
