"""Fault injection (issue 9), part 1: faults of a worker, a container, the object store and the Docker
daemon, while real training runs go through the real scheduler of ``scripts/services up``.

Every scenario drops its own DAG into the services' test bundle and runs in a thread of its own, all
started together when the module starts (the scenarios overlap; each test then waits for its own and
checks the run's end in its three places: ``_status.json`` in the results bucket, the ``wmltrain_status``
XCom through the REST API, and the containers on the Docker host, with exactly one ``create`` of the
run's container in the daemon's events).

The Airflow processes every run shares (the scheduler, the triggerer) are restarted in
``test_service_restarts.py``, never while these run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from airflow_wmltrain.runtime import labels
from tests.faults.fault_helpers import (
    CreateEvents,
    Env,
    PrivateDockerd,
    Relay,
    Scenario,
    alive,
    bucket_status,
    cmdline,
    gpu_overlaps,
    heartbeat_timeout,
    open_gate,
    parent_of,
    run_containers,
    short_status,
    start_selected,
    states_of,
    status_xcom,
    stopped,
    store_connection,
    task_instance,
    task_logs,
    wait_dag_run_end,
    wait_for_log,
    wait_ti,
)
from tests.integration.service_helpers import Cli, keys, read, wait_for

RETRY = "retries=2, retry_delay=timedelta(seconds=5), priority_weight=10,"
DEFER = "deferrable=True, poll_interval=2, priority_weight=10,"
RUN_END_S = 240
GRID_SIZE = 20
DATA_OBJECTS = 300
OUTAGE_S = 1.0  # a "brief" store outage: what the transfers' retries (5 tries, 0.2 s doubling) must ride out


def scenario_frozen_supervisor(sc: Scenario, env: Env) -> None:
    """1. A task's supervisor frozen (SIGSTOP) past the heartbeat timeout: the scheduler starts a new try,
    which re-attaches; the old try, told it should no longer run, must leave the container alone."""
    timeout = heartbeat_timeout(env.services)
    sc.note(f"[scheduler] task_instance_heartbeat_timeout = {timeout}")
    if timeout > 120:
        pytest.fail(
            f"the services' scheduler detects a frozen supervisor only after {timeout}s "
            "([scheduler] task_instance_heartbeat_timeout); this test needs <= 120 "
            "(scripts/services should set 60)",
            pytrace=False,
        )
    dag = env.drop(sc, "frozen", "sh gate.sh 400", operator=RETRY)
    tid = env.trigger(sc, dag)
    env.processing(sc, dag)
    ti = wait_ti(
        env.api, dag, "the task to run with a pid", 60, lambda t: t.get("state") == "running" and t.get("pid")
    )
    first_try, task_pid = int(ti["try_number"]), int(ti["pid"])
    supervisor = parent_of(task_pid)
    sc.note(f"try {first_try}: task pid {task_pid} ({cmdline(task_pid)[:80]})")
    sc.note(f"its supervisor: pid {supervisor} ({cmdline(supervisor)[:80]})")
    assert "airflow" in cmdline(supervisor), (
        f"the parent {supervisor} of the task {task_pid} is not Airflow's"
    )
    with stopped(supervisor):
        sc.note("SIGSTOP to the supervisor")
        ti = wait_ti(
            env.api,
            dag,
            "the scheduler to start a new try of the task whose supervisor is frozen",
            timeout + 150,
            lambda t: int(t.get("try_number") or 0) > first_try and t.get("state") == "running",
        )
        new_try = int(ti["try_number"])
        sc.note(f"try {new_try} runs (pid {ti.get('pid')}); SIGCONT to the supervisor")
    attached = wait_for_log(env.api, dag, new_try, "Re-attaching", 90)
    sc.note(f"try {new_try} {'re-attached' if attached else 'did not log a re-attach within 90s'}")
    wait_for(f"the old try's task process {task_pid} to end", 90, lambda: not alive(task_pid))
    sc.note(f"the old try's task process {task_pid} ended")
    # The old try was told to stop: its on_kill must not halt the run that Airflow moved to the new try.
    # Watch the container for a while (a halter is a detached process: give it time to act).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        containers = run_containers(env.gpu, tid)
        running = [c for c in containers if c["State"] == "running"]
        halter = Path(env.services["WMLTRAIN_AIRFLOW_HOME"]) / "staging" / "halts" / f"{tid}.log"
        assert running, (
            f"after the old try {first_try} was told to stop, the run's container is no longer running "
            f"(now: {[(c['State'], c['Status']) for c in containers]}; events: {env.events.describe(tid)}): "
            f"the old try halted a run Airflow had moved to try {new_try}. Halter log ({halter}): "
            f"{halter.read_text(errors='replace')[-1500:] if halter.exists() else '(none)'}"
        )
        time.sleep(1)
    sc.note("the container still trains 15 s after the old try ended; opening the gate")
    open_gate(env.gpu, tid)
    state = wait_dag_run_end(env.api, dag, RUN_END_S, env.events.second_container(tid))
    sc.note(f"the DAG run ended {state}")
    xcom, _ = env.end_state(dag, "COMPLETED")
    assert xcom.get("exit_code") == 0, f"exit_code {xcom.get('exit_code')}"
    assert state == "success", f"the DAG run ended {state}"


def scenario_sigkill_worker(sc: Scenario, env: Env) -> None:
    """3. The task process SIGKILLed mid-training: the retry re-attaches; one container; COMPLETED."""
    dag = env.drop(sc, "sigkill", "sh gate.sh 300", operator=RETRY)
    tid = env.trigger(sc, dag)
    env.processing(sc, dag)
    ti = wait_ti(
        env.api, dag, "the task to run with a pid", 60, lambda t: t.get("state") == "running" and t.get("pid")
    )
    first_try = int(ti["try_number"])
    os.kill(int(ti["pid"]), signal.SIGKILL)
    sc.note(f"SIGKILL to the task process {ti['pid']} of try {first_try}")
    ti = wait_ti(
        env.api,
        dag,
        "a new try after the SIGKILL",
        150,
        lambda t: int(t.get("try_number") or 0) > first_try and t.get("state") == "running",
    )
    attached = wait_for_log(env.api, dag, int(ti["try_number"]), "Re-attaching", 90)
    sc.note(f"try {ti['try_number']} {'re-attached' if attached else 'logged no re-attach within 90s'}")
    if run_containers(env.gpu, tid):
        open_gate(env.gpu, tid)
        sc.note("gate opened")
    state = wait_dag_run_end(env.api, dag, RUN_END_S, env.events.second_container(tid))
    sc.note(f"the DAG run ended {state}")
    xcom, _ = env.end_state(dag, "COMPLETED")
    assert xcom.get("exit_code") == 0, f"exit_code {xcom.get('exit_code')}"
    assert "training done" in read(env.s3, dag.results, f"{tid}/learner-1/training-log.txt")
    assert state == "success"


def _staging_relay(sc: Scenario, env: Env) -> Relay:
    relay = Relay(env.services["WMLTRAIN_S3_ENDPOINT"])
    relay.delay = 0.1  # ~2 s of staging for 300 objects and 16 transfer threads
    sc.cleanups.append(relay.close)
    return relay


def scenario_store_blip_during_staging(sc: Scenario, env: Env) -> None:
    """5a. The data store goes away for a moment in the middle of the staging: retried, COMPLETED."""
    relay = _staging_relay(sc, env)
    fired = threading.Event()

    def outage() -> None:
        relay.down()
        sc.note(f"data store down ({relay.count('GET', '/obj-')} objects asked so far)")
        time.sleep(OUTAGE_S)
        relay.up()
        sc.note(f"data store back after {OUTAGE_S}s")

    def on_request(method: str, path: str) -> None:
        if "/obj-" in path and relay.count("GET", "/obj-") >= 100 and not fired.is_set():
            fired.set()
            threading.Thread(target=outage, daemon=True).start()

    relay.on_request = on_request
    dag = env.drop(
        sc,
        "blip",
        f"sh count.sh {DATA_OBJECTS}",
        operator=DEFER,
        data_connection=store_connection(env.services, relay.endpoint),
        data_objects=DATA_OBJECTS,
    )
    tid = env.trigger(sc, dag)
    state = wait_dag_run_end(env.api, dag, RUN_END_S)
    sc.note(f"the DAG run ended {state}; {relay.count('GET', '/obj-')} object GETs through the relay")
    assert fired.is_set(), "the staging never got to 100 objects through the relay: no outage happened"
    env.end_state(dag, "COMPLETED")
    assert read(env.s3, dag.results, f"{tid}/count.txt").strip() == str(DATA_OBJECTS)
    assert state == "success"


def scenario_store_lost_during_staging(sc: Scenario, env: Env) -> None:
    """5b. The data store goes away for good in the middle of the staging: FAILED S302 naming the object,
    and no training started on partial data."""
    relay = _staging_relay(sc, env)

    def on_request(method: str, path: str) -> None:
        if "/obj-" in path and relay.count("GET", "/obj-") >= 100 and relay.is_up:
            relay.down()
            sc.note("data store down for good")

    relay.on_request = on_request
    dag = env.drop(
        sc,
        "lost",
        f"sh count.sh {DATA_OBJECTS}",
        operator="deferrable=True, poll_interval=2, priority_weight=10,",
        data_connection=store_connection(env.services, relay.endpoint),
        data_objects=DATA_OBJECTS,
    )
    tid = env.trigger(sc, dag)
    state = wait_dag_run_end(env.api, dag, RUN_END_S)
    sc.note(f"the DAG run ended {state}")
    assert not relay.is_up, "the staging never got to 100 objects through the relay: the store never failed"
    xcom = status_xcom(env.api, dag)
    stored = bucket_status(env.s3, dag)
    for where, status in (("status XCom", xcom), ("_status.json", stored)):
        assert status is not None, f"no {where}"
        error = status.get("error") or {}
        assert (status.get("state"), error.get("code")) == ("FAILED", "S302"), f"{where}: {status}"
        assert re.search(r"obj-\d{4}", error.get("message", "")), (
            f"{where}: the message names no object: {error}"
        )
    assert "PROCESSING" not in states_of(stored), f"training started on partial data: {states_of(stored)}"
    env.events.settle()
    assert not env.events.creates(tid), f"a container was created on partial data: {env.events.describe(tid)}"
    assert state == "failed"


def scenario_results_store_down_at_storing(sc: Scenario, env: Env) -> None:
    """6. The results store is down when the run stores its results: retried, then FAILED S303, the results
    kept (on the worker / the Docker host) and the message saying where."""
    relay = Relay(env.services["WMLTRAIN_S3_ENDPOINT"])
    sc.cleanups.append(relay.close)
    dag = env.drop(
        sc,
        "storing",
        "sh results.sh 300",
        operator=DEFER,
        results_connection=store_connection(env.services, relay.endpoint),
    )
    tid = env.trigger(sc, dag)
    env.processing(sc, dag)
    relay.down()
    sc.note("results store down for good; opening the gate")
    open_gate(env.gpu, tid)
    state = wait_dag_run_end(env.api, dag, RUN_END_S)
    sc.note(f"the DAG run ended {state}")
    xcom = status_xcom(env.api, dag)
    assert xcom is not None, "no status XCom"
    error = xcom.get("error") or {}
    assert (xcom.get("state"), error.get("code")) == ("FAILED", "S303"), (
        f"the results store was down at STORING: expected FAILED S303, the status XCom says "
        f"{short_status(xcom)}; containers left: "
        f"{[(c['Names'], c['State']) for c in run_containers(env.gpu, tid)]}"
    )
    message = str(error.get("message", ""))
    # Where the results are kept: a directory of the worker (this machine), or the run's container,
    # kept on the Docker host; the message must say which.
    paths = [Path(p.rstrip(".,;:)'\"")) for p in re.findall(r"(/[\w./-]+)", message)]
    kept = [p for p in paths if len(p.parts) >= 4 and p.exists()]  # not a whole /var
    found = {f.name for p in kept for f in (p.rglob("*") if p.is_dir() else [p])}
    container = labels.run_container_name(tid)
    in_container = container in message and bool(run_containers(env.gpu, tid))
    assert "model.bin" in found or in_container, (
        "the S303 message does not say where the results are kept (no directory of this machine holding "
        f"model.bin, nor the kept container {container}): {message!r}; existing paths named: {kept}"
    )
    stored = bucket_status(env.s3, dag)
    assert (stored or {}).get("state") != "COMPLETED", f"_status.json says COMPLETED: {stored}"
    assert f"{tid}/model.bin" not in keys(env.s3, dag.results), "model.bin reached a store that was down"
    env.events.settle()
    assert len(env.events.creates(tid)) == 1, env.events.describe(tid)
    assert state == "failed"


def scenario_oom_killed(sc: Scenario, env: Env) -> None:
    """7. The container is OOM-killed: FAILED, "out of memory" in the message, the logs stored."""
    dag = env.drop(sc, "oom", "sh oom.sh", operator=DEFER + ' mem_limit="16m",')
    tid = env.trigger(sc, dag)
    state = wait_dag_run_end(env.api, dag, RUN_END_S)
    sc.note(f"the DAG run ended {state}")
    xcom, _ = env.end_state(dag, "FAILED")
    message = str((xcom.get("error") or {}).get("message", ""))
    assert "out of memory" in message.lower(), (
        f"the message does not say 'out of memory': {xcom.get('error')}"
    )
    log_key = f"{tid}/learner-1/training-log.txt"
    assert log_key in keys(env.s3, dag.results, f"{tid}/"), "the training log was not stored"
    assert "allocating 256 MiB" in read(env.s3, dag.results, log_key)
    assert state == "failed"


def scenario_halt_ignoring_sigterm(sc: Scenario, env: Env) -> None:
    """8. `wmltrain halt` of a container that ignores SIGTERM: SIGKILL after the grace period, HALTED, the
    logs stored, the container gone."""
    grace = 5
    dag = env.drop(
        sc, "stubborn", "sh stubborn.sh 300", operator=f"halt_grace_period={grace}, priority_weight=10,"
    )
    tid = env.trigger(sc, dag)
    env.processing(sc, dag)
    wait_for("the training to start ignoring SIGTERM", 60, lambda: _log_has(env.gpu, tid, "ignoring SIGTERM"))
    assert isinstance(env.cli, Cli)
    halted_at = time.time()
    result = env.cli.ok("halt", tid)
    sc.note(f"wmltrain halt: {result.stdout.strip()[:200]}")
    log_key = f"{tid}/learner-1/training-log.txt"
    wait_for(
        "the run to end HALTED with its logs stored and its container gone",
        90,
        lambda: (
            not run_containers(env.gpu, tid)
            and (bucket_status(env.s3, dag) or {}).get("state") == "HALTED"
            and log_key in keys(env.s3, dag.results, f"{tid}/")
        ),
        interval=2,
    )
    sc.note("HALTED, logs stored, container gone")
    wait_dag_run_end(env.api, dag, 60)
    # The detached halter writes the end to the bucket; the task's last XCom says it was halting, and
    # the service (wmltrain show) tells HALTED from the task marked failed by wmltrain halt.
    xcom, _ = env.end_state(dag, "HALTED", xcom_state="PROCESSING")
    assert str(xcom.get("phase", "")).startswith("halting"), short_status(xcom)
    shown = env.cli.show(tid)
    assert shown["state"] == "HALTED", shown
    deaths = env.events.of(tid, "die")
    assert len(deaths) == 1, env.events.describe(tid)
    died_at = int(deaths[0]["timeNano"]) / 1e9
    exit_code = deaths[0].get("Actor", {}).get("Attributes", {}).get("exitCode")
    assert exit_code == "137", f"the container ended with {exit_code}, not SIGKILL (137)"
    assert died_at - halted_at >= grace - 0.5, (
        f"the container died {died_at - halted_at:.1f}s after the halt, before the {grace}s grace period"
    )
    assert "ignoring SIGTERM" in read(env.s3, dag.results, log_key)


def _log_has(gpu: docker.APIClient, training_id: str, text: str) -> bool:
    with contextlib.suppress(docker.errors.NotFound):
        return text in gpu.logs(labels.run_container_name(training_id)).decode(errors="replace")
    return False


def scenario_docker_daemon_restart(sc: Scenario, env: Env) -> None:
    """9. The Docker daemon restarts while the run trains (a private stand-in GPU daemon): the outcome is
    recorded, consistently in the bucket and the XCom; never left PROCESSING; never a second container."""
    daemon = PrivateDockerd(env.services)
    sc.cleanups.append(daemon.destroy)
    daemon.start()
    daemon.load_image(env.services["WMLTRAIN_GPU_DOCKER_HOST"], env.services["WMLTRAIN_TEST_IMAGE"])
    sc.note(f"private GPU daemon up on {daemon.url}")
    events = CreateEvents(daemon.url)
    sc.cleanups.append(events.close)
    private = docker.APIClient(base_url=daemon.url, timeout=30)
    dag = env.drop(sc, "dockerd", "sh gate.sh 300", operator=RETRY, docker_url=daemon.url)
    tid = env.trigger(sc, dag, events)
    env.processing(sc, dag)
    daemon.stop()
    sc.note("private daemon stopped (its containers stopped with it)")
    daemon.start()
    sc.note("private daemon started again")
    state = wait_dag_run_end(env.api, dag, RUN_END_S, events.second_container(tid))
    sc.note(f"the DAG run ended {state}")
    xcom = status_xcom(env.api, dag)
    stored = bucket_status(env.s3, dag)
    assert xcom is not None, f"no status XCom (bucket: {stored})"
    assert stored is not None, f"no _status.json (XCom: {xcom})"
    assert xcom.get("state") in {"COMPLETED", "FAILED"}, f"status XCom left {xcom.get('state')}: {xcom}"
    assert stored.get("state") == xcom.get("state"), (
        f"bucket {stored.get('state')} vs XCom {xcom.get('state')}"
    )
    assert (stored.get("error") or {}).get("code") == (xcom.get("error") or {}).get("code")
    left = [(c["Names"], c["State"]) for c in run_containers(private, tid)]
    assert not [c for c in left if c[1] == "running"], f"a container still runs: {left}"
    events.settle()
    assert len(events.creates(tid)) == 1, f"created {len(events.creates(tid))} times: {events.describe(tid)}"
    sc.note(f"outcome: {xcom.get('state')} {xcom.get('error')}; containers left {left}")


def scenario_twenty_runs_on_four_gpus(sc: Scenario, env: Env) -> None:
    """10. 20 `small` runs of ~5 s started at once (a mapped task, deferrable) on 4 stand-in GPUs: all
    COMPLETED, none fails for lack of a GPU, and no two running containers ever share a GPU."""
    grid = [{"n": i} for i in range(GRID_SIZE)]
    # Retries: Airflow 3.3 may fail a deferred task whose trigger fires within seconds (the executor's
    # late "success" of the deferring try meets the re-queued task: apache/airflow#66374, #71580); a
    # retry re-attaches to the container, so the run still completes once.
    dag = env.drop(
        sc,
        "grid",
        "sh times.sh 5 --n 0",
        operator="deferrable=True, poll_interval=2, retries=2, retry_delay=timedelta(seconds=5),",
        grid=grid,
    )
    env.trigger(sc, dag)
    state = wait_dag_run_end(env.api, dag, 420)
    sc.note(f"the DAG run ended {state}")
    problems = []
    intervals = []
    env.events.settle()
    for index in range(GRID_SIZE):
        tid = dag.training_id(index)
        xcom = status_xcom(env.api, dag, index)
        if (xcom or {}).get("state") != "COMPLETED":
            ti = task_instance(env.api, dag, index)
            problems.append(
                f"[{index}] {tid}: XCom {xcom and {k: xcom.get(k) for k in ('state', 'error')}}; task "
                f"instance {ti.get('state')} try {ti.get('try_number')}; events {env.events.describe(tid)}\n"
                + task_logs(env.api, dag, index, tail=3000)
            )
            continue
        try:
            env.end_state(dag, "COMPLETED", map_index=index, settle=False)
        except AssertionError as err:
            problems.append(f"[{index}] {err}")
            continue
        visible, start, end = read(env.s3, dag.results, f"{tid}/times.txt").split()
        created = env.events.creates(tid)
        inspected = env.events.gpus.get(str(created[0].get("id")), "?") if created else "?"
        if [visible] != list(xcom.get("gpus") or []) or inspected != visible:
            problems.append(
                f"[{index}] saw GPU {visible}, status {xcom.get('gpus')}, docker inspect {inspected}"
            )
        intervals.append((visible, float(start), float(end), index))
    assert not problems, "\n".join(problems)
    for i, (gpu_a, start_a, end_a, a) in enumerate(intervals):
        for gpu_b, start_b, end_b, b in intervals[i + 1 :]:
            assert gpu_a != gpu_b or end_a <= start_b or end_b <= start_a, (
                f"GPU {gpu_a} shared by runs [{a}] {start_a}-{end_a} and [{b}] {start_b}-{end_b}"
            )
    # Every run container on the host meanwhile (the other scenarios' too), from the daemon's events.
    everything = env.events.run_intervals()
    overlaps = gpu_overlaps(everything)
    assert not overlaps, "\n".join(overlaps)
    sc.note(
        f"{len(intervals)} runs on GPUs {sorted({v for v, *_ in intervals})}; "
        f"{len(everything)} run containers checked"
    )
    assert state == "success"


SCENARIOS = {
    "frozen_supervisor": (scenario_frozen_supervisor, 480),
    "sigkill_worker": (scenario_sigkill_worker, 420),
    "store_blip_during_staging": (scenario_store_blip_during_staging, 300),
    "store_lost_during_staging": (scenario_store_lost_during_staging, 300),
    "results_store_down_at_storing": (scenario_results_store_down_at_storing, 360),
    "oom_killed": (scenario_oom_killed, 300),
    "halt_ignoring_sigterm": (scenario_halt_ignoring_sigterm, 360),
    "docker_daemon_restart": (scenario_docker_daemon_restart, 420),
    "twenty_runs_on_four_gpus": (scenario_twenty_runs_on_four_gpus, 480),
}


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
    """Every scenario this session selected, started at once (each in its own thread)."""
    gpu = docker.APIClient(base_url=services["WMLTRAIN_GPU_DOCKER_HOST"], timeout=60)
    env = Env(services=services, api=api, s3=s3_client, gpu=gpu, model=model, events=gpu_events, cli=cli)
    made = {
        name: Scenario(name=name, body=lambda sc, body=body: body(sc, env), deadline_s=deadline)
        for name, (body, deadline) in SCENARIOS.items()
    }
    started = start_selected(request, made)
    yield started
    for scenario in started.values():  # never leave one running (its clean-ups remove what it made)
        if scenario.thread is not None:
            scenario.thread.join(timeout=5)
    gpu.close()


def test_frozen_supervisor_leaves_the_moved_run_alone(scenarios: dict[str, Scenario]) -> None:
    scenarios["frozen_supervisor"].result()


def test_sigkill_worker_retry_reattaches(scenarios: dict[str, Scenario]) -> None:
    scenarios["sigkill_worker"].result()


def test_store_blip_during_staging_is_retried(scenarios: dict[str, Scenario]) -> None:
    scenarios["store_blip_during_staging"].result()


def test_store_lost_during_staging_fails_s302(scenarios: dict[str, Scenario]) -> None:
    scenarios["store_lost_during_staging"].result()


def test_results_store_down_at_storing_fails_s303(scenarios: dict[str, Scenario]) -> None:
    scenarios["results_store_down_at_storing"].result()


def test_oom_killed_run_fails_out_of_memory(scenarios: dict[str, Scenario]) -> None:
    scenarios["oom_killed"].result()


def test_halt_ignoring_sigterm_kills_after_grace(scenarios: dict[str, Scenario]) -> None:
    scenarios["halt_ignoring_sigterm"].result()


def test_docker_daemon_restart_outcome_recorded(scenarios: dict[str, Scenario]) -> None:
    scenarios["docker_daemon_restart"].result()


def test_twenty_runs_on_four_gpus_never_share(scenarios: dict[str, Scenario]) -> None:
    scenarios["twenty_runs_on_four_gpus"].result()
