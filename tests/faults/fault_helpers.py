"""Helpers of the fault-injection tests: scenarios run in threads, a TCP relay that plays a failing object
store, a private stand-in GPU Docker daemon that can be restarted, a recorder of container ``create``
events, and readers of a run's end state in its three places (bucket, status XCom, Docker host).

Every wait has a deadline and says what it waited for; a scenario that fails says what it saw (its
timeline, every try's task log, the status XCom, the bucket's ``_status.json`` and the containers).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from airflow_wmltrain.runtime import labels
from airflow_wmltrain.training_id import derive_training_id
from tests.integration.service_helpers import drop_buckets, quote, read, wait_for
from tests.integration.training_helpers import FRAMEWORK

ENDED = {"COMPLETED", "FAILED", "HALTED"}
PARSE_TIMEOUT_S = 120  # the dag-processor looks for new files every 5 s (one parsing process)
STATUS_XCOM_KEY = "wmltrain_status"

# Trains until the test opens its gate (``docker exec ... touch /release-gate``) or for $1 seconds at
# most, so that a test decides when a run ends, whatever the machine's speed; stops at once on SIGTERM.
GATE_SH = """\
trap 'echo "stopped by SIGTERM"; exit 143' TERM
echo "training $TRAINING_ID on GPU(s) ${NVIDIA_VISIBLE_DEVICES:-none}"
start=$(cut -d' ' -f1 /proc/uptime)
i=0
while [ ! -e /release-gate ] && [ "$i" -lt "$1" ]; do sleep 1 & wait $!; i=$((i+1)); done
end=$(cut -d' ' -f1 /proc/uptime)
echo "${NVIDIA_VISIBLE_DEVICES:-none} $start $end" > "$RESULT_DIR/times.txt"
echo "trained for $i s" > "$RESULT_DIR/result.txt"
echo "training done after $i s"
"""
# ~$1 seconds of training that records its GPUs and its interval (kernel uptime: one clock for all).
TIMES_SH = """\
start=$(cut -d' ' -f1 /proc/uptime)
echo "training on GPU(s) $NVIDIA_VISIBLE_DEVICES"
sleep "$1"
end=$(cut -d' ' -f1 /proc/uptime)
echo "$NVIDIA_VISIBLE_DEVICES $start $end" > "$RESULT_DIR/times.txt"
echo "done"
"""
# Checks that every staged object is whole: the data bucket holds obj-NNNN of known content.
COUNT_SH = """\
n=$(ls "$DATA_DIR" | grep -c '^obj-')
echo "staged $n objects"
bad=0
for f in "$DATA_DIR"/obj-*; do
  grep -q "^payload $(basename "$f") " "$f" || { echo "corrupt: $f"; bad=1; }
done
[ "$n" -eq "$1" ] || { echo "expected $1 objects"; exit 4; }
[ "$bad" -eq 0 ] || exit 5
echo "$n" > "$RESULT_DIR/count.txt"
"""
# Allocates far more than a 16 MiB memory limit.
OOM_SH = """\
echo "allocating 256 MiB"
x=$(dd if=/dev/zero bs=1M count=256 2>/dev/null | tr '\\0' a)
echo "allocated ${#x} bytes"
"""
# Ignores SIGTERM (the shell is the container's PID 1): only SIGKILL ends it.
STUBBORN_SH = """\
trap '' TERM
echo "ignoring SIGTERM"
i=0
while [ "$i" -lt "$1" ]; do sleep 1; i=$((i+1)); done
echo "woke up"
"""
# Writes some results, so that a failed upload has something to keep.
RESULTS_SH = """\
echo "training $TRAINING_ID"
i=0
while [ ! -e /release-gate ] && [ "$i" -lt "$1" ]; do sleep 1; i=$((i+1)); done
echo "model weights" > "$RESULT_DIR/model.bin"
echo '{"accuracy": 0.5}' > "$RESULT_DIR/metrics.json"
echo "done"
"""
SCRIPTS = {
    "gate.sh": GATE_SH,
    "times.sh": TIMES_SH,
    "count.sh": COUNT_SH,
    "oom.sh": OOM_SH,
    "stubborn.sh": STUBBORN_SH,
    "results.sh": RESULTS_SH,
}

DAG_TEMPLATE = """\
import os
from datetime import datetime, timedelta

from airflow.sdk import DAG

from airflow_wmltrain.operators.training_run import TrainingRunOperator

with DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         tags=["wmltrain-faults"]):
    TrainingRunOperator{partial}(
        task_id="train",
        manifest={manifest!r},
        model_definition={model!r},
        docker_url={docker_url},
        network_mode="none",
        {operator}
    ){expand}
"""


def api_get(api: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    """``api.get``, tried again while the api-server does not answer (on 2 busy cores its one worker can
    take longer than the client's 30 s to answer); fails saying so after three tries."""
    for attempt in range(3):
        try:
            return api.get(path, **kwargs)
        except httpx.TransportError as err:
            if attempt == 2:
                pytest.fail(
                    f"the Airflow API server did not answer GET {path} three times: {err!r}", pytrace=False
                )
            time.sleep(2)
    raise AssertionError("unreachable")


# --- scenarios ------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """One fault scenario, driven in a thread of its own so that scenarios overlap in time."""

    name: str
    body: Callable[[Scenario], None]
    deadline_s: float
    timeline: list[str] = field(default_factory=list)
    error: BaseException | None = None
    context: list[Callable[[], str]] = field(default_factory=list)
    started: float = 0.0
    thread: threading.Thread | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    ended: float = 0.0
    final_report: str = ""

    def note(self, message: str) -> None:
        self.timeline.append(f"{time.monotonic() - self.started:6.1f}s {message}")

    def start(self) -> None:
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._main, name=f"scenario-{self.name}", daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self.body(self)
        except BaseException as err:  # pytest.fail raises a BaseException (Failed): keep it for the test
            self.error = err
            self.note(f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
        finally:
            self.ended = time.monotonic()
            if self.error is not None:  # described now: the clean-ups remove the buckets and the DAG
                self.final_report = self.report()
            for cleanup in reversed(self.cleanups):
                try:
                    cleanup()
                except Exception as err:
                    self.note(f"clean-up failed: {type(err).__name__}: {err}")

    def result(self) -> None:
        """Wait for the scenario's end (it has its own deadlines; this one only guards against a bug) and
        raise what it failed with, with all it saw."""
        assert self.thread is not None, f"scenario {self.name} was never started"
        left = self.deadline_s - (time.monotonic() - self.started)
        self.thread.join(max(1.0, left) + 60)
        if self.thread.is_alive():
            pytest.fail(
                f"scenario {self.name} still running after {self.deadline_s + 60:.0f}s (a wait without its "
                f"deadline?)\n{self.report()}",
                pytrace=False,
            )
        if self.error is None:
            print("\n".join([f"--- timeline of {self.name}:", *self.timeline]))  # shown by pytest -rP
        if self.error is not None:
            text = str(self.error)
            report = self.final_report or self.report()
            if isinstance(self.error, AssertionError | pytest.fail.Exception):
                pytest.fail(f"{self.name}: {text}\n{report}", pytrace=False)
            raise AssertionError(
                f"{self.name}: {type(self.error).__name__}: {text}\n"
                + "".join(traceback.format_exception(self.error))[-4000:]
                + report
            )

    def report(self) -> str:
        parts = [f"--- timeline of {self.name} ({self.ended - self.started:.0f}s):", *self.timeline]
        for describe in self.context:
            try:
                parts.append(describe())
            except Exception as err:
                parts.append(f"(could not describe: {type(err).__name__}: {err})")
        return "\n".join(parts)


def start_selected(request: pytest.FixtureRequest, scenarios: dict[str, Scenario]) -> dict[str, Scenario]:
    """Start the scenarios whose test (``test_<name>...``) this session runs; all at once."""
    wanted = [item.name for item in request.session.items if getattr(item, "module", None) is request.module]
    chosen = {name: s for name, s in scenarios.items() if any(n.startswith(f"test_{name}") for n in wanted)}
    for scenario in chosen.values():
        scenario.start()
    return chosen


# --- DAGs dropped into the services' test bundle --------------------------------------------------------


@dataclass
class DroppedDag:
    """A DAG of one ``TrainingRunOperator`` in the services' ``wmltrain-tests`` bundle, with its buckets."""

    dag_id: str
    data: str
    results: str
    path: Path
    run_id: str = ""
    map_count: int = 0

    def training_id(self, map_index: int = -1) -> str:
        return derive_training_id(self.dag_id, self.run_id, "train", map_index)

    def ti_path(self, map_index: int = -1) -> str:
        path = f"/dags/{self.dag_id}/dagRuns/{quote(self.run_id)}/taskInstances/train"
        return f"{path}/{map_index}" if map_index >= 0 else path


def store_connection(services: dict[str, str], endpoint: str | None = None) -> dict[str, str]:
    """Inline S3 credentials of the services' store, at ``endpoint`` (a relay) or the store itself."""
    return {
        "endpoint_url": endpoint or services["WMLTRAIN_S3_ENDPOINT"],
        "aws_access_key_id": services["WMLTRAIN_STORE_USER"],
        "aws_secret_access_key": services["WMLTRAIN_STORE_KEY"],
    }


def drop_dag(
    services: dict[str, str],
    s3: Any,
    model: Path,
    *,
    kind: str,
    command: str,
    operator: str = "",
    grid: list[dict[str, Any]] | None = None,
    data_connection: dict[str, Any] | None = None,
    results_connection: dict[str, Any] | None = None,
    docker_url: str | None = None,
    data_objects: int = 0,
    worker_docker_host: bool = False,
) -> DroppedDag:
    """Write the DAG file (aside, then renamed: never parsed half-written) and make its buckets.

    ``docker_url``: the task's Docker host; none: ``$WMLTRAIN_DOCKER_URL`` where the DAG is parsed, or with
    ``worker_docker_host`` none at all (the worker's own, ``[wmltrain] docker_url``: the scale-out)."""
    dag_id = f"wmltrain_fault_{kind}_{uuid.uuid4().hex[:8]}"
    data, results = f"wmltrain-ft-data-{uuid.uuid4().hex[:10]}", f"wmltrain-ft-res-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=data)
    s3.create_bucket(Bucket=results)
    s3.put_object(Bucket=data, Key="input.txt", Body=b"the training data\n")
    if data_objects:
        fill_bucket(s3, data, data_objects)
    files = Path(services["WMLTRAIN_AIRFLOW_TEST_DAGS"]).parent / "test-files"  # not a DAG folder
    files.mkdir(parents=True, exist_ok=True)
    zip_path = files / f"{dag_id}.zip"
    zip_path.write_bytes(model.read_bytes())
    default = {"conn_id": "wmltrain_store_s3"}  # an Airflow connection of the services' Airflow
    document = {
        "model_definition": {
            "name": f"fault-{kind}",
            "framework": dict(FRAMEWORK),
            "execution": {"command": command, "resource": "small"},
        },
        "training_data_reference": [
            {"connection": data_connection or default, "source": {"bucket": data, "type": "s3"}}
        ],
        "training_results_reference": {
            "connection": results_connection or default,
            "target": {"bucket": results, "type": "s3"},
        },
    }
    dag_file = Path(services["WMLTRAIN_AIRFLOW_TEST_DAGS"]) / f"{dag_id}.py"
    tmp = dag_file.with_suffix(".tmp")
    tmp.write_text(
        DAG_TEMPLATE.format(
            dag_id=dag_id,
            manifest=document,
            model=str(zip_path),
            docker_url=repr(docker_url)
            if docker_url
            else "None"
            if worker_docker_host
            else 'os.environ["WMLTRAIN_DOCKER_URL"]',
            partial=".partial" if grid else "",
            operator=operator,
            expand=f".expand(hyperparameters={grid!r})" if grid else "",
        )
    )
    tmp.rename(dag_file)
    return DroppedDag(dag_id=dag_id, data=data, results=results, path=dag_file, map_count=len(grid or []))


def fill_bucket(s3: Any, bucket: str, count: int) -> None:
    """``count`` small objects ``obj-NNNN`` whose content names them (count.sh checks it)."""
    from concurrent.futures import ThreadPoolExecutor

    def put(i: int) -> None:
        key = f"obj-{i:04d}"
        s3.put_object(Bucket=bucket, Key=key, Body=f"payload {key} {'x' * 200}\n".encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count)))


def remove_dag(api: httpx.Client, s3: Any, gpu: docker.APIClient, dag: DroppedDag) -> None:
    dag.path.unlink(missing_ok=True)
    with contextlib.suppress(Exception):
        api.delete(f"/dags/{dag.dag_id}")
    (dag.path.parent.parent / "test-files" / f"{dag.dag_id}.zip").unlink(missing_ok=True)
    if dag.run_id:
        indexes = range(dag.map_count) if dag.map_count else [-1]
        for index in indexes:
            for info in gpu.containers(
                all=True, filters={"label": f"{labels.TRAINING_ID}={dag.training_id(index)}"}
            ):
                with contextlib.suppress(Exception):
                    gpu.remove_container(info["Id"], force=True)
    with contextlib.suppress(Exception):
        drop_buckets(s3, [dag.data, dag.results])


def start_dag(api: httpx.Client, dag: DroppedDag) -> str:
    """Wait until the dropped DAG is parsed, unpause and trigger it; its run id."""

    def parsed() -> bool:
        if _parsed(api, dag.dag_id):
            return True
        problem = import_error(api, dag.path.name)
        if problem:
            pytest.fail(f"the DAG file {dag.path.name} does not import:\n{problem[-3000:]}", pytrace=False)
        return False

    with diagnosed(api, dag):
        wait_for(f"the DAG {dag.dag_id} to be parsed", PARSE_TIMEOUT_S, parsed)
    response = api_send(api, "PATCH", f"/dags/{dag.dag_id}", json={"is_paused": False})
    assert response.status_code == 200, response.text
    # An explicit run id makes the trigger safe to send again when the busy api-server times out: a
    # second POST of the same run answers 409, which means that the first one went through.
    run_id = f"manual__fault_{uuid.uuid4().hex[:12]}"
    body = {"dag_run_id": run_id, "logical_date": None}
    response = api_send(api, "POST", f"/dags/{dag.dag_id}/dagRuns", json=body, ok=(200, 409))
    dag.run_id = run_id
    return dag.run_id


def api_send(
    api: httpx.Client, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any
) -> httpx.Response:
    """An idempotent write, sent again while the api-server does not answer (see :func:`api_get`); a
    status in ``ok`` on a later try counts as done."""
    for attempt in range(3):
        try:
            response = api.request(method, path, **kwargs)
        except httpx.TransportError as err:
            if attempt == 2:
                pytest.fail(
                    f"the Airflow API server did not answer {method} {path} three times: {err!r}",
                    pytrace=False,
                )
            time.sleep(2)
            continue
        if attempt and response.status_code in ok:
            response.status_code = 200
        return response
    raise AssertionError("unreachable")


def import_error(api: httpx.Client, filename: str) -> str | None:
    """The dag-processor's import error of a DAG file, if it has one (the product fails to import...)."""
    response = api_get(api, "/importErrors", params={"limit": 100})
    if response.status_code != 200:
        return None
    for error in response.json().get("import_errors", []):
        if str(error.get("filename", "")).endswith(filename):
            return str(error.get("stack_trace", ""))
    return None


def _parsed(api: httpx.Client, dag_id: str) -> bool:
    return api_get(api, f"/dags/{dag_id}").status_code == 200


# --- the end state in its three places -------------------------------------------------------------------


def task_instance(api: httpx.Client, dag: DroppedDag, map_index: int = -1) -> dict[str, Any]:
    response = api_get(api, dag.ti_path(map_index))
    return dict(response.json()) if response.status_code == 200 else {}


def status_xcom(api: httpx.Client, dag: DroppedDag, map_index: int = -1) -> dict[str, Any] | None:
    """The run's status as the REST API serves it (the ``wmltrain_status`` XCom of the task instance)."""
    value = xcom_value(api, dag, STATUS_XCOM_KEY, map_index)
    return value if isinstance(value, dict) else None


def xcom_value(api: httpx.Client, dag: DroppedDag, key: str, map_index: int = -1) -> Any:
    """An XCom of the DAG's ``train`` task instance, deserialized (``None`` when there is none)."""
    response = api_get(
        api,
        f"/dags/{dag.dag_id}/dagRuns/{quote(dag.run_id)}/taskInstances/train/xcomEntries/{key}",
        params={"map_index": map_index, "deserialize": "true"},
    )
    if response.status_code != 200:
        return None
    value = response.json().get("value")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = json.loads(value)
    return value


def bucket_status(s3: Any, dag: DroppedDag, map_index: int = -1) -> dict[str, Any] | None:
    """The run's ``_status.json`` in its results bucket (read directly from the store)."""
    try:
        return dict(json.loads(read(s3, dag.results, f"{dag.training_id(map_index)}/_status.json")))
    except s3.exceptions.NoSuchKey:
        return None


def run_containers(gpu: docker.APIClient, training_id: str) -> list[dict[str, Any]]:
    return list(gpu.containers(all=True, filters={"name": f"^/{labels.run_container_name(training_id)}$"}))


def states_of(status: dict[str, Any] | None) -> list[str]:
    return [h.get("state", "?") for h in (status or {}).get("history", [])]


def task_logs(api: httpx.Client, dag: DroppedDag, map_index: int = -1, tail: int = 2500) -> str:
    """Every try's task log (the last ``tail`` characters of each), for a failure message."""
    ti = task_instance(api, dag, map_index)
    tries = int(ti.get("try_number") or 1)
    parts = []
    for number in range(1, tries + 1):
        parts.append(f"--- task log, try {number}:\n{task_log_text(api, dag, number, map_index)[-tail:]}")
    return "\n".join(parts)


LOG_NOISE = {
    "event",
    "level",
    "timestamp",
    "logger",
    "ti_id",
    "map_index",
    "task_id",
    "try_number",
    "run_id",
    "dag_id",
    "filename",
    "lineno",
    "loc",
}


def task_log_text(api: httpx.Client, dag: DroppedDag, try_number: int, map_index: int = -1) -> str:
    params: dict[str, Any] = {"full_content": "true"}
    if map_index >= 0:
        params["map_index"] = map_index
    response = api_get(
        api,
        f"/dags/{dag.dag_id}/dagRuns/{quote(dag.run_id)}/taskInstances/train/logs/{try_number}",
        params=params,
        headers={"Accept": "application/json"},
    )
    if response.status_code != 200:
        return f"(no log: HTTP {response.status_code} {response.text[:200]})"
    lines = []
    for line in response.json().get("content", []):
        if isinstance(line, dict):
            event = line.get("event", "")
            level = line.get("level", "")
            extra = {k: v for k, v in line.items() if k not in LOG_NOISE}
            for detail in extra.pop("error_detail", None) or []:
                if isinstance(detail, dict):
                    lines.append(f"{level} {event}: {detail.get('exc_type')}: {detail.get('exc_value')}")
                    event = "  caused by"
            time_of = str(line.get("timestamp", ""))[11:19]
            lines.append(f"{time_of} {level} {event} {json.dumps(extra) if extra else ''}".rstrip())
        else:
            lines.append(str(line))
    return "\n".join(lines)


def describe_run(
    api: httpx.Client, s3: Any, gpu: docker.APIClient, dag: DroppedDag, events: CreateEvents | None
) -> Callable[[], str]:
    """What a failure message shows of a run: its task instance, status in the three places, logs."""

    def describe() -> str:
        if not dag.run_id:
            return f"(the DAG {dag.dag_id} was never triggered)"
        tid = dag.training_id()
        ti = task_instance(api, dag)
        xcom = status_xcom(api, dag)
        stored = bucket_status(s3, dag)
        containers = [(c["Names"], c["State"], c["Status"]) for c in run_containers(gpu, tid)]
        lines = [
            f"--- run {tid} of {dag.dag_id} / {dag.run_id}",
            f"task instance: state={ti.get('state')} try_number={ti.get('try_number')} pid={ti.get('pid')}",
            f"status XCom: {short_status(xcom)}",
            f"bucket _status.json: {short_status(stored)}",
            f"containers now: {containers}",
        ]
        if events is not None:
            lines.append(f"create events: {events.describe(tid)}")
        lines.append(task_logs(api, dag))
        return "\n".join(lines)

    return describe


def short_status(status: dict[str, Any] | None) -> str:
    if status is None:
        return "(none)"
    return json.dumps(
        {
            "state": status.get("state"),
            "history": states_of(status),
            "error": status.get("error"),
            "exit_code": status.get("exit_code"),
            "airflow.try_number": (status.get("airflow") or {}).get("try_number"),
        }
    )


def wait_state(
    what: str, timeout: float, probe: Callable[[], dict[str, Any] | None], states: set[str]
) -> dict[str, Any]:
    """Poll a status source until its state is one of ``states``; fail naming the last state seen."""
    seen: list[str] = []

    def check() -> dict[str, Any] | None:
        status = probe()
        state = (status or {}).get("state")
        if not seen or seen[-1] != str(state):
            seen.append(str(state))
        return status if state in states else None

    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() >= deadline:
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what} to be {'/'.join(sorted(states))}; "
                f"states seen: {' -> '.join(seen)}",
                pytrace=False,
            )
        time.sleep(1)


def wait_ti(
    api: httpx.Client, dag: DroppedDag, what: str, timeout: float, accept: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the task instance until ``accept(ti)``; fail with the states and tries seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        ti = task_instance(api, dag)
        key = f"{ti.get('state')}#{ti.get('try_number')}"
        if not seen or seen[-1] != key:
            seen.append(key)
        if ti and accept(ti):
            return ti
        if time.monotonic() >= deadline:
            pytest.fail(
                f"timed out after {timeout:.0f}s waiting for {what}; task instance state#try seen: "
                f"{' -> '.join(seen)}",
                pytrace=False,
            )
        time.sleep(1)


def wait_dag_run_end(
    api: httpx.Client, dag: DroppedDag, timeout: float, guard: Callable[[], str | None] | None = None
) -> str:
    """Wait for the DAG run to end (success or failed); its state. ``guard`` fails the wait at once when
    it returns a reason (e.g. a second container of the run was created: no use waiting any longer)."""

    def ended() -> str | None:
        if guard is not None:
            reason = guard()
            if reason:
                pytest.fail(f"while waiting for the DAG run to end: {reason}", pytrace=False)
        state = api_get(api, f"/dags/{dag.dag_id}/dagRuns/{quote(dag.run_id)}").json().get("state")
        return str(state) if state in ("success", "failed") else None

    with diagnosed(api, dag):
        return str(wait_for(f"the DAG run {dag.run_id} of {dag.dag_id} to end", timeout, ended))


def services_diagnosis(api: httpx.Client | None = None, dag: DroppedDag | None = None) -> str:
    """What the services looked like when a wait failed: which processes run, what the watchdog of
    ``scripts/services`` restarted (an Airflow process that exited), the states of the DAG run's task
    instances, and the last errors of the scheduler and the dag-processor."""
    from tests.integration.conftest import SERVICES_SCRIPT

    parts = []
    with contextlib.suppress(Exception):
        proc = subprocess.run(
            [str(SERVICES_SCRIPT), "status"], capture_output=True, text=True, timeout=60, check=False
        )
        parts.append("scripts/services status:\n" + proc.stdout.strip())
    logs = Path(os.environ.get("WMLTRAIN_SERVICES_DIR", "/var/tmp/wmltrain-services")) / "logs"
    with contextlib.suppress(OSError):
        restarts = [
            line
            for line in (logs / "watchdog.log").read_text(errors="replace").splitlines()
            if "[services]" in line
        ]
        parts.append("watchdog: " + ("\n".join(restarts[-10:]) if restarts else "no restart"))
    if api is not None and dag is not None and dag.run_id:
        with contextlib.suppress(Exception):
            response = api_get(
                api, f"/dags/{dag.dag_id}/dagRuns/{quote(dag.run_id)}/taskInstances", params={"limit": 100}
            )
            counts: dict[str, int] = {}
            for ti in response.json().get("task_instances", []):
                key = f"{ti.get('state')} (try {ti.get('try_number')})"
                counts[key] = counts.get(key, 0) + 1
            parts.append(f"task instances of {dag.run_id}: {counts}")
    for name in ("airflow-scheduler", "airflow-dag-processor"):
        with contextlib.suppress(OSError):
            lines = (logs / f"{name}.log").read_text(errors="replace").splitlines()
            errors = [line for line in lines if "[error" in line or "Traceback" in line or "Error:" in line]
            parts.append(f"{name}.log: {len(lines)} lines; last errors:\n" + "\n".join(errors[-8:]))
    return "\n".join(parts)


@contextlib.contextmanager
def diagnosed(api: httpx.Client, dag: DroppedDag) -> Iterator[None]:
    """A wait that fails says what the services looked like then (:func:`services_diagnosis`)."""
    try:
        yield
    except pytest.fail.Exception as failure:
        pytest.fail(f"{failure}\n--- services at the time ---\n{services_diagnosis(api, dag)}", pytrace=False)


def open_gate(gpu: docker.APIClient, training_id: str) -> None:
    """Let a ``gate.sh`` run finish its training now."""
    name = labels.run_container_name(training_id)
    exec_id = gpu.exec_create(name, ["touch", "/release-gate"])
    gpu.exec_start(exec_id)


# --- container create events ------------------------------------------------------------------------------


class CreateEvents:
    """Every ``create``, ``start`` and ``die`` of a container on a Docker daemon from now on, streamed in a
    thread.

    Reconnects after the daemon went away (a restarted daemon replays, with ``since``, what it saw while
    we were not listening), so that it also counts across a daemon restart. The environment of each
    run container is read at its creation (``NVIDIA_VISIBLE_DEVICES``: the GPUs the daemon gave it).
    """

    ACTIONS = ("create", "start", "die")

    def __init__(self, docker_url: str) -> None:
        self.docker_url = docker_url
        self.events: dict[tuple[str, str, int], dict[str, Any]] = {}  # (id, action, timeNano)
        self.gpus: dict[str, str] = {}  # container id -> NVIDIA_VISIBLE_DEVICES
        self.since = time.time() - 1
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._stream: Any = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._listen, name="docker-events", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _listen(self) -> None:
        last = self.since
        while not self._stop.is_set():
            try:
                client = docker.APIClient(base_url=self.docker_url, timeout=3600)
                self._stream = client.events(
                    since=int(last) - 1,
                    filters={"type": "container", "event": list(self.ACTIONS)},
                    decode=True,
                )
                self._ready.set()
                for event in self._stream:
                    last = max(last, float(event.get("time", last)))
                    self._record(client, event)
            except Exception as err:
                if self._stop.is_set():
                    return
                self.errors.append(f"{time.strftime('%H:%M:%S')} {type(err).__name__}: {err}"[:300])
                self._stop.wait(0.5)

    def _record(self, client: docker.APIClient, event: dict[str, Any]) -> None:
        container_id = str(event.get("id") or event.get("Actor", {}).get("ID"))
        action = str(event.get("Action") or event.get("status"))
        key = (container_id, action, int(event.get("timeNano", 0)))
        with self._lock:
            if key in self.events:
                return
            self.events[key] = event
        attributes = event.get("Actor", {}).get("Attributes", {})
        if action == "create" and attributes.get(labels.ROLE) == labels.ROLE_RUN:
            try:
                inspector = docker.APIClient(base_url=self.docker_url, timeout=10)  # not the streaming one
                info = inspector.inspect_container(container_id)
                inspector.close()
            except Exception as err:
                self.errors.append(f"inspect {container_id[:12]}: {type(err).__name__}: {err}"[:300])
            else:
                self.gpus[container_id] = visible_devices(info)

    def of(self, training_id: str, action: str) -> list[dict[str, Any]]:
        """The ``action`` events of the run container of ``training_id``, oldest first."""
        name = labels.run_container_name(training_id)
        with self._lock:
            found = [
                e
                for (_id, act, _t), e in self.events.items()
                if act == action and e.get("Actor", {}).get("Attributes", {}).get("name") == name
            ]
        return sorted(found, key=lambda e: int(e.get("timeNano", 0)))

    def creates(self, training_id: str) -> list[dict[str, Any]]:
        return self.of(training_id, "create")

    def second_container(self, training_id: str) -> Callable[[], str | None]:
        """A guard for :func:`wait_dag_run_end`: the reason to stop waiting once the run's container was
        created a second time."""

        def guard() -> str | None:
            if len(self.creates(training_id)) > 1:
                return (
                    f"a second container of {training_id} was created (one container ever is expected): "
                    f"{self.describe(training_id)}"
                )
            return None

        return guard

    def run_intervals(self, names: Collection[str] | None = None) -> list[tuple[str, str, float, float]]:
        """``(name, gpus, started, died)`` of every run container that started and died (seconds); with
        ``names``, of the containers of those names instead (any container, e.g. a ``DockerOperator``'s:
        its GPUs are ``?`` when it is not a run container)."""
        with self._lock:
            events = list(self.events.values())
        by_id: dict[str, dict[str, Any]] = {}
        for event in events:
            attributes = event.get("Actor", {}).get("Attributes", {})
            if names is not None:
                if attributes.get("name") not in names:
                    continue
            elif attributes.get(labels.ROLE) != labels.ROLE_RUN:
                continue
            entry = by_id.setdefault(str(event.get("id")), {"name": attributes.get("name", "?")})
            action = event.get("Action") or event.get("status")
            entry.setdefault(action, int(event.get("timeNano", 0)) / 1e9)
        return [
            (str(e["name"]), self.gpus.get(cid, "?"), float(e["start"]), float(e["die"]))
            for cid, e in by_id.items()
            if "start" in e and "die" in e
        ]

    def first_times(self, names: Collection[str]) -> dict[str, dict[str, float]]:
        """``{name: {action: seconds}}``: when each named container was first created, started and died."""
        with self._lock:
            events = list(self.events.values())
        times: dict[str, dict[str, float]] = {}
        for event in sorted(events, key=lambda e: int(e.get("timeNano", 0))):
            name = str(event.get("Actor", {}).get("Attributes", {}).get("name"))
            if name in names:
                action = str(event.get("Action") or event.get("status"))
                times.setdefault(name, {}).setdefault(action, int(event.get("timeNano", 0)) / 1e9)
        return times

    def describe(self, training_id: str) -> str:
        found = [
            (
                e.get("Action"),
                str(e.get("id", ""))[:12],
                time.strftime("%H:%M:%S", time.gmtime(e.get("time", 0))),
                e.get("Actor", {}).get("Attributes", {}).get("exitCode", ""),
            )
            for action in self.ACTIONS
            for e in self.of(training_id, action)
        ]
        return f"{found} (listener errors: {self.errors[-3:]})"

    def settle(self) -> None:
        """Give the stream a moment to deliver what the daemon already sent."""
        time.sleep(1)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            if self._stream is not None:
                self._stream.close()


def visible_devices(info: dict[str, Any]) -> str:
    """The GPUs ``docker inspect`` says a container was given: ``NVIDIA_VISIBLE_DEVICES`` of its
    environment, or (where the daemon's NVIDIA driver sets it only at start, as here) the device ids of
    its GPU device requests."""
    for item in info.get("Config", {}).get("Env") or []:
        if item.startswith("NVIDIA_VISIBLE_DEVICES="):
            return str(item.split("=", 1)[1])
    ids = [
        str(device)
        for request in info.get("HostConfig", {}).get("DeviceRequests") or []
        if ["gpu"] in (request.get("Capabilities") or [])
        for device in request.get("DeviceIDs") or []
    ]
    return ",".join(ids) if ids else "none"


def gpu_overlaps(intervals: list[tuple[str, str, float, float]]) -> list[str]:
    """Every two of ``(name, gpus, started, died)`` (:meth:`CreateEvents.run_intervals`) that held a GPU
    at the same time, described (``?``, ``none`` and empty GPU lists share nothing)."""
    found = []
    for i, (name_a, gpus_a, start_a, end_a) in enumerate(intervals):
        for name_b, gpus_b, start_b, end_b in intervals[i + 1 :]:
            shared = set(gpus_a.split(",")) & set(gpus_b.split(",")) - {"?", "", "none"}
            if shared and end_a > start_b and end_b > start_a:
                found.append(
                    f"GPU {','.join(sorted(shared))} given to {name_a} ({start_a:.2f}-{end_a:.2f}) "
                    f"and {name_b} ({start_b:.2f}-{end_b:.2f}) at once"
                )
    return found


def assert_one_container(events: CreateEvents, training_id: str, settle: bool = True) -> None:
    if settle:
        events.settle()
    created = events.creates(training_id)
    assert len(created) == 1, (
        f"{labels.run_container_name(training_id)} was created {len(created)} time(s), expected once: "
        f"{events.describe(training_id)}"
    )


# --- a failing object store: a TCP relay in front of the Swift proxy ---------------------------------------

REQUEST_LINE = re.compile(rb"(GET|PUT|HEAD|POST|DELETE) (/\S*) HTTP/1\.[01]\r\n")


class Relay:
    """A private endpoint of the object store: a TCP relay to the Swift proxy that a test takes down and
    brings back in an instant, as a proxy that is stopped and started again (new connections refused,
    open ones cut), without touching the proxy every other test shares.

    It sees the requests that pass (``requests``: ``(time, method, path)``), may slow each one down
    (``delay``), and calls ``on_request`` for each (e.g. to go down in the middle of a staging).
    """

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").partition(":")
        self.target = (host, int(port or 80))
        self.requests: list[tuple[float, str, str]] = []
        self.delay = 0.0
        self.on_request: Callable[[str, str], None] | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self.is_up = False
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        with self._lock:
            if self.is_up:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            self._listener = listener
            self.is_up = True
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut the open ones (RST), as a killed proxy does."""
        with self._lock:
            self.is_up = False
            listener, self._listener = self._listener, None
            sockets, self._open = list(self._open), set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.down()

    def count(self, method: str, path_part: str) -> int:
        with self._lock:
            return sum(1 for _t, m, p in self.requests if m == method and path_part in p)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self.is_up:
                    client.close()
                    server.close()
                    continue
                self._open.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        tail = b""
        try:
            while True:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if upstream:
                    buffer = tail + chunk
                    for match in REQUEST_LINE.finditer(buffer):
                        if match.end() <= len(tail):
                            continue
                        method, path = match.group(1).decode(), match.group(2).decode(errors="replace")
                        with self._lock:
                            self.requests.append((time.time(), method, path))
                        if self.delay:
                            time.sleep(self.delay)
                        if self.on_request is not None:
                            self.on_request(method, path)
                    tail = buffer[-300:]
                    if not self.is_up:
                        break
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)


# --- a private stand-in GPU Docker daemon -------------------------------------------------------------------


class PrivateDockerd:
    """A stand-in GPU Docker daemon of our own (own socket, data-root, exec-root, containerd namespace),
    started the way ``scripts/services`` starts the shared one, so that a test may restart it."""

    def __init__(self, services: dict[str, str], gpu_ids: str = "0,1,2,3") -> None:
        key = uuid.uuid4().hex[:8]
        self.state = Path(services["WMLTRAIN_SERVICES_DIR"]) / "faults" / f"dockerd-{key}"
        self.run_dir = Path(f"/run/wmltrain-ft-{key}")
        self.sock = self.run_dir / "docker.sock"
        self.url = f"unix://{self.sock}"
        self.hook_dir = Path(services["WMLTRAIN_SERVICES_DIR"]) / "gpu-bin"
        self.namespace = f"wmltrain-ft-{key}"
        self.gpu_ids = gpu_ids
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.state / "dockerd.log"

    def start(self, timeout: float = 60) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.state / "daemon.json").write_text(json.dumps({"labels": [f"wmltrain.gpus={self.gpu_ids}"]}))
        env = {
            **os.environ,
            "PATH": f"{self.hook_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    "dockerd",
                    "--config-file",
                    str(self.state / "daemon.json"),
                    "-H",
                    self.url,
                    "--data-root",
                    str(self.state / "data"),
                    "--exec-root",
                    str(self.run_dir / "exec"),
                    "--pidfile",
                    str(self.run_dir / "docker.pid"),
                    "--containerd-namespace",
                    self.namespace,
                    "--containerd-plugins-namespace",
                    f"{self.namespace}-plugins",
                    "--iptables=false",
                    "--ip-masq=false",
                    "--bridge=none",
                    "--shutdown-timeout=3",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-2000:]
                pytest.fail(f"the private dockerd on {self.url} did not start:\n{tail}", pytrace=False)
            time.sleep(0.3)

    def answers(self) -> bool:
        try:
            client = docker.APIClient(base_url=self.url, timeout=5)
            client.ping()
            client.close()
            return True
        except Exception:
            return False

    def load_image(self, source_url: str, image: str) -> None:
        """Copy ``image`` from another daemon (``docker save | docker load``)."""
        source = docker.APIClient(base_url=source_url, timeout=120)
        target = docker.APIClient(base_url=self.url, timeout=120)
        data = b"".join(source.get_image(image))
        target.load_image(data)

    def stop(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def destroy(self) -> None:
        if self.answers():
            with contextlib.suppress(Exception):
                client = docker.APIClient(base_url=self.url, timeout=30)
                for info in client.containers(all=True):
                    client.remove_container(info["Id"], force=True)
        self.stop()
        shutil.rmtree(self.state, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)


# --- Airflow's processes ------------------------------------------------------------------------------------


def pid_file(services: dict[str, str], name: str) -> int:
    return int((Path(services["WMLTRAIN_SERVICES_DIR"]) / "pids" / f"{name}.pid").read_text().strip())


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"


def heartbeat_timeout(services: dict[str, str]) -> int:
    """``[scheduler] task_instance_heartbeat_timeout`` of the services' Airflow (Airflow's default: 300)."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(Path(services["WMLTRAIN_AIRFLOW_HOME"]) / "airflow.cfg")
    return parser.getint("scheduler", "task_instance_heartbeat_timeout", fallback=300)


def services_up(timeout: float = 300) -> str:
    """``scripts/services up``: starts what is not running, waits until Airflow is healthy."""
    from tests.integration.conftest import SERVICES_SCRIPT

    proc = subprocess.run(
        [str(SERVICES_SCRIPT), "up"], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"scripts/services up failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    return proc.stderr


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP a process for the block; SIGCONT it always."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


# --- what every scenario needs ------------------------------------------------------------------------------


@dataclass
class Env:
    """The services and clients a scenario uses."""

    services: dict[str, str]
    api: httpx.Client
    s3: Any
    gpu: docker.APIClient
    model: Path
    events: CreateEvents
    cli: Any = None

    def drop(self, scenario: Scenario, kind: str, command: str, **kwargs: Any) -> DroppedDag:
        """Drop a DAG for ``scenario``, removed (with its buckets and containers) when it ends."""
        dag = drop_dag(self.services, self.s3, self.model, kind=kind, command=command, **kwargs)
        gpu = self.gpu
        if kwargs.get("docker_url"):
            gpu = docker.APIClient(base_url=kwargs["docker_url"], timeout=30)
        scenario.cleanups.append(lambda: remove_dag(self.api, self.s3, gpu, dag))
        scenario.note(f"dropped the DAG {dag.dag_id}")
        return dag

    def trigger(self, scenario: Scenario, dag: DroppedDag, events: CreateEvents | None = None) -> str:
        start_dag(self.api, dag)
        scenario.note(f"triggered {dag.run_id}; training id {dag.training_id()}")
        if not dag.map_count:
            gpu = (
                self.gpu
                if events is None or events is self.events
                else docker.APIClient(base_url=events.docker_url, timeout=30)
            )
            scenario.context.append(describe_run(self.api, self.s3, gpu, dag, events or self.events))
        return dag.training_id()

    def processing(self, scenario: Scenario, dag: DroppedDag, timeout: float = 180) -> dict[str, Any]:
        """Wait until the run's container trains (``PROCESSING`` in the bucket)."""
        status = wait_state(
            f"{dag.training_id()} in its bucket", timeout, lambda: bucket_status(self.s3, dag), {"PROCESSING"}
        )
        scenario.note("the run is PROCESSING")
        return status

    def end_state(
        self,
        dag: DroppedDag,
        state: str,
        *,
        map_index: int = -1,
        code: str | None = None,
        events: CreateEvents | None = None,
        gpu: docker.APIClient | None = None,
        bucket: bool = True,
        settle: bool = True,
        xcom_state: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Check the run's end in its three places: the status XCom and ``_status.json`` say ``state``
        (with ``code``), the Docker host keeps no container of it, and it was created exactly once.
        The XCom and the bucket's document."""
        tid = dag.training_id(map_index)
        xcom = status_xcom(self.api, dag, map_index)
        stored = bucket_status(self.s3, dag, map_index)
        assert xcom is not None, f"{tid}: no {STATUS_XCOM_KEY} XCom (REST API)"
        assert xcom.get("state") == (xcom_state or state), (
            f"{tid}: the status XCom says {short_status(xcom)}, expected {xcom_state or state}"
        )
        if code is not None:
            assert (xcom.get("error") or {}).get("code") == code, (
                f"{tid}: XCom error {xcom.get('error')}, expected {code}"
            )
        if bucket:
            assert stored is not None, f"{tid}: no _status.json in s3://{dag.results}/"
            assert stored.get("state") == state, (
                f"{tid}: _status.json says {short_status(stored)}, expected {state}"
            )
            assert xcom_state is not None or states_of(stored) == states_of(xcom), (
                f"{tid}: the bucket's history {states_of(stored)} differs from the XCom's {states_of(xcom)}"
            )
        left = [(c["Names"], c["State"], c["Status"]) for c in run_containers(gpu or self.gpu, tid)]
        assert not left, f"{tid}: ended {state} but its container is still on the Docker host: {left}"
        assert_one_container(events or self.events, tid, settle=settle)
        return xcom, stored


def wait_for_log(api: httpx.Client, dag: DroppedDag, try_number: int, text: str, timeout: float) -> bool:
    """Whether try ``try_number``'s task log shows ``text`` within ``timeout`` (no failure: a hint)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in task_log_text(api, dag, try_number):
            return True
        time.sleep(2)
    return False
