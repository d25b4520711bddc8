"""``BestRunOperator``: the ranking (min/max, ties, a missing metric, failed runs, min_completed), the
arguments refused when the DAG is parsed, the result, and the grid chart stored beside the best run."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_wmltrain.get_provider_info import get_provider_info
from airflow_wmltrain.lifecycle import STATUS_XCOM_KEY
from airflow_wmltrain.operators.best_run import BestRunOperator, Ranking, chart_name
from tests.unit.fakes import MemoryStores

BUCKET = "grid-results"


def result(training_id: str, state: str = "COMPLETED", **metrics: Any) -> dict[str, Any]:
    return {
        "training_id": training_id,
        "state": state,
        "results_location": f"s3://{BUCKET}/{training_id}/",
        "gpus": ["0"],
        "metrics": metrics,
        "hyperparameters": {"lr": float(training_id.rsplit("-", 1)[-1]) / 1000, "bs": 32},
    }


def status(training_id: str, state: str = "FAILED") -> dict[str, Any]:
    return {
        "training_id": training_id,
        "state": state,
        "results_location": f"s3://{BUCKET}/{training_id}/",
        "error": {"code": "C201", "message": "the training process exited with status 3"},
        "hyperparameters": {"lr": 0.5, "bs": 64},
    }


class FakeTI:
    """What the operator asks of its task instance: the grid's status XComs and its task count."""

    dag_id = "grid"
    run_id = "manual__1"

    def __init__(self, statuses: Any = None, count: int = 0) -> None:
        self.statuses = statuses
        self.count = count
        self.pulls: list[dict[str, Any]] = []

    def xcom_pull(self, **kwargs: Any) -> Any:
        self.pulls.append(kwargs)
        return self.statuses

    def get_ti_count(self, **kwargs: Any) -> int:
        return self.count


def logged(capsys: pytest.CaptureFixture[str]) -> str:
    """What the task logged (Airflow's task logger writes through structlog to the console)."""
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())


def operator(runs: Any, **kwargs: Any) -> BestRunOperator:
    return BestRunOperator(task_id="best", runs=runs, **{"metric": "accuracy", **kwargs})


# --- the ranking ------------------------------------------------------------------------------------


def test_max_ranks_highest_first_and_min_lowest_first() -> None:
    runs = [
        result("t-1", accuracy=0.8, loss=0.4),
        result("t-2", accuracy=0.9, loss=0.2),
        result("t-3", accuracy=0.7, loss=0.6),
    ]
    best_max = Ranking.of(runs, metric="accuracy", mode="max")
    assert [run.training_id for run in best_max.ranked] == ["t-2", "t-1", "t-3"]
    best_min = Ranking.of(runs, metric="loss", mode="min")
    assert [run.training_id for run in best_min.ranked] == ["t-2", "t-1", "t-3"]
    assert best_min.best is not None
    assert best_min.best.value == 0.2


def test_ties_keep_the_grids_order() -> None:
    runs = [result("t-1", accuracy=0.9), result("t-2", accuracy=0.95), result("t-3", accuracy=0.95)]
    assert [r.training_id for r in Ranking.of(runs, metric="accuracy", mode="max").ranked] == [
        "t-2",
        "t-3",
        "t-1",
    ]
    assert [r.training_id for r in Ranking.of(runs, metric="accuracy", mode="min").ranked] == [
        "t-1",
        "t-2",
        "t-3",
    ]


def test_runs_without_the_metric_failed_or_missing_are_left_out_with_the_reason() -> None:
    runs = [
        result("t-1", accuracy=0.9),
        result("t-2", loss=0.3),  # no accuracy
        result("t-3", accuracy="high"),  # not a number
        result("t-4", accuracy=True),  # a boolean is no number
        result("t-5", accuracy=float("nan")),
        result("t-6", state="FAILED", accuracy=0.99),  # a result that is not COMPLETED
        None,  # a run that returned nothing
    ]
    ranking = Ranking.of(
        runs, metric="accuracy", mode="max", statuses=[status("t-7"), status("t-1", "COMPLETED")]
    )
    assert [r.training_id for r in ranking.ranked] == ["t-1"]
    reasons = {r.training_id: r.reason for r in ranking.left_out}
    assert reasons == {
        "t-2": "it has no numeric 'accuracy' (its metrics are loss)",
        "t-3": "it has no numeric 'accuracy' (its metrics are accuracy)",
        "t-4": "it has no numeric 'accuracy' (its metrics are accuracy)",
        "t-5": "its 'accuracy' is nan",
        "t-6": "it is FAILED",
        "t-7": "its task failed: the run is FAILED: C201 the training process exited with status 3",
    }
    assert ranking.considered == 8  # 7 named runs and the one that returned nothing
    assert ranking.unaccounted == 1


def test_the_grids_task_count_counts_runs_that_left_no_trace() -> None:
    ranking = Ranking.of([result("t-1", accuracy=0.9)], metric="accuracy", mode="max", total=4)
    assert ranking.considered == 4
    assert ranking.unaccounted == 3


def test_chart_name_is_a_safe_key() -> None:
    assert chart_name("accuracy") == "grid-accuracy.png"
    assert chart_name("val/top 5") == "grid-val_top_5.png"
    assert chart_name("../..") == "grid-metric.png"


# --- the operator -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "maximum"}, "BestRunOperator mode 'maximum' is not 'max' or 'min'"),
        ({"metric": " "}, "BestRunOperator metric is empty: name the metric to rank by"),
        ({"min_completed": 0}, "BestRunOperator min_completed 0 must be a whole number of at least 1"),
        ({"min_completed": True}, "BestRunOperator min_completed True must be a whole number"),
    ],
)
def test_bad_arguments_are_refused_when_the_dag_is_parsed(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        operator([], **kwargs)


def test_it_runs_whatever_the_grids_runs_did_by_default() -> None:
    assert operator([]).trigger_rule == "all_done"
    assert operator([], trigger_rule="all_success").trigger_rule == "all_success"


def test_the_provider_info_names_the_operator() -> None:
    modules = [m for entry in get_provider_info()["operators"] for m in entry["python-modules"]]
    assert "airflow_wmltrain.operators.best_run" in modules


def test_too_few_completed_runs_fail_without_retries_naming_the_counts_and_the_metric() -> None:
    task = operator(Upstream([result("t-1", accuracy=0.9), result("t-2", loss=0.1)]), min_completed=2)
    with pytest.raises(
        AirflowFailException,
        match=r"only 1 of 3 runs completed with a numeric 'accuracy'; at least 2 needed \(min_completed\)",
    ):
        task.execute({"ti": FakeTI(count=3)})  # type: ignore[arg-type]


def test_no_usable_run_fails_even_with_min_completed_1() -> None:
    with pytest.raises(AirflowFailException, match="only 0 of 0 runs completed"):
        operator([]).execute({"ti": FakeTI()})  # type: ignore[arg-type]


def test_the_result_names_the_best_run_and_the_ranking_without_a_chart_when_no_conn_id() -> None:
    runs = [result("t-1", accuracy=0.8), result("t-2", accuracy=0.9)]
    out = operator(runs).execute({"ti": FakeTI(count=2)})  # type: ignore[arg-type]
    assert out == {
        "training_id": "t-2",
        "metric": "accuracy",
        "mode": "max",
        "value": 0.9,
        "hyperparameters": {"lr": 0.002, "bs": 32},
        "results_location": f"s3://{BUCKET}/t-2/",
        "chart_location": None,
        "ranking": [
            {
                "training_id": "t-2",
                "value": 0.9,
                "hyperparameters": {"lr": 0.002, "bs": 32},
                "results_location": f"s3://{BUCKET}/t-2/",
            },
            {
                "training_id": "t-1",
                "value": 0.8,
                "hyperparameters": {"lr": 0.001, "bs": 32},
                "results_location": f"s3://{BUCKET}/t-1/",
            },
        ],
        "completed": 2,
        "considered": 2,
    }


class Upstream:
    """Stands in for the XComArg of the mapped grid task (``train.output``): it names its operator."""

    operator = SimpleNamespace(task_id="train")

    def __init__(self, values: list[Any]) -> None:
        self.values = values

    def __iter__(self) -> Any:
        return iter(self.values)


def test_failed_runs_are_read_from_the_grids_status_xcoms_and_logged(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stores = MemoryStores()
    stores.buckets[BUCKET] = stores[BUCKET]
    monkeypatch.setattr("airflow_wmltrain.storage.open_store", stores.open_store)
    task = operator(
        Upstream([result("t-1", accuracy=0.8), result("t-2", accuracy=0.9)]), conn_id="results_s3"
    )
    # the grid's statuses: the two completed ones and a failed one (returned no value)
    ti = FakeTI(statuses=[status("t-1", "COMPLETED"), status("t-3"), status("t-2", "COMPLETED")], count=4)
    out = task.execute({"ti": ti})  # type: ignore[arg-type]
    assert ti.pulls == [{"task_ids": "train", "key": STATUS_XCOM_KEY}]
    assert (out["completed"], out["considered"]) == (2, 4)
    assert out["chart_location"] == f"s3://{BUCKET}/t-2/grid-accuracy.png"
    assert stores[BUCKET].objects["t-2/grid-accuracy.png"].startswith(b"\x89PNG")
    assert stores[BUCKET].content_types["t-2/grid-accuracy.png"] == "image/png"
    text = logged(capsys)
    assert "Left out t-3: its task failed: the run is FAILED: C201" in text
    assert "Left out 1 run(s) that left no result nor status" in text
    assert (
        "Best of 2 completed runs (of 4) by max accuracy: t-2 with accuracy = 0.9 (lr=0.002, bs=32)" in text
    )


def test_a_single_status_document_is_read_as_one_run() -> None:
    task = operator(Upstream([result("t-1", accuracy=0.8)]))
    out = task.execute({"ti": FakeTI(statuses=status("t-1", "COMPLETED"), count=1)})  # type: ignore[arg-type]
    assert (out["completed"], out["considered"]) == (1, 1)


def test_a_chart_that_cannot_be_stored_is_a_warning_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stores = MemoryStores()
    stores[BUCKET].down = True
    monkeypatch.setattr("airflow_wmltrain.storage.open_store", stores.open_store)
    task = operator([result("t-1", accuracy=0.8)], conn_id="results_s3")
    out = task.execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert out["training_id"] == "t-1"
    assert out["chart_location"] is None
    assert "Cannot store the grid's comparison chart" in logged(capsys)


def test_a_grid_lookup_that_fails_costs_only_the_names_of_failed_runs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Broken(FakeTI):
        def xcom_pull(self, **kwargs: Any) -> Any:
            raise RuntimeError("no API server")

        def get_ti_count(self, **kwargs: Any) -> int:
            raise RuntimeError("no API server")

    out = operator(Upstream([result("t-1", accuracy=0.8)])).execute({"ti": Broken()})  # type: ignore[arg-type]
    assert out["training_id"] == "t-1"
    assert "Cannot read the grid's status documents: no API server" in logged(capsys)


def test_an_unmapped_training_task_is_one_run() -> None:
    out = operator(result("t-1", accuracy=0.8)).execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert (out["training_id"], out["completed"], out["considered"]) == ("t-1", 1, 1)


class Lazy:
    """Stands in for Airflow's LazyXComSequence: a sequence whose items cost one request each."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values
        self.requests: list[Any] = []

    def __len__(self) -> int:
        self.requests.append("len")
        return len(self.values)

    def __getitem__(self, key: Any) -> Any:
        self.requests.append(key)
        return self.values[key]


def test_the_grids_results_are_read_in_one_request() -> None:
    from collections.abc import Sequence

    Sequence.register(Lazy)
    runs = Lazy([result(f"t-{i}", accuracy=i / 10) for i in range(1, 6)])
    out = operator(runs).execute({"ti": FakeTI()})  # type: ignore[arg-type]
    assert out["training_id"] == "t-5"
    assert runs.requests == [slice(None, None, None)]
