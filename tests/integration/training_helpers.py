"""Helpers for the training-run tests: model zips, manifests, and DAGs run through real Airflow.

A test writes a small DAG file and runs it with ``dag.test()`` in a subprocess (its own Airflow home,
a copy of a migrated SQLite database), so that runs can happen concurrently, be killed (a dying
worker) or be sent SIGTERM (a task marked failed), exactly as a worker process would be.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
FRAMEWORK = {"name": "busybox", "version": "1"}


def model_zip(path: Path, files: dict[str, str]) -> Path:
    """Write a model-definition zip holding ``files`` (name -> text)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    path.write_bytes(buffer.getvalue())
    return path


def manifest(
    *,
    command: str,
    data_bucket: str,
    results_bucket: str,
    connection: dict[str, Any],
    store_type: str = "s3",
    resource: str = "small",
    name: str = "test-run",
) -> dict[str, Any]:
    """A training manifest (seed spelling) running ``command`` on the busybox test framework."""
    return {
        "model_definition": {
            "name": name,
            "framework": dict(FRAMEWORK),
            "execution": {"command": command, "resource": resource},
        },
        "training_data_reference": [
            {"connection": connection, "source": {"bucket": data_bucket, "type": store_type}}
        ],
        "training_results_reference": {
            "connection": connection,
            "target": {"bucket": results_bucket, "type": store_type},
        },
    }


@dataclass
class AirflowRunner:
    """Runs DAG files with ``dag.test()`` in subprocesses, each on a copy of a migrated database."""

    template_home: Path
    work: Path
    env: dict[str, str]

    def home(self, name: str) -> Path:
        home = self.work / name
        if not home.exists():
            shutil.copytree(self.template_home, home)
        return home

    def write_dag(self, name: str, body: str) -> Path:
        """A DAG file whose ``__main__`` runs ``dag.test()`` and prints the task states as JSON."""
        path = self.work / f"{name}.py"
        path.write_text(
            textwrap.dedent(
                """
                from __future__ import annotations
                import json, sys
                from datetime import datetime
                from airflow.sdk import DAG
                from airflow_wmltrain.operators.training_run import TrainingRunOperator
                """
            )
            + textwrap.dedent(body)
            + textwrap.dedent(
                """
                if __name__ == "__main__":
                    import os
                    # Its run id (manual__<time>) differs from one process to the next, unless the test
                    # fixes the logical date: then a second process runs the same task instance again
                    # (what a retry is), with the same run id.
                    fixed = os.environ.get("WMLTRAIN_TEST_LOGICAL_DATE")
                    when = datetime.fromisoformat(fixed) if fixed else None
                    dr = dag.test(logical_date=when, run_after=when) if when else dag.test()
                    states = {ti.task_id + ("" if ti.map_index < 0 else f"[{ti.map_index}]"): str(ti.state)
                              for ti in dr.get_task_instances()}
                    print("STATES=" + json.dumps(states), flush=True)
                """
            )
        )
        return path

    def popen(
        self,
        dag_file: Path,
        *,
        home: str,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        environment = {**os.environ, **self.env, **(env or {})}
        environment["AIRFLOW_HOME"] = str(self.home(home))
        environment["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{self.home(home)}/airflow.db"
        out = (log or self.work / f"{home}.log").open("wb")
        args = [sys.executable, str(dag_file)]
        return subprocess.Popen(
            args, env=environment, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True
        )

    def run(
        self,
        dag_file: Path,
        *,
        home: str,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> tuple[dict[str, str], str]:
        """Run the DAG to its end; the task states and the output."""
        log = self.work / f"{home}.log"
        proc = self.popen(dag_file, home=home, env=env, log=log)
        proc.wait(timeout=timeout)
        output = log.read_text(errors="replace")
        return parse_states(output), output


def parse_states(output: str) -> dict[str, str]:
    for line in output.splitlines():
        if line.startswith("STATES="):
            return {k: v.rsplit(".", 1)[-1].lower() for k, v in json.loads(line[len("STATES=") :]).items()}
    return {}
