"""Hyperparameter grids (``airflow_wmltrain.grid``): the shapes, the seeded sample, the refusals at parse
time, and the map-index label Airflow renders for a mapped ``TrainingRunOperator``."""

from __future__ import annotations

import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog
from airflow.sdk import DAG
from airflow.sdk.definitions.mappedoperator import MappedOperator
from airflow.sdk.execution_time.task_runner import _render_map_index

from airflow_wmltrain import grid as grid_module
from airflow_wmltrain.errors import ManifestError
from airflow_wmltrain.grid import MAP_INDEX_TEMPLATE, LogUniform, Uniform, grid, max_map_length
from airflow_wmltrain.operators.training_run import TrainingRunOperator
from tests.unit.conftest import manifest_doc

# --- the shapes ----------------------------------------------------------------------------------------


def test_product_is_every_combination_last_name_fastest() -> None:
    assert grid(product={"lr": [0.1, 0.01], "bs": [32, 64]}) == [
        {"lr": 0.1, "bs": 32},
        {"lr": 0.1, "bs": 64},
        {"lr": 0.01, "bs": 32},
        {"lr": 0.01, "bs": 64},
    ]


def test_zipped_takes_the_lists_position_by_position() -> None:
    assert grid(zipped={"lr": [0.1, 0.01, 0.001], "epochs": [1, 2, 3]}) == [
        {"lr": 0.1, "epochs": 1},
        {"lr": 0.01, "epochs": 2},
        {"lr": 0.001, "epochs": 3},
    ]


def test_fixed_values_join_every_point() -> None:
    points = grid(product={"lr": [0.1, 0.01]}, fixed={"epochs": 3, "amp": True})
    assert points == [{"epochs": 3, "amp": True, "lr": 0.1}, {"epochs": 3, "amp": True, "lr": 0.01}]


def test_zipped_lists_of_unequal_length_are_refused_with_the_lengths() -> None:
    with pytest.raises(ManifestError, match=r"grid\.zipped: .*same length, got lr: 3, bs: 2"):
        grid(zipped={"lr": [0.1, 0.01, 0.001], "bs": [32, 64]})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"^grid: give exactly one of product"),
        (
            {"product": {"lr": [0.1]}, "zipped": {"bs": [32]}},
            r"^grid: give exactly one of .*got product, zipped",
        ),
        ({"product": {"lr": 0.1}}, r"^grid\.product\.lr: must be a list of values, .*got a float"),
        ({"product": {"lr": "0.1,0.01"}}, r"^grid\.product\.lr: must be a list of values, .*got a str"),
        ({"product": {"lr": []}}, r"^grid\.product\.lr: has no values"),
        ({"product": {}}, r"^grid\.product: names no option"),
        (
            {"zipped": [("lr", [0.1])]},
            r"^grid\.zipped: must be a mapping of option name to values, got a list",
        ),
        ({"product": {"lr": [0.1, [1, 2]]}}, r"^grid\.product\.lr: must be a string, number.*got a list"),
        ({"product": {"l r": [0.1]}}, r"^grid\.product: 'l r' is not an option name"),
        ({"product": {"lr": [0.1], "--lr": [0.2]}}, r"'lr' and '--lr' are the same option --lr"),
        ({"product": {"lr": [0.1]}, "fixed": {"lr": 0.2}}, r"^grid\.fixed: 'lr' is both fixed and varied"),
        ({"product": {"lr": [0.1]}, "seed": 1}, r"^grid: n and seed are for sample"),
    ],
)
def test_bad_grids_are_refused_naming_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message) as caught:
        grid(**kwargs)
    assert caught.value.code == "C101"
    assert not caught.value.retryable


# --- the seeded sample ---------------------------------------------------------------------------------


def test_sample_of_lists_is_n_distinct_combinations_the_same_at_every_parse() -> None:
    space = {"lr": [0.1, 0.01, 0.001, 0.0001], "bs": [16, 32, 64], "opt": ["sgd", "adam"]}
    first = grid(sample=space, n=7, seed=42)
    assert first == grid(sample=space, n=7, seed=42)
    assert len(first) == 7
    assert len({tuple(point.items()) for point in first}) == 7
    product = grid(product=space)
    assert all(point in product for point in first)
    assert [product.index(point) for point in first] == sorted(product.index(point) for point in first)
    assert grid(sample=space, n=7, seed=43) != first


def test_sample_of_distributions_is_reproducible_and_in_range() -> None:
    space: dict[str, Any] = {
        "lr": LogUniform(1e-4, 1e-1),
        "dropout": Uniform(0.0, 0.5, digits=2),
        "bs": [32, 64],
    }
    first = grid(sample=space, n=20, seed="sweep-1")
    assert first == grid(sample=space, n=20, seed="sweep-1")
    assert all(1e-4 <= point["lr"] <= 1e-1 for point in first)  # type: ignore[operator]
    assert all(0.0 <= point["dropout"] <= 0.5 for point in first)  # type: ignore[operator]
    assert all(point["dropout"] == float(f"{point['dropout']:.2g}") for point in first)  # e.g. 0.37
    assert {point["bs"] for point in first} == {32, 64}
    assert grid(sample=space, n=20, seed="sweep-2") != first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample": {"lr": [0.1, 0.01]}, "n": 2}, r"^grid\.seed: a random sample needs seed="),
        ({"sample": {"lr": [0.1, 0.01]}, "seed": 1}, r"^grid\.n: must be the number of runs .*got None"),
        ({"sample": {"lr": [0.1, 0.01]}, "n": 0, "seed": 1}, r"^grid\.n: must be the number of runs"),
        ({"sample": {"lr": [0.1, 0.01]}, "n": 3, "seed": 1}, r"^grid\.n: n=3 is more than the 2 distinct"),
        (
            {"sample": {"lr": LogUniform(0, 1)}, "n": 3, "seed": 1},
            r"^grid\.sample\.lr: needs low < high and low > 0",
        ),
        ({"sample": {"lr": Uniform(1, 1)}, "n": 3, "seed": 1}, r"^grid\.sample\.lr: needs low < high, got 1"),
    ],
)
def test_bad_samples_are_refused_naming_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        grid(**kwargs)


# --- [core] max_map_length -----------------------------------------------------------------------------


def test_max_map_length_is_airflows_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW__CORE__MAX_MAP_LENGTH", raising=False)
    assert max_map_length() == 1024
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "6")
    assert max_map_length() == 6


@pytest.mark.parametrize(
    ("kwargs", "kind", "size"),
    [
        ({"product": {"lr": [0.1, 0.01, 0.001], "bs": [16, 32, 64]}}, "product", 9),
        ({"zipped": {"lr": [0.1] * 7, "bs": [32] * 7}}, "zipped", 7),
        ({"sample": {"lr": LogUniform(1e-4, 1e-1)}, "n": 7, "seed": 1}, "sample", 7),
        ({"sample": {"lr": list(range(10))}, "n": 7, "seed": 1}, "sample", 7),
    ],
)
def test_a_grid_above_max_map_length_is_refused_with_the_limit_named(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], kind: str, size: int
) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "6")
    with pytest.raises(ManifestError) as caught:
        grid(**kwargs)
    text = str(caught.value)
    assert text.startswith(f"grid.{kind}: the grid has {size} runs, more than the 6 task instances")
    assert "[core] max_map_length" in text
    assert "AIRFLOW__CORE__MAX_MAP_LENGTH" in text


def test_a_grid_at_max_map_length_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "6")
    assert len(grid(product={"lr": [0.1, 0.01, 0.001], "bs": [32, 64]})) == 6


def test_a_huge_product_is_refused_before_it_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__MAX_MAP_LENGTH", "1024")

    def build(lists: object) -> None:
        raise AssertionError("the product was being built before its size was checked")

    monkeypatch.setattr(grid_module, "_product", build)
    dimensions = {f"p{index}": list(range(100)) for index in range(6)}  # 10**12 points
    with pytest.raises(ManifestError, match=r"the grid has 1000000000000 runs, more than the 1024"):
        grid(product=dimensions)


# --- the map-index label, rendered by Airflow --------------------------------------------------------


def _mapped_grid(
    model_zip: Path, hyperparameters: Any, *, as_kwargs: bool = False
) -> tuple[DAG, MappedOperator]:
    with DAG("grid_labels", schedule=None, start_date=datetime.datetime(2026, 1, 1)) as dag:
        partial = TrainingRunOperator.partial(
            task_id="train",
            manifest=manifest_doc(),
            model_definition=str(model_zip),
            map_index_template=MAP_INDEX_TEMPLATE,
        )
        if as_kwargs:
            train = partial.expand_kwargs([{"hyperparameters": point} for point in hyperparameters])
        else:
            train = partial.expand(hyperparameters=hyperparameters)
    assert isinstance(train, MappedOperator)
    return dag, train


def _label(dag: DAG, train: MappedOperator, map_index: int) -> str | None:
    """What Airflow's task runner stores as the mapped task instance's label: the mapped operator
    rendered for ``map_index`` (unmapped into the context's ``task``), then ``map_index_template``
    rendered by the runner's own function on that context."""
    ti = SimpleNamespace(map_index=map_index, task=train)
    context: dict[str, Any] = {
        "ti": ti,
        "task_instance": ti,
        "task": train,
        "dag": dag,
        "dag_run": SimpleNamespace(conf={}),
        "params": {},
        "map_index_template": train.map_index_template,
    }
    train.render_template_fields(context, dag.get_template_env())  # type: ignore[arg-type]
    assert isinstance(context["task"], TrainingRunOperator)
    return _render_map_index(context, ti=ti, log=structlog.get_logger())  # type: ignore[arg-type]


def test_mapped_training_runs_are_labelled_by_their_hyperparameters(model_zip: Path) -> None:
    points = grid(product={"lr": [0.1, 0.01], "bs": [32, 64]})
    dag, train = _mapped_grid(model_zip, points)
    assert train.map_index_template == MAP_INDEX_TEMPLATE
    assert [_label(dag, train, index) for index in range(len(points))] == [
        "lr=0.1,bs=32",
        "lr=0.1,bs=64",
        "lr=0.01,bs=32",
        "lr=0.01,bs=64",
    ]


def test_expand_kwargs_runs_are_labelled_the_same_way(model_zip: Path) -> None:
    points = grid(zipped={"lr": [0.1, 0.01], "epochs": [1, 2]}, fixed={"amp": True})
    dag, train = _mapped_grid(model_zip, points, as_kwargs=True)
    assert [_label(dag, train, 0), _label(dag, train, 1)] == [
        "lr=0.1,epochs=1,amp=True",
        "lr=0.01,epochs=2,amp=True",
    ]


def test_templated_hyperparameters_are_labelled_as_rendered(model_zip: Path) -> None:
    dag, train = _mapped_grid(model_zip, [{"lr": 0.01, "run": "{{ task.task_id }}"}, '{"lr": 0.5}'])
    assert _label(dag, train, 0) == "lr=0.01,run=train"
    assert _label(dag, train, 1) == '{"lr": 0.5}'  # JSON text: shown as given, never a failure


def test_a_long_label_is_cut_to_what_airflow_stores(model_zip: Path) -> None:
    dag, train = _mapped_grid(model_zip, [{f"option{index}": "x" * 20 for index in range(20)}])
    label = _label(dag, train, 0)
    assert label is not None
    assert len(label) == 250
    assert label.startswith("option0=xxxxxxxxxxxxxxxxxxxx,option1=")
    assert label.endswith("…")
