"""A small client of Airflow 3's REST API v2 (``/auth/token``, then a bearer token), standard library only.

``wmltrain`` commands and the retention DAG talk to Airflow through it.  It imports nothing of Airflow,
so the command line starts fast.  Every failure is one :class:`ApiError` (part of the package's error
tree, :mod:`airflow_wmltrain.errors`) whose message is one line a user can act on: the server is
unreachable or did not answer in time, the credentials are refused, an object does not exist.

Calls that can safely be sent again — ``GET``, ``HEAD``, ``PUT``, ``DELETE``, and any call whose caller
says so (``idempotent=True``) — are retried with a growing delay when the server does not answer, times
out or answers 5xx (a busy api-server, a locked database), a bounded number of times
(:attr:`AirflowApi.tries`).  A ``POST`` that creates something is sent once: its caller makes it safe to
repeat (``service.runs.submit_run``: the run id is chosen by the client, a ``409`` on a retry is checked).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import socket
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_wmltrain.errors import EXIT_BAD_INPUT, WmlTrainError
from airflow_wmltrain.waiting import Backoff, wait_until

#: Seconds one HTTP exchange may take before it counts as a time-out.
DEFAULT_TIMEOUT = 30.0
#: How many times a call that is safe to repeat is sent at most.
DEFAULT_TRIES = 4
#: The delays between the tries of one call.
RETRY_BACKOFF = Backoff(interval=1.0, max_interval=10.0, factor=2.0)
PAGE_SIZE = 100
#: Airflow's public REST API.
PUBLIC_API = "/api/v2"
#: This provider's endpoint on the same API server (:mod:`airflow_wmltrain.service.runs_api`).
PLUGIN_API = "/wmltrain"
#: Methods whose repetition changes nothing more than their first success.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class ApiError(WmlTrainError):
    """A REST API call failed.

    :param message: one line saying what failed and what to do.
    :param status: the HTTP status (``None`` when the server did not answer).
    """

    code = "S200"
    retryable = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiUnreachableError(ApiError):
    """The API server did not answer (refused the connection, or the exchange failed midway).

    :param maybe_sent: whether the request may have reached the server (``False`` when the connection
        itself was refused or the host is unknown: then nothing was done there).
    """

    retryable = True

    def __init__(self, message: str, *, maybe_sent: bool = True) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


class ApiTimeoutError(ApiUnreachableError):
    """The API server did not answer within the client's time-out (it may have done the work)."""


class ApiServerError(ApiError):
    """The API server answered 5xx (or 429): a server-side failure that a later try may not meet."""

    retryable = True


class ApiAuthError(ApiError):
    """The API server refused the credentials or the token."""


class ApiConflictError(ApiError):
    """The object to create exists already (``409``)."""


class ApiNotFoundError(ApiError):
    """The object asked for does not exist."""

    code = "C100"
    exit_status = EXIT_BAD_INPUT


#: The failures of a call that a later try of the same call may not meet.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ApiUnreachableError, ApiServerError, TimeoutError)


@dataclass
class _Answer:
    value: Any


#: A cached token is used only while it has at least this many seconds left.
TOKEN_MARGIN_S = 60


@dataclass(frozen=True)
class TokenCache:
    """Bearer tokens kept between commands until they expire (one ``POST /auth/token`` per token's
    lifetime, not per command): a file per API server, user and password (another password is checked
    by the server, not answered from the cache), mode 0600, in a directory of the user's own that nobody
    else may write (any other directory is not used).  A token is a credential: it is never printed,
    and a refused one is dropped.

    :param directory: where the files go (``~/.cache/wmltrain``).
    """

    directory: Path

    def _path(self, url: str, user: str, password: str) -> Path:
        key = hashlib.sha256(f"{url}\0{user}\0{password}".encode()).hexdigest()[:32]
        return self.directory / f"token-{key}"

    def _usable(self) -> bool:
        try:
            info = self.directory.stat()
        except OSError:
            return False
        return info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)

    def get(self, url: str, user: str, password: str) -> str | None:
        """The cached token, when there is one with more than :data:`TOKEN_MARGIN_S` seconds left."""
        if not self._usable():
            return None
        try:
            fd = os.open(self._path(url, user, password), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as file:
            if os.fstat(file.fileno()).st_uid != os.getuid():
                return None
            token = file.read(16384).decode("ascii", "replace").strip()
        expires = _token_expiry(token)
        return token if expires is not None and expires - time.time() > TOKEN_MARGIN_S else None

    def put(self, url: str, user: str, password: str, token: str) -> None:
        """Keep ``token`` (best effort: a cache that cannot be written is not an error)."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self._usable():
                return
            target = self._path(url, user, password)
            draft = target.with_name(f"{target.name}.{os.getpid()}")
            fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(token)
            os.replace(draft, target)
        except OSError:
            return

    def drop(self, url: str, user: str, password: str) -> None:
        with contextlib.suppress(OSError):
            self._path(url, user, password).unlink()


def _token_expiry(token: str) -> float | None:
    """The ``exp`` of a JWT (its signature is the server's to check), ``None`` when it has none."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


@dataclass
class AirflowApi:
    """The REST API of one Airflow deployment.

    :param url: the API server's base URL (``http://localhost:8080``).
    :param username: the user to get a token for.
    :param password: their password (never shown).
    :param timeout: seconds before one exchange fails with :class:`ApiTimeoutError`.
    :param tries: how many times a call that is safe to repeat is sent at most (``1``: no retry).
    :param backoff: the delays between those tries.
    :param sleep: how to wait between tries (tests pass a fake).
    :param token_cache: where tokens are kept between commands (none: a token per client).
    """

    url: str
    username: str
    password: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    tries: int = DEFAULT_TRIES
    backoff: Backoff = RETRY_BACKOFF
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    token_cache: TokenCache | None = None
    _token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")

    # --- transport ------------------------------------------------------------------------------------

    def _send(
        self, method: str, path: str, *, body: Any = None, token: str | None = None
    ) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 - http(s) URL
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return int(response.status), response.read()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read()
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError | socket.timeout):
                where = path.split("?", maxsplit=1)[0]
                raise ApiTimeoutError(
                    f"the Airflow API server at {self.url} did not answer {method} {where} "
                    f"within {self.timeout:.0f} s (it may be overloaded)"
                ) from None
            raise ApiUnreachableError(
                f"cannot reach the Airflow API server at {self.url} ({reason or type(err).__name__}); "
                "check --api-url / WMLTRAIN_API_URL and that the api-server runs",
                maybe_sent=not isinstance(reason, ConnectionRefusedError | socket.gaierror),
            ) from None

    def _retrying(self, what: str, once: Callable[[], Any], *, safe: bool) -> Any:
        """``once()``, tried again on transient failures when ``safe`` (at most :attr:`tries` times)."""
        if not safe or self.tries <= 1:
            return once()
        answer: _Answer = wait_until(
            lambda: _Answer(once()),
            what=what,
            backoff=self.backoff,
            transient=TRANSIENT_ERRORS,
            max_failures=self.tries,
            sleep=self.sleep,
        )
        return answer.value

    def token(self) -> str:
        """A bearer token: the cached one, else from ``POST /auth/token`` (safe to repeat), fetched once."""
        if self._token is None and self.token_cache is not None:
            self._token = self.token_cache.get(self.url, self.username, self.password)
        if self._token is None:
            status, body = self._retrying(
                "a token",
                lambda: self._checked(
                    "POST",
                    "/auth/token",
                    self._send(
                        "POST",
                        "/auth/token",
                        body={"username": self.username, "password": self.password},
                    ),
                ),
                safe=True,
            )
            if status in (401, 403):
                raise ApiAuthError(
                    f"the Airflow API server at {self.url} refused the credentials of user "
                    f"'{self.username}'; check --user/--password-file (WMLTRAIN_USER, WMLTRAIN_PASSWORD)",
                    status=status,
                )
            if status not in (200, 201):
                raise ApiError(
                    f"getting a token from {self.url}/auth/token failed: {_detail(status, body)}",
                    status=status,
                )
            try:
                self._token = str(json.loads(body)["access_token"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(f"{self.url}/auth/token did not answer with a token") from None
            if self.token_cache is not None:
                self.token_cache.put(self.url, self.username, self.password, self._token)
        return self._token

    def forget_token(self) -> None:
        """Drop the token the server refused (an expired one), here and in the cache."""
        self._token = None
        if self.token_cache is not None:
            self.token_cache.drop(self.url, self.username, self.password)

    @staticmethod
    def _checked(method: str, path: str, answer: tuple[int, bytes]) -> tuple[int, bytes]:
        """``answer``, unless it is a server-side failure (5xx, 429): then :class:`ApiServerError`."""
        status, data = answer
        if status >= 500 or status == 429:
            raise ApiServerError(f"{method} {path} failed: {_detail(status, data)}", status=status)
        return answer

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        idempotent: bool | None = None,
        under: str = PUBLIC_API,
    ) -> Any:
        """One API call (``path`` under ``/api/v2``); its JSON answer, or ``None`` for an empty one.

        :param under: the API the path is in: the public one, or :data:`PLUGIN_API` (this provider's).

        :param idempotent: whether sending the call again is safe (default: for ``GET``, ``HEAD``,
            ``PUT``, ``DELETE``); such calls are retried on time-outs, an unreachable server and 5xx.
            A ``DELETE`` whose retry finds the object gone counts as done.
        :raises ApiNotFoundError: 404.
        :raises ApiAuthError: 401/403.
        :raises ApiConflictError: 409.
        :raises ApiServerError: 5xx or 429 (after the retries, for a call that is safe to repeat).
        :raises ApiUnreachableError: no answer (:class:`ApiTimeoutError`: none in time).
        :raises ApiError: any other failure.
        """
        method = method.upper()
        safe = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        query = ""
        if params:
            query = "?" + urllib.parse.urlencode(
                [(k, v) for k, v in params.items() if v is not None], doseq=True
            )
        full = f"{under}{path}{query}"
        tries = 0

        def once() -> tuple[int, bytes]:
            nonlocal tries
            tries += 1
            status, data = self._send(method, full, body=body, token=self.token())
            if status == 401:  # an expired token: get a new one, once
                self.forget_token()
                status, data = self._send(method, full, body=body, token=self.token())
            return self._checked(method, path, (status, data))

        status, data = self._retrying(f"{method} {path}", once, safe=safe)
        if status == 404:
            if method == "DELETE" and tries > 1:  # an earlier try that got no answer did it
                return None
            raise ApiNotFoundError(_detail(status, data), status=status)
        if status in (401, 403):
            raise ApiAuthError(
                f"the Airflow API refused {method} {path} for user '{self.username}': "
                f"{_detail(status, data)}",
                status=status,
            )
        if status == 409:
            raise ApiConflictError(f"{method} {path} failed: {_detail(status, data)}", status=status)
        if status >= 400:
            raise ApiError(f"{method} {path} failed: {_detail(status, data)}", status=status)
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return data.decode("utf-8", "replace")

    def paginate(self, path: str, key: str, *, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
        """Every item of a list endpoint (``limit``/``offset`` pages)."""
        offset = 0
        while True:
            page = self.call("GET", path, params={**(params or {}), "limit": PAGE_SIZE, "offset": offset})
            items = page.get(key, []) if isinstance(page, dict) else []
            yield from items
            offset += len(items)
            if not items or offset >= int(page.get("total_entries", 0)):
                return


def _detail(status: int, body: bytes) -> str:
    """The server's explanation of an error, on one line."""
    text = body.decode("utf-8", "replace").strip()
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    if not isinstance(detail, str):
        detail = json.dumps(detail)
    detail = " ".join(detail.split())
    return f"HTTP {status}: {detail[:300]}" if detail else f"HTTP {status}"


def quote(value: str) -> str:
    """A path segment (run ids hold ``:`` and ``+``)."""
    return urllib.parse.quote(value, safe="")
