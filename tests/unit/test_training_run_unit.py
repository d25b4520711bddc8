"""``TrainingRun`` (the one home of a run's lifecycle) against the stand-in Docker daemon and the in-memory
object store: the status document, how a run ends (stored, failed, killed for memory, halted, results
store down), the halt, and ``read_metrics``.  No service is needed (``make unit``)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from airflow_wmltrain.charts import learning_curve_png
from airflow_wmltrain.errors import ResultsStoreError, RunHaltedError
from airflow_wmltrain.hooks.docker import ContainerOutcome, TrainingDockerHook
from airflow_wmltrain.lifecycle import STATUS_FILE, RunState
from airflow_wmltrain.manifest import load_manifest
from airflow_wmltrain.metrics import MAX_METRICS_BYTES as _MAX_METRICS_BYTES
from airflow_wmltrain.runtime import labels
from airflow_wmltrain.runtime.run import TrainingRun, read_metrics
from airflow_wmltrain.settings import Settings
from tests.unit.conftest import RESULTS_BUCKET, manifest_doc
from tests.unit.fakes import FakeDocker, MemoryStore, MemoryStores

TRAINING_ID = "training-unit-run"
NAME = labels.run_container_name(TRAINING_ID)
OWNER = {"dag_id": "d", "run_id": "r", "task_id": "t", "map_index": -1}


def new_run(settings: Settings, published: list[dict[str, Any]] | None = None) -> TrainingRun:
    manifest = load_manifest(manifest_doc(), settings=settings)
    return TrainingRun(
        training_id=TRAINING_ID,
        manifest=manifest,
        settings=settings,
        publish=published.append if published is not None else None,
    )


def processing(run: TrainingRun) -> TrainingRun:
    """The run as it is while its container trains: PENDING, DOWNLOADING, PROCESSING; workspace made."""
    run.begin(airflow=OWNER)
    run.record(RunState.DOWNLOADING)
    run.workspace.create()
    run.record(RunState.PROCESSING, container={"id": "x", "docker_url": "tcp://fake"})
    return run


def container_labels() -> dict[str, str]:
    return {labels.ROLE: labels.ROLE_RUN, labels.TRAINING_ID: TRAINING_ID, labels.GPUS: ""}


def stored_status(store: MemoryStore) -> dict[str, Any]:
    document: dict[str, Any] = store.json(f"{TRAINING_ID}/{STATUS_FILE}")
    return document


@pytest.fixture
def hook(docker_api: FakeDocker) -> TrainingDockerHook:
    return TrainingDockerHook(docker_url=docker_api.url, api_version="1.43", timeout=10)


@pytest.fixture
def results(stores: MemoryStores) -> MemoryStore:
    return stores[RESULTS_BUCKET]


# --- the status document --------------------------------------------------------------------------------


def test_begin_record_end_write_the_status_and_publish_the_same_document(
    settings: Settings, results: MemoryStore
) -> None:
    published: list[dict[str, Any]] = []
    run = new_run(settings, published)
    run.begin(airflow=OWNER)
    assert stored_status(results) == json.loads(json.dumps(published[-1]))
    assert stored_status(results)["state"] == "PENDING"
    run.record(RunState.DOWNLOADING)
    run.record(RunState.PROCESSING, gpus=("1",))
    run.end(RunState.COMPLETED, metrics={"accuracy": 0.9})
    document = stored_status(results)
    assert document == json.loads(json.dumps(published[-1]))
    assert [h["state"] for h in document["history"]] == ["PENDING", "DOWNLOADING", "PROCESSING", "COMPLETED"]
    assert [p["state"] for p in published] == ["PENDING", "DOWNLOADING", "PROCESSING", "COMPLETED"]
    assert document["metrics"] == {"accuracy": 0.9}
    assert document["airflow"] == OWNER
    assert document["results_location"] == f"s3://{RESULTS_BUCKET}/{TRAINING_ID}/"


def test_end_keeps_a_terminal_state_written_by_another_process(
    settings: Settings, results: MemoryStore
) -> None:
    run = processing(new_run(settings))
    halter = new_run(settings)  # the detached halter: its own TrainingRun of the same run
    assert halter.resume() is not None
    halter.end(RunState.HALTED, RunHaltedError("the run was halted: its task was marked failed"))
    ended = run.end(RunState.COMPLETED, metrics={"loss": 0.1})
    assert ended.state is RunState.HALTED
    assert run.status.state is RunState.HALTED
    assert stored_status(results)["state"] == "HALTED"
    assert stored_status(results)["error"]["code"] == "C200"


# --- store: how a container ended ----------------------------------------------------------------------


def test_store_of_an_exited_container_completes_the_run(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    (run.workspace.results / "metrics.json").write_text(json.dumps({"accuracy": 0.75, "notes": [1]}))
    (run.workspace.results / "model.bin").write_bytes(b"weights")
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", log="epoch 1\ndone\n"
    )
    status = run.store(hook, hook.inspect(container.id))
    assert status.state is RunState.COMPLETED
    assert status.metrics == {"accuracy": 0.75}
    assert status.exit_code == 0
    assert results.objects[f"{TRAINING_ID}/model.bin"] == b"weights"
    assert results.objects[f"{TRAINING_ID}/learner-1/training-log.txt"] == b"epoch 1\ndone\n"
    assert stored_status(results)["state"] == "COMPLETED"
    assert [h["state"] for h in stored_status(results)["history"]][-2:] == ["STORING", "COMPLETED"]
    assert docker_api.find(container.id) is None  # removed
    assert not run.workspace.exists()


def test_a_log_file_the_container_linked_to_a_worker_file_is_not_followed(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook, tmp_path: Path
) -> None:
    """The container may leave learner-1/training-log.txt as a link to a file of the worker (a .pth in
    site-packages, say): storing the log replaces the link, the worker's file stays as it was."""
    run = processing(new_run(settings))
    worker_file = tmp_path / "worker-owned.pth"
    worker_file.write_text("import harmless\n")
    (run.workspace.logs / "training-log.txt").symlink_to(worker_file)
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", log="import evil\n"
    )
    status = run.store(hook, hook.inspect(container.id))
    assert status.state is RunState.COMPLETED
    assert worker_file.read_text() == "import harmless\n"
    assert results.objects[f"{TRAINING_ID}/learner-1/training-log.txt"] == b"import evil\n"


def test_store_of_a_failed_container_fails_the_run_with_the_last_log_lines(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    log = "".join(f"line {i}\n" for i in range(30)) + "Traceback: boom\n"
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", exit_code=3, log=log
    )
    status = run.store(hook, hook.inspect(container.id))
    assert status.state is RunState.FAILED
    assert status.error is not None
    assert status.error["code"] == "C201"
    message = status.error["message"]
    assert "exited with status 3" in message
    assert "Traceback: boom" in message
    assert "line 29" in message
    assert "line 5\n" not in message  # only the last lines
    assert results.objects[f"{TRAINING_ID}/learner-1/training-log.txt"] == log.encode()
    assert docker_api.find(container.id) is None
    assert not run.workspace.exists()


def test_store_of_an_oom_killed_container_says_out_of_memory(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", exit_code=137, oom_killed=True
    )
    status = run.store(hook, hook.inspect(container.id), mem_limit="2g")
    assert status.state is RunState.FAILED
    assert status.error is not None
    assert status.error["code"] == "C201"
    assert "out of memory (mem_limit 2g)" in status.error["message"]


def test_store_of_an_oom_kill_fails_the_run_even_with_exit_status_0(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    """The kernel killed a process of the container (OOMKilled) though the main one exited 0."""
    run = processing(new_run(settings))
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", exit_code=0, oom_killed=True
    )
    status = run.store(hook, hook.inspect(container.id))
    assert status.state is RunState.FAILED
    assert status.error is not None
    assert "out of memory" in status.error["message"]


def test_store_of_a_halted_run_ends_it_halted(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", exit_code=143
    )
    status = run.store(hook, hook.inspect(container.id), halted=True, halt_reason="the run was halted: test")
    assert status.state is RunState.HALTED
    assert status.error == {"code": "C200", "message": "the run was halted: test"}
    assert stored_status(results)["state"] == "HALTED"


def test_results_store_down_at_storing_fails_s303_and_keeps_container_and_workspace(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    published: list[dict[str, Any]] = []
    run = processing(new_run(settings, published))
    (run.workspace.results / "model.bin").write_bytes(b"weights")
    container = docker_api.add_container(NAME, container_labels=container_labels(), status="exited")
    results.down = True
    with pytest.raises(ResultsStoreError) as caught:
        run.store(hook, hook.inspect(container.id))
    assert caught.value.code == "S303"
    assert str(run.workspace.root) in str(caught.value)
    assert "a retry stores them" in str(caught.value)
    last = published[-1]
    assert last["state"] == "FAILED"
    assert last["error"]["code"] == "S303"
    assert str(run.workspace.root) in last["error"]["message"]
    assert docker_api.find(container.id) is not None  # kept for a retry
    assert run.workspace.exists()
    assert (run.workspace.results / "model.bin").exists()


def test_results_store_failing_during_the_upload_fails_s303_and_keeps_everything(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    published: list[dict[str, Any]] = []
    run = processing(new_run(settings, published))
    (run.workspace.results / "model.bin").write_bytes(b"weights")
    container = docker_api.add_container(NAME, container_labels=container_labels(), status="exited")
    results.fail = lambda method, key: method == "PUT" and key.endswith("/model.bin")
    with pytest.raises(ResultsStoreError, match="a retry stores them"):
        run.store(hook, hook.inspect(container.id))
    assert published[-1]["state"] == "FAILED"
    assert published[-1]["error"]["code"] == "S303"
    assert stored_status(results)["state"] == "STORING"  # the bucket still says where a retry resumes
    assert docker_api.find(container.id) is not None
    assert run.workspace.exists()


def test_results_store_failing_at_the_last_status_write_fails_s303_and_says_where(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    """The store takes the results and the logs, then refuses the final _status.json (COMPLETED)."""
    published: list[dict[str, Any]] = []
    run = processing(new_run(settings, published))
    (run.workspace.results / "model.bin").write_bytes(b"weights")
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", log="ok\n"
    )
    log_key = f"{TRAINING_ID}/learner-1/training-log.txt"
    results.fail = lambda method, key: (
        method == "PUT" and key.endswith(STATUS_FILE) and log_key in results.objects
    )
    with pytest.raises(ResultsStoreError) as caught:
        run.store(hook, hook.inspect(container.id))
    assert docker_api.find(container.id) is not None  # kept for a retry
    assert run.workspace.exists()
    assert "a retry stores them" in str(caught.value)  # the message says where the results wait
    assert published[-1]["state"] == "FAILED"  # the XCom does not say COMPLETED while the task fails
    assert published[-1]["error"]["code"] == "S303"


def test_results_store_down_without_workspace_names_the_container(
    settings: Settings,
    results: MemoryStore,
    docker_api: FakeDocker,
    hook: TrainingDockerHook,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    published: list[dict[str, Any]] = []
    run = processing(new_run(settings, published))
    run.workspace.remove()  # another worker ran the container: its directories are not here
    container = docker_api.add_container(NAME, container_labels=container_labels(), status="exited")
    results.down = True
    with pytest.raises(ResultsStoreError, match=f"the container {container.id[:12]} on the Docker host"):
        run.store(hook, hook.inspect(container.id))
    assert published[-1]["state"] == "FAILED"
    assert docker_api.find(container.id) is not None


# --- halt ----------------------------------------------------------------------------------------------


def test_halt_of_a_running_container_stops_it_and_stores_it_halted(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="running", log="epoch 1\n"
    )
    halter = new_run(settings)
    status = halter.halt(hook, container.id, grace=3, reason="the run was halted: test")
    assert docker_api.stopped == [(container.id, 3)]
    assert status.state is RunState.HALTED
    assert status.error is not None
    assert status.error["message"] == "the run was halted: test"
    assert results.objects[f"{TRAINING_ID}/learner-1/training-log.txt"] == b"epoch 1\n"
    assert stored_status(results)["state"] == "HALTED"
    assert docker_api.find(container.id) is None
    assert not run.workspace.exists()


def test_halt_of_a_container_that_already_exited_stores_it_as_it_ended(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    (run.workspace.results / "metrics.json").write_text('{"accuracy": 0.5}')
    container = docker_api.add_container(NAME, container_labels=container_labels(), status="exited")
    status = new_run(settings).halt(hook, None, grace=3, reason="the run was halted: test")  # found by name
    assert docker_api.stopped == []
    assert status.state is RunState.COMPLETED
    assert status.metrics == {"accuracy": 0.5}
    assert docker_api.find(container.id) is None


def test_halt_without_a_container_ends_halted_at_once(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = new_run(settings)
    run.begin(airflow=OWNER)
    run.record(RunState.DOWNLOADING)
    status = new_run(settings).halt(hook, None, grace=3, reason="the run was halted: test")
    assert status.state is RunState.HALTED
    assert stored_status(results)["state"] == "HALTED"
    assert docker_api.stopped == []
    # The same with a container id that no longer exists.
    assert new_run(settings).halt(hook, "0" * 64, grace=3, reason="again").state is RunState.HALTED


def test_a_halt_during_storing_ends_the_run_instead_of_leaving_it_storing(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    """The task was killed while it stored (issue 9: with no retry the run stayed STORING for ever): the
    halter stores the ended container again and ends the run as the container ended."""
    run = processing(new_run(settings))
    (run.workspace.results / "model.pt").write_bytes(b"weights")
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", log="epoch 9\n"
    )
    run.record(RunState.STORING, exit_code=0)  # the task's store() stopped here: killed
    assert stored_status(results)["state"] == "STORING"
    status = new_run(settings).halt(hook, None, grace=3, reason="the run was halted: its task was killed")
    assert status.state is RunState.COMPLETED, status.state
    assert stored_status(results)["state"] == "COMPLETED"
    assert results.objects[f"{TRAINING_ID}/model.pt"] == b"weights"
    assert results.objects[f"{TRAINING_ID}/learner-1/training-log.txt"] == b"epoch 9\n"
    assert docker_api.stopped == []
    assert docker_api.find(container.id) is None
    assert not run.workspace.exists()


def test_halt_leaves_a_run_already_over_as_it_is(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    run.end(RunState.COMPLETED)
    container = docker_api.add_container(NAME, container_labels=container_labels(), status="running")
    assert new_run(settings).halt(hook, container.id, grace=3, reason="late").state is RunState.COMPLETED
    assert docker_api.stopped == []


def test_outcome_of_a_running_container_is_not_a_success(
    docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    container = docker_api.add_container(NAME, container_labels=container_labels(), status="running")
    outcome = hook.inspect(container.id)
    assert outcome.running
    assert not outcome.succeeded
    assert outcome == ContainerOutcome.from_inspect(docker_api.find(container.id).inspect())  # type: ignore[union-attr]


# --- read_metrics ---------------------------------------------------------------------------------------


def test_read_metrics_keeps_the_scalar_entries(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(
        json.dumps({"accuracy": 0.9, "epochs": 3, "name": "x", "ok": True, "none": None, "list": [1]})
    )
    assert read_metrics(path) == {"accuracy": 0.9, "epochs": 3, "name": "x", "ok": True, "none": None}
    assert read_metrics(tmp_path / "missing.json") == {}
    path.write_text("[1, 2]")
    assert read_metrics(path) == {}


def test_read_metrics_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text('{"secret": 1}')
    link = tmp_path / "metrics.json"
    link.symlink_to(target)
    assert read_metrics(link) == {}


def test_read_metrics_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "metrics.json"
    os.mkfifo(fifo)
    found: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: found.append(read_metrics(fifo)), daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "read_metrics blocked opening a FIFO that has no writer"
    assert found == [{}]
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer that has written a valid document
    try:
        os.write(writer, b'{"accuracy": 0.9}')
        assert read_metrics(fifo) == {}
    finally:
        os.close(writer)


def test_read_metrics_refuses_a_too_large_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    # Valid JSON in its first bytes (then blanks): only the size check refuses it, not a truncated read.
    path.write_text(json.dumps({"accuracy": 0.9}) + " " * _MAX_METRICS_BYTES)
    assert read_metrics(path) == {}
    path.write_text(json.dumps({"accuracy": 0.9}) + " " * (_MAX_METRICS_BYTES - 100))
    assert read_metrics(path) == {"accuracy": 0.9}


# --- the learning curve --------------------------------------------------------------------------------

CURVE = f"{TRAINING_ID}/learning-curve.png"
STEPS = tuple({"step": 10 * i, "loss": 1.0 / i, "accuracy": 1 - 1.0 / (i + 1)} for i in range(1, 13))


def exited(docker_api: FakeDocker, hook: TrainingDockerHook) -> ContainerOutcome:
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", log="ok\n"
    )
    return hook.inspect(container.id)


def test_store_keeps_the_learning_curve_of_the_runs_steps(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    run.record(RunState.PROCESSING, steps=STEPS, hyperparameters={"lr": 0.01})
    status = run.store(hook, exited(docker_api, hook))
    assert status.state is RunState.COMPLETED
    assert results.objects[CURVE].startswith(b"\x89PNG\r\n\x1a\n")
    assert results.content_types[CURVE] == "image/png"
    # stored before the end: a run that reads COMPLETED has its picture
    puts = [key for method, key in results.requests if method == "PUT"]
    assert puts.index(CURVE) < len(puts) - 1
    assert puts[-1] == f"{TRAINING_ID}/{STATUS_FILE}"


def test_the_learning_curve_draws_the_steps_read_at_storing(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    """No point was published while the run trained (a short run, a long metrics_interval): the steps
    read from metrics.jsonl at STORING are the ones drawn."""
    run = processing(new_run(settings))
    (run.workspace.results / "metrics.jsonl").write_text("".join(json.dumps(point) + "\n" for point in STEPS))
    status = run.store(hook, exited(docker_api, hook))
    assert len(status.steps) == len(STEPS)
    assert results.objects[CURVE].startswith(b"\x89PNG\r\n\x1a\n")


def test_a_failed_run_keeps_its_learning_curve_too(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    run.record(RunState.PROCESSING, steps=STEPS)
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", exit_code=3, log="boom\n"
    )
    assert run.store(hook, hook.inspect(container.id)).state is RunState.FAILED
    assert results.objects[CURVE].startswith(b"\x89PNG")


@pytest.mark.parametrize("steps", [(), ({"step": 1, "loss": 0.5},)])
def test_without_two_points_no_learning_curve_is_stored(
    settings: Settings,
    results: MemoryStore,
    docker_api: FakeDocker,
    hook: TrainingDockerHook,
    steps: tuple[dict[str, float], ...],
) -> None:
    run = processing(new_run(settings))
    run.record(RunState.PROCESSING, steps=steps)
    assert run.store(hook, exited(docker_api, hook)).state is RunState.COMPLETED
    assert CURVE not in results.objects


@pytest.mark.parametrize("with_steps", [True, False])
def test_a_learning_curve_the_container_wrote_never_replaces_the_runs(
    settings: Settings,
    results: MemoryStore,
    docker_api: FakeDocker,
    hook: TrainingDockerHook,
    with_steps: bool,
) -> None:
    run = processing(new_run(settings))
    if with_steps:
        run.record(RunState.PROCESSING, steps=STEPS)
    (run.workspace.results / "learning-curve.png").write_bytes(b"not our picture")
    (run.workspace.results / "model.bin").write_bytes(b"weights")
    assert run.store(hook, exited(docker_api, hook)).state is RunState.COMPLETED
    assert results.objects[f"{TRAINING_ID}/model.bin"] == b"weights"
    if with_steps:
        assert results.objects[CURVE].startswith(b"\x89PNG")
    else:
        assert CURVE not in results.objects


def test_a_learning_curve_that_cannot_be_drawn_or_stored_is_a_warning_not_a_failure(
    settings: Settings,
    results: MemoryStore,
    docker_api: FakeDocker,
    hook: TrainingDockerHook,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(*args: object, **kwargs: object) -> bytes:
        raise RuntimeError("no fonts on this worker")

    monkeypatch.setattr("airflow_wmltrain.runtime.run.learning_curve_png", broken)
    run = processing(new_run(settings))
    run.record(RunState.PROCESSING, steps=STEPS)
    with caplog.at_level("WARNING"):
        status = run.store(hook, exited(docker_api, hook))
    assert status.state is RunState.COMPLETED
    assert CURVE not in results.objects
    assert "Cannot store the learning curve of training-unit-run: no fonts on this worker" in caplog.text

    run = processing(new_run(settings))
    run.record(RunState.PROCESSING, steps=STEPS)
    monkeypatch.setattr("airflow_wmltrain.runtime.run.learning_curve_png", learning_curve_png)
    results.fail = lambda method, key: method == "PUT" and key == CURVE
    with caplog.at_level("WARNING"):
        status = run.store(hook, exited(docker_api, hook))
    assert status.state is RunState.COMPLETED
    assert "Cannot store the learning curve" in caplog.text
