"""What a submitter (whoever may trigger the bundled training DAG or run ``wmltrain train``) cannot do
(issue 10, holes 2, 3, 4 and the trigger kwargs of 11): take over another task instance's run by its
training id, have the worker read its own files as the manifest or the model, name an Airflow connection
it was not given, or find a credential in a trigger row.  Driven like ``test_operator_unit``: the
operator against the stand-in Docker daemon and the in-memory object store; no service is needed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from airflow_wmltrain.errors import EXIT_BAD_INPUT, ManifestError, ModelDefinitionError, RunConflictError
from airflow_wmltrain.lifecycle import STATUS_FILE, STATUS_XCOM_KEY, RunState
from airflow_wmltrain.manifest import load_manifest
from airflow_wmltrain.operators import training_run as operator_module
from airflow_wmltrain.operators.training_run import TrainingRunOperator
from airflow_wmltrain.runtime import halter, labels
from airflow_wmltrain.runtime.run import TrainingRun
from airflow_wmltrain.runtime.workspace import Workspace
from airflow_wmltrain.service.runs import moved_connection_id
from airflow_wmltrain.settings import Settings
from airflow_wmltrain.training_id import derive_training_id
from airflow_wmltrain.triggers.training_run import TrainingRunTrigger
from tests.conftest import SEED_SECRETS, zip_bytes
from tests.unit.conftest import DATA_BUCKET, RESULTS_BUCKET, TRAIN_SH, FakeTi, manifest_doc
from tests.unit.fakes import FakeContainer, FakeDocker, MemoryStore, MemoryStores, RunScript

pytestmark = pytest.mark.usefixtures("wmltrain_env", "stores")

COMMAND = "sh train.sh --learningRate 0.1"
#: A file of the worker that a submitter must never get read (its bytes, or whether it exists).
WORKER_SECRET = "worker-file-marker-6b1f0e"


def training_id_of(ti: FakeTi) -> str:
    return derive_training_id(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)


def owner_labels(training_id: str, **owner: Any) -> dict[str, str]:
    who = {"dag_id": "victim_dag", "run_id": "scheduled__1", "task_id": "train", "map_index": -1, **owner}
    return {
        labels.ROLE: labels.ROLE_RUN,
        labels.TRAINING_ID: training_id,
        labels.GPUS: "",
        **{label: str(who[key]) for key, label in labels.OWNER_LABELS.items()},
    }


def context(ti: FakeTi) -> Any:
    return {"ti": ti, "task_instance": ti}


def with_conn_ids(data: str, results: str) -> dict[str, Any]:
    doc = manifest_doc(command=COMMAND)
    doc["training_data_reference"][0]["connection"] = {"conn_id": data}
    doc["training_results_reference"]["connection"] = {"conn_id": results}
    return doc


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(operator_module, "spawn_halter", lambda params, log_path: calls.append(dict(params)))
    return calls


@pytest.fixture
def no_fetch(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Object-store opens outside the run (the model-definition URL): recorded, never served."""
    opened: list[Any] = []

    def open_store(reference: Any, **_: Any) -> Any:
        opened.append(reference)
        raise AssertionError(f"a refused submission opened the store {reference}")

    monkeypatch.setattr("airflow_wmltrain.storage.open_store", open_store)
    return opened


@pytest.fixture
def airflow_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Airflow connections the tests' manifests name (``AIRFLOW_CONN_*``), all to the stand-in store."""
    connection = json.dumps(
        {
            "conn_type": "aws",
            "login": "k",
            "password": "s",
            "extra": {"endpoint_url": "http://s3.invalid:9000"},
        }
    )
    for conn_id in ("wmltrain_training_mine_1_data", "team_a_results", "aws_default", "my_admin_s3"):
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", connection)


def b64_zip() -> str:
    return "base64:" + base64.b64encode(zip_bytes({"train.sh": TRAIN_SH})).decode()


# --- hole 2: a training id of another task instance ------------------------------------------------------


@pytest.fixture
def victim(docker_api: FakeDocker, wmltrain_env: Path) -> tuple[str, FakeContainer, Path]:
    """Another DAG's live run: its container (labelled with its task instance) and its workspace."""
    training_id = "training-victim_run_1"
    container = docker_api.add_container(
        labels.run_container_name(training_id), container_labels=owner_labels(training_id), status="running"
    )
    workspace = Workspace.for_run(str(wmltrain_env), training_id)
    workspace.create()
    (workspace.results / "model.pt").write_text("the victim's model")
    (workspace.logs / "training-log.txt").write_text("the victim's log")
    return training_id, container, workspace.root


def untouched(docker_api: FakeDocker, container: FakeContainer, workspace: Path) -> None:
    assert docker_api.find(container.id) is container
    assert (container.status, container.starts, container.stops) == ("running", 0, 0)
    assert docker_api.stops == []
    assert (workspace / "results" / "model.pt").read_text() == "the victim's model"
    assert (workspace / "logs" / "training-log.txt").read_text() == "the victim's log"


def test_a_training_id_of_another_dags_live_run_is_refused_and_its_run_untouched(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    victim: tuple[str, FakeContainer, Path],
    results: MemoryStore,
) -> None:
    """The bundled DAG triggered with a run id that is another DAG's training id (or two DAGs passing
    the same explicit ``training_id``): refused, C105, naming the owner; nothing of the victim touched."""
    training_id, container, workspace = victim
    attacker = FakeTi(dag_id="wmltrain_training", run_id=training_id)
    with pytest.raises(AirflowFailException, match="C105") as caught:
        make_op(training_id=training_id, model_definition=b64_zip(), submitted_inputs=True).execute(
            context(attacker)
        )
    assert isinstance(caught.value.__cause__, RunConflictError)
    assert "victim_dag/scheduled__1/train" in str(caught.value)
    untouched(docker_api, container, workspace)
    assert docker_api.created == []
    assert results.keys() == set()


def test_a_training_id_whose_status_another_task_instance_wrote_is_refused_untouched(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    settings: Settings,
    results: MemoryStore,
) -> None:
    """Two DAGs sharing a results bucket and giving the same ``training_id``: the second is refused by the
    first's status document (its run ended, its container is gone), which stays as it was."""
    training_id = "training-shared_id"
    theirs = TrainingRun(
        training_id=training_id,
        manifest=load_manifest(manifest_doc(command=COMMAND), settings=settings),
        settings=settings,
    )
    theirs.begin(
        airflow={"dag_id": "victim_dag", "run_id": "scheduled__1", "task_id": "train", "map_index": -1}
    )
    theirs.end(RunState.COMPLETED)
    before = dict(results.objects)
    with pytest.raises(AirflowFailException, match="C105") as caught:
        make_op(training_id=training_id).execute(context(FakeTi(dag_id="other_dag")))
    assert "victim_dag/scheduled__1/train" in str(caught.value)
    assert results.objects == before
    assert docker_api.created == []


VICTIM = {"dag_id": "victim_dag", "run_id": "scheduled__1", "task_id": "train", "map_index": -1}


def test_a_training_id_whose_run_is_still_staging_is_refused_and_its_workspace_untouched(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    wmltrain_env: Path,
    results: MemoryStore,
) -> None:
    """The window before the owner's container exists: its id is listed, its data is being staged on this
    worker, its status document is in a bucket the attacker does not use. The workspace's owner refuses
    the second task instance (C105); the data and the code being staged stay the owner's, and nothing
    of theirs is removed when the second one fails."""
    training_id = "training-victim_staging"
    workspace = Workspace.for_run(str(wmltrain_env), training_id)
    workspace.claim(training_id, VICTIM)
    workspace.create()
    (workspace.data / "train.csv").write_text("the victim's data")
    attacker = FakeTi(dag_id="wmltrain_training", run_id=training_id)
    with pytest.raises(AirflowFailException, match="C105") as caught:
        make_op(training_id=training_id, model_definition=b64_zip(), submitted_inputs=True).execute(
            context(attacker)
        )
    assert "the workspace of task victim_dag/scheduled__1/train" in str(caught.value)
    assert (workspace.data / "train.csv").read_text() == "the victim's data"
    assert not workspace.model.exists()
    assert docker_api.created == []
    assert results.keys() == set()


def test_a_workspace_is_claimed_once_and_found_again_by_its_own_task_instance(tmp_path: Path) -> None:
    workspace = Workspace.for_run(str(tmp_path), "training-x")
    workspace.claim("training-x", VICTIM)
    workspace.claim("training-x", {**VICTIM, "try_number": 2})  # a retry of the same task instance
    with pytest.raises(RunConflictError, match="already used by the workspace of task victim_dag"):
        workspace.claim("training-x", {**VICTIM, "map_index": 3})
    assert sorted(p.name for p in workspace.root.iterdir()) == ["owner.json"]  # no draft left behind
    assert oct((workspace.root / "owner.json").stat().st_mode & 0o777) == "0o600"


def test_a_task_stopped_before_it_owns_the_training_id_never_halts_the_owners_run(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    victim: tuple[str, FakeContainer, Path],
    spawned: list[dict[str, Any]],
    results: MemoryStore,
) -> None:
    """An attacker's task marked failed (its ``on_kill``) never halts, stores or cleans up the run of the
    task instance that owns the training id."""
    training_id, container, workspace = victim
    attacker = FakeTi(dag_id="wmltrain_training", run_id=training_id)
    op = make_op(training_id=training_id)
    with pytest.raises(AirflowFailException, match="C105"):
        op.execute(context(attacker))
    attacker.state = "failed"
    op.on_kill()
    assert spawned == []
    untouched(docker_api, container, workspace)
    assert results.keys() == set()


def test_a_conflict_on_create_leaves_the_other_task_instances_workspace(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    wmltrain_env: Path,
    results: MemoryStore,
) -> None:
    """Two task instances with one training id racing to create the container: the loser is refused and
    removes nothing of the winner's (its workspace stays) and writes no end into the shared status
    document (a terminal state there would stand over the winner's own end); its XCom says why."""
    training_id = training_id_of(ti)
    workspace = Workspace.for_run(str(wmltrain_env), training_id)
    taken: list[FakeContainer] = []

    def another_task_creates_it(fake: FakeDocker, _: Any, body: dict[str, Any]) -> None:
        if body["name"] == labels.run_container_name(training_id) and not taken:
            (workspace.results / "model.pt").write_text("the winner's model")
            theirs = owner_labels(training_id, dag_id="other_dag")
            taken.append(fake.add_container(body["name"], container_labels=theirs, status="running"))

    docker_api.before_create.append(another_task_creates_it)
    docker_api.max_block = 2
    with pytest.raises(AirflowFailException, match="C105"):
        make_op().execute(context(ti))
    assert (workspace.results / "model.pt").read_text() == "the winner's model"
    assert (taken[0].status, taken[0].stops) == ("running", 0)
    document = results.json(f"{training_id}/{STATUS_FILE}")
    assert document["state"] not in ("FAILED", "HALTED", "COMPLETED")
    mine = ti.xcoms[STATUS_XCOM_KEY]
    assert (mine["state"], mine["error"]["code"]) == ("FAILED", "C105")


def test_the_halter_never_halts_a_container_of_another_task_instance(
    monkeypatch: pytest.MonkeyPatch, docker_api: FakeDocker, victim: tuple[str, FakeContainer, Path]
) -> None:
    """A halt handed to the detached halter without the container's id looks it up by name: only the
    task's own container will do."""
    training_id, container, workspace = victim
    params = {
        "training_id": training_id,
        "container_id": None,
        "docker_host": {"docker_url": docker_api.url, "api_version": "1.43", "timeout": 10},
        "manifest": manifest_doc(command=COMMAND),
        "grace": 1,
        "reason": "the run was halted: its task was marked failed",
        "owner": {"dag_id": "wmltrain_training", "run_id": training_id, "task_id": "train", "map_index": -1},
    }
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(params)))
    assert halter.main() == EXIT_BAD_INPUT  # C105: refused, not halted
    untouched(docker_api, container, workspace)


# --- hole 3: submitted values are data, never paths of the worker ----------------------------------------


@pytest.fixture
def worker_files(tmp_path: Path) -> dict[str, Path]:
    """Files of the worker: a valid manifest (``.yml``), a secret file, and a path that does not exist."""
    manifest = tmp_path / "worker-manifest.yml"
    manifest.write_text(yaml.safe_dump(manifest_doc(command=COMMAND)))
    secret = tmp_path / "secret.txt"
    secret.write_text(f"{WORKER_SECRET}: yes\n")
    return {"manifest": manifest, "secret": secret, "missing": tmp_path / "missing.yml"}


def refusal(op: TrainingRunOperator, ti: FakeTi) -> AirflowFailException:
    with pytest.raises(AirflowFailException) as caught:
        op.execute(context(ti))
    return caught.value


@pytest.mark.parametrize("which", ["manifest", "secret", "missing", "/etc/passwd"])
def test_a_submitted_manifest_string_is_yaml_text_never_a_worker_path(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    worker_files: dict[str, Path],
    results: MemoryStore,
    which: str,
) -> None:
    value = str(worker_files.get(which, which))
    failure = refusal(make_op(manifest=value, model_definition=b64_zip(), submitted_inputs=True), ti)
    assert isinstance(failure.__cause__, ManifestError)
    assert failure.__cause__.code == "C101"
    # One message whatever the path: no bytes, no existence, not even the path.
    assert str(failure) == (
        "C101 manifest: of a submitted run must be YAML text of a mapping with model_definition, "
        "training_data_reference and training_results_reference; a submitted manifest is never read "
        "from the worker's disk"
    )
    assert WORKER_SECRET not in str(ti.xcoms)
    assert "root:" not in str(ti.xcoms)
    assert docker_api.created == []
    assert results.keys() == set()


def test_rendering_a_submitted_manifest_never_reads_a_worker_file(
    make_op: Callable[..., TrainingRunOperator],
    worker_files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Airflow masks a rendered manifest's credentials before validation: a submitted path is not read
    for that either (a big file, a FIFO named ``.yml``, would hang or fill the worker)."""
    read: list[str] = []
    read_text = Path.read_text

    def recording(path: Path, *args: Any, **kwargs: Any) -> str:
        read.append(str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", recording)
    for which in ("manifest", "secret"):
        op = make_op(manifest=str(worker_files[which]), submitted_inputs=True)
        op.render_template_fields({"params": {}}, jinja_env=None)
    assert not [path for path in read if path in {str(p) for p in worker_files.values()}]


def test_a_submitted_manifest_as_yaml_text_is_accepted(
    make_op: Callable[..., TrainingRunOperator], ti: FakeTi, results: MemoryStore
) -> None:
    text = yaml.safe_dump(manifest_doc(command=COMMAND))
    result = make_op(manifest=text, model_definition=b64_zip(), submitted_inputs=True).execute(context(ti))
    assert result["state"] == "COMPLETED"


@pytest.mark.parametrize("which", ["zip", "secret", "missing", "/etc/passwd", "model.zip", ""])
def test_a_submitted_model_definition_is_base64_or_a_url_never_a_worker_path(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    model_zip: Path,
    worker_files: dict[str, Path],
    results: MemoryStore,
    which: str,
) -> None:
    value = str(model_zip) if which == "zip" else str(worker_files.get(which, which))
    failure = refusal(make_op(model_definition=value, submitted_inputs=True), ti)
    assert isinstance(failure.__cause__, ModelDefinitionError)
    assert str(failure) == (
        "C102 model_definition: of a submitted run must be the zip as base64:<data> or an object-store "
        "URL (s3://bucket/key, swift://container/key); a submitted value is never read from the worker's "
        "disk"
    )
    assert docker_api.created == []
    assert results.keys() == set()


def test_a_dag_authors_paths_still_work(
    make_op: Callable[..., TrainingRunOperator], ti: FakeTi, worker_files: dict[str, Path]
) -> None:
    """Only submitted values are data: the DAG's author may give the worker's paths."""
    result = make_op(manifest=str(worker_files["manifest"])).execute(context(ti))
    assert result["state"] == "COMPLETED"


def test_the_bundled_dag_marks_its_inputs_as_submitted() -> None:
    from airflow_wmltrain.service.training_dag import build_training_dag

    task = build_training_dag().get_task("train")
    assert isinstance(task, TrainingRunOperator)
    assert task.submitted_inputs is True


# --- hole 4: a submitted manifest names only the connections it was given --------------------------------


@pytest.mark.parametrize(
    ("data", "res", "field", "conn_id"),
    [
        ("aws_default", "wmltrain_store_s3", "training_data_reference[0].connection.conn_id", "aws_default"),
        ("wmltrain_store_s3", "my_admin_s3", "training_results_reference.connection.conn_id", "my_admin_s3"),
        # The retention task's Airflow API connection, and another run's moved credentials, although they
        # match the default pattern wmltrain_*.
        (
            "wmltrain_store_s3",
            "wmltrain_api",
            "training_results_reference.connection.conn_id",
            "wmltrain_api",
        ),
        (
            "wmltrain_training_victim_run_1_data",
            "wmltrain_store_s3",
            "training_data_reference[0].connection.conn_id",
            "wmltrain_training_victim_run_1_data",
        ),
    ],
)
def test_a_submitted_manifest_naming_a_connection_it_was_not_given_is_refused(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    stores: MemoryStores,
    no_fetch: list[Any],
    data: str,
    res: str,
    field: str,
    conn_id: str,
) -> None:
    op = make_op(
        manifest=yaml.safe_dump(with_conn_ids(data, res)),
        model_definition=f"s3://{DATA_BUCKET}/model.zip",
        submitted_inputs=True,
    )
    failure = refusal(op, ti)
    assert isinstance(failure.__cause__, ManifestError)
    message = str(failure)
    assert message.startswith(f"C101 {field}: the Airflow connection '{conn_id}' may not be used")
    assert "[wmltrain] submission_connections" in message
    assert no_fetch == []  # the model URL was not read with it
    assert docker_api.created == []
    assert stores[RESULTS_BUCKET].keys() == set()


@pytest.mark.usefixtures("airflow_connections")
def test_a_submitted_run_may_use_its_own_moved_connections_and_the_allowed_ones(
    make_op: Callable[..., TrainingRunOperator],
    ti: FakeTi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    training_id = "training-mine_1"
    mine = moved_connection_id(training_id, "data")
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__SUBMISSION_CONNECTIONS", "team_a_*, wmltrain_*")
    op = make_op(
        manifest=yaml.safe_dump(with_conn_ids(mine, "team_a_results")),
        model_definition=b64_zip(),
        training_id=training_id,
        submitted_inputs=True,
    )
    assert op.execute(context(ti))["state"] == "COMPLETED"


@pytest.mark.usefixtures("airflow_connections")
def test_a_dag_author_may_name_any_connection(
    make_op: Callable[..., TrainingRunOperator], ti: FakeTi
) -> None:
    op = make_op(manifest=with_conn_ids("aws_default", "my_admin_s3"))
    assert op.execute(context(ti))["state"] == "COMPLETED"


# --- hole 11: the trigger row holds no credential --------------------------------------------------------


def secret_manifest() -> dict[str, Any]:
    """The unit manifest with the seed's marker credentials inline."""
    doc = manifest_doc(command=COMMAND)
    connection = {
        "endpoint_url": "http://s3.invalid:9000",
        "aws_access_key_id": SEED_SECRETS[0],
        "aws_secret_access_key": SEED_SECRETS[1],
    }
    doc["training_data_reference"][0]["connection"] = connection
    doc["training_results_reference"]["connection"] = dict(connection)
    return doc


def leaks(text: str) -> list[str]:
    forms = []
    for secret in SEED_SECRETS[:2]:
        forms += [secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote(secret, safe="")]
    return [form for form in forms if form in text]


@pytest.fixture
def fernet_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from airflow.sdk.crypto import get_fernet
    from cryptography.fernet import Fernet

    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", Fernet.generate_key().decode())
    get_fernet.cache_clear()
    yield
    get_fernet.cache_clear()


def defer(op: TrainingRunOperator, ti: FakeTi) -> TrainingRunTrigger:
    with pytest.raises(TaskDeferred) as caught:
        op.execute(context(ti))
    trigger = caught.value.trigger
    assert isinstance(trigger, TrainingRunTrigger)
    return trigger


@pytest.mark.usefixtures("fernet_key")
def test_the_trigger_row_holds_no_credential_and_its_halt_still_stores_the_run(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi, results: MemoryStore
) -> None:
    docker_api.run_script = RunScript(running=True, log="epoch 1\n")
    trigger = defer(make_op(manifest=secret_manifest(), deferrable=True), ti)
    [container] = docker_api.run_containers()
    row = json.dumps(trigger.serialize()[1])
    assert leaks(row) == []
    connection = trigger.halt["manifest"]["training_results_reference"]["connection"]  # type: ignore[index]
    assert connection["aws_secret_access_key"] == "***"
    # The triggerer rebuilds the trigger from the row; a person marks the task failed: it halts the run.
    rebuilt = TrainingRunTrigger(**json.loads(row))
    opened = rebuilt.halt_kwargs()["manifest"]  # what the halt stores the run with: the credentials
    assert opened["training_results_reference"]["connection"]["aws_secret_access_key"] == SEED_SECRETS[1]
    asyncio.run(rebuilt.on_kill())
    assert container.stops == 1
    document = results.json(f"{training_id_of(ti)}/{STATUS_FILE}")
    assert document["state"] == "HALTED"
    assert leaks(json.dumps(document)) == []


def test_without_a_fernet_key_the_trigger_row_still_holds_no_credential(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi
) -> None:
    docker_api.run_script = RunScript(running=True)
    trigger = defer(make_op(manifest=secret_manifest(), deferrable=True), ti)
    assert leaks(json.dumps(trigger.serialize()[1])) == []
    assert "sealed_manifest" not in (trigger.halt or {})


def test_a_dag_files_inline_credentials_are_not_in_the_serialized_task(seed_s3: dict[str, Any]) -> None:
    """Airflow stores a task's template fields in its serialized_dag table (3.3 no longer redacts
    them): the ``manifest`` field holds the inline credentials redacted, and the task built from the DAG
    file (the worker's) still renders and loads them (issue 10, found by the secrets scan)."""
    from airflow.serialization.serialized_objects import OperatorSerialization

    op = TrainingRunOperator(task_id="train", manifest=seed_s3, model_definition="/m.zip")
    stored = json.dumps(OperatorSerialization.serialize_operator(op), default=str)
    for secret in SEED_SECRETS:
        for form in (secret, base64.b64encode(secret.encode()).decode(), urllib.parse.quote(secret)):
            assert form not in stored
    assert "***" in stored
    manifest = load_manifest(op._manifest_source())
    assert manifest.data.connection.aws_secret_access_key.get_secret_value() == SEED_SECRETS[1]
    op.render_template_fields({"ti": None, "params": {}}, None)
    assert load_manifest(op.manifest).secret_values() == manifest.secret_values()


def test_restoring_secrets_keeps_what_rendering_changed() -> None:
    from airflow_wmltrain.manifest import redact_manifest, restore_secrets

    original = {
        "a": {"password": "p1", "name": "{{ ds }}"},
        "url": "https://u:pw@h/x",
        "l": [{"password": "p2"}],
    }
    rendered = redact_manifest(original)
    rendered["a"]["name"] = "2026-12-01"
    assert restore_secrets(rendered, original) == {
        "a": {"password": "p1", "name": "2026-12-01"},
        "url": "https://u:pw@h/x",
        "l": [{"password": "p2"}],
    }
