"""A grid spread over several GPU hosts by Celery (issue 12): the set-up of ``benchmarks/scaleout.py``
(``scripts/services scaleout-up``: three stand-in GPU daemons of 4 GPUs, Redis, an Airflow on the
CeleryExecutor, a Celery worker per host on the shared queue ``wmltrain_gpu``), a smaller grid.

The DAG names no Docker host: each run goes to the engine of the worker that takes it (``[wmltrain]
docker_url``). Every host must run some of the grid, every run exactly one container on one host, and no
two runs may hold a GPU of one host at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.scaleout import Stack, run_grid, scaleout_down, scaleout_up

RUNS = 12
SECONDS = 3


@pytest.fixture(scope="module")
def stack(services: dict[str, str]) -> Iterator[Stack]:
    try:
        scaleout = scaleout_up()
    except RuntimeError as err:
        scaleout_down()
        pytest.fail(str(err), pytrace=False)
    stack = Stack(services, scaleout)
    try:
        yield stack
    finally:
        stack.clean_up()
        scaleout_down()


def test_a_grid_spreads_over_the_gpu_hosts_without_sharing_a_gpu(stack: Stack) -> None:
    result = run_grid(stack, RUNS, SECONDS, objects=4, timeout=240)
    summary = result.summary()
    where = {h.url: sorted(h.runs) for h in result.hosts}
    assert result.grid.state == "success", (
        f"the grid's DAG run ended {result.grid.state}: "
        f"{[(r.index, r.state, r.tries) for r in result.grid.runs if r.state != 'success']}"
    )
    assert sorted(i for runs in where.values() for i in runs) == list(range(RUNS)), (
        f"each run must have exactly one container, on one host: {where}"
    )
    for host in result.hosts:
        assert host.runs, f"the host {host.url} ran none of the grid: {where}"
        assert host.overlaps == [], f"two runs held a GPU of {host.url} at once: {host.overlaps}"
        assert set(host.gpus) <= {"0", "1", "2", "3"}, f"{host.url}: runs without their GPU: {host.gpus}"
    assert summary["completed"] == RUNS
