"""Pictures of training runs: a run's learning curve and a grid's comparison chart, as PNG bytes.

:func:`learning_curve_png` draws a run's metrics per step (``RunStatus.steps``), one panel per metric;
``TrainingRun.store`` keeps it as ``<training-id>/learning-curve.png``.  :func:`grid_chart_png` draws a
grid's target metric by hyperparameter — an annotated heatmap for two numeric hyperparameters, a line for
one, sorted bars otherwise — with the best run marked and failed runs shown as failed;
``BestRunOperator`` stores it beside the best run.

matplotlib is imported here only when a picture is drawn (the command line and DAG parsing never pay for
it), through its object-oriented API on the Agg canvas: no ``pyplot`` state, no display, safe in threads.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: A run's learning curve in its results folder.
LEARNING_CURVE_FILE = "learning-curve.png"
#: Most metric panels of a learning curve (loss-like metrics first).
MAX_PANELS = 6
#: Most bars of a bar chart (the best ones; the others are counted in the title).
MAX_BARS = 30
#: Longest label of a run shown on a chart (``lr=0.01, bs=64``).
MAX_LABEL = 60
_DPI = 100
_BEST = "#d62728"  # red: the best run, on every chart
_LINE = "#1f77b4"
_FAILED = "#bdbdbd"

Mode = Literal["min", "max"]


def point_label(hyperparameters: Mapping[str, Any], *, limit: int = MAX_LABEL) -> str:
    """A run's hyperparameters as a chart shows them: ``lr=0.01, bs=64`` (cut to ``limit`` characters)."""
    text = ", ".join(f"{name}={_value_text(value)}" for name, value in hyperparameters.items())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _number(value: Any) -> float | None:
    """A finite number, or ``None`` (booleans, text, NaN and infinities are not plotted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def loss_like(name: str) -> bool:
    """Whether a metric is a loss, by its name (``loss``, ``val_loss``, ``error``, ``perplexity``...)."""
    lowered = name.lower()
    return any(word in lowered for word in ("loss", "err", "perplexity", "mse", "mae"))


def _png(figure: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    FigureCanvasAgg(figure)
    drawn = io.BytesIO()
    figure.savefig(drawn, format="png", dpi=_DPI)
    drawn.seek(0)
    # flat colours and anti-aliased text: a 256-colour palette looks the same at a third of the bytes
    image = Image.open(drawn).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


# --- the learning curve of one run --------------------------------------------------------------------


def curve_metrics(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metrics a learning curve shows: those with at least one number, loss-like first, then in the
    order they first appear; at most :data:`MAX_PANELS`."""
    seen: dict[str, None] = {}
    for point in steps:
        for name, value in point.items():
            if name != "step" and _number(value) is not None:
                seen.setdefault(str(name), None)
    names = list(seen)
    return sorted(names, key=lambda name: not loss_like(name))[:MAX_PANELS]


def _text(text: str) -> str:
    """Text to draw as it is: names and values come from the training code and its submitter, and
    matplotlib would parse ``$...$`` as mathtext (a crash, or a slow render for a crafted name)."""
    return text.replace("$", r"\$")


def learning_curve_png(
    steps: Sequence[Mapping[str, Any]],
    *,
    training_id: str,
    hyperparameters: Mapping[str, Any] | None = None,
) -> bytes | None:
    """A run's learning curve: one panel per metric over the steps, the final value marked.

    :param steps: the run's points ``{"step": 120, "loss": 0.31, ...}``, oldest first (a point without
        ``step`` is placed at its position).
    :param training_id: named in the title.
    :param hyperparameters: named in the title (``lr=0.01, bs=64``).
    :return: the PNG, or ``None`` when there is nothing to draw (fewer than 2 points of any metric).
    """
    if len(steps) < 2:
        return None
    names = curve_metrics(steps)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for name in names:
        xs: list[float] = []
        ys: list[float] = []
        for position, point in enumerate(steps):
            y = _number(point.get(name))
            if y is None:
                continue
            x = _number(point.get("step"))
            xs.append(position if x is None else x)
            ys.append(y)
        if len(ys) >= 2:
            series[name] = (xs, ys)
    if not series:
        return None
    return _learning_curve(series, training_id, hyperparameters or {})


def _learning_curve(
    series: dict[str, tuple[list[float], list[float]]], training_id: str, hyperparameters: Mapping[str, Any]
) -> bytes:
    count = len(series)
    columns = 1 if count == 1 else 2 if count <= 4 else 3
    rows = math.ceil(count / columns)
    figure = _figure(4.6 * columns if columns > 1 else 7.0, 2.9 * rows + 0.7)
    title = training_id
    label = point_label(hyperparameters, limit=100)
    if label:
        title += f"\n{label}"
    figure.suptitle(_text(title), fontsize=11)
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, (name, (xs, ys)) in enumerate(series.items()):
        _curve(axes[index // columns][index % columns], name, xs, ys)
    for index in range(count, rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    return _png(figure)


def _curve(ax: Axes, name: str, xs: list[float], ys: list[float]) -> None:
    few = len(ys) <= 30
    ax.plot(xs, ys, color=_LINE, linewidth=1.6, marker="o" if few else None, markersize=3.5)
    ax.plot([xs[-1]], [ys[-1]], marker="o", markersize=7, color=_BEST, zorder=3)
    ax.set_title(_text(_short(name, 40)), fontsize=10, loc="left", fontweight="bold")
    ax.set_title(f"final {_fmt(ys[-1])} at step {xs[-1]:g}", fontsize=9, loc="right", color=_BEST)
    ax.set_xlabel("step")
    if all(float(x).is_integer() for x in xs):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_ylabel(_text(_short(name, 30)))
    ax.grid(True, alpha=0.35)
    ax.margins(x=0.03, y=0.12)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the comparison chart of a grid -------------------------------------------------------------------


@dataclass(frozen=True)
class GridPoint:
    """One run of a grid as the comparison chart shows it.

    :param training_id: the run's id.
    :param hyperparameters: the run's hyperparameters.
    :param value: its target metric; ``None`` for a run that failed or has no such metric.
    """

    training_id: str
    hyperparameters: Mapping[str, Any]
    value: float | None

    @property
    def failed(self) -> bool:
        return self.value is None

    @property
    def label(self) -> str:
        return point_label(self.hyperparameters) or self.training_id


def varying(points: Sequence[GridPoint]) -> list[str]:
    """The hyperparameters whose value differs between the runs, in the order the runs name them."""
    names: dict[str, None] = {}
    for point in points:
        for name in point.hyperparameters:
            names.setdefault(name, None)
    return [name for name in names if len({repr(point.hyperparameters.get(name)) for point in points}) > 1]


def chart_kind(points: Sequence[GridPoint]) -> Literal["heatmap", "line", "bars"]:
    """Two numeric varying hyperparameters: a heatmap; one: a line; anything else: bars."""
    names = varying(points)
    numeric = all(_number(point.hyperparameters.get(name)) is not None for name in names for point in points)
    if numeric and len(names) == 2:
        return "heatmap"
    if numeric and len(names) == 1:
        return "line"
    return "bars"


def grid_chart_png(points: Sequence[GridPoint], *, metric: str, mode: Mode, best: str | None = None) -> bytes:
    """A grid's comparison chart: ``metric`` by hyperparameter, the best run marked.

    :param points: every run of the grid, failed ones with ``value=None``.
    :param metric: the target metric (the colour bar's or the axis's label).
    :param mode: ``max`` or ``min``: which end is best.
    :param best: the training id of the best run (by default the best value's).
    """
    if best is None:
        ranked = [point for point in points if point.value is not None]
        if ranked:
            pick = max if mode == "max" else min
            best = pick(ranked, key=lambda point: point.value or 0.0).training_id
    return _grid_chart(points, metric, mode, best)


def _grid_chart(points: Sequence[GridPoint], metric: str, mode: Mode, best: str | None) -> bytes:
    kind = chart_kind(points)
    done = sum(not point.failed for point in points)
    better = "higher" if mode == "max" else "lower"
    title = f"{metric} by hyperparameter ({better} is better): {done} of {len(points)} runs completed"
    if kind == "heatmap":
        figure = _heatmap(points, metric, mode, best)
    elif kind == "line":
        figure = _line(points, metric, best)
    else:
        figure = _bars(points, metric, mode, best)
    figure.suptitle(_text(title), fontsize=11)
    return _png(figure)


def _heatmap(points: Sequence[GridPoint], metric: str, mode: Mode, best: str | None) -> Figure:
    import numpy as np
    from matplotlib.patches import Rectangle

    row_name, column_name = varying(points)
    rows = sorted({float(point.hyperparameters[row_name]) for point in points})
    columns = sorted({float(point.hyperparameters[column_name]) for point in points})
    values = np.full((len(rows), len(columns)), np.nan)
    failed = np.zeros((len(rows), len(columns)), dtype=bool)
    best_cell: tuple[int, int] | None = None
    for point in points:
        r = rows.index(float(point.hyperparameters[row_name]))
        c = columns.index(float(point.hyperparameters[column_name]))
        if point.value is None:
            failed[r, c] = np.isnan(values[r, c])
            continue
        current = values[r, c]
        if np.isnan(current) or (point.value > current if mode == "max" else point.value < current):
            values[r, c] = point.value
            failed[r, c] = False
        if point.training_id == best:
            best_cell = (r, c)
    figure = _figure(max(5.5, 1.25 * len(columns) + 3.2), max(3.8, 0.75 * len(rows) + 2.2))
    ax = figure.subplots()
    from matplotlib import colormaps

    # the best end is always yellow; an empty cell (no run there) white
    cmap = colormaps["viridis" if mode == "max" else "viridis_r"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    bar = figure.colorbar(image, ax=ax)
    bar.set_label(_text(metric))
    norm = image.norm
    colormap = image.cmap
    for r in range(len(rows)):
        for c in range(len(columns)):
            if failed[r, c]:
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor=_FAILED, edgecolor="white"))
                ax.text(c, r, "failed", ha="center", va="center", fontsize=9, color="#424242")
            elif not np.isnan(values[r, c]):
                red, green, blue, _ = colormap(norm(values[r, c]))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
                text = _fmt(float(values[r, c]))
                if best_cell == (r, c):
                    text = f"best\n{text}"
                ax.text(
                    c,
                    r,
                    text,
                    ha="center",
                    va="center",
                    fontsize=10,
                    color="white" if dark else "black",
                    fontweight="bold" if best_cell == (r, c) else "normal",
                )
    if best_cell is not None:
        r, c = best_cell
        ax.add_patch(Rectangle((c - 0.48, r - 0.48), 0.96, 0.96, fill=False, edgecolor=_BEST, linewidth=3))
    ax.set_xticks(range(len(columns)), [f"{value:g}" for value in columns])
    ax.set_yticks(range(len(rows)), [f"{value:g}" for value in rows])
    ax.set_xlabel(_text(column_name))
    ax.set_ylabel(_text(row_name))
    ax.tick_params(length=0)
    return figure


def _line(points: Sequence[GridPoint], metric: str, best: str | None) -> Figure:
    (name,) = varying(points)
    done = sorted(
        ((float(point.hyperparameters[name]), point) for point in points if point.value is not None),
        key=lambda item: item[0],
    )
    failed = [float(point.hyperparameters[name]) for point in points if point.value is None]
    figure = _figure(7.5, 4.6)
    ax = figure.subplots()
    xs = [x for x, _ in done] + failed
    if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ax.plot(
        [x for x, _ in done],
        [point.value or 0.0 for _, point in done],
        color=_LINE,
        marker="o",
        linewidth=1.6,
        label="completed",
    )
    for x, point in done:
        if point.training_id == best and point.value is not None:
            ax.plot([x], [point.value], marker="*", markersize=18, color=_BEST, label="best", zorder=3)
            ax.annotate(
                _text(f"best {_fmt(point.value)} at {name}={x:g}"),
                (x, point.value),
                xytext=(0, 14),
                textcoords="offset points",
                ha="center",
                fontsize=9,
                color=_BEST,
                fontweight="bold",
            )
    if failed:
        low = min((point.value for _, point in done if point.value is not None), default=0.0)
        ax.plot(
            failed,
            [low] * len(failed),
            linestyle="none",
            marker="x",
            markersize=9,
            color="#757575",
            label=f"failed ({len(failed)})",
        )
        for x in failed:
            ax.annotate(
                "failed", (x, low), xytext=(0, -16), textcoords="offset points", ha="center", fontsize=8
            )
    ax.set_xlabel(_text(name))
    ax.set_ylabel(_text(metric))
    ax.grid(True, alpha=0.35, which="both")
    ax.legend(fontsize=9)
    ax.margins(x=0.06, y=0.18)
    return figure


def _bars(points: Sequence[GridPoint], metric: str, mode: Mode, best: str | None) -> Figure:
    done = sorted(
        (point for point in points if point.value is not None),
        key=lambda point: point.value or 0.0,
        reverse=mode == "max",
    )
    failed = [point for point in points if point.value is None]
    shown = done[:MAX_BARS]
    room = max(0, MAX_BARS - len(shown))
    shown_failed = failed[:room]
    hidden = len(done) - len(shown) + len(failed) - len(shown_failed)
    rows = [*shown, *shown_failed]
    labels = _distinct_labels(rows)
    figure = _figure(9.0, max(3.0, 0.3 * len(rows) + 1.6))
    ax = figure.subplots()
    values = [point.value if point.value is not None else 0.0 for point in rows]
    colours = [
        _FAILED if point.value is None else _BEST if point.training_id == best else _LINE for point in rows
    ]
    positions = list(range(len(rows)))
    ax.barh(positions, values, color=colours, height=0.7)
    ax.set_yticks(positions, [_text(label) for label in labels], fontsize=9)
    ax.invert_yaxis()  # the best on top
    span = max((abs(v) for v in values), default=1.0) or 1.0
    for position, point in zip(positions, rows, strict=True):
        if point.value is None:
            ax.text(span * 0.01, position, "failed", va="center", fontsize=9, color="#424242")
        else:
            text = _fmt(point.value) + ("  best" if point.training_id == best else "")
            ax.text(
                point.value + span * 0.01,
                position,
                text,
                va="center",
                fontsize=9,
                color=_BEST if point.training_id == best else "black",
                fontweight="bold" if point.training_id == best else "normal",
            )
    ax.set_xlabel(_text(metric))
    ax.set_xlim(min(0.0, min(values, default=0.0)), span * 1.18)
    ax.grid(True, axis="x", alpha=0.35)
    if hidden:
        note = f"the best {len(shown)} of {len(done)} completed runs shown"
        if len(failed) > len(shown_failed):
            note += f"; {len(failed)} failed, not shown"
        ax.set_title(note, fontsize=9, loc="left")
    return figure


def _distinct_labels(points: Sequence[GridPoint]) -> list[str]:
    """The runs' labels, with the training id added where two runs would read the same."""
    labels = [point.label for point in points]
    return [
        f"{label} ({point.training_id})" if labels.count(label) > 1 else label
        for label, point in zip(labels, points, strict=True)
    ]
