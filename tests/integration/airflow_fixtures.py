"""A real Airflow metadata database for tests that run DAGs with ``dag.test()``.

Import both fixtures into a test module (``from tests.integration.airflow_fixtures import AirflowDb,
airflow_db, airflow_home``) and ask for ``airflow_db``::

    def test_something(airflow_db: AirflowDb) -> None:
        dag_file = airflow_db.write_dag("my_dag.py", SOURCE)   # into the DAGs folder
        dag = airflow_db.load_dag(dag_file, "my_dag")
        run = dag.test()
        assert airflow_db.task_states(run) == {"t": "success"}
        assert airflow_db.xcom(run, "t") == {...}

Once per test session, ``airflow_home`` makes an ``AIRFLOW_HOME`` in a temporary directory with a SQLite
database and a DAGs folder, and runs ``airflow db migrate`` there in a subprocess.  For each test that
asks for ``airflow_db``, the variables that select that home (``AIRFLOW_HOME``,
``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN``, ``AIRFLOW__CORE__DAGS_FOLDER``...) are set in ``os.environ`` and
this process's Airflow (already imported by the test modules, with the default home) is re-pointed at it:
its settings re-read, its ORM re-configured; both are restored after the test.

``airflow_db.env`` (or ``airflow_home.env``) holds the variables for subprocesses (``airflow dags test``,
``airflow tasks ...``): ``subprocess.run(..., env={**os.environ, **airflow_home.env})``.

Why a DAG file: ``dag.test()`` in Airflow 3.3 creates the run from the DAG serialized in the database,
and it serializes only DAGs it finds by parsing the configured bundles (the DAGs folder); a DAG defined
inside a test function is not found there ("Cannot create DagRun for DAG ... because the dag is not
serialized").  The task code that runs is that of the DAG object on which
``test()`` is called, in this process (``run_task_in_process``, an in-process Execution API), with
triggers run inline: a deferred task's trigger runs in this process too.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

AIRFLOW = str(Path(sys.executable).with_name("airflow"))
MIGRATE_TIMEOUT_S = 600


@dataclass
class AirflowDb:
    """The Airflow home of the test session.

    :param home: ``AIRFLOW_HOME``.
    :param dags_folder: the DAGs folder (the ``dags-folder`` bundle).
    :param sql_alchemy_conn: the SQLite URL of the metadata database.
    :param env: the environment variables that select this home (for subprocesses).
    """

    home: Path
    dags_folder: Path
    sql_alchemy_conn: str
    env: dict[str, str] = field(default_factory=dict)

    def write_dag(self, name: str, source: str) -> Path:
        """Write a DAG file into the DAGs folder (dedented); returns its path."""
        path = self.dags_folder / name
        path.write_text(textwrap.dedent(source))
        return path

    def load_dag(self, path: Path, dag_id: str) -> Any:
        """Import a DAG file as a module and return its DAG ``dag_id``."""
        spec = importlib.util.spec_from_file_location(f"airflow_test_dag_{path.stem}", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        from airflow.sdk import DAG

        dags = [value for value in vars(module).values() if isinstance(value, DAG) and value.dag_id == dag_id]
        assert dags, f"no DAG {dag_id} in {path}"
        return dags[0]

    def task_states(self, dag_run: Any) -> dict[str, str | None]:
        """``task_id`` → state of every task instance of a run (``map_index`` appended when mapped)."""
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            tis = session.scalars(
                select(TaskInstance).where(
                    TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
                )
            ).all()
            return {
                (ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): (
                    str(ti.state.value if hasattr(ti.state, "value") else ti.state) if ti.state else None
                )
                for ti in tis
            }

    def xcom(self, dag_run: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        """An XCom of a run's task, deserialized (``None`` when there is none)."""
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:
            row = session.execute(
                XComModel.get_many(
                    key=key,
                    run_id=dag_run.run_id,
                    dag_ids=dag_run.dag_id,
                    task_ids=task_id,
                    map_indexes=map_index,
                ).with_only_columns(XComModel.value)
            ).first()
        if row is None:
            return None
        return XComModel.deserialize_value(row)


def _settings_env(home: Path) -> dict[str, str]:
    dags = home / "dags"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(home / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
    }


def _reconfigure() -> None:
    """Make this process's Airflow read its settings (environment first) and open its database again."""
    from airflow import settings

    settings.configure_vars()
    settings.reconfigure_orm()


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> AirflowDb:
    """A temporary ``AIRFLOW_HOME`` with a migrated SQLite metadata database (made once per session).

    Nothing in this process points at it: use :func:`airflow_db` for that, or pass ``.env`` to a
    subprocess.
    """
    home = tmp_path_factory.mktemp("airflow-home")
    env = _settings_env(home)
    (home / "dags").mkdir()
    (home / "plugins").mkdir()
    proc = subprocess.run(
        [AIRFLOW, "db", "migrate"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=MIGRATE_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"airflow db migrate failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False
        )
    return AirflowDb(
        home=home,
        dags_folder=home / "dags",
        sql_alchemy_conn=env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"],
        env=env,
    )


@pytest.fixture
def airflow_db(airflow_home: AirflowDb) -> Iterator[AirflowDb]:
    """:func:`airflow_home`, selected for the test: its variables set in ``os.environ`` and this process's
    Airflow settings and ORM re-read; all restored after the test (so that the variables never leak into
    the subprocesses of other tests, which may pick their own ``AIRFLOW_HOME``)."""
    from airflow import settings

    with pytest.MonkeyPatch.context() as patch:
        for name, value in airflow_home.env.items():
            patch.setenv(name, value)
        _reconfigure()
        try:
            yield airflow_home
        finally:
            settings.dispose_orm()
    _reconfigure()  # back to the settings of the environment without them
