"""What the training container leaves behind is never followed, opened for writing, nor read unbounded
by the worker (issue 10, holes 1 and 8): the upload walk (links, FIFOs, devices, reserved names, files
replaced while uploaded), the worker's own log files, the bounds on the container's output, and the
run's own records against files of the same name in ``$RESULT_DIR``.

Against the stand-in Docker daemon and the in-memory store; the upload walk and its file checks are the
real ones (only the HTTP transfer is replaced by a put of the bytes read from the checked descriptor).
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from airflow_wmltrain.errors import ResultsStoreError
from airflow_wmltrain.hooks import docker as docker_hook
from airflow_wmltrain.hooks.docker import TrainingDockerHook, _lines
from airflow_wmltrain.lifecycle import MANIFEST_FILE, STATUS_FILE, SUBMITTED_CODE, RunState
from airflow_wmltrain.runtime.run import RESERVED_RESULTS, TrainingRun
from airflow_wmltrain.settings import Settings
from airflow_wmltrain.storage import upload
from airflow_wmltrain.storage.base import ObjectStore
from airflow_wmltrain.storage.upload import UploadResult, _files, unreadable_entries
from tests.unit.fakes import FakeDocker, MemoryStore
from tests.unit.test_training_run_unit import (
    NAME,
    TRAINING_ID,
    container_labels,
    new_run,
    processing,
    stored_status,
)

LOG = logging.getLogger(__name__)


def checked_upload_tree(
    store: ObjectStore, source: Path, prefix: str, *, reserved: Any = (), log: Any = None, **_: Any
) -> UploadResult:
    """``upload_tree``'s walk and file checks, with the bytes put in one request (the memory store)."""
    tree = _files(Path(source), log or LOG, reserved)
    for listed in tree.files:
        fd = listed.open()
        try:
            data = os.pread(fd, listed.size, 0)
        finally:
            os.close(fd)
        store.put_bytes(prefix + listed.relative, data)
    return UploadResult(len(tree.files), sum(f.size for f in tree.files), 0.0, tree.skipped)


@pytest.fixture
def hook(docker_api: FakeDocker) -> TrainingDockerHook:
    return TrainingDockerHook(docker_url=docker_api.url, api_version="1.43", timeout=10)


@pytest.fixture
def results(stores: Any, monkeypatch: pytest.MonkeyPatch) -> MemoryStore:
    from tests.unit.conftest import RESULTS_BUCKET

    monkeypatch.setattr("airflow_wmltrain.runtime.run.upload_tree", checked_upload_tree)
    store: MemoryStore = stores[RESULTS_BUCKET]
    return store


@pytest.fixture
def world_readable() -> Any:
    """A folder another user may enter (pytest's own are the user's alone)."""
    path = Path(tempfile.mkdtemp(prefix="wmltrain-unit-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def worker_file(tmp_path: Path) -> Path:
    """A file of the worker, outside every run directory (a .pth in site-packages, say)."""
    path = tmp_path / "worker-owned.pth"
    path.write_text("import harmless\n")
    return path


def store_exited(run: TrainingRun, docker_api: FakeDocker, hook: TrainingDockerHook, log: str = "") -> Any:
    container = docker_api.add_container(NAME, container_labels=container_labels(), status="exited", log=log)
    return run.store(hook, hook.inspect(container.id))


# --- the upload walk -------------------------------------------------------------------------------------


def test_the_walk_follows_no_link_not_even_inside_the_tree_and_reads_no_special_file(
    tmp_path: Path, worker_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "results"
    (root / "sub").mkdir(parents=True)
    (root / "model.bin").write_bytes(b"weights")
    (root / "sub" / "inside").symlink_to("../model.bin")
    (root / "outside").symlink_to(worker_file)
    (root / "zero").symlink_to("/dev/zero")
    (root / "folder").symlink_to(worker_file.parent, target_is_directory=True)
    os.mkfifo(root / "fifo")
    with caplog.at_level(logging.WARNING):
        tree = _files(root, LOG)
    assert [f.relative for f in tree.files] == ["model.bin"]
    assert tree.skipped == 5
    for name in ("sub/inside", "outside", "zero", "folder", "fifo"):
        assert sum(str(root / name) in r.getMessage() for r in caplog.records) == 1, name


def test_a_listed_file_replaced_by_a_link_before_it_is_read_is_not_read(
    tmp_path: Path, worker_file: Path
) -> None:
    root = tmp_path / "results"
    root.mkdir()
    (root / "model.bin").write_bytes(b"weights")
    (listed,) = _files(root, LOG).files
    os.link(root / "model.bin", tmp_path / "kept")  # its inode stays in use: no new file gets it
    (root / "model.bin").unlink()
    (root / "model.bin").symlink_to(worker_file)
    with pytest.raises(ResultsStoreError, match=r"model\.bin"):
        listed.open()
    (root / "model.bin").unlink()
    (root / "model.bin").write_bytes(b"another file")  # same name, not the listed file
    with pytest.raises(ResultsStoreError, match="replaced"):
        listed.open()


def test_the_real_upload_reads_parts_through_the_checked_descriptor(
    tmp_path: Path, worker_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_md5_of`` and the PUT read the descriptor of the listed file, never the name again."""
    root = tmp_path / "results"
    root.mkdir()
    (root / "model.bin").write_bytes(b"weights" * 10)
    (listed,) = _files(root, LOG).files
    fd = listed.open()
    try:
        (root / "model.bin").unlink()
        (root / "model.bin").symlink_to(worker_file)
        assert upload._md5_of(fd, listed.path, 7, 14) == upload._md5_of(fd, listed.path, 0, 14)
    finally:
        os.close(fd)


def test_reserved_names_are_not_uploaded_and_each_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "results"
    (root / "_submitted_code").mkdir(parents=True)
    (root / "learner-1").mkdir()
    for name in (STATUS_FILE, MANIFEST_FILE, SUBMITTED_CODE, "learner-1/training-log.txt", "ok.txt"):
        (root / name).write_text("user's\n")
    (root / "learner-1" / "notes.txt").write_text("user's\n")
    with caplog.at_level(logging.WARNING):
        tree = _files(root, LOG, RESERVED_RESULTS)
    assert sorted(f.relative for f in tree.files) == ["learner-1/notes.txt", "ok.txt"]
    assert tree.skipped == 4
    assert any("_submitted_code/ is reserved" in r.getMessage() for r in caplog.records)


def test_names_no_store_accepts_are_skipped_not_fatal(tmp_path: Path, results: MemoryStore) -> None:
    """A name that is not UTF-8, or too long for an object name, would fail every try of STORING."""
    root = tmp_path / "results"
    root.mkdir()
    os.close(os.open(os.fsencode(root) + b"/bad-\xff-name", os.O_CREAT | os.O_WRONLY, 0o644))
    deep = root / "/".join(["d" * 200] * 6)
    deep.mkdir(parents=True)
    (deep / "model.bin").write_bytes(b"weights")
    result = upload.upload_tree(results, root, "run/", log=LOG)
    assert (result.files, result.skipped) == (0, 2)
    assert results.keys("run/") == set()


def test_unreadable_entries_are_listed_for_a_copy_out(world_readable: Path) -> None:
    """The worker in a test runs as root, which reads everything: drop to nobody in a child."""
    tmp_path = world_readable
    root = tmp_path / "results"
    (root / "private").mkdir(parents=True)
    (root / "private" / "model.bin").write_bytes(b"weights")
    (root / "secret.bin").write_bytes(b"weights")
    (root / "open.bin").write_bytes(b"weights")
    os.chmod(root / "private", 0o700)
    os.chmod(root / "secret.bin", 0o600)
    os.chmod(root / "open.bin", 0o644)
    os.chmod(tmp_path, 0o755)
    os.chmod(root, 0o777)
    if os.getuid() != 0:
        assert unreadable_entries(root) == []
        pytest.skip("needs root to drop to another user")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        code = 1
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            os.write(write, repr(unreadable_entries(root)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as answer:
        found = answer.read()
    assert os.waitpid(pid, 0)[1] == 0
    assert found == repr(["private/", "secret.bin"])


def test_metrics_nested_too_deep_to_parse_are_ignored_and_the_run_is_stored(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    """64 KiB of ``[`` is under the size cap, but Python's parser gives up (RecursionError): STORING
    must not stop because of it."""
    run = processing(new_run(settings))
    (run.workspace.results / "metrics.json").write_text("[" * 60000)
    status = store_exited(run, docker_api, hook, log="done\n")
    assert status.state is RunState.COMPLETED
    assert status.metrics == {}
    assert stored_status(results)["state"] == "COMPLETED"
    assert not run.workspace.root.exists()


# --- the worker's own files ------------------------------------------------------------------------------


def test_the_load_data_log_is_not_written_through_a_link_the_container_left(
    settings: Settings, results: MemoryStore, worker_file: Path
) -> None:
    """A container of an earlier try left learner-1/load-data.log as a link to a worker file: the
    worker writes its own log in a folder the container cannot reach."""
    run = processing(new_run(settings))
    (run.workspace.logs / "load-data.log").symlink_to(worker_file)
    with run._load_data_log() as log:
        log.info("Staging the data")
    assert worker_file.read_text() == "import harmless\n"
    assert "Staging the data" in (run.workspace.worker / "load-data.log").read_text()


def test_store_writes_the_training_log_outside_the_mounted_folders(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    """The container may leave training-log.txt as a folder (or anything): the run's log is its own."""
    run = processing(new_run(settings))
    (run.workspace.logs / "training-log.txt").mkdir()
    (run.workspace.logs / "training-log.txt" / "x").write_text("user's\n")
    (run.workspace.logs / "load-data.log").write_text("forged\n")
    (run.workspace.logs / "epochs.csv").write_text("1,0.5\n")
    seen: list[bool] = []
    original = hook.save_logs

    def save_logs(container_id: str, path: Path, **kwargs: Any) -> list[str]:
        seen.append(run.workspace.logs in path.parents)
        return original(container_id, path, **kwargs)

    hook.save_logs = save_logs  # type: ignore[method-assign]
    status = store_exited(run, docker_api, hook, log="epoch 1\n")
    assert status.state is RunState.COMPLETED
    assert seen == [False]
    assert results.objects[f"{TRAINING_ID}/learner-1/training-log.txt"] == b"epoch 1\n"
    assert results.objects[f"{TRAINING_ID}/learner-1/epochs.csv"] == b"1,0.5\n"
    assert f"{TRAINING_ID}/learner-1/training-log.txt/x" not in results.objects
    assert results.objects.get(f"{TRAINING_ID}/learner-1/load-data.log") != b"forged\n"
    assert not run.workspace.root.exists()


# --- hole 8: the run's own records win --------------------------------------------------------------------


@pytest.mark.parametrize("records_first", [True, False], ids=["records-then-results", "results-first"])
def test_files_named_like_the_runs_records_never_replace_them(
    settings: Settings,
    results: MemoryStore,
    docker_api: FakeDocker,
    hook: TrainingDockerHook,
    caplog: pytest.LogCaptureFixture,
    records_first: bool,
) -> None:
    run = processing(new_run(settings))
    manifest_key, code_key = f"{TRAINING_ID}/{MANIFEST_FILE}", f"{TRAINING_ID}/{SUBMITTED_CODE}"
    if records_first:  # as DOWNLOADING left them
        results.put_bytes(manifest_key, b"the run's manifest\n")
        results.put_bytes(code_key, b"the run's zip")
    (run.workspace.results / "_submitted_code").mkdir()
    (run.workspace.results / "learner-1").mkdir()
    for name in (STATUS_FILE, MANIFEST_FILE, SUBMITTED_CODE, "learner-1/training-log.txt"):
        (run.workspace.results / name).write_text('{"state": "COMPLETED", "forged": true}\n')
    (run.workspace.results / "model.bin").write_bytes(b"weights")
    with caplog.at_level(logging.WARNING):
        status = store_exited(run, docker_api, hook, log="failed\n")
    assert status.state is RunState.COMPLETED
    forged = b'{"state": "COMPLETED", "forged": true}\n'
    assert all(value != forged for value in results.objects.values())
    assert "forged" not in stored_status(results)
    assert results.objects[f"{TRAINING_ID}/learner-1/training-log.txt"] == b"failed\n"
    assert results.objects[f"{TRAINING_ID}/model.bin"] == b"weights"
    if records_first:
        assert results.objects[manifest_key] == b"the run's manifest\n"
        assert results.objects[code_key] == b"the run's zip"
    else:
        assert manifest_key not in results.objects
        assert code_key not in results.objects
    messages = [r.getMessage() for r in caplog.records]
    for name in (STATUS_FILE, MANIFEST_FILE, SUBMITTED_CODE):
        path = run.workspace.results / name
        assert any(str(path) in m and "reserved for the run's own records" in m for m in messages), name


# --- the container's output is bounded -------------------------------------------------------------------


def test_lines_cut_an_endless_line_and_hold_no_more_than_one() -> None:
    chunk = b"x" * 65536

    def endless() -> Any:
        for _ in range(200):  # 13 MB without a line end
            yield chunk

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    count = 0
    for line in _lines(endless()):
        assert len(line) <= docker_hook.MAX_LINE_CHARS
        count += 1
    assert count == 200 * 65536 // docker_hook.MAX_LINE_CHARS
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 10 * 1024  # kB


def test_lines_keep_a_character_split_between_chunks() -> None:
    text = "é€\n".encode()
    assert list(_lines([text[:1], text[1:3], text[3:]])) == ["é€"]


def test_the_last_lines_quoted_in_a_failure_are_cut(
    settings: Settings, results: MemoryStore, docker_api: FakeDocker, hook: TrainingDockerHook
) -> None:
    run = processing(new_run(settings))
    output = "".join("z" * 50000 + "\n" for _ in range(30))
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", exit_code=1, log=output
    )
    status = run.store(hook, hook.inspect(container.id))
    assert status.error is not None
    assert len(status.error["message"]) < docker_hook.TAIL_LINES * (docker_hook.TAIL_LINE_CHARS + 10) + 500


def test_a_flood_of_output_is_bounded_in_the_stored_log_and_the_task_log(
    settings: Settings,
    results: MemoryStore,
    docker_api: FakeDocker,
    hook: TrainingDockerHook,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(docker_hook, "STORED_LOG_BYTES", 1000)
    monkeypatch.setattr(docker_hook, "STORED_TAIL_LINES", 5)
    monkeypatch.setattr(docker_hook, "TASK_LOG_BYTES", 500)
    output = "".join(f"line {i:05d}\n" for i in range(5000)) + "Traceback: boom\n"
    run = processing(new_run(settings))
    container = docker_api.add_container(
        NAME, container_labels=container_labels(), status="exited", exit_code=1, log=output
    )
    shown = list(hook.log_lines(container.id))
    assert len(shown) < 60
    assert "left out of the task log" in shown[-1]
    with caplog.at_level(logging.INFO):
        hook.follow_logs(container.id, LOG)
    assert sum(r.name == LOG.name for r in caplog.records) < 60
    assert "left out of the task log" in caplog.records[-1].getMessage()
    status = run.store(hook, hook.inspect(container.id))
    stored = results.objects[f"{TRAINING_ID}/learner-1/training-log.txt"].decode().splitlines()
    assert stored[:2] == ["line 00000", "line 00001"]
    assert stored[-5:] == ["line 04996", "line 04997", "line 04998", "line 04999", "Traceback: boom"]
    assert "characters of the training's output left out of this file" in stored[-6]
    assert len(stored) < 100
    assert status.error is not None
    assert "Traceback: boom" in status.error["message"]
