"""Object storage: one interface over S3 and OpenStack Swift, staging with a shared cache, results upload.

:func:`open_store` turns a manifest's store reference (inline credentials or an Airflow connection id)
into an :class:`~airflow_wmltrain.storage.base.ObjectStore`; the rest of the package never branches on
the kind of store.  Inline credentials are read as the fields of the Airflow connection that would hold
them (:attr:`~airflow_wmltrain.manifest.S3Connection.AIRFLOW_FIELDS`), and
:func:`connections_as_json` hands the Airflow connections a manifest names to a process that cannot
read them itself.
"""

from __future__ import annotations

from typing import Any

from airflow_wmltrain.manifest import (
    ConnectionId,
    S3Connection,
    StoreReference,
    StoreType,
    SwiftConnection,
    TrainingManifest,
)
from airflow_wmltrain.storage.base import ObjectInfo, ObjectStore
from airflow_wmltrain.storage.transfer import DEFAULT_TIMEOUT, HttpClient, RetryPolicy

__all__ = ["ObjectInfo", "ObjectStore", "connections_as_json", "open_store", "results_reference"]

#: The store types a results reference may name.
_RESULTS_TYPES = ("s3", "swift")


def open_store(
    reference: StoreReference, *, timeout: float = DEFAULT_TIMEOUT, retry: RetryPolicy | None = None
) -> ObjectStore:
    """The store a manifest reference points at, reached as its credentials say (CAs, proxies, region).

    :param reference: ``manifest.data`` or ``manifest.results``.
    :param timeout: seconds each request may wait for the store (a Swift authentication's too).
    :param retry: how transfers are retried; a Swift authentication is tried as often (at most 4 times).
    """
    conn = reference.connection
    if reference.type == "s3":
        from airflow_wmltrain.storage.s3 import S3Store, aws_reach

        if isinstance(conn, ConnectionId):
            from airflow.providers.amazon.aws.hooks.s3 import S3Hook

            return S3Store.from_hook(
                reference.bucket, S3Hook(aws_conn_id=conn.conn_id), timeout=timeout, retry=retry
            )
        if not isinstance(conn, S3Connection):  # pragma: no cover - the manifest guarantees it
            raise TypeError(type(conn).__name__)
        from airflow_wmltrain.storage.sigv4 import Credentials

        fields = conn.airflow_fields()  # what an ``aws`` connection would hold
        keys = Credentials(fields["login"], fields["password"])
        return S3Store(
            reference.bucket,
            credentials=lambda: keys,
            endpoint_url=fields["extra"].get("endpoint_url"),
            region=fields["extra"].get("region_name"),
            http=HttpClient(timeout=timeout, reach=aws_reach(None, ca_pem=conn.ca_certificate)),
            retry=retry,
        )

    from airflow_wmltrain.hooks.swift import SwiftHook
    from airflow_wmltrain.storage.swift import SwiftStore

    bounds: dict[str, Any] = {"timeout": timeout}
    if retry is not None:
        bounds["retries"] = retry.attempts - 1
    if isinstance(conn, ConnectionId):
        hook = SwiftHook(conn.conn_id, **bounds)
    elif isinstance(conn, SwiftConnection):
        hook = SwiftHook(None, credentials=conn, **bounds)
    else:  # pragma: no cover - the manifest guarantees it
        raise TypeError(type(conn).__name__)
    return SwiftStore(
        reference.bucket, hook=hook, http=HttpClient(timeout=timeout, reach=hook.reach), retry=retry
    )


def connections_as_json(manifest: TrainingManifest) -> dict[str, str]:
    """The Airflow connections the manifest's stores are opened with, read now: ``{conn_id: JSON}``.

    For a process with no task context to ask Airflow (the detached halter): each value is what an
    ``AIRFLOW_CONN_<CONN_ID>`` variable takes.  Inline credentials need none (the manifest holds them).
    """
    from airflow.sdk import BaseHook

    resolved = {}
    for reference in (manifest.results, manifest.data):
        if isinstance(reference.connection, ConnectionId):
            conn_id = reference.connection.conn_id
            resolved[conn_id] = BaseHook.get_connection(conn_id).as_json()
    return resolved


def results_reference(type_: str, bucket: str, conn_id: str) -> StoreReference:
    """The results store of a run, reached through an Airflow connection.

    :param type_: ``s3`` (an ``aws`` connection) or ``swift`` (a ``swift`` connection).
    :param bucket: the results bucket (S3) or container (Swift).
    :param conn_id: the Airflow connection id.
    :raises ValueError: an unknown type, an empty bucket or connection id.
    """
    if type_ not in _RESULTS_TYPES:
        raise ValueError(f"results type '{type_}' is not one of {', '.join(_RESULTS_TYPES)}")
    if not bucket:
        raise ValueError("the results bucket is empty; give the bucket (S3) or container (Swift) name")
    if not conn_id:
        raise ValueError("the results connection id is empty; give an Airflow connection id")
    kind: StoreType = "s3" if type_ == "s3" else "swift"
    return StoreReference(type=kind, bucket=bucket, connection=ConnectionId(conn_id=conn_id))
