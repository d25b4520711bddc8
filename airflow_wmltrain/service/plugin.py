"""The provider's Airflow plugin: :mod:`~airflow_wmltrain.service.runs_api`'s endpoint on the API server.

Every Airflow process loads the plugins, every task's too; only the API server reads ``fastapi_apps``.
So this module imports no FastAPI, and the endpoint's module is imported when the API server asks for
it: a task process no longer pays for FastAPI's import (about 0.2-0.5 s at each task's start).
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airflow_wmltrain.service.api import PLUGIN_API


class WmlTrainPlugin(AirflowPlugin):
    """Serves :data:`~airflow_wmltrain.service.runs_api.app` under
    :data:`~airflow_wmltrain.service.api.PLUGIN_API`."""

    name = "wmltrain"

    @property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]  # read on the API server only
        from airflow_wmltrain.service.runs_api import app

        return [{"app": app, "url_prefix": PLUGIN_API, "name": "wmltrain runs"}]
