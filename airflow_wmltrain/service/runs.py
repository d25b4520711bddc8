"""Training runs as Airflow sees them, through the REST API: list, find, submit, halt, delete, logs, wait.

Every ``TrainingRunOperator`` task publishes its run's status document as the XCom ``wmltrain_status``
(rewritten at each transition) and an XCom named after its training id (``wmltrain_run_<id>``).  So all
training runs — those of the bundled ``wmltrain_training`` DAG and those of operator tasks in any other
DAG, mapped grid tasks included — are found with one wildcard XCom query, and one run by its id with
another; the task instances' states (one batch call for all of them) complete the picture (a task marked
failed while its run was training ended ``HALTED``).  Runs of the bundled DAG that have not started their
task yet are listed from the DAG's runs (``QUEUED``).

Waits (``train --wait``, ``logs --follow``, ``delete --halt``) know where the run is and cost one API call
per look: the task instance, or the status XCom, or the next page of the log — never the wildcard query.
They go through :func:`airflow_wmltrain.waiting.wait_until`: a growing delay, time-outs, unreachable
servers and 5xx answers ridden out up to ``max_outage`` seconds in a row.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from airflow_wmltrain.errors import ConfigurationError, RunHaltedError
from airflow_wmltrain.lifecycle import (
    RUN_XCOM_PREFIX,
    STATUS_XCOM_KEY,
    RunState,
    RunStatus,
    iso_time,
    parse_time,
)
from airflow_wmltrain.service.api import (
    PLUGIN_API,
    TRANSIENT_ERRORS,
    AirflowApi,
    ApiConflictError,
    ApiError,
    ApiNotFoundError,
    ApiServerError,
    ApiUnreachableError,
    quote,
)
from airflow_wmltrain.waiting import Backoff, wait_until

if TYPE_CHECKING:
    from airflow_wmltrain.frameworks import FrameworkRegistry
    from airflow_wmltrain.settings import Settings

TRAINING_DAG_ID = "wmltrain_training"
#: The JSON-schema keyword of the bundled DAG's ``manifest`` parameter under which the server publishes
#: what a submission is checked against there, not on the submitter's machine: its framework registry
#: and its resource classes (:func:`server_facts`, published by ``training_dag.published_facts``).
SERVER_FACTS_KEY = "x-wmltrain-server"
#: The task of the bundled DAG.
TRAINING_TASK_ID = "train"
#: Task-instance states after which the task will not run again.
TI_OVER_STATES = frozenset({"success", "failed", "upstream_failed", "skipped", "removed"})
#: Task-instance states in which the task instance ended without its run ending: halted, or lost.
TI_FAILED_STATES = frozenset({"failed", "upstream_failed", "removed"})
#: The task instance's note when ``wmltrain halt`` marked it failed.
HALT_NOTE = "halted by wmltrain halt"
#: How long a wait rides out an API server that does not answer (time-outs, 5xx) before it gives up.
DEFAULT_MAX_OUTAGE = 1800.0
#: The delays between the looks of a wait.
POLL_BACKOFF = Backoff(interval=2.0, max_interval=30.0)
#: How many times a submission is sent at most, and the delays between the tries.
SUBMIT_TRIES = 5
SUBMIT_BACKOFF = Backoff(interval=2.0, max_interval=20.0)
_FETCH_WORKERS = 8
_BATCH_PAGE = 100
Notify = Callable[[str], None]


@dataclass
class TrainingRunRecord:
    """One training run.

    :param training_id: its id.
    :param dag_id: the DAG it belongs to.
    :param run_id: the DAG run.
    :param task_id: the task (``None`` while a bundled run has not started it).
    :param map_index: the task's map index (``-1`` when not mapped).
    :param ti_state: the task instance's state (Airflow's word).
    :param try_number: the task instance's try.
    :param status: the run's status document as its task published it (no history before it did).
    :param submitted_at: when the DAG run was queued, for runs without a status document yet.
    :param ti_note: the task instance's note (``wmltrain halt`` leaves one).
    :param ti_end: when the task instance ended, if it did.
    """

    training_id: str
    dag_id: str
    run_id: str
    task_id: str | None = None
    map_index: int = -1
    ti_state: str = ""
    try_number: int = 0
    status: RunStatus = field(default_factory=lambda: RunStatus(training_id=""))
    submitted_at: str | None = None
    ti_note: str = ""
    ti_end: str | None = None

    def __post_init__(self) -> None:
        if not self.status.training_id:
            self.status = replace(self.status, training_id=self.training_id)

    @property
    def view(self) -> RunStatus:
        """The run's status as ``list``/``show`` tell it: its document's, unless the task ended without
        the run ending — marked failed while it trained (a halt requested, not yet written by the
        worker) or lost.  Derived in memory; nothing is written."""
        status = self.status
        if status.terminal:
            return status
        at = self.ti_end or None
        if self.ti_state in TI_FAILED_STATES:
            if status.state in (RunState.DOWNLOADING, RunState.PROCESSING, RunState.STORING):
                if self.ti_note == HALT_NOTE:
                    message = "the run was halted (wmltrain halt)"
                else:
                    message = f"the task ended ({self.ti_state}) while the run was training"
                return status.fail(RunState.HALTED, RunHaltedError.code, message, at=at)
            return status.advance(RunState.FAILED, at=at)
        if self.ti_state == "success":
            return status.advance(RunState.COMPLETED, at=at)
        return status

    @property
    def name(self) -> str:
        return self.status.name

    @property
    def state(self) -> RunState:
        """The run's state (see :attr:`view`)."""
        return self.view.state

    @property
    def active(self) -> bool:
        return not self.view.terminal

    @property
    def settled(self) -> bool:
        """Whether the run is over and its task will not run again (no retry to come)."""
        return not self.active and (self.task_id is None or self.ti_state in TI_OVER_STATES)

    @property
    def error(self) -> dict[str, str] | None:
        error = self.view.error
        return {str(k): str(v) for k, v in error.items()} if error else None

    @property
    def submitted(self) -> str:
        history = self.status.history
        return history[0].at if history else str(self.submitted_at or "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (``--json``); the status document holds no secret."""
        view = self.view
        return {
            "training_id": self.training_id,
            "name": self.name,
            "state": view.state.value,
            "phase": view.phase,
            "submitted_at": self.submitted,
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "map_index": self.map_index,
            "task_state": self.ti_state,
            "try_number": self.try_number,
            "results_location": view.results_location or None,
            "data_location": view.data_location or None,
            "image": view.image or None,
            "command": view.command or None,
            "gpus": list(view.gpus),
            "history": [t.to_dict() for t in view.history],
            "error": self.error,
            "exit_code": view.exit_code,
            "metrics": dict(view.metrics),
            "metric_points": len(view.steps),
        }


def _ti_path(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    path = f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}"
    return path + (f"/{map_index}" if map_index >= 0 else "")


def _xcom_path(dag_id: str, run_id: str, task_id: str, key: str) -> str:
    run = f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}"
    return f"{run}/taskInstances/{quote(task_id)}/xcomEntries/{quote(key)}"


def _status_of(xcom: Any) -> RunStatus | None:
    """The status document of a ``wmltrain_status`` XCom answer (``None`` when it holds none)."""
    value = xcom.get("value") if isinstance(xcom, dict) else None
    if not isinstance(value, dict) or not value.get("training_id"):
        return None
    try:
        return RunStatus.from_dict(value)
    except ValueError:
        return None


def _fetch_status(
    api: AirflowApi, dag_id: str, run_id: str, task_id: str, map_index: int
) -> RunStatus | None:
    """One task's published status document (``None`` when it has published none)."""
    try:
        xcom = api.call(
            "GET",
            _xcom_path(dag_id, run_id, task_id, STATUS_XCOM_KEY),
            params={"map_index": map_index, "deserialize": "true"},
        )
    except ApiNotFoundError:
        return None
    return _status_of(xcom)


def _ti_fields(ti: dict[str, Any]) -> dict[str, Any]:
    """What a record keeps of a task instance (an API answer)."""
    end = ti.get("end_date")
    return {
        "ti_state": str(ti.get("state") or ""),
        "try_number": int(ti.get("try_number") or 0),
        "ti_note": str(ti.get("note") or ""),
        "ti_end": _iso_ms(str(end)) if end else None,
    }


def _task_instances(api: AirflowApi, entries: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], Any]:
    """The task instances of ``entries`` (XCom entries), keyed by (dag, run, task, map index), fetched
    in one batch call (``POST /dags/~/dagRuns/~/taskInstances/list``, a read: safe to repeat) per page."""
    if not entries:
        return {}
    body: dict[str, Any] = {
        "dag_ids": sorted({str(e["dag_id"]) for e in entries}),
        "dag_run_ids": sorted({str(e["run_id"]) for e in entries}),
        "task_ids": sorted({str(e["task_id"]) for e in entries}),
        "page_limit": _BATCH_PAGE,
    }
    found: dict[tuple[str, str, str, int], Any] = {}
    offset = 0
    while True:
        page = api.call(
            "POST",
            "/dags/~/dagRuns/~/taskInstances/list",
            body={**body, "page_offset": offset},
            idempotent=True,
        )
        items = page.get("task_instances", []) if isinstance(page, dict) else []
        for ti in items:
            key = (str(ti.get("dag_id")), str(ti.get("dag_run_id")), str(ti.get("task_id")))
            found[(*key, int(ti.get("map_index", -1)))] = ti
        offset += len(items)
        if not items or offset >= int(page.get("total_entries", 0)):
            return found


def _records(api: AirflowApi, entries: list[dict[str, Any]]) -> list[TrainingRunRecord]:
    """The runs of ``wmltrain_status`` XCom entries: one batch call for their task instances, one call
    per entry for its document (the API's XCom lists do not carry values)."""
    tis = _task_instances(api, entries)

    def record(entry: dict[str, Any]) -> TrainingRunRecord | None:
        dag_id, run_id, task_id = str(entry["dag_id"]), str(entry["run_id"]), str(entry["task_id"])
        map_index = int(entry.get("map_index", -1))
        ti = tis.get((dag_id, run_id, task_id, map_index))
        if ti is None:  # vanished meanwhile
            return None
        status = _fetch_status(api, dag_id, run_id, task_id, map_index)
        if status is None:
            return None
        return TrainingRunRecord(
            training_id=status.training_id,
            dag_id=dag_id,
            run_id=run_id,
            task_id=task_id,
            map_index=map_index,
            status=status,
            **_ti_fields(ti),
        )

    with ThreadPoolExecutor(_FETCH_WORKERS) as pool:
        return [found for found in pool.map(record, entries) if found is not None]


def _plugin_records(api: AirflowApi, training_id: str | None = None) -> list[TrainingRunRecord] | None:
    """The runs (or one training id's) in one call to the provider's endpoint (``GET /wmltrain/runs``,
    :mod:`~airflow_wmltrain.service.runs_api`); ``None`` when the server has no such endpoint (a
    provider that predates it: the public API is then asked, one call per run)."""
    try:
        page = api.call("GET", "/runs", params={"training_id": training_id}, under=PLUGIN_API)
    except ApiNotFoundError:
        return None
    if not isinstance(page, dict) or not isinstance(page.get("runs"), list):
        return None  # the UI's page: no plugin there
    records = []
    for row in page["runs"]:
        status = _status_of(row)
        if status is None:
            continue
        records.append(
            TrainingRunRecord(
                training_id=status.training_id,
                dag_id=str(row["dag_id"]),
                run_id=str(row["run_id"]),
                task_id=str(row["task_id"]),
                map_index=int(row.get("map_index", -1)),
                status=status,
                **_ti_fields(row),
            )
        )
    return records


def _queued_bundled_runs(api: AirflowApi, known: set[str]) -> Iterator[TrainingRunRecord]:
    """Runs of the bundled DAG whose task has not published a status yet."""
    try:
        runs = list(api.paginate(f"/dags/{TRAINING_DAG_ID}/dagRuns", "dag_runs"))
    except ApiNotFoundError:
        return
    for run in runs:
        run_id = str(run.get("dag_run_id") or run.get("run_id") or "")
        if not run_id.startswith("training-") or run_id in known:
            continue
        yield _bundled_record(run_id, run)


def list_runs(
    api: AirflowApi, *, state: str | None = None, limit: int | None = None
) -> list[TrainingRunRecord]:
    """Every training run Airflow knows of, newest first.

    Costs two calls and a page of the bundled DAG's runs per 100 with the provider's endpoint on the
    server; without it, one call per run (its document) plus the XCom entries and their task instances.

    :param state: only runs in this state (``COMPLETED``, ``FAILED``...; case-insensitive).
    :param limit: at most this many.
    """
    records = _plugin_records(api)
    if records is None:
        entries = list(
            api.paginate(
                "/dags/~/dagRuns/~/taskInstances/~/xcomEntries",
                "xcom_entries",
                params={"xcom_key": STATUS_XCOM_KEY},
            )
        )
        records = _records(api, entries)
    records.extend(_queued_bundled_runs(api, {r.training_id for r in records}))
    if state:
        records = [r for r in records if r.state.value == state.upper()]
    records.sort(key=lambda r: r.submitted, reverse=True)
    return records[:limit] if limit else records


def find_run(api: AirflowApi, training_id: str) -> TrainingRunRecord:
    """One training run by its id.

    :raises ApiNotFoundError: no run has that id.
    """
    found = _plugin_records(api, training_id)
    if found is None:
        entries = list(
            api.paginate(
                "/dags/~/dagRuns/~/taskInstances/~/xcomEntries",
                "xcom_entries",
                params={"xcom_key": RUN_XCOM_PREFIX + training_id},
            )
        )
        found = _records(api, entries)
    records = [r for r in found if r.training_id == training_id]
    if records:
        return max(records, key=lambda r: r.submitted)
    try:
        run = api.call("GET", f"/dags/{TRAINING_DAG_ID}/dagRuns/{quote(training_id)}")
    except ApiNotFoundError:
        raise ApiNotFoundError(
            f"no training run {training_id}; `wmltrain list` shows the runs Airflow knows of"
        ) from None
    return _bundled_record(training_id, run)


def _bundled_record(training_id: str, run: dict[str, Any]) -> TrainingRunRecord:
    """A bundled DAG run whose task has published nothing yet: its name from the submitted manifest."""
    import yaml

    state = str(run.get("state") or "")
    name = ""
    conf = run.get("conf") or {}
    try:
        manifest: Any = yaml.safe_load(str(conf.get("manifest") or "")) if isinstance(conf, dict) else {}
        name = str(manifest["model_definition"]["name"])
    except (yaml.YAMLError, KeyError, TypeError):
        pass
    end = run.get("end_date")
    return TrainingRunRecord(
        training_id=training_id,
        dag_id=TRAINING_DAG_ID,
        run_id=training_id,
        ti_state=state if state in ("failed", "success") else "queued",
        status=RunStatus(training_id=training_id, name=name),
        submitted_at=_iso_ms(str(run.get("queued_at") or run.get("run_after") or "")),
        ti_end=_iso_ms(str(end)) if end else None,
    )


def _iso_ms(text: str) -> str:
    """An API timestamp in the status documents' form (unchanged when it is not a time)."""
    moment = parse_time(text)
    return iso_time(moment) if moment is not None else text


# --- submission -----------------------------------------------------------------------------------------


class SubmissionError(ApiError):
    """A submission failed for good.

    :param may_exist: whether the run may have been created all the same (a try that timed out or got a
        5xx may have been done by the server); ``False`` only when no try can have created it.
    :param cause: the last failure.
    """

    def __init__(self, message: str, *, may_exist: bool, cause: ApiError) -> None:
        super().__init__(message, status=cause.status)
        self.may_exist = may_exist
        self.cause = cause
        self.code = cause.code
        self.retryable = cause.retryable
        self.exit_status = cause.exit_status


def _conf_digest(conf: Any) -> str:
    return hashlib.sha256(json.dumps(conf, sort_keys=True, default=str).encode()).hexdigest()


def _is_ours(existing: Any, conf: dict[str, Any]) -> bool:
    """Whether an existing DAG run of the bundled DAG is the one ``conf`` was submitted for."""
    if not isinstance(existing, dict):
        return False
    theirs = existing.get("conf")
    if not isinstance(theirs, dict):
        return False
    return _conf_digest({k: theirs.get(k) for k in conf}) == _conf_digest(conf)


def _may_have_reached(err: BaseException) -> bool:
    if isinstance(err, ApiUnreachableError):
        return err.maybe_sent
    return isinstance(err, ApiServerError | TimeoutError)


@dataclass(frozen=True)
class ServerFacts:
    """What the server checks a submission against: its framework registry (the images it can run) and
    its resource classes (GPUs per class). The command line validates with these, not its own.

    :param frameworks: the registry in its file's shape (``FrameworkRegistry.to_data``).
    :param resource_classes: class name → GPU count.
    """

    frameworks: dict[str, Any]
    resource_classes: dict[str, int]

    def registry(self) -> FrameworkRegistry:
        """The server's :class:`~airflow_wmltrain.frameworks.FrameworkRegistry`."""
        from airflow_wmltrain.frameworks import FrameworkRegistry

        where = f"the frameworks of the server's {TRAINING_DAG_ID}"
        return FrameworkRegistry.from_data(self.frameworks, where)

    def settings(self, local: Settings) -> Settings:
        """``local`` :class:`~airflow_wmltrain.settings.Settings` with the server's resource classes."""
        return replace(local, resource_classes=dict(self.resource_classes))


def _no_training_dag(api: AirflowApi) -> str:
    return (
        f"the Airflow server {api.url} has no DAG {TRAINING_DAG_ID}; install airflow-wmltrain on it and "
        "put dags/wmltrain_training.py in its DAGs folder"
    )


def server_facts(api: AirflowApi) -> ServerFacts | None:
    """The server's :class:`ServerFacts`, read from the bundled DAG (one API call); ``None`` when its
    DAG publishes none (a server older than this command line: the local configuration decides).

    :raises ConfigurationError: (S001) the server has no bundled training DAG (nothing can be submitted).
    """
    try:
        details = api.call("GET", f"/dags/{TRAINING_DAG_ID}/details")
    except ApiNotFoundError:
        raise ConfigurationError(_no_training_dag(api)) from None
    param = ((details or {}).get("params") or {}).get("manifest") or {}
    facts = (param.get("schema") or {}).get(SERVER_FACTS_KEY)
    if not isinstance(facts, dict):
        return None
    frameworks, classes = facts.get("frameworks"), facts.get("resource_classes")
    if not isinstance(frameworks, dict) or not isinstance(classes, dict):
        return None
    return ServerFacts(frameworks=frameworks, resource_classes={str(k): int(v) for k, v in classes.items()})


def submit_run(
    api: AirflowApi,
    training_id: str,
    conf: dict[str, Any],
    *,
    note: str | None = None,
    tries: int = SUBMIT_TRIES,
    backoff: Backoff = SUBMIT_BACKOFF,
    notify: Notify | None = None,
) -> None:
    """Start a run of the bundled training DAG whose run id is ``training_id``, safely repeated.

    The run id is chosen by the caller, so the same request can be sent again: it is, on time-outs,
    an unreachable server and 5xx (at most ``tries`` times).  A ``409 Conflict`` means a DAG run with
    that id exists: when its ``conf`` is ours, an earlier try created it and the submission succeeded.

    :param notify: told of each try that failed and is repeated (one line).
    :raises SubmissionError: the run was not started, or it is not known whether it was
        (:attr:`SubmissionError.may_exist`).
    """
    try:
        api.call("PATCH", f"/dags/{TRAINING_DAG_ID}", body={"is_paused": False}, idempotent=True)
    except ApiNotFoundError:
        raise ApiNotFoundError(_no_training_dag(api)) from None
    except ApiError as err:
        raise SubmissionError(f"{training_id} was not submitted: {err}", may_exist=False, cause=err) from None
    body: dict[str, Any] = {"dag_run_id": training_id, "logical_date": None, "conf": conf}
    if note:
        body["note"] = note
    path = f"/dags/{TRAINING_DAG_ID}/dagRuns"
    reached = False

    def attempt() -> bool:
        nonlocal reached
        try:
            api.call("POST", path, body=body, idempotent=False)
        except ApiConflictError:
            existing = api.call("GET", f"{path}/{quote(training_id)}")
            if _is_ours(existing, conf):
                return True  # an earlier try created it
            raise
        except TRANSIENT_ERRORS as err:
            reached = reached or _may_have_reached(err)
            raise
        return True

    def failed(failures: int, delay: float, exc: BaseException) -> None:
        if notify is not None:
            notify(f"submitting {training_id}: {exc}; trying again in {delay:.0f} s ({failures}/{tries - 1})")

    try:
        wait_until(
            attempt,
            what=f"Airflow to accept {training_id}",
            backoff=backoff,
            transient=TRANSIENT_ERRORS,
            max_failures=tries,
            on_failure=failed,
            sleep=api.sleep,
        )
    except ApiError as err:
        if isinstance(err, ApiConflictError):
            message = f"{training_id} was not submitted: a different DAG run with that id exists ({err})"
            raise SubmissionError(message, may_exist=False, cause=err) from None
        if reached:
            message = (
                f"{training_id} may have been created although the API server did not confirm it ({err}); "
                f"check with `wmltrain show {training_id}` before submitting again"
            )
        else:
            message = f"{training_id} was not submitted: {err}"
        raise SubmissionError(message, may_exist=reached, cause=err) from None


def ensure_connection(api: AirflowApi, body: dict[str, Any], *, tries: int = SUBMIT_TRIES) -> None:
    """Create an Airflow connection, safely repeated: a ``409`` (an earlier try made it, or a leftover of
    the same id) is answered by updating it to ``body``."""
    conn_id = str(body["connection_id"])

    def attempt() -> bool:
        try:
            api.call("POST", "/connections", body=body, idempotent=False)
        except ApiConflictError:
            api.call("PATCH", f"/connections/{quote(conn_id)}", body=body, idempotent=True)
        return True

    wait_until(
        attempt,
        what=f"the connection {conn_id}",
        backoff=api.backoff,
        transient=TRANSIENT_ERRORS,
        max_failures=tries,
        sleep=api.sleep,
    )


# --- halt and delete -----------------------------------------------------------------------------------


def request_halt(api: AirflowApi, record: TrainingRunRecord) -> None:
    """Ask for a run to be halted: its task instance is marked failed (with the note :data:`HALT_NOTE`).

    Airflow then stops the task; its ``on_kill`` (or the trigger's, when deferred) stops the container,
    stores the logs and writes the run's end (``HALTED``) to ``_status.json``.  Nothing here writes the
    run's status: until the worker has, :attr:`TrainingRunRecord.view` shows the halt as requested.
    A bundled run whose task has not started is failed as a whole (it will not start).
    """
    if record.task_id is None:
        api.call(
            "PATCH",
            f"/dags/{quote(record.dag_id)}/dagRuns/{quote(record.run_id)}",
            body={"state": "failed"},
            idempotent=True,
        )
        return
    api.call(
        "PATCH",
        _ti_path(record.dag_id, record.run_id, record.task_id, record.map_index),
        body={"new_state": "failed", "note": HALT_NOTE},
        idempotent=True,
    )


def delete_run(api: AirflowApi, record: TrainingRunRecord) -> str:
    """Remove a run's history from Airflow (the files in the bucket stay); says what was removed."""
    if record.dag_id == TRAINING_DAG_ID and record.run_id == record.training_id:
        api.call("DELETE", f"/dags/{quote(record.dag_id)}/dagRuns/{quote(record.run_id)}")
        return f"DAG run {record.dag_id}/{record.run_id}"
    assert record.task_id is not None
    for key in (STATUS_XCOM_KEY, RUN_XCOM_PREFIX + record.training_id):
        try:
            api.call(
                "DELETE",
                _xcom_path(record.dag_id, record.run_id, record.task_id, key),
                params={"map_index": record.map_index},
            )
        except ApiNotFoundError:
            continue
    where = f"{record.dag_id}/{record.run_id}/{record.task_id}"
    return f"the training-run records of task {where}" + (
        f"[{record.map_index}]" if record.map_index >= 0 else ""
    )


def moved_connection_id(training_id: str, role: str) -> str:
    """The Airflow connection ``wmltrain train`` made of a manifest's inline credentials (data/results)."""
    return f"{MOVED_CONNECTION_PREFIX}{training_id.replace('-', '_')}_{role}"


MOVED_CONNECTION_PREFIX = "wmltrain_"
_MOVED_ROLES = ("data", "results")


def _delete_connections(api: AirflowApi, conn_ids: list[str]) -> list[str]:
    """Remove these Airflow connections; the ids removed (not those already gone)."""
    removed = []
    for conn_id in conn_ids:
        try:
            api.call("DELETE", f"/connections/{quote(conn_id)}")
        except ApiNotFoundError:
            continue
        removed.append(conn_id)
    return removed


def delete_moved_connections(api: AirflowApi, training_id: str) -> list[str]:
    """Remove the connections made of a run's inline credentials; the ids removed."""
    return _delete_connections(api, [moved_connection_id(training_id, role) for role in _MOVED_ROLES])


def sweep_moved_connections(api: AirflowApi, live: set[str]) -> list[str]:
    """Remove the moved-credential connections of runs Airflow no longer lists (``live``: their ids)."""
    keep = {moved_connection_id(training_id, role) for training_id in live for role in _MOVED_ROLES}
    suffixes = tuple(f"_{role}" for role in _MOVED_ROLES)
    listed = [str(c.get("connection_id") or "") for c in api.paginate("/connections", "connections")]
    stale = [
        conn_id
        for conn_id in listed
        if conn_id.startswith(MOVED_CONNECTION_PREFIX + "training_")
        and conn_id.endswith(suffixes)
        and conn_id not in keep
    ]
    return _delete_connections(api, stale)


# --- waits: one API call per look ----------------------------------------------------------------------


@dataclass
class WaitOptions:
    """How a wait looks and how long it waits.

    :param backoff: the delays between looks (growing while the API server fails).
    :param timeout: seconds before the wait gives up (:class:`~airflow_wmltrain.waiting.WaitTimeoutError`);
        ``None``: as long as the run lasts.
    :param max_outage: seconds in a row of API failures (time-outs, unreachable, 5xx) after which the wait
        gives up with :class:`ApiUnreachableError`; ``None``: no limit but ``timeout``.
    :param notify: told of each failure ridden out (one line), e.g. to show it on stderr.
    :param sleep: how to wait (tests pass a fake).
    :param clock: a monotonic clock (tests pass a fake).
    """

    backoff: Backoff = POLL_BACKOFF
    timeout: float | None = None
    max_outage: float | None = DEFAULT_MAX_OUTAGE
    notify: Notify | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def remaining(self, started: float) -> float | None:
        return None if self.timeout is None else max(0.0, self.timeout - (self.clock() - started))


def _wait(look: Callable[[], Any], what: str, training_id: str, options: WaitOptions, started: float) -> Any:
    """``wait_until(look)`` that rides out API failures up to ``options.max_outage`` seconds in a row."""
    outage_since: list[float] = []

    def failed(failures: int, delay: float, exc: BaseException) -> None:
        now = options.clock()
        if failures == 1:
            outage_since[:] = [now]
        down = now - outage_since[0]
        if options.max_outage is not None and down + delay > options.max_outage:
            raise ApiUnreachableError(
                f"gave up waiting for {what}: the Airflow API server has failed for {down:.0f} s "
                f"(last: {exc}); {training_id} may still be going: `wmltrain show {training_id}` tells"
            ) from None
        if options.notify is not None:
            options.notify(f"{what}: {exc}; looking again in {delay:.0f} s")

    return wait_until(
        look,
        what=what,
        timeout=options.remaining(started),
        backoff=options.backoff,
        transient=TRANSIENT_ERRORS,
        on_failure=failed,
        sleep=options.sleep,
        clock=options.clock,
    )


class RunWatch:
    """A run at a known place, looked at with one API call per :meth:`look`.

    A look asks the task instance (its state, try, note) or, while the task runs, the status XCom (the
    run's progress), alternately; before the bundled DAG's task exists, the DAG run.  The record is
    assembled from the latest answers; the final document is fetched once, when the task is over.
    """

    def __init__(self, api: AirflowApi, record: TrainingRunRecord) -> None:
        self.api = api
        self.record = record
        self._next = "ti" if record.task_id is not None else "run"
        self._run_state = ""

    @property
    def _task(self) -> tuple[str, str, str, int]:
        assert self.record.task_id is not None
        return self.record.dag_id, self.record.run_id, self.record.task_id, self.record.map_index

    def look(self) -> TrainingRunRecord:
        """One API call (two at the end: the final document); the record as it now stands."""
        if self._next == "run":
            return self._look_at_run()
        if self._next == "xcom":
            status = _fetch_status(self.api, *self._task)
            if status is not None and status.training_id == self.record.training_id:
                self.record = replace(self.record, status=status)
            self._next = "ti"
            return self.record
        return self.look_at_task()

    def _look_at_run(self) -> TrainingRunRecord:
        """The DAG run of a bundled run whose task instance is not known yet."""
        record = self.record
        try:
            run = self.api.call("GET", f"/dags/{quote(record.dag_id)}/dagRuns/{quote(record.run_id)}")
        except ApiNotFoundError:
            raise ApiNotFoundError(f"no training run {record.training_id} (its DAG run is gone)") from None
        self._run_state = str(run.get("state") or "") if isinstance(run, dict) else ""
        if self._run_state in ("running", "failed", "success"):
            self._next = "ti"
            self.record = replace(record, task_id=TRAINING_TASK_ID)
            if self._run_state != "running":  # over: its task says how (the end costs one more call)
                return self.look_at_task()
        return self.record

    def look_at_task(self) -> TrainingRunRecord:
        """One look at the task instance (and, once it is over, the final document)."""
        record = self.record
        try:
            ti = self.api.call("GET", _ti_path(*self._task))
        except ApiNotFoundError:
            if record.dag_id != TRAINING_DAG_ID or record.status.history:
                raise ApiNotFoundError(f"no training run {record.training_id} (its task is gone)") from None
            # The bundled run's task instance is not made yet, or the run ended without it.
            self._next = "run"
            over = self._run_state if self._run_state in ("failed", "success") else record.ti_state
            self.record = replace(record, task_id=None, ti_state=over)
            return self.record
        fields = _ti_fields(ti if isinstance(ti, dict) else {})
        self.record = replace(record, **fields)
        if fields["ti_state"] in TI_OVER_STATES:
            status = _fetch_status(self.api, *self._task)  # the end: the final document
            if status is not None and status.training_id == record.training_id:
                self.record = replace(self.record, status=status)
        elif fields["ti_state"] in ("running", "deferred", "up_for_retry", "up_for_reschedule", "restarting"):
            self._next = "xcom"
        return self.record

    @property
    def started(self) -> bool:
        """Whether the task has started (or the run is over without it)."""
        return self.record.settled or self.record.ti_state not in ("", "none", "scheduled", "queued")


def wait_until_over(
    api: AirflowApi,
    training_id: str,
    *,
    record: TrainingRunRecord | None = None,
    options: WaitOptions | None = None,
    on_change: Callable[[TrainingRunRecord], None] | None = None,
) -> TrainingRunRecord:
    """Look at a run until it is over and its task will not run again (one API call per look).

    :param record: where the run is, when known (default: a run of the bundled DAG).
    :raises WaitTimeoutError: ``options.timeout`` passed.
    :raises ApiUnreachableError: the API server failed for longer than ``options.max_outage``.
    :raises ApiNotFoundError: the run does not exist (any more).
    """
    options = options or WaitOptions()
    watch = RunWatch(api, record or TrainingRunRecord(training_id, TRAINING_DAG_ID, training_id))
    last: list[RunState] = []

    def look() -> TrainingRunRecord | None:
        current = watch.look()
        if on_change is not None and [current.state] != last:
            on_change(current)
        last[:] = [current.state]
        return current if current.settled else None

    result: TrainingRunRecord = _wait(look, f"{training_id} to end", training_id, options, options.clock())
    return result


def _wait_for_watch(
    api: AirflowApi,
    record: TrainingRunRecord,
    options: WaitOptions | None,
    until: Callable[[RunWatch], bool],
    what: str,
) -> TrainingRunRecord:
    """Look at a run (one API call per look) until ``until(watch)`` holds.

    :param what: what is waited for, after the training id in messages, e.g. ``to stop``.
    """
    options = options or WaitOptions()
    watch = RunWatch(api, record)

    def look() -> TrainingRunRecord | None:
        watch.look()
        return watch.record if until(watch) else None

    result: TrainingRunRecord = _wait(
        look, f"{record.training_id} {what}", record.training_id, options, options.clock()
    )
    return result


def wait_for_task(
    api: AirflowApi, record: TrainingRunRecord, *, options: WaitOptions | None = None
) -> TrainingRunRecord:
    """Wait until a run's task has started (or the run ended without it); one API call per look."""
    return _wait_for_watch(api, record, options, lambda watch: watch.started, "to start")


#: Task instance states in which a run's task is (or is about to be) running.
_TASK_BUSY_STATES = ("running", "deferred", "queued", "scheduled", "restarting")


def wait_not_running(
    api: AirflowApi, record: TrainingRunRecord, *, options: WaitOptions | None = None
) -> TrainingRunRecord:
    """Wait until a run's task is no longer running, scheduled or queued; one API call per look."""
    return _wait_for_watch(
        api, record, options, lambda watch: watch.record.ti_state not in _TASK_BUSY_STATES, "to stop"
    )


class _LogFollower:
    """Pages of a task's log; while following, one API call per look: the next page, or — after a page
    without news, or once the server said the try's log is complete — the task instance (has it ended?
    a new try?)."""

    def __init__(self, api: AirflowApi, record: TrainingRunRecord) -> None:
        self.api = api
        self.watch = RunWatch(api, record)
        self.try_number = max(record.try_number, 1)
        self.token: str | None = None
        self.log_ended = False  # the server sent this try's log to its end (no continuation token)
        self.seen = 0  # items already handed out of those that follow ``token``
        self.check_task = False
        self.rest = False
        self.over = False

    def page(self) -> list[str]:
        """The try's log from where the last page ended (the whole of it the first time)."""
        record = self.watch.record
        assert record.task_id is not None
        params: dict[str, Any] = {"map_index": record.map_index}
        if self.token:
            params["token"] = self.token
        try:
            page = self.api.call(
                "GET",
                _ti_path(record.dag_id, record.run_id, record.task_id, -1) + f"/logs/{self.try_number}",
                params=params,
            )
        except ApiNotFoundError:  # the try has no log yet
            return []
        if not isinstance(page, dict):
            return []
        items = list(page.get("content") or [])
        lines = []
        for item in items[self.seen :]:
            text = item.get("event", "") if isinstance(item, dict) else str(item)
            if text and not str(text).startswith("::"):
                lines.append(str(text))
        token = page.get("continuation_token")
        if token:
            self.token, self.seen = str(token), 0
        else:  # the end of the log for now (the task is not running): asking again sends it again
            self.log_ended, self.seen = True, len(items)
        return lines

    def look(self) -> list[str] | None:
        """New lines, ``[]`` once the run is over, or ``None``: nothing new yet."""
        if self.rest:  # lines were just handed out: wait one interval before the next page
            self.rest = False
            return None
        if self.check_task or self.log_ended:
            self.check_task = False
            record = self.watch.look_at_task() if self.watch.record.task_id else self.watch.look()
            if record.try_number > self.try_number:  # a retry: its own log
                self.try_number, self.token, self.log_ended, self.seen = record.try_number, None, False, 0
            if record.settled:
                self.over = True
                return [] if self.log_ended else self.page()  # the end of the log
            if record.ti_state in ("running", "deferred"):  # running again (rescheduled): more to come
                self.log_ended = False
            return None
        lines = self.page()
        if lines:
            self.rest = True
            return lines
        self.check_task = True
        return None


def log_lines(
    api: AirflowApi,
    record: TrainingRunRecord,
    *,
    follow: bool,
    options: WaitOptions | None = None,
) -> Iterator[str]:
    """The run's task log (the training log is in it), line by line; with ``follow``, until the run ends.

    Following costs one API call per look and rides out API failures (see :class:`WaitOptions`).
    """
    options = options or WaitOptions()
    started = options.clock()
    if record.task_id is None and follow:
        record = wait_for_task(api, record, options=options)
    if record.task_id is None:
        return
    follower = _LogFollower(api, record)
    if not follow:
        yield from follower.page()
        return
    what = f"{record.training_id}'s log"
    while not follower.over:
        yield from _wait(follower.look, what, record.training_id, options, started)


def metric_points(
    api: AirflowApi,
    record: TrainingRunRecord,
    *,
    follow: bool,
    options: WaitOptions | None = None,
) -> Iterator[dict[str, Any]]:
    """The run's metrics per step (``{"step": 120, "loss": 0.31}``, oldest first); with ``follow``, then
    the new ones as the run publishes them, until it is over (one API call per look, API failures ridden
    out as :class:`WaitOptions` says).  A point is new when its step is past the last one given."""
    options = options or WaitOptions()
    started = options.clock()
    last: list[float] = []

    def new(current: TrainingRunRecord) -> list[dict[str, Any]]:
        points = [dict(p) for p in current.view.steps if not last or float(p.get("step", 0)) > last[0]]
        if points:
            last[:] = [float(points[-1].get("step", 0))]
        return points

    yield from new(record)
    if not follow:
        return
    watch = RunWatch(api, record)
    rest = [False]  # points were just handed out: wait one interval before the next look

    def look() -> list[dict[str, Any]] | None:
        if rest[0]:
            rest[0] = False
            return None
        current = watch.look()
        points = new(current)
        rest[0] = bool(points)
        return points if points or current.settled else None

    while not watch.record.settled:
        yield from _wait(look, f"{record.training_id}'s metrics", record.training_id, options, started)
