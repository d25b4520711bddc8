"""The provider's small API endpoint: every training run's status in one call (``wmltrain list``).

Airflow's public API lists XCom entries without their values, so listing runs through it costs one
call per run (1,000 runs: 1,000 calls, about 12 s on the services).  This plugin, served by Airflow's
own API server under ``/wmltrain``, answers ``GET /wmltrain/runs`` with one query: each
``wmltrain_status`` XCom (only one training id's with ``?training_id=``) with its value and its task
instance's state, try number, note and end — only of the DAGs whose XComs the caller may read, as
Airflow's auth manager says, with the caller authenticated like any API call (the bearer token of
``POST /auth/token``).  ``wmltrain`` falls back to the public API when a server has no such plugin.
:class:`~airflow_wmltrain.service.plugin.WmlTrainPlugin` serves it, importing this module only there.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.security import HTTPAuthorizationCredentials

from airflow_wmltrain.lifecycle import RUN_XCOM_PREFIX, STATUS_XCOM_KEY

app = FastAPI(title="airflow-wmltrain", description="Training runs in one call", docs_url=None)


async def _user(request: Request) -> Any:
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    credentials: HTTPAuthorizationCredentials | None = await bearer_scheme(request)
    return await get_user(request, None, credentials)


def _readable_dags(user: Any, dag_ids: set[str]) -> set[str]:
    """Of ``dag_ids``, those whose XComs ``user`` may read."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    manager = get_auth_manager()
    return {
        dag_id
        for dag_id in dag_ids
        if manager.is_authorized_dag(
            method="GET", access_entity=DagAccessEntity.XCOM, details=DagDetails(id=dag_id), user=user
        )
    }


@app.get("/runs")
def runs(
    user: Any = Depends(_user),  # noqa: B008 - FastAPI's way
    training_id: str | None = Query(None, max_length=200),
) -> dict[str, Any]:
    """The training runs' status documents and task instances: ``{"runs": [...], "total_entries": n}``.

    :param training_id: only the task instances that ran this training id (its ``wmltrain_run_<id>``).
    """
    from airflow.models.taskinstance import TaskInstance, TaskInstanceNote
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import and_, exists, select
    from sqlalchemy.orm import aliased

    query = (
        select(
            XComModel.dag_id,
            XComModel.run_id,
            XComModel.task_id,
            XComModel.map_index,
            XComModel.value,
            TaskInstance.state,
            TaskInstance.try_number,
            TaskInstance.end_date,
            TaskInstanceNote.content,
        )
        .join(
            TaskInstance,
            and_(
                TaskInstance.dag_id == XComModel.dag_id,
                TaskInstance.run_id == XComModel.run_id,
                TaskInstance.task_id == XComModel.task_id,
                TaskInstance.map_index == XComModel.map_index,
            ),
        )
        .outerjoin(TaskInstanceNote, TaskInstanceNote.ti_id == TaskInstance.id)
        .where(XComModel.key == STATUS_XCOM_KEY)
    )
    if training_id is not None:
        ran = aliased(XComModel)
        query = query.where(
            exists().where(
                ran.key == RUN_XCOM_PREFIX + training_id,
                ran.dag_id == XComModel.dag_id,
                ran.run_id == XComModel.run_id,
                ran.task_id == XComModel.task_id,
                ran.map_index == XComModel.map_index,
            )
        )
    with create_session() as session:
        rows = session.execute(query).all()
    readable = _readable_dags(user, {row.dag_id for row in rows})
    found = [
        {
            "dag_id": row.dag_id,
            "run_id": row.run_id,
            "task_id": row.task_id,
            "map_index": row.map_index,
            "value": XComModel.deserialize_value(row),
            "state": str(row.state.value if hasattr(row.state, "value") else row.state or ""),
            "try_number": row.try_number,
            "note": row.content or "",
            "end_date": row.end_date.isoformat() if row.end_date else None,
        }
        for row in rows
        if row.dag_id in readable
    ]
    return {"runs": found, "total_entries": len(found)}
