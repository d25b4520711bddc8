"""S3 (and S3-compatible: IBM Cloud Object Storage, MinIO, Ceph, Swift's s3api) as an :class:`ObjectStore`.

Connections and credentials come from the amazon provider's ``S3Hook`` (an ``aws`` Airflow connection:
keys, assumed roles, ``endpoint_url``, ``region_name``, ``verify``, ``config_kwargs`` ``s3.addressing_style``,
``proxies``, ``use_fips_endpoint``, ``use_dualstack_endpoint`` in its extra) or from a manifest's inline
keys; requests are then signed here (:mod:`.sigv4`) and sent by the transfer engine, which is several
times cheaper per request than a boto3 call.  AWS's endpoint for a region (China, GovCloud, FIPS,
dual-stack) is botocore's, and a bucket found in another region than the one asked is followed there.
"""

from __future__ import annotations

import base64
import functools
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus, urlsplit

from airflow_wmltrain.storage.base import Fields, ObjectInfo, ObjectStore, SignedRequest, UploadedPart
from airflow_wmltrain.storage.sigv4 import Credentials, SigV4Signer, canonical_query, quote_path
from airflow_wmltrain.storage.transfer import (
    DEFAULT_TIMEOUT,
    HttpClient,
    Reach,
    RetryPolicy,
    TransferError,
    request_bytes,
    with_retries,
)

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
DEFAULT_REGION = "us-east-1"
CREDENTIALS_TTL = 300.0
#: Where a user of an ``aws`` connection names the CA of a private endpoint.
CA_HINT = (
    'give the CA bundle as the aws connection\'s extra "verify" (a path on the worker), AWS_CA_BUNDLE, '
    "or its PEM text as the extra (or inline credentials') ca_certificate"
)


@functools.cache
def _endpoint_resolver() -> object:
    from botocore.loaders import create_loader  # type: ignore[import-untyped]
    from botocore.regions import EndpointResolver  # type: ignore[import-untyped]

    return EndpointResolver(create_loader().load_data("endpoints"))


def aws_endpoint(region: str, *, fips: bool = False, dualstack: bool = False) -> str:
    """AWS's S3 endpoint for ``region``, as botocore knows it (``s3.cn-north-1.amazonaws.com.cn``...).

    :raises ValueError: botocore knows no S3 endpoint for this region (or variant).
    """
    resolved = _endpoint_resolver().construct_endpoint(  # type: ignore[attr-defined]
        "s3", region, use_fips_endpoint=fips, use_dualstack_endpoint=dualstack
    )
    if not resolved or not resolved.get("hostname"):
        raise ValueError(f"no S3 endpoint is known for region '{region}'")
    return f"https://{resolved['hostname']}"


def aws_reach(verify: bool | str | None, *, ca_pem: str | None = None, proxies: object = None) -> Reach:
    """How an ``aws`` connection reaches its endpoint: its ``verify`` (``AWS_CA_BUNDLE`` when unset, as
    botocore does), a PEM ``ca_certificate``, and botocore's ``proxies`` (the environment's when unset)."""
    if verify is None:
        verify = os.environ.get("AWS_CA_BUNDLE") or True
    elif isinstance(verify, str) and verify.strip().lower() in ("true", "false"):
        verify = verify.strip().lower() == "true"
    return Reach(
        verify=verify,
        ca_pem=ca_pem,
        proxies=dict(proxies) if isinstance(proxies, dict) and proxies else None,
        hint=CA_HINT,
    )


def _text(element: ET.Element, tag: str) -> str:
    found = element.find(f"{_NS}{tag}")
    if found is None:
        found = element.find(tag)
    return (found.text or "") if found is not None else ""


def _check_host_label(bucket: str) -> None:
    """Virtual-hosted addressing puts the bucket in the URL's host: refuse a name that is not one (a
    ``evil:8443#`` would send the signed request elsewhere), whatever path the name came by."""
    from airflow_wmltrain.errors import ManifestError
    from airflow_wmltrain.manifest import bucket_name_problem

    problem = bucket_name_problem("s3", bucket)
    if problem is not None:
        raise ManifestError(f"'{bucket[:80]!s}' is not a valid name: {problem}", field="bucket")


class HookCredentials:
    """An ``aws`` connection's credentials, from one boto3 session of its hook.

    The session is made once: botocore renews temporary credentials (an assumed ``role_arn``, web
    identity, SSO) shortly before they expire, so asking again costs nothing and a poller that keeps
    its store makes one STS call per credentials' lifetime, not one per poll.  After the store refused
    them (:meth:`forget`), the next call makes a new session.
    """

    def __init__(self, hook: S3Hook) -> None:
        self._hook = hook
        self._source: Any = None  # botocore's (refreshable) credentials
        self._masked: str | None = None
        self._lock = threading.Lock()

    def __call__(self) -> Credentials:
        from airflow.sdk.log import mask_secret

        with self._lock:
            if self._source is None:
                self._source = self._hook.get_session().get_credentials()
                if self._source is None:
                    from airflow_wmltrain.errors import CredentialsError

                    raise CredentialsError(
                        f"the Airflow connection '{self._hook.aws_conn_id}' gives no AWS credentials; "
                        "set its login and password, a role_arn, or the workers' AWS environment"
                    )
            frozen = self._source.get_frozen_credentials()
            if frozen.secret_key != self._masked:  # new credentials: hide them from the task log
                mask_secret(frozen.secret_key)
                if frozen.token:
                    mask_secret(frozen.token)
                self._masked = frozen.secret_key
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token)

    def forget(self) -> None:
        with self._lock:
            self._source = None


class S3Store(ObjectStore):
    """One S3 bucket.

    :param bucket: the bucket name.
    :param credentials: returns the current keys (called again after :data:`CREDENTIALS_TTL` seconds
        and after an authorization failure, so that temporary credentials are renewed).
    :param endpoint_url: the service URL; AWS's regional endpoint when ``None``.
    :param region: the signing region.
    :param addressing_style: ``path`` (``endpoint/bucket/key``), ``virtual`` (``bucket.endpoint/key``)
        or ``auto`` (path-style for a custom endpoint, virtual-hosted for AWS).
    :param endpoint_variant: ``{"fips": bool, "dualstack": bool}``: which of AWS's endpoints (botocore's).
    :param http: the transfer engine's connections.
    :param retry: how transfers are retried.
    """

    kind = "s3"
    # A GET, not a HEAD: an answer with a body says which region the bucket is in when it is elsewhere.
    bucket_probe = ("GET", "", {"list-type": "2", "max-keys": "0"})

    def __init__(
        self,
        bucket: str,
        *,
        credentials: Callable[[], Credentials],
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str = "auto",
        endpoint_variant: Mapping[str, bool] | None = None,
        http: HttpClient | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(bucket, http=http, retry=retry)
        self._custom_endpoint = endpoint_url
        self._addressing_style = addressing_style
        self._variant = dict(endpoint_variant or {})
        self._get_credentials = credentials
        self._credentials: Credentials | None = None
        self._credentials_at = 0.0
        self._lock = threading.Lock()
        self._aim(region or DEFAULT_REGION)

    def _aim(self, region: str) -> None:
        """Send the requests to ``region``: its endpoint (AWS's, unless a custom one) and signing region."""
        self.region = region
        if self._custom_endpoint:
            self._endpoint = self._custom_endpoint.rstrip("/")
        else:
            try:
                self._endpoint = aws_endpoint(region, **self._variant)
            except ValueError as err:
                from airflow_wmltrain.errors import CredentialsError

                raise CredentialsError(f"{err}: check the region name, or give an endpoint_url") from None
        parts = urlsplit(self._endpoint)
        style = self._addressing_style
        virtual = style == "virtual" or (
            style == "auto" and not self._custom_endpoint and "." not in self.bucket
        )
        if virtual:
            _check_host_label(self.bucket)
            self._host = f"{self.bucket}.{parts.netloc}"
            self._base_path = ""
        else:
            self._host = parts.netloc
            self._base_path = f"{parts.path.rstrip('/')}/{quote_path(self.bucket)}"
        self._scheme = parts.scheme
        # http.client leaves the default port out of the Host header: sign what is sent
        default_port = {"http": ":80", "https": ":443"}.get(parts.scheme, "")
        if default_port and self._host.endswith(default_port):
            self._host = self._host[: -len(default_port)]
        self._signer = SigV4Signer(region)

    def redirected(self, error: TransferError) -> bool:
        """Follow S3's answer that the bucket is in another region (a redirect, a refused signature)."""
        region = error.bucket_region
        if not region or region == self.region or error.status not in (301, 307, 400):
            return False
        with self._lock:
            self._aim(region)
        return True

    @classmethod
    def from_hook(
        cls, bucket: str, hook: S3Hook, *, timeout: float = DEFAULT_TIMEOUT, retry: RetryPolicy | None = None
    ) -> S3Store:
        """A store on an Airflow ``aws`` connection, through the amazon provider's S3 hook."""

        config = hook.conn_config
        botocore_config = config.botocore_config
        s3_options = (getattr(botocore_config, "s3", None) or {}) if botocore_config is not None else {}
        variant = {
            name: bool(getattr(botocore_config, f"use_{name}_endpoint", None))
            for name in ("fips", "dualstack")
        }
        reach = aws_reach(
            config.verify,
            ca_pem=config.extra_config.get("ca_certificate") or None,
            proxies=getattr(botocore_config, "proxies", None),
        )
        return cls(
            bucket,
            credentials=HookCredentials(hook),
            endpoint_url=config.get_service_endpoint_url("s3"),
            # The connection's own region; ``hook.conn_region_name`` builds a whole boto3 client (about
            # 0.3 s a store, measured in benchmarks/overhead.py) and is asked only when none is set.
            region=config.region_name or hook.conn_region_name,
            addressing_style=str(s3_options.get("addressing_style") or "auto"),
            endpoint_variant=variant,
            http=HttpClient(timeout=timeout, reach=reach),
            retry=retry,
        )

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def credentials(self) -> Credentials:
        with self._lock:
            if self._credentials is None or time.monotonic() - self._credentials_at > CREDENTIALS_TTL:
                self._credentials = self._get_credentials()
                self._credentials_at = time.monotonic()
            return self._credentials

    def refresh_credentials(self) -> None:
        with self._lock:
            self._credentials = None
            if isinstance(self._get_credentials, HookCredentials):
                self._get_credentials.forget()

    def sign(self, method: str, key: str, *, query: Fields = None, headers: Fields = None) -> SignedRequest:
        path = f"{self._base_path}/{quote_path(key)}" if key else (self._base_path or "/")
        signed = self._signer.sign(self.credentials(), method, self._host, path, query=query, headers=headers)
        url = f"{self._scheme}://{self._host}{path}"
        if query:
            url += "?" + canonical_query(query)  # the very string that was signed
        return SignedRequest(method, url, signed)

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            query = {"list-type": "2", "prefix": prefix, "encoding-type": "url", "max-keys": "1000"}
            if token:
                query["continuation-token"] = token
            root = ET.fromstring(self.request("GET", "", query=query)[2])  # noqa: S314 - the store's own XML
            url_encoded = _text(root, "EncodingType") == "url"
            for item in root.iter(f"{_NS}Contents"):
                key = _text(item, "Key")
                if url_encoded:
                    key = unquote_plus(key)  # AWS encodes a space as "+", s3api as "%20"
                yield ObjectInfo.from_etag(key, int(_text(item, "Size") or 0), _text(item, "ETag"))
            if _text(root, "IsTruncated") != "true":
                return
            token = _text(root, "NextContinuationToken")
            if not token:
                return

    # --- multipart upload ---------------------------------------------------------------------------

    min_part_size = 5 * 1024 * 1024

    def start_multipart(self, key: str) -> str:
        root = ET.fromstring(self.request("POST", key, query={"uploads": ""})[2])  # noqa: S314
        return _text(root, "UploadId")

    def sign_part(self, key: str, upload_id: str, number: int, *, headers: Fields = None) -> SignedRequest:
        return self.sign(
            "PUT", key, query={"partNumber": str(number), "uploadId": upload_id}, headers=headers
        )

    def integrity_headers(self, md5: bytes) -> dict[str, str]:
        return {"content-md5": base64.b64encode(md5).decode()}

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[UploadedPart]) -> str:
        body = (
            "<CompleteMultipartUpload>"
            + "".join(
                f'<Part><PartNumber>{p.number}</PartNumber><ETag>"{p.etag}"</ETag></Part>'
                for p in sorted(parts, key=lambda p: p.number)
            )
            + "</CompleteMultipartUpload>"
        )

        def attempt() -> str:
            signed = self.sign("POST", key, query={"uploadId": upload_id})
            data = request_bytes(self.http, self, signed, key, body=body.encode())[2]
            try:
                # AWS answers 200 at once and sends spaces while it assembles the parts
                root = ET.fromstring(data.strip())  # noqa: S314 - the store's own XML
            except ET.ParseError:
                raise TransferError(f"POST {self.describe(key)}: unreadable answer", transient=True) from None
            if root.tag.endswith("Error"):  # S3 may answer 200 with an error document
                code = _text(root, "Code")
                raise TransferError(
                    f"completing {self.describe(key)}: {code}", transient=code != "NoSuchUpload"
                )
            return _text(root, "ETag").strip('"').lower()

        return with_retries(self, self.retry, attempt, on_retry=lambda err: None)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.request("DELETE", key, query={"uploadId": upload_id}, missing_ok=True)
