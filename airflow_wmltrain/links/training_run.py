"""The "Training results" extra link: where a training run's model, logs and status are.

The task pushes, as soon as it knows the training id, the XCom ``results_location`` (``s3://bucket/
training-id/`` or ``swift://container/training-id/``) and, when a console is configured,
``results_console_url`` (an ``http(s)`` page showing that folder).  The link is the console page when
there is one, else the location.

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

__all__ = ["RESULTS_CONSOLE_URL_KEY", "RESULTS_LOCATION_KEY", "TrainingResultsLink"]

#: XCom key of the run's results folder (``s3://bucket/training-id/``).
RESULTS_LOCATION_KEY = "results_location"
#: XCom key of a console page showing that folder (optional).
RESULTS_CONSOLE_URL_KEY = "results_console_url"


class TrainingResultsLink(BaseOperatorLink):
    """Link to a training run's results: the console page if one was pushed, else the bucket URL."""

    name = "Training results"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """The console URL pushed by the task, else its ``results_location``, else ``""``.

        :param operator: the task the link belongs to.
        :param ti_key: the task instance.
        """
        from airflow.sdk.execution_time.xcom import XCom

        for key in (RESULTS_CONSOLE_URL_KEY, RESULTS_LOCATION_KEY):
            value = XCom.get_value(ti_key=ti_key, key=key)
            if value:
                return str(value)
        return ""

    @classmethod
    def link_for(cls, results_location: str, console_url: str | None = None) -> str:
        """What :meth:`get_link` answers for these values."""
        return console_url or results_location

    @classmethod
    def persist(cls, context: Context, results_location: str, *, console_url: str | None = None) -> None:
        """Push the XComs the link reads, and the link itself (so the UI shows it while the task runs).

        :param context: the task's context.
        :param results_location: the run's results folder, ``s3://bucket/training-id/``.
        :param console_url: an ``http(s)`` page showing that folder, if a console is configured.
        """
        ti: Any = context["ti"]
        ti.xcom_push(key=RESULTS_LOCATION_KEY, value=results_location)
        if console_url:
            ti.xcom_push(key=RESULTS_CONSOLE_URL_KEY, value=console_url)
        # Airflow stores the link under this key only when the task instance finishes; the same value
        # now makes the button work during a deferred run (it is overwritten with the same value then).
        ti.xcom_push(key=cls().xcom_key, value=cls.link_for(results_location, console_url))
