#!/usr/bin/env python3
"""Orchestration overhead: a trivial training run against a plain ``DockerOperator`` of the same container.

Run it from the repository root with the project's virtual environment, after starting the services::

    eval "$(scripts/services up)"
    .venv/bin/python benchmarks/overhead.py                       # 5 repeats, both daemons, a table
    .venv/bin/python benchmarks/overhead.py --profile 3 --json out.json

Each measured run is one ``dag.test()`` of a one-task DAG in a fresh Python process (its own copy of a
migrated SQLite Airflow home), exactly as the integration tests run DAGs:

* **ours**: ``TrainingRunOperator`` with a model zip whose ``run.sh`` is ``echo ok``, the manifest's
  command ``sh run.sh``, resource ``small`` (1 GPU), an EMPTY data bucket, a results bucket, both on the
  local Swift's S3 API through an Airflow ``aws`` connection, ``network_mode="none"``;
* **peer**: ``DockerOperator`` running the same image with ``sh -c 'echo ok'``, ``network_mode="none"``,
  ``mount_tmp_dir=False``, ``auto_remove="success"`` (ours removes its container too), on the same
  Docker daemon; on the GPU daemon it asks for one GPU (``DeviceRequest(count=1)``), as ours does.

Two cases: the plain daemon (no NVIDIA runtime, ``[wmltrain] cpu_fallback = True``: ours probes the
runtime and runs without GPU) and the stand-in GPU daemon (GPUs 0-3: ours probes the runtime, reads the
inventory and leases a GPU).  ours and peer alternate (ours first in even repetitions, the peer first in
odd ones) after one untimed warm-up run of each.  Three times are taken per run:

* ``wall``: the whole ``dag.test()`` process, from its start to its exit (what a user waits for);
* ``ti``: the task instance's ``start_date`` → ``end_date``, read from the run's SQLite database;
* ``execute``: the operator's ``execute()``, between Airflow's task-log markers around it.

``--profile N`` adds N runs of ours (and of the peer) per case with timers wrapped around the provider's
phases, the Docker API calls and the store requests, and prints where ``execute()`` spends its time.
See benchmarks/README.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import io
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WORK_DIR = Path(os.environ.get("WMLTRAIN_BENCH_DIR", "/var/tmp/wmltrain-bench")) / "overhead"
BUCKET_PREFIX = "wmltrain-bench-overhead"
CONN_ID = "wmltrain_bench_s3"
TARGET = 1.2
OURS, PEER = "ours", "peer"
RUN_SH = "echo ok\n"
PROFILE_ENV = "WMLTRAIN_BENCH_PROFILE"


def log(message: str) -> None:
    print(f"[overhead {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A problem that stops the benchmark, with a message for the person running it."""


# --- services -----------------------------------------------------------------------------------------------


def service_env() -> dict[str, str]:
    """``DOCKER_HOST``, ``WMLTRAIN_*``: from the environment, else from ``scripts/services env``."""
    env = dict(os.environ)
    if "WMLTRAIN_S3_ENDPOINT" not in env or "WMLTRAIN_GPU_DOCKER_HOST" not in env:
        try:
            out = subprocess.run(
                [str(REPO / "scripts" / "services"), "env"], capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError) as err:
            raise BenchError(f'no service environment; run: eval "$(scripts/services up)" ({err})') from None
        for line in out.splitlines():
            if line.startswith("export ") and "=" in line:
                name, _, value = line[len("export ") :].partition("=")
                env.setdefault(name, value.strip("'\""))
    needed = (
        "DOCKER_HOST",
        "WMLTRAIN_GPU_DOCKER_HOST",
        "WMLTRAIN_TEST_IMAGE",
        "WMLTRAIN_S3_ENDPOINT",
        "WMLTRAIN_STORE_USER",
        "WMLTRAIN_STORE_KEY",
    )
    missing = [name for name in needed if not env.get(name)]
    if missing:
        raise BenchError(f'{", ".join(missing)} not set; run: eval "$(scripts/services up)"')
    env.setdefault("WMLTRAIN_S3_REGION", "us-east-1")
    return env


def s3_client(env: dict[str, str]) -> Any:
    try:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]
    except ImportError:
        raise BenchError(
            "boto3 is needed for the buckets; run with the project's venv (.venv/bin/python)"
        ) from None
    return boto3.client(
        "s3",
        endpoint_url=env["WMLTRAIN_S3_ENDPOINT"],
        region_name=env["WMLTRAIN_S3_REGION"],
        aws_access_key_id=env["WMLTRAIN_STORE_USER"],
        aws_secret_access_key=env["WMLTRAIN_STORE_KEY"],
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 5, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def empty_and_remove(client: Any, bucket: str, *, patience: float = 60.0) -> int:
    """Delete a bucket's objects one by one (Swift's s3api and DeleteObjects disagree), then the bucket.

    Retried for ``patience`` seconds while the store does not answer (the shared services restarting).
    """
    deadline = time.monotonic() + patience
    while True:
        removed = 0
        try:
            with contextlib.suppress(client.exceptions.NoSuchBucket):
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    for obj in page.get("Contents", []):
                        client.delete_object(Bucket=bucket, Key=obj["Key"])
                        removed += 1
                client.delete_bucket(Bucket=bucket)
            return removed
        except Exception as err:
            if time.monotonic() > deadline:
                raise
            log(f"removing bucket {bucket}: {err}; trying again in 5 s")
            time.sleep(5)


def clean(args: argparse.Namespace) -> int:
    """Remove what an interrupted run left: the ``wmltrain-bench-overhead-*`` buckets and the scratch."""
    env = service_env()
    client = s3_client(env)
    for bucket in client.list_buckets().get("Buckets", []):
        if bucket["Name"].startswith(BUCKET_PREFIX):
            count = empty_and_remove(client, bucket["Name"])
            log(f"removed bucket {bucket['Name']} ({count} objects)")
    for scratch in sorted(args.work_dir.glob("run-*")):  # only what workspace() made there
        shutil.rmtree(scratch, ignore_errors=True)
        log(f"removed {scratch}")
    return 0


# --- the two cases and the DAG files ------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One Docker daemon and how both operators use it."""

    key: str
    title: str
    docker_url: str
    env: dict[str, str]
    peer_gpu: bool


def make_cases(env: dict[str, str], keys: Sequence[str]) -> list[Case]:
    cases = {
        "cpu": Case(
            "cpu",
            "plain daemon, CPU fallback",
            env["DOCKER_HOST"],
            {"AIRFLOW__WMLTRAIN__CPU_FALLBACK": "True"},
            peer_gpu=False,
        ),
        "gpu": Case(
            "gpu",
            "stand-in GPU daemon, 1 GPU",
            env["WMLTRAIN_GPU_DOCKER_HOST"],
            {},
            peer_gpu=True,
        ),
    }
    return [cases[k] for k in keys]


_DAG_HEAD = """\
import time

T_START = time.time()
import json
import os
import sys
from datetime import datetime

from airflow.sdk import DAG
"""

_DAG_MAIN = """
if __name__ == "__main__":
    profile = None
    if os.environ.get({profile_env!r}):
        sys.path.insert(0, {bench_dir!r})
        import overhead

        profile = overhead.install_profiler()
    t_parsed = time.time()
    dr = dag.test()
    t_tested = time.time()
    states = {{ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in dr.get_task_instances()}}
    facts = {{"t_start": T_START, "t_parsed": t_parsed, "t_tested": t_tested, "states": states}}
    print("BENCH=" + json.dumps(facts), flush=True)
    if profile is not None:
        print("PROFILE=" + json.dumps(profile.snapshot()), flush=True)
        print("PROFILE_MISSING=" + json.dumps(profile.missing), flush=True)
"""


def dag_source(dag_id: str, imports: str, task: str) -> str:
    body = f"\nwith DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1)) as dag:\n"
    body += textwrap.indent(task, "    ") + "\n"
    main = _DAG_MAIN.format(profile_env=PROFILE_ENV, bench_dir=str(BENCH_DIR))
    return _DAG_HEAD + imports + body + main


def training_manifest(data_bucket: str, results_bucket: str) -> dict[str, Any]:
    connection = {"conn_id": CONN_ID}
    return {
        "model_definition": {
            "name": "overhead",
            "framework": {"name": "busybox", "version": "1"},
            "execution": {"command": "sh run.sh", "resource": "small"},
        },
        "training_data_reference": [
            {"connection": connection, "source": {"bucket": data_bucket, "type": "s3"}}
        ],
        "training_results_reference": {
            "connection": connection,
            "target": {"bucket": results_bucket, "type": "s3"},
        },
    }


def write_dags(
    work: Path, case: Case, manifest: dict[str, Any], zip_path: Path, image: str
) -> dict[str, Path]:
    """One folder (the DAGs folder of its runs) holding one DAG file, per operator."""
    ours_task = (
        f"TrainingRunOperator(\n    task_id='train',\n    manifest={manifest!r},\n"
        f"    model_definition={str(zip_path)!r},\n    network_mode='none',\n"
        f"    docker_url={case.docker_url!r},\n)"
    )
    device = (
        "\n    device_requests=[DeviceRequest(count=1, capabilities=[['gpu']])]," if case.peer_gpu else ""
    )
    peer_task = (
        f"DockerOperator(\n    task_id='train',\n    image={image!r},\n    command=['sh', '-c', 'echo ok'],\n"
        f"    network_mode='none',\n    docker_url={case.docker_url!r},\n    mount_tmp_dir=False,\n"
        f"    auto_remove='success',{device}\n)"
    )
    sources = {
        OURS: dag_source(
            f"overhead_{case.key}_ours",
            "from airflow_wmltrain.operators.training_run import TrainingRunOperator\n",
            ours_task,
        ),
        PEER: dag_source(
            f"overhead_{case.key}_peer",
            "from airflow.providers.docker.operators.docker import DockerOperator\n"
            + ("from docker.types import DeviceRequest\n" if case.peer_gpu else ""),
            peer_task,
        ),
    }
    paths = {}
    for who, source in sources.items():
        folder = work / f"dags-{case.key}-{who}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"overhead_{case.key}_{who}.py"
        path.write_text(source)
        paths[who] = path
    return paths


def model_zip(path: Path) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("run.sh", RUN_SH)
    path.write_bytes(buffer.getvalue())
    return path


# --- one run ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One ``dag.test()`` process."""

    case: str
    who: str
    repetition: int  # -1: warm-up
    profiled: bool
    ok: bool
    wall_s: float
    ti_s: float | None
    execute_s: float | None
    startup_s: float | None  # process start -> DAG file imported (interpreter, Airflow, the operator)
    dag_test_s: float | None  # dag.test() itself
    exit_s: float | None  # dag.test() returned -> process gone (interpreter shutdown)
    state: str
    profile: dict[str, list[float]] = field(default_factory=dict)
    profile_missing: list[str] = field(default_factory=list)
    error: str = ""


_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z ")


def _stamp(line: str) -> float | None:
    match = _TIMESTAMP.match(line)
    if not match:
        return None
    return datetime.fromisoformat(match.group(1) + "+00:00").timestamp()


def execute_seconds(output: str) -> float | None:
    """``execute()``: from the ``::endgroup::`` that closes Airflow's pre-execute group (after "Task
    started") to the ``::group::Post Execute`` line of the task runner."""
    started = begin = end = None
    for line in output.splitlines():
        if started is None:
            if "Task started" in line:
                started = True
            continue
        if begin is None and "::endgroup::" in line and "task_runner.py" in line:
            begin = _stamp(line)
        elif begin is not None and "::group::Post Execute" in line:
            end = _stamp(line)
            break
    return end - begin if begin is not None and end is not None else None


def ti_seconds(db: Path, dag_id: str) -> tuple[str, float | None]:
    """The task instance's state and ``end_date - start_date`` from the run's SQLite database."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute(
            "SELECT state, start_date, end_date FROM task_instance WHERE dag_id = ? AND task_id = 'train'",
            (dag_id,),
        ).fetchone()
    if row is None:
        return "missing", None
    state, start, end = row
    if not start or not end:
        return str(state), None
    return str(state), (datetime.fromisoformat(str(end)) - datetime.fromisoformat(str(start))).total_seconds()


class Runner:
    def __init__(self, work: Path, template: Path, env: dict[str, str], timeout: float, keep: bool) -> None:
        self.work = work
        self.template = template
        self.env = env
        self.timeout = timeout
        self.keep = keep
        self.count = 0

    def run(self, case: Case, who: str, dag_file: Path, repetition: int, *, profiled: bool = False) -> Run:
        self.count += 1
        home = self.work / "homes" / f"{self.count:03d}-{case.key}-{who}"
        shutil.copytree(self.template, home)
        env = {
            **self.env,
            **case.env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dag_file.parent),
        }
        if profiled:
            env[PROFILE_ENV] = "1"
        else:
            env.pop(PROFILE_ENV, None)
        out_path = home / "dag-test.log"
        with out_path.open("wb") as out:
            started = time.time()
            clock = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, str(dag_file)], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
            )
            try:
                code = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = -9
            wall = time.perf_counter() - clock
            ended = time.time()
        output = out_path.read_text(errors="replace")
        facts: dict[str, Any] = {}
        profile: dict[str, list[float]] = {}
        missing: list[str] = []
        for line in output.splitlines():
            if line.startswith("BENCH="):
                facts = json.loads(line[len("BENCH=") :])
            elif line.startswith("PROFILE="):
                profile = json.loads(line[len("PROFILE=") :])
            elif line.startswith("PROFILE_MISSING="):
                missing = json.loads(line[len("PROFILE_MISSING=") :])
        dag_id = dag_file.stem
        state, ti = ti_seconds(home / "airflow.db", dag_id)
        ok = code == 0 and state == "success" and facts.get("states") == {"train": "success"}
        result = Run(
            case=case.key,
            who=who,
            repetition=repetition,
            profiled=profiled,
            ok=ok,
            wall_s=wall,
            ti_s=ti,
            execute_s=execute_seconds(output),
            startup_s=facts["t_parsed"] - started if facts else None,
            dag_test_s=facts["t_tested"] - facts["t_parsed"] if facts else None,
            exit_s=ended - facts["t_tested"] if facts else None,
            state=state,
            profile=profile,
            profile_missing=missing,
            error="" if ok else f"exit {code}, TI {state}; log: {out_path}",
        )
        if not ok:
            log(f"run {home.name} FAILED ({result.error}):\n{output[-3000:]}")
        elif not self.keep:
            shutil.rmtree(home, ignore_errors=True)
        return result


# --- the profiler (loaded into the dag.test() process when WMLTRAIN_BENCH_PROFILE is set) -------------------


class Profile:
    """Wall time and calls per label, summed over the process (inclusive: nested labels overlap)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.totals: dict[str, list[float]] = {}  # label -> [calls, seconds]
        self.missing: list[str] = []  # points the code no longer has

    def add(self, label: str, seconds: float) -> None:
        with self._lock:
            entry = self.totals.setdefault(label, [0.0, 0.0])
            entry[0] += 1
            entry[1] += seconds

    def snapshot(self) -> dict[str, list[float]]:
        with self._lock:
            return {k: list(v) for k, v in self.totals.items()}

    def timed(self, label: str | Callable[..., str], function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            clock = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                name = label(*args, **kwargs) if callable(label) else label
                self.add(name, time.perf_counter() - clock)

        return wrapper

    def wrap(self, owner: Any, attr: str, label: str | Callable[..., str]) -> None:
        raw = inspect.getattr_static(owner, attr) if isinstance(owner, type) else getattr(owner, attr)
        if isinstance(raw, classmethod):
            setattr(owner, attr, classmethod(self.timed(label, raw.__func__)))
        elif isinstance(raw, staticmethod):
            setattr(owner, attr, staticmethod(self.timed(label, raw.__func__)))
        else:
            setattr(owner, attr, self.timed(label, raw))


#: (module, owner within it or "", attribute, label). Labels starting with "docker " or "store " are the
#: calls to the daemon and to the object store; the others are phases of the operator (ours only).
PROFILE_POINTS: tuple[tuple[str, str, str, str], ...] = (
    ("airflow_wmltrain.submission", "", "check_submission", "validate the zip and manifest"),
    ("airflow_wmltrain.links.training_run", "TrainingResultsLink", "persist", "results link XComs"),
    ("airflow_wmltrain.runtime.run", "", "open_store", "open a store (S3Hook, connection)"),
    ("airflow_wmltrain.storage.s3", "S3Store", "from_hook", "S3Store.from_hook (hook.conn_region_name)"),
    (
        "airflow.providers.amazon.aws.hooks.base_aws",
        "AwsGenericHook",
        "_get_caller",
        "amazon provider user agent: inspect.stack()",
    ),
    ("airflow_wmltrain.storage.s3", "S3Store", "credentials", "store credentials (1st: botocore session)"),
    ("airflow_wmltrain.runtime.run", "TrainingRun", "_write_status", "status document (PUT + XCom)"),
    (
        "airflow_wmltrain.hooks.docker",
        "TrainingDockerHook",
        "find_run_container",
        "re-attach check (inspect by name)",
    ),
    ("airflow_wmltrain.hooks.docker", "TrainingDockerHook", "ensure_image", "image present?"),
    ("airflow_wmltrain.runtime.gpus", "", "has_nvidia_runtime", "NVIDIA runtime probe"),
    ("airflow_wmltrain.runtime.gpus", "", "_run_probe", "probe container (create/start/wait/logs/rm)"),
    ("airflow_wmltrain.runtime.gpus", "", "gpu_inventory", "GPU inventory (daemon label)"),
    ("airflow_wmltrain.runtime.gpus", "", "try_allocate_gpus", "GPU lease: allocate"),
    ("airflow_wmltrain.runtime.gpus", "", "release_leases", "GPU lease: release"),
    ("airflow_wmltrain.runtime.run", "TrainingRun", "download", "DOWNLOADING: stage + store zip/manifest"),
    ("airflow_wmltrain.runtime.run", "", "stage", "staging the (empty) data bucket"),
    ("airflow_wmltrain.model_definition", "ModelDefinition", "extract", "extract the model zip"),
    (
        "airflow_wmltrain.operators.training_run",
        "TrainingRunOperator",
        "_create_and_start",
        "start container",
    ),
    ("airflow_wmltrain.hooks.docker", "TrainingDockerHook", "follow_logs", "follow the container log"),
    ("airflow_wmltrain.runtime.run", "TrainingRun", "store", "STORING: logs, results, end, remove"),
    ("airflow_wmltrain.hooks.docker", "TrainingDockerHook", "save_logs", "save the container log"),
    ("airflow_wmltrain.runtime.run", "TrainingRun", "_upload", "upload results/logs"),
    ("airflow_wmltrain.hooks.docker", "TrainingDockerHook", "remove", "remove the container"),
    ("airflow_wmltrain.runtime.workspace", "Workspace", "remove", "remove the workspace"),
    ("airflow.sdk.execution_time.task_runner", "RuntimeTaskInstance", "xcom_push", "XCom push (API call)"),
    ("docker.api.client", "APIClient", "__init__", "docker client (version)"),
    ("docker.api.client", "APIClient", "ping", "docker ping"),
    ("docker.api.client", "APIClient", "info", "docker info"),
    ("docker.api.client", "APIClient", "images", "docker images"),
    ("docker.api.client", "APIClient", "inspect_image", "docker inspect image"),
    ("docker.api.client", "APIClient", "containers", "docker list containers"),
    ("docker.api.client", "APIClient", "create_container", "docker create"),
    ("docker.api.client", "APIClient", "start", "docker start"),
    ("docker.api.client", "APIClient", "attach", "docker attach"),
    ("docker.api.client", "APIClient", "wait", "docker wait"),
    ("docker.api.client", "APIClient", "logs", "docker logs"),
    ("docker.api.client", "APIClient", "inspect_container", "docker inspect container"),
    ("docker.api.client", "APIClient", "remove_container", "docker remove"),
)


def _store_label(_self: Any, method: str, *_args: Any, **_kwargs: Any) -> str:
    return f"store {method}"


def install_profiler() -> Profile:
    """Wrap :data:`PROFILE_POINTS` and the store's requests with timers (in the ``dag.test()`` process)."""
    import importlib

    profile = Profile()
    for module_name, owner_name, attr, label in PROFILE_POINTS:
        try:
            module = importlib.import_module(module_name)
            owner = getattr(module, owner_name) if owner_name else module
            profile.wrap(owner, attr, label)
        except (ImportError, AttributeError):  # the code moved: say so in the report, measure the rest
            profile.missing.append(f"{module_name}:{owner_name + '.' if owner_name else ''}{attr}")
    from airflow_wmltrain.storage.base import ObjectStore

    profile.wrap(ObjectStore, "request", _store_label)
    return profile


# --- statistics and the report ------------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


MEASURES = (
    ("wall_s", "dag.test() process"),
    ("ti_s", "task instance"),
    ("execute_s", "execute()"),
)


def summarize(runs: Sequence[Run], cases: Sequence[Case]) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        timed = [r for r in runs if r.case == case.key and r.repetition >= 0 and not r.profiled]
        row: dict[str, Any] = {"case": case.key, "title": case.title, "docker_url": case.docker_url}
        row["failed"] = sum(1 for r in timed if not r.ok)
        for measure, _title in (*MEASURES, ("startup_s", ""), ("dag_test_s", ""), ("exit_s", "")):
            for who in (OURS, PEER):
                values = [getattr(r, measure) for r in timed if r.who == who and r.ok]
                row[f"{who}_{measure}"] = median(values)
                row[f"{who}_{measure}_runs"] = values
            row[f"ratio_{measure}"] = ratio(row[f"ours_{measure}"], row[f"peer_{measure}"])
            row[f"extra_{measure}"] = (
                row[f"ours_{measure}"] - row[f"peer_{measure}"]
                if row[f"ours_{measure}"] is not None and row[f"peer_{measure}"] is not None
                else None
            )
        rows.append(row)
    return rows


def summarize_profile(runs: Sequence[Run], cases: Sequence[Case]) -> dict[str, list[dict[str, Any]]]:
    """Per case: every label's median seconds and calls per run, ours and peer."""
    out: dict[str, list[dict[str, Any]]] = {}
    for case in cases:
        profiled = {
            who: [r for r in runs if r.case == case.key and r.who == who and r.profiled and r.ok]
            for who in (OURS, PEER)
        }
        if not profiled[OURS]:
            continue
        labels = sorted({label for r in profiled[OURS] + profiled[PEER] for label in r.profile})
        items = []
        for label in labels:
            item: dict[str, Any] = {"label": label}
            for who, group in profiled.items():
                item[f"{who}_s"] = (
                    median([r.profile.get(label, [0.0, 0.0])[1] for r in group]) if group else None
                )
                item[f"{who}_calls"] = (
                    median([r.profile.get(label, [0.0, 0.0])[0] for r in group]) if group else None
                )
            items.append(item)
        for who, group in profiled.items():
            items.append(
                {
                    "label": "execute() (task-log markers)",
                    f"{who}_s": median([r.execute_s for r in group]),
                    f"{who}_calls": 1.0 if group else None,
                }
            )
        merged: dict[str, dict[str, Any]] = {}
        for item in items:
            merged.setdefault(item["label"], {"label": item["label"]}).update(item)
        out[case.key] = sorted(merged.values(), key=lambda i: -(i.get("ours_s") or 0.0))
    return out


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def _calls(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def markdown(
    rows: Sequence[dict[str, Any]], profile: dict[str, list[dict[str, Any]]], meta: dict[str, Any]
) -> str:
    lines = [
        f"Medians of {meta['repeat']} alternating runs per operator (after {meta['warmup']} warm-up run(s) "
        "each); seconds. *extra* = ours − peer.",
        "",
        "| case | measure | ours s | peer s | extra s | ours ÷ peer | target ≤ 1.2× |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        for measure, title in MEASURES:
            r = row[f"ratio_{measure}"]
            verdict = "—" if r is None else ("met" if r <= TARGET else "missed")
            lines.append(
                f"| {row['title']} | {title} | {_s(row[f'ours_{measure}'])} | {_s(row[f'peer_{measure}'])} | "
                f"{_s(row[f'extra_{measure}'])} | {_x(r)} | {verdict} |"
            )
    lines += [
        "",
        "Where the process time goes (medians, s): start-up = interpreter + imports + DAG file; "
        "dag.test() = DAG sync, run, task; exit = interpreter shutdown.",
        "",
        "| case | who | start-up | dag.test() | exit | runs: process wall (s) | runs: task instance (s) |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        for who in (OURS, PEER):
            walls = ", ".join(_s(v) for v in row[f"{who}_wall_s_runs"])
            tis = ", ".join(_s(v) for v in row[f"{who}_ti_s_runs"])
            lines.append(
                f"| {row['title']} | {who} | {_s(row[f'{who}_startup_s'])} | "
                f"{_s(row[f'{who}_dag_test_s'])} | {_s(row[f'{who}_exit_s'])} | {walls} | {tis} |"
            )
    for key, items in profile.items():
        title = next(r["title"] for r in rows if r["case"] == key) if rows else key
        lines += [
            "",
            f"Profile, {title}: median ms and calls per run over {meta['profile']} profiled run(s) each "
            "(inclusive times: phases contain the docker/store calls below them).",
            "",
            "| what | ours ms | ours calls | peer ms | peer calls |",
            "|---|---:|---:|---:|---:|",
        ]
        for item in items:
            if not (item.get("ours_s") or item.get("peer_s")):
                continue
            cells = [
                f"{_ms(item.get(f'{who}_s'))} | {_calls(item.get(f'{who}_calls'))}"
                if item.get(f"{who}_calls")
                else "— | —"
                for who in (OURS, PEER)
            ]
            lines.append(f"| {item['label']} | {cells[0]} | {cells[1]} |")
    missing = meta.get("profile_missing") or []
    if missing:
        lines += ["", f"Not timed (the code no longer has them): {', '.join(missing)}"]
    lines += ["", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in meta["machine"].items()]
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines)


def machine_facts(env: dict[str, str]) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        facts["load average (1/5/15 min) at the end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        facts["apache-airflow"] = version("apache-airflow")
        facts["apache-airflow-providers-docker"] = version("apache-airflow-providers-docker")
        facts["docker (python)"] = version("docker")
    with contextlib.suppress(Exception):
        import docker

        for name in ("DOCKER_HOST", "WMLTRAIN_GPU_DOCKER_HOST"):
            client = docker.APIClient(base_url=env[name])
            facts[f"dockerd at {env[name]}"] = client.version().get("Version", "?")
            client.close()
    with contextlib.suppress(OSError):
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "airflow_wmltrain"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        facts["airflow_wmltrain"] = rev + (" (airflow_wmltrain/ modified)" if dirty else "")
    return facts


# --- the benchmark ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(args: argparse.Namespace) -> Iterator[Path]:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=args.work_dir))
    try:
        yield work
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def migrate(template: Path, env: dict[str, str]) -> None:
    template.mkdir(parents=True)
    menv = {**env, "AIRFLOW_HOME": str(template)}
    menv["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{template}/airflow.db"
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env=menv,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"airflow db migrate failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def check_daemons(env: dict[str, str], cases: Sequence[Case]) -> None:
    try:
        import docker
    except ImportError:
        raise BenchError("the docker package is missing; run with the project's venv") from None
    for case in cases:
        try:
            client = docker.APIClient(base_url=case.docker_url, timeout=30)
            client.inspect_image(env["WMLTRAIN_TEST_IMAGE"])
            client.close()
        except Exception as err:
            raise BenchError(
                f"{case.docker_url} does not answer or lacks {env['WMLTRAIN_TEST_IMAGE']} ({err}); run: "
                'eval "$(scripts/services up)"'
            ) from None


def benchmark(args: argparse.Namespace) -> int:
    env = service_env()
    cases = make_cases(env, args.cases)
    check_daemons(env, cases)
    client = s3_client(env)
    tag = uuid.uuid4().hex[:8]
    data_bucket, results_bucket = f"{BUCKET_PREFIX}-data-{tag}", f"{BUCKET_PREFIX}-res-{tag}"
    runs: list[Run] = []
    started = time.perf_counter()
    with workspace(args) as work:
        template = work / "template-home"
        base_env = {
            **env,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__WMLTRAIN__FRAMEWORKS": json.dumps(
                {"busybox": {"1": {"image": env["WMLTRAIN_TEST_IMAGE"]}}}
            ),
            "AIRFLOW__WMLTRAIN__STAGING_DIR": str(work / "staging"),
            f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(
                {
                    "conn_type": "aws",
                    "login": env["WMLTRAIN_STORE_USER"],
                    "password": env["WMLTRAIN_STORE_KEY"],
                    "extra": {
                        "endpoint_url": env["WMLTRAIN_S3_ENDPOINT"],
                        "region_name": env["WMLTRAIN_S3_REGION"],
                    },
                }
            ),
        }
        for name in ("AIRFLOW__WMLTRAIN__CPU_FALLBACK", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY"):
            base_env.pop(name, None)
        log("migrating a template Airflow home (SQLite)")
        migrate(template, base_env)
        for bucket in (data_bucket, results_bucket):
            client.create_bucket(Bucket=bucket)
        try:
            zip_path = model_zip(work / "model.zip")
            manifest = training_manifest(data_bucket, results_bucket)
            dags = {c.key: write_dags(work, c, manifest, zip_path, env["WMLTRAIN_TEST_IMAGE"]) for c in cases}
            runner = Runner(work, template, base_env, args.timeout, args.keep)

            def one(case: Case, who: str, repetition: int, *, profiled: bool = False) -> Run:
                result = runner.run(case, who, dags[case.key][who], repetition, profiled=profiled)
                what = "warm-up" if repetition < 0 else ("profile" if profiled else f"rep {repetition + 1}")
                log(
                    f"{case.key:3} {who:4} {what:8} wall {result.wall_s:6.2f} s  TI {_s(result.ti_s)} s  "
                    f"execute {_s(result.execute_s)} s{'' if result.ok else '  FAILED'}"
                )
                runs.append(result)
                return result

            for case in cases:
                for _ in range(args.warmup):
                    for who in (OURS, PEER):
                        one(case, who, -1)
            for repetition in range(args.repeat):
                for case in cases:
                    for who in (OURS, PEER) if repetition % 2 == 0 else (PEER, OURS):
                        one(case, who, repetition)
            for repetition in range(args.profile):
                for case in cases:
                    for who in (OURS, PEER) if repetition % 2 == 0 else (PEER, OURS):
                        one(case, who, repetition, profiled=True)
        finally:
            for bucket in (data_bucket, results_bucket):
                try:
                    empty_and_remove(client, bucket)
                except Exception as err:
                    log(f"could not remove bucket {bucket}: {err}")
    rows = summarize(runs, cases)
    profile = summarize_profile(runs, cases)
    meta = {
        "repeat": args.repeat,
        "warmup": args.warmup,
        "profile": args.profile,
        "cases": args.cases,
        "target": TARGET,
        "total_seconds": round(time.perf_counter() - started, 1),
        "machine": machine_facts(env),
        "command": " ".join(["python", "benchmarks/overhead.py", *args.argv]),
        "profile_missing": sorted({m for r in runs for m in r.profile_missing}),
    }
    meta["machine"]["benchmark wall time"] = f"{meta['total_seconds']:.0f} s"
    document = {"meta": meta, "summary": rows, "profile": profile, "runs": [asdict(r) for r in runs]}
    if args.json == "-":
        print(json.dumps(document, indent=2, default=str))
    else:
        print(markdown(rows, profile, meta))
        if args.json:
            Path(args.json).write_text(json.dumps(document, indent=2, default=str) + "\n")
            log(f"raw numbers written to {args.json}")
    return 1 if any(not r.ok for r in runs) else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Orchestration overhead of TrainingRunOperator against a plain DockerOperator "
        "(same trivial container, dag.test() in subprocesses).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=["run", "clean"],
        help="run the benchmark; clean: remove the buckets and scratch an interrupted run left",
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per operator and case (medians)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per operator and case first")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="extra runs per operator and case with timers around the phases",
    )
    parser.add_argument(
        "--cases", default="cpu,gpu", help="cpu (plain daemon, CPU fallback), gpu (GPU daemon)"
    )
    parser.add_argument(
        "--json", default=None, help="write the raw numbers to this file ('-': stdout, no table)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="scratch (Airflow homes, staging)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one dag.test() may take")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory and every run's home")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.cases or any(c not in ("cpu", "gpu") for c in args.cases):
        parser.error("--cases takes cpu, gpu or cpu,gpu")
    if args.repeat < 1 or args.warmup < 0 or args.profile < 0:
        parser.error("--repeat must be at least 1, --warmup and --profile at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return clean(args) if args.command == "clean" else benchmark(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
