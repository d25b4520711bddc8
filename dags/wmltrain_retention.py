"""The retention DAG: training-run history older than [wmltrain] retention_days is dropped daily."""

from __future__ import annotations

from airflow_wmltrain.service.retention import build_retention_dag

dag = build_retention_dag()
