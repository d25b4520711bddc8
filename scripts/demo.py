"""``make demo``: the example training run end to end through Airflow, on embedded defaults.

``scripts/demo.py --prepare`` does steps 1-3 only (the image on both of the services' Docker daemons):
then ``wmltrain train build/mnist-model.zip examples/mnist/manifest.yaml`` runs the example on the
services' Airflow (the README's CLI quick start).

1. start the local services (Docker Engine, Swift + S3 all-in-one) with ``scripts/services up``;
2. build the PyTorch CPU training image offline (``images/build``);
3. upload the example's MNIST-format digits into the data bucket, create the results bucket;
4. check the submission (``wmltrain validate``), then run the ``mnist_training`` DAG with
   ``airflow dags test`` on a SQLite Airflow (``.airflow``): a real task, staging, container, upload;
5. print the results listing of the bucket and the trained model's accuracy.

On a Docker host with an NVIDIA runtime the run gets a GPU; on one without, the demo switches the CPU
fallback on explicitly (``AIRFLOW__WMLTRAIN__CPU_FALLBACK=True``) and says so.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_ZIP = ROOT / "build" / "mnist-model.zip"
MANIFEST = ROOT / "examples" / "mnist" / "manifest.yaml"
DATA = ROOT / "examples" / "mnist" / "data"
CONN_ID = "wmltrain_store_s3"
DATA_BUCKET, RESULTS_BUCKET = "mnist-training-data", "mnist-training-models"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(args: list[str], *, env: dict[str, str] | None = None, capture: bool = False) -> str:
    proc = subprocess.run(args, env=env, cwd=ROOT, check=False, text=True, capture_output=capture)
    if proc.returncode != 0:
        if capture:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        sys.exit(f"demo: {shlex.join(args)} failed (exit {proc.returncode})")
    return proc.stdout if capture else ""


def services_env() -> dict[str, str]:
    out = run([str(ROOT / "scripts" / "services"), "up"], capture=True)
    env = {}
    for line in out.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


def main() -> int:
    prepare_only = sys.argv[1:] == ["--prepare"]
    if sys.argv[1:] and not prepare_only:
        sys.exit("usage: scripts/demo.py [--prepare]")
    step("Starting the local services (Docker Engine, Swift + S3 all-in-one)")
    services = services_env()
    os.environ.update(services)
    print(f"S3 endpoint {services['WMLTRAIN_S3_ENDPOINT']}, Docker {services['DOCKER_HOST']}")

    step("Building the training image airflow-wmltrain/pytorch:2.13-cpu (offline)")
    # also on the stand-in GPU host, where the services' Airflow sends runs (wmltrain train)
    run([str(ROOT / "images" / "build"), "--to", services["WMLTRAIN_GPU_DOCKER_HOST"]])

    airflow_home = os.environ.get("AIRFLOW_HOME", str(ROOT / ".airflow"))
    env = {
        **os.environ,
        "AIRFLOW_HOME": airflow_home,
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__WMLTRAIN__FRAMEWORKS_FILE": str(ROOT / "examples" / "frameworks-local.yaml"),
        "WMLTRAIN_DOCKER_URL": services["DOCKER_HOST"],
        f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(
            {
                "conn_type": "aws",
                "login": services["WMLTRAIN_STORE_USER"],
                "password": services["WMLTRAIN_STORE_KEY"],
                "extra": {
                    "endpoint_url": services["WMLTRAIN_S3_ENDPOINT"],
                    "region_name": services["WMLTRAIN_S3_REGION"],
                },
            }
        ),
    }
    os.environ.update(env)

    from airflow_wmltrain.hooks.docker import TrainingDockerHook
    from airflow_wmltrain.runtime import gpus

    prepare_buckets()
    if prepare_only:  # the README's CLI quick start on the services: wmltrain train does the rest
        print("\nReady: wmltrain train build/mnist-model.zip examples/mnist/manifest.yaml --wait")
        return 0
    cli = TrainingDockerHook(docker_url=services["DOCKER_HOST"]).api_client
    if gpus.has_nvidia_runtime(cli, "airflow-wmltrain/pytorch:2.13-cpu"):
        print(f"The Docker host {services['DOCKER_HOST']} has an NVIDIA runtime: the run gets a GPU.")
    else:
        env["AIRFLOW__WMLTRAIN__CPU_FALLBACK"] = "True"
        print(
            f"NOTE: the Docker host {services['DOCKER_HOST']} has no NVIDIA runtime; the demo switches the "
            "CPU fallback on (AIRFLOW__WMLTRAIN__CPU_FALLBACK=True): the 'small' run trains on the CPU."
        )

    step("Checking the submission: wmltrain validate")
    run([str(BIN / "wmltrain"), "validate", str(MODEL_ZIP), str(MANIFEST)], env=env)
    run_dag(env)
    return show_results()


def prepare_buckets() -> None:
    """The data bucket with the example's digits and the results bucket, through the connection CONN_ID
    (also used by scripts/stack_smoke.py, against the compose stack's store)."""
    from airflow_wmltrain.manifest import ConnectionId, StoreReference
    from airflow_wmltrain.storage import open_store
    from airflow_wmltrain.storage.transfer import TransferError
    from airflow_wmltrain.storage.upload import upload_tree

    step(f"Uploading the example data into bucket '{DATA_BUCKET}'; results go to '{RESULTS_BUCKET}'")
    for bucket in (DATA_BUCKET, RESULTS_BUCKET):
        ref = StoreReference(type="s3", bucket=bucket, connection=ConnectionId(conn_id=CONN_ID))
        with open_store(ref) as store:
            try:
                store.request("PUT", "")  # create the bucket
            except TransferError as err:
                if err.status != 409:  # 409: it exists already
                    raise
            if bucket == DATA_BUCKET:
                print(upload_tree(store, DATA, "").summary())


def run_dag(env: dict[str, str]) -> None:
    step("Preparing Airflow (SQLite) and running the mnist_training DAG: airflow dags test mnist_training")
    run([str(BIN / "airflow"), "db", "migrate"], env=env, capture=True)
    log_path = ROOT / "build" / "demo-airflow.log"
    with log_path.open("w") as log:
        proc = subprocess.run(
            [str(BIN / "airflow"), "dags", "test", "mnist_training"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    shown = ("Training run", "epoch", "accuracy", "Staging", "Stored", "GPU", "device", "DagRun Finished")
    for line in log_path.read_text(errors="replace").splitlines():
        if any(word in line for word in shown) and "dagrun info" not in line:
            print("   " + line[:220])
    if proc.returncode != 0:
        sys.exit(f"demo: the DAG run failed; the whole Airflow log is in {log_path}")


def show_results(training_id: str | None = None) -> int:
    """The results listing of a run (default: the latest) and its model's accuracy; 0 if it COMPLETED."""
    from airflow_wmltrain.manifest import ConnectionId, StoreReference
    from airflow_wmltrain.storage import open_store

    step(f"The results in bucket '{RESULTS_BUCKET}'")
    ref = StoreReference(type="s3", bucket=RESULTS_BUCKET, connection=ConnectionId(conn_id=CONN_ID))
    with open_store(ref) as store:
        objects = sorted(store.list_objects(), key=lambda o: o.key)
        if training_id is None:
            statuses = [o for o in objects if o.key.endswith("/_status.json")]
            latest = max(statuses, key=lambda o: store.get_json(o.key).get("updated_at") or "")
            training_id = latest.key.split("/", 1)[0]
        for obj in objects:
            if obj.key.startswith(training_id + "/"):
                print(f"   {obj.size:>10}  {RESULTS_BUCKET}/{obj.key}")
        status = store.get_json(f"{training_id}/_status.json")
        metrics = store.get_json(f"{training_id}/metrics.json")
    print(f"\nTraining run {training_id}: {status['state']}, GPUs {status['gpus'] or 'none (CPU)'}")
    print(f"Accuracy of the trained model on the test digits: {metrics['accuracy']:.4f}")
    return 0 if status["state"] == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
