"""The bundled training DAG (``wmltrain train`` submits runs of it); see airflow_wmltrain.service."""

from __future__ import annotations

from airflow_wmltrain.service.training_dag import build_training_dag

dag = build_training_dag()
