"""``wmltrain list | show | metrics | delete | logs | monitor | halt``: training runs as Airflow knows
them (REST API).

``list`` shows every run — the bundled DAG's and those of ``TrainingRunOperator`` tasks in any DAG,
failed and halted ones included, with their reason —, in the seed service's columns plus the DAG.
These commands import nothing of Airflow, so they start fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from airflow_wmltrain.cli.server import add_server_options, add_wait_options, api_from_args, wait_options
from airflow_wmltrain.errors import EXIT_BAD_INPUT, EXIT_OK
from airflow_wmltrain.lifecycle import RunState
from airflow_wmltrain.service.api import AirflowApi, quote
from airflow_wmltrain.service.runs import (
    TrainingRunRecord,
    WaitOptions,
    delete_moved_connections,
    delete_run,
    find_run,
    list_runs,
    log_lines,
    metric_points,
    request_halt,
    wait_not_running,
)
from airflow_wmltrain.waiting import WaitTimeoutError

NOUNS = ("trained-models", "training-runs", "models", "runs")
#: How long ``delete --halt`` waits for the halted task to stop.
HALT_WAIT_S = 120.0


def register(commands: Any) -> None:
    listing = commands.add_parser("list", help="list the training runs (failed and halted ones included)")
    listing.add_argument("noun", nargs="?", choices=NOUNS, help=argparse.SUPPRESS)
    listing.add_argument("--state", help="only runs in this state (COMPLETED, FAILED, HALTED, PROCESSING...)")
    listing.add_argument("--limit", type=int, help="at most this many (newest first)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_server_options(listing)
    listing.set_defaults(handler=run_list)

    for name, helptext, handler in (
        ("show", "show a training run's details", run_show),
        ("delete", "remove a run's history from Airflow (the files in the bucket stay)", run_delete),
        ("logs", "print a run's training log", run_logs),
        ("metrics", "print a run's metrics per step", run_metrics),
        ("halt", "stop a run (it ends HALTED, its logs stored)", run_halt),
        ("monitor", "follow a run's training log until the run ends (logs --follow)", run_logs),
    ):
        parser = commands.add_parser(name, help=helptext)
        parser.add_argument("args", nargs="+", metavar="ID", help="the training id (training-...)")
        parser.add_argument(
            "--json",
            action="store_true",
            help="print JSON lines, one a log line" if name in ("logs", "monitor") else "print JSON",
        )
        if name == "delete":
            parser.add_argument(
                "--halt", action="store_true", help="halt the run first if it is still active"
            )
        if name == "monitor":  # the seed service's `bx ml monitor`
            parser.set_defaults(follow=True)
            add_wait_options(parser)
        if name in ("logs", "metrics"):
            parser.add_argument(
                "--follow",
                "-f",
                action="store_true",
                help=f"print the new {'lines' if name == 'logs' else 'points'} until the run ends",
            )
            add_wait_options(parser)
        add_server_options(parser)
        parser.set_defaults(handler=handler)


def _training_id(args: argparse.Namespace) -> str:
    words = [w for w in args.args if w not in NOUNS]
    if len(words) != 1:  # a usage error (exit status 2), like argparse's own
        print(
            f"wmltrain {args.command}: give one training id, e.g. wmltrain {args.command} training-abc",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_BAD_INPUT)
    return str(words[0])


def _ui_url(api: AirflowApi, record: TrainingRunRecord) -> str:
    url = f"{api.url}/dags/{quote(record.dag_id)}/runs/{quote(record.run_id)}"
    if record.task_id:
        url += f"/tasks/{quote(record.task_id)}"
        if record.map_index >= 0:
            url += f"/mapped/{record.map_index}"
    return url


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def run_list(args: argparse.Namespace) -> int:
    api = api_from_args(args)
    records = list_runs(api, state=args.state, limit=args.limit)
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return EXIT_OK
    rows = []
    for number, record in enumerate(records, 1):
        reason = ""
        if record.error and record.state in (RunState.FAILED, RunState.HALTED):
            reason = f"{record.error.get('code', '')} {record.error.get('message', '').splitlines()[0][:70]}"
        elif record.view.phase:  # e.g. waiting for GPUs, and who holds them
            reason = record.view.phase[:80]
        where = record.dag_id + (f"[{record.map_index}]" if record.map_index >= 0 else "")
        rows.append(
            [
                str(number),
                record.name,
                record.training_id,
                record.state.value,
                record.submitted,
                where,
                reason,
            ]
        )
    print(_table(rows, ["#", "name", "id", "status", "submitted-at", "dag", "reason"]))
    return EXIT_OK


def run_show(args: argparse.Namespace) -> int:
    training_id = _training_id(args)  # a usage error before the server is asked anything
    api = api_from_args(args)
    record = find_run(api, training_id)
    document = {**record.to_dict(), "url": _ui_url(api, record)}
    if args.json:
        print(json.dumps(document, indent=2))
        return EXIT_OK
    rows = [
        ("id", record.training_id),
        ("url", document["url"]),
        ("name", record.name),
        ("state", record.state.value),
        ("submitted-at", record.submitted),
    ]
    if document["phase"]:
        rows.append(("phase", document["phase"]))
    rows += [(f"  {h['state'].lower()}", h["at"]) for h in document["history"]]
    rows += [
        (
            "dag",
            f"{record.dag_id} / {record.run_id} / {record.task_id or '-'}"
            + (f"[{record.map_index}]" if record.map_index >= 0 else ""),
        ),
        ("gpus", ",".join(document["gpus"]) or "none"),
        ("image", document["image"] or ""),
        ("command", document["command"] or ""),
        ("data", document["data_location"] or ""),
        ("results", document["results_location"] or ""),
    ]
    if record.error:
        rows.append(("error", f"{record.error.get('code', '')} {record.error.get('message', '')}"))
    if document["metrics"]:
        rows.append(("metrics", json.dumps(document["metrics"], sort_keys=True)))
    if document["metric_points"]:
        rows.append(("steps", f"{document['metric_points']} points (wmltrain metrics {record.training_id})"))
    for label, value in rows:
        print(f"{label:<14} {value}")
    return EXIT_OK


def _wait_not_running(
    api: AirflowApi, record: TrainingRunRecord, timeout: float = HALT_WAIT_S
) -> TrainingRunRecord:
    """The run once its halted task stopped (as it stands after ``timeout`` seconds if it has not)."""
    try:
        return wait_not_running(api, record, options=WaitOptions(timeout=timeout, max_outage=timeout))
    except WaitTimeoutError:
        return find_run(api, record.training_id)


def run_delete(args: argparse.Namespace) -> int:
    training_id = _training_id(args)  # a usage error before the server is asked anything
    api = api_from_args(args)
    record = find_run(api, training_id)
    if record.active:
        if not args.halt:
            print(
                f"error: {record.training_id} is {record.state.value}; halt it first (wmltrain halt "
                f"{record.training_id}) or delete it with --halt",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        request_halt(api, record)
        record = _wait_not_running(api, record)
        halted = True
    else:
        halted = False
    removed = delete_run(api, record)
    where = record.status.results_location or "the results bucket"
    if not halted:  # a halt may still need them to store the logs: the retention DAG removes them later
        delete_moved_connections(api, record.training_id)
    if args.json:
        document = {
            "training_id": record.training_id,
            "removed": removed,
            "results_location": record.status.results_location,
            "halted": halted,
        }
        print(json.dumps(document, indent=2))
        return EXIT_OK
    print(f"Deleted {record.training_id}: {removed} removed from Airflow; its files in {where} stay")
    if halted:
        print("note: connections made from the run's inline credentials are removed by wmltrain_retention")
    return EXIT_OK


def run_logs(args: argparse.Namespace) -> int:
    training_id = _training_id(args)  # a usage error before the server is asked anything
    api = api_from_args(args)
    record = find_run(api, training_id)
    for line in log_lines(api, record, follow=args.follow, options=wait_options(args)):
        shown = json.dumps({"training_id": record.training_id, "line": line}) if args.json else line
        print(shown, flush=True)
    return EXIT_OK


def _number(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.6g}"
    return str(int(value)) if isinstance(value, float) else str(value)


def _metrics_row(cells: list[str], headers: list[str]) -> str:
    """One row of ``wmltrain metrics``' table: each column as wide as its header (10 at least), so that
    rows printed as they come line up."""
    widths = [max(10, len(header)) for header in headers]
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def run_metrics(args: argparse.Namespace) -> int:
    training_id = _training_id(args)  # a usage error before the server is asked anything
    api = api_from_args(args)
    record = find_run(api, training_id)
    points = metric_points(api, record, follow=args.follow, options=wait_options(args))
    if args.json:  # one JSON object a line with --follow (the points as they come), else one document
        if args.follow:
            for point in points:
                print(json.dumps(point, sort_keys=True), flush=True)
        else:
            document = {"training_id": record.training_id, "state": record.state.value}
            print(json.dumps({**document, "metrics": dict(record.view.metrics), "steps": list(points)}))
        return EXIT_OK
    columns: list[str] = []
    printed = False
    for point in points:
        names = sorted(name for name in point if name != "step" and name not in columns)
        if names or not printed:  # a metric not seen before: the header again, with it
            columns += names
            print(_metrics_row(["step", *columns], ["step", *columns]), flush=True)
            printed = True
        cells = [_number(point.get("step", "")), *(_number(point[c]) if c in point else "-" for c in columns)]
        print(_metrics_row(cells, ["step", *columns]), flush=True)
    if not printed:
        print(
            f"{record.training_id} has no metrics per step (yet): it is {record.state.value}", file=sys.stderr
        )
    return EXIT_OK


def run_halt(args: argparse.Namespace) -> int:
    training_id = _training_id(args)  # a usage error before the server is asked anything
    api = api_from_args(args)
    record = find_run(api, training_id)
    if not record.active:
        message = f"{record.training_id} is already {record.state.value}"
    else:
        request_halt(api, record)
        if record.ti_state in ("running", "deferred"):
            message = (
                f"Halting {record.training_id}: its container is stopped and its logs are stored; it ends "
                "HALTED"
            )
        else:
            message = (
                f"Halted {record.training_id}: its task was {record.ti_state or 'not started'}, so no "
                "training was under way; it is marked failed and will not start"
            )
    if args.json:
        document = {
            "training_id": record.training_id,
            "halt_requested": record.active,
            "state": record.state.value,
            "message": message,
        }
        print(json.dumps(document, indent=2))
    else:
        print(message)
    return EXIT_OK
