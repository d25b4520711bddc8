"""The transfer engine: object bytes between a store and local files, for every store the same way.

Measured on this project's 2-core machines against Swift's S3 API, per-request client CPU is what
decides small-object throughput (the server's CPU is the other half of the same two cores), and a
plain streamed GET into a file is the fastest way to move a large object.  So the engine is lean:
one persistent ``http.client`` connection per thread and host, requests signed by the store
(:meth:`ObjectStore.sign`), bodies moved from the socket to the file with ``splice`` (in the kernel)
or, when their MD5 is computed on the way or TLS is in between, read with ``readinto`` into a reused
buffer and written with ``pwrite``; uploads sent with ``socket.sendfile`` (no copy in Python).

Every transfer is retried with exponential backoff on transient failures (connection errors, 5xx,
short reads, 429, a failed verification); a 401 makes the store refresh its credentials once.

How an endpoint is reached is a :class:`Reach`: the CAs its TLS certificate is checked against (the
store's own setting: an ``aws`` connection's ``verify`` or ``AWS_CA_BUNDLE``, a ``swift`` connection's
``cacert``/``insecure``, inline credentials' PEM text) and the HTTP proxy requests go through (the
connection's ``proxies``, else ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``).  A certificate that is not
trusted fails at once, naming the endpoint and where to give the CA: trying again cannot fix it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import math
import os
import random
import re
import select
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

from airflow_wmltrain.errors import WmlTrainError

if TYPE_CHECKING:
    from airflow_wmltrain.storage.base import ObjectStore

BUFFER_SIZE = 1024 * 1024
#: How a kernel, a sandbox (seccomp) or a file system says it will not ``splice``: the bytes are read instead.
SPLICE_REFUSED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP})
#: Seconds a socket waits for the store (each read, each write).
DEFAULT_TIMEOUT = 60.0
T = TypeVar("T")


@dataclass(frozen=True)
class SignedRequest:
    """A request ready to send: its URL and headers (which may carry credentials: never log them).

    :param method: HTTP method.
    :param url: absolute URL (``http`` or ``https``).
    :param headers: request headers, credentials included.
    """

    method: str
    url: str
    headers: Mapping[str, str]

    def __repr__(self) -> str:  # never show the headers: they hold a token or a signature
        return f"SignedRequest({self.method} {self.url.split('?', 1)[0]})"


class TransferError(WmlTrainError):
    """A transfer failed (``S300``).

    :param message: what failed (object and reason; never a credential).
    :param transient: whether trying again may succeed (also :attr:`retryable`).
    :param status: the HTTP status, when there was a response.
    :param error_code: the S3 error code of the response's body (``ExpiredToken``...), when it had one.
    :param bucket_region: the region S3 says the bucket is in (a redirect's ``x-amz-bucket-region``, a
        wrongly signed request's ``<Region>``), when it says so.
    """

    code = "S300"

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        status: int | None = None,
        error_code: str | None = None,
        bucket_region: str | None = None,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.retryable = transient
        self.status = status
        self.error_code = error_code
        self.bucket_region = bucket_region

    @property
    def credentials_expired(self) -> bool:
        """The store refused credentials that renewing may fix: a 401, or S3's expired-token answers."""
        return self.status == 401 or self.error_code in _EXPIRED_CODES


#: S3 error codes of credentials that have expired (renew them and try again).
_EXPIRED_CODES = frozenset({"ExpiredToken", "TokenRefreshRequired", "RequestExpired"})
#: S3 error codes (with a 400 or 403) that another try may not see: a slow client, a busy store.
_TRANSIENT_CODES = frozenset({"RequestTimeout", "SlowDown", "InternalError", "BadDigest", "OperationAborted"})
_ERROR_CODE = re.compile(rb"<Code>([A-Za-z]{1,64})</Code>")
_REGION = re.compile(rb"<Region>([a-z0-9-]{1,40})</Region>")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transfer is tried.

    :param attempts: tries in all, the first included.
    :param base_delay: seconds before the second try; doubled each time, with jitter.
    :param max_delay: the longest wait between tries.
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        jitter = 0.5 + random.random() / 2  # noqa: S311 - not cryptographic
        return float(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * jitter)


@dataclass(frozen=True)
class Reach:
    """How the transfer engine reaches a store's endpoint: the CAs it trusts and the proxy it goes through.

    :param verify: ``True`` to check certificates against the system's CAs, ``False`` not to check them,
        or the path of a CA bundle file (or of a directory of hashed CA files) on this machine.
    :param ca_pem: CA certificates as PEM text, trusted besides ``verify`` (inline credentials: a
        submitter names no file of the worker).
    :param proxies: ``{"http": url, "https": url, "no": "host,.domain"}``; ``None`` reads the
        environment (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``, any case).
    :param hint: where the user names a CA, for the message of an untrusted certificate.
    """

    verify: bool | str = True
    ca_pem: str | None = field(default=None, repr=False)
    proxies: Mapping[str, str] | None = None
    hint: str = "give the CA that signed it"

    def ssl_context(self) -> ssl.SSLContext:
        """A TLS context as this reach asks (built once per :class:`HttpClient`).

        :raises TransferError: (not transient) the CA bundle cannot be read or holds no certificate.
        """
        if self.verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            if isinstance(self.verify, str):
                is_dir = os.path.isdir(self.verify)
                context = ssl.create_default_context(
                    cafile=None if is_dir else self.verify, capath=self.verify if is_dir else None
                )
            else:
                context = ssl.create_default_context()
            if self.ca_pem:
                context.load_verify_locations(cadata=self.ca_pem)
        except (OSError, ssl.SSLError, ValueError) as err:
            where = f"the CA bundle {self.verify}" if isinstance(self.verify, str) else "the CA certificates"
            raise TransferError(
                f"{where} cannot be used ({_reason(err)}); {self.hint}", transient=False
            ) from None
        return context

    def proxy_for(self, scheme: str, host: str) -> tuple[str, str | None] | None:
        """The proxy for a request to ``host`` (``host:port``): ``(proxy host:port, Proxy-Authorization)``,
        or ``None`` to go directly.  Only HTTP proxies are spoken (an HTTPS endpoint through ``CONNECT``).
        """
        import urllib.request  # once per host and client: not at import (the CLI starts without it)

        proxies = urllib.request.getproxies_environment() if self.proxies is None else self.proxies
        url = proxies.get(scheme)
        if not url or urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
            return None
        parts = urlsplit(url if "://" in url else f"http://{url}")
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        netloc = f"{netloc}:{parts.port or 80}"
        authorization = None
        if parts.username is not None:
            import base64

            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = "Basic " + base64.b64encode(pair).decode()
        return netloc, authorization


class HttpClient:
    """Persistent HTTP(S) connections, one per thread and host, reached as :class:`Reach` says.

    :param timeout: socket timeout in seconds.
    :param reach: the CAs trusted and the proxy used (default: system CAs, the environment's proxies).
    """

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, reach: Reach | None = None) -> None:
        self.timeout = timeout
        self.reach = reach or Reach()
        self._local = threading.local()
        self._routes: dict[tuple[str, str], tuple[str, str | None] | None] = {}  # the proxy of each host

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        return self.reach.ssl_context()

    def connection(self, url: str) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
        """The thread's connection for ``url``'s host, the target to request (the path and query; the
        whole URL when a proxy forwards a plain ``http`` request) and headers for the proxy."""
        parts = urlsplit(url)
        pool: dict[tuple[str, str], http.client.HTTPConnection] = self._local.__dict__.setdefault("pool", {})
        conn = pool.get((parts.scheme, parts.netloc))
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        route = (parts.scheme, parts.netloc)
        if route not in self._routes:  # read once: the environment is not read again for every request
            self._routes[route] = self.reach.proxy_for(*route)
        proxy = self._routes[route]
        if conn is None:
            conn = self._connect(parts.scheme, parts.netloc, proxy)
            pool[(parts.scheme, parts.netloc)] = conn
        if proxy is None or parts.scheme != "http":
            return conn, target, {}
        # a forwarding proxy takes the whole URL, and its credentials with each request
        return conn, f"http://{parts.netloc}{target}", {"Proxy-Authorization": proxy[1]} if proxy[1] else {}

    def _connect(
        self, scheme: str, netloc: str, proxy: tuple[str, str | None] | None
    ) -> http.client.HTTPConnection:
        if proxy is None:
            if scheme == "https":
                return http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self.ssl_context)
            return http.client.HTTPConnection(netloc, timeout=self.timeout)
        proxy_netloc, authorization = proxy
        if scheme == "https":  # a CONNECT tunnel, TLS end to end with the store
            tunnel = http.client.HTTPSConnection(proxy_netloc, timeout=self.timeout, context=self.ssl_context)
            tunnel.set_tunnel(
                netloc, headers={"Proxy-Authorization": authorization} if authorization else None
            )
            return tunnel
        return http.client.HTTPConnection(proxy_netloc, timeout=self.timeout)

    def buffer(self) -> memoryview:
        """The thread's reusable read buffer."""
        buf: memoryview | None = self._local.__dict__.get("buffer")
        if buf is None:
            buf = self._local.buffer = memoryview(bytearray(BUFFER_SIZE))
        return buf

    def discard(self, url: str) -> None:
        """Close and forget the thread's connection to ``url``'s host (after an error)."""
        parts = urlsplit(url)
        pool = self._local.__dict__.get("pool", {})
        conn = pool.pop((parts.scheme, parts.netloc), None)
        if conn is not None:
            conn.close()

    def send(
        self,
        request: SignedRequest,
        *,
        body: bytes | None = None,
        file: tuple[int, int, int] | None = None,
    ) -> http.client.HTTPResponse:
        """Send a request and return the response, its body not read yet.

        :param request: the signed request.
        :param body: a small body sent as is.
        :param file: ``(fd, offset, length)`` of a file region sent with ``sendfile``.
        """
        where = request.url.split("?", 1)[0]
        length = len(body) if body is not None else file[2] if file is not None else None
        try:
            conn, target, proxy_headers = self.connection(request.url)
            conn.putrequest(request.method, target, skip_accept_encoding=True)
            for name, value in {**request.headers, **proxy_headers}.items():
                conn.putheader(name, value)
            if length is not None or request.method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(length or 0))
            conn.endheaders()
            if body:
                conn.send(body)
            elif file is not None and file[2]:
                _sendfile(conn, *file)
            return conn.getresponse()
        except ssl.SSLCertVerificationError as err:
            self.discard(request.url)
            raise TransferError(
                f"{request.method} {where}: the TLS certificate of {urlsplit(where).netloc} is not trusted "
                f"({err.verify_message or _reason(err)}); {self.reach.hint}",
                transient=False,
            ) from None
        except (OSError, http.client.HTTPException) as err:
            self.discard(request.url)
            raise TransferError(f"{request.method} {where} failed: {_reason(err)}", transient=True) from None
        except ValueError:  # an invalid header value; its text would show the value (a credential)
            self.discard(request.url)
            raise TransferError(
                f"{request.method} {request.url.split('?', 1)[0]}: a header (credentials?) holds an invalid "
                "character such as a newline; check the keys for stray whitespace",
                transient=False,
            ) from None

    def close(self) -> None:
        """Close the calling thread's connections."""
        for conn in self._local.__dict__.pop("pool", {}).values():
            conn.close()


def _sendfile(conn: http.client.HTTPConnection, fd: int, offset: int, length: int) -> None:
    sock = conn.sock
    if sock is None:  # pragma: no cover - endheaders() connects
        raise OSError("not connected")
    with os.fdopen(os.dup(fd), "rb") as stream:
        sent = sock.sendfile(stream, offset, length)  # falls back to send() on TLS sockets
    if sent != length:
        raise OSError(f"sent {sent} of {length} bytes")


def _reason(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text.splitlines()[0][:200]


def _status_error(
    store: ObjectStore, key: str, response: http.client.HTTPResponse, verb: str
) -> TransferError:
    status = response.status
    body = response.read()  # drained, so that the connection can be reused
    headers = {name.lower(): value for name, value in response.getheaders()}
    match = _ERROR_CODE.search(body[:4096])
    code = match.group(1).decode() if match else None
    match = _REGION.search(body[:4096])
    region = headers.get("x-amz-bucket-region") or (match.group(1).decode() if match else None)
    where = store.describe(key)

    def error(text: str, transient: bool) -> TransferError:
        return TransferError(
            f"{verb} {where}: {text}",
            transient=transient,
            status=status,
            error_code=code,
            bucket_region=region,
        )

    if status == 404:
        return error("not found (404)", False)
    if code in _EXPIRED_CODES:
        return error(f"the credentials have expired ({code})", False)
    if status in (401, 403):
        return error(f"access denied ({status}{f' {code}' if code else ''})", False)
    if status in (301, 307) or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
        elsewhere = f"the bucket is in region {region}" if region else "another region or endpoint"
        return error(
            f"HTTP {status} {code or response.reason}: {elsewhere}; set the connection's region", False
        )
    # 422 (Swift) and BadDigest (S3): the body arrived damaged, sending it again may work.
    transient = status >= 500 or status in (408, 409, 422, 429) or code in _TRANSIENT_CODES
    return error(f"HTTP {status} {code or response.reason}", transient)


def with_retries(
    store: ObjectStore,
    policy: RetryPolicy,
    action: Callable[[], T],
    *,
    on_retry: Callable[[TransferError], None],
) -> T:
    """Run ``action``; on a transient :class:`TransferError` wait and try again, up to the policy's count.

    Expired credentials (a 401, S3's ``ExpiredToken``) make the store renew them, and a redirect to the
    bucket's region makes an S3 store follow it (:meth:`ObjectStore.redirected`): each once, not counted
    as a try.
    """
    refreshed = redirected = False
    attempt = 1
    while True:
        try:
            return action()
        except TransferError as err:
            if err.credentials_expired and not refreshed:
                store.refresh_credentials()
                refreshed = True
                continue
            if not redirected and store.redirected(err):
                redirected = True
                continue
            if not err.transient or attempt >= policy.attempts:
                raise
            on_retry(err)
            time.sleep(policy.delay(attempt))
            attempt += 1


def etag_is_md5(header: Callable[[str], str | None]) -> bool:
    """Whether an object's ETag can be the MD5 of its content, from the headers of a GET or PUT of it.

    The one home of the rule: S3 objects encrypted with SSE-KMS (``x-amz-server-side-encryption:
    aws:kms``, ``aws:kms:dsse``) or with a customer key (SSE-C) have ETags that are not their MD5 (the
    store checked ``Content-MD5`` itself); so do multipart objects, whose ETag is not even MD5-shaped
    (``...-N``, see :meth:`~airflow_wmltrain.storage.base.ObjectInfo.from_etag`).

    :param header: a header by (case-insensitive) name, ``None`` when absent: ``response.getheader``, or
        ``.get`` of a mapping with lower-case names.
    """
    encryption = header("x-amz-server-side-encryption") or ""
    return not (encryption.startswith("aws:kms") or header("x-amz-server-side-encryption-customer-algorithm"))


class _Get:
    """One GET of an object or a byte range, its response not read yet.

    :param client: the connections.
    :param store: the store (signs the request, names the object in messages).
    :param key: the object.
    :param size: the object's size from the listing.
    :param offset: where the range starts.
    :param length: the range's length (``size`` for the whole object).
    :param etag: the listed ETag: the store answers 412 if the object has changed since (no mix of versions).
    """

    def __init__(
        self,
        client: HttpClient,
        store: ObjectStore,
        key: str,
        *,
        size: int,
        offset: int,
        length: int,
        etag: str | None = None,
    ) -> None:
        self.client, self.store, self.key, self.length = client, store, key, length
        headers: dict[str, str] = {}
        self.whole = offset == 0 and length == size
        if not self.whole:
            headers["range"] = f"bytes={offset}-{offset + length - 1}"
        if etag:
            headers["if-match"] = f'"{etag}"'
        self.request = store.sign("GET", key, headers=headers)
        self.response = client.send(self.request)
        if not self.whole and self.response.status == 200:  # don't read a whole object we did not ask for
            client.discard(self.request.url)
            raise TransferError(
                f"GET {store.describe(key)}: the store ignored the Range header", transient=False
            )
        if self.response.status == 412:
            self.response.read()
            raise TransferError(
                f"GET {store.describe(key)}: the object changed while it was staged "
                f"(its ETag is no longer {etag}); stage again",
                transient=False,
                status=412,
            )
        if self.response.status not in (200, 206):
            raise _status_error(store, key, self.response, "GET")
        content_range = self.response.getheader("content-range")
        if self.response.status == 206 and content_range != f"bytes {offset}-{offset + length - 1}/{size}":
            # with verify = size (or no MD5 ETag) nothing else would notice bytes from elsewhere
            client.discard(self.request.url)
            raise TransferError(
                f"GET {store.describe(key)}: asked for bytes {offset}-{offset + length - 1} of {size}, the "
                f"store answered with {content_range or 'no Content-Range'}",
                transient=True,
            )
        self.md5_etag = etag_is_md5(self.response.getheader)
        # the socket the body comes from (this thread's connection to the store), for splice_into
        self.sock = client.connection(self.request.url)[0].sock

    def read_into(self, view: memoryview) -> int:
        """Read body bytes into ``view``; returns how many (0 at the end)."""
        try:
            return self.response.readinto(view)
        except (OSError, http.client.HTTPException) as err:
            raise self.broken(_reason(err)) from None

    def broken(self, reason: str) -> TransferError:
        """The error of a body that could not be read: the connection is dropped, another try may work."""
        self.client.discard(self.request.url)
        return TransferError(f"GET {self.store.describe(self.key)}: {reason}", transient=True)

    def splice_into(self, fd: int, position: int) -> int:
        """Move the body into ``fd`` at ``position`` with ``splice``: socket to pipe to file, one copy in
        the kernel, none in Python.  Returns how many bytes were moved: the whole body, or fewer when this
        answer cannot be spliced (TLS, chunked) or the kernel refuses; the caller reads the rest.

        A local write error (disk full...) is raised as is, like ``pwrite``'s.
        """
        response, sock = self.response, self.sock
        if (
            sock is None
            or isinstance(sock, ssl.SSLSocket)
            or response.chunked
            or not response.length
            or response.length > self.length  # more than asked for: read (and refused) by the caller
        ):
            return 0
        try:
            # the bytes that came with the headers (or one read, if none did) are written first
            head = memoryview(response.read1(BUFFER_SIZE))
        except (OSError, http.client.HTTPException) as err:
            raise self.broken(_reason(err)) from None
        moved = 0
        while moved < len(head):
            moved += os.pwrite(fd, head[moved:], position + moved)
        if not response.length or len(head) == BUFFER_SIZE:  # done, or more may wait in the response's buffer
            return moved
        readable = select.poll()
        readable.register(sock, select.POLLIN)
        timeout = sock.gettimeout()
        timeout_ms = None if timeout is None else math.ceil(timeout * 1000)
        read_end, write_end = os.pipe()
        try:
            with contextlib.suppress(OSError):  # a larger pipe: fewer calls (the default is 64 KiB)
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, BUFFER_SIZE)
            while response.length:
                try:
                    n = os.splice(sock.fileno(), write_end, min(response.length, BUFFER_SIZE))
                except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                    if not readable.poll(timeout_ms):
                        raise self.broken("timed out") from None
                    continue
                except OSError as err:
                    if moved == len(head) and err.errno in SPLICE_REFUSED:
                        return moved  # this kernel, sandbox or socket refuses splice: read the rest
                    raise self.broken(_reason(err)) from None
                if not n:  # the store closed the connection early: check() reports the short body
                    self.client.discard(self.request.url)
                    return moved
                response.length -= n  # the response now knows these bytes were read
                if not _pipe_to_file(read_end, fd, n, position + moved):
                    return moved + n  # this file system cannot splice: read the rest
                moved += n
        finally:
            os.close(read_end)
            os.close(write_end)
        return moved

    def check(self, received: int, digest: Any = None, md5: str | None = None) -> None:
        """Refuse a body of the wrong length, or whose MD5 is not the expected one."""
        where = self.store.describe(self.key)
        if received != self.length:
            self.client.discard(self.request.url)
            raise TransferError(
                f"GET {where}: received {received} bytes, expected {self.length}", transient=True
            )
        if digest is not None and digest.hexdigest() != md5:
            raise TransferError(
                f"GET {where}: content MD5 {digest.hexdigest()} does not match the ETag {md5}", transient=True
            )


def _pipe_to_file(pipe: int, fd: int, count: int, position: int) -> bool:
    """Write ``count`` bytes from ``pipe`` into ``fd`` at ``position``; ``False`` when the file system
    could not take them by ``splice`` (they were then written with ``pwrite``)."""
    done = 0
    while done < count:
        try:
            done += os.splice(pipe, fd, count - done, offset_dst=position + done)
        except OSError as err:
            if err.errno not in SPLICE_REFUSED:
                raise
            while done < count:
                data = memoryview(os.read(pipe, count - done))
                while data:
                    written = os.pwrite(fd, data, position + done)
                    data, done = data[written:], done + written
            return False
    return True


def download_to_fd(
    client: HttpClient,
    store: ObjectStore,
    key: str,
    fd: int,
    *,
    size: int,
    md5: str | None,
    offset: int = 0,
    length: int | None = None,
    etag: str | None = None,
) -> bool:
    """GET an object (or the byte range ``offset``..``offset+length``) into an open file, verified.

    Without an MD5 to compute (byte ranges, whose MD5 the caller computes; ``verify = size``) a plain
    HTTP body goes from the socket to the file with ``splice``; otherwise it is read into the thread's
    reused buffer and written with ``pwrite``.  Both measured against receiving into a memory-mapped
    file, which paid a page fault per page (``benchmarks/write_path.py``, docs/benchmarks.md).

    :param size: the object's size from the listing; a whole-object body must have exactly this size.
    :param md5: the expected MD5 of the whole object, or ``None`` when the ETag is not one (or the
        caller hashes the object itself, as for ranges).
    :param etag: the listed ETag, sent as ``If-Match``.
    :returns: whether the object's ETag can be its MD5 (not for SSE-KMS or customer-key encryption).
    :raises TransferError: on any failure; ``transient`` when another try may succeed.
    """
    length = size - offset if length is None else length
    get = _Get(client, store, key, size=size, offset=offset, length=length, etag=etag)
    digest = hashlib.md5(usedforsecurity=False) if md5 and get.whole and get.md5_etag else None
    try:
        # With no MD5 to compute here, the body goes from the socket to the file inside the kernel (plain
        # HTTP); whatever is left (TLS, a chunked answer, a kernel without splice) is read below.
        received = get.splice_into(fd, offset) if digest is None else 0
        position = offset + received
        buffer = client.buffer()
        while received <= get.length:
            n = get.read_into(buffer)
            if not n:
                break
            received += n
            if received > get.length:
                break
            chunk = buffer[:n]
            if digest is not None:
                digest.update(chunk)
            while chunk:
                written = os.pwrite(fd, chunk, position)
                position += written
                chunk = chunk[written:]
    except OSError:
        # A local error (disk full...) is raised as is: not the store's fault, not retried. The body
        # was not read to its end: the connection cannot carry another request.
        client.discard(get.request.url)
        raise
    get.check(received, digest, md5)
    return get.md5_etag


def upload_from_fd(
    client: HttpClient,
    request: SignedRequest,
    store: ObjectStore,
    key: str,
    fd: int,
    *,
    offset: int,
    length: int,
) -> Mapping[str, str]:
    """PUT a file region with ``sendfile``; returns the response headers (``etag``...).

    :raises TransferError: on any failure; ``transient`` when another try may succeed.
    """
    response = client.send(request, file=(fd, offset, length))
    if response.status not in (200, 201, 204):
        raise _status_error(store, key, response, "PUT")
    response.read()
    return {name.lower(): value for name, value in response.getheaders()}


def request_bytes(
    client: HttpClient, store: ObjectStore, request: SignedRequest, key: str, *, body: bytes | None = None
) -> tuple[int, Mapping[str, str], bytes]:
    """Send a small request and read the whole response: ``(status, headers, body)``.

    :raises TransferError: on connection failures and error statuses (404 included).
    """
    response = client.send(request, body=body)
    if response.status >= 300:
        raise _status_error(store, key, response, request.method)
    try:
        data = response.read()
    except (OSError, http.client.HTTPException) as err:
        client.discard(request.url)
        raise TransferError(
            f"{request.method} {store.describe(key)}: {_reason(err)}", transient=True
        ) from None
    return response.status, {name.lower(): value for name, value in response.getheaders()}, data
