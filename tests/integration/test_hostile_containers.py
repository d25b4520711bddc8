"""Hostile training containers on the real Docker daemon (issue 10, holes 1, 7 and 8): a container that
leaves links to the worker's files, FIFOs, device nodes, a huge metrics file, root-only files and
folders, files named like the run's own records, or floods its log.  Each run is stored through
``TrainingRun.store`` (the real ``TrainingDockerHook``, the services' S3): the run's records are
intact, the worker's files untouched, STORING finishes, the workspace is removed.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_wmltrain.hooks import docker as docker_hook
from airflow_wmltrain.hooks.docker import TrainingDockerHook
from airflow_wmltrain.lifecycle import MANIFEST_FILE, STATUS_FILE, SUBMITTED_CODE, RunState
from airflow_wmltrain.manifest import load_manifest
from airflow_wmltrain.runtime import labels
from airflow_wmltrain.runtime.run import TrainingRun
from airflow_wmltrain.runtime.workspace import CONTAINER_DIRS
from airflow_wmltrain.settings import Settings
from tests.integration.training_helpers import manifest

NOBODY = 65534
OWNER = {"dag_id": "hostile", "run_id": "r", "task_id": "t", "map_index": -1}
MANIFEST_RECORD = b"the run's manifest\n"
CODE_RECORD = b"the run's zip"
LOG = logging.getLogger("wmltrain.hostile-test")


@pytest.fixture
def results_bucket(s3_client: Any) -> Iterator[str]:
    name = f"wmltrain-it-hostile-{uuid.uuid4().hex[:10]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            s3_client.delete_object(Bucket=name, Key=obj["Key"])
    s3_client.delete_bucket(Bucket=name)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder the worker's other user may enter (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="wmltrain-hostile-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def worker_files(shared_dir: Path) -> dict[str, Path]:
    """Files of the worker outside every run directory: one to overwrite, one to steal."""
    folder = shared_dir / "worker"
    folder.mkdir()
    files = {"pth": folder / "site.pth", "secret": folder / "secret.json"}
    files["pth"].write_text("import harmless\n")
    files["secret"].write_text('{"password": "worker-secret"}\n')
    return files


@pytest.fixture
def hook(services: dict[str, str]) -> Iterator[TrainingDockerHook]:
    """The plain Docker daemon; the containers a test started are removed after it, also on failure."""
    hook = TrainingDockerHook(docker_url=services["DOCKER_HOST"], timeout=120)
    hook.started = []  # type: ignore[attr-defined]
    yield hook
    for container_id in hook.started:  # type: ignore[attr-defined]
        hook.remove(container_id)
    hook.close()


def new_run(shared_dir: Path, test_image: str, bucket: str, store_credentials: dict[str, str]) -> TrainingRun:
    """A run as DOWNLOADING leaves it: records stored, the worker's load-data.log written, directories
    made (owned by the worker's user, like the staging directory)."""
    staging = shared_dir / "staging"
    staging.mkdir(exist_ok=True)
    settings = Settings(
        staging_dir=str(staging), frameworks=json.dumps({"busybox": {"1": {"image": test_image}}})
    )
    connection = {
        "endpoint_url": store_credentials["s3_endpoint"],
        "aws_access_key_id": store_credentials["user"],
        "aws_secret_access_key": store_credentials["key"],
    }
    document = manifest(
        command="sh train.sh", data_bucket=bucket, results_bucket=bucket, connection=connection
    )
    training_id = f"training-hostile-{uuid.uuid4().hex[:8]}"
    run = TrainingRun(
        training_id=training_id,
        manifest=load_manifest(document, settings=settings),
        settings=settings,
        log=LOG,
    )
    run.begin(airflow=OWNER)
    run.record(RunState.DOWNLOADING)
    run.workspace.create()
    run.workspace.model.mkdir()
    with run._load_data_log() as log:
        log.info("Staged nothing")
    run.results_store.put_bytes(run.prefix + MANIFEST_FILE, MANIFEST_RECORD)
    run.results_store.put_bytes(run.prefix + SUBMITTED_CODE, CODE_RECORD)
    return run


def run_container(hook: TrainingDockerHook, run: TrainingRun, image: str, script: str) -> str:
    """Run ``script`` as the container's root user with the run's mounts; its id once it ended."""
    client = hook.api_client
    container = client.create_container(
        image,
        command=["sh", "-c", script],
        user="0:0",
        environment={**CONTAINER_DIRS, "TRAINING_ID": run.training_id},
        name=labels.run_container_name(run.training_id),
        labels={labels.ROLE: labels.ROLE_RUN, labels.TRAINING_ID: run.training_id, labels.GPUS: ""},
        host_config=client.create_host_config(mounts=run.workspace.mounts()),
    )
    hook.started.append(container["Id"])  # type: ignore[attr-defined]
    client.start(container["Id"])
    run.record(RunState.PROCESSING, container={"id": container["Id"], "docker_url": hook.docker_url})
    return str(container["Id"])


def objects(s3_client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    found = {}
    for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = s3_client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            found[obj["Key"].removeprefix(prefix)] = body
    return found


def assert_records_intact(stored: dict[str, bytes], state: str = "COMPLETED") -> dict[str, Any]:
    assert stored[MANIFEST_FILE] == MANIFEST_RECORD
    assert stored[SUBMITTED_CODE] == CODE_RECORD
    status: dict[str, Any] = json.loads(stored[STATUS_FILE])
    assert status["state"] == state
    assert "forged" not in status
    assert b"Staged nothing" in stored["learner-1/load-data.log"]
    return status


# --- links, FIFOs, devices, huge files, reserved names -----------------------------------------------------

METRICS = {
    "link-to-a-worker-file": 'ln -s "$SECRET" "$RESULT_DIR/metrics.json"',
    "fifo": 'mkfifo "$RESULT_DIR/metrics.json"',
    "nested-too-deep": 'head -c 60000 /dev/zero | tr "\\0" "[" > "$RESULT_DIR/metrics.json"',
    "link-to-dev-zero": 'ln -s /dev/zero "$RESULT_DIR/metrics.json"',
    # a JSON document over the cap: stored as a result, not read as the run's metrics
    "huge": '{ printf \'{"accuracy": 1, "pad": "\'; head -c 2000000 /dev/zero | tr "\\0" x; echo \'"}\'; } '
    '> "$RESULT_DIR/metrics.json"',
}

HOSTILE_SH = """\
set -e
echo "training output"
rm -f "$LOG_DIR/training-log.txt" "$LOG_DIR/load-data.log"
ln -s "$PTH" "$LOG_DIR/training-log.txt"
ln -s "$PTH" "$LOG_DIR/load-data.log"
ln -s "$PTH" "$LOG_DIR/notes.txt"
echo "user log" > "$LOG_DIR/epochs.log"
ln -s "$SECRET" "$RESULT_DIR/leak.json"
ln -s "$(dirname "$SECRET")" "$RESULT_DIR/worker-folder"
ln -s /dev/zero "$RESULT_DIR/zero"
mkfifo "$RESULT_DIR/fifo"
mknod "$RESULT_DIR/null" c 1 3
echo weights > "$RESULT_DIR/model.bin"
touch "$RESULT_DIR/$(printf 'not-utf8-\\377')"
D=$(printf 'd%.0s' $(seq 200)); DEEP="$RESULT_DIR/$D/$D/$D/$D/$D/$D"
mkdir -p "$DEEP" && touch "$DEEP/long"
ln -s model.bin "$RESULT_DIR/alias.bin"
mkdir -p "$RESULT_DIR/_submitted_code" "$RESULT_DIR/learner-1"
for name in _status.json _manifest.yml _submitted_code/model.zip learner-1/training-log.txt; do
  echo '{"state": "COMPLETED", "forged": true}' > "$RESULT_DIR/$name"
done
"""


@pytest.mark.parametrize("metrics", sorted(METRICS))
def test_links_fifos_devices_and_reserved_names_are_contained(
    metrics: str,
    hook: TrainingDockerHook,
    shared_dir: Path,
    worker_files: dict[str, Path],
    test_image: str,
    results_bucket: str,
    store_credentials: dict[str, str],
    s3_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = new_run(shared_dir, test_image, results_bucket, store_credentials)
    script = f"PTH={worker_files['pth']}; SECRET={worker_files['secret']}\n{HOSTILE_SH}{METRICS[metrics]}\n"
    container_id = run_container(hook, run, test_image, script)
    outcome = hook.wait(container_id)
    assert outcome.exit_code == 0, list(hook.log_lines(container_id))
    with caplog.at_level(logging.INFO, logger=LOG.name):
        status = run.store(hook, outcome)

    assert status.state is RunState.COMPLETED
    assert status.metrics == {}
    stored = objects(s3_client, results_bucket, run.prefix)
    assert_records_intact(stored)
    assert stored["model.bin"] == b"weights\n"
    assert stored["learner-1/training-log.txt"] == b"training output\n"
    assert stored["learner-1/epochs.log"] == b"user log\n"
    for name in (
        "leak.json",
        "worker-folder",
        "zero",
        "fifo",
        "null",
        "alias.bin",
        "notes.txt",
        "not-utf8",
        "ddd",
    ):
        assert not any(key.startswith(name) for key in stored), name
    if metrics == "huge":
        assert len(stored["metrics.json"]) > 2000000
    elif metrics == "nested-too-deep":
        assert stored["metrics.json"] == b"[" * 60000
    else:
        assert "metrics.json" not in stored
    assert not any(b"worker-secret" in body or b"forged" in body for body in stored.values())
    assert worker_files["pth"].read_text() == "import harmless\n"
    assert worker_files["secret"].read_text() == '{"password": "worker-secret"}\n'
    messages = [record.getMessage() for record in caplog.records]
    for name in ("_status.json", "_manifest.yml", "_submitted_code/model.zip"):
        assert any(f"results/{name}" in m and "reserved" in m for m in messages), name
    for name in ("leak.json", "zero", "fifo", "null"):
        assert sum(f"results/{name}:" in m for m in messages) == 1, name
    assert not os.path.lexists(run.workspace.root)
    assert hook.api_client.containers(all=True, filters={"id": container_id}) == []


CURVE_SH = """\
set -e
echo "training"
printf 'forged picture' > "$RESULT_DIR/learning-curve.png"
mkdir -p "$LOG_DIR" && ln -s "$SECRET" "$LOG_DIR/learning-curve.png"
"""


def test_the_runs_learning_curve_is_stored_and_the_containers_file_of_that_name_is_not(
    hook: TrainingDockerHook,
    shared_dir: Path,
    worker_files: dict[str, Path],
    test_image: str,
    results_bucket: str,
    store_credentials: dict[str, str],
    s3_client: Any,
) -> None:
    run = new_run(shared_dir, test_image, results_bucket, store_credentials)
    steps = tuple({"step": 10 * i, "loss": 1.0 / i, "accuracy": 1 - 1.0 / (i + 1)} for i in range(1, 13))
    run.record(RunState.DOWNLOADING, steps=steps, hyperparameters={"lr": 0.01})
    script = f"SECRET={worker_files['secret']}\n{CURVE_SH}"
    container_id = run_container(hook, run, test_image, script)
    outcome = hook.wait(container_id)
    assert outcome.exit_code == 0, list(hook.log_lines(container_id))
    assert run.store(hook, outcome).state is RunState.COMPLETED
    stored = objects(s3_client, results_bucket, run.prefix)
    assert_records_intact(stored)
    assert stored["learning-curve.png"].startswith(b"\x89PNG\r\n\x1a\n")
    assert "learner-1/learning-curve.png" not in stored
    assert not any(b"worker-secret" in body or b"forged" in body for body in stored.values())
    head = s3_client.head_object(Bucket=results_bucket, Key=run.prefix + "learning-curve.png")
    assert head["ContentType"] == "image/png"


# --- root-only results, a worker that is not root -------------------------------------------------------

ROOT_ONLY_SH = """\
set -e
echo "private training"
mkdir -p "$RESULT_DIR/private/deeper"
echo weights > "$RESULT_DIR/private/deeper/model.bin"
echo '{"accuracy": 0.5}' > "$RESULT_DIR/metrics.json"
echo secret > "$RESULT_DIR/secret.bin"
echo open > "$RESULT_DIR/open.txt"
chmod 600 "$RESULT_DIR/private/deeper/model.bin" "$RESULT_DIR/metrics.json" "$RESULT_DIR/secret.bin"
chmod 700 "$RESULT_DIR/private" "$RESULT_DIR/private/deeper"
echo "root's log" > "$LOG_DIR/root.log"
chmod 600 "$LOG_DIR/root.log"
mkdir "$CHECKPOINT_DIR/ckpt" && echo state > "$CHECKPOINT_DIR/ckpt/1"
chmod -R go-rwx "$CHECKPOINT_DIR/ckpt"
chown 0:0 "$LOG_DIR" && chmod 700 "$LOG_DIR"
"""


def as_worker(uid: int, gid: int, groups: list[int], work: Any) -> int:
    """Run ``work()`` in a child process that dropped root for ``uid``; its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            work()
            code = 0
        except BaseException:
            logging.getLogger(__name__).exception("the worker failed")
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_root_only_results_are_stored_and_the_workspace_removed_by_a_worker_that_is_not_root(
    hook: TrainingDockerHook,
    services: dict[str, str],
    shared_dir: Path,
    test_image: str,
    results_bucket: str,
    store_credentials: dict[str, str],
    s3_client: Any,
) -> None:
    if os.getuid() != 0:
        pytest.skip("the test drops from root to another user for the worker")
    run = new_run(shared_dir, test_image, results_bucket, store_credentials)
    for folder, _dirs, names in os.walk(shared_dir):  # the worker's user owns the staging directory
        for path in [folder, *(os.path.join(folder, n) for n in names)]:
            os.chown(path, NOBODY, NOBODY)
    container_id = run_container(hook, run, test_image, ROOT_ONLY_SH)
    outcome = hook.wait(container_id)
    assert outcome.exit_code == 0, list(hook.log_lines(container_id))
    socket_gid = os.stat(services["DOCKER_HOST"].removeprefix("unix://")).st_gid  # the docker group

    def store() -> None:
        worker_hook = TrainingDockerHook(docker_url=services["DOCKER_HOST"], timeout=120)
        worker_run = TrainingRun(
            training_id=run.training_id, manifest=run.manifest, settings=run.settings, log=LOG
        )
        worker_run.resume()
        assert worker_run.store(worker_hook, worker_hook.inspect(container_id)).state is RunState.COMPLETED

    assert as_worker(NOBODY, NOBODY, [socket_gid], store) == 0
    stored = objects(s3_client, results_bucket, run.prefix)
    status = assert_records_intact(stored)
    assert status["metrics"] == {"accuracy": 0.5}
    assert stored["private/deeper/model.bin"] == b"weights\n"
    assert stored["secret.bin"] == b"secret\n"
    assert stored["open.txt"] == b"open\n"
    assert stored["learner-1/root.log"] == b"root's log\n"
    assert stored["learner-1/training-log.txt"] == b"private training\n"
    assert not os.path.lexists(run.workspace.root)
    assert hook.api_client.containers(all=True, filters={"label": f"{labels.ROLE}=workspace-removal"}) == []


# --- a log flood ------------------------------------------------------------------------------------------

FLOOD_SH = """\
yes "$(head -c 999 /dev/zero | tr '\\0' x)" | head -c 200000000
head -c 30000000 /dev/zero | tr '\\0' y
echo
echo "the last line"
"""


def test_a_log_flood_bounds_the_task_log_the_stored_log_and_the_workers_memory(
    hook: TrainingDockerHook,
    shared_dir: Path,
    test_image: str,
    results_bucket: str,
    store_credentials: dict[str, str],
    s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(docker_hook, "STORED_LOG_BYTES", 8 * 1024 * 1024, raising=False)
    monkeypatch.setattr(docker_hook, "TASK_LOG_BYTES", 1024 * 1024, raising=False)
    run = new_run(shared_dir, test_image, results_bucket, store_credentials)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    container_id = run_container(hook, run, test_image, FLOOD_SH)

    class Counting(logging.Handler):
        lines = characters = 0

        def emit(self, record: logging.LogRecord) -> None:
            Counting.lines += 1
            Counting.characters += len(record.getMessage())

    task_log = logging.getLogger("wmltrain.hostile-test.task")
    task_log.addHandler(Counting())
    task_log.setLevel(logging.INFO)
    hook.follow_logs(container_id, task_log)
    outcome = hook.wait(container_id)
    status = run.store(hook, outcome)

    assert status.state is RunState.COMPLETED
    assert Counting.characters < 2 * 1024 * 1024
    stored = objects(s3_client, results_bucket, run.prefix)
    assert_records_intact(stored)
    log = stored["learner-1/training-log.txt"]
    assert len(log) < 8 * 1024 * 1024 + 2000 * (16 * 1024 + 1) + 200  # STORED_TAIL_LINES of MAX_LINE_CHARS
    assert log.startswith(b"x" * 999 + b"\n")
    assert log.endswith(b"y\nthe last line\n") or log.endswith(b"\nthe last line\n")
    assert b"characters of the training's output left out of this file" in log
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 150 * 1024, f"the worker grew by {grown_kb} kB"
    assert not os.path.lexists(run.workspace.root)
