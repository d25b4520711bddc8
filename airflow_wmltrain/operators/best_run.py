"""``BestRunOperator``: the best run of a grid by a named metric, and the grid's comparison chart.

A grid is one mapped :class:`~airflow_wmltrain.operators.training_run.TrainingRunOperator`; its task
returns each run's result (``{"training_id", "state", "results_location", "metrics",
"hyperparameters", ...}``).  Airflow hands a downstream task a mapped task's return values as one lazy
sequence (``LazyXComSequence``) of the map indexes that *returned* one: a run whose task failed returned
nothing and is simply absent from it, not a ``None`` in its place.  So the operator also reads the
grid's status documents (the XCom :data:`~airflow_wmltrain.lifecycle.STATUS_XCOM_KEY` every run
publishes, failed ones too) and counts the grid's task instances, to name the runs that failed and to
say "4 of 6".  It runs when the grid is done whatever its runs' states (``trigger_rule="all_done"``).

::

    train = TrainingRunOperator.partial(task_id="train", ...).expand(hyperparameters=grid(...))
    best = BestRunOperator(task_id="best", runs=train.output, metric="accuracy", mode="max",
                           conn_id="results_s3")
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_wmltrain.charts import GridPoint, grid_chart_png
from airflow_wmltrain.lifecycle import STATUS_XCOM_KEY, RunState

if TYPE_CHECKING:
    from airflow.sdk import Context

MODES = ("max", "min")


@dataclass(frozen=True)
class RankedRun:
    """A run of the grid with its value of the target metric (``None``: left out, ``reason`` says why)."""

    training_id: str
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    results_location: str = ""
    value: float | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "training_id": self.training_id,
            "value": self.value,
            "hyperparameters": dict(self.hyperparameters),
            "results_location": self.results_location,
        }


@dataclass(frozen=True)
class Ranking:
    """The runs of a grid ranked by one metric: the usable ones best first (ties keep the grid's order),
    and those left out with the reason.

    :param considered: how many runs the grid has (those that left no trace at all count too).
    """

    metric: str
    mode: Literal["max", "min"]
    ranked: tuple[RankedRun, ...]
    left_out: tuple[RankedRun, ...]
    considered: int

    @classmethod
    def of(
        cls,
        results: Iterable[Mapping[str, Any] | None],
        *,
        metric: str,
        mode: Literal["max", "min"],
        statuses: Iterable[Mapping[str, Any]] = (),
        total: int = 0,
    ) -> Ranking:
        """Rank the runs' results (a task's return values; ``None`` for a run that returned nothing).

        :param statuses: the runs' status documents: runs among them with no result failed.
        :param total: the number of runs in the grid when known (task instances), at least those seen.
        """
        ranked: list[RankedRun] = []
        left_out: list[RankedRun] = []
        seen: set[str] = set()
        silent = 0
        for result in results:
            if not isinstance(result, Mapping) or not result.get("training_id"):
                silent += 1
                continue
            training_id = str(result["training_id"])
            seen.add(training_id)
            run = RankedRun(
                training_id=training_id,
                hyperparameters=dict(result.get("hyperparameters") or {}),
                results_location=str(result.get("results_location") or ""),
            )
            metrics = result.get("metrics") or {}
            value = metrics.get(metric) if isinstance(metrics, Mapping) else None
            if result.get("state") != RunState.COMPLETED.value:
                left_out.append(_out(run, f"it is {result.get('state') or 'not over'}"))
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                names = ", ".join(sorted(map(str, metrics))) if isinstance(metrics, Mapping) else ""
                has = f"its metrics are {names}" if names else "it reported no metrics"
                left_out.append(_out(run, f"it has no numeric '{metric}' ({has})"))
            elif not math.isfinite(value):
                left_out.append(_out(run, f"its '{metric}' is {value}"))
            else:
                ranked.append(replace(run, value=float(value)))
        for status in statuses:
            training_id = str(status.get("training_id") or "")
            if not training_id or training_id in seen:
                continue
            seen.add(training_id)
            error = status.get("error") or {}
            why = " ".join(str(error.get(k) or "") for k in ("code", "message")).strip()
            state = str(status.get("state") or "not over")
            run = RankedRun(
                training_id=training_id,
                hyperparameters=dict(status.get("hyperparameters") or {}),
                results_location=str(status.get("results_location") or ""),
            )
            left_out.append(_out(run, f"its task failed: the run is {state}" + (f": {why}" if why else "")))
        ranked.sort(key=lambda run: -(run.value or 0.0) if mode == "max" else (run.value or 0.0))
        considered = max(total, len(ranked) + len(left_out) + silent)
        return cls(metric, mode, tuple(ranked), tuple(left_out), considered)

    @property
    def best(self) -> RankedRun | None:
        return self.ranked[0] if self.ranked else None

    @property
    def unaccounted(self) -> int:
        """Runs that left neither a result nor a status (failed before the run began)."""
        return self.considered - len(self.ranked) - len(self.left_out)

    def points(self) -> list[GridPoint]:
        """Every run the chart shows: the ranked ones, and those left out as failed."""
        return [
            GridPoint(run.training_id, run.hyperparameters, run.value)
            for run in (*self.ranked, *self.left_out)
        ]


def _out(run: RankedRun, reason: str) -> RankedRun:
    return replace(run, value=None, reason=reason)


def chart_name(metric: str) -> str:
    """``grid-<metric>.png``, the metric's name made safe for an object key."""
    return "grid-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("._") or "metric") + ".png"


class BestRunOperator(BaseOperator):
    """Pick a grid's best run by a named metric, store the grid's comparison chart beside it.

    :param runs: the grid's results: ``train.output`` of a mapped ``TrainingRunOperator`` (or any list
        of run results); failed runs are absent from it, or ``None``.
    :param metric: the metric to rank by (a key of each result's ``metrics``).
    :param mode: ``max`` (accuracy) or ``min`` (loss).
    :param min_completed: fewer runs completed with the metric than this fails the task, without retries.
    :param conn_id: the Airflow connection of the best run's results store (``aws`` for S3, ``swift``),
        to store the chart ``<best training id>/grid-<metric>.png`` there; ``None``: no chart.
    :return: ``{"training_id", "metric", "mode", "value", "hyperparameters", "results_location",
        "chart_location", "ranking": [...], "completed", "considered"}``.
    """

    template_fields: Sequence[str] = ("runs", "conn_id")
    ui_color = "#e8f4ea"

    def __init__(
        self,
        *,
        runs: Any,
        metric: str,
        mode: str = "max",
        min_completed: int = 1,
        conn_id: str | None = None,
        trigger_rule: str = "all_done",
        **kwargs: Any,
    ) -> None:
        if not isinstance(metric, str) or not metric.strip():
            raise ValueError("BestRunOperator metric is empty: name the metric to rank by, e.g. 'accuracy'")
        if mode not in MODES:
            raise ValueError(
                f"BestRunOperator mode {mode!r} is not 'max' or 'min': 'max' for accuracy, 'min' for loss"
            )
        if isinstance(min_completed, bool) or not isinstance(min_completed, int) or min_completed < 1:
            raise ValueError(
                f"BestRunOperator min_completed {min_completed!r} must be a whole number of at least 1"
            )
        super().__init__(trigger_rule=trigger_rule, **kwargs)
        self.runs = runs
        self.metric = metric.strip()
        self.mode: Literal["max", "min"] = "max" if mode == "max" else "min"
        self.min_completed = min_completed
        self.conn_id = conn_id
        operator = getattr(runs, "operator", None)  # an XComArg: the grid's task, for its failed runs
        self.grid_task_id: str | None = getattr(operator, "task_id", None)

    def execute(self, context: Context) -> dict[str, Any]:
        runs = self.runs
        if isinstance(runs, Mapping):  # an unmapped training task: one result
            results: list[Any] = [runs]
        elif isinstance(runs, Sequence) and not isinstance(runs, str):
            results = list(runs[:])  # Airflow's lazy sequence: all values in one request, not one each
        else:
            results = list(runs or ())
        statuses, total = self._grid(context)
        ranking = Ranking.of(results, metric=self.metric, mode=self.mode, statuses=statuses, total=total)
        for run in ranking.left_out:
            self.log.warning("Left out %s: %s", run.training_id, run.reason)
        if ranking.unaccounted:
            self.log.warning(
                "Left out %d run(s) that left no result nor status (their task failed before the run began)",
                ranking.unaccounted,
            )
        completed = len(ranking.ranked)
        best = ranking.best
        if best is None or completed < self.min_completed:
            raise AirflowFailException(
                f"only {completed} of {ranking.considered} runs completed with a numeric '{self.metric}'; "
                f"at least {self.min_completed} needed (min_completed)"
            )
        self.log.info(
            "Best of %d completed runs (of %d) by %s %s: %s with %s = %g (%s)",
            completed,
            ranking.considered,
            self.mode,
            self.metric,
            best.training_id,
            self.metric,
            best.value,
            ", ".join(f"{k}={v}" for k, v in best.hyperparameters.items()) or "no hyperparameters",
        )
        return {
            **best.to_dict(),
            "metric": self.metric,
            "mode": self.mode,
            "chart_location": self._store_chart(ranking, best),
            "ranking": [run.to_dict() for run in ranking.ranked],
            "completed": completed,
            "considered": ranking.considered,
        }

    def _grid(self, context: Context) -> tuple[list[Mapping[str, Any]], int]:
        """The grid's status documents (failed runs included) and its number of task instances."""
        if self.grid_task_id is None:
            return [], 0
        ti = context["ti"]
        try:
            pulled = ti.xcom_pull(task_ids=self.grid_task_id, key=STATUS_XCOM_KEY)
        except Exception as err:  # a lookup that fails costs the names of failed runs, not the choice
            self.log.warning("Cannot read the grid's status documents: %s", err)
            pulled = None
        statuses = [pulled] if isinstance(pulled, Mapping) else list(pulled or ())
        try:
            total = int(ti.get_ti_count(dag_id=ti.dag_id, task_ids=[self.grid_task_id], run_ids=[ti.run_id]))
        except Exception as err:
            self.log.warning("Cannot count the grid's task instances: %s", err)
            total = 0
        return [status for status in statuses if isinstance(status, Mapping)], total

    def _store_chart(self, ranking: Ranking, best: RankedRun) -> str | None:
        """Draw the grid's chart and store it beside the best run; its location, or ``None``."""
        if not self.conn_id:
            self.log.info("No conn_id: the grid's comparison chart is not stored")
            return None
        from airflow_wmltrain.storage import open_store, results_reference

        match = re.fullmatch(r"(s3|swift)://([^/]+)/(.+?)/?", best.results_location)
        if match is None:
            self.log.warning(
                "Cannot store the grid's chart: %r is no results location", best.results_location
            )
            return None
        store_type, bucket, folder = match.groups()
        key = f"{folder}/{chart_name(self.metric)}"
        try:
            png = grid_chart_png(ranking.points(), metric=self.metric, mode=self.mode, best=best.training_id)
            with open_store(results_reference(store_type, bucket, self.conn_id)) as store:
                store.put_bytes(key, png, content_type="image/png")
        except Exception as err:  # a picture is never worth the choice
            self.log.warning("Cannot store the grid's comparison chart: %s", err)
            return None
        location = f"{store_type}://{bucket}/{key}"
        self.log.info("Stored the grid's comparison chart in %s", location)
        return location
