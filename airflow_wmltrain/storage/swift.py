"""OpenStack Swift (the seed's ``bluemix_objectstore``) as an :class:`ObjectStore`.

Authentication (Keystone v3 or v1/tempauth) is the :class:`~airflow_wmltrain.hooks.swift.SwiftHook`'s;
requests carry its token and are sent by the transfer engine.  Large uploads become static large
objects: segments in ``<container>_segments`` (python-swiftclient's convention), then a manifest.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

from airflow_wmltrain.storage.base import Fields, ObjectInfo, ObjectStore, SignedRequest, UploadedPart
from airflow_wmltrain.storage.transfer import HttpClient, RetryPolicy

if TYPE_CHECKING:
    from airflow_wmltrain.hooks.swift import SwiftHook

LISTING_LIMIT = 10000
SEGMENTS_SUFFIX = "_segments"


class SwiftAuth:
    """The storage URL and token of one Swift account, shared by the stores on its containers.

    Asked for every request: the hook answers from its connection (v1: the token until the store
    refuses it; Keystone: keystoneauth's token, renewed before it expires).

    :param hook: the hook that authenticates.
    """

    def __init__(self, hook: SwiftHook) -> None:
        self.hook = hook
        self._used = threading.local()  # the token of the calling thread's last request

    def get(self) -> tuple[str, str]:
        url, token = self.hook.get_auth()
        self._used.token = token
        return url, token

    def refresh(self) -> None:
        """Authenticate again after a 401: once for all the threads that met the same refused token
        (the others get the new one)."""
        self.hook.refresh_auth(getattr(self._used, "token", None))


class SwiftStore(ObjectStore):
    """One Swift container.

    :param bucket: the container name.
    :param hook: the Swift hook that authenticates (Keystone v3 or v1).
    :param auth: an account's shared authentication (instead of ``hook``).
    :param http: the transfer engine's connections.
    :param retry: how transfers are retried.
    """

    kind = "swift"
    min_part_size = 1024 * 1024  # Swift's default min_segment_size for static large objects

    def __init__(
        self,
        bucket: str,
        *,
        hook: SwiftHook | None = None,
        auth: SwiftAuth | None = None,
        http: HttpClient | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(bucket, http=http, retry=retry)
        if auth is None:
            if hook is None:
                raise ValueError("a SwiftStore needs a hook or an auth")
            auth = SwiftAuth(hook)
        self.auth = auth

    @property
    def endpoint(self) -> str:
        return self.auth.get()[0]

    def refresh_credentials(self) -> None:
        self.auth.refresh()

    def sign(self, method: str, key: str, *, query: Fields = None, headers: Fields = None) -> SignedRequest:
        storage_url, token = self.auth.get()
        url = f"{storage_url}/{quote(self.bucket, safe='')}"
        if key:
            url += "/" + quote(key, safe="/~")
        if query:
            url += "?" + urlencode(sorted(query.items()), safe="~")
        return SignedRequest(method, url, {**(headers or {}), "x-auth-token": token})

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        marker = ""
        while True:
            query = {"format": "json", "prefix": prefix, "limit": str(LISTING_LIMIT)}
            if marker:
                query["marker"] = marker
            entries = json.loads(self.request("GET", "", query=query)[2] or b"[]")
            for entry in entries:
                if "subdir" in entry:
                    continue
                slo_etag = entry.get("slo_etag")
                if slo_etag:  # a static large object: "hash" is its manifest's MD5, not the content's
                    yield ObjectInfo(entry["name"], int(entry["bytes"]), slo_etag.strip('"').lower(), None)
                else:
                    yield ObjectInfo.from_etag(entry["name"], int(entry["bytes"]), entry.get("hash", ""))
            if len(entries) < LISTING_LIMIT:
                return
            marker = entries[-1]["name"]

    # --- static large objects: segments in <container>_segments, then a manifest --------------------

    def _segments(self) -> SwiftStore:
        return SwiftStore(f"{self.bucket}{SEGMENTS_SUFFIX}", auth=self.auth, http=self.http, retry=self.retry)

    @staticmethod
    def _segment(key: str, upload_id: str, number: int) -> str:
        return f"{key}/{upload_id}/{number:08d}"

    def start_multipart(self, key: str) -> str:
        self._segments().request("PUT", "")  # create the segments container (201), or find it (202)
        return uuid.uuid4().hex

    def sign_part(self, key: str, upload_id: str, number: int, *, headers: Fields = None) -> SignedRequest:
        return self._segments().sign("PUT", self._segment(key, upload_id, number), headers=headers)

    def integrity_headers(self, md5: bytes) -> dict[str, str]:
        return {"etag": md5.hex()}

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[UploadedPart]) -> str:
        segments = self._segments().bucket
        manifest = [
            {
                "path": f"/{segments}/{self._segment(key, upload_id, p.number)}",
                "etag": p.etag,
                "size_bytes": p.size,
            }
            for p in sorted(parts, key=lambda p: p.number)
        ]
        body = json.dumps(manifest).encode()
        headers = self.request("PUT", key, query={"multipart-manifest": "put"}, body=body)[1]
        return headers.get("etag", "").strip('"').lower()

    def abort_multipart(self, key: str, upload_id: str) -> None:
        segments = self._segments()
        for info in list(segments.list_objects(f"{key}/{upload_id}/")):
            segments.delete(info.key)
