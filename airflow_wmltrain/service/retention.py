"""Retention: training-run history older than ``[wmltrain] retention_days`` is removed from Airflow.

The hosted service kept a run's details for 7 days; so does the ``wmltrain_retention`` DAG (daily):
it deletes the history of ended runs submitted more than ``retention_days`` ago — the bundled DAG's
runs, and the run records of ``TrainingRunOperator`` tasks in other DAGs — through the REST API, like
``wmltrain delete``.  The files in the buckets are never touched.  Active runs are never removed.
The task reaches the API with the Airflow connection ``wmltrain_api`` (type ``http``: host = the API
server's URL, login, password).

Two parameters of a manual run: ``dry_run`` (true: list the runs that would be removed, remove nothing)
and ``as_of`` (the moment retention counts from instead of now).  ``as_of`` deletes unless ``dry_run``:
it may only move back in time (then fewer runs are past retention than today); an ``as_of`` in the
future is refused unless ``dry_run``, since it would drop runs that are still within retention.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow_wmltrain.errors import ConfigurationError
from airflow_wmltrain.lifecycle import parse_time
from airflow_wmltrain.service.api import AirflowApi
from airflow_wmltrain.service.runs import TrainingRunRecord, delete_run, list_runs, sweep_moved_connections

RETENTION_DAG_ID = "wmltrain_retention"
API_CONN_ID = "wmltrain_api"
DEFAULT_RETENTION_DAYS = 7
logger = logging.getLogger(__name__)


def expired(records: Iterable[TrainingRunRecord], *, now: datetime, days: float) -> list[TrainingRunRecord]:
    """The ended runs submitted before ``now - days``."""
    cutoff = now - timedelta(days=days)
    old = []
    for record in records:
        submitted = parse_time(record.submitted)
        if submitted is not None and submitted < cutoff and not record.active:
            old.append(record)
    return old


def retention_moment(as_of: str | None, *, dry_run: bool, now: datetime | None = None) -> datetime:
    """The moment retention counts from: ``as_of`` (ISO 8601) or now.

    Refused (:class:`ConfigurationError`, before anything is removed) when ``as_of`` is not a time, or
    lies in the future and this is not a dry run: it would remove runs still within retention.
    """
    current = now or datetime.now(timezone.utc)
    if not as_of:
        return current
    moment = parse_time(as_of)
    if moment is None:
        raise ConfigurationError(
            f"{as_of!r} is not an ISO 8601 time; give e.g. 2026-11-20T00:00:00Z", field="as_of"
        )
    if moment > current and not dry_run:
        raise ConfigurationError(
            f"{moment.isoformat()} is in the future (now {current.isoformat()}): it would remove runs still "
            "within retention; give a past time, or set dry_run to true to preview what it would remove",
            field="as_of",
        )
    return moment


def drop_expired_runs(
    api: AirflowApi,
    *,
    now: datetime | None = None,
    days: float = DEFAULT_RETENTION_DAYS,
    dry_run: bool = False,
    log: Any = logger,
) -> list[str]:
    """Remove the history of runs older than ``days`` as of ``now``; the training ids removed.

    :param now: the moment retention counts from (default: now); see :func:`retention_moment`, which
        the caller uses to read a user's ``as_of``.
    :param dry_run: only list (and log) the runs that would be removed; nothing is removed.
    """
    now = now or datetime.now(timezone.utc)
    removed = []
    for record in expired(list_runs(api), now=now, days=days):
        what = "nothing (dry run)" if dry_run else delete_run(api, record)
        log.info(
            "%s %s (%s, %s, submitted %s): %s",
            "Would remove" if dry_run else "Removed",
            record.training_id,
            record.name,
            record.state.value,
            record.submitted,
            what,
        )
        removed.append(record.training_id)
    log.info(
        "Retention (%s days, as of %s): %d run(s) %s",
        days,
        now.isoformat(),
        len(removed),
        "would be removed (dry run: nothing removed)" if dry_run else "removed",
    )
    if dry_run:
        return removed
    swept = sweep_moved_connections(api, {record.training_id for record in list_runs(api)})
    if swept:
        log.info("Removed the connections of runs no longer listed: %s", ", ".join(swept))
    return removed


def build_retention_dag(dag_id: str = RETENTION_DAG_ID) -> Any:
    """The daily retention DAG; a manual run's ``dry_run`` previews it and ``as_of`` moves "now" back."""
    from airflow.sdk import DAG, Param, conf, task

    with DAG(
        dag_id=dag_id,
        description="Drop training-run history older than [wmltrain] retention_days (bucket files stay)",
        schedule="@daily",
        start_date=datetime(2026, 1, 1),
        catchup=False,
        tags=["wmltrain"],
        params={
            "as_of": Param(
                None,
                type=["null", "string"],
                format="date-time",
                description="The moment retention counts from (default: now); not in the future unless "
                "dry_run. Without dry_run the runs it finds ARE removed",
            ),
            "dry_run": Param(
                False,
                type="boolean",
                description="List (in the log and the return value) the runs that would be removed; remove "
                "nothing",
            ),
        },
        doc_md=__doc__,
    ) as dag:

        @task(task_id="drop_expired_runs")
        def run_retention(params: dict[str, Any] | None = None) -> list[str]:
            from airflow.sdk import BaseHook

            as_of, dry_run = (params or {}).get("as_of"), bool((params or {}).get("dry_run"))
            now = retention_moment(str(as_of) if as_of else None, dry_run=dry_run)  # refused before any call
            connection = BaseHook.get_connection(API_CONN_ID)
            url = connection.host or ""
            if connection.port and "://" in url and url.count(":") < 2:
                url = f"{url}:{connection.port}"
            api = AirflowApi(url, connection.login or "", connection.password or "")
            days = conf.getfloat("wmltrain", "retention_days", fallback=DEFAULT_RETENTION_DAYS)
            return drop_expired_runs(
                api, now=now, days=days, dry_run=dry_run, log=logging.getLogger("airflow.task")
            )

        run_retention()
    return dag
