"""``wmltrain metrics ID [--follow] [--json]`` and the metrics of ``wmltrain show``: read from the status
XCom through the REST API (a fake one here), one API call per look while following."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from airflow_wmltrain.lifecycle import RunStatus
from airflow_wmltrain.service.runs import TrainingRunRecord, metric_points
from tests.unit.test_service_resilience import (
    TI,
    XCOM,
    FakeApi,
    Handler,
    cli_api,
    fake_options,
    one_call_per_look,
    scripted,
    status,
)

__all__ = ["cli_api"]  # the fixture, used by name

POINTS = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.6}, {"step": 3, "loss": 0.4, "val/accuracy": 0.8}]


def with_steps(*states: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return status("training-w", *states, steps=steps, **extra)


def record_of(document: dict[str, Any], ti_state: str = "running") -> TrainingRunRecord:
    return TrainingRunRecord(
        "training-w",
        "wmltrain_training",
        "training-w",
        "train",
        -1,
        ti_state,
        1,
        RunStatus.from_dict(document),
    )


def test_follow_gives_each_new_point_once_and_ends_with_the_run() -> None:
    api = FakeApi(
        scripted(
            {
                TI: [{"state": "running", "try_number": 1}] * 2 + [{"state": "success", "try_number": 1}],
                XCOM: [
                    {"value": with_steps("PROCESSING", steps=POINTS[:2])},
                    {"value": with_steps("PROCESSING", steps=POINTS[:2])},
                    {"value": with_steps("PROCESSING", "STORING", "COMPLETED", steps=POINTS)},
                ],
            }
        )
    )
    record = record_of(with_steps("PROCESSING", steps=POINTS[:1]))
    points = list(metric_points(api, record, follow=True, options=fake_options(api)))
    assert points == POINTS
    one_call_per_look(api, final_calls=2)


def test_without_follow_the_points_so_far() -> None:
    api = FakeApi(lambda *a: pytest.fail("no call without --follow"))
    record = record_of(with_steps("PROCESSING", steps=POINTS))
    assert list(metric_points(api, record, follow=False)) == POINTS


def test_the_table_prints_a_column_per_metric(
    cli_api: Callable[[Handler], FakeApi], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from airflow_wmltrain.cli import runs as cli_runs
    from airflow_wmltrain.cli.main import main

    cli_api(lambda *a: None)
    document = with_steps("PROCESSING", "STORING", "COMPLETED", steps=POINTS, metrics={"loss": 0.4})
    monkeypatch.setattr(cli_runs, "find_run", lambda api, tid: record_of(document, "success"))
    assert main(["metrics", "training-w"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["step", "loss"]
    assert lines[1].split() == ["1", "0.9"]
    assert lines[3].split() == ["step", "loss", "val/accuracy"]  # a new metric: the header again
    assert lines[4].split() == ["3", "0.4", "0.8"]
    assert main(["metrics", "training-w", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == POINTS
    assert printed["metrics"] == {"loss": 0.4}
    assert main(["show", "training-w"]) == 0
    shown = capsys.readouterr().out
    assert 'metrics        {"loss": 0.4}' in shown
    assert "steps          3 points (wmltrain metrics training-w)" in shown


def test_a_run_without_points_says_so(
    cli_api: Callable[[Handler], FakeApi], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from airflow_wmltrain.cli import runs as cli_runs
    from airflow_wmltrain.cli.main import main

    cli_api(lambda *a: None)
    monkeypatch.setattr(cli_runs, "find_run", lambda api, tid: record_of(with_steps("PROCESSING", steps=[])))
    assert main(["metrics", "training-w"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "has no metrics per step (yet): it is PROCESSING" in captured.err
