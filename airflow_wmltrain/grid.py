"""Hyperparameter grids for dynamic task mapping: a sweep of training runs in a few lines of a DAG.

:func:`grid` turns a grid — the cartesian product of value lists, lists zipped position by position, or a
seeded random sample — into the list of hyperparameter mappings that
``TrainingRunOperator.partial(...).expand(hyperparameters=...)`` maps over, one training run per mapping;
:data:`MAP_INDEX_TEMPLATE` names each mapped task instance by its hyperparameters (``lr=0.01,bs=64``)
instead of its index::

    from airflow_wmltrain.grid import MAP_INDEX_TEMPLATE, grid

    TrainingRunOperator.partial(
        task_id="train", manifest=MANIFEST, model_definition=MODEL, map_index_template=MAP_INDEX_TEMPLATE
    ).expand(hyperparameters=grid(product={"lr": [0.1, 0.01, 0.001], "bs": [32, 64]}))

The grid is built when the DAG file is parsed, so its mistakes (a name that is not an option, a value
that is not a scalar, lists of unequal length, a grid larger than Airflow's ``[core] max_map_length``) are
refused there, with the field at fault named (``C101``), before a single run is queued.  A random sample
needs a ``seed``: the DAG file is parsed again and again, and an unseeded sample would be a different
grid at every parse.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass

from airflow_wmltrain.command import HyperparameterValue, validate_hyperparameters
from airflow_wmltrain.errors import ManifestError

GRID_FIELD = "grid"

#: Airflow's own default of ``[core] max_map_length`` (used when the configuration cannot be read).
DEFAULT_MAX_MAP_LENGTH = 1024

#: Longest label Airflow stores for a mapped task instance (``task_instance.rendered_map_index``).
MAX_LABEL_LENGTH = 250

#: ``map_index_template`` of a mapped :class:`~airflow_wmltrain.operators.training_run.TrainingRunOperator`:
#: labels each task instance with its rendered hyperparameters, ``lr=0.01,bs=64`` (Airflow renders it,
#: with the DAG's Jinja environment, on the context of the expanded task, whose ``task`` is the unmapped
#: operator; the label is cut to :data:`MAX_LABEL_LENGTH` characters).
MAP_INDEX_TEMPLATE = (
    f"{{% filter truncate({MAX_LABEL_LENGTH}, true, '…', 0) %}}"
    "{% if task.hyperparameters is mapping %}"
    "{% for name, value in task.hyperparameters.items() %}"
    "{{ name }}={{ value }}{{ ',' if not loop.last }}"
    "{% endfor %}"
    "{% else %}{{ task.hyperparameters if task.hyperparameters is not none else '' }}{% endif %}"
    "{% endfilter %}"
)


@dataclass(frozen=True)
class Uniform:
    """A value of a random sample drawn uniformly between ``low`` and ``high``, with ``digits``
    significant digits (a readable label, a reproducible value)."""

    low: float
    high: float
    digits: int = 4

    def draw(self, rng: random.Random) -> float:
        return _significant(rng.uniform(self.low, self.high), self.digits)


@dataclass(frozen=True)
class LogUniform:
    """A value of a random sample drawn uniformly on a log scale between ``low`` and ``high`` (both
    positive; learning rates, weight decays), with ``digits`` significant digits."""

    low: float
    high: float
    digits: int = 4

    def draw(self, rng: random.Random) -> float:
        return _significant(math.exp(rng.uniform(math.log(self.low), math.log(self.high))), self.digits)


def grid(
    product: Mapping[str, object] | None = None,
    zipped: Mapping[str, object] | None = None,
    sample: Mapping[str, object] | None = None,
    *,
    n: int | None = None,
    seed: int | str | None = None,
    fixed: Mapping[str, HyperparameterValue] | None = None,
) -> list[dict[str, HyperparameterValue]]:
    """The hyperparameter mappings of a grid, one per training run, in a stable order.

    Give exactly one of:

    * ``product={"lr": [0.1, 0.01], "bs": [32, 64]}``: every combination (4 runs), the last name
      varying fastest;
    * ``zipped={"lr": [0.1, 0.01], "bs": [32, 64]}``: the lists taken position by position (2 runs;
      the lists have the same length);
    * ``sample={"lr": LogUniform(1e-4, 1e-1), "bs": [32, 64, 128]}, n=8, seed=1``: ``n`` points drawn
      with ``seed``, a list being a choice among its values; when every entry is a list, the points are
      ``n`` distinct combinations of the product.

    ``fixed`` values are added to every point, after the varied ones (``partial(hyperparameters=...)``
    cannot be combined with ``expand(hyperparameters=...)``).  Every point is checked as
    ``hyperparameters`` are (option-like names, scalar values).

    :raises ManifestError: (C101) naming the field at fault, also when the grid has more points than
        Airflow's ``[core] max_map_length`` lets a task map over.
    """
    given = {
        name: value
        for name, value in (("product", product), ("zipped", zipped), ("sample", sample))
        if value is not None
    }
    if len(given) != 1:
        raise ManifestError(
            "give exactly one of product={...}, zipped={...} or sample={...}, n=..., seed=... "
            f"(got {', '.join(given) or 'none'})",
            field=GRID_FIELD,
        )
    ((kind, values),) = given.items()
    if not isinstance(values, Mapping):
        raise ManifestError(
            f"must be a mapping of option name to values, got a {type(values).__name__}",
            field=f"{GRID_FIELD}.{kind}",
        )
    if not values:
        raise ManifestError(
            "names no option, so the grid has no runs; give at least one, e.g. {'lr': [0.1, 0.01]}",
            field=f"{GRID_FIELD}.{kind}",
        )
    if kind != "sample" and (n is not None or seed is not None):
        raise ManifestError(f"n and seed are for sample={{...}}, not {kind}={{...}}", field=GRID_FIELD)
    fixed_values = validate_hyperparameters(fixed, field=f"{GRID_FIELD}.fixed")
    for name in values:
        if name in fixed_values:
            raise ManifestError(
                f"'{name}' is both fixed and varied; give it once", field=f"{GRID_FIELD}.fixed"
            )

    if kind == "product":
        lists = _value_lists(values, kind)
        _check_map_length(math.prod(len(entry) for entry in lists.values()), kind)
        points = _product(lists)
    elif kind == "zipped":
        points = _zipped(_value_lists(values, kind))
    else:
        points = _sample(values, n, seed)
    _check_map_length(len(points), kind)
    field = f"{GRID_FIELD}.{kind}"
    return [validate_hyperparameters({**point, **fixed_values}, field=field) for point in points]


def max_map_length() -> int:
    """Airflow's ``[core] max_map_length``: the most task instances one mapped task may expand to."""
    from airflow.sdk import conf

    return conf.getint("core", "max_map_length", fallback=DEFAULT_MAX_MAP_LENGTH)


# --- the shapes -----------------------------------------------------------------------------------------


def _value_lists(values: Mapping[str, object], kind: str) -> dict[str, list[HyperparameterValue]]:
    """Each entry's values as a list, refused when it is not a non-empty list of values."""
    lists: dict[str, list[HyperparameterValue]] = {}
    for name, entry in values.items():
        field = f"{GRID_FIELD}.{kind}.{name}"
        if not isinstance(entry, list | tuple):
            raise ManifestError(
                f"must be a list of values, e.g. [0.1, 0.01], got a {type(entry).__name__}", field=field
            )
        if not entry:
            raise ManifestError(
                "has no values, so the grid has no runs; give at least one value", field=field
            )
        lists[str(name)] = list(entry)
    return lists


def _product(lists: dict[str, list[HyperparameterValue]]) -> list[dict[str, HyperparameterValue]]:
    names = list(lists)
    return [dict(zip(names, combination, strict=True)) for combination in itertools.product(*lists.values())]


def _zipped(lists: dict[str, list[HyperparameterValue]]) -> list[dict[str, HyperparameterValue]]:
    lengths = {name: len(entry) for name, entry in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ManifestError(
            "the lists must have the same length, got "
            + ", ".join(f"{name}: {length}" for name, length in lengths.items()),
            field=f"{GRID_FIELD}.zipped",
        )
    names = list(lists)
    return [dict(zip(names, position, strict=True)) for position in zip(*lists.values(), strict=True)]


def _sample(
    values: Mapping[str, object], n: int | None, seed: int | str | None
) -> list[dict[str, HyperparameterValue]]:
    if seed is None:
        raise ManifestError(
            "a random sample needs seed=...: the DAG file is parsed again and again, and an unseeded "
            "sample would be a different grid at every parse",
            field=f"{GRID_FIELD}.seed",
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ManifestError(
            f"must be the number of runs to draw (1 or more), got {n!r}", field=f"{GRID_FIELD}.n"
        )
    rng = random.Random(seed)  # noqa: S311 - a reproducible sweep, not a secret
    distributions = {name: entry for name, entry in values.items() if isinstance(entry, Uniform | LogUniform)}
    for name, distribution in distributions.items():
        if not distribution.low < distribution.high or (
            isinstance(distribution, LogUniform) and distribution.low <= 0
        ):
            raise ManifestError(
                f"needs low < high{' and low > 0' if isinstance(distribution, LogUniform) else ''}, "
                f"got {distribution.low!r} and {distribution.high!r}",
                field=f"{GRID_FIELD}.sample.{name}",
            )
    lists = _value_lists(
        {name: entry for name, entry in values.items() if name not in distributions}, "sample"
    )
    if not distributions:  # n distinct combinations of the product, in the product's order
        size = math.prod(len(entry) for entry in lists.values())
        if n > size:
            raise ManifestError(
                f"n={n} is more than the {size} distinct combinations of the lists; give n <= {size}, "
                "or use product={...}",
                field=f"{GRID_FIELD}.n",
            )
        _check_map_length(n, "sample")
        chosen = sorted(rng.sample(range(size), n))
        names = list(lists)
        return [
            dict(zip(names, _nth_combination(list(lists.values()), index), strict=True)) for index in chosen
        ]
    _check_map_length(n, "sample")
    points: list[dict[str, HyperparameterValue]] = []
    for _ in range(n):
        point: dict[str, HyperparameterValue] = {}
        for name in values:
            drawn = distributions.get(name)
            point[name] = drawn.draw(rng) if drawn else rng.choice(lists[name])
        points.append(point)
    return points


def _nth_combination(lists: list[list[HyperparameterValue]], index: int) -> list[HyperparameterValue]:
    """The ``index``-th combination of ``itertools.product(*lists)`` (the last list varying fastest)."""
    combination: list[HyperparameterValue] = []
    for entry in reversed(lists):
        index, position = divmod(index, len(entry))
        combination.append(entry[position])
    return combination[::-1]


def _check_map_length(size: int, kind: str) -> None:
    """Refuse a grid Airflow would not expand: more points than ``[core] max_map_length``."""
    limit = max_map_length()
    if size > limit:
        raise ManifestError(
            f"the grid has {size} runs, more than the {limit} task instances a mapped task may have "
            "([core] max_map_length, AIRFLOW__CORE__MAX_MAP_LENGTH); make the grid smaller, split it "
            "over several tasks, or raise max_map_length",
            field=f"{GRID_FIELD}.{kind}",
        )


def _significant(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")
