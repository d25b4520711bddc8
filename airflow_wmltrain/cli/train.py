"""``wmltrain train MODEL.zip MANIFEST.yaml``: submit a training run to Airflow (the bundled DAG).

The submission is checked locally first (``wmltrain validate``), then each store the manifest gives with
inline credentials must answer and accept them (:func:`~airflow_wmltrain.cli.validate.check_stores`, a
few seconds at most; ``--no-store-check`` skips it for stores only the workers reach); nothing reaches
Airflow when a check fails.  The zip travels in the run's ``conf`` as base64 when it is at most
``--max-inline`` bytes; a larger one is refused with that limit named — put it in the object store and
give its URL (``s3://bucket/model.zip``) instead of a path.  Inline credentials of the manifest are moved into
Airflow connections named after the run (``wmltrain_<id>_data``/``_results``; ``wmltrain delete``
removes them), so the ``conf`` that the UI and the API show holds connection ids only.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from airflow_wmltrain.cli.arguments import MANIFEST, MODEL_ZIP, add_command
from airflow_wmltrain.cli.server import add_server_options, add_wait_options, api_from_args, wait_options
from airflow_wmltrain.cli.validate import add_hyperparameter_option, check_stores, parse_hyperparameters
from airflow_wmltrain.errors import EXIT_OK, EXIT_RUN_FAILED, ModelDefinitionError
from airflow_wmltrain.lifecycle import RunState
from airflow_wmltrain.manifest import ConnectionId, S3Connection, StoreReference, SwiftConnection
from airflow_wmltrain.service.api import AirflowApi, ApiError
from airflow_wmltrain.service.runs import (
    SubmissionError,
    TrainingRunRecord,
    WaitOptions,
    delete_moved_connections,
    ensure_connection,
    moved_connection_id,
    server_facts,
    submit_run,
    wait_until_over,
)
from airflow_wmltrain.training_id import new_training_id

#: The largest zip sent inside a run's conf (base64 makes it a third larger).
DEFAULT_MAX_INLINE = 8 * 1024 * 1024
MODEL_ZIP_OR_URL = MODEL_ZIP._replace(help="the zipped training code, or its s3:// / swift:// URL")


def register(commands: Any) -> None:
    parser = add_command(commands, "train", run, MODEL_ZIP_OR_URL, MANIFEST)
    add_hyperparameter_option(parser, "--param", "-p")
    parser.add_argument("--name", help="the run's name (model_definition.name)")
    parser.add_argument("--wait", action="store_true", help="wait for the run to end; exit 1 if it failed")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the training id (with --wait: the run as `show --json` does) as JSON",
    )
    parser.add_argument(
        "--max-inline",
        type=int,
        default=DEFAULT_MAX_INLINE,
        metavar="BYTES",
        help=f"largest zip sent inside the run's conf (default {DEFAULT_MAX_INLINE})",
    )
    parser.add_argument(
        "--no-store-check",
        action="store_true",
        help="do not check that the stores given with inline credentials answer and accept them "
        "(for stores that only the workers can reach)",
    )
    add_wait_options(parser)
    add_server_options(parser)


def _connection_body(conn_id: str, ref: StoreReference) -> dict[str, Any]:
    """An Airflow connection holding a manifest reference's inline credentials."""
    assert isinstance(ref.connection, S3Connection | SwiftConnection)
    return ref.connection.to_airflow_connection(conn_id)


def move_credentials(api: AirflowApi, training_id: str, document: dict[str, Any], manifest: Any) -> list[str]:
    """Put inline credentials into Airflow connections and point ``document`` at them; their ids.

    Each connection is created safely repeated (:func:`~airflow_wmltrain.service.runs.ensure_connection`).
    When one cannot be made, those made before it are removed and the error raised.
    """
    created: list[str] = []
    for role, ref, holder in (
        ("data", manifest.data, document["training_data_reference"][0]),
        ("results", manifest.results, document["training_results_reference"]),
    ):
        if isinstance(ref.connection, ConnectionId):
            continue
        conn_id = moved_connection_id(training_id, role)
        body = _connection_body(conn_id, ref)
        try:
            ensure_connection(api, {k: v for k, v in body.items() if v is not None})
        except ApiError:
            if created:
                delete_moved_connections(api, training_id)
            raise
        holder["connection"] = {"conn_id": conn_id}
        created.append(conn_id)
    return created


def _model_definition(path: str, max_inline: int) -> str:
    """``base64:<data>`` of the zip, or the URL as given."""
    from airflow_wmltrain.model_source import is_url

    if is_url(path):
        return path
    data = Path(path).read_bytes()
    if len(data) > max_inline:
        raise ModelDefinitionError(
            f"is {len(data):,} bytes, more than the {max_inline:,} bytes a run's conf may carry "
            "(--max-inline); upload the zip to the object store and give its URL instead, e.g. "
            "wmltrain train s3://my-bucket/model.zip manifest.yaml",
            field=path,
        )
    return "base64:" + base64.b64encode(data).decode("ascii")


def run(args: argparse.Namespace) -> int:
    """Submit a training run (model zip + manifest) to Airflow.

    Check the submission locally and the stores given with inline credentials (unless
    ``--no-store-check``), then start a run of the wmltrain_training DAG whose run id is the new training
    id, and print it ("Model-ID is 'training-...'").
    """
    from airflow_wmltrain.manifest import load_manifest
    from airflow_wmltrain.model_source import is_url
    from airflow_wmltrain.settings import Settings
    from airflow_wmltrain.submission import check_submission

    hyperparameters = parse_hyperparameters(args.param)
    api = api_from_args(args)
    # The server decides which frameworks and resource classes exist (its registry may have images this
    # machine has never heard of): one API call, before anything is sent.
    facts = server_facts(api)
    settings = Settings.from_local_config()
    registry = None
    if facts is not None:
        settings, registry = facts.settings(settings), facts.registry()
    manifest = load_manifest(args.manifest, settings=settings, registry=registry)
    if is_url(args.model_definition):  # the zip is checked by the run itself
        from airflow_wmltrain.command import validate_hyperparameters

        validate_hyperparameters(hyperparameters)
    else:
        check_submission(args.model_definition, manifest, hyperparameters=hyperparameters, settings=settings)
    model_definition = _model_definition(args.model_definition, args.max_inline)
    if not args.no_store_check:  # before any connection or run is made
        check_stores(manifest)
    options = wait_options(args)
    training_id = new_training_id()
    document = manifest.to_dict(redact=False)
    if args.name:
        document["model_definition"]["name"] = args.name
    # The id is chosen here, so every request below can be sent again; it is shown before any is sent.
    print(f"Submitting {training_id} ...", file=sys.stderr, flush=True)
    moved = move_credentials(api, training_id, document, manifest)
    conf = {
        "manifest": yaml.safe_dump(document, sort_keys=False, allow_unicode=True),
        "model_definition": model_definition,
        "hyperparameters": hyperparameters,
    }
    try:
        submit_run(
            api,
            training_id,
            conf,
            note=f"wmltrain train: {args.name or manifest.name}",
            notify=options.notify,
        )
    except ApiError as err:
        may_exist = isinstance(err, SubmissionError) and err.may_exist
        if moved and not may_exist:  # certainly not created: its connections go
            delete_moved_connections(api, training_id)
        elif moved:
            print(
                f"note: the connections {', '.join(moved)} stay while {training_id} may exist "
                f"(`wmltrain delete {training_id}` removes both; wmltrain_retention removes them if it "
                "does not)",
                file=sys.stderr,
            )
        raise
    if moved:
        print(
            f"note: inline credentials were stored as Airflow connections {', '.join(moved)}", file=sys.stderr
        )
    return _submitted(api, training_id, args, options)


def _submitted(api: AirflowApi, training_id: str, args: argparse.Namespace, options: WaitOptions) -> int:
    """Say the submitted run's id (``--json``: as JSON); with ``--wait``, follow it to its end: exit 1
    when it failed or was halted."""
    if not args.json:
        print(f"Model-ID is '{training_id}'", flush=True)
    if not args.wait:
        if args.json:
            print(json.dumps({"training_id": training_id, "state": RunState.QUEUED.value}, indent=2))
        return EXIT_OK

    def changed(record: TrainingRunRecord) -> None:
        print(f"{record.training_id}: {record.state.value}", file=sys.stderr, flush=True)

    final = wait_until_over(api, training_id, options=options, on_change=changed)
    if args.json:
        print(json.dumps(final.to_dict(), indent=2))
    if final.state is RunState.COMPLETED:
        return EXIT_OK
    error = final.error or {}
    print(
        f"{training_id} {final.state.value}: {error.get('code', '')} {error.get('message', '')}".rstrip(),
        file=sys.stderr,
    )
    return EXIT_RUN_FAILED
