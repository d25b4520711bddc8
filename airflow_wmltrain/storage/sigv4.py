"""AWS Signature Version 4 for S3 requests, lean enough to sign thousands of GETs per second.

botocore signs a request in about a millisecond of Python; a small-object staging makes thousands of
requests, so the transfer engine signs its own: the canonical request, the string to sign and the
HMAC chain of the AWS documentation, with the day's signing key cached.  Payloads are not hashed
(``UNSIGNED-PAYLOAD``), as for every S3 client that streams; integrity is checked with MD5s instead.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import quote

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Credentials:
    """An access key pair, and a session token for temporary credentials.

    :param access_key: access key id.
    :param secret_key: secret access key.
    :param token: session token, if any.
    """

    access_key: str
    secret_key: str
    token: str | None = None

    def __repr__(self) -> str:
        return "Credentials(***)"


def quote_path(path: str) -> str:
    """Percent-encode a URI path as S3 expects (everything but unreserved characters and ``/``)."""
    return quote(path, safe="/~")


def canonical_query(query: Mapping[str, str]) -> str:
    return "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in sorted(query.items()))


class SigV4Signer:
    """Signs S3 requests for one region.

    :param region: the signing region (``us-east-1`` for most S3-compatible stores).
    :param service: the signing service name.
    """

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

    def _signing_key(self, secret: str, day: str) -> bytes:
        with self._lock:
            key = self._keys.get((secret, day))
            if key is None:
                key = hmac.new(f"AWS4{secret}".encode(), day.encode(), hashlib.sha256).digest()
                for part in (self.region, self.service, "aws4_request"):
                    key = hmac.new(key, part.encode(), hashlib.sha256).digest()
                self._keys = {(secret, day): key}  # keep only today's
            return key

    def sign(
        self,
        credentials: Credentials,
        method: str,
        host: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        payload_hash: str = UNSIGNED_PAYLOAD,
        now: datetime | None = None,
    ) -> dict[str, str]:
        """The request's headers with the ``Authorization`` header added.

        :param credentials: the keys to sign with.
        :param method: HTTP method.
        :param host: the ``Host`` header value (``host`` or ``host:port``).
        :param path: the already percent-encoded path (see :func:`quote_path`).
        :param query: query parameters (not yet encoded).
        :param headers: further headers to send and sign (e.g. ``range``, ``content-md5``).
        :param payload_hash: the payload's SHA-256, or ``UNSIGNED-PAYLOAD``.
        :param now: the signing time (for tests).
        """
        moment = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        day = moment[:8]
        signed = {k.lower(): " ".join(str(v).split()) for k, v in (headers or {}).items()}
        signed["host"] = host
        signed["x-amz-date"] = moment
        signed["x-amz-content-sha256"] = payload_hash
        if credentials.token:
            signed["x-amz-security-token"] = credentials.token
        names = sorted(signed)
        canonical = "\n".join(
            (
                method,
                path,
                canonical_query(query or {}),
                "".join(f"{name}:{signed[name]}\n" for name in names),
                ";".join(names),
                payload_hash,
            )
        )
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{moment}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(credentials.secret_key, day), to_sign.encode(), hashlib.sha256)
        signed["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={signature.hexdigest()}"
        )
        del signed["host"]  # http.client sends Host itself
        return signed
