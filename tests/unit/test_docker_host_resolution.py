"""Which Docker host a task runs on when its DAG names none, and what a retry does when it lands on a worker
of another host (issue 12: a grid spread over the GPU hosts' Celery workers).

``DockerOperator`` fills an absent ``docker_url`` in from ``$DOCKER_HOST`` where the DAG file is parsed; a
``TrainingRunOperator`` that names no host reads ``[wmltrain] docker_url``, else ``$DOCKER_HOST``, on the
worker when the task runs. A run's status records its engine's id, so that a retry never starts a second
container on another engine, even one reached by the same URL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_wmltrain.hooks.docker import DockerHostError
from airflow_wmltrain.lifecycle import RunState
from airflow_wmltrain.operators.training_run import DEFAULT_DOCKER_URL, TrainingRunOperator
from airflow_wmltrain.runtime import gpus
from airflow_wmltrain.settings import Settings
from tests.unit.conftest import FakeTi
from tests.unit.fakes import FakeDocker, MemoryStore
from tests.unit.test_operator_unit import context, owner_labels, prior_run, run_name, status_in

pytestmark = pytest.mark.usefixtures("wmltrain_env", "stores")

#: Where the dag-processor's ``$DOCKER_HOST`` points: nothing answers there.
PARSE_TIME_HOST = "tcp://127.0.0.1:9"


@pytest.fixture
def parsed_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DAG is parsed with the dag-processor's ``$DOCKER_HOST`` and no ``[wmltrain] docker_url``."""
    monkeypatch.setenv("DOCKER_HOST", PARSE_TIME_HOST)
    monkeypatch.delenv("AIRFLOW__WMLTRAIN__DOCKER_URL", raising=False)


def on_worker(monkeypatch: pytest.MonkeyPatch, *, setting: str | None = None, docker_host: str | None = None):
    """The worker's environment when the task runs."""
    for name, value in (("AIRFLOW__WMLTRAIN__DOCKER_URL", setting), ("DOCKER_HOST", docker_host)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_task_without_docker_url_runs_on_the_workers_setting(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    op = make_op(docker_url=None)
    assert op.docker_url == PARSE_TIME_HOST  # DockerOperator's parse-time default, as the UI shows it
    on_worker(monkeypatch, setting=docker_api.url, docker_host="tcp://127.0.0.1:7")
    result = op.execute(context(ti))
    assert result["state"] == "COMPLETED"
    assert run_name(ti) in docker_api.created
    container = status_in(results, ti)["container"]
    assert container["docker_url"] == docker_api.url
    assert container["docker_id"] == docker_api.daemon_id


@pytest.mark.usefixtures("parsed_elsewhere")
def test_without_the_setting_the_workers_docker_host_is_used(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    op = make_op(docker_url=None)
    on_worker(monkeypatch, docker_host=docker_api.url)
    assert op.execute(context(ti))["state"] == "COMPLETED"
    assert run_name(ti) in docker_api.created


def test_nothing_set_means_the_local_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    op = TrainingRunOperator(task_id="t", manifest={}, model_definition="m.zip")
    on_worker(monkeypatch)
    op._resolve_docker_host(Settings())
    assert op.docker_url == DEFAULT_DOCKER_URL == "unix://var/run/docker.sock"


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_docker_url_the_dag_names_wins_over_the_workers(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeDocker() as workers_own:
        on_worker(monkeypatch, setting=workers_own.url, docker_host=workers_own.url)
        assert make_op(docker_url=docker_api.url).execute(context(ti))["state"] == "COMPLETED"
        assert workers_own.created == []
    assert run_name(ti) in docker_api.created


def test_the_setting_is_read_from_airflows_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__DOCKER_URL", " tcp://gpu-1.example.com:2376 ")
    assert Settings.from_airflow_config().docker_url == "tcp://gpu-1.example.com:2376"
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__DOCKER_URL", "")
    assert Settings.from_airflow_config().docker_url is None


# --- a retry that lands on a worker of another host -------------------------------------------------------


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_retry_on_another_workers_host_re_attaches_through_the_recorded_url(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The run started on host A (its worker died); the retry lands on host B's worker, which reaches A's
    engine by the recorded URL (tcp://, or a socket of the same machine): it re-attaches there."""
    with FakeDocker() as host_a:
        prior_run(
            ti,
            settings_dir=tmp_path,
            state=RunState.PROCESSING,
            container={"docker_url": host_a.url, "docker_id": host_a.daemon_id},
        )
        container = host_a.add_container(
            run_name(ti), container_labels=owner_labels(ti), status="exited", log="ok\n"
        )
        gpus.clear_caches()
        on_worker(monkeypatch, setting=docker_api.url)  # host B's worker
        result = make_op(docker_url=None).execute(context(ti))
        assert result["state"] == "COMPLETED"
        assert host_a.find(container.id) is None  # stored and removed on A
        assert host_a.created == []
    assert docker_api.created == []  # B started nothing


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_retry_that_finds_another_engine_at_the_recorded_url_starts_nothing_and_may_retry(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Every host has unix:///var/run/docker.sock: the URL alone does not say which engine. The run
    started on engine A; a retry on host B reaches B's engine at the same URL: it must not start a second
    container there, and fails retryable so that a later try may land on A's worker."""
    engine_a = "A" * 12 + ":OTHER:ENGINE"
    prior_run(
        ti,
        settings_dir=tmp_path,
        state=RunState.DOWNLOADING,
        container={"docker_url": docker_api.url, "docker_id": engine_a},
    )
    on_worker(monkeypatch, setting=docker_api.url)
    with pytest.raises(DockerHostError, match=r"lives on the Docker engine AAAAAAAAAAAA .* another engine"):
        make_op(docker_url=None).execute(context(ti))
    assert docker_api.created == []
    assert status_in(results, ti)["state"] == "DOWNLOADING"  # left for the run's own host


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_retry_that_cannot_reach_the_runs_host_starts_nothing_and_may_retry(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    gone = "unix:///run/no-such-host/docker.sock"
    prior_run(
        ti,
        settings_dir=tmp_path,
        state=RunState.PROCESSING,
        container={"docker_url": gone, "docker_id": "ENGINE:OF:HOST:A"},
    )
    on_worker(monkeypatch, setting=docker_api.url)
    with pytest.raises(DockerHostError, match="cannot reach it") as caught:
        make_op(docker_url=None).execute(context(ti))
    assert caught.value.retryable
    assert docker_api.created == []
    assert status_in(results, ti)["state"] == "PROCESSING"


def test_a_dag_that_names_other_hosts_still_fails_at_once(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    tmp_path: Path,
) -> None:
    prior_run(
        ti,
        settings_dir=tmp_path,
        state=RunState.PROCESSING,
        container={"docker_url": "tcp://10.0.0.9:2375", "docker_id": "X"},
    )
    with pytest.raises(AirflowFailException, match="configured for"):
        make_op().execute(context(ti))
    assert docker_api.created == []


# --- deferring ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "resolved", "defers"),
    [
        (None, "unix:///var/run/docker.sock", False),  # the worker's own engine: the triggerer is elsewhere
        (None, "tcp://gpu-1.example.com:2376", True),  # an address every machine reaches
        ("unix:///var/run/docker.sock", None, True),  # the DAG's author named it: as before
    ],
)
def test_a_run_on_the_workers_local_socket_is_followed_in_the_worker(
    given: str | None, resolved: str | None, defers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    op = TrainingRunOperator(
        task_id="t", manifest={}, model_definition="m.zip", docker_url=given, deferrable=True
    )
    op._resolve_docker_host(Settings(docker_url=resolved))
    assert op._defers(op.hook) is defers
    op.deferrable = False
    assert op._defers(op.hook) is False
