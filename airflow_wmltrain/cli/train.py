"""``wmltrain train MODEL.zip MANIFEST.yaml``: submit a training run to Airflow (the bundled DAG).

The submission is checked locally first (``wmltrain validate``); nothing reaches Airflow when it is
invalid.  The zip travels in the run's ``conf`` as base64 when it is at most ``--max-inline`` bytes; a
larger one is refused with that limit named — put it in the object store and give its URL
(``s3://bucket/model.zip``) instead of a path.  Inline credentials of the manifest are moved into
Airflow connections named after the run (``wmltrain_<id>_data``/``_results``; ``wmltrain delete``
removes them), so the ``conf`` that the UI and the API show holds connection ids only.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

import yaml

from airflow_wmltrain.cli.server import add_server_options, api_from_args
from airflow_wmltrain.cli.validate import parse_hyperparameters
from airflow_wmltrain.errors import ModelDefinitionError
from airflow_wmltrain.manifest import ConnectionId, S3Connection, StoreReference, SwiftConnection
from airflow_wmltrain.service.api import AirflowApi
from airflow_wmltrain.service.runs import (
    TrainingRunRecord,
    delete_moved_connections,
    moved_connection_id,
    submit_run,
    wait_until_over,
)
from airflow_wmltrain.training_id import new_training_id

#: The largest zip sent inside a run's conf (base64 makes it a third larger).
DEFAULT_MAX_INLINE = 8 * 1024 * 1024


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "train",
        help="submit a training run (model zip + manifest) to Airflow",
        description="Check the submission locally, then start a run of the wmltrain_training DAG whose run "
        "id is the new training id, and print it (\"Model-ID is 'training-...'\").",
    )
    parser.add_argument(
        "model_definition", metavar="MODEL.zip", help="the zipped training code, or its s3:// / swift:// URL"
    )
    parser.add_argument("manifest", metavar="MANIFEST.yaml", help="the training manifest (YAML)")
    parser.add_argument(
        "--param",
        "-p",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="override an option of the command (repeatable), e.g. -p learningRate=0.01",
    )
    parser.add_argument("--name", help="the run's name (model_definition.name)")
    parser.add_argument("--wait", action="store_true", help="wait for the run to end; exit 1 if it failed")
    parser.add_argument(
        "--max-inline",
        type=int,
        default=DEFAULT_MAX_INLINE,
        metavar="BYTES",
        help=f"largest zip sent inside the run's conf (default {DEFAULT_MAX_INLINE})",
    )
    add_server_options(parser)
    parser.set_defaults(handler=run)


def _connection_body(conn_id: str, ref: StoreReference) -> dict[str, Any]:
    """An Airflow connection holding a manifest reference's inline credentials."""
    assert isinstance(ref.connection, S3Connection | SwiftConnection)
    return ref.connection.to_airflow_connection(conn_id)


def move_credentials(api: AirflowApi, training_id: str, document: dict[str, Any], manifest: Any) -> list[str]:
    """Put inline credentials into Airflow connections and point ``document`` at them; their ids."""
    created = []
    for role, ref, holder in (
        ("data", manifest.data, document["training_data_reference"][0]),
        ("results", manifest.results, document["training_results_reference"]),
    ):
        if isinstance(ref.connection, ConnectionId):
            continue
        conn_id = moved_connection_id(training_id, role)
        body = _connection_body(conn_id, ref)
        api.call("POST", "/connections", body={k: v for k, v in body.items() if v is not None})
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
    from airflow_wmltrain.manifest import load_manifest
    from airflow_wmltrain.model_source import is_url
    from airflow_wmltrain.settings import Settings
    from airflow_wmltrain.submission import check_submission

    settings = Settings.from_airflow_config()
    hyperparameters = parse_hyperparameters(args.param)
    manifest = load_manifest(args.manifest, settings=settings)
    if is_url(args.model_definition):  # the zip is checked by the run itself
        from airflow_wmltrain.command import validate_hyperparameters

        validate_hyperparameters(hyperparameters)
    else:
        check_submission(args.model_definition, manifest, hyperparameters=hyperparameters, settings=settings)
    model_definition = _model_definition(args.model_definition, args.max_inline)
    api = api_from_args(args)
    training_id = new_training_id()
    document = manifest.to_dict(redact=False)
    if args.name:
        document["model_definition"]["name"] = args.name
    moved = move_credentials(api, training_id, document, manifest)
    conf = {
        "manifest": yaml.safe_dump(document, sort_keys=False, allow_unicode=True),
        "model_definition": model_definition,
        "hyperparameters": hyperparameters,
    }
    try:
        submit_run(api, training_id, conf, note=f"wmltrain train: {args.name or manifest.name}")
    except Exception:
        if moved:
            delete_moved_connections(api, training_id)
        raise
    if moved:
        print(
            f"note: inline credentials were stored as Airflow connections {', '.join(moved)}", file=sys.stderr
        )
    print(f"Model-ID is '{training_id}'")
    if not args.wait:
        return 0

    def changed(record: TrainingRunRecord) -> None:
        print(f"{record.training_id}: {record.state}", file=sys.stderr, flush=True)

    final = wait_until_over(api, training_id, on_change=changed)
    if final.state == "COMPLETED":
        return 0
    error = final.error or {}
    print(
        f"{training_id} {final.state}: {error.get('code', '')} {error.get('message', '')}".rstrip(),
        file=sys.stderr,
    )
    return 1
