"""``TrainingRunSensor``: wait for a training run, started elsewhere, to end.

The sensor reads the run's status document, ``<results-bucket>/<training-id>/_status.json``, which every
run rewrites at each transition (SPEC §3).  It needs nothing but read access to the results bucket: not
the Docker host, not the task that started the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue, conf
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

from airflow_wmltrain.lifecycle import RunState, RunStatus, results_location
from airflow_wmltrain.links.training_run import TrainingResultsLink
from airflow_wmltrain.storage import results_reference
from airflow_wmltrain.triggers.base import LookFailed
from airflow_wmltrain.triggers.training_run import TrainingStatusTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_wmltrain.manifest import StoreReference

__all__ = ["TrainingRunSensor"]

_DEFAULT_CONN_IDS = {"s3": "aws_default", "swift": "swift_default"}


class TrainingRunSensor(BaseSensorOperator):
    """Wait until a training run is over, from its status document in the results bucket.

    Succeeds when the run is ``COMPLETED`` and returns (XCom) ``{"training_id": ..., "state":
    "COMPLETED", "results_location": "s3://bucket/training-id/", "metrics": {...}}``.  Fails when the run
    ended ``FAILED`` or ``HALTED``, with the run's error code and message (``training-abc FAILED: C201 the
    training process exited with status 3``), without retries: a run's end is final.  While no status
    document exists the sensor keeps waiting (a run may not have started yet); an unreadable document,
    a missing bucket or refused credentials fail the task.

    Works in the three sensor modes: ``poke`` (holds a worker slot), ``reschedule`` (frees it between
    looks), and deferrable (waits in the triggerer, :class:`TrainingStatusTrigger`).

    :param training_id: the run's id, e.g. ``training-DOl4q2LkR`` (templated; typically pulled from the
        XCom ``training_id`` of a ``TrainingRunOperator``).
    :param results_bucket: the results bucket (S3) or container (Swift) (templated).
    :param results_type: ``s3`` (default) or ``swift``.
    :param results_conn_id: the Airflow connection of the results store: an ``aws`` connection for S3
        (``aws_default`` when not given), a ``swift`` connection for Swift (``swift_default``)
        (templated).
    :param deferrable: wait in the triggerer (``[operators] default_deferrable`` by default).
    :param poke_interval: seconds between two reads of the status document.
    """

    template_fields: Sequence[str] = ("training_id", "results_bucket", "results_conn_id")
    ui_color = "#e3ecf7"
    operator_extra_links = (TrainingResultsLink(),)

    def __init__(
        self,
        *,
        training_id: str,
        results_bucket: str,
        results_type: str = "s3",
        results_conn_id: str | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poke_interval: timedelta | float = 60,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, **kwargs)
        if results_type not in _DEFAULT_CONN_IDS:
            raise ValueError(f"results_type must be 's3' or 'swift', not {results_type!r}")
        self.training_id = training_id
        self.results_bucket = results_bucket
        self.results_type = results_type
        self.results_conn_id = results_conn_id
        self.deferrable = deferrable
        self._trigger: TrainingStatusTrigger | None = None

    # --- where -----------------------------------------------------------------------------------------

    @property
    def conn_id(self) -> str:
        return self.results_conn_id or _DEFAULT_CONN_IDS[self.results_type]

    @property
    def reference(self) -> StoreReference:
        return results_reference(self.results_type, self.results_bucket, self.conn_id)

    @property
    def location(self) -> str:
        return results_location(self.results_type, self.results_bucket, self.training_id)

    # --- the status: the trigger's look is the sensor's poke --------------------------------------------

    @property
    def trigger(self) -> TrainingStatusTrigger:
        if self._trigger is None:
            self._trigger = TrainingStatusTrigger(
                training_id=self.training_id,
                results={"type": self.results_type, "bucket": self.results_bucket, "conn_id": self.conn_id},
                poll_interval=(
                    self.poke_interval.total_seconds()
                    if isinstance(self.poke_interval, timedelta)
                    else float(self.poke_interval)
                ),
            )
        return self._trigger

    def _check(self) -> dict[str, Any] | None:
        """One look at the status: the result when the run is over, ``None`` while it is not."""
        try:
            outcome = self.trigger.look()
        except LookFailed as exc:
            if exc.retry:
                self.log.warning("%s", exc)
                return None
            raise AirflowFailException(str(exc)) from exc.__cause__
        return self._outcome(outcome) if isinstance(outcome, dict) else None

    def _outcome(self, event: dict[str, Any]) -> dict[str, Any]:
        """The XCom of an ended run (the one result shape), or the task's failure."""
        if event.get("status") == "error" or not isinstance(event.get("run"), dict):
            raise AirflowException(
                str(event.get("message") or f"the wait for {self.training_id} failed: {event}")
            )
        try:
            run = RunStatus.from_dict(event["run"])
        except ValueError as exc:
            raise AirflowException(
                f"the event of {self.training_id} carries no status document: {exc}"
            ) from None
        if run.training_id != self.training_id:
            raise AirflowException(f"the event is about {run.training_id}, not {self.training_id}")
        if run.state is not RunState.COMPLETED:
            raise AirflowFailException(run.failure_message())
        result = run.result()
        result["results_location"] = result["results_location"] or self.location
        self.log.info("Training run %s COMPLETED; results in %s", run.training_id, result["results_location"])
        return result

    def poke(self, context: Context) -> bool | PokeReturnValue:
        result = self._check()
        return PokeReturnValue(is_done=result is not None, xcom_value=result)

    # --- execution -------------------------------------------------------------------------------------

    def execute(self, context: Context) -> Any:
        TrainingResultsLink.persist(context, self.location)
        if not self.deferrable:
            return super().execute(context)
        try:
            result = self._check()
        except Exception as exc:
            # What BaseSensorOperator.execute does with a poke's exception.
            if self.never_fail or (self.soft_fail and isinstance(exc, AirflowFailException)):
                raise AirflowSkipException(f"Skipping: {exc}") from exc
            raise
        if result is not None:
            return result
        self.defer(
            trigger=self.trigger, method_name="execute_complete", timeout=timedelta(seconds=self.timeout)
        )
        return None  # not reached: defer() raises

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resume after :class:`TrainingStatusTrigger` fired: the run's result, or the task's failure."""
        return self._outcome(event)
