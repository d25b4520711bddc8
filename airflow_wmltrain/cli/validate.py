"""``wmltrain validate MODEL.zip MANIFEST.yaml``: the offline check a user runs before submitting.

``--check-stores`` adds the one check that goes online, :func:`check_stores` (which ``wmltrain train``
runs before it submits anything): each store given with inline credentials must answer and accept them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import structlog
import yaml

from airflow_wmltrain.cli.arguments import MANIFEST, MODEL_ZIP, add_command
from airflow_wmltrain.errors import (
    EXIT_OK,
    BucketNotFoundError,
    CredentialsError,
    DataLoadError,
    ManifestError,
    ResultsStoreError,
    WmlTrainError,
    exit_status,
)
from airflow_wmltrain.manifest import ConnectionId, TrainingManifest
from airflow_wmltrain.settings import Settings
from airflow_wmltrain.submission import check_submission

#: Seconds a store may take to answer the check of :func:`check_stores` (one try, no retry): a store that
#: does not answer is reported in seconds, not after the transfers' minutes of retries.
STORE_CHECK_TIMEOUT = 5.0
_SKIP_HINT = "`wmltrain train --no-store-check` skips this check when only the workers can reach the store"


def register(commands: Any) -> None:
    parser = add_command(commands, "validate", run, MODEL_ZIP, MANIFEST)
    add_hyperparameter_option(parser, "-p", "--hyperparameter")
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of text")
    parser.add_argument(
        "--check-stores",
        action="store_true",
        help="also check that the stores given with inline credentials answer and accept them (online)",
    )


def add_hyperparameter_option(parser: argparse.ArgumentParser, *flags: str) -> None:
    """The repeatable ``NAME=VALUE`` option (``flags``, e.g. ``-p``) read by :func:`parse_hyperparameters`."""
    parser.add_argument(
        *flags,
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="override an option of the command (repeatable), e.g. -p learningRate=0.01",
    )


def parse_hyperparameters(pairs: list[str]) -> dict[str, Any]:
    """``["lr=0.01", "debug=true"]`` → ``{"lr": 0.01, "debug": True}`` (values read as YAML scalars)."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ManifestError(
                f"'{pair}' is not NAME=VALUE, e.g. learningRate=0.01", field="--hyperparameter"
            )
        try:
            parsed[name.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed[name.strip()] = value
    return parsed


def check_stores(manifest: TrainingManifest, *, timeout: float = STORE_CHECK_TIMEOUT) -> dict[str, str]:
    """Check that each store given with inline credentials answers and accepts them; what was checked.

    The data bucket and the results bucket are each asked once (:meth:`ObjectStore.check_bucket
    <airflow_wmltrain.storage.base.ObjectStore.check_bucket>`: S3's ``HEAD`` of a bucket is allowed only
    to whom may list it), with ``timeout`` seconds per request and no retry, so an endpoint that does not
    answer is reported in seconds.  A store given as an Airflow connection is not checked: its
    credentials live in Airflow, out of this command's reach.  Nothing is written, and nothing is logged
    (:func:`_logs_dropped`): the outcome is the result or the one error.

    :param manifest: the submission's manifest.
    :param timeout: seconds each request (connect, each read) may take.
    :returns: ``{"data": ..., "results": ...}``: ``"answers"``, or why the store was not checked.
    :raises CredentialsError: (C103) a store refused the credentials (the field is the reference's
        ``connection``).
    :raises BucketNotFoundError: (C101) a bucket does not exist.
    :raises DataLoadError: (S302) the data store cannot be reached.
    :raises ResultsStoreError: (S303) the results store cannot be reached.
    """
    from airflow_wmltrain.storage import open_store
    from airflow_wmltrain.storage.transfer import RetryPolicy, TransferError

    checked: dict[str, str] = {}
    for role, reference, field, bucket_field, unreachable in (
        ("data", manifest.data, "training_data_reference[0]", "source.bucket", DataLoadError),
        ("results", manifest.results, "training_results_reference", "target.bucket", ResultsStoreError),
    ):
        if isinstance(reference.connection, ConnectionId):
            checked[role] = f"not checked (Airflow connection '{reference.connection.conn_id}')"
            continue
        try:
            # The store first: opening one may import Airflow (a hook), which sets up its logging; the
            # logs are dropped from then on (_logs_dropped redirects Airflow's logger as it finds it).
            with (
                open_store(reference, timeout=timeout, retry=RetryPolicy(attempts=1)) as store,
                _logs_dropped(),
            ):
                store.check_bucket(field=f"{field}.{bucket_field}")
        except BucketNotFoundError as err:
            raise BucketNotFoundError(f"{err.message}; {_SKIP_HINT}", field=err.field) from None
        except CredentialsError as err:
            raise CredentialsError(f"{err.message}; {_SKIP_HINT}", field=f"{field}.connection") from None
        except (TransferError, DataLoadError) as err:  # DataLoadError: a Swift auth endpoint's
            raise unreachable(
                f"{reference.describe()} cannot be reached: {err.message}; check the endpoint, or try "
                f"again later; {_SKIP_HINT}",
                field=f"{field}.connection",
            ) from None
        checked[role] = "answers"
    return checked


@contextlib.contextmanager
def _logs_dropped() -> Iterator[None]:
    """Drop every log record while the stores are checked: python-swiftclient logs each refused request
    and the Swift hook each authentication at INFO, which Airflow's logging set-up prints on stdout (as
    structlog records, see :func:`~airflow_wmltrain.cli.output.log_to_stderr`); the check says what it
    found by its result or its error."""
    factory: Any = structlog.get_config().get("logger_factory")
    redirect = hasattr(factory, "io") and hasattr(factory, "cls")  # Airflow's structlog logger factory
    binary = redirect and issubclass(factory.cls, structlog.BytesLogger)
    with open(os.devnull, "wb" if binary else "w") as sink:
        previous = factory.io if redirect else None
        if redirect:
            factory.io = sink
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
            if redirect:
                factory.io = previous


def run(args: argparse.Namespace) -> int:
    """Check a model-definition zip and a training manifest without submitting anything.

    Check a model-definition zip and a training manifest offline: exit 0 with a summary, or exit 2 with
    the first problem (its code and the field at fault). With --check-stores, also check online that the
    stores given with inline credentials answer and accept them (exit 3 when one cannot be reached).
    """
    try:
        settings = Settings.from_local_config()
        submission = check_submission(
            args.model_definition,
            args.manifest,
            hyperparameters=parse_hyperparameters(args.hyperparameter),
            settings=settings,
        )
        stores = check_stores(submission.manifest) if args.check_stores else None
    except WmlTrainError as err:
        if not args.json:
            raise
        print(json.dumps({"valid": False, "error": err.to_dict()}, indent=2))
        return exit_status(err)
    summary = submission.summary()
    if stores is not None:
        for role, state in stores.items():
            summary[role]["store_check"] = state
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    gpus = summary["gpus"]
    model = summary["model_definition"]
    rows = [
        ("name", summary["name"]),
        (
            "framework",
            f"{summary['framework']['name']} {summary['framework']['version']} -> "
            f"{summary['framework']['image']}",
        ),
        ("resource", f"{summary['resource']} -> {gpus} GPU{'s' if gpus != 1 else ''}"),
        ("command", summary["command"]),
        *((role, _with_check(summary[role])) for role in ("data", "results")),
        (
            "model",
            f"{model['name']}: {model['files']} files, {model['uncompressed_bytes']:,} bytes uncompressed",
        ),
    ]
    print(f"valid: {args.model_definition} + {args.manifest}")
    for label, value in rows:
        print(f"  {label:<10} {value}")
    if any(summary[ref]["credentials"] == "inline" for ref in ("data", "results")):
        print(
            "note: the manifest holds credentials inline; an Airflow connection "
            "(connection: {conn_id: ...}) keeps them out of the manifest",
            file=sys.stderr,
        )
    return EXIT_OK


def _with_check(store: dict[str, Any]) -> str:
    """A store's location, and what ``--check-stores`` found when it ran."""
    check = store.get("store_check")
    return f"{store['location']} ({check})" if check else str(store["location"])
