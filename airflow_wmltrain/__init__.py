"""airflow-wmltrain: GPU deep-learning training runs as Apache Airflow 3 tasks."""

from __future__ import annotations

__version__ = "0.1.0"
