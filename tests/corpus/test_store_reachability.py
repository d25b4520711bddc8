"""Hostile stores (issue 10, deliverable 2): wrong credentials, a missing bucket, an endpoint that refuses
connections and one that accepts them but never answers.  ``wmltrain train`` refuses each within seconds,
with its code, the field and the fix on one line, before anything is queued: no DAG run, no connection
``wmltrain_<id>_*`` (checked with Airflow's REST API); ``wmltrain validate --check-stores`` says the same.

The first tests need no service (a local socket plays the silent endpoint) and bound the check's time;
the others run the real command line against the real services (Swift + S3, Airflow).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from airflow_wmltrain.cli.validate import STORE_CHECK_TIMEOUT, check_stores
from airflow_wmltrain.errors import DataLoadError, ResultsStoreError
from airflow_wmltrain.manifest import load_manifest
from airflow_wmltrain.service.runs import moved_connection_id
from tests.conftest import SEED_SECRETS
from tests.integration.conftest import s3_client, services, store_credentials  # noqa: F401 - fixtures
from tests.integration.service_helpers import (
    TRAINING_DAG_ID,
    Cli,
    api_client,
    drop_buckets,
    leaks,
    make_buckets,
)
from tests.integration.training_helpers import manifest, model_zip

#: What the check may take beyond its per-request timeout (imports, the auth round trip).
SLACK_S = 3.0
#: A whole refused ``wmltrain train`` (a Python process importing Airflow, then the check).
CLI_BOUND_S = STORE_CHECK_TIMEOUT + 20
SKIP_OPTION = "--no-store-check"
CLOSED_PORT = 9  # discard: nothing listens there


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>``: accepts TCP connections (the kernel's backlog) and never answers.

    Closed after 30 s, so that a check with no time bound of its own fails the test in under a minute
    instead of hanging it."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    timer = threading.Timer(30, listener.close)
    timer.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    timer.cancel()
    listener.close()


def _seed_with(kind: str, url: str, *, data_conn_id: str | None = None) -> Any:
    """The seed manifest of ``kind`` (``s3``/``swift``) whose stores are at ``url``."""
    from tests.conftest import SEED_S3, SEED_SWIFT

    document = yaml.safe_load((SEED_S3 if kind == "s3" else SEED_SWIFT).read_text())
    data = (document.get("training_data") or document["training_data_reference"])[0]
    results = document.get("training_results") or document["training_results_reference"]
    for reference in (data, results):
        if kind == "s3":
            reference["connection"]["endpoint_url"] = url
        else:
            reference["connection"]["auth_url"] = f"{url}/auth/v1.0"
    if data_conn_id:
        data["connection"] = {"conn_id": data_conn_id}
    return load_manifest(document)


@pytest.mark.parametrize("kind", ["s3", "swift"])
def test_the_check_gives_up_on_an_endpoint_that_never_answers_within_its_timeout(
    kind: str, silent_endpoint: str
) -> None:
    """One try of at most STORE_CHECK_TIMEOUT seconds (a transfer would retry for minutes), and for Swift
    the authentication is bounded the same way."""
    started = time.monotonic()
    with pytest.raises(DataLoadError) as info:
        check_stores(_seed_with(kind, silent_endpoint))
    elapsed = time.monotonic() - started
    text = str(info.value)
    assert elapsed < STORE_CHECK_TIMEOUT + SLACK_S, f"{elapsed:.1f}s: {text}"
    assert info.value.code == "S302"
    assert info.value.field == "training_data_reference[0].connection"
    for words in ("timed out", silent_endpoint, SKIP_OPTION):
        assert words in text, text
    assert not any(secret in text for secret in SEED_SECRETS)


def test_a_store_in_an_airflow_connection_is_skipped_and_the_results_store_is_checked(
    silent_endpoint: str,
) -> None:
    started = time.monotonic()
    with pytest.raises(ResultsStoreError) as info:
        check_stores(_seed_with("s3", f"http://127.0.0.1:{CLOSED_PORT}", data_conn_id="wmltrain_anything"))
    assert time.monotonic() - started < SLACK_S
    assert info.value.code == "S303"
    assert info.value.field == "training_results_reference.connection"
    assert "Connection refused" in str(info.value), info.value


# --- the command line against the real services -------------------------------------------------------


@pytest.fixture(scope="module")
def cli(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Cli:  # noqa: F811
    return Cli.for_services(services, tmp_path_factory.mktemp("cli-airflow-home"))


@pytest.fixture(scope="module")
def api(services: dict[str, str]) -> Iterator[httpx.Client]:  # noqa: F811
    client = api_client(services)
    yield client
    client.close()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_zip(tmp_path_factory.mktemp("model") / "model.zip", {"train.sh": "echo never run\n"})


@pytest.fixture
def buckets(s3_client: Any) -> Iterator[tuple[str, str]]:  # noqa: F811
    names = make_buckets(s3_client, "data", "res")
    yield names[0], names[1]
    drop_buckets(s3_client, names)


def _recent_runs(api: httpx.Client) -> list[dict[str, Any]]:
    response = api.get(f"/dags/{TRAINING_DAG_ID}/dagRuns", params={"order_by": "-run_after", "limit": 100})
    assert response.status_code == 200, response.text
    runs: list[dict[str, Any]] = response.json()["dag_runs"]
    return runs


def _moved_connections(api: httpx.Client) -> set[str]:
    response = api.get("/connections", params={"connection_id_pattern": "wmltrain_training", "limit": 1000})
    assert response.status_code == 200, response.text
    return {c["connection_id"] for c in response.json()["connections"]}


def assert_nothing_queued(api: httpx.Client, token: str, connections_before: set[str]) -> None:
    """No DAG run carries this test's manifest (``token`` is in it), and no ``wmltrain_<id>_*``
    connection appeared that is not another run's."""
    mine = [run["dag_run_id"] for run in _recent_runs(api) if token in json.dumps(run.get("conf") or {})]
    assert not mine, f"queued: {mine}"
    new = _moved_connections(api) - connections_before
    if new:  # other tests may be submitting now: a connection of theirs gets its run within moments
        time.sleep(2)
        owned = {
            moved_connection_id(run["dag_run_id"], role)
            for run in _recent_runs(api)
            for role in ("data", "results")
        }
        orphans = (new & _moved_connections(api)) - owned
        assert not orphans, f"connections made for no run: {orphans}"


def write_manifest(
    path: Path, data: str, results: str, connection: dict[str, Any], *, kind: str = "s3"
) -> Path:
    document = manifest(
        command="sh train.sh",
        data_bucket=data,
        results_bucket=results,
        connection=connection,
        store_type=kind,
    )
    document["model_definition"]["name"] = f"store-check-{uuid.uuid4().hex[:8]}"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def s3_inline(
    creds: dict[str, str], *, endpoint: str | None = None, secret: str | None = None
) -> dict[str, str]:
    return {
        "endpoint_url": endpoint or creds["s3_endpoint"],
        "aws_access_key_id": creds["user"],
        "aws_secret_access_key": secret or creds["key"],
    }


def swift_inline(creds: dict[str, str], *, password: str) -> dict[str, str]:
    return {"auth_url": creds["swift_auth_url"], "user_name": creds["user"], "password": password}


WRONG_SECRET = f"wrong-{uuid.uuid4().hex}"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("case", "code", "exit_code", "field"),
    [
        ("s3 wrong secret", "C103", 2, "training_data_reference[0].connection"),
        ("swift wrong password", "C103", 2, "training_data_reference[0].connection"),
        ("missing data bucket", "C101", 2, "training_data_reference[0].source.bucket"),
        ("missing results bucket", "C101", 2, "training_results_reference.target.bucket"),
        ("swift missing data container", "C101", 2, "training_data_reference[0].source.bucket"),
        ("closed port", "S302", 3, "training_data_reference[0].connection"),
        ("silent endpoint", "S302", 3, "training_data_reference[0].connection"),
    ],
)
def test_train_refuses_a_store_that_does_not_answer_or_accept_before_queueing_anything(
    case: str,
    code: str,
    exit_code: int,
    field: str,
    cli: Cli,
    api: httpx.Client,
    model: Path,
    tmp_path: Path,
    buckets: tuple[str, str],
    store_credentials: dict[str, str],  # noqa: F811
    silent_endpoint: str,
) -> None:
    data, results = buckets
    creds = store_credentials
    missing = f"wmltrain-it-missing-{uuid.uuid4().hex[:10]}"
    kind, where = "s3", creds["s3_endpoint"]
    if case == "s3 wrong secret":
        connection = s3_inline(creds, secret=WRONG_SECRET)
    elif case == "swift wrong password":
        kind, where, connection = "swift", creds["swift_auth_url"], swift_inline(creds, password=WRONG_SECRET)
    elif case == "missing data bucket":
        data, where, connection = missing, missing, s3_inline(creds)
    elif case == "missing results bucket":
        results, where, connection = missing, missing, s3_inline(creds)
    elif case == "swift missing data container":
        kind, data, where = "swift", missing, missing
        connection = swift_inline(creds, password=creds["key"])
    else:
        where = f"http://127.0.0.1:{CLOSED_PORT}" if case == "closed port" else silent_endpoint
        connection = s3_inline(creds, endpoint=where)
    path = write_manifest(tmp_path / "manifest.yml", data, results, connection, kind=kind)
    connections_before = _moved_connections(api)

    result = cli.run("train", str(model), str(path), timeout=CLI_BOUND_S + 60)

    assert result.code == exit_code, result.describe()
    assert result.seconds < CLI_BOUND_S, result.describe()
    assert result.stdout == "", result.describe()
    line = result.stderr.strip()
    assert "\n" not in line, result.describe()
    assert line.startswith(f"error {code}: {field}: "), result.describe()
    assert where in line, line
    assert SKIP_OPTION in line, line
    assert WRONG_SECRET not in line, line
    assert not leaks(line, creds["key"]), line
    assert "Submitting" not in result.stderr, result.describe()  # not even a training id was chosen
    assert_nothing_queued(api, results, connections_before)


@pytest.mark.integration
def test_no_store_check_skips_the_check(
    cli: Cli,
    api: httpx.Client,
    model: Path,
    tmp_path: Path,
    buckets: tuple[str, str],
    store_credentials: dict[str, str],  # noqa: F811
) -> None:
    """The refused credentials are noticed before anything is queued; with --no-store-check they are not:
    the run is submitted, and its worker refuses them when it stages (the run ends FAILED C103)."""
    data, results = buckets
    path = write_manifest(
        tmp_path / "manifest.yml", data, results, s3_inline(store_credentials, secret=WRONG_SECRET)
    )
    connections_before = _moved_connections(api)
    checked = cli.run("train", str(model), str(path))
    assert checked.stderr.startswith("error C103: "), checked.describe()
    assert_nothing_queued(api, results, connections_before)
    skipped = cli.run("train", str(model), str(path), SKIP_OPTION, "--wait", "--timeout", "240", timeout=300)
    assert skipped.code == 1, skipped.describe()  # submitted; the run failed
    training_id = skipped.stdout.split("Model-ID is '")[1].split("'")[0]
    assert f"{training_id} FAILED: C103" in skipped.stderr, skipped.describe()
    cli.ok("delete", training_id)


@pytest.mark.integration
def test_validate_checks_the_stores_only_when_asked(
    cli: Cli,
    model: Path,
    tmp_path: Path,
    buckets: tuple[str, str],
    store_credentials: dict[str, str],  # noqa: F811
) -> None:
    data, results = buckets
    # validate is offline: it checks against this machine's registry, where the services' framework is put.
    here = {"AIRFLOW__WMLTRAIN__FRAMEWORKS": json.dumps({"busybox": {"1": {"image": "busybox"}}})}
    good = write_manifest(tmp_path / "good.yml", data, results, s3_inline(store_credentials))
    bad = write_manifest(
        tmp_path / "bad.yml", data, results, s3_inline(store_credentials, secret=WRONG_SECRET)
    )

    assert cli.run("validate", str(model), str(bad), env=here).code == 0  # offline by default
    refused = cli.run("validate", str(model), str(bad), "--check-stores", "--json", env=here)
    assert refused.code == 2, refused.describe()
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "C103", error
    assert error["field"] == "training_data_reference[0].connection", error
    assert WRONG_SECRET not in refused.stdout + refused.stderr

    checked = cli.run("validate", str(model), str(good), "--check-stores", "--json", env=here)
    assert checked.code == 0, checked.describe()
    summary = json.loads(checked.stdout)
    assert summary["data"]["store_check"] == summary["results"]["store_check"] == "answers", summary
    text = cli.run("validate", str(model), str(good), "--check-stores", env=here)
    assert text.code == 0, text.describe()
    assert "(answers)" in text.stdout, text.describe()
    assert not leaks(checked.stdout + checked.stderr + text.stdout + text.stderr, store_credentials["key"])
