"""``airflow_wmltrain.metrics``: the series of a run's metrics per step, its sources (``metrics.jsonl``,
log lines matched by a DAG author's pattern), its bounds, and the one bounded reader of files the
training container wrote — which never follows a link, never blocks on a FIFO, never reads a device,
and never reads more than asked, whatever the container left there."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from airflow_wmltrain import metrics
from airflow_wmltrain.metrics import (
    JSONL_CHUNK_BYTES,
    MAX_JSONL_BYTES,
    MAX_NAMES,
    MAX_POINTS,
    MetricsCollector,
    MetricSeries,
    check_metrics_pattern,
    read_container_file,
)
from airflow_wmltrain.runtime.run import _final_series

PATTERN = check_metrics_pattern(
    r"step (?P<step>\d+) loss=(?P<loss>\S+)(?: acc=(?P<accuracy>\S+))?", field="t"
)


def jsonl(*points: dict[str, Any]) -> bytes:
    return b"".join(json.dumps(point).encode() + b"\n" for point in points)


# --- metrics.jsonl -----------------------------------------------------------------------------------------


def test_jsonl_points_take_their_step_or_their_index() -> None:
    series = MetricSeries().with_jsonl(
        jsonl({"step": 10, "loss": 0.5}, {"loss": 0.4}, {"step": 30, "loss": 0.3})
    )
    assert series.steps == ({"step": 10, "loss": 0.5}, {"step": 11, "loss": 0.4}, {"step": 30, "loss": 0.3})
    assert series.offset == len(jsonl({"step": 10, "loss": 0.5}, {"loss": 0.4}, {"step": 30, "loss": 0.3}))


def test_jsonl_unfinished_line_is_read_again_once_it_is_whole() -> None:
    first = b'{"step": 1, "loss": 0.5}\n{"step": 2, "lo'
    series = MetricSeries().with_jsonl(first)
    assert series.steps == ({"step": 1, "loss": 0.5},)
    assert series.offset == first.index(b"\n") + 1
    whole = b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
    series = series.with_jsonl(whole[series.offset :])
    assert [p["step"] for p in series.steps] == [1, 2]
    assert series.offset == len(whole)


def test_jsonl_bad_lines_nan_inf_bools_strings_and_bad_names_are_skipped() -> None:
    data = (
        b"not json\n"
        b"[1, 2]\n"
        b'{"step": 1, "loss": NaN, "acc": Infinity, "neg": -Infinity, "ok": 0.5}\n'
        b'{"step": 2, "flag": true, "name": "x", "nested": {"a": 1}, "bad name": 1, "ok": 0.4}\n'
        + b'{"step": 3, "'
        + b"x" * 65
        + b'": 1, "ok": 0.3}\n'
        b'{"step": "NaN", "ok": 0.2}\n'
        b'{"step": -4, "ok": 0.1}\n'
        b'{"step": 2.5, "ok": "0.2", "ok2": 0.3}\n'
        b"\n" + b"[" * 10_000 + b"\n"  # too deeply nested to parse
    )
    series = MetricSeries().with_jsonl(data)
    assert series.steps == (
        {"step": 1, "ok": 0.5},
        {"step": 2, "ok": 0.4},
        {"step": 3, "ok": 0.3},
        {"step": 4, "ok": 0.2},  # no valid step: the step after the last
        {"step": 5, "ok": 0.1},
        {"step": 6, "ok2": 0.3},  # a number in text is not one
    )
    for point in series.steps:
        assert all(isinstance(v, (int, float)) and v == v for v in point.values())


def test_a_point_keeps_at_most_max_names() -> None:
    point = {f"m{i}": float(i) for i in range(200)}
    series = MetricSeries().with_jsonl(jsonl({"step": 1, **point}))
    [kept] = series.steps
    assert len(kept) == MAX_NAMES + 1  # and the step
    assert list(kept)[1:] == [f"m{i}" for i in range(MAX_NAMES)]


def test_a_line_longer_than_the_line_cap_is_skipped_and_never_read_again() -> None:
    long_line = b'{"step": 1, "loss": 0.5, "pad": "' + b"x" * metrics.MAX_LINE_BYTES + b'"}\n'
    series = MetricSeries().with_jsonl(long_line + jsonl({"step": 2, "loss": 0.4}))
    assert series.steps == ({"step": 2, "loss": 0.4},)
    unfinished = b'{"step": 1, "pad": "' + b"x" * (metrics.MAX_LINE_BYTES + 10)
    assert MetricSeries().with_jsonl(unfinished).offset == len(unfinished)


# --- the log pattern ---------------------------------------------------------------------------------------


def test_log_lines_matched_by_the_pattern_are_points() -> None:
    lines = ["starting", "step 10 loss=0.5 acc=0.7", "noise loss=1", "step 20 loss=nan", "step 20 loss=0.4"]
    series = MetricSeries().with_log_lines(lines, PATTERN)
    assert series.steps == ({"step": 10, "loss": 0.5, "accuracy": 0.7}, {"step": 20, "loss": 0.4})


def test_a_pattern_without_step_numbers_the_points() -> None:
    pattern = check_metrics_pattern(r"loss=(?P<loss>[0-9.]+)", field="t")
    series = MetricSeries().with_log_lines(["loss=0.5", "x", "loss=0.4"], pattern)
    assert series.steps == ({"step": 0, "loss": 0.5}, {"step": 1, "loss": 0.4})


def test_no_pattern_no_log_points() -> None:
    assert MetricSeries().with_log_lines(["step 1 loss=0.5"], None).steps == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("step (?P<step>\\d+ loss", "is not a regular expression"),
        ("loss=([0-9.]+)", "has no named group"),
        ("step (?P<step>\\d+)", "has no named group"),
    ],
)
def test_a_bad_pattern_is_refused_naming_the_field(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match=rf"^metrics_pattern: .*{expected}"):
        check_metrics_pattern(text, field="metrics_pattern")


def test_an_empty_pattern_is_none() -> None:
    assert check_metrics_pattern("", field="x") is None
    assert check_metrics_pattern(None, field="x") is None


# --- bounds, merging, final values -------------------------------------------------------------------------


def test_the_series_is_bounded_keeping_the_first_and_last_points_deterministically() -> None:
    data = jsonl(*({"step": i, "loss": 1.0 / (i + 1)} for i in range(5000)))
    series = MetricSeries().with_jsonl(data)
    assert len(series.steps) <= MAX_POINTS
    assert series.steps[0]["step"] == 0
    assert series.steps[-1]["step"] == 4999
    steps = [p["step"] for p in series.steps]
    assert steps == sorted(steps)
    assert MetricSeries().with_jsonl(data).steps == series.steps


def test_merged_orders_by_step_and_merges_the_points_of_a_step() -> None:
    from_file = MetricSeries().with_jsonl(jsonl({"step": 1, "loss": 0.5}, {"step": 3, "loss": 0.3}))
    from_log = MetricSeries().with_log_lines(["step 2 loss=0.4", "step 3 loss=0.35 acc=0.9"], PATTERN)
    assert from_file.merged(from_log).steps == (
        {"step": 1, "loss": 0.5},
        {"step": 2, "loss": 0.4},
        {"step": 3, "loss": 0.35, "accuracy": 0.9},
    )


def test_final_values_are_the_last_of_each_metric_and_metrics_json_wins() -> None:
    series = MetricSeries().with_jsonl(jsonl({"step": 1, "loss": 0.5, "acc": 0.1}, {"step": 2, "loss": 0.4}))
    assert series.final() == {"loss": 0.4, "acc": 0.1}
    assert series.final({"acc": 0.95, "note": "best"}) == {"loss": 0.4, "acc": 0.95, "note": "best"}


def test_final_series_reads_the_whole_file_and_falls_back_to_the_live_points(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(jsonl({"step": 1, "loss": 0.5}) + b'{"step": 2, "loss": 0.4}')  # no last newline
    assert [p["step"] for p in _final_series(path, MetricSeries(), ()).steps] == [1, 2]
    live = ({"step": 7, "loss": 0.1},)
    assert _final_series(tmp_path / "gone.jsonl", MetricSeries(), live).steps == live


# --- the collector ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_collector_publishes_at_most_every_interval_and_only_changes(tmp_path: Path) -> None:
    published: list[MetricSeries] = []
    clock = Clock()
    collector = MetricsCollector(PATTERN, interval=30, publish=published.append, log=None, clock=clock)
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(jsonl({"step": 1, "loss": 0.5}))
    collector.read_jsonl(path)
    assert collector.publish_if_due()
    collector.feed_line("step 2 loss=0.4")
    clock.now = 10
    assert not collector.publish_if_due()
    clock.now = 31
    assert collector.publish_if_due()
    clock.now = 70
    assert not collector.publish_if_due()  # nothing new
    assert [[p["step"] for p in s.steps] for s in published] == [[1], [1, 2]]


def test_a_failing_publication_is_said_once_and_never_raised() -> None:
    warnings: list[str] = []

    class Log:
        def warning(self, message: str, *args: Any) -> None:
            warnings.append(message % args)

    def publish(series: MetricSeries) -> None:
        raise RuntimeError("the store is down")

    clock = Clock()
    collector = MetricsCollector(PATTERN, interval=1, publish=publish, log=Log(), clock=clock)
    for n in range(3):
        collector.feed_line(f"step {n} loss=0.5")
        clock.now += 2
        assert not collector.publish_if_due()
    assert len(warnings) == 1
    assert "the store is down" in warnings[0]


def test_the_collector_stops_reading_at_the_total_cap(tmp_path: Path) -> None:
    warnings: list[str] = []

    class Log:
        def warning(self, message: str, *args: Any) -> None:
            warnings.append(message % args)

    reads: list[tuple[int, int]] = []

    def read(offset: int, limit: int) -> bytes:
        reads.append((offset, limit))
        return (b'{"loss": 0.5}' + b" " * 50 + b"\n") * (limit // 64)

    collector = MetricsCollector(None, interval=1, publish=lambda s: None, log=Log())
    for _ in range(MAX_JSONL_BYTES // JSONL_CHUNK_BYTES + 3):
        collector.read_jsonl_with(read)
    assert all(limit <= JSONL_CHUNK_BYTES for _, limit in reads)
    assert sum(limit for _, limit in reads) <= MAX_JSONL_BYTES
    assert len(warnings) == 1


# --- hostile files: never followed, never blocking, never unbounded -----------------------------------------


def test_a_symlink_to_a_worker_file_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "worker-secret"
    secret.write_text('{"step": 1, "leaked": 42}\n')
    link = tmp_path / "metrics.jsonl"
    link.symlink_to(secret)
    assert read_container_file(link, limit=1024) is None
    assert MetricSeries().read_jsonl(link).steps == ()
    assert _final_series(link, MetricSeries(), ()).steps == ()


def test_a_fifo_is_not_read_and_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "metrics.jsonl"
    os.mkfifo(fifo)
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.append(read_container_file(fifo, limit=1024)), daemon=True)
    reader.start()
    reader.join(timeout=5)
    try:
        assert not reader.is_alive(), "read_container_file blocked opening a FIFO that has no writer"
        assert found == [None]
    finally:
        if reader.is_alive():  # let the blocked open return
            with open(fifo, "wb"):
                pass


def test_a_link_to_dev_zero_and_dev_zero_itself_are_not_read(tmp_path: Path) -> None:
    link = tmp_path / "metrics.jsonl"
    link.symlink_to("/dev/zero")
    assert read_container_file(link, limit=1024) is None
    assert read_container_file(Path("/dev/zero"), limit=1024) is None  # a device, reached without a link


def test_a_huge_file_is_read_in_bounded_chunks_and_never_past_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with path.open("wb") as out:  # 100 MB, sparse: one line, then zeros, no newline
        out.write(jsonl({"step": 1, "loss": 0.5}))
        out.truncate(100 * 1024 * 1024)
    data, size = read_container_file(path, limit=JSONL_CHUNK_BYTES) or (b"", 0)
    assert size == 100 * 1024 * 1024
    assert len(data) == JSONL_CHUNK_BYTES
    series = MetricSeries()
    for _ in range(40):
        series = series.read_jsonl(path)
    assert series.offset <= MAX_JSONL_BYTES
    assert series.steps == ({"step": 1, "loss": 0.5},)
    final = _final_series(path, MetricSeries(), ())
    assert final.offset <= MAX_JSONL_BYTES
    assert final.steps == ({"step": 1, "loss": 0.5},)


def test_a_flood_of_matched_log_lines_costs_little_and_stays_bounded() -> None:
    import time

    collector = MetricsCollector(PATTERN, interval=1, publish=lambda s: None, log=None)
    started = time.monotonic()
    for i in range(200_000):
        collector.feed_line(f"step {i} loss=0.5")
    series = collector.series
    elapsed = time.monotonic() - started
    assert len(series.steps) <= MAX_POINTS
    assert series.steps[0]["step"] == 0
    assert series.steps[-1]["step"] == 199_999
    assert elapsed < 20, f"{elapsed:.1f} s for 200,000 lines"
