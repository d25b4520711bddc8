"""Retention: training-run history older than ``[wmltrain] retention_days`` is removed from Airflow.

The hosted service kept a run's details for 7 days; so does the ``wmltrain_retention`` DAG (daily):
it deletes the history of ended runs submitted more than ``retention_days`` ago — the bundled DAG's
runs, and the run records of ``TrainingRunOperator`` tasks in other DAGs — through the REST API, like
``wmltrain delete``.  The files in the buckets are never touched.  Active runs are never removed.
The task reaches the API with the Airflow connection ``wmltrain_api`` (type ``http``: host = the API
server's URL, login, password).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

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


def drop_expired_runs(
    api: AirflowApi, *, now: datetime | None = None, days: float = DEFAULT_RETENTION_DAYS, log: Any = logger
) -> list[str]:
    """Remove the history of runs older than ``days``; the training ids removed."""
    now = now or datetime.now(timezone.utc)
    removed = []
    for record in expired(list_runs(api), now=now, days=days):
        what = delete_run(api, record)
        log.info(
            "Removed %s (%s, %s, submitted %s): %s",
            record.training_id,
            record.name,
            record.state.value,
            record.submitted,
            what,
        )
        removed.append(record.training_id)
    log.info("Retention (%s days, as of %s): %d run(s) removed", days, now.isoformat(), len(removed))
    swept = sweep_moved_connections(api, {record.training_id for record in list_runs(api)})
    if swept:
        log.info("Removed the connections of runs no longer listed: %s", ", ".join(swept))
    return removed


def build_retention_dag(dag_id: str = RETENTION_DAG_ID) -> Any:
    """The daily retention DAG; its ``as_of`` parameter moves "now" (to preview or test retention)."""
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
                description="The moment retention counts from (default: now)",
            ),
        },
        doc_md=__doc__,
    ) as dag:

        @task(task_id="drop_expired_runs")
        def run_retention(params: dict[str, Any] | None = None) -> list[str]:
            from airflow.sdk import BaseHook

            connection = BaseHook.get_connection(API_CONN_ID)
            url = connection.host or ""
            if connection.port and "://" in url and url.count(":") < 2:
                url = f"{url}:{connection.port}"
            api = AirflowApi(url, connection.login or "", connection.password or "")
            days = conf.getfloat("wmltrain", "retention_days", fallback=DEFAULT_RETENTION_DAYS)
            as_of = (params or {}).get("as_of")
            now = parse_time(str(as_of)) if as_of else None
            return drop_expired_runs(api, now=now, days=days, log=logging.getLogger("airflow.task"))

        run_retention()
    return dag
