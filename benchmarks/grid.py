"""How close a grid of short training runs comes to keeping 4 GPUs busy, against plain ``DockerOperator``.

Issue 11's target: a mapped ``TrainingRunOperator`` of N runs of about ``--seconds`` of work each, on the
services' stand-in GPU daemon (4 GPUs) through the services' real Airflow (LocalExecutor, PostgreSQL),
finishes within 1.10 × the ideal (Σ run seconds ÷ 4) with no two runs on one GPU at once. The peer: the same
N containers as a mapped plain ``DockerOperator`` in a pool of 4 slots, on the same daemon, in the same
invocation (run one after the other, ours first).

Ours is written as a user writes a grid: ``TrainingRunOperator.partial(...).expand(hyperparameters=...)``,
``deferrable=True`` with the deployment's ``poll_interval`` (``--poll-interval`` to override), the Docker
host's GPU pool made by the project's pool helper (:func:`airflow_wmltrain.service.pools.sync_pools`, what
``wmltrain pools`` runs: 4 slots, ``include_deferred``), ``pool_slots("small")``, a data bucket of
``--objects`` small objects (staging is real but small), and ``retries=2`` (Airflow 3.3 may fail a deferred
task whose trigger fires within seconds: apache/airflow#66374, #71580; a retry re-attaches to the run, and
the report counts tries).

Each run's interval on its GPU comes from the GPU daemon's container ``start`` and ``die`` events
(:class:`tests.faults.fault_helpers.CreateEvents`), its GPU from the container (ours: the device ids of its
GPU request, checked against the run's status; the peer: ``$NVIDIA_VISIBLE_DEVICES`` printed by the
container, its XCom). Run from the repository root, with the services up::

    eval "$(scripts/services env)"
    .venv/bin/python benchmarks/grid.py [--n 32] [--seconds 5] [--json FILE]

The DAG files, the pools, the buckets and the containers it made are removed at the end (also on Ctrl-C);
``python benchmarks/grid.py clean`` removes what an interrupted run left (DAG files and pools by name).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.faults.fault_helpers import CreateEvents

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the tests' helpers, and the working tree's package

SERVICES_VARS = (
    "WMLTRAIN_GPU_DOCKER_HOST",
    "WMLTRAIN_TEST_IMAGE",
    "WMLTRAIN_S3_ENDPOINT",
    "WMLTRAIN_STORE_USER",
    "WMLTRAIN_STORE_KEY",
    "WMLTRAIN_SERVICES_DIR",
    "WMLTRAIN_AIRFLOW_URL",
    "WMLTRAIN_AIRFLOW_USER",
    "WMLTRAIN_AIRFLOW_PASSWORD",
    "WMLTRAIN_AIRFLOW_TEST_DAGS",
    "WMLTRAIN_AIRFLOW_HOME",
)
POOL_PREFIX = "wmltrain_bench_grid_"
OURS_KIND = "bench_grid"  # its DAG id: wmltrain_fault_bench_grid_<key> (the fault tests' drop_dag)
PEER_PREFIX = "wmltrain_bench_grid_peer_"
TARGET = 1.10
SIDES = ("ours", "peer", "ours-sync", "ours-ahead")
GPUS = 4

PEER_DAG = """\
from datetime import datetime

from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk import DAG
from docker.types import DeviceRequest

with DAG(dag_id={dag_id!r}, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         tags=["wmltrain-bench"]):
    DockerOperator.partial(
        task_id="train",
        image={image!r},
        docker_url={docker_url!r},
        network_mode="none",
        mount_tmp_dir=False,
        auto_remove="success",
        device_requests=[DeviceRequest(count=1, capabilities=[["gpu"]])],
        container_name={container!r} + "-{{{{ ti.map_index }}}}",
        pool={pool!r},
        pool_slots=1,
    ).expand(command={commands!r})
"""
# The peer's container: as times.sh of ours, ~$1 seconds, then its GPU as the last line (its XCom).
PEER_SH = 'echo "training on GPU(s) $NVIDIA_VISIBLE_DEVICES"; sleep {seconds}; echo "$NVIDIA_VISIBLE_DEVICES"'


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def epoch(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- results ----------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run of a grid: its task instance, its container's times on the GPU daemon, its GPU."""

    index: int
    container: str
    state: str = "?"
    tries: int = 0
    gpu: str = "?"
    ti_start: float | None = None
    ti_end: float | None = None
    created: float | None = None
    started: float | None = None
    died: float | None = None
    history: dict[str, float] = field(default_factory=dict)  # ours: the run status's states
    logged: dict[str, float] = field(default_factory=dict)  # ours: from the task's and trigger's logs

    @property
    def seconds(self) -> float | None:
        return self.died - self.started if self.started is not None and self.died is not None else None

    def between(self, a: float | None, b: float | None) -> float | None:
        return b - a if a is not None and b is not None else None


@dataclass
class Grid:
    """One side's measurement."""

    who: str
    dag_id: str
    run_id: str = ""
    state: str = "?"
    triggered: float = 0.0
    dag_start: float | None = None
    dag_end: float | None = None
    runs: list[Run] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    others: int = 0  # run containers of anybody else on the daemon meanwhile
    load_before: str = ""
    load_after: str = ""
    restarted: list[str] = field(default_factory=list)  # Airflow processes restarted meanwhile

    def summary(self, gpus: int = GPUS) -> dict[str, Any]:
        seconds = [r.seconds for r in self.runs if r.seconds is not None]
        total = sum(seconds)
        ideal = total / gpus if seconds else None
        starts = [r.started for r in self.runs if r.started is not None]
        deaths = [r.died for r in self.runs if r.died is not None]
        dag_span = self.dag_end - self.dag_start if self.dag_end and self.dag_start else None
        gpu_span = max(deaths) - min(starts) if starts and deaths else None
        return {
            "n": len(self.runs),
            "completed": sum(1 for r in self.runs if r.state == "success"),
            "retried": sum(1 for r in self.runs if r.tries > 1),
            "containers": len(seconds),
            "run_s_total": total,
            "run_s_median": median(seconds),
            "ideal_s": ideal,
            "makespan_s": dag_span,
            "ratio": dag_span / ideal if dag_span and ideal else None,
            "gpu_span_s": gpu_span,
            "gpu_span_ratio": gpu_span / ideal if gpu_span and ideal else None,
            "trigger_to_first_container_s": min(starts) - self.triggered if starts else None,
            "last_container_to_dag_end_s": self.dag_end - max(deaths) if deaths and self.dag_end else None,
            "overlaps": len(self.overlaps),
            "gpus_used": sorted({r.gpu for r in self.runs}),
            "others_run_containers": self.others,
            "phases": self.phases(gpus),
            "load_before": self.load_before,
            "load_after": self.load_after,
            "airflow_restarted": self.restarted,
            "gpu_lease_waits_s": [r.logged["gpu_wait"] for r in self.runs if "gpu_wait" in r.logged],
        }

    def phases(self, gpus: int) -> dict[str, float | None]:
        """Medians of where a run's slot time goes (seconds)."""
        runs = self.runs
        # A slot freed by the k-th task to end is taken by the (k + gpus)-th to start: the gap between
        # them is the scheduler's hand-over (pool slots = GPUs; every run takes one slot).
        ends = sorted(r.ti_end for r in runs if r.ti_end is not None)
        starts = sorted(r.ti_start for r in runs if r.ti_start is not None)
        handover = [s - e for s, e in zip(starts[gpus:], ends, strict=False)]
        phases: dict[str, float | None] = {
            # (meaningless where the pool has more slots than GPUs: ours-ahead)
            "slot hand-over (a task ends → the next starts)": None
            if self.who == "ours-ahead"
            else median(handover),
            "task slot time (task start → end)": median([r.between(r.ti_start, r.ti_end) for r in runs]),
        }
        if self.who.startswith("ours"):
            h = [r.history for r in runs]
            # What the ratio charges per run: a GPU idle between one run's end and the next one's start.
            idle: list[float | None] = []
            for gpu in {r.gpu for r in runs}:
                on_gpu = sorted(
                    (r for r in runs if r.gpu == gpu and r.started and r.died), key=lambda r: r.started
                )
                idle += [b.between(a.died, b.started) for a, b in itertools.pairwise(on_gpu)]
            phases["GPU idle between two runs (died → next started)"] = median(idle)
            phases |= {
                "task start → staging (DOWNLOADING)": median(
                    [r.between(r.ti_start, x.get("DOWNLOADING")) for r, x in zip(runs, h, strict=True)]
                ),
                "staging, GPU lease (DOWNLOADING → container created)": median(
                    [r.between(x.get("DOWNLOADING"), r.created) for r, x in zip(runs, h, strict=True)]
                ),
                "container start (created → started)": median(
                    [r.between(r.created, r.started) for r in runs]
                ),
                "run (started → died)": median([r.seconds for r in runs]),
                "end noticed (died → STORING)": median(
                    [r.between(r.died, x.get("STORING")) for r, x in zip(runs, h, strict=True)]
                ),
                "… deferred → trigger fired": median(
                    [r.between(r.logged.get("deferred"), r.logged.get("fired")) for r in runs]
                ),
                "… container died → trigger fired": median(
                    [r.between(r.died, r.logged.get("fired")) for r in runs]
                ),
                "… trigger fired → task resumed": median(
                    [r.between(r.logged.get("fired"), r.logged.get("resumed")) for r in runs]
                ),
                "… task resumed → STORING": median(
                    [
                        r.between(r.logged.get("resumed"), x.get("STORING"))
                        for r, x in zip(runs, h, strict=True)
                    ]
                ),
                "storing (STORING → COMPLETED)": median(
                    [r.between(x.get("STORING"), x.get("COMPLETED")) for x, r in zip(h, runs, strict=True)]
                ),
                "task end (COMPLETED → task end)": median(
                    [r.between(x.get("COMPLETED"), r.ti_end) for r, x in zip(runs, h, strict=True)]
                ),
            }
        else:
            phases |= {
                "task start → container created": median([r.between(r.ti_start, r.created) for r in runs]),
                "container start (created → started)": median(
                    [r.between(r.created, r.started) for r in runs]
                ),
                "run (started → died)": median([r.seconds for r in runs]),
                "task end (died → task end)": median([r.between(r.died, r.ti_end) for r in runs]),
            }
        return phases


# --- the services -----------------------------------------------------------------------------------------


def run_cleanups(cleanups: list[tuple[str, Callable[[], None]]]) -> None:
    """Undo what a benchmark made, last first; a failing step is logged and the others still run."""
    for what, cleanup in reversed(cleanups):
        try:
            cleanup()
        except Exception as err:
            log(f"clean-up of {what} failed: {type(err).__name__}: {err}")
    cleanups.clear()


def services_clients(services: dict[str, str]) -> tuple[Any, Any]:
    """The services' Airflow REST API (``AirflowApi``) and a boto3 S3 client of their store."""
    import boto3
    from botocore.config import Config

    from airflow_wmltrain.service.api import AirflowApi

    rest = AirflowApi(
        services["WMLTRAIN_AIRFLOW_URL"],
        services["WMLTRAIN_AIRFLOW_USER"],
        services["WMLTRAIN_AIRFLOW_PASSWORD"],
    )
    s3 = boto3.client(
        "s3",
        endpoint_url=services["WMLTRAIN_S3_ENDPOINT"],
        aws_access_key_id=services["WMLTRAIN_STORE_USER"],
        aws_secret_access_key=services["WMLTRAIN_STORE_KEY"],
        region_name=services.get("WMLTRAIN_S3_REGION", "us-east-1"),
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=32),
    )
    return rest, s3


class Bench:
    """The services' clients and everything the benchmark made, removed by :meth:`clean_up`."""

    def __init__(self, services: dict[str, str]) -> None:
        import docker

        from tests.faults.fault_helpers import CreateEvents
        from tests.integration.service_helpers import api_client

        self.services = services
        self.api = api_client(services)
        self.rest, self.s3 = services_clients(services)
        self.docker_url = services["WMLTRAIN_GPU_DOCKER_HOST"]
        self.gpu = docker.APIClient(base_url=self.docker_url, timeout=60)
        self.events = CreateEvents(self.docker_url)
        self.cleanups: list[tuple[str, Callable[[], None]]] = []
        self.scratch = Path(tempfile.mkdtemp(prefix="wmltrain-bench-grid-"))

    def clean_up(self) -> None:
        run_cleanups(self.cleanups)
        self.events.close()
        with contextlib.suppress(OSError):
            for path in self.scratch.iterdir():
                path.unlink()
            self.scratch.rmdir()

    def make_pool(self, name: str, ahead: int = 0) -> int:
        """The GPU daemon's pool as ``wmltrain pools [--ahead N]`` makes it; its GPUs."""
        from airflow_wmltrain.service.pools import sync_pools
        from airflow_wmltrain.settings import Settings

        (change,) = sync_pools(self.rest, [self.docker_url], settings=Settings(), pattern=name, ahead=ahead)
        self.cleanups.append((f"pool {name}", lambda: self.drop_pool(name)))
        log(change.describe())
        return len(change.gpus)

    def drop_pool(self, name: str, patience: float = 120) -> None:
        """Delete the pool; waits up to ``patience`` seconds for an api-server that is restarting."""
        from airflow_wmltrain.service.api import ApiNotFoundError, ApiTimeoutError, ApiUnreachableError, quote

        deadline = time.monotonic() + patience
        while True:
            try:
                with contextlib.suppress(ApiNotFoundError):
                    self.rest.call("DELETE", f"/pools/{quote(name)}")
                return
            except (ApiUnreachableError, ApiTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(3)

    def airflow_pids(self) -> dict[str, int]:
        """The services' Airflow processes (a restart during a side makes its numbers void)."""
        from tests.faults.fault_helpers import pid_file

        found = {}
        for name in ("airflow-scheduler", "airflow-triggerer", "airflow-api-server", "airflow-dag-processor"):
            with contextlib.suppress(OSError, ValueError):
                found[name] = pid_file(self.services, name)
        return found

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        from tests.faults.fault_helpers import api_get
        from tests.integration.service_helpers import quote

        response = api_get(
            self.api, f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances", params={"limit": 1000}
        )
        response.raise_for_status()
        return list(response.json()["task_instances"])

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        from tests.faults.fault_helpers import api_get
        from tests.integration.service_helpers import quote

        return dict(api_get(self.api, f"/dags/{dag_id}/dagRuns/{quote(run_id)}").json())

    def xcom(self, dag_id: str, run_id: str, key: str, index: int) -> Any:
        from tests.faults.fault_helpers import DroppedDag, xcom_value

        dag = DroppedDag(dag_id=dag_id, data="", results="", path=Path(), run_id=run_id)
        return xcom_value(self.api, dag, key, index)

    def others_meanwhile(self, mine: set[str], start: float, end: float) -> int:
        """Run containers of others (other tests on the shared daemon) that ran while the grid ran."""
        return sum(
            1
            for name, _gpus, started, died in self.events.run_intervals()
            if name not in mine and started < end and died > start
        )

    def finish(self, grid: Grid, timeout: float) -> None:
        """Wait for the DAG run's end and read everything of it."""
        from tests.faults.fault_helpers import DroppedDag, wait_dag_run_end

        dag = DroppedDag(dag_id=grid.dag_id, data="", results="", path=Path(), run_id=grid.run_id)
        grid.state = wait_dag_run_end(self.api, dag, timeout)
        grid.load_after = load_average()
        self.events.settle()
        run = self.dag_run(grid.dag_id, grid.run_id)
        grid.dag_start, grid.dag_end = epoch(run.get("start_date")), epoch(run.get("end_date"))
        tis = {int(ti["map_index"]): ti for ti in self.task_instances(grid.dag_id, grid.run_id)}
        times = self.events.first_times({r.container for r in grid.runs})
        for r in grid.runs:
            ti = tis.get(r.index, {})
            r.state, r.tries = str(ti.get("state")), int(ti.get("try_number") or 0)
            r.ti_start, r.ti_end = epoch(ti.get("start_date")), epoch(ti.get("end_date"))
            seen = times.get(r.container, {})
            r.created, r.started, r.died = seen.get("create"), seen.get("start"), seen.get("die")


# --- the two sides ----------------------------------------------------------------------------------------


def run_ours(
    bench: Bench,
    n: int,
    seconds: float,
    *,
    objects: int,
    poll_interval: int | None,
    timeout: float,
    deferrable: bool = True,
    ahead: int = 0,
) -> Grid:
    """Our grid (``deferrable=False``: the diagnostic side ``ours-sync``, the worker waits for the run;
    ``ahead``: the side ``ours-ahead``, a pool of ``wmltrain pools --ahead 4``, 8 slots for 4 GPUs)."""
    from airflow_wmltrain.runtime import labels
    from airflow_wmltrain.service.pools import pool_slots
    from airflow_wmltrain.settings import Settings
    from tests.faults.fault_helpers import SCRIPTS, drop_dag, gpu_overlaps, remove_dag, start_dag
    from tests.integration.training_helpers import model_zip

    key = uuid.uuid4().hex[:8]
    pool = f"{POOL_PREFIX}{key}"
    slots = bench.make_pool(pool, ahead=ahead)
    if slots != GPUS:
        raise SystemExit(f"the GPU daemon {bench.docker_url} offers {slots} GPUs, the benchmark needs {GPUS}")
    model = model_zip(bench.scratch / "model.zip", SCRIPTS)
    operator = (
        f"deferrable={deferrable}, pool={pool!r}, pool_slots={pool_slots('small', Settings())}, "
        "retries=2, retry_delay=timedelta(seconds=5),"
    )
    if poll_interval is not None:
        operator += f" poll_interval={poll_interval},"
    dag = drop_dag(
        bench.services,
        bench.s3,
        model,
        kind=OURS_KIND,
        command=f"sh times.sh {seconds:g} --n 0",
        operator=operator,
        grid=[{"n": i} for i in range(n)],
        data_objects=objects,
    )
    bench.cleanups.append((f"DAG {dag.dag_id}", lambda: remove_dag(bench.api, bench.s3, bench.gpu, dag)))
    side = "ours-ahead" if ahead else "ours" if deferrable else "ours-sync"
    log(f"{side}: dropped {dag.dag_id} ({n} runs of {seconds:g} s, {objects + 1} data objects), pool {pool}")
    grid = Grid(side, dag.dag_id, load_before=load_average())
    grid.triggered = time.time()
    start_dag(bench.api, dag)  # waits for the parse, unpauses, triggers
    grid.triggered = time.time()  # the parse wait is not the grid's
    grid.run_id = dag.run_id
    log(f"{side}: triggered {dag.run_id}")
    grid.runs = [Run(i, labels.run_container_name(dag.training_id(i))) for i in range(n)]
    bench.finish(grid, timeout)
    for r in grid.runs:
        status = bench.xcom(dag.dag_id, dag.run_id, "wmltrain_status", r.index) or {}
        r.history = {h["state"]: epoch(h["at"]) or 0.0 for h in status.get("history", [])}
        inspected = bench.events.gpus.get(container_id_of(bench.events, r.container), "?")
        given = ",".join(status.get("gpus") or []) or "?"
        r.gpu = inspected if inspected == given else f"{inspected}|status:{given}"
        r.logged = logged_times(bench.services, dag.dag_id, dag.run_id, r.index)
    waited = [r.logged["gpu_wait"] for r in grid.runs if "gpu_wait" in r.logged]
    if waited:
        log(f"{side}: {len(waited)} run(s) waited for a GPU lease: {', '.join(f'{w:g}' for w in waited)} s")
    intervals = [(r.container, r.gpu, r.started, r.died) for r in grid.runs if r.started and r.died]
    grid.overlaps = gpu_overlaps([(a, b, float(c or 0), float(d or 0)) for a, b, c, d in intervals])
    mine = {r.container for r in grid.runs}
    if grid.dag_start and grid.dag_end:
        grid.others = bench.others_meanwhile(mine, grid.dag_start, grid.dag_end)
    return grid


GOT_GPU = re.compile(r"got GPU\(s\) \S+ after waiting ([0-9.]+) s")


def logged_times(services: dict[str, str], dag_id: str, run_id: str, index: int) -> dict[str, float]:
    """From the task's log files in the services' Airflow home: when the try that deferred deferred
    (``deferred``), its trigger fired (``fired``) and the task resumed (``resumed``), and the seconds the
    run waited for a GPU lease (``gpu_wait``, when it did)."""
    folder = (
        Path(services["WMLTRAIN_AIRFLOW_HOME"])
        / "logs"
        / f"dag_id={dag_id}"
        / f"run_id={run_id}"
        / "task_id=train"
    ) / f"map_index={index}"
    found: dict[str, float] = {}

    def lines(path: Path) -> list[tuple[float, str]]:
        out = []
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    entry = json.loads(line)
                    out.append((epoch(entry["timestamp"]) or 0.0, str(entry.get("event", ""))))
        return out

    for attempt in sorted(folder.glob("attempt=*.log")):
        events = lines(attempt)
        for _at, event in events:
            match = GOT_GPU.search(event)
            if match:
                found["gpu_wait"] = found.get("gpu_wait", 0.0) + float(match.group(1))
        deferred = next((at for at, event in events if "Pausing task as DEFERRED" in event), None)
        if deferred is None or "deferred" in found:
            continue
        found["deferred"] = deferred
        resumed = next((at for at, e in events if e == "::group::Pre Execute" and at > deferred), None)
        if resumed is not None:
            found["resumed"] = resumed
        for trigger_log in folder.glob(f"{attempt.name}.trigger.*.log"):
            fired = next((at for at, event in lines(trigger_log) if event == "Trigger fired event"), None)
            if fired is not None:
                found["fired"] = fired
    return found


def container_id_of(events: CreateEvents, name: str) -> str:
    """The id of the container ``name`` from a daemon's recorded ``create`` events (empty: not seen)."""
    for (container_id, action, _t), event in list(events.events.items()):
        if action == "create" and event.get("Actor", {}).get("Attributes", {}).get("name") == name:
            return container_id
    return ""


def run_peer(bench: Bench, n: int, seconds: float, timeout: float) -> Grid:
    from tests.faults.fault_helpers import DroppedDag, gpu_overlaps, start_dag

    key = uuid.uuid4().hex[:8]
    pool = f"{POOL_PREFIX}peer_{key}"
    bench.make_pool(pool)  # made as ours: 4 slots (include_deferred does not matter: nothing defers)
    dag_id = f"{PEER_PREFIX}{key}"
    container = f"wmltrain-bench-peer-{key}"
    path = Path(bench.services["WMLTRAIN_AIRFLOW_TEST_DAGS"]) / f"{dag_id}.py"
    command = ["sh", "-c", PEER_SH.format(seconds=f"{seconds:g}")]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        PEER_DAG.format(
            dag_id=dag_id,
            image=bench.services["WMLTRAIN_TEST_IMAGE"],
            docker_url=bench.docker_url,
            container=container,
            pool=pool,
            commands=[command] * n,
        )
    )
    tmp.rename(path)
    dag = DroppedDag(dag_id=dag_id, data="", results="", path=path)

    def remove() -> None:
        path.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            bench.api.delete(f"/dags/{dag_id}")
        for info in bench.gpu.containers(all=True, filters={"name": container}):
            with contextlib.suppress(Exception):
                bench.gpu.remove_container(info["Id"], force=True)

    bench.cleanups.append((f"DAG {dag_id}", remove))
    log(f"peer: dropped {dag_id} ({n} DockerOperator tasks of {seconds:g} s), pool {pool}")
    grid = Grid("peer", dag_id, load_before=load_average())
    start_dag(bench.api, dag)
    grid.triggered = time.time()
    grid.run_id = dag.run_id
    log(f"peer: triggered {dag.run_id}")
    grid.runs = [Run(i, f"{container}-{i}") for i in range(n)]
    bench.finish(grid, timeout)
    for r in grid.runs:
        value = bench.xcom(dag_id, dag.run_id, "return_value", r.index)
        last = value[-1] if isinstance(value, list) and value else value
        r.gpu = str(last).strip() if last not in (None, "") else "?"
    intervals = [
        (r.container, r.gpu, float(r.started), float(r.died)) for r in grid.runs if r.started and r.died
    ]
    grid.overlaps = gpu_overlaps(intervals)
    if grid.dag_start and grid.dag_end:
        grid.others = bench.others_meanwhile(set(), grid.dag_start, grid.dag_end)
    return grid


# --- the report -------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = [
    "side",
    "N",
    "completed",
    "retried",
    "Σ run s",
    "ideal s",
    "makespan s",
    "ratio",
    "GPU span s",
    "GPU-span ratio",
    "overlaps",
    "GPUs used",
    "trigger → 1st container s",
    "last container → DAG end s",
    "others' runs",
]


def row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def summary_cells(s: dict[str, Any]) -> dict[str, Any]:
    """A grid summary's cells of the report's table, by column (:data:`COLUMNS` but ``side``)."""
    return {
        "N": s["n"],
        "completed": s["completed"],
        "retried": s["retried"],
        "Σ run s": fmt(s["run_s_total"], 1),
        "ideal s": fmt(s["ideal_s"], 1),
        "makespan s": fmt(s["makespan_s"], 1),
        "ratio": f"**{fmt(s['ratio'])}**",
        "GPU span s": fmt(s["gpu_span_s"], 1),
        "GPU-span ratio": fmt(s["gpu_span_ratio"]),
        "overlaps": s["overlaps"],
        "GPUs used": ",".join(s["gpus_used"]),
        "trigger → 1st container s": fmt(s["trigger_to_first_container_s"], 1),
        "last container → DAG end s": fmt(s["last_container_to_dag_end_s"], 1),
        "others' runs": s["others_run_containers"],
    }


def report(grids: list[Grid], args: argparse.Namespace, facts: dict[str, Any]) -> str:
    summaries = {g.who: g.summary() for g in grids}
    who_label = {
        "ours": "ours: TrainingRunOperator (deferrable)",
        "ours-sync": "ours, deferrable=False (diagnostic)",
        "ours-ahead": "ours, pool of `wmltrain pools --ahead 4` (runs stage ahead)",
        "peer": "peer: DockerOperator",
    }
    lines = [
        f"## Grid of {args.n} runs × {args.seconds:g} s on {GPUS} stand-in GPUs "
        f"(target ratio ≤ {TARGET:.2f}, 0 overlaps)",
        "",
        "*ratio* = DAG-run makespan (start → end) ÷ ideal (Σ run s ÷ 4); *GPU span* = first container "
        "start → last container end, and its ratio to the ideal; run s from the GPU daemon's start/die "
        "events.",
        "",
        row(COLUMNS),
        row(["---", *["---:"] * 10, "---", "---:", "---:", "---:"]),
    ]
    for g in grids:
        cells = summary_cells(summaries[g.who])
        lines.append(row([who_label[g.who], *(cells[column] for column in COLUMNS[1:])]))
    if "ours" in summaries and "peer" in summaries:
        o, p = summaries["ours"], summaries["peer"]
        if o["makespan_s"] and p["makespan_s"]:
            lines += [
                "",
                f"ours ÷ peer: makespan {o['makespan_s'] / p['makespan_s']:.2f}, ratio "
                f"{fmt(o['ratio'])} vs {fmt(p['ratio'])}",
            ]
    for g in grids:
        lines += ["", f"Medians per run, {g.who} (s):", "", "| phase | median s |", "|---|---:|"]
        for phase, value in summaries[g.who]["phases"].items():
            lines.append(f"| {phase} | {fmt(value)} |")
        if g.overlaps:
            lines += [
                "",
                f"{g.who}: {len(g.overlaps)} overlap(s), e.g.:",
                *[f"- {o}" for o in g.overlaps[:5]],
            ]
        waits = summaries[g.who]["gpu_lease_waits_s"]
        if waits:
            lines += [
                "",
                f"{g.who}: {len(waits)} run(s) waited for a GPU lease "
                f"({', '.join(f'{w:g}' for w in waits)} s): "
                + (
                    "staged ahead, they waited for the grid's own runs, as meant."
                    if g.who == "ours-ahead"
                    else "the GPUs were held by other runs on the daemon."
                ),
            ]
        if g.restarted:
            lines += ["", f"{g.who}: VOID, Airflow restarted meanwhile: {', '.join(g.restarted)}"]
        if g.state != "success":
            bad = [f"[{r.index}] {r.state} (try {r.tries})" for r in g.runs if r.state != "success"]
            lines += ["", f"{g.who}: the DAG run ended {g.state}: {', '.join(bad[:10])}"]
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items())]
    return "\n".join(lines)


def machine_facts(started: float) -> dict[str, Any]:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z", time.gmtime(started)),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "benchmark commit": git("rev-parse", "--short", "HEAD"),
        "Airflow's provider": "/work/main (the services import it)",
        "wall s": round(time.time() - started),
    }


# --- command line -----------------------------------------------------------------------------------------


def services_env() -> dict[str, str]:
    missing = [name for name in SERVICES_VARS if not os.environ.get(name)]
    if missing:
        print(
            f"the services' variables are not set ({', '.join(missing)}): run "
            'eval "$(scripts/services env)" first (scripts/services up starts them)',
            file=sys.stderr,
        )
        raise SystemExit(2)
    return {name: value for name, value in os.environ.items() if name.startswith("WMLTRAIN_")}


def connect(services: dict[str, str]) -> Bench:
    """The services' clients; exits (2) saying so when Airflow's API server does not answer."""
    import httpx

    try:
        return Bench(services)
    except httpx.TransportError as err:
        print(
            f"the Airflow API server at {services['WMLTRAIN_AIRFLOW_URL']} does not answer ({err}): is it "
            "restarting? (scripts/services status)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def clean(services: dict[str, str]) -> int:
    """Remove the DAG files and pools an interrupted run left."""
    bench = connect(services)
    try:
        folder = Path(services["WMLTRAIN_AIRFLOW_TEST_DAGS"])
        for path in [*folder.glob(f"wmltrain_fault_{OURS_KIND}_*.py"), *folder.glob(f"{PEER_PREFIX}*.py")]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(Exception):
                bench.api.delete(f"/dags/{path.stem}")
            log(f"removed {path.name}")
        pools = bench.rest.call("GET", "/pools", params={"limit": 1000}) or {}
        for pool in pools.get("pools", []):
            if str(pool.get("name", "")).startswith(POOL_PREFIX):
                bench.drop_pool(pool["name"])
                log(f"removed pool {pool['name']}")
        for info in bench.gpu.containers(all=True, filters={"name": "wmltrain-bench-peer-"}):
            bench.gpu.remove_container(info["Id"], force=True)
    finally:
        bench.clean_up()
    return 0


def add_grid_arguments(parser: argparse.ArgumentParser, *, n: int, bucket: str) -> None:
    """The grid's shape: ``--n`` runs of ``--seconds`` of work, ``--objects`` small objects to stage."""
    parser.add_argument("--n", type=int, default=n, help=f"runs in the grid (default {n})")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of work per run (default 5)")
    parser.add_argument("--objects", type=int, default=16, help=f"small objects in {bucket} (default 16)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", nargs="?", choices=("run", "clean"), default="run")
    add_grid_arguments(parser, n=32, bucket="ours' data bucket")
    parser.add_argument(
        "--poll-interval",
        type=int,
        help="ours' poll_interval (default: none given, the deployment's [wmltrain] poll_interval)",
    )
    parser.add_argument(
        "--sides",
        default="ours,peer",
        help="sides to run, in order: ours, peer, ours-sync (ours with deferrable=False, a diagnostic), "
        "ours-ahead (ours in a pool of `wmltrain pools --ahead 4`: runs stage ahead); default ours,peer",
    )
    parser.add_argument("--timeout", type=float, help="seconds per side (default 60 + N × seconds × 4)")
    parser.add_argument(
        "--json", metavar="FILE", help="raw numbers per run, the summaries and the machine facts"
    )
    args = parser.parse_args(argv)
    services = services_env()
    if args.action == "clean":
        return clean(services)
    if args.n < 1 or args.seconds <= 0:
        parser.error("--n must be at least 1 and --seconds positive")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - set(SIDES):
        parser.error(f"--sides: give some of {', '.join(SIDES)}, e.g. ours,peer")
    timeout = args.timeout or 60 + args.n * args.seconds * 4
    started = time.time()
    bench = connect(services)
    grids: list[Grid] = []
    failure = ""
    try:
        for side in sides:
            pids = bench.airflow_pids()
            if side.startswith("ours"):
                grids.append(
                    run_ours(
                        bench,
                        args.n,
                        args.seconds,
                        objects=args.objects,
                        poll_interval=args.poll_interval,
                        timeout=timeout,
                        deferrable=side != "ours-sync",
                        ahead=GPUS if side == "ours-ahead" else 0,
                    )
                )
            else:
                grids.append(run_peer(bench, args.n, args.seconds, timeout))
            restarted = sorted(k for k, v in bench.airflow_pids().items() if pids.get(k) != v)
            grids[-1].restarted = restarted
            log(f"{side}: {json.dumps({k: v for k, v in grids[-1].summary().items() if k != 'phases'})}")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # the tests' helpers fail with pytest's Failed, a BaseException
        failure = f"{type(err).__name__}: {err}"
        log(f"the benchmark failed: {failure}")
    finally:
        bench.clean_up()
    facts = machine_facts(started)
    print(report(grids, args, facts))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "facts": facts,
                    "summaries": {g.who: g.summary() for g in grids},
                    "grids": [{**asdict(g), "runs": [asdict(r) for r in g.runs]} for g in grids],
                },
                indent=2,
            )
        )
    if failure:
        print(f"\nThe benchmark stopped early: {failure}")
    ok = not failure and all(
        g.state == "success" and not g.overlaps and not g.restarted for g in grids if g.who.startswith("ours")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
