"""Training runs as Airflow sees them, through the REST API: list, find, submit, halt, delete, logs.

Every ``TrainingRunOperator`` task publishes its run's status document as the XCom ``wmltrain_status``
(rewritten at each transition) and an XCom named after its training id (``wmltrain_run_<id>``).  So all
training runs — those of the bundled ``wmltrain_training`` DAG and those of operator tasks in any other
DAG, mapped grid tasks included — are found with one wildcard XCom query, and one run by its id with
another; the task instance's own state completes the picture (a task marked failed while its run was
training ended ``HALTED``).  Runs of the bundled DAG that have not started their task yet are listed
from the DAG's runs (``QUEUED``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from airflow_wmltrain.errors import RunHaltedError
from airflow_wmltrain.lifecycle import RUN_XCOM_PREFIX, STATUS_XCOM_KEY, iso_time, now_iso, parse_time
from airflow_wmltrain.service.api import AirflowApi, ApiError, ApiNotFoundError, quote

TRAINING_DAG_ID = "wmltrain_training"
#: Task-instance states in which the run is not over.
ACTIVE_TI_STATES = frozenset(
    {
        "scheduled",
        "queued",
        "running",
        "deferred",
        "up_for_retry",
        "up_for_reschedule",
        "restarting",
        "none",
        "",
    }
)
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "HALTED"})
_FETCH_WORKERS = 8


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
    :param status: the run's status document (``{}`` before its task published one).
    :param submitted_at: when the DAG run was queued, for runs without a status document yet.
    """

    training_id: str
    dag_id: str
    run_id: str
    task_id: str | None = None
    map_index: int = -1
    ti_state: str = ""
    try_number: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    submitted_at: str | None = None

    @property
    def name(self) -> str:
        return str(self.status.get("name") or "")

    @property
    def state(self) -> str:
        """The run's state: its document's, unless the task ended without the run ending."""
        state = str(self.status.get("state") or "QUEUED")
        if state in TERMINAL_STATES:
            return state
        if self.ti_state in ("failed", "upstream_failed", "removed"):
            # The task stopped while the run was not over: marked failed (a halt) or its worker died.
            return (
                "HALTED" if self.status.get("state") in ("DOWNLOADING", "PROCESSING", "STORING") else "FAILED"
            )
        if self.ti_state == "success":
            return "COMPLETED"
        return state

    @property
    def active(self) -> bool:
        return self.state not in TERMINAL_STATES

    @property
    def error(self) -> dict[str, str] | None:
        error = self.status.get("error")
        if isinstance(error, dict):
            return {str(k): str(v) for k, v in error.items()}
        if self.state == "HALTED" and not error:
            return {
                "code": RunHaltedError.code,
                "message": f"the task ended ({self.ti_state}) while the run was training",
            }
        return None

    @property
    def submitted(self) -> str:
        history = self.status.get("history") or []
        return str(history[0]["at"]) if history else str(self.submitted_at or "")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (``--json``); the status document holds no secret."""
        return {
            "training_id": self.training_id,
            "name": self.name,
            "state": self.state,
            "submitted_at": self.submitted,
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "map_index": self.map_index,
            "task_state": self.ti_state,
            "try_number": self.try_number,
            "results_location": self.status.get("results_location"),
            "data_location": self.status.get("data_location"),
            "image": self.status.get("image"),
            "command": self.status.get("command"),
            "gpus": self.status.get("gpus") or [],
            "history": self.status.get("history") or [],
            "error": self.error,
            "exit_code": self.status.get("exit_code"),
            "metrics": self.status.get("metrics") or {},
        }


def _ti_path(dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
    path = f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(task_id)}"
    return path + (f"/{map_index}" if map_index >= 0 else "")


def _xcom_path(dag_id: str, run_id: str, task_id: str, key: str) -> str:
    run = f"/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}"
    return f"{run}/taskInstances/{quote(task_id)}/xcomEntries/{quote(key)}"


def _record(api: AirflowApi, entry: dict[str, Any]) -> TrainingRunRecord | None:
    """The run of one ``wmltrain_status`` XCom entry (``None`` when it vanished meanwhile)."""
    dag_id, run_id, task_id = entry["dag_id"], entry["run_id"], entry["task_id"]
    map_index = int(entry.get("map_index", -1))
    try:
        xcom = api.call(
            "GET",
            _xcom_path(dag_id, run_id, task_id, STATUS_XCOM_KEY),
            params={"map_index": map_index, "deserialize": "true"},
        )
        ti = api.call("GET", _ti_path(dag_id, run_id, task_id, map_index))
    except ApiNotFoundError:
        return None
    status = xcom.get("value") if isinstance(xcom, dict) else None
    if not isinstance(status, dict) or not status.get("training_id"):
        return None
    return TrainingRunRecord(
        training_id=str(status["training_id"]),
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
        map_index=map_index,
        ti_state=str(ti.get("state") or ""),
        try_number=int(ti.get("try_number") or 0),
        status=status,
    )


def _records(api: AirflowApi, entries: list[dict[str, Any]]) -> list[TrainingRunRecord]:
    with ThreadPoolExecutor(_FETCH_WORKERS) as pool:
        return [record for record in pool.map(lambda e: _record(api, e), entries) if record is not None]


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

    :param state: only runs in this state (``COMPLETED``, ``FAILED``...; case-insensitive).
    :param limit: at most this many.
    """
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
        records = [r for r in records if r.state == state.upper()]
    records.sort(key=lambda r: r.submitted, reverse=True)
    return records[:limit] if limit else records


def find_run(api: AirflowApi, training_id: str) -> TrainingRunRecord:
    """One training run by its id.

    :raises ApiNotFoundError: no run has that id.
    """
    entries = list(
        api.paginate(
            "/dags/~/dagRuns/~/taskInstances/~/xcomEntries",
            "xcom_entries",
            params={"xcom_key": RUN_XCOM_PREFIX + training_id},
        )
    )
    records = _records(api, entries)
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
    return TrainingRunRecord(
        training_id=training_id,
        dag_id=TRAINING_DAG_ID,
        run_id=training_id,
        ti_state=state if state in ("failed", "success") else "queued",
        status={"name": name} if name else {},
        submitted_at=_iso_ms(str(run.get("queued_at") or run.get("run_after") or "")),
    )


def _iso_ms(text: str) -> str:
    """An API timestamp in the status documents' form (unchanged when it is not a time)."""
    moment = parse_time(text)
    return iso_time(moment) if moment is not None else text


def submit_run(api: AirflowApi, training_id: str, conf: dict[str, Any], *, note: str | None = None) -> None:
    """Start a run of the bundled training DAG whose run id is ``training_id``."""
    try:
        api.call("PATCH", f"/dags/{TRAINING_DAG_ID}", body={"is_paused": False})
    except ApiNotFoundError:
        raise ApiNotFoundError(
            f"the Airflow server has no DAG {TRAINING_DAG_ID}; install airflow-wmltrain on it and put "
            "dags/wmltrain_training.py in its DAGs folder"
        ) from None
    body: dict[str, Any] = {"dag_run_id": training_id, "logical_date": None, "conf": conf}
    if note:
        body["note"] = note
    api.call("POST", f"/dags/{TRAINING_DAG_ID}/dagRuns", body=body)


def halt_run(api: AirflowApi, record: TrainingRunRecord) -> None:
    """Halt a run: its task is marked failed, so Airflow stops it and the run ends HALTED, logs stored.

    The task's ``on_kill`` (or the trigger's, when deferred) stops the container and stores the logs; the
    run's status XCom is updated here so ``list``/``show`` say HALTED at once.
    """
    if record.task_id is None:  # a bundled run whose task has not started: fail the DAG run
        api.call(
            "PATCH", f"/dags/{quote(record.dag_id)}/dagRuns/{quote(record.run_id)}", body={"state": "failed"}
        )
        return
    api.call(
        "PATCH",
        _ti_path(record.dag_id, record.run_id, record.task_id, record.map_index),
        body={"new_state": "failed", "note": "halted by wmltrain halt"},
    )
    if record.status:
        document = dict(record.status)
        history = [*document.get("history", []), {"state": "HALTED", "at": now_iso()}]
        document.update(
            state="HALTED",
            history=history,
            error={"code": RunHaltedError.code, "message": "the run was halted (wmltrain halt)"},
        )
        api.call(
            "PATCH",
            _xcom_path(record.dag_id, record.run_id, record.task_id, STATUS_XCOM_KEY),
            body={"value": document, "map_index": record.map_index},
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


def delete_moved_connections(api: AirflowApi, training_id: str) -> list[str]:
    """Remove the connections made of a run's inline credentials; the ids removed."""
    removed = []
    for role in _MOVED_ROLES:
        conn_id = moved_connection_id(training_id, role)
        try:
            api.call("DELETE", f"/connections/{quote(conn_id)}")
        except ApiNotFoundError:
            continue
        removed.append(conn_id)
    return removed


def sweep_moved_connections(api: AirflowApi, live: set[str]) -> list[str]:
    """Remove the moved-credential connections of runs Airflow no longer lists (``live``: their ids)."""
    keep = {moved_connection_id(training_id, role) for training_id in live for role in _MOVED_ROLES}
    removed = []
    for connection in list(api.paginate("/connections", "connections")):
        conn_id = str(connection.get("connection_id") or "")
        if (
            conn_id.startswith(MOVED_CONNECTION_PREFIX + "training_")
            and conn_id.endswith(tuple(f"_{role}" for role in _MOVED_ROLES))
            and conn_id not in keep
        ):
            try:
                api.call("DELETE", f"/connections/{quote(conn_id)}")
            except ApiNotFoundError:
                continue
            removed.append(conn_id)
    return removed


def wait_until_over(
    api: AirflowApi,
    training_id: str,
    *,
    poll: float = 2.0,
    timeout: float | None = None,
    on_change: Callable[[TrainingRunRecord], None] | None = None,
) -> TrainingRunRecord:
    """Poll a run until it is over.

    :raises ApiError: the timeout passed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        try:
            record = find_run(api, training_id)
        except ApiNotFoundError:
            record = None
        if record is not None:
            if on_change is not None and record.state != last:
                on_change(record)
            last = record.state
            if not record.active and record.ti_state not in ("running", "deferred"):
                return record
        if deadline is not None and time.monotonic() > deadline:
            raise ApiError(f"{training_id} is still {last or 'not started'} after {timeout:.0f} s")
        time.sleep(poll)


def log_lines(
    api: AirflowApi, record: TrainingRunRecord, *, follow: bool, poll: float = 2.0
) -> Iterator[str]:
    """The run's task log (the training log is in it), line by line; with ``follow``, until the run ends."""
    if record.task_id is None and follow:
        record = wait_for_task(api, record.training_id, poll=poll)
    if record.task_id is None:
        return
    token: str | None = None
    while True:
        current = _refresh(api, record)
        over = not current.active and current.ti_state not in ("running", "deferred", "queued", "scheduled")
        assert current.task_id is not None
        params: dict[str, Any] = {"map_index": current.map_index}
        if token:
            params["token"] = token
        try:
            page = api.call(
                "GET",
                _ti_path(current.dag_id, current.run_id, current.task_id, -1)
                + f"/logs/{max(current.try_number, 1)}",
                params=params,
            )
        except ApiNotFoundError:
            page = {}
        for item in page.get("content", []) if isinstance(page, dict) else []:
            text = item.get("event", "") if isinstance(item, dict) else str(item)
            if text and not str(text).startswith("::"):
                yield str(text)
        token = (page.get("continuation_token") if isinstance(page, dict) else None) or token
        if not follow or over:
            return
        time.sleep(poll)


def _refresh(api: AirflowApi, record: TrainingRunRecord) -> TrainingRunRecord:
    try:
        return find_run(api, record.training_id)
    except ApiNotFoundError:
        return record


def wait_for_task(api: AirflowApi, training_id: str, *, poll: float = 2.0) -> TrainingRunRecord:
    """Wait until a bundled run's task has published its first status (or the DAG run ended)."""
    while True:
        record = find_run(api, training_id)
        if record.task_id is not None or record.ti_state in ("failed", "success"):
            return record
        time.sleep(poll)
