"""``python -m airflow_wmltrain.runtime.halter``: halt a run from a detached process.

A task being stopped by Airflow gets a few seconds between SIGTERM and SIGKILL, not enough to stop a
training container gracefully and store its logs; its ``on_kill`` starts this process (in its own
session, so it outlives the task) with :func:`~airflow_wmltrain.runtime.run.halt_run`'s parameters as
JSON on stdin (never on the command line: the manifest may hold credentials), with the Airflow
connections the manifest names already resolved by the task (this process has no task context to ask
the API server for them): they become ``AIRFLOW_CONN_<ID>`` variables of this process only.  When the
task did not know the run's container, ``owner`` (its task instance) makes sure the one found by name is
the task's own.  The task's
environment blocks the metadata database (``airflow-db-not-allowed:///``); this process needs no
database, so that setting is dropped before Airflow is imported.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    params = json.load(sys.stdin)
    for conn_id, connection in (params.pop("connections", None) or {}).items():
        os.environ[f"AIRFLOW_CONN_{conn_id.upper()}"] = connection
    for name in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__SQL_ALCHEMY_CONN"):
        if os.environ.get(name, "").startswith("airflow-db-not-allowed"):
            del os.environ[name]
    from airflow_wmltrain.errors import EXIT_OK, exit_status
    from airflow_wmltrain.runtime.run import halt_run

    owner = params.pop("owner", None)
    try:
        if params.get("container_id") is None and owner is not None:
            params["container_id"] = _own_container(params, owner)
        result = halt_run(**params)
    except Exception as err:
        logging.getLogger(__name__).exception("Halting training run %s failed", params.get("training_id"))
        return exit_status(err)
    logging.getLogger(__name__).info("Training run %s is %s", result["training_id"], result["state"])
    return EXIT_OK


def _own_container(params: dict[str, Any], owner: dict[str, Any]) -> str | None:
    """The run's container when the task did not know it: only one labelled with the task's own task
    instance (``owner``); another task instance's is refused (C105) and left untouched."""
    from airflow_wmltrain.hooks.docker import TrainingDockerHook

    hook = TrainingDockerHook.from_dict(params["docker_host"])
    found = hook.find_run_container(params["training_id"], owner)
    return found.container_id if found is not None else None


if __name__ == "__main__":
    sys.exit(main())
