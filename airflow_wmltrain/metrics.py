"""A run's metrics, per step and final: the one home of reading them.

A training script reports metrics in ``$RESULT_DIR``: ``metrics.jsonl``, one JSON object a line, written
as it trains (``{"step": 120, "loss": 0.31, "accuracy": 0.9}``), and/or ``metrics.json``, one object of
final values.  Its log lines may report them too, matched by a regular expression whose named groups are
metric names (``step`` optional) — given by a DAG author (the operator's ``metrics_pattern``) or an admin
(``[wmltrain] metrics_log_pattern``), never by a submitter: a pattern runs in the worker and the
triggerer, and one that backtracks catastrophically would stall them.

:class:`MetricSeries` is the series of points (small, immutable, with the behaviour to grow it, bound it
and tell the final values); :func:`read_container_file` is the one bounded reader of a file the
container wrote (never through a link, never a FIFO or a device, never more than asked).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "JSONL_FILE",
    "METRICS_FILE",
    "MetricSeries",
    "MetricsCollector",
    "check_metrics_pattern",
    "read_container_file",
    "read_metrics",
]

#: ``$RESULT_DIR/metrics.json``: the final metrics a training script reports (kept when small).
METRICS_FILE = "metrics.json"
#: ``$RESULT_DIR/metrics.jsonl``: the metrics per step, one JSON object a line, appended as it trains.
JSONL_FILE = "metrics.jsonl"
#: The largest ``metrics.json`` read.
MAX_METRICS_BYTES = 64 * 1024
#: The most of ``metrics.jsonl`` ever read (what lies beyond is ignored, with a warning).
MAX_JSONL_BYTES = 32 * 1024 * 1024
#: The most of it read at once (a look reads on from there the next time).
JSONL_CHUNK_BYTES = 4 * 1024 * 1024
#: The longest line of ``metrics.jsonl`` parsed (a longer one is skipped).
MAX_LINE_BYTES = 16 * 1024
#: The most points a series keeps: over it, every other point is dropped (the first and last kept).
MAX_POINTS = 1000
#: The most metric names of one point (the others are dropped).
MAX_NAMES = 32
#: What a metric's name may be.
NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")
STEP = "step"
#: Matched log lines parsed together.
_BATCH = 512


def read_container_file(path: Path, *, offset: int = 0, limit: int) -> tuple[bytes, int] | None:
    """Up to ``limit`` bytes from ``offset`` of a file the training container wrote, and its size.

    The container wrote it: only a regular file is read, never through a link (``O_NOFOLLOW``), never
    a FIFO or a device (``O_NONBLOCK`` and ``S_ISREG`` after the open), and never more than ``limit``
    bytes whatever its size says.

    :returns: ``(data, size)``, or ``None`` when there is no such regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None
        chunks: list[bytes] = []
        got = 0
        while got < limit:
            chunk = os.pread(fd, min(limit - got, 1024 * 1024), offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks), info.st_size
    except OSError:
        return None
    finally:
        os.close(fd)


def read_metrics(path: Path) -> dict[str, Any]:
    """The scalar entries of a small ``metrics.json`` (anything else is ignored, not an error).

    Read with :func:`read_container_file`; a file over :data:`MAX_METRICS_BYTES` and a document too
    deeply nested to parse are ignored too.
    """
    found = read_container_file(path, limit=MAX_METRICS_BYTES + 1)
    if found is None or found[1] > MAX_METRICS_BYTES or len(found[0]) > MAX_METRICS_BYTES:
        return {}
    try:
        document = json.loads(found[0].decode("utf-8"))
    except (ValueError, RecursionError):
        return {}
    if not isinstance(document, dict):
        return {}
    return {str(k): v for k, v in document.items() if isinstance(v, (int, float, str, bool)) or v is None}


def check_metrics_pattern(text: str | None, *, field: str) -> re.Pattern[str] | None:
    """The compiled metrics pattern of a DAG author or an admin (``None`` for none).

    :param field: where it was given, for the message (``metrics_pattern``,
        ``[wmltrain] metrics_log_pattern``).
    :raises ValueError: it is not a regular expression, or has no named group that names a metric.
    """
    if text is None or not str(text).strip():
        return None
    try:
        pattern = re.compile(str(text))
    except re.error as err:
        raise ValueError(
            f"{field}: {text!r} is not a regular expression ({err}); write e.g. "
            r"'step (?P<step>\d+) loss (?P<loss>[-+.\deE]+)'"
        ) from None
    names = [name for name in pattern.groupindex if name != STEP]
    if not names:
        raise ValueError(
            f"{field}: {text!r} has no named group to name a metric; write e.g. "
            r"'step (?P<step>\d+) loss (?P<loss>[-+.\deE]+)' (each group other than step is a metric)"
        )
    return pattern


def _number(value: object) -> float | None:
    """A finite number (``True``/``False``, NaN and infinities are not), or ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _step(value: object) -> int | None:
    number = _number(value)
    if number is None or number < 0 or number != int(number) or number > 2**53:
        return None
    return int(number)


def _values(items: Iterable[tuple[object, object]], *, text: bool = False) -> dict[str, float]:
    """The metrics of one point: valid names, finite numbers (or, with ``text``, the text of one: a
    regular expression's group), at most :data:`MAX_NAMES`."""
    values: dict[str, float] = {}
    for name, value in items:
        if name == STEP or not isinstance(name, str) or not NAME.fullmatch(name):
            continue
        if isinstance(value, str) and not text:
            continue
        number = _number(value)
        if number is not None:
            values[name] = number
            if len(values) >= MAX_NAMES:
                break
    return values


@dataclass(frozen=True)
class MetricSeries:
    """A run's metrics per step, oldest first, bounded (:data:`MAX_POINTS`): immutable, each addition
    returns a new series.

    :param points: ``{"step": 120, "loss": 0.31, ...}`` each (the shape of ``RunStatus.steps``).
    :param offset: how much of ``metrics.jsonl`` has been read (up to the end of its last whole line).
    """

    points: tuple[Mapping[str, float], ...] = ()
    offset: int = 0

    # --- growing -------------------------------------------------------------------------------------

    def with_point(self, values: Mapping[str, float], step: int | None = None) -> MetricSeries:
        """The series with one more point (merged into the last one when it is of the same step); without
        a step, the point after the last (the first is step 0)."""
        return self.with_points([(values, step)])

    def with_points(self, new: Iterable[tuple[Mapping[str, float], int | None]]) -> MetricSeries:
        """The series with more points (``(values, step)`` each, as :meth:`with_point` takes one): built
        in one list, thinned as it grows past twice the bound, so that a flood of points costs little."""
        points = list(self.points)
        for values, given in new:
            if not values:
                continue
            step = given if given is not None else int(points[-1][STEP]) + 1 if points else 0
            if points and points[-1].get(STEP) == step:
                merged = {**points[-1], **values}
                points[-1] = dict(list(merged.items())[: MAX_NAMES + 1])
            else:
                points.append({STEP: step, **values})
            if len(points) > 2 * MAX_POINTS:
                points = list(_bounded(points))
        return replace(self, points=_bounded(points))

    def with_jsonl(self, data: bytes, *, final: bool = False) -> MetricSeries:
        """The series with the points of ``metrics.jsonl``'s bytes from :attr:`offset` on.

        Only whole lines are taken (the rest is read again next time), unless ``final`` (the file is
        complete). A line that is not a JSON object, or longer than :data:`MAX_LINE_BYTES`, is skipped
        (an unfinished line already that long too: it is never read again).
        """
        end = len(data) if final else data.rfind(b"\n") + 1
        if len(data) - end > MAX_LINE_BYTES:
            end = len(data)
        return replace(self.with_points(_jsonl_points(data[:end])), offset=self.offset + end)

    def with_log_lines(self, lines: Iterable[str], pattern: re.Pattern[str] | None) -> MetricSeries:
        """The series with the points of the log lines that ``pattern`` matches (its named groups)."""
        if pattern is None:
            return self
        return self.with_points(_log_points(lines, pattern))

    def read_jsonl(self, path: Path) -> MetricSeries:
        """The series with what ``metrics.jsonl`` at ``path`` (in the run's workspace) holds beyond
        :attr:`offset`: read with :func:`read_container_file`, at most :data:`JSONL_CHUNK_BYTES` at a
        time and :data:`MAX_JSONL_BYTES` in all."""
        room = MAX_JSONL_BYTES - self.offset
        if room <= 0:
            return self
        found = read_container_file(path, offset=self.offset, limit=min(room, JSONL_CHUNK_BYTES))
        return self if found is None else self.with_jsonl(found[0])

    def merged(self, other: MetricSeries) -> MetricSeries:
        """One series of the points of two sources (``metrics.jsonl``'s and the log's), by step: the
        points of a step merged (``other``'s values win), bounded."""
        if not other.points:
            return self
        if not self.points:
            return other
        by_step: dict[Any, dict[str, float]] = {}
        for point in sorted((*self.points, *other.points), key=lambda p: p.get(STEP, 0)):
            by_step.setdefault(point.get(STEP, 0), {}).update(point)
        return MetricSeries(points=_bounded(list(by_step.values())))

    # --- reading -------------------------------------------------------------------------------------

    @property
    def steps(self) -> tuple[Mapping[str, float], ...]:
        """The points, as ``RunStatus.steps`` holds them."""
        return self.points

    def last_values(self) -> dict[str, float]:
        """The last value of each metric."""
        values: dict[str, float] = {}
        for point in self.points:
            values.update({name: value for name, value in point.items() if name != STEP})
        return values

    def final(self, metrics_json: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The run's metrics: the last value of each, ``metrics.json``'s winning."""
        return {**self.last_values(), **dict(metrics_json or {})}

    @classmethod
    def from_steps(cls, steps: Iterable[Mapping[str, Any]]) -> MetricSeries:
        """A series of a status document's ``steps`` (its offset unknown: 0)."""
        return cls(points=tuple(dict(point) for point in steps))


def _jsonl_points(data: bytes) -> Iterator[tuple[dict[str, float], int | None]]:
    for line in data.split(b"\n"):
        if not line.strip() or len(line) > MAX_LINE_BYTES:
            continue
        try:
            document = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(document, dict):
            step = document.get(STEP)
            yield _values(document.items()), None if isinstance(step, str) else _step(step)


def _log_points(
    lines: Iterable[str], pattern: re.Pattern[str]
) -> Iterator[tuple[dict[str, float], int | None]]:
    for line in lines:
        match = pattern.search(line)
        if match is not None:
            groups = match.groupdict()
            values = _values(
                ((name, value) for name, value in groups.items() if value is not None), text=True
            )
            yield values, _step(groups.get(STEP))


def _bounded(points: list[Mapping[str, float]]) -> tuple[Mapping[str, float], ...]:
    """At most :data:`MAX_POINTS`: over it, every other point between the first and the last is dropped
    (deterministic: the same points give the same series)."""
    while len(points) > MAX_POINTS:
        points = [points[0], *points[1:-1][1::2], points[-1]]
    return tuple(points)


class MetricsCollector:
    """Collects a run's metrics while it trains and publishes them at most every ``interval`` seconds.

    Fed from two sources, each its own series (the log's and ``metrics.jsonl``'s, each with its own
    offset and point count), published merged (:meth:`MetricSeries.merged`).  Thread-safe: the log
    follower feeds lines while a watcher thread reads the file and publishes.  A publication that
    fails is logged and never raised: metrics never fail a run.

    :param pattern: the log pattern (:func:`check_metrics_pattern`), or ``None``.
    :param interval: the shortest time between two publications, in seconds.
    :param publish: called with the series to publish (``TrainingRun.progress``).
    :param log: where a failed publication is said.
    """

    def __init__(
        self,
        pattern: re.Pattern[str] | None,
        *,
        interval: float,
        publish: Callable[[MetricSeries], object],
        log: Any,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pattern = pattern
        self.interval = interval
        self.publish = publish
        self.log = log
        self.clock = clock
        self.from_log = MetricSeries()
        self.from_file = MetricSeries()
        self._lock = threading.Lock()
        self._published: MetricSeries | None = None
        self._tried_at: float | None = None
        self._warned = False
        self._warned_size = False
        self._matched: list[str] = []

    @property
    def series(self) -> MetricSeries:
        with self._lock:
            self._parse_matched()
            return self.from_file.merged(self.from_log)

    def restart_log(self) -> None:
        """The log is read again from its start: its points are collected afresh."""
        with self._lock:
            self.from_log = MetricSeries()
            self._matched = []

    def feed_line(self, line: str) -> None:
        """One line of the training's output (matched lines are parsed in batches)."""
        if self.pattern is None or self.pattern.search(line) is None:
            return
        with self._lock:
            self._matched.append(line)
            if len(self._matched) >= _BATCH:
                self._parse_matched()

    def feed_lines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.feed_line(line)

    def _parse_matched(self) -> None:
        """Under the lock: the matched lines waiting, into the log's series."""
        if self._matched:
            self.from_log = self.from_log.with_log_lines(self._matched, self.pattern)
            self._matched = []

    def read_jsonl(self, path: Path) -> None:
        """Read on in ``metrics.jsonl`` of the run's workspace (:func:`read_container_file`)."""

        def read(offset: int, limit: int) -> bytes | None:
            found = read_container_file(path, offset=offset, limit=limit)
            return None if found is None else found[0]

        self.read_jsonl_with(read)

    def read_jsonl_with(self, read: Callable[[int, int], bytes | None]) -> None:
        """Read on in ``metrics.jsonl`` with ``read(offset, limit)`` (the workspace's file, or the
        container's through the Docker API): at most :data:`JSONL_CHUNK_BYTES` at a time and
        :data:`MAX_JSONL_BYTES` in all (what lies beyond is ignored, said once)."""
        offset = self.from_file.offset
        room = MAX_JSONL_BYTES - offset
        if room <= 0:
            if not self._warned_size:
                self._warned_size = True
                self.log.warning(
                    "%s is over %d bytes: its further points are ignored", JSONL_FILE, MAX_JSONL_BYTES
                )
            return
        data = read(offset, min(room, JSONL_CHUNK_BYTES))
        if data:
            with self._lock:
                self.from_file = self.from_file.with_jsonl(data)

    def due(self) -> bool:
        """Whether a publication is due (the interval has passed since the last try)."""
        return self._tried_at is None or self.clock() - self._tried_at >= self.interval

    def publish_if_due(self, *, force: bool = False) -> bool:
        """Publish the series if it changed and the interval has passed (or ``force``); whether it did."""
        if not force and not self.due():
            return False
        self._tried_at = self.clock()
        series = self.series
        if not series.points or (self._published is not None and series.points == self._published.points):
            return False
        try:
            self.publish(series)
        except Exception as err:  # metrics never fail a run
            if not self._warned:
                self._warned = True
                self.log.warning("Could not publish the run's metrics (%s); the run goes on", err)
            return False
        self._published = series
        return True
