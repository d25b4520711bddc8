"""``TrainingRunOperator`` driven without Airflow's scheduler: ``execute``, ``execute_complete`` and
``on_kill`` called with a minimal context (a fake task instance) against the stand-in Docker daemon and
the in-memory object store.  Each test pins one behaviour of issue 9 (the races of a task that Airflow
moves, clears or stops); no service is needed (``make unit``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException, TaskDeferred

from airflow_wmltrain.errors import DataLoadError, ResultsStoreError, RunConflictError
from airflow_wmltrain.hooks.docker import DockerHostError
from airflow_wmltrain.lifecycle import STATUS_FILE, RunState
from airflow_wmltrain.manifest import load_manifest
from airflow_wmltrain.operators import training_run as operator_module
from airflow_wmltrain.operators.training_run import REFUSED_PARAMETERS, TrainingRunOperator
from airflow_wmltrain.runtime import gpus, labels
from airflow_wmltrain.runtime.run import TrainingRun, halt_run
from airflow_wmltrain.runtime.workspace import Workspace
from airflow_wmltrain.settings import Settings
from airflow_wmltrain.training_id import derive_training_id
from tests.unit.conftest import IMAGE, RESULTS_BUCKET, FakeTi, manifest_doc
from tests.unit.fakes import FakeContainer, FakeDocker, MemoryStore, RunScript

pytestmark = pytest.mark.usefixtures("wmltrain_env", "stores")

COMMAND = "sh train.sh --learningRate 0.1"


def training_id_of(ti: FakeTi) -> str:
    return derive_training_id(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)


def run_name(ti: FakeTi) -> str:
    return labels.run_container_name(training_id_of(ti))


def owner_labels(ti: FakeTi, **other: Any) -> dict[str, str]:
    owner = {**ti.owner(), **other}
    return {
        labels.ROLE: labels.ROLE_RUN,
        labels.TRAINING_ID: training_id_of(ti),
        labels.GPUS: "",
        **{label: str(owner[key]) for key, label in labels.OWNER_LABELS.items()},
    }


def context(ti: FakeTi) -> Any:
    return {"ti": ti, "task_instance": ti}


def status_in(store: MemoryStore, ti: FakeTi) -> dict[str, Any]:
    document: dict[str, Any] = store.json(f"{training_id_of(ti)}/{STATUS_FILE}")
    return document


def states(document: dict[str, Any]) -> list[str]:
    return [item["state"] for item in document["history"]]


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``spawn_halter`` replaced: the halts the operator hands to a detached process, recorded."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(operator_module, "spawn_halter", lambda params, log_path: calls.append(dict(params)))
    return calls


def prior_run(ti: FakeTi, *, settings_dir: Path, state: RunState, **fields: Any) -> TrainingRun:
    """A status document written by an earlier try of ``ti`` (as that try's TrainingRun wrote it)."""
    settings = Settings(
        staging_dir=str(settings_dir), frameworks=json.dumps({"busybox": {"1": {"image": IMAGE}}})
    )
    run = TrainingRun(
        training_id=training_id_of(ti),
        manifest=load_manifest(manifest_doc(command=COMMAND), settings=settings),
        settings=settings,
    )
    run.begin(airflow=ti.owner(), **fields)
    for step in (RunState.DOWNLOADING, RunState.PROCESSING):
        if step.rank <= state.rank:
            run.record(step)
    return run


# --- construction ------------------------------------------------------------------------------------------

REFUSED_VALUES: dict[str, Any] = {
    "command": "python train.py",
    "container_name": "my-container",
    "auto_remove": "success",
    "port_bindings": {8080: 80},
    "tty": True,
    "xcom_all": True,
    "retrieve_output": True,
    "retrieve_output_path": "/tmp/out",
    "host_tmp_dir": "/tmp",
    "mount_tmp_dir": True,
    "tmp_dir": "/scratch",
    "privileged": True,
}


@pytest.mark.parametrize("name", sorted(REFUSED_VALUES))
def test_refused_docker_parameter_is_named(make_op: Callable[..., TrainingRunOperator], name: str) -> None:
    with pytest.raises(ValueError, match=rf"does not take {name} \("):
        make_op(**{name: REFUSED_VALUES[name]})


def test_all_refused_docker_parameters_are_named_at_once(make_op: Callable[..., TrainingRunOperator]) -> None:
    assert set(REFUSED_VALUES) == set(REFUSED_PARAMETERS)
    with pytest.raises(ValueError, match="does not take") as caught:
        make_op(**REFUSED_VALUES)
    for name in REFUSED_VALUES:
        assert f"{name} (" in str(caught.value)


# --- execute ------------------------------------------------------------------------------------------------


def test_a_results_store_that_refuses_the_credentials_fails_c103_at_once_and_says_why(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by ``wmltrain train --no-store-check`` with wrong keys: the first read of the results
    bucket got 403, the run was retried three times as if the store were down (S303) and ended FAILED
    with no reason in ``list``/``show``. A refusal is C103, not retried, and the status XCom says so."""
    from airflow_wmltrain.storage.transfer import TransferError

    def refuse(method: str, key: str, **_: Any) -> Any:
        raise TransferError(f"{method} {key}: access denied (403)", transient=False, status=403)

    monkeypatch.setattr(results, "request", refuse)
    with pytest.raises(AirflowFailException, match="C103"):
        make_op().execute(context(ti))
    [document] = ti.published()
    assert (document["state"], document["error"]["code"]) == ("FAILED", "C103")
    assert "refused the credentials" in document["error"]["message"]
    assert docker_api.created == []


def test_bad_manifest_fails_without_retry_publishes_the_refusal_and_creates_nothing(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    op = make_op(manifest=manifest_doc(command=COMMAND, resource="huge"))
    with pytest.raises(AirflowFailException, match="C10"):
        op.execute(context(ti))
    [document] = ti.published()
    assert document["state"] == "FAILED"
    assert document["error"]["code"].startswith("C10")
    assert "huge" in document["error"]["message"]
    assert document["airflow"]["task_id"] == "train"
    assert docker_api.created == []
    assert [r for r in docker_api.requests if r[0] != "GET"] == []
    assert results.keys() == set()


def test_a_run_completes(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    docker_api.run_script = RunScript(files={"metrics.json": '{"accuracy": 0.8}', "model.bin": "weights"})
    result = make_op().execute(context(ti))
    assert set(result) == {"training_id", "state", "results_location", "gpus", "metrics", "hyperparameters"}
    assert result == {
        "training_id": training_id_of(ti),
        "state": "COMPLETED",
        "results_location": f"s3://{RESULTS_BUCKET}/{training_id_of(ti)}/",
        "gpus": ["0"],
        "metrics": {"accuracy": 0.8},
        "hyperparameters": {},
    }
    document = status_in(results, ti)
    assert states(document) == ["PENDING", "DOWNLOADING", "PROCESSING", "STORING", "COMPLETED"]
    assert ti.published()[-1]["state"] == "COMPLETED"
    prefix = training_id_of(ti) + "/"
    assert {
        prefix + "model.bin",
        prefix + "learner-1/training-log.txt",
        prefix + "_manifest.yml",
    } <= results.keys()
    assert docker_api.containers == {}  # run container, probe and GPU leases: all removed
    assert docker_api.created.count(run_name(ti)) == 1
    assert ti.xcoms["training_id"] == training_id_of(ti)


def test_conflict_on_create_with_this_task_instances_container_reattaches(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    """Another try created the run's container between our look and our create: 409 means re-attach."""
    taken: list[FakeContainer] = []

    def another_try_creates_it(fake: FakeDocker, _: Any, body: dict[str, Any]) -> None:
        if body["name"] == run_name(ti) and not taken:
            taken.append(
                fake.add_container(run_name(ti), container_labels=owner_labels(ti), status="created")
            )

    docker_api.before_create.append(another_try_creates_it)
    docker_api.max_block = 5
    result = make_op().execute(context(ti))
    assert result["state"] == "COMPLETED"
    assert run_name(ti) not in docker_api.created  # our create was refused: no second container
    assert docker_api.started.count(taken[0].id) == 1  # the other try's container, started once
    assert all(doc["state"] != "FAILED" for doc in ti.published())
    assert status_in(results, ti)["state"] == "COMPLETED"


def test_conflict_on_create_reattach_records_processing_with_the_container(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    """After a 409 re-attach the run's status says PROCESSING in that container, as after _reattach."""
    taken: list[FakeContainer] = []

    def another_try_creates_it(fake: FakeDocker, _: Any, body: dict[str, Any]) -> None:
        if body["name"] == run_name(ti) and not taken:
            mine = {**owner_labels(ti), labels.GPUS: "0"}
            taken.append(fake.add_container(run_name(ti), container_labels=mine, status="running"))

    docker_api.before_create.append(another_try_creates_it)
    docker_api.run_script = RunScript(running=True)
    with pytest.raises(TaskDeferred):
        make_op(deferrable=True).execute(context(ti))
    document = status_in(results, ti)
    assert document["state"] == "PROCESSING"
    assert document["container"].get("id") == taken[0].id
    assert document["gpus"] == ["0"]


def test_conflict_on_create_with_another_task_instances_container_is_refused(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi
) -> None:
    taken: list[FakeContainer] = []

    def another_task_creates_it(fake: FakeDocker, _: Any, body: dict[str, Any]) -> None:
        if body["name"] == run_name(ti) and not taken:
            theirs = owner_labels(ti, dag_id="other_dag")
            taken.append(fake.add_container(run_name(ti), container_labels=theirs, status="running"))

    docker_api.before_create.append(another_task_creates_it)
    docker_api.max_block = 2  # were it followed, the wait would end soon (and the test fail, not hang)
    with pytest.raises(AirflowFailException, match="C105") as caught:
        make_op().execute(context(ti))
    assert isinstance(caught.value.__cause__, RunConflictError)
    assert "other_dag" in str(caught.value)
    container = taken[0]
    assert (container.status, container.starts, container.stops) == ("running", 0, 0)
    assert docker_api.find(container.id) is container


def test_existing_container_of_another_task_instance_is_refused_untouched(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    theirs = docker_api.add_container(
        run_name(ti), container_labels=owner_labels(ti, run_id="scheduled__other"), status="running"
    )
    docker_api.max_block = 2
    with pytest.raises(AirflowFailException, match="C105") as caught:
        make_op().execute(context(ti))
    assert isinstance(caught.value.__cause__, RunConflictError)
    assert "scheduled__other" in str(caught.value)
    assert docker_api.created == []
    assert (theirs.status, theirs.starts, theirs.stops) == ("running", 0, 0)
    assert docker_api.find(theirs.id) is theirs
    assert results.keys() == set()  # no status written over theirs


# --- halts and moves --------------------------------------------------------------------------------------


def test_halt_before_the_daemon_registered_the_container_never_starts_it(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    spawned: list[dict[str, Any]],
) -> None:
    op = make_op()
    ti.state = "failed"

    def kill_during_create(fake: FakeDocker, _: Any, body: dict[str, Any]) -> None:
        if body["name"] == run_name(ti):
            op.on_kill()

    docker_api.before_create.append(kill_during_create)
    with pytest.raises(AirflowFailException, match="C200"):
        op.execute(context(ti))
    assert run_name(ti) in docker_api.created
    assert docker_api.run_containers() == []  # removed
    assert run_name(ti) not in docker_api.started_names
    assert spawned == []  # no container to stop: ended at once
    assert docker_api.containers == {}  # no GPU lease left either
    document = status_in(results, ti)
    assert document["state"] == "HALTED"
    assert "marked failed" in document["error"]["message"]


def test_halt_between_create_and_start_removes_the_container_and_never_starts_it(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    spawned: list[dict[str, Any]],
) -> None:
    op = make_op()
    ti.state = "failed"

    def kill_after_create(fake: FakeDocker, container: Any, body: dict[str, Any]) -> None:
        if container.name == run_name(ti):
            op.on_kill()

    docker_api.after_create.append(kill_after_create)
    with pytest.raises(AirflowFailException, match="C200"):
        op.execute(context(ti))
    assert run_name(ti) not in docker_api.started_names
    assert docker_api.run_containers() == []  # removed by the task itself
    # The task handed the halt to the detached halter; run it here as that process would.
    [params] = spawned
    assert params["reason"] == "the run was halted: its task was marked failed"
    params.pop("connections")
    result = halt_run(**params)
    assert result["state"] == "HALTED"
    assert docker_api.containers == {}  # no GPU lease left either
    assert status_in(results, ti)["state"] == "HALTED"


def test_halt_as_the_container_starts_leaves_it_to_the_halter(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    spawned: list[dict[str, Any]],
) -> None:
    """on_kill comes while the start request is on its way: the task does not follow (or defer on) the
    container it handed to the halter; the halter stops it and ends the run HALTED with its log."""
    op = make_op(deferrable=True)
    ti.state = "failed"
    docker_api.run_script = RunScript(running=True, log="epoch 1\n")

    def kill_on_start(fake: FakeDocker, container: Any, body: dict[str, Any]) -> None:
        if container.name == run_name(ti):
            op.on_kill()

    docker_api.on_start.append(kill_on_start)
    with pytest.raises(AirflowFailException, match="C200"):
        op.execute(context(ti))  # neither TaskDeferred nor a wait
    [params] = spawned
    [container] = docker_api.run_containers()
    assert container.status == "running"
    params.pop("connections")
    assert halt_run(**params)["state"] == "HALTED"
    assert docker_api.stopped == [(container.id, 1)]
    assert docker_api.containers == {}  # stored and removed; no GPU lease left
    assert results.objects[f"{training_id_of(ti)}/learner-1/training-log.txt"] == b"epoch 1\n"


def test_a_deferrable_run_that_ends_while_watched_finishes_without_deferring(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """[wmltrain] defer_after: a short run ends while the task watches it (Docker's /wait) and is finished
    in the worker: no trip through the triggerer (whose early answer Airflow 3.3 makes wait)."""
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__DEFER_AFTER", "30")
    docker_api.run_script = RunScript(running=True)

    def finish_soon() -> None:
        deadline = time.monotonic() + 20
        while not docker_api.run_containers() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        docker_api.finish(docker_api.run_containers()[0].id, exit_code=0)

    finisher = threading.Thread(target=finish_soon)
    finisher.start()
    try:
        result = make_op(deferrable=True).execute(context(ti))  # no TaskDeferred
    finally:
        finisher.join()
    assert result["state"] == "COMPLETED"
    assert status_in(results, ti)["state"] == "COMPLETED"


def test_a_deferrable_run_still_training_after_defer_after_defers(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__DEFER_AFTER", "1")
    docker_api.run_script = RunScript(running=True)
    with pytest.raises(TaskDeferred):
        make_op(deferrable=True).execute(context(ti))
    [container] = docker_api.run_containers()
    assert container.status == "running"


@pytest.fixture
def deferred(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi
) -> tuple[TrainingRunOperator, FakeContainer]:
    """An operator whose run trains (a running container) and whose task deferred to the triggerer."""
    docker_api.run_script = RunScript(running=True)
    op = make_op(deferrable=True)
    with pytest.raises(TaskDeferred) as caught:
        op.execute(context(ti))
    assert caught.value.method_name == "execute_complete"
    [container] = docker_api.run_containers()
    assert container.status == "running"
    return op, container


@pytest.mark.parametrize("state", ["running", "up_for_retry", "queued", None, RuntimeError("API down")])
def test_on_kill_when_airflow_moved_the_task_leaves_the_run_alone(
    deferred: tuple[TrainingRunOperator, FakeContainer],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    spawned: list[dict[str, Any]],
    state: Any,
) -> None:
    op, container = deferred
    ti.state = state
    op.on_kill()
    assert spawned == []
    assert (container.status, container.stops) == ("running", 0)
    assert docker_api.find(container.id) is container
    assert status_in(results, ti)["state"] == "PROCESSING"


@pytest.mark.parametrize("state", ["failed", "success"])
def test_on_kill_when_a_person_ended_the_task_spawns_the_halter(
    deferred: tuple[TrainingRunOperator, FakeContainer],
    ti: FakeTi,
    spawned: list[dict[str, Any]],
    state: str,
) -> None:
    op, container = deferred
    ti.state = state
    op.on_kill()
    [params] = spawned
    assert params["reason"] == f"the run was halted: its task was marked {state}"
    assert params["container_id"] == container.id
    assert params["training_id"] == training_id_of(ti)
    assert params["grace"] == 1
    assert container.stops == 0  # the halter stops it, not the dying task


@pytest.mark.parametrize(("state", "halts"), [("failed", True), ("up_for_retry", False)])
def test_on_kill_of_a_mapped_task_instance_asks_for_its_own_state(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    spawned: list[dict[str, Any]],
    state: str,
    halts: bool,
) -> None:
    mapped = FakeTi(map_index=2)
    docker_api.run_script = RunScript(running=True)
    op = make_op(deferrable=True)
    with pytest.raises(TaskDeferred):
        op.execute(context(mapped))
    mapped.state = state
    op.on_kill()
    assert len(spawned) == (1 if halts else 0)
    if halts:
        assert spawned[0]["training_id"] == training_id_of(mapped)
        assert spawned[0]["reason"] == "the run was halted: its task was marked failed"


def test_reattach_to_an_exited_container_stores_it_at_once_without_deferring(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    script = RunScript(files={"metrics.json": '{"loss": 0.25}'})
    container = docker_api.add_container(
        run_name(ti), container_labels=owner_labels(ti), status="exited", log="done\n", script=script
    )
    result = make_op(deferrable=True).execute(context(ti))  # no TaskDeferred
    assert result["state"] == "COMPLETED"
    assert result["metrics"] == {"loss": 0.25}
    assert docker_api.created == []
    assert docker_api.find(container.id) is None
    assert results.objects[f"{training_id_of(ti)}/learner-1/training-log.txt"] == b"done\n"


# --- execute_complete ---------------------------------------------------------------------------------------


def exited_event(ti: FakeTi, container: FakeContainer, **changes: Any) -> dict[str, Any]:
    event = {
        "status": "exited",
        "training_id": training_id_of(ti),
        "docker_url": "",
        "container_id": container.id,
        "container_status": "exited",
        "exit_code": 0,
        "oom_killed": False,
        "finished_at": "2026-01-01T00:00:00Z",
        "docker_error": "",
    }
    event.update(changes)
    return event


def test_execute_complete_refuses_an_event_for_another_training_id(
    deferred: tuple[TrainingRunOperator, FakeContainer],
    make_op: Callable[..., TrainingRunOperator],
    ti: FakeTi,
    results: MemoryStore,
) -> None:
    _, container = deferred
    with pytest.raises(AirflowException, match="unexpected event"):
        make_op(deferrable=True).execute_complete(
            context(ti), exited_event(ti, container, training_id="training-other")
        )
    assert status_in(results, ti)["state"] == "PROCESSING"
    assert container.status == "running"


def test_execute_complete_refuses_an_event_for_another_container(
    deferred: tuple[TrainingRunOperator, FakeContainer],
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
) -> None:
    _, container = deferred
    with pytest.raises(AirflowException, match="runs in"):
        make_op(deferrable=True).execute_complete(
            context(ti), exited_event(ti, container, container_id="e" * 64)
        )
    assert status_in(results, ti)["state"] == "PROCESSING"
    assert docker_api.find(container.id) is container


def test_execute_complete_carries_the_events_exit_code_into_the_end(
    deferred: tuple[TrainingRunOperator, FakeContainer],
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
) -> None:
    _, container = deferred
    docker_api.finish(container.id, exit_code=0)  # what inspect would say now does not matter: the event does
    with pytest.raises(AirflowFailException, match="C201"):
        make_op(deferrable=True).execute_complete(context(ti), exited_event(ti, container, exit_code=3))
    document = status_in(results, ti)
    assert document["state"] == "FAILED"
    assert document["exit_code"] == 3
    assert "exited with status 3" in document["error"]["message"]
    assert docker_api.find(container.id) is None


def test_execute_complete_carries_the_events_oom_into_the_end(
    deferred: tuple[TrainingRunOperator, FakeContainer],
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
) -> None:
    _, container = deferred
    docker_api.finish(container.id, exit_code=0)
    event = exited_event(ti, container, exit_code=137, oom_killed=True)
    with pytest.raises(AirflowFailException, match="out of memory"):
        make_op(deferrable=True, mem_limit="1g").execute_complete(context(ti), event)
    document = status_in(results, ti)
    assert document["state"] == "FAILED"
    assert "out of memory (mem_limit 1g)" in document["error"]["message"]


def test_execute_complete_of_a_clean_exit_completes(
    deferred: tuple[TrainingRunOperator, FakeContainer],
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
) -> None:
    _, container = deferred
    docker_api.finish(container.id, exit_code=0)
    result = make_op(deferrable=True).execute_complete(context(ti), exited_event(ti, container))
    assert result["state"] == "COMPLETED"
    assert states(status_in(results, ti)) == ["PENDING", "DOWNLOADING", "PROCESSING", "STORING", "COMPLETED"]


# --- retries, clears and skips ----------------------------------------------------------------------------


def test_retry_of_a_run_on_a_docker_host_not_configured_fails_naming_it(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    tmp_path: Path,
) -> None:
    elsewhere = "tcp://10.0.0.9:2375"
    prior_run(ti, settings_dir=tmp_path, state=RunState.PROCESSING, container={"docker_url": elsewhere})
    with pytest.raises(AirflowFailException, match=r"10\.0\.0\.9:2375") as caught:
        make_op().execute(context(ti))
    assert isinstance(caught.value.__cause__, DockerHostError)
    assert docker_api.created == []
    assert status_in(results, ti)["state"] == "PROCESSING"  # left as it is


def test_retry_goes_back_to_the_recorded_host_of_a_docker_url_list(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    tmp_path: Path,
) -> None:
    with FakeDocker() as recorded_host:
        prior_run(
            ti, settings_dir=tmp_path, state=RunState.PROCESSING, container={"docker_url": recorded_host.url}
        )
        container = recorded_host.add_container(
            run_name(ti), container_labels=owner_labels(ti), status="exited", log="ok\n"
        )
        gpus.clear_caches()
        result = make_op(docker_url=[docker_api.url, recorded_host.url]).execute(context(ti))
        assert result["state"] == "COMPLETED"
        assert recorded_host.find(container.id) is None  # stored and removed there
        assert recorded_host.created == []
    assert docker_api.created == []
    assert not any("/containers/" in path for _, path in docker_api.requests)  # nothing asked of the first


def test_cleared_task_of_a_completed_run_returns_the_stored_result(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    docker_api.run_script = RunScript(files={"metrics.json": '{"accuracy": 0.8}'})
    first = make_op().execute(context(ti))
    created = list(docker_api.created)
    again = make_op().execute(context(FakeTi()))
    assert again == first
    assert docker_api.created == created  # not trained again
    assert status_in(results, ti)["state"] == "COMPLETED"


def test_cleared_task_with_changed_hyperparameters_is_refused(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    make_op().execute(context(ti))
    created = list(docker_api.created)
    with pytest.raises(AirflowFailException, match="new training_id") as caught:
        make_op(hyperparameters={"learningRate": 0.5}).execute(context(FakeTi()))
    assert isinstance(caught.value.__cause__, RunConflictError)
    assert docker_api.created == created
    assert status_in(results, ti)["state"] == "COMPLETED"


def test_skip_on_exit_code_stores_the_run_completed_and_skips_the_task(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    docker_api.run_script = RunScript(exit_code=99, log="nothing to train\n")
    with pytest.raises(AirflowSkipException, match="skip_on_exit_code"):
        make_op(skip_on_exit_code=99).execute(context(ti))
    document = status_in(results, ti)
    assert document["state"] == "COMPLETED"
    assert document["exit_code"] == 99
    assert "skipped" in document["phase"]
    assert results.objects[f"{training_id_of(ti)}/learner-1/training-log.txt"] == b"nothing to train\n"


def test_staging_failure_ends_the_run_failed_without_a_container(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken_stage(*args: Any, **kwargs: Any) -> Any:
        raise DataLoadError("cannot stage s3 bucket: connection refused")

    monkeypatch.setattr("airflow_wmltrain.runtime.run.stage", broken_stage)
    with pytest.raises(DataLoadError):  # retryable: left to Airflow's retries
        make_op().execute(context(ti))
    document = status_in(results, ti)
    assert document["state"] == "FAILED"
    assert document["error"]["code"] == "S302"
    assert run_name(ti) not in docker_api.created


def test_results_store_down_at_storing_fails_retryable_and_a_retry_stores_them(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    staging_dir: Path,
) -> None:
    docker_api.run_script = RunScript(files={"model.bin": "weights"})
    results.fail = lambda method, key: method == "PUT" and key.endswith("/model.bin")
    with pytest.raises(ResultsStoreError) as caught:  # retryable: not an AirflowFailException
        make_op().execute(context(ti))
    assert caught.value.code == "S303"
    assert "a retry stores them" in str(caught.value)
    assert ti.published()[-1]["state"] == "FAILED"
    assert ti.published()[-1]["error"]["code"] == "S303"
    [kept] = docker_api.run_containers()
    assert kept.status == "exited"
    assert Workspace.for_run(str(staging_dir), training_id_of(ti)).exists()  # the results wait there
    results.fail = None
    retry = FakeTi()
    retry.try_number = 2
    result = make_op().execute(context(retry))
    assert result["state"] == "COMPLETED"
    assert results.objects[f"{training_id_of(ti)}/model.bin"] == b"weights"
    assert docker_api.run_containers() == []
    assert docker_api.created.count(run_name(ti)) == 1  # the retry re-attached: no second container


def test_retry_whose_container_is_gone_fails_the_run_without_starting_another(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    tmp_path: Path,
) -> None:
    """The status says PROCESSING on this host, and the host has no container: never a second run."""
    prior_run(ti, settings_dir=tmp_path, state=RunState.PROCESSING, container={"docker_url": docker_api.url})
    with pytest.raises(AirflowFailException, match="is gone from the Docker host"):
        make_op().execute(context(ti))
    assert docker_api.created == []
    document = status_in(results, ti)
    assert document["state"] == "FAILED"
    assert "gone" in document["error"]["message"]


def test_reattach_to_a_container_created_but_never_started_starts_it_once(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    """An earlier try died between create and start: the new try starts that container."""
    container = docker_api.add_container(run_name(ti), container_labels=owner_labels(ti), status="created")
    docker_api.max_block = 3  # were it never started, the wait would end soon (and the test fail)
    result = make_op().execute(context(ti))
    assert result["state"] == "COMPLETED"
    assert docker_api.started == [container.id]
    assert docker_api.created == []
    assert "PROCESSING" in states(status_in(results, ti))


def test_execute_complete_of_an_error_event_with_the_container_gone_fails_the_run(
    deferred: tuple[TrainingRunOperator, FakeContainer],
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
) -> None:
    _, container = deferred
    with docker_api.lock:
        del docker_api.containers[container.id]  # removed behind the run's back
    event = {
        "status": "error",
        "training_id": training_id_of(ti),
        "container_id": container.id,
        "message": "gone",
    }
    with pytest.raises(AirflowFailException, match="gone"):
        make_op(deferrable=True).execute_complete(context(ti), event)
    assert status_in(results, ti)["state"] == "FAILED"


def test_execute_complete_of_an_error_event_with_the_container_there_is_left_to_a_retry(
    deferred: tuple[TrainingRunOperator, FakeContainer],
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
) -> None:
    _, container = deferred
    event = {
        "status": "error",
        "training_id": training_id_of(ti),
        "container_id": container.id,
        "message": "lost",
    }
    with pytest.raises(DockerHostError, match="lost"):  # retryable: a retry re-attaches
        make_op(deferrable=True).execute_complete(context(ti), event)
    assert status_in(results, ti)["state"] == "PROCESSING"
    assert (container.status, container.stops) == ("running", 0)
