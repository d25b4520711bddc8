"""The example experiments of ``dags/`` on the real services, through the real scheduler (issue 11).

* ``mnist_grid``: a 3×2 grid (learning rate × batch size) of the MNIST example, in the offline PyTorch
  image on the stand-in GPU daemon (4 GPUs, pool ``wmltrain_gpus``): all six complete, no two overlapping
  runs share a GPU, every results folder holds the metrics per step and a learning curve, ``best`` picks
  the run with the best accuracy and stores the grid chart, the runs' asset events schedule
  ``mnist_evaluate``.
* ``mnist_retraining``: a backfill over three dates creates three runs with distinct training ids, each
  trained on its date's folder of the data bucket.

The runs train for a few hundred examples (the DAGs' ``trainingIters`` param): the point is the
orchestration, not the accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.faults.fault_helpers import CreateEvents
from tests.integration.service_helpers import (
    api_client,
    drop_buckets,
    keys,
    make_buckets,
    quote,
    read,
    wait_for,
    wait_for_dag,
    wait_for_dag_run,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MNIST_DATA = REPO_ROOT / "examples" / "mnist" / "data"
PARSE_TIMEOUT_S = 180
GRID_TIMEOUT_S = 900
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def api(services: dict[str, str]) -> Iterator[httpx.Client]:
    with api_client(services) as client:
        yield client


@pytest.fixture(scope="module")
def mnist_on_the_gpu_host(services: dict[str, str]) -> None:
    """The example's zip, and the offline PyTorch image on the stand-in GPU daemon (built from the cached
    rootfs and wheels when missing: ``images/build``)."""
    subprocess.run(["make", "-s", "build/mnist-model.zip"], cwd=REPO_ROOT, check=True)
    env = {**os.environ, "DOCKER_HOST": services["WMLTRAIN_GPU_DOCKER_HOST"]}
    proc = subprocess.run(
        [str(REPO_ROOT / "images" / "build")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture
def unpaused(api: httpx.Client) -> Iterator[Any]:
    """Unpause DAGs for the test; paused again afterwards (as the services leave every DAG)."""
    done: list[str] = []

    def unpause(dag_id: str) -> None:
        wait_for_dag(api, dag_id, PARSE_TIMEOUT_S)
        response = api.patch(f"/dags/{dag_id}", json={"is_paused": False})
        assert response.status_code == 200, response.text
        done.append(dag_id)

    yield unpause
    for dag_id in done:
        api.patch(f"/dags/{dag_id}", json={"is_paused": True})


def upload_mnist(s3: Any, bucket: str, prefix: str = "") -> None:
    for path in sorted(MNIST_DATA.iterdir()):
        s3.put_object(Bucket=bucket, Key=prefix + path.name, Body=path.read_bytes())


def xcom(api: httpx.Client, dag_id: str, run_id: str, task_id: str, key: str, map_index: int = -1) -> Any:
    response = api.get(
        f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/xcomEntries/{key}",
        params={"map_index": map_index, "deserialize": "true"},
    )
    assert response.status_code == 200, response.text
    value = response.json()["value"]
    return json.loads(value) if isinstance(value, str) else value


def test_the_example_grid_runs_on_four_gpus_picks_its_best_run_and_triggers_the_evaluation(
    services: dict[str, str], api: httpx.Client, s3_client: Any, mnist_on_the_gpu_host: None, unpaused: Any
) -> None:
    data, results = make_buckets(s3_client, "data", "results")
    events = CreateEvents(services["WMLTRAIN_GPU_DOCKER_HOST"])
    try:
        upload_mnist(s3_client, data)
        unpaused("mnist_evaluate")
        unpaused("mnist_grid")
        before = {r["dag_run_id"] for r in api.get("/dags/mnist_evaluate/dagRuns").json()["dag_runs"]}
        conf = {"data_bucket": data, "results_bucket": results, "trainingIters": 1920}
        response = api.post("/dags/mnist_grid/dagRuns", json={"logical_date": None, "conf": conf})
        assert response.status_code == 200, response.text
        run_id = response.json()["dag_run_id"]
        wait_for_dag_run(api, "mnist_grid", run_id, GRID_TIMEOUT_S)

        # Six runs, each labelled by its hyperparameters in the grid view.
        mapped = api.get(
            f"/dags/mnist_grid/dagRuns/{quote(run_id)}/taskInstances/train/listMapped", params={"limit": 20}
        ).json()["task_instances"]
        labels = sorted(str(ti.get("rendered_map_index")) for ti in mapped)
        assert len(mapped) == 6, mapped
        assert all(ti["state"] == "success" for ti in mapped), mapped
        assert "learningRate=0.001,batchSize=64,trainingIters=1920" in labels, labels

        statuses = {}
        for ti in mapped:
            result = xcom(api, "mnist_grid", run_id, "train", "return_value", ti["map_index"])
            tid = result["training_id"]
            status = json.loads(read(s3_client, results, f"{tid}/_status.json"))
            assert status["state"] == "COMPLETED", status
            assert status["hyperparameters"]["trainingIters"] in (1920, "1920"), status["hyperparameters"]
            # Metrics per step and a learning curve in every results folder.
            assert len(status["steps"]) >= 2, status
            assert "accuracy" in status["metrics"], status
            stored = keys(s3_client, results, f"{tid}/")
            assert {f"{tid}/metrics.jsonl", f"{tid}/learning-curve.png", f"{tid}/model.pt"} <= stored, stored
            curve = s3_client.get_object(Bucket=results, Key=f"{tid}/learning-curve.png")["Body"].read()
            assert curve.startswith(PNG)
            assert len(curve) > 5000
            statuses[tid] = status

        # No two overlapping runs shared a GPU (the daemon's own start/die events and devices).
        events.settle()
        ours = [iv for iv in events.run_intervals() if any(tid in iv[0] for tid in statuses)]
        assert len(ours) == 6, ours
        for i, (name_a, gpus_a, start_a, end_a) in enumerate(ours):
            for name_b, gpus_b, start_b, end_b in ours[i + 1 :]:
                shared = set(gpus_a.split(",")) & set(gpus_b.split(",")) - {"", "?"}
                assert not shared or end_a <= start_b or end_b <= start_a, (name_a, name_b, shared)
        assert len({iv[1] for iv in ours}) > 1, f"every run on one GPU: {ours}"

        # The best run is the one with the best accuracy; the grid chart is stored with it.
        best = xcom(api, "mnist_grid", run_id, "best", "return_value")
        top = max(statuses.values(), key=lambda s: s["metrics"]["accuracy"])
        assert best["metric"] == "accuracy"
        assert best["mode"] == "max"
        assert best["value"] == top["metrics"]["accuracy"], (best, top["metrics"])
        if best["training_id"] != top["training_id"]:  # a tie: both have the best value
            assert statuses[best["training_id"]]["metrics"]["accuracy"] == best["value"]
        bucket, _, key = best["chart_location"].partition("://")[2].partition("/")
        assert bucket == results
        assert s3_client.get_object(Bucket=bucket, Key=key)["Body"].read().startswith(PNG)

        # The runs' asset events exist and scheduled the evaluation DAG.
        asset_events = api.get(
            "/assets/events", params={"source_dag_id": "mnist_grid", "source_run_id": run_id, "limit": 50}
        ).json()["asset_events"]
        assert {e["extra"]["training_id"] for e in asset_events} == set(statuses), asset_events

        def evaluated() -> list[dict[str, Any]] | None:
            runs = api.get("/dags/mnist_evaluate/dagRuns").json()["dag_runs"]
            new = [r for r in runs if r["dag_run_id"] not in before and r["state"] in ("success", "failed")]
            return new or None

        new_runs = wait_for("mnist_evaluate to be scheduled on the new models", 180, evaluated)
        assert all(r["state"] == "success" for r in new_runs), new_runs
        seen: set[str] = set()
        for r in new_runs:
            seen |= {
                m["training_id"]
                for m in xcom(api, "mnist_evaluate", r["dag_run_id"], "evaluate", "return_value")
            }
        assert seen & set(statuses), (seen, set(statuses))
    finally:
        events.close()
        drop_buckets(s3_client, [data, results])


def test_a_backfill_of_the_retraining_dag_creates_one_run_per_date(
    api: httpx.Client, s3_client: Any, mnist_on_the_gpu_host: None, unpaused: Any
) -> None:
    """Three dates, three runs, three training ids, each trained on its date's data. (Unpausing the DAG
    also lets the scheduler create the latest daily run, on the default data bucket: it ends at once,
    that bucket does not exist here; the backfill's runs are the ones checked.)"""
    data, results = make_buckets(s3_client, "data", "results")
    dates = ["2026-11-02", "2026-11-03", "2026-11-04"]
    try:
        for day in dates:
            upload_mnist(s3_client, data, f"{day}/")
        unpaused("mnist_retraining")
        # Runs of these dates left by an earlier session on the same services would make the backfill
        # create none ("already exists"): a fresh start, as on a new machine.
        for run in api.get("/dags/mnist_retraining/dagRuns", params={"limit": 100}).json()["dag_runs"]:
            if str(run.get("logical_date"))[:10] in dates:
                api.delete(f"/dags/mnist_retraining/dagRuns/{quote(run['dag_run_id'])}")
        body = {
            "dag_id": "mnist_retraining",
            "from_date": f"{dates[0]}T00:00:00Z",
            "to_date": f"{dates[-1]}T00:00:00Z",
            "max_active_runs": 3,
            "dag_run_conf": {"data_bucket": data, "results_bucket": results, "trainingIters": 320},
        }
        response = api.post("/backfills", json=body)
        assert response.status_code == 200, response.text
        backfill_id = response.json()["id"]

        def backfill_runs() -> list[dict[str, Any]] | None:
            runs = api.get("/dags/mnist_retraining/dagRuns", params={"limit": 100}).json()["dag_runs"]
            ours = [r for r in runs if r.get("conf", {}).get("data_bucket") == data]
            if len(ours) == len(dates) and all(r["state"] in ("success", "failed") for r in ours):
                return ours
            return None

        runs = wait_for(f"the three runs of backfill {backfill_id}", GRID_TIMEOUT_S, backfill_runs)
        for r in runs:
            wait_for_dag_run(api, "mnist_retraining", r["dag_run_id"], 10)  # fails with the logs if it failed
        assert {r["run_type"] for r in runs} == {"backfill"}, runs
        by_date = {}
        for r in runs:
            result = xcom(api, "mnist_retraining", r["dag_run_id"], "train", "return_value")
            status = json.loads(read(s3_client, results, f"{result['training_id']}/_status.json"))
            assert status["state"] == "COMPLETED", status
            day = str(r["logical_date"])[:10]
            assert f"{day}/" in status["data_location"], (day, status["data_location"])
            by_date[day] = result["training_id"]
        assert sorted(by_date) == dates
        assert len(set(by_date.values())) == 3, by_date
    finally:
        drop_buckets(s3_client, [data, results])
