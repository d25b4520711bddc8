"""Where a run's model definition comes from: a path, inline base64 data, or an object-store URL.

Only a DAG's author may give a path (of the worker's disk); a submitted value (a DAG run's ``conf``) is
``base64:`` or a URL, nothing else.

The bundled training DAG receives the zip in its run's ``conf`` (``base64:<data>``, what ``wmltrain
train`` sends for a small zip) or as a URL of an object in the store (``s3://bucket/key``,
``swift://container/key``), read with the manifest's credentials for that kind of store (the results
reference's, else the data reference's).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from airflow_wmltrain.errors import ModelDefinitionError
from airflow_wmltrain.manifest import StoreReference, TrainingManifest, bucket_name_problem

FIELD = "model_definition"
BASE64_PREFIX = "base64:"
_URL = re.compile(r"^(?P<type>s3|swift)://(?P<bucket>[^/]+)/(?P<key>.+)$")


def is_url(value: str) -> bool:
    return bool(_URL.match(value))


def resolve_model_definition(
    value: str | os.PathLike[str] | bytes,
    manifest: TrainingManifest,
    *,
    max_bytes: int,
    submitted: bool = False,
) -> str | os.PathLike[str] | bytes:
    """The zip's path or bytes.

    :param value: a path, ``base64:<data>``, ``s3://bucket/key`` or ``swift://container/key``.
    :param manifest: the run's manifest (its credentials read a URL).
    :param max_bytes: the largest zip accepted from a URL.
    :param submitted: the value was submitted (a DAG run's conf, the trigger form), not written by the
        DAG's author: it is data, never a path of the worker — only ``base64:`` or a URL is accepted.
    :raises ModelDefinitionError: (C102) bad base64, an object that does not exist, or no credentials for
        it; a submitted value that is neither ``base64:`` nor a URL.
    """
    if submitted and not (isinstance(value, str) and (value.startswith(BASE64_PREFIX) or is_url(value))):
        # Never says what the value is, nor whether such a file exists on the worker.
        raise ModelDefinitionError(
            "of a submitted run must be the zip as base64:<data> or an object-store URL (s3://bucket/key, "
            "swift://container/key); a submitted value is never read from the worker's disk",
            field=FIELD,
        )
    if not isinstance(value, str):
        return value
    if value.startswith(BASE64_PREFIX):
        try:
            return base64.b64decode(value[len(BASE64_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ModelDefinitionError(
                "is not valid base64 after 'base64:'; send the zip's bytes base64-encoded", field=FIELD
            ) from None
    match = _URL.match(value)
    if not match:
        return value
    return _fetch(match["type"], match["bucket"], match["key"], manifest, max_bytes)


def _fetch(store_type: str, bucket: str, key: str, manifest: TrainingManifest, max_bytes: int) -> bytes:
    from airflow_wmltrain.storage import open_store
    from airflow_wmltrain.storage.transfer import TransferError

    problem = bucket_name_problem("s3" if store_type == "s3" else "swift", bucket)
    if problem:  # the bucket would reach the request's host (S3's virtual-hosted addressing)
        raise ModelDefinitionError(
            f"{store_type}://{bucket}/...: not a valid bucket name: {problem}", field=FIELD
        )
    same = [ref for ref in (manifest.results, manifest.data) if ref.type == store_type]
    if not same:
        raise ModelDefinitionError(
            f"{store_type}://{bucket}/{key}: the manifest has no {store_type} connection to read it "
            "with; put "
            "the zip in the store of the manifest's data or results bucket",
            field=FIELD,
        )
    reference = StoreReference(type=same[0].type, bucket=bucket, connection=same[0].connection)
    url = f"{store_type}://{bucket}/{key}"
    with open_store(reference) as store:
        try:
            status, headers, _ = store.request("HEAD", key, missing_ok=True)
            if status == 404:
                raise ModelDefinitionError(f"{url} does not exist; upload the zip there first", field=FIELD)
            size = int(headers.get("content-length") or 0)
            if size > max_bytes:  # checked before reading it: a data file named by mistake is not read
                raise ModelDefinitionError(
                    f"{url} is {size:,} bytes, more than [wmltrain] model_definition_max_bytes "
                    f"({max_bytes:,}); is it the model zip?",
                    field=FIELD,
                )
            return store.get_bytes(key)
        except TransferError as err:
            raise ModelDefinitionError(f"{url} cannot be read: {err}", field=FIELD) from None
