"""Scheduled on new models: runs whenever MNIST training runs complete (the asset alias ``mnist-models``).

Each completed run of ``mnist_grid`` or ``mnist_retraining`` emits an asset event for its results
location; Airflow starts this DAG with the events it has gathered since its last run. The task reads
what each event says (training id, results location, final metrics) and reports which models pass the
accuracy bar — where an evaluation on held-out data or a deployment step would go.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from airflow.sdk import DAG, AssetAlias, task

ACCURACY_BAR = 0.9
log = logging.getLogger(__name__)

with DAG(
    dag_id="mnist_evaluate",
    description="Evaluate each new MNIST model (scheduled on the results of completed training runs)",
    schedule=[AssetAlias("mnist-models")],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["wmltrain", "example"],
    doc_md=__doc__,
) as dag:

    @task
    def evaluate(*, triggering_asset_events: Any = None) -> list[dict[str, Any]]:
        models = []
        for events in (triggering_asset_events or {}).values():
            for event in events:
                extra = dict(event.extra or {})
                accuracy = (extra.get("metrics") or {}).get("accuracy")
                passed = isinstance(accuracy, (int, float)) and accuracy >= ACCURACY_BAR
                log.info(
                    "%s: accuracy %s (%s %s) at %s",
                    extra.get("training_id"),
                    accuracy,
                    "passes" if passed else "below",
                    ACCURACY_BAR,
                    extra.get("results_location"),
                )
                models.append({**extra, "passed": passed})
        return models

    evaluate()
