"""The pictures (``airflow_wmltrain.charts``): a run's learning curve and a grid's comparison chart are
valid PNGs of a sensible size, whatever the points hold (NaN, one point, many metrics, long names), and
matplotlib is imported only when one is drawn."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from typing import Any

import pytest

from airflow_wmltrain.charts import (
    MAX_BARS,
    MAX_PANELS,
    GridPoint,
    chart_kind,
    curve_metrics,
    grid_chart_png,
    learning_curve_png,
    point_label,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG (its IHDR chunk), after checking the signature."""
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def steps(count: int, *, every: int = 10) -> list[dict[str, Any]]:
    return [
        {"step": i * every, "loss": 2.0 * math.exp(-i / 50) + 0.1, "accuracy": 1 - math.exp(-i / 40)}
        for i in range(1, count + 1)
    ]


# --- the learning curve -----------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 12, 600, 1000])
def test_a_learning_curve_is_a_png_of_a_sensible_size(count: int) -> None:
    png = learning_curve_png(steps(count), training_id="training-abc", hyperparameters={"lr": 0.01, "bs": 64})
    assert png is not None
    width, height = png_size(png)
    assert 600 <= width <= 1400
    assert 300 <= height <= 1000
    assert len(png) < 100_000


@pytest.mark.parametrize("points", [[], [{"step": 1, "loss": 0.5}]])
def test_fewer_than_two_points_draw_nothing(points: list[dict[str, Any]]) -> None:
    assert learning_curve_png(points, training_id="training-abc") is None


def test_a_metric_with_fewer_than_two_numbers_is_not_drawn_and_nothing_drawable_is_none() -> None:
    points = [{"step": 1, "loss": float("nan"), "note": "x"}, {"step": 2, "loss": 0.4, "flag": True}]
    assert learning_curve_png(points, training_id="training-abc") is None


def test_nan_and_infinite_values_are_skipped_not_a_crash() -> None:
    points = steps(20)
    points[3]["loss"] = float("nan")
    points[5]["loss"] = float("inf")
    points[7]["accuracy"] = None
    png = learning_curve_png(points, training_id="training-abc")
    assert png is not None
    png_size(png)


def test_points_without_a_step_are_placed_at_their_position() -> None:
    png = learning_curve_png([{"loss": 1.0}, {"loss": 0.5}, {"loss": 0.3}], training_id="training-abc")
    assert png is not None


def test_many_metrics_draw_at_most_six_panels_losses_first() -> None:
    names = [f"metric_{index}" for index in range(8)] + ["val_loss", "loss"]
    points = [{"step": i, **dict.fromkeys(names, i * 0.1)} for i in range(5)]
    shown = curve_metrics(points)
    assert len(shown) == MAX_PANELS
    assert shown[:2] == ["val_loss", "loss"]
    assert shown[2:] == ["metric_0", "metric_1", "metric_2", "metric_3"]
    png = learning_curve_png(points, training_id="training-abc")
    assert png is not None
    width, height = png_size(png)
    assert width > height  # three columns of two rows


def test_long_names_and_many_hyperparameters_still_draw() -> None:
    name = "validation_top_5_categorical_accuracy_on_the_held_out_imagenet_subset" * 2
    points = [{"step": i, name: i / 10} for i in range(10)]
    hyperparameters = {f"option_with_a_long_name_{index}": "x" * 30 for index in range(12)}
    png = learning_curve_png(points, training_id="training-" + "a" * 64, hyperparameters=hyperparameters)
    assert png is not None
    width, height = png_size(png)
    assert width <= 1400
    assert height <= 1000


def test_point_label_reads_as_the_grid_names_a_run_and_is_cut() -> None:
    assert point_label({"lr": 0.01, "bs": 64}) == "lr=0.01, bs=64"
    assert point_label({"lr": 1e-05, "amp": True}) == "lr=1e-05, amp=True"
    long = point_label({f"o{index}": "y" * 10 for index in range(20)})
    assert len(long) == 60
    assert long.endswith("…")


def test_matplotlib_is_imported_only_when_a_picture_is_drawn() -> None:
    code = (
        "import sys, airflow_wmltrain.charts, airflow_wmltrain.runtime.run, "
        "airflow_wmltrain.operators.best_run, airflow_wmltrain.cli.main; "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the comparison chart of a grid -----------------------------------------------------------------


def heat_points() -> list[GridPoint]:
    values = {(0.1, 32): 0.81, (0.1, 64): None, (0.01, 32): 0.953, (0.01, 64): 0.967, (0.001, 32): 0.9}
    values[(0.001, 64)] = 0.884
    return [
        GridPoint(f"training-{lr}-{bs}", {"lr": lr, "bs": bs, "epochs": 5}, value)
        for (lr, bs), value in values.items()
    ]


def test_two_numeric_hyperparameters_make_a_heatmap_fixed_ones_do_not_count() -> None:
    points = heat_points()
    assert chart_kind(points) == "heatmap"
    png = grid_chart_png(points, metric="accuracy", mode="max")
    width, height = png_size(png)
    assert 500 <= width <= 1400
    assert 350 <= height <= 1000
    assert len(png) < 100_000


def test_one_numeric_hyperparameter_makes_a_line() -> None:
    points = [
        GridPoint(f"t{i}", {"lr": lr}, v)
        for i, (lr, v) in enumerate([(1e-4, 0.7), (1e-2, None), (1e-1, 0.4)])
    ]
    assert chart_kind(points) == "line"
    png_size(grid_chart_png(points, metric="accuracy", mode="max"))


@pytest.mark.parametrize(
    "hyperparameters",
    [
        [{"lr": 0.1, "bs": 32, "opt": "adam"}, {"lr": 0.01, "bs": 64, "opt": "sgd"}],  # three varying
        [{"opt": "adam"}, {"opt": "sgd"}],  # not numeric
        [{}, {}],  # nothing varies
    ],
)
def test_anything_else_makes_bars(hyperparameters: list[dict[str, Any]]) -> None:
    points = [GridPoint(f"t{i}", hp, 0.5 + i / 10) for i, hp in enumerate(hyperparameters)]
    assert chart_kind(points) == "bars"
    png_size(grid_chart_png(points, metric="loss", mode="min"))


def test_a_grid_whose_runs_all_failed_still_draws() -> None:
    for points in (
        [GridPoint(p.training_id, p.hyperparameters, None) for p in heat_points()],
        [GridPoint("a", {"lr": 0.1}, None), GridPoint("b", {"lr": 0.2}, None)],
        [GridPoint("a", {"opt": "x"}, None)],
    ):
        png_size(grid_chart_png(points, metric="accuracy", mode="max"))


def test_a_large_grid_as_bars_is_capped_and_stays_small() -> None:
    points = [
        GridPoint(f"t{i}", {"lr": i / 1000, "bs": 32, "opt": "sgd" if i % 2 else "adam"}, i / 300)
        for i in range(300)
    ]
    png = grid_chart_png(points, metric="accuracy", mode="max")
    _, height = png_size(png)
    assert height <= 0.3 * MAX_BARS * 100 + 200
    assert len(png) < 100_000


def test_a_heatmap_with_a_repeated_cell_and_nan_free_values_draws() -> None:
    points = [*heat_points(), GridPoint("again", {"lr": 0.01, "bs": 64, "epochs": 5}, 0.5)]
    png_size(grid_chart_png(points, metric="accuracy", mode="max", best="training-0.01-64"))


def test_dollar_signs_in_names_are_text_not_mathtext() -> None:
    # unbalanced, crafted and nested mathtext: drawn as the characters they are, never parsed
    names = ["$", r"$\frac{1}{0}$", r"cost $\nosuchcommand$", r"$x^^2$", r"$\sqrt{\sqrt{\sqrt{x}}}$" * 20]
    points = [{"step": i, **dict.fromkeys(names, float(i))} for i in range(3)]
    assert (
        learning_curve_png(points, training_id="training-a", hyperparameters={"opt": r"$\nosuch$"})
        is not None
    )
    grid = [GridPoint(f"t{i}", {"opt": f"${i}", "x": r"$\alpha$"}, i / 10) for i in range(3)]
    png_size(grid_chart_png(grid, metric=r"$\nosuch{acc}$", mode="max"))
