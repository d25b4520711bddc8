"""A small client of Airflow 3's REST API v2 (``/auth/token``, then a bearer token), standard library only.

``wmltrain`` commands and the retention DAG talk to Airflow through it.  It imports nothing of Airflow,
so the command line starts fast.  Every failure is one :class:`ApiError` whose message is one line a user
can act on: the server is unreachable, the credentials are refused, an object does not exist.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_TIMEOUT = 30.0
PAGE_SIZE = 100


class ApiError(Exception):
    """A REST API call failed.

    :param message: one line saying what failed and what to do.
    :param status: the HTTP status (``None`` when the server did not answer).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ApiUnreachableError(ApiError):
    """The API server did not answer."""


class ApiAuthError(ApiError):
    """The API server refused the credentials or the token."""


class ApiNotFoundError(ApiError):
    """The object asked for does not exist."""


@dataclass
class AirflowApi:
    """The REST API of one Airflow deployment.

    :param url: the API server's base URL (``http://localhost:8080``).
    :param username: the user to get a token for.
    :param password: their password (never shown).
    :param timeout: seconds before a call fails.
    """

    url: str
    username: str
    password: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
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
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ApiUnreachableError(
                f"cannot reach the Airflow API server at {self.url} ({reason}); check --api-url / "
                "WMLTRAIN_API_URL and that the api-server runs"
            ) from None

    def token(self) -> str:
        """A bearer token (``POST /auth/token``), fetched once."""
        if self._token is None:
            status, body = self._send(
                "POST", "/auth/token", body={"username": self.username, "password": self.password}
            )
            if status in (401, 403):
                raise ApiAuthError(
                    f"the Airflow API server at {self.url} refused the credentials of user "
                    f"'{self.username}'; check --user/--password (WMLTRAIN_USER, WMLTRAIN_PASSWORD)",
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
        return self._token

    def call(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, body: Any = None
    ) -> Any:
        """One API call (``path`` under ``/api/v2``); its JSON answer, or ``None`` for an empty one.

        :raises ApiNotFoundError: 404.
        :raises ApiAuthError: 401/403.
        :raises ApiError: any other failure.
        """
        query = ""
        if params:
            query = "?" + urllib.parse.urlencode(
                [(k, v) for k, v in params.items() if v is not None], doseq=True
            )
        full = f"/api/v2{path}{query}"
        status, data = self._send(method, full, body=body, token=self.token())
        if status == 401:  # an expired token: get a new one, once
            self._token = None
            status, data = self._send(method, full, body=body, token=self.token())
        if status == 404:
            raise ApiNotFoundError(_detail(status, data), status=status)
        if status in (401, 403):
            raise ApiAuthError(
                f"the Airflow API refused {method} {path} for user '{self.username}': "
                f"{_detail(status, data)}",
                status=status,
            )
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
