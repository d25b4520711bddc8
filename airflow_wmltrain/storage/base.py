"""The one storage interface the rest of the package uses, whatever the store (S3 or OpenStack Swift).

An :class:`ObjectStore` is one bucket (S3) or container (Swift) reached with one set of credentials.
It lists objects with their sizes and ETags, signs plain HTTP requests for the transfer engine
(:mod:`airflow_wmltrain.storage.transfer`), which moves the bytes for every store the same way, and
reads and writes small documents.  Multipart uploads (S3 parts, Swift static large objects) share one
shape: start, sign each part's ``PUT``, complete (or abort).  Nothing here logs or raises a credential.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

from airflow_wmltrain.errors import BucketNotFoundError, CredentialsError
from airflow_wmltrain.storage.transfer import (
    HttpClient,
    RetryPolicy,
    SignedRequest,
    TransferError,
    etag_is_md5,
    request_bytes,
    with_retries,
)

__all__ = ["Fields", "ObjectInfo", "ObjectStore", "SignedRequest", "UploadedPart"]

#: A request's query parameters or extra headers (``None``: none).
Fields: TypeAlias = Mapping[str, str] | None

_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a listing.

    :param key: the object's full key (name) in the bucket.
    :param size: its size in bytes.
    :param etag: its ETag, unquoted and lower-case (identifies a version of the content).
    :param md5: the content's MD5 when the store says so (objects uploaded in one piece), else ``None``.
    """

    key: str
    size: int
    etag: str
    md5: str | None = None

    @classmethod
    def from_etag(cls, key: str, size: int, etag: str) -> ObjectInfo:
        """An object whose ETag is its MD5 when it looks like one (S3 multipart ETags end in ``-N``)."""
        etag = etag.strip('"').lower()
        return cls(key, size, etag, etag if _MD5.match(etag) else None)


@dataclass(frozen=True)
class UploadedPart:
    """One part of a multipart upload (a segment of a Swift large object).

    :param number: the part number, from 1.
    :param etag: the part's ETag (its MD5), unquoted.
    :param size: the part's size in bytes.
    """

    number: int
    etag: str
    size: int


class ObjectStore(ABC):
    """One bucket of one object store.

    :param bucket: the bucket (S3) or container (Swift) name.
    :param http: the transfer engine's connections (one per thread).
    :param retry: how requests are retried.
    """

    kind: ClassVar[str]
    #: The cheapest request that fails when the bucket is missing or the credentials are refused:
    #: ``(method, key, query)``.
    bucket_probe: ClassVar[tuple[str, str, Fields]] = ("HEAD", "", None)
    #: The smallest part a multipart upload accepts (except the last).
    min_part_size: ClassVar[int]

    def __init__(
        self, bucket: str, *, http: HttpClient | None = None, retry: RetryPolicy | None = None
    ) -> None:
        self.bucket = bucket
        self.http = http or HttpClient()
        self.retry = retry or RetryPolicy()

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """The service's URL (no credentials), for messages and cache keys."""

    def describe(self, key: str = "") -> str:
        """``s3 http://host:port bucket/key`` — for messages; never a credential."""
        return f"{self.kind} {self.endpoint} {self.bucket}/{key}".rstrip("/")

    @abstractmethod
    def sign(self, method: str, key: str, *, query: Fields = None, headers: Fields = None) -> SignedRequest:
        """A signed request for one object, or for the bucket itself when ``key`` is empty."""

    @abstractmethod
    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, in key order."""

    @abstractmethod
    def start_multipart(self, key: str) -> str:
        """Begin a multipart upload; returns its id."""

    @abstractmethod
    def sign_part(self, key: str, upload_id: str, number: int, *, headers: Fields = None) -> SignedRequest:
        """The signed ``PUT`` of part ``number`` (from 1), with extra ``headers``."""

    @abstractmethod
    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[UploadedPart]) -> str:
        """Assemble the uploaded parts into the object; returns its ETag."""

    @abstractmethod
    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an unfinished multipart upload and its parts."""

    def refresh_credentials(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Renew a token or temporary credentials after the store answered 401 (default: nothing)."""

    def redirected(self, error: TransferError) -> bool:
        """Learn where to send requests from an error that says they went to the wrong place (an S3
        bucket in another region); ``True`` when the next try goes elsewhere (default: never)."""
        return False

    # --- small requests, shared by every store --------------------------------------------------------

    def request(
        self,
        method: str,
        key: str,
        *,
        query: Fields = None,
        headers: Fields = None,
        body: bytes | None = None,
        missing_ok: bool = False,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """Send one small request, retried; returns ``(status, headers, body)``.

        :param missing_ok: a 404 returns ``(404, {}, b"")`` instead of raising.
        :raises TransferError: when it fails for good.
        """

        def attempt() -> tuple[int, Mapping[str, str], bytes]:
            signed = self.sign(method, key, query=query, headers=headers)
            try:
                return request_bytes(self.http, self, signed, key, body=body)
            except TransferError as err:
                if missing_ok and err.status == 404:
                    return 404, {}, b""
                raise

        return with_retries(self, self.retry, attempt, on_retry=lambda err: None)

    def check_bucket(self, *, field: str | None = None) -> None:
        """Fail early and clearly when the bucket is missing or the credentials are refused.

        :param field: the manifest field that names the bucket, for the message.
        :raises CredentialsError: (C103) the store refused the credentials.
        :raises BucketNotFoundError: (C101) the bucket does not exist.
        :raises TransferError: the store cannot be reached.
        """
        try:
            method, key, query = self.bucket_probe
            self.request(method, key, query=query)
        except TransferError as err:
            if err.status == 404:
                raise BucketNotFoundError(
                    f"bucket '{self.bucket}' does not exist at {self.endpoint}; create it or fix the name",
                    field=field,
                ) from None
            refused = self.refused(err, field=field)
            if refused is not None:
                raise refused from None
            raise

    def refused(self, err: TransferError, *, field: str | None = None) -> CredentialsError | None:
        """The ``C103`` that a ``401``/``403`` answer of this store means (it refused the credentials: a
        retry cannot help), else ``None``.

        :param field: the manifest field of the store's credentials or bucket, for the message.
        """
        if err.status not in (401, 403) and not err.credentials_expired:
            return None
        return CredentialsError(
            f"{self.endpoint} refused the credentials for bucket '{self.bucket}' "
            f"(HTTP {err.status}); check the access key / user and secret / password",
            field=field,
        )

    def get_bytes(self, key: str) -> bytes:
        """Read a small object whole."""
        return self.request("GET", key)[2]

    @abstractmethod
    def integrity_headers(self, md5: bytes) -> dict[str, str]:
        """Headers that make the store refuse a body whose MD5 is not ``md5``.

        (S3: ``Content-MD5``, base64; Swift: ``ETag``, hexadecimal.)
        """

    def put_bytes(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> str:
        """Write a small object in one request, verified by its MD5; returns its ETag.

        The store checks the body against the MD5 header; the ETag is compared too where it is the MD5
        (:func:`~airflow_wmltrain.storage.transfer.etag_is_md5`: not on SSE-KMS or SSE-C buckets).
        """
        md5 = hashlib.md5(data, usedforsecurity=False)
        headers = {"content-type": content_type, **self.integrity_headers(md5.digest())}
        answer = self.request("PUT", key, headers=headers, body=data)[1]
        etag = answer.get("etag", "").strip('"').lower()
        if etag and etag != md5.hexdigest() and etag_is_md5(answer.get):
            raise TransferError(f"PUT {self.describe(key)}: the store stored other bytes", transient=False)
        return etag

    def delete(self, key: str) -> None:
        """Delete one object (no error when it is already gone)."""
        self.request("DELETE", key, missing_ok=True)

    def put_json(self, key: str, document: Mapping[str, Any]) -> str:
        """Write a small JSON document (status, metrics); returns its ETag."""
        data = json.dumps(document, indent=2, default=str).encode()
        return self.put_bytes(key, data, content_type="application/json")

    def get_json(self, key: str) -> Any:
        """Read a small JSON document."""
        return json.loads(self.get_bytes(key))

    def close(self) -> None:
        """Close the calling thread's connections (idempotent)."""
        self.http.close()

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
