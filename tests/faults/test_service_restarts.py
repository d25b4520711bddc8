"""Fault injection (issue 9), part 2: the Airflow processes every run shares go away and come back.

The triggerer is restarted while a deferrable run waits on it (scenario 4), then the scheduler shuts
down with a task running (scenario 2: the LocalExecutor's task processes go with it) and is started
again. Both runs are started together; the scheduler is only killed once the triggerer scenario ended,
so that each failure has one cause. ``scripts/services up`` brings back what is not running, and is run
once more at the end whatever happened, so that the tests after these find the services up.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from tests.faults.fault_helpers import (
    CreateEvents,
    Env,
    Relay,
    Scenario,
    alive,
    cmdline,
    heartbeat_timeout,
    open_gate,
    pid_file,
    run_containers,
    services_up,
    start_selected,
    states_of,
    store_connection,
    wait_dag_run_end,
    wait_for_log,
    wait_ti,
)
from tests.integration.service_helpers import Cli, read, wait_for

RETRY = "retries=2, retry_delay=timedelta(seconds=5), priority_weight=10,"
RUN_END_S = 240


def _stop(sc: Scenario, name: str, pid: int, *, second_term_after: float | None, timeout: float) -> str:
    """SIGTERM an Airflow process (again after ``second_term_after`` s: "signal again if you don't want
    to wait"); SIGKILL its process group after ``timeout`` s. How it went."""
    os.kill(pid, signal.SIGTERM)
    sc.note(f"SIGTERM to the {name} (pid {pid})")
    started = time.monotonic()
    again = False
    while alive(pid):
        waited = time.monotonic() - started
        if second_term_after is not None and not again and waited >= second_term_after:
            os.kill(pid, signal.SIGTERM)
            again = True
            sc.note(f"second SIGTERM to the {name} after {waited:.0f}s")
        if waited >= timeout:
            os.killpg(pid, signal.SIGKILL)
            sc.note(f"the {name} still there after {timeout:.0f}s: SIGKILL to its process group")
            wait_for(f"the {name} {pid} to go after SIGKILL", 20, lambda: not alive(pid), interval=0.2)
            return "killed"
        time.sleep(0.2)
    sc.note(f"the {name} exited after {time.monotonic() - started:.1f}s")
    return "exited"


def scenario_triggerer_restart(sc: Scenario, env: Env, done: threading.Event) -> None:
    """4. The triggerer restarted while a deferrable run waits on it: the run completes exactly once
    (one container, one STORING and one COMPLETED in its history, its results stored once)."""
    try:
        relay = Relay(env.services["WMLTRAIN_S3_ENDPOINT"])  # counts the results' uploads
        sc.cleanups.append(relay.close)
        dag = env.drop(
            sc,
            "triggerer",
            "sh gate.sh 300",
            operator="deferrable=True, poll_interval=2, retries=2, retry_delay=timedelta(seconds=5),",
            results_connection=store_connection(env.services, relay.endpoint),
        )
        tid = env.trigger(sc, dag)
        env.processing(sc, dag)
        wait_ti(env.api, dag, "the task to defer", 120, lambda t: t.get("state") == "deferred")
        sc.note("the task is deferred")
        _stop(
            sc, "triggerer", pid_file(env.services, "airflow-triggerer"), second_term_after=None, timeout=60
        )
        open_gate(env.gpu, tid)
        sc.note("gate opened after the triggerer stopped")
        services_up()
        sc.note("scripts/services up: the triggerer runs again")
        state = wait_dag_run_end(env.api, dag, RUN_END_S, env.events.second_container(tid))
        sc.note(f"the DAG run ended {state}")
        _xcom, stored = env.end_state(dag, "COMPLETED")
        history = states_of(stored)
        assert history.count("STORING") == 1, f"STORING {history.count('STORING')} times: {history}"
        assert history.count("COMPLETED") == 1, f"COMPLETED {history.count('COMPLETED')} times: {history}"
        uploads = relay.count("PUT", f"/{tid}/result.txt")
        assert uploads == 1, f"result.txt was uploaded {uploads} times"
        assert read(env.s3, dag.results, f"{tid}/result.txt").startswith("trained for")
        assert state == "success"
    finally:
        done.set()


def scenario_scheduler_restart(sc: Scenario, env: Env, triggerer_done: threading.Event | None) -> None:
    """2. The scheduler shuts down with the run's task running (LocalExecutor: its task processes go with
    it) and comes back: the next try re-attaches; one container ever; COMPLETED."""
    timeout = heartbeat_timeout(env.services)
    sc.note(f"[scheduler] task_instance_heartbeat_timeout = {timeout}")
    relay = Relay(env.services["WMLTRAIN_S3_ENDPOINT"])  # counts the results' uploads
    sc.cleanups.append(relay.close)
    dag = env.drop(
        sc,
        "scheduler",
        "sh gate.sh 400",
        operator=RETRY,
        results_connection=store_connection(env.services, relay.endpoint),
    )
    tid = env.trigger(sc, dag)
    env.processing(sc, dag)
    ti = wait_ti(env.api, dag, "the task to run", 60, lambda t: t.get("state") == "running" and t.get("pid"))
    first_try, task_pid = int(ti["try_number"]), int(ti["pid"])
    sc.note(f"try {first_try} runs as pid {task_pid}")
    if triggerer_done is not None:
        sc.note("waiting for the triggerer scenario to end before stopping the scheduler")
        wait_for("the triggerer scenario to end", 400, triggerer_done.is_set, interval=1)
    how = _stop(sc, "scheduler", pid_file(env.services, "airflow-scheduler"), second_term_after=3, timeout=30)
    sc.note(f"scheduler {how}; the old task process {'still runs' if alive(task_pid) else 'is gone'}")
    services_up()
    sc.note(
        "scripts/services up: the scheduler runs again; the old task process "
        + ("still runs" if alive(task_pid) else "is gone")
    )
    ti = wait_ti(
        env.api,
        dag,
        "a new try of the task after the scheduler came back",
        timeout + 180,
        lambda t: int(t.get("try_number") or 0) > first_try and t.get("state") == "running",
    )
    new_try = int(ti["try_number"])
    attached = wait_for_log(env.api, dag, new_try, "Re-attaching", 90)
    sc.note(f"try {new_try} {'re-attached' if attached else 'logged no re-attach within 90s'}")
    if alive(task_pid):
        sc.note(f"the old try's task process {task_pid} ({cmdline(task_pid)[:60]}) runs beside try {new_try}")
    if run_containers(env.gpu, tid):
        open_gate(env.gpu, tid)
        sc.note("gate opened")
    state = wait_dag_run_end(env.api, dag, RUN_END_S, env.events.second_container(tid))
    sc.note(f"the DAG run ended {state}")
    xcom, stored = env.end_state(dag, "COMPLETED")
    assert xcom.get("exit_code") == 0, f"exit_code {xcom.get('exit_code')}"
    assert "training done" in read(env.s3, dag.results, f"{tid}/learner-1/training-log.txt")
    history = states_of(stored)
    assert history.count("STORING") == 1, f"STORING {history.count('STORING')} times: {history}"
    # The old try's task process, orphaned by its supervisor's death, must not store the run a second time.
    ended = wait_for_gone(task_pid, 30)
    sc.note(
        f"the old try's task process {task_pid} {'ended' if ended else 'still runs 30 s after the run ended'}"
    )
    uploads = relay.count("PUT", f"/{tid}/result.txt")
    assert uploads == 1, f"result.txt was uploaded {uploads} times (the old try's orphaned process too?)"
    assert state == "success"


def wait_for_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.fixture(scope="module")
def scenarios(
    request: pytest.FixtureRequest,
    services: dict[str, str],
    api: httpx.Client,
    s3_client: Any,
    model: Path,
    gpu_events: CreateEvents,
    cli: Cli,
) -> Iterator[dict[str, Scenario]]:
    gpu = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"], timeout=60)
    env = Env(services=services, api=api, s3=s3_client, gpu=gpu, model=model, events=gpu_events, cli=cli)
    triggerer_done = threading.Event()
    made = {
        "triggerer_restart": Scenario(
            "triggerer_restart", lambda sc: scenario_triggerer_restart(sc, env, triggerer_done), 400
        ),
        "scheduler_restart": Scenario("scheduler_restart", lambda sc: None, 600),
    }
    selected = [
        item.name for item in request.session.items if getattr(item, "module", None) is request.module
    ]
    with_triggerer = any(name.startswith("test_triggerer_restart") for name in selected)
    made["scheduler_restart"].body = lambda sc: scenario_scheduler_restart(
        sc, env, triggerer_done if with_triggerer else None
    )
    started = start_selected(request, made)
    try:
        yield started
    finally:
        for scenario in started.values():
            if scenario.thread is not None:
                scenario.thread.join(timeout=5)
        services_up()  # whatever happened: the scheduler and the triggerer run for the tests that follow
        gpu.close()


def test_triggerer_restart_mid_wait_completes_once(scenarios: dict[str, Scenario]) -> None:
    scenarios["triggerer_restart"].result()


def test_scheduler_restart_with_a_running_task_reattaches(scenarios: dict[str, Scenario]) -> None:
    scenarios["scheduler_restart"].result()
