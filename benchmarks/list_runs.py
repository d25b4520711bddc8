#!/usr/bin/env python3
"""How fast ``wmltrain list`` lists 1,000 runs (issue 13 item 10: within 2 s, in a constant number of calls).

Setup, once (kept for later runs): a DAG ``wmltrain_bench_list`` in the services' test bundle whose
mapped task publishes ``--runs`` status documents (``wmltrain_status`` XComs, as training runs do), run
once on the services' Airflow.  Then, in the same run and against the same server:

- **ours**: ``list_runs`` through the provider's endpoint (``GET /wmltrain/runs``, one call);
- **peer**: ``list_runs`` through Airflow's public API alone (what a server without the plugin gets:
  the XCom entries, their task instances in one batch, then one call per run for its document);
- the whole ``wmltrain list`` process and ``wmltrain list --limit 20``, as a user types them.

Each figure is the median of ``--repeat`` tries after a warm-up; the report gives the calls each
made and the ratio peer ÷ ours::

    eval "$(scripts/services env)"
    .venv/bin/python benchmarks/list_runs.py --runs 1000 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DAG_ID = "wmltrain_bench_list"
TARGET_S = 2.0

DAG_SOURCE = '''
"""Benchmark fixture (benchmarks/list_runs.py): {runs} published training-run status documents."""
import pendulum
from airflow.sdk import dag, task


@dag(dag_id="{dag_id}", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False,
     max_active_tasks=64, tags=["benchmark"])
def bench_list():
    @task(retries=0)
    def publish(i: int, **context):
        from airflow_wmltrain.lifecycle import RunState, RunStatus, STATUS_XCOM_KEY

        status = RunStatus(training_id=f"training-bench-{{i:05d}}", name=f"bench {{i}}")
        for state in (RunState.PENDING, RunState.DOWNLOADING, RunState.PROCESSING, RunState.STORING,
                      RunState.COMPLETED):
            status = status.advance(state)
        context["ti"].xcom_push(key=STATUS_XCOM_KEY, value=status.to_dict())

    publish.expand(i=list(range({runs})))


bench_list()
'''


def log(message: str) -> None:
    print(f"[list_runs] {message}", file=sys.stderr, flush=True)


def api_of(env: dict[str, str]) -> Any:
    from airflow_wmltrain.service.api import AirflowApi

    return AirflowApi(env["WMLTRAIN_API_URL"], env["WMLTRAIN_USER"], env["WMLTRAIN_PASSWORD"])


class CountingApi:
    """An ``AirflowApi`` that counts its calls, and can play a server without the provider's endpoint."""

    def __init__(self, env: dict[str, str], *, plugin: bool) -> None:
        from airflow_wmltrain.service.api import PUBLIC_API, AirflowApi, ApiNotFoundError

        outer = self

        class Api(AirflowApi):
            def call(self, method: str, path: str, **kwargs: Any) -> Any:
                if kwargs.get("under", PUBLIC_API) != PUBLIC_API and not plugin:
                    raise ApiNotFoundError("HTTP 404: Not Found", status=404)
                outer.calls += 1
                return super().call(method, path, **kwargs)

        self.calls = 0
        self.api = Api(env["WMLTRAIN_API_URL"], env["WMLTRAIN_USER"], env["WMLTRAIN_PASSWORD"])
        self.api.token()


def ensure_fixture(env: dict[str, str], runs: int) -> None:
    """The benchmark DAG has run once with ``runs`` map indexes (made now when it has not)."""
    from airflow_wmltrain.service.api import ApiNotFoundError

    api = api_of(env)
    path = Path(env["WMLTRAIN_AIRFLOW_TEST_DAGS"]) / f"{DAG_ID}.py"
    source = textwrap.dedent(DAG_SOURCE).format(dag_id=DAG_ID, runs=runs)
    run_id = f"bench-{runs}"
    try:
        run = api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
        if run.get("state") == "success" and path.exists() and path.read_text() == source:
            return
    except ApiNotFoundError:
        pass
    if not path.exists() or path.read_text() != source:
        path.write_text(source)
    log(f"waiting for the dag-processor to parse {DAG_ID}")
    deadline = time.monotonic() + 180
    while True:
        try:
            api.call("GET", f"/dags/{DAG_ID}")
            break
        except ApiNotFoundError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{DAG_ID} was not parsed within 180 s") from None
            time.sleep(2)
    api.call("PATCH", f"/dags/{DAG_ID}", body={"is_paused": False})
    try:
        api.call("POST", f"/dags/{DAG_ID}/dagRuns", body={"dag_run_id": run_id, "logical_date": None})
    except Exception as err:  # an earlier interrupted setup: the run is there
        log(f"triggering {run_id}: {err}")
    log(f"running {runs} publishing tasks (once; later runs of the benchmark reuse them)")
    started = time.monotonic()
    while True:
        state = api.call("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").get("state")
        if state == "success":
            break
        if state == "failed":
            raise SystemExit(f"{DAG_ID} run {run_id} failed: see its task logs")
        if time.monotonic() - started > 1800:
            raise SystemExit(f"{DAG_ID} run {run_id} did not finish in 30 min")
        time.sleep(5)
    log(f"fixture ready in {time.monotonic() - started:.0f} s")


def median_of(repeat: int, action: Callable[[], Any]) -> tuple[float, Any]:
    action()  # warm-up
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith("WMLTRAIN_")}
    if "WMLTRAIN_API_URL" not in env:
        print('run eval "$(scripts/services env)" first (scripts/services up starts them)', file=sys.stderr)
        return 2
    ensure_fixture(env, args.runs)

    from airflow_wmltrain.service.runs import list_runs

    rows = []
    for name, plugin in (("ours: provider endpoint", True), ("peer: public API only", False)):
        counting = CountingApi(env, plugin=plugin)
        seconds, records = median_of(args.repeat, lambda c=counting: list_runs(c.api))
        calls = counting.calls // (args.repeat + 1)
        bench = sum(r.dag_id == DAG_ID for r in records)
        rows.append((name, seconds, calls, bench, len(records)))
    cli = [str(REPO / ".venv" / "bin" / "wmltrain"), "list"]
    for name, argv in (
        ("`wmltrain list` (process)", cli),
        ("`wmltrain list --limit 20` (process)", [*cli, "--limit", "20"]),
    ):
        seconds, _ = median_of(
            args.repeat, lambda a=argv: subprocess.run(a, check=True, capture_output=True, env={**os.environ})
        )
        rows.append((name, seconds, None, None, None))
    ours, peer = rows[0][1], rows[1][1]
    print(
        f"`wmltrain list` of {args.runs} runs on the services "
        f"(median of {args.repeat}; target ≤ {TARGET_S} s)\n"
    )
    print("| how | seconds | API calls | benchmark runs listed | all runs listed |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, calls, bench, total in rows:
        cells = ["" if value is None else str(value) for value in (calls, bench, total)]
        print(f"| {name} | {seconds:.2f} | {' | '.join(cells)} |")
    print(f"\npeer ÷ ours: {peer / ours:.1f}×")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
