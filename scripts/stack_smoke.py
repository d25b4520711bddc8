"""The object-store steps of ``scripts/stack-smoke``, run with the project's venv against the compose
stack's store (published on the host): the example's buckets (``demo.prepare_buckets``), and a run's
results (``demo.show_results`` plus the files a finished run must have stored).

    python scripts/stack_smoke.py upload
    python scripts/stack_smoke.py check TRAINING_ID

Environment: ``WMLTRAIN_STACK_STORE_URL`` (the store's S3 endpoint) and ``WMLTRAIN_STORE_KEY``.
"""

from __future__ import annotations

import json
import os
import sys

import demo

#: What every finished run of the example stores under its training id (SPEC §3, the example's script).
REQUIRED = ("model.pt", "metrics.json", "_status.json", "_manifest.yml", "learner-1/training-log.txt")


def _connect() -> None:
    os.environ[f"AIRFLOW_CONN_{demo.CONN_ID.upper()}"] = json.dumps(
        {
            "conn_type": "aws",
            "login": "test:tester",
            "password": os.environ["WMLTRAIN_STORE_KEY"],
            "extra": {"endpoint_url": os.environ["WMLTRAIN_STACK_STORE_URL"], "region_name": "us-east-1"},
        }
    )


def check(training_id: str) -> int:
    from airflow_wmltrain.manifest import ConnectionId, StoreReference
    from airflow_wmltrain.storage import open_store

    status = demo.show_results(training_id)
    ref = StoreReference(type="s3", bucket=demo.RESULTS_BUCKET, connection=ConnectionId(conn_id=demo.CONN_ID))
    with open_store(ref) as store:
        keys = {o.key for o in store.list_objects(f"{training_id}/")}
    missing = [name for name in REQUIRED if f"{training_id}/{name}" not in keys]
    if missing:
        lacks = ", ".join(missing)
        print(f"stack-smoke: {training_id} lacks {lacks} in {demo.RESULTS_BUCKET}", file=sys.stderr)
        return 1
    return status


def main(argv: list[str]) -> int:
    _connect()
    if argv == ["upload"]:
        demo.prepare_buckets()
        return 0
    if len(argv) == 2 and argv[0] == "check":
        return check(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
