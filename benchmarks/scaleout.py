"""A grid spread over three GPU hosts by Celery, measured (issue 12, deliverable 4).

``scripts/services scaleout-up`` starts three stand-in GPU Docker daemons (4 GPUs each) as three hosts, Redis,
an Airflow on the CeleryExecutor (its own database on the services' PostgreSQL) and one Celery worker per host
consuming the shared queue ``wmltrain_gpu`` with ``--concurrency 4``, each with its host's engine as
``[wmltrain] docker_url`` and ``DOCKER_HOST`` and a staging directory of its own. The grid is written as a
user writes one, naming no host: ``TrainingRunOperator.partial(queue="wmltrain_gpu", pool=..., ...)
.expand(hyperparameters=...)``, ``deferrable=True`` (a 5-s run ends within ``[wmltrain] defer_after``, so it
finishes in the worker), in one pool of ``wmltrain pools --shared`` (12 slots, the sum of the hosts' GPUs),
``retries=2`` as benchmarks/grid.py's.

Reported: makespan (the DAG run's start → end) ÷ ideal (Σ run seconds ÷ 12), the GPU overlaps on each host,
the runs each host ran, and where the remainder goes (before the first container, GPUs idle between runs,
after the last container), with the per-run medians of benchmarks/grid.py. Each run's interval and GPUs
come from its host daemon's container ``start``/``die`` events. Run from the repository root, with the
services up::

    eval "$(scripts/services env)"
    .venv/bin/python benchmarks/scaleout.py [--n 48] [--seconds 5] [--json FILE]

Everything it started is stopped at the end (also on Ctrl-C or SIGTERM): ``scripts/services scaleout-down``
stops the workers, Airflow, Redis and the daemons and drops the database. ``--keep`` leaves them running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.grid import (  # noqa: E402  (after the path)
    COLUMNS,
    Grid,
    Run,
    add_grid_arguments,
    container_id_of,
    epoch,
    fmt,
    load_average,
    log,
    logged_times,
    machine_facts,
    row,
    run_cleanups,
    services_clients,
    services_env,
    summary_cells,
)

TARGET = 1.15
HOSTS, GPUS_PER_HOST = 3, 4  # what scripts/services scaleout-up starts
SERVICES = REPO / "scripts" / "services"
KIND = "scaleout"


# --- the set-up -------------------------------------------------------------------------------------------


def scaleout_up(concurrency: int | None = None) -> dict[str, str]:
    """``scripts/services scaleout-up`` (each worker's ``--concurrency``: the host's GPUs, or
    ``concurrency``); its ``WMLTRAIN_SCALEOUT_*`` variables."""
    env = dict(os.environ)
    if concurrency is not None:
        env["WMLTRAIN_SCALEOUT_CONCURRENCY"] = str(concurrency)
    proc = subprocess.run(
        [str(SERVICES), "scaleout-up"], stdout=subprocess.PIPE, text=True, check=False, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"scripts/services scaleout-up failed (exit {proc.returncode}); see its output above"
        )
    found = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        if name.startswith("WMLTRAIN_SCALEOUT_"):
            found[name] = value.strip("'")
    return found


def scaleout_down() -> None:
    subprocess.run([str(SERVICES), "scaleout-down"], check=False)


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so that the clean-up runs for both."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class Host:
    """One GPU host: its Docker engine, and what of the grid ran there."""

    url: str
    runs: list[int] = field(default_factory=list)
    overlaps: list[str] = field(default_factory=list)
    gpus: list[str] = field(default_factory=list)
    busy_s: float = 0.0
    others: int = 0  # run containers not of the grid


@dataclass
class ScaleOutResult:
    grid: Grid
    hosts: list[Host]
    gpus: int
    pool: str

    def summary(self) -> dict[str, Any]:
        s = self.grid.summary(self.gpus)
        ideal = s["ideal_s"] or 0.0
        span = s["gpu_span_s"] or 0.0
        s["remainder_s"] = {
            "trigger → first container start": s["trigger_to_first_container_s"],
            "DAG run start → first container start": (
                min(r.started for r in self.grid.runs if r.started) - self.grid.dag_start
                if self.grid.dag_start and any(r.started for r in self.grid.runs)
                else None
            ),
            "GPUs idle within the GPU span ((span − ideal))": span - ideal if span and ideal else None,
            "last container end → DAG run end": s["last_container_to_dag_end_s"],
        }
        s["hosts"] = {
            h.url: {
                "runs": len(h.runs),
                "overlaps": len(h.overlaps),
                "gpus": sorted(set(h.gpus)),
                "busy_s": h.busy_s,
                "others": h.others,
            }
            for h in self.hosts
        }
        s["overlaps"] = sum(len(h.overlaps) for h in self.hosts)
        return s


class Stack:
    """The clients of the scale-out's Airflow, the store and the host daemons."""

    def __init__(self, services: dict[str, str], scaleout: dict[str, str]) -> None:
        import docker

        from tests.faults.fault_helpers import CreateEvents
        from tests.integration.service_helpers import api_client

        # The services' variables with the scale-out's Airflow in place of theirs (drop_dag, logged_times).
        self.services = {
            **services,
            "WMLTRAIN_AIRFLOW_URL": scaleout["WMLTRAIN_SCALEOUT_AIRFLOW_URL"],
            "WMLTRAIN_AIRFLOW_HOME": scaleout["WMLTRAIN_SCALEOUT_AIRFLOW_HOME"],
            "WMLTRAIN_AIRFLOW_TEST_DAGS": scaleout["WMLTRAIN_SCALEOUT_TEST_DAGS"],
        }
        self.queue = scaleout["WMLTRAIN_SCALEOUT_QUEUE"]
        self.urls = scaleout["WMLTRAIN_SCALEOUT_HOSTS"].split(",")
        self.api = api_client(self.services)
        # The REST client of the scale-out's Airflow (its pools), not of the services' own.
        self.rest, self.s3 = services_clients(self.services)
        self.docker = {url: docker.APIClient(base_url=url, timeout=60) for url in self.urls}
        self.events = {url: CreateEvents(url) for url in self.urls}
        self.cleanups: list[tuple[str, Callable[[], None]]] = []

    def clean_up(self) -> None:
        run_cleanups(self.cleanups)
        for events in self.events.values():
            events.close()


def read_hosts(stack: Stack, grid: Grid) -> list[Host]:
    """Which host ran each run of the grid (its daemon saw the container), when, on which GPUs; the GPU
    overlaps and the busy GPU seconds of each host."""
    from tests.faults.fault_helpers import gpu_overlaps

    names = {r.container: r for r in grid.runs}
    hosts = [Host(url) for url in stack.urls]
    for host in hosts:
        events = stack.events[host.url]
        times = events.first_times(set(names))
        for name, seen in times.items():
            r = names[name]
            host.runs.append(r.index)
            r.created, r.started, r.died = seen.get("create"), seen.get("start"), seen.get("die")
            gpu = events.gpus.get(container_id_of(events, name), "?")
            host.gpus.append(gpu)
            r.gpu = f"{host.url}#{gpu}"  # GPU 0 of two hosts are two GPUs (Grid.phases: idle per GPU)
        intervals = [i for i in events.run_intervals() if i[0] in names]
        host.overlaps = gpu_overlaps(intervals)
        host.busy_s = sum(died - started for _n, _g, started, died in intervals)
        if grid.dag_start and grid.dag_end:
            host.others = sum(
                1
                for name, _g, started, died in events.run_intervals()
                if name not in names and started < grid.dag_end and died > grid.dag_start
            )
    return hosts


def run_grid(
    stack: Stack, n: int, seconds: float, *, objects: int, timeout: float, ahead: int = 0
) -> ScaleOutResult:
    """Drop the grid's DAG, trigger it, wait for its end and read where and when each run ran."""
    from airflow_wmltrain.runtime import labels
    from airflow_wmltrain.service.pools import pool_slots, sync_pools
    from airflow_wmltrain.settings import Settings
    from tests.faults.fault_helpers import (
        SCRIPTS,
        DroppedDag,
        drop_dag,
        remove_dag,
        start_dag,
        wait_dag_run_end,
        xcom_value,
    )
    from tests.integration.service_helpers import quote
    from tests.integration.training_helpers import model_zip

    key = uuid.uuid4().hex[:8]
    pool = f"wmltrain_scaleout_{key}"
    (change,) = sync_pools(
        stack.rest, stack.urls, settings=Settings(), pattern=pool, shared=True, ahead=ahead
    )
    stack.cleanups.append((f"pool {pool}", lambda: stack.rest.call("DELETE", f"/pools/{pool}")))
    log(change.describe())
    # A task whose pool its Airflow does not know stays "scheduled": check the pool is the scale-out's.
    if stack.api.get(f"/pools/{pool}").status_code != 200:
        url = stack.services["WMLTRAIN_AIRFLOW_URL"]
        raise RuntimeError(f"the pool {pool} is not on the scale-out's Airflow {url}")
    gpus = len(change.gpus)
    scratch = Path(stack.services["WMLTRAIN_AIRFLOW_TEST_DAGS"]).parent / "test-files"
    scratch.mkdir(parents=True, exist_ok=True)
    model = model_zip(scratch / f"model-{key}.zip", SCRIPTS)
    operator = (
        f"deferrable=True, queue={stack.queue!r}, pool={pool!r}, "
        f"pool_slots={pool_slots('small', Settings())}, retries=2, retry_delay=timedelta(seconds=5),"
    )
    dag = drop_dag(
        stack.services,
        stack.s3,
        model,
        kind=KIND,
        command=f"sh times.sh {seconds:g} --n 0",
        operator=operator,
        grid=[{"n": i} for i in range(n)],
        data_objects=objects,
        worker_docker_host=True,  # no docker_url: each run on the engine of the worker that takes it
    )

    def remove() -> None:
        for client in stack.docker.values():
            remove_dag(stack.api, stack.s3, client, dag)
        model.unlink(missing_ok=True)

    stack.cleanups.append((f"DAG {dag.dag_id}", remove))
    log(
        f"dropped {dag.dag_id}: {n} runs of {seconds:g} s over {len(stack.urls)} hosts, "
        f"pool {pool} ({change.slots} slots for {gpus} GPUs)"
    )
    # "ours-ahead": Grid.phases leaves out the slot hand-over where the pool has more slots than GPUs.
    grid = Grid("ours-ahead" if ahead else "ours", dag.dag_id, load_before=load_average())
    start_dag(stack.api, dag)
    grid.triggered = time.time()
    grid.run_id = dag.run_id
    log(f"triggered {dag.run_id}")
    grid.runs = [Run(i, labels.run_container_name(dag.training_id(i))) for i in range(n)]
    grid.state = wait_dag_run_end(stack.api, dag, timeout)
    grid.load_after = load_average()
    for events in stack.events.values():
        events.settle()
    run = stack.api.get(f"/dags/{dag.dag_id}/dagRuns/{quote(dag.run_id)}").json()
    grid.dag_start, grid.dag_end = epoch(run.get("start_date")), epoch(run.get("end_date"))
    response = stack.api.get(
        f"/dags/{dag.dag_id}/dagRuns/{quote(dag.run_id)}/taskInstances", params={"limit": 1000}
    )
    tis = {int(ti["map_index"]): ti for ti in response.json()["task_instances"]}
    hosts = read_hosts(stack, grid)
    grid.overlaps = [o for h in hosts for o in h.overlaps]
    for r in grid.runs:
        ti = tis.get(r.index, {})
        r.state, r.tries = str(ti.get("state")), int(ti.get("try_number") or 0)
        r.ti_start, r.ti_end = epoch(ti.get("start_date")), epoch(ti.get("end_date"))
        status = xcom_value(
            stack.api, DroppedDag(dag.dag_id, "", "", Path(), dag.run_id), "wmltrain_status", r.index
        )
        r.history = {h["state"]: epoch(h["at"]) or 0.0 for h in (status or {}).get("history", [])}
        r.logged = logged_times(stack.services, dag.dag_id, dag.run_id, r.index)
    return ScaleOutResult(grid, hosts, gpus, pool)


# --- the report -------------------------------------------------------------------------------------------


def report(result: ScaleOutResult, args: argparse.Namespace, facts: dict[str, Any]) -> str:
    s = result.summary()
    g = result.grid
    # grid.py's table but the side, the GPUs used and others' runs (per host below)
    columns = [c for c in COLUMNS if c not in ("side", "GPUs used", "others' runs")]
    cells = summary_cells(s)
    lines = [
        f"## Grid of {args.n} runs × {args.seconds:g} s over {len(result.hosts)} GPU hosts × 4 stand-in GPUs "
        f"(Celery; target ratio ≤ {TARGET:.2f}, 0 overlaps)",
        "",
        f"*ratio* = DAG-run makespan ÷ ideal (Σ run s ÷ {result.gpus}); run s from the hosts' container "
        "start/die events.",
        "",
        row(columns),
        row(["---:"] * len(columns)),
        row([cells[column] for column in columns]),
        "",
        "| host | runs | GPU overlaps | GPUs used | busy GPU s | others' runs |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for url, h in s["hosts"].items():
        lines.append(
            row([url, h["runs"], h["overlaps"], ",".join(h["gpus"]), fmt(h["busy_s"], 1), h["others"]])
        )
    lines += ["", "Where the makespan beyond the ideal goes (s):", "", "| part | s |", "|---|---:|"]
    lines += [f"| {part} | {fmt(value, 1)} |" for part, value in s["remainder_s"].items()]
    lines += ["", "Medians per run (s):", "", "| phase | median s |", "|---|---:|"]
    lines += [f"| {phase} | {fmt(value)} |" for phase, value in s["phases"].items()]
    for h in result.hosts:
        if h.overlaps:
            lines += [
                "",
                f"{h.url}: {len(h.overlaps)} overlap(s), e.g.:",
                *[f"- {o}" for o in h.overlaps[:5]],
            ]
    if g.state != "success":
        bad = [f"[{r.index}] {r.state} (try {r.tries})" for r in g.runs if r.state != "success"]
        lines += ["", f"the DAG run ended {g.state}: {', '.join(bad[:10])}"]
    lines += [
        "",
        f"Load average (1, 5, 15 min): before {g.load_before}, after {g.load_after}",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_grid_arguments(parser, n=48, bucket="the data bucket")
    parser.add_argument(
        "--ahead",
        type=int,
        default=0,
        help="wmltrain pools --shared --ahead N, each worker's concurrency raised by its share (default 0)",
    )
    parser.add_argument("--timeout", type=float, help="seconds for the grid (default 300 + N × seconds × 2)")
    parser.add_argument("--keep", action="store_true", help="leave the scale-out set-up running")
    parser.add_argument(
        "--json", metavar="FILE", help="raw numbers per run and host, the summary, the machine"
    )
    args = parser.parse_args(argv)
    if args.n < 1 or args.seconds <= 0:
        parser.error("--n must be at least 1 and --seconds positive")
    services = services_env()
    started = time.time()
    result: ScaleOutResult | None = None
    failure = ""
    with terminated_as_interrupt():
        try:
            log("scripts/services scaleout-up")
            # Runs staged ahead wait in a worker slot: each host's worker gets its share on top of its GPUs.
            concurrency = GPUS_PER_HOST + math.ceil(args.ahead / HOSTS) if args.ahead else None
            scaleout = scaleout_up(concurrency)
            stack = Stack(services, scaleout)
            try:
                result = run_grid(
                    stack,
                    args.n,
                    args.seconds,
                    objects=args.objects,
                    timeout=args.timeout or 300 + args.n * args.seconds * 2,
                    ahead=args.ahead,
                )
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as err:  # the tests' helpers fail with pytest's Failed, a BaseException
                failure = f"{type(err).__name__}: {err}"
                log(f"the benchmark failed: {failure}")
            finally:
                stack.clean_up()
        finally:
            if not args.keep:
                log("scripts/services scaleout-down")
                scaleout_down()
    facts = machine_facts(started)
    facts["Airflow's provider"] = f"{REPO} (the scale-out's Airflow and workers import it)"
    if result is not None:
        print(report(result, args, facts))
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "args": vars(args),
                        "facts": facts,
                        "summary": result.summary(),
                        "hosts": [asdict(h) for h in result.hosts],
                        "runs": [asdict(r) for r in result.grid.runs],
                    },
                    indent=2,
                    default=str,
                )
            )
    if failure:
        print(f"\nThe benchmark stopped early: {failure}")
    ok = (
        not failure
        and result is not None
        and result.grid.state == "success"
        and not result.grid.overlaps
        and all(h.runs for h in result.hosts)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
