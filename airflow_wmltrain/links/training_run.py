"""The "Training results" extra link: where a training run's model, logs and status are.

The task pushes, as soon as it knows the training id, the XCom ``results_location`` (``s3://bucket/
training-id/`` or ``swift://container/training-id/``); the link is that location.

In Airflow 3 the UI never calls :meth:`TrainingResultsLink.get_link`: the task runner calls it when the
task instance finishes and stores the answer in the XCom named by :attr:`~BaseOperatorLink.xcom_key`,
which the API server reads.  A training run can run for hours, deferred; :meth:`TrainingResultsLink.persist`
therefore also stores that answer right away, so that the link works while the run trains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperatorLink

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey

__all__ = ["RESULTS_LOCATION_KEY", "TrainingResultsLink"]

#: XCom key of the run's results folder (``s3://bucket/training-id/``).
RESULTS_LOCATION_KEY = "results_location"


class TrainingResultsLink(BaseOperatorLink):
    """Link to a training run's results folder."""

    name = "Training results"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """The ``results_location`` pushed by the task, else ``""``.

        :param operator: the task the link belongs to.
        :param ti_key: the task instance.
        """
        from airflow.sdk.execution_time.xcom import XCom

        value = XCom.get_value(ti_key=ti_key, key=RESULTS_LOCATION_KEY)
        return str(value) if value else ""

    @classmethod
    def persist(cls, context: Context, results_location: str) -> None:
        """Push the XCom the link reads, and the link itself (so the UI shows it while the task runs).

        :param context: the task's context.
        :param results_location: the run's results folder, ``s3://bucket/training-id/``.
        """
        ti: Any = context["ti"]
        ti.xcom_push(key=RESULTS_LOCATION_KEY, value=results_location)
        # Airflow stores the link under this key only when the task instance finishes; the same value
        # now makes the button work during a deferred run (it is overwritten with the same value then).
        ti.xcom_push(key=cls().xcom_key, value=results_location)
