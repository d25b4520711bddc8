"""The secrets scan (issue 10, deliverable 3): marker credentials, unique to the session, in inline manifests
(operator arguments, and a manifest submitted with ``wmltrain train``) and in an Airflow connection; a run on
every path (success, failure, halt; deferred and not) through the real scheduler of ``scripts/services up``,
then the command line; then every place a run leaves text is searched for the markers in plain, base64
(any alignment, standard and URL-safe), URL-, form- and twice-encoded and JSON-escaped forms:

task logs (REST API and the files), XCom values, rendered template fields (REST API and the
``rendered_task_instance_fields`` table), trigger rows (the ``trigger`` table's kwargs, decrypted as the
triggerer reads them, sampled while the runs are deferred), DAG run conf, everything in the results buckets
(``_status.json``, ``_manifest.yml``, logs, results), the CLI's output, other REST API responses, ``docker
inspect`` of every container created meanwhile (env, cmd, labels), the command lines of the machine's
processes, every other table of the metadata database, the worker's staging files and the services' logs.

Each test below is one kind of place: zero hits, or a failure naming each place, marker and form.
The markers really are the credentials the runs used: a relay in front of the store accepts only requests
signed with them (and signs them again with the store's own keys).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml

from airflow_wmltrain.runtime import labels
from tests.faults.fault_helpers import (
    SCRIPTS,
    DroppedDag,
    Scenario,
    api_get,
    bucket_status,
    drop_dag,
    open_gate,
    remove_dag,
    run_containers,
    start_dag,
    task_logs,
    wait_dag_run_end,
    wait_state,
    wait_ti,
)
from tests.integration.secrets_helpers import (
    Marker,
    MetadataDb,
    ResigningRelay,
    Sampler,
    Scanner,
    log_offsets,
    new_markers,
    scan_new_log_text,
    scan_tree,
    staging_dir,
)
from tests.integration.service_helpers import (
    TRAINING_DAG_ID,
    Cli,
    Result,
    api_client,
    drop_buckets,
    keys,
    make_buckets,
    quote,
    read,
    training_id_of,
    wait_for,
)
from tests.integration.training_helpers import manifest, model_zip

RUN_END_S = 240
ENDED = {"COMPLETED", "FAILED", "HALTED"}
# Prints its environment (what the container was given), trains until the gate opens (or $1 s), writes
# results and exits $2; stops at once on SIGTERM.
SCAN_SH = """\
trap 'echo "stopped by SIGTERM"; exit 143' TERM
echo "training $TRAINING_ID"
env | sort
i=0
while [ ! -e /release-gate ] && [ "$i" -lt "$1" ]; do sleep 1 & wait $!; i=$((i+1)); done
echo '{"accuracy": 0.5}' > "$RESULT_DIR/metrics.json"
echo "model weights" > "$RESULT_DIR/model.bin"
echo "done after $i s, exiting ${2:-0}"
exit "${2:-0}"
"""
DEFER = "deferrable=True, poll_interval=2, priority_weight=10,"

# Where each table of the metadata database belongs among the tests below; "db" for the others.
TABLE_CATEGORY = {
    "trigger": "trigger",
    "xcom": "xcom",
    "rendered_task_instance_fields": "rendered",
    "dag_run": "conf",
    "serialized_dag": "serialized_dag",
    # Airflow's credential store (login in clear, password and extra Fernet-encrypted) and its audit
    # log of the connections API: they may show an access key id as a connection's login, never a
    # secret key (test_no_secret_key_in_the_connection_store).
    "connection": "connection_store",
}


@dataclass
class Run:
    """One run of the scan, whatever started it."""

    name: str
    expected: str  # COMPLETED, FAILED or HALTED
    dag_id: str = ""
    run_id: str = ""
    training_id: str = ""
    results: str = ""
    state: str = ""
    dropped: DroppedDag | None = None


@dataclass
class Scan:
    markers: dict[str, Marker]
    scanner: Scanner
    relay: ResigningRelay
    sampler: Sampler
    runs: list[Run] = field(default_factory=list)
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def wmltrain(cli: Cli, scanner: Scanner, *args: str, timeout: float = 60) -> Result:
    """Run ``wmltrain *args``; its output scanned."""
    result = cli.run(*args, timeout=timeout)
    scanner.scan("cli", f"wmltrain {' '.join(args)} (exit {result.code})", result.stdout + result.stderr)
    return result


def _halt(sc: Scenario, cli: Cli, scanner: Scanner, s3: Any, gpu: docker.APIClient, run: Run) -> None:
    result = wmltrain(cli, scanner, "halt", run.training_id, timeout=120)
    assert result.code == 0, result.describe()
    sc.note("halted")
    dag = run.dropped
    assert dag is not None
    wait_for(
        f"{run.training_id} to end HALTED with its container gone",
        120,
        lambda: (
            (bucket_status(s3, dag) or {}).get("state") == "HALTED"
            and not run_containers(gpu, run.training_id)
        ),
        interval=2,
    )


def dropped_run(
    sc: Scenario,
    *,
    run: Run,
    services: dict[str, str],
    api: httpx.Client,
    s3: Any,
    gpu: docker.APIClient,
    cli: Cli,
    scanner: Scanner,
    model: Path,
    connection: dict[str, Any],
    deferred: bool,
) -> None:
    """A DAG of one operator whose manifest holds ``connection``; run to ``run.expected``."""
    exit_code = 3 if run.expected == "FAILED" else 0
    dag = drop_dag(
        services,
        s3,
        model,
        kind=f"secrets_{run.name}",
        command=f"sh scan.sh 300 {exit_code}",
        operator=DEFER if deferred else "priority_weight=10,",
        data_connection=connection,
        results_connection=connection,
    )
    run.dropped, run.dag_id, run.results = dag, dag.dag_id, dag.results
    sc.note(f"dropped {dag.dag_id}")
    sc.context.append(lambda: task_logs(api, dag))
    run.run_id = start_dag(api, dag)
    run.training_id = dag.training_id()
    sc.note(f"triggered {run.run_id}: {run.training_id}")
    wait_state(
        f"{run.training_id} in its bucket", 180, lambda: bucket_status(s3, dag), {"PROCESSING"} | ENDED
    )
    if deferred:
        wait_ti(api, dag, "the task to defer", 120, lambda t: t.get("state") == "deferred")
        time.sleep(2)  # the sampler reads the trigger rows every 0.5 s
        sc.note("deferred")
    if run.expected == "HALTED":
        _halt(sc, cli, scanner, s3, gpu, run)
    else:
        open_gate(gpu, run.training_id)
        sc.note(f"gate opened; the DAG run ended {wait_dag_run_end(api, dag, RUN_END_S)}")
    run.state = str((bucket_status(s3, dag) or {}).get("state"))
    sc.note(f"ended {run.state}")


def cli_run(
    sc: Scenario,
    *,
    run: Run,
    cli: Cli,
    s3: Any,
    scanner: Scanner,
    model: Path,
    work: Path,
    connection: dict[str, Any],
) -> None:
    """``wmltrain train`` of a manifest with inline credentials, then the other commands."""
    data, run.results = make_buckets(s3, "data", "res")
    document = manifest(
        command="sh scan.sh 2 0", data_bucket=data, results_bucket=run.results, connection=connection
    )
    document["model_definition"]["name"] = "secrets-scan-cli"
    path = work / "manifest.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    sc.cleanups.append(lambda: drop_buckets(s3, [data]))

    def command(*args: str, timeout: float = 60) -> str:
        result = wmltrain(cli, scanner, *args, timeout=timeout)
        assert result.code == 0, result.describe()
        return result.stdout

    run.training_id = training_id_of(command("train", str(model), str(path)))
    run.dag_id, run.run_id = TRAINING_DAG_ID, run.training_id
    sc.note(f"submitted {run.training_id}")
    command("logs", run.training_id, "--follow", timeout=RUN_END_S)
    run.state = str(cli.wait_until_state(run.training_id, ENDED, 60)["state"])
    sc.note(f"ended {run.state}")


def collect(
    scan: Scan, api: httpx.Client, s3: Any, cli: Cli, db: MetadataDb, services: dict[str, str]
) -> None:
    """Everything the runs left, scanned (the sampler scanned what is transient while they ran)."""
    scanner = scan.scanner
    for run in scan.runs:
        if not run.run_id:
            continue
        base = f"/dags/{run.dag_id}/dagRuns/{quote(run.run_id)}"
        ti_path = f"{base}/taskInstances/train"

        def get(path: str, category: str, **params: Any) -> Any:
            response = api_get(api, path, params=params or None)
            scanner.scan(category, f"REST API GET {path} {params or ''}", response.text)
            return response.json() if response.status_code == 200 else {}

        get(base, "conf")
        ti = get(ti_path, "rendered")
        get(f"{ti_path}/tries", "api")
        get(f"/dags/{run.dag_id}/dagRuns", "api")
        get("/eventLogs", "api", dag_id=run.dag_id, limit=100)
        get(f"/dags/{run.dag_id}/tasks", "api")
        get(f"/dags/{run.dag_id}/details", "api")
        entries = get(f"{ti_path}/xcomEntries", "xcom", limit=100).get("xcom_entries", [])
        for entry in entries:
            get(f"{ti_path}/xcomEntries/{quote(entry['key'])}", "xcom", deserialize="true")
            get(f"{ti_path}/xcomEntries/{quote(entry['key'])}", "xcom")
        for number in range(1, int(ti.get("try_number") or 1) + 1):
            response = api_get(
                api,
                f"{ti_path}/logs/{number}",
                params={"full_content": "true"},
                headers={"Accept": "application/json"},
            )
            scanner.scan(
                "task_logs", f"REST API task log of {run.dag_id} {run.run_id} try {number}", response.text
            )
        logs = (
            Path(services["WMLTRAIN_AIRFLOW_HOME"]) / "logs" / f"dag_id={run.dag_id}" / f"run_id={run.run_id}"
        )
        scan_tree(scanner, "task_logs", logs)
        if run.results:
            for key in sorted(keys(s3, run.results)):
                scanner.scan("bucket", f"s3://{run.results}/{key}", read(s3, run.results, key))
        if run.training_id:
            wmltrain(cli, scanner, "show", run.training_id)
            wmltrain(cli, scanner, "show", run.training_id, "--json")
            wmltrain(cli, scanner, "logs", run.training_id)
    wmltrain(cli, scanner, "list")
    wmltrain(cli, scanner, "list", "--json")
    # The metadata database, every table (Fernet-encrypted columns, such as the trigger rows' kwargs and the
    # connections' secrets, read as ciphertext here: the sampler decrypted the trigger rows).
    needles = [text for _m, _f, text in scanner.patterns]
    for table in db.tables():
        scanner.count("db")
        for row in db.rows_holding(table, needles):
            if table == "dag_code":  # the source of a DAG file: the inline manifests its author wrote
                scan.notes.append(
                    f"dag_code holds a DAG file's source (its author's inline manifest): {row[:80]}"
                )
                continue
            category = TABLE_CATEGORY.get(table, "db")
            if table == "log" and any(f",{e}," in row[:300] for e in ("post_connection", "patch_connection")):
                category = "connection_store"
            scanner.scan(category, f"metadata database, table {table}, row {row[:100]}", row)
    scan.sampler.sample_triggers()


@pytest.fixture(scope="module")
def scan(
    services: dict[str, str],
    s3_client: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Scan]:
    work = tmp_path_factory.mktemp("secrets-scan")
    markers = new_markers()
    scanner = Scanner(markers.values())
    relay = ResigningRelay(
        services["WMLTRAIN_S3_ENDPOINT"],
        services["WMLTRAIN_STORE_USER"],
        services["WMLTRAIN_STORE_KEY"],
        {markers[f"{p}_ak"].value: markers[f"{p}_sk"].value for p in ("inline", "conn", "cli")},
    )
    api = api_client(services)
    wait_for(
        "Airflow to have parsed the bundled DAG",
        300,
        lambda: api.get(f"/dags/{TRAINING_DAG_ID}").status_code == 200,
    )
    (work / "cli-home").mkdir()
    cli = Cli.for_services(services, work / "cli-home")
    gpu = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"], timeout=60)
    db = MetadataDb(services)
    model = model_zip(work / "model.zip", {**SCRIPTS, "scan.sh": SCAN_SH})
    since = time.time()
    service_logs = Path(services["WMLTRAIN_SERVICES_DIR"]) / "logs"
    offsets = log_offsets(service_logs)

    conn_id = f"wmltrain_secrets_scan_{uuid.uuid4().hex[:8]}"
    response = api.post(
        "/connections",
        json={
            "connection_id": conn_id,
            "conn_type": "aws",
            "login": markers["conn_ak"].value,
            "password": markers["conn_sk"].value,
            "extra": json.dumps({"endpoint_url": relay.endpoint}),
        },
    )
    # Not scanned: the connections API serves a connection's login to its admins by design.
    assert response.status_code in (200, 201), response.status_code

    def inline(prefix: str) -> dict[str, str]:
        return {
            "endpoint_url": relay.endpoint,
            "aws_access_key_id": markers[f"{prefix}_ak"].value,
            "aws_secret_access_key": markers[f"{prefix}_sk"].value,
        }

    sampler = Sampler(scanner, db, [services["WMLTRAIN_GPU_DOCKER_HOST"], services["DOCKER_HOST"]])
    sampler.start()
    result = Scan(markers=markers, scanner=scanner, relay=relay, sampler=sampler)
    plan = [
        ("success", "COMPLETED", "inline", False),
        ("success_deferred", "COMPLETED", "conn", True),
        ("failure", "FAILED", "conn", False),
        ("failure_deferred", "FAILED", "inline", True),
        ("halt", "HALTED", "conn", False),
        ("halt_deferred", "HALTED", "inline", True),
    ]
    for name, expected, credentials, deferred in plan:
        run = Run(name=name, expected=expected)
        result.runs.append(run)
        connection = inline("inline") if credentials == "inline" else {"conn_id": conn_id}

        def body(
            sc: Scenario, run: Run = run, connection: dict[str, Any] = connection, deferred: bool = deferred
        ) -> None:
            dropped_run(
                sc,
                run=run,
                services=services,
                api=api,
                s3=s3_client,
                gpu=gpu,
                cli=cli,
                scanner=scanner,
                model=model,
                connection=connection,
                deferred=deferred,
            )

        result.scenarios[name] = Scenario(name, body, deadline_s=RUN_END_S + 200)
    cli_record = Run(name="cli", expected="COMPLETED")
    result.runs.append(cli_record)

    def cli_body(sc: Scenario) -> None:
        cli_run(
            sc,
            run=cli_record,
            cli=cli,
            s3=s3_client,
            scanner=scanner,
            model=model,
            work=work,
            connection=inline("cli"),
        )

    result.scenarios["cli"] = Scenario("cli", cli_body, deadline_s=RUN_END_S + 100)
    for scenario in result.scenarios.values():
        scenario.start()
    for scenario in result.scenarios.values():
        assert scenario.thread is not None
        scenario.thread.join(scenario.deadline_s + 60)
    try:
        collect(result, api, s3_client, cli, db, services)
        sampler.stop()
        scan_tree(scanner, "worker_files", staging_dir(services), since=since)
        scan_new_log_text(scanner, "service_logs", service_logs, offsets)
        yield result
    finally:
        sampler.stop()
        for run in result.runs:
            if run.dropped is not None:
                remove_dag(api, s3_client, gpu, run.dropped)
        if cli_record.training_id:
            cli.run("delete", cli_record.training_id)
        if cli_record.results:
            drop_buckets(s3_client, [cli_record.results])
        api.delete(f"/connections/{conn_id}")
        relay.close()
        db.close()
        gpu.close()
        api.close()


def assert_no_hits(scan: Scan, category: str, what: str) -> None:
    assert scan.scanner.scanned.get(category), f"nothing of {what} was scanned: the scan itself is broken"
    hits = scan.scanner.report(category)
    assert not hits, f"a marker credential appears in {what}:\n{hits}"


def test_every_path_ran_with_the_marker_credentials(scan: Scan) -> None:
    """The runs ended as planned, on credentials that were the markers (else a clean scan means nothing)."""
    problems = []
    for run in scan.runs:
        try:
            scan.scenarios[run.name].result()
        except BaseException as err:  # pytest.fail's Failed too: listed with the others
            problems.append(f"{run.name}: {str(err)[:4000]}")
            continue
        if run.state != run.expected:
            problems.append(f"{run.name} ({run.training_id}) ended {run.state}, expected {run.expected}")
    for prefix in ("inline", "conn", "cli"):
        if not scan.relay.used.get(scan.markers[f"{prefix}_ak"].value):
            problems.append(f"no request reached the store with the {scan.markers[f'{prefix}_ak'].name}")
    if scan.relay.refused:
        problems.append(f"requests the relay refused: {scan.relay.refused[:10]}")
    for run in scan.runs:
        if run.name.endswith("_deferred") and run.dag_id not in scan.sampler.trigger_dags:
            problems.append(f"{run.name}: the sampler never saw the trigger row of {run.training_id}")
    for run in scan.runs:
        name = labels.run_container_name(run.training_id) if run.training_id else "(never started)"
        if name not in scan.sampler.names:
            problems.append(f"{run.name}: its container {name} was never inspected")
    if scan.sampler.errors:
        problems.append(f"sampler errors: {scan.sampler.errors[:5]}")
    assert not problems, "\n".join(problems)
    print("\n".join(scan.notes))


def test_no_marker_in_task_logs(scan: Scan) -> None:
    assert_no_hits(scan, "task_logs", "the task logs (REST API and the log files)")


def test_no_marker_in_xcom(scan: Scan) -> None:
    assert_no_hits(scan, "xcom", "XCom values")


def test_no_marker_in_rendered_template_fields(scan: Scan) -> None:
    assert_no_hits(scan, "rendered", "rendered template fields (REST API, rendered_task_instance_fields)")


def test_no_marker_in_trigger_rows(scan: Scan) -> None:
    assert_no_hits(scan, "trigger", "the trigger table's kwargs (decrypted)")


def test_no_marker_in_dag_run_conf(scan: Scan) -> None:
    assert_no_hits(scan, "conf", "DAG run conf (REST API, dag_run table)")


def test_no_marker_in_the_results_buckets(scan: Scan) -> None:
    assert_no_hits(scan, "bucket", "the results buckets (_status.json, _manifest.yml, logs, results)")


def test_no_marker_in_cli_output(scan: Scan) -> None:
    assert_no_hits(scan, "cli", "the output of wmltrain")


def test_no_marker_in_other_api_responses(scan: Scan) -> None:
    assert_no_hits(scan, "api", "REST API responses")


def test_no_marker_in_container_inspect(scan: Scan) -> None:
    assert_no_hits(scan, "docker", "docker inspect of the containers created during the runs")


def test_no_marker_in_the_metadata_database(scan: Scan) -> None:
    assert_no_hits(scan, "db", "the other tables of the metadata database")


def test_no_marker_in_the_serialized_dags(scan: Scan) -> None:
    scan.scanner.count("serialized_dag")
    assert_no_hits(scan, "serialized_dag", "the serialized DAGs (serialized_dag table)")


def test_no_secret_key_in_the_connection_store(scan: Scan) -> None:
    """Airflow's connections (and its audit log of the connections API) show a login in clear, here an
    access key id; a secret key only Fernet-encrypted or masked."""
    found = scan.scanner.hits.get("connection_store", [])
    assert any(h.marker == scan.markers["conn_ak"] for h in found), (
        "the scan did not find the test's own connection (its login, an access key id) in the connection "
        "table: the scan of the connection store is broken"
    )
    secrets = {m.value for key, m in scan.markers.items() if key.endswith("_sk")}
    hits = [h for h in found if h.marker.value in secrets]
    listed = "\n".join(f"  - {hit}" for hit in hits)
    assert not hits, f"a marker secret key appears in Airflow's connections or their audit log:\n{listed}"


def test_no_marker_in_process_command_lines(scan: Scan) -> None:
    assert_no_hits(scan, "processes", "the command lines of the machine's processes (ps)")


def test_no_marker_in_worker_files(scan: Scan) -> None:
    # Scanned only when the staging directory has files of this session; an empty scan is no failure here.
    hits = scan.scanner.report("worker_files")
    assert not hits, f"a marker credential appears in the worker's staging files:\n{hits}"


def test_no_marker_in_the_services_logs(scan: Scan) -> None:
    assert_no_hits(scan, "service_logs", "the services' own logs (scheduler, triggerer, api-server, store)")


def test_forms_find_what_they_claim() -> None:
    """The scanner finds a marker in each encoded form a leak could take (a scan that cannot fail is
    no scan)."""
    import base64
    from urllib.parse import quote as url_quote

    marker = Marker("test secret", "wmlScan/abc+Sec")
    scanner = Scanner([marker])
    wrapped = f"aws_secret_access_key: {marker.value}\n"
    samples = {
        "plain": wrapped,
        "base64": base64.b64encode(wrapped.encode()).decode(),
        "base64, shifted": base64.b64encode(("x" + wrapped).encode()).decode(),
        "base64url": base64.urlsafe_b64encode(("xy" + wrapped).encode()).decode(),
        "url": "https://h/?k=" + url_quote(marker.value, safe=""),
        "json": json.dumps({"k": marker.value}).replace("/", "\\/"),
    }
    for name, text in samples.items():
        assert scanner.scan("unit", name, text), f"the {name} form was not found in {text!r}"
    assert not scanner.scan("unit", "other", "aws_secret_access_key: ***"), "a hit without the marker"
