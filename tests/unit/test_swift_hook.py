"""SwiftHook without a Swift server: auth-version rules, connection mapping, Keystone, errors, secrets.

Keystone and auth-v1 servers are stood in for by a small HTTP server in a thread (real HTTP, scripted
answers); the tests against the real Swift are in tests/integration/test_swift_hook.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import swiftclient.client
from keystoneauth1.identity import v3
from keystoneauth1.session import Session
from pydantic import SecretStr

from airflow_wmltrain.errors import CredentialsError, DataLoadError
from airflow_wmltrain.get_provider_info import get_provider_info
from airflow_wmltrain.hooks.swift import (
    SwiftAuthConfig,
    SwiftHook,
    detect_auth_version,
    display_url,
)
from airflow_wmltrain.manifest import SwiftConnection

PASSWORD = "Unit-s3cr3t-Pa55word-0123456789"
KEYSTONE_TOKEN = "gAAAAAB-keystone-token-abcdef0123456789"


# --- a scripted HTTP server ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any


class ScriptedServer:
    """Answers every request with ``self.answer(seen)``; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.answer: Callable[[Seen], Answer] = lambda seen: Answer(500)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                outer.seen.append(seen)
                answer = outer.answer(seen)
                data = answer.body if isinstance(answer.body, bytes) else json.dumps(answer.body).encode()
                if answer.body is None:
                    data = b""
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_HEAD = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    srv = ScriptedServer()
    yield srv
    srv.close()


def v3_catalog(*endpoints: tuple[str, str, str]) -> list[dict[str, Any]]:
    """A Keystone v3 catalog with one object-store service: (interface, region, url) endpoints."""
    return [
        {"type": "identity", "endpoints": [{"interface": "public", "region": "r", "url": "http://id"}]},
        {
            "type": "object-store",
            "name": "swift",
            "endpoints": [
                {"interface": interface, "region": region, "region_id": region, "url": url}
                for interface, region, url in endpoints
            ],
        },
    ]


EXPIRES = "2099-01-01T00:00:00.000000Z"


def keystone_v3(catalog: list[dict[str, Any]], tokens: list[str] | None = None) -> Callable[[Seen], Answer]:
    """A Keystone v3 that accepts PASSWORD and hands out ``tokens`` in turn."""
    issued = iter(tokens or [KEYSTONE_TOKEN] * 100)

    def answer(seen: Seen) -> Answer:
        if seen.method != "POST" or seen.path != "/identity/v3/auth/tokens":
            return Answer(404, {"error": {"code": 404}})
        if seen.body["auth"]["identity"]["password"]["user"]["password"] != PASSWORD:
            return Answer(401, {"error": {"code": 401, "message": "The request requires authentication."}})
        token = {"catalog": catalog, "expires_at": EXPIRES}
        return Answer(201, {"token": token}, {"X-Subject-Token": next(issued)})

    return answer


def inline(auth_url: str, **values: Any) -> SwiftConnection:
    return SwiftConnection(
        auth_url=auth_url,
        user_name=values.pop("user_name", "test:tester"),
        password=SecretStr(values.pop("password", PASSWORD)),
        **values,
    )


def set_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, **values: Any) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "swift", **values}))


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """swiftclient.client.Connection replaced by a recorder of its keyword arguments."""
    calls: list[dict[str, Any]] = []

    class Recorder:
        def __init__(self, **kwargs: Any) -> None:
            calls.append(kwargs)

    monkeypatch.setattr(swiftclient.client, "Connection", Recorder)
    return calls


# --- auth version -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "version", "expected_version", "expected_url"),
    [
        ("http://swift:8080/auth/v1.0", None, "1.0", "http://swift:8080/auth/v1.0"),
        ("http://swift:8080/auth/v1.0/", None, "1.0", "http://swift:8080/auth/v1.0"),
        ("https://swift.example.com/v1.0", None, "1.0", "https://swift.example.com/v1.0"),
        ("https://swift.example.com/auth/v1", None, "1.0", "https://swift.example.com/auth/v1"),
        ("https://ks.example.com/v3", None, "3", "https://ks.example.com/v3"),
        ("https://ks.example.com/v3/", None, "3", "https://ks.example.com/v3"),
        ("https://ks.example.com:5000/identity/v3", None, "3", "https://ks.example.com:5000/identity/v3"),
        ("https://ks.example.com:5000/v2.0", None, "2.0", "https://ks.example.com:5000/v2.0"),
        ("https://ks.example.com:5000/v2.0/", None, "2.0", "https://ks.example.com:5000/v2.0"),
        # bare Keystone URLs: v3, with /v3 appended
        ("https://identity.open.softlayer.com", None, "3", "https://identity.open.softlayer.com/v3"),
        ("https://ks.example.com:5000/", None, "3", "https://ks.example.com:5000/v3"),
        ("https://ks.example.com/identity", None, "3", "https://ks.example.com/identity/v3"),
        # an explicit auth_version wins over the URL
        ("https://ks.example.com", "2", "2.0", "https://ks.example.com/v2.0"),
        ("https://ks.example.com", "2.0", "2.0", "https://ks.example.com/v2.0"),
        ("https://ks.example.com/v3", 3, "3", "https://ks.example.com/v3"),
        ("https://ks.example.com/v3", "3.0", "3", "https://ks.example.com/v3"),
        ("http://swift:8080/auth/v1.0", "1", "1.0", "http://swift:8080/auth/v1.0"),
        ("http://swift:8080/my-auth", "1.0", "1.0", "http://swift:8080/my-auth"),
        ("http://swift:8080/my-auth", " v1 ", "1.0", "http://swift:8080/my-auth"),
        ("https://ks.example.com/v3", "", "3", "https://ks.example.com/v3"),
    ],
)
def test_auth_version_detection(url: str, version: Any, expected_version: str, expected_url: str) -> None:
    assert detect_auth_version(url, version) == (expected_version, expected_url)


@pytest.mark.parametrize("version", ["4", "1.1", "keystone", True, 2.5])
def test_unknown_auth_version_is_a_credentials_error_naming_the_field(version: Any) -> None:
    with pytest.raises(CredentialsError) as info:
        detect_auth_version("https://ks.example.com/v3", version)
    assert info.value.code == "C103"
    assert info.value.field == "auth_version"
    assert str(info.value).startswith("auth_version: ")
    assert f"'{version}'" in str(info.value)


def test_display_url_drops_user_info_and_query() -> None:
    assert display_url("https://u:pw@ks.example.com:5000/v3?token=x#f") == "https://ks.example.com:5000/v3"


# --- swiftclient.client.Connection arguments --------------------------------------------------------


def test_inline_v1_credentials_make_a_v1_connection(captured: list[dict[str, Any]]) -> None:
    hook = SwiftHook(credentials=inline("http://127.0.0.1:8080/auth/v1.0"), timeout=12, retries=2)
    hook.get_conn()
    assert captured == [
        {
            "authurl": "http://127.0.0.1:8080/auth/v1.0",
            "user": "test:tester",
            "key": PASSWORD,
            "auth_version": "1.0",
            "os_options": {},
            "retries": 2,
            "timeout": 12,
            "insecure": False,
            "cacert": None,
        }
    ]
    assert hook.get_conn() is hook.conn  # created once
    assert len(captured) == 1


def test_inline_keystone_credentials_map_the_manifest_names(captured: list[dict[str, Any]]) -> None:
    credentials = inline(
        "https://identity.open.softlayer.com",
        user_name="admin_1234",
        region="dallas",
        domain_name="1026873",
        project_id="0123456789abcdef",
    )
    SwiftHook(credentials=credentials).get_conn()
    (kwargs,) = captured
    session = kwargs.pop("session")
    assert isinstance(session, Session)
    assert isinstance(session.auth, v3.Password)
    assert kwargs == {
        "authurl": "https://identity.open.softlayer.com/v3",
        "user": "admin_1234",
        "key": PASSWORD,
        "auth_version": "3",
        "os_options": {
            "project_id": "0123456789abcdef",
            "user_domain_name": "1026873",
            "project_domain_name": "1026873",
            "region_name": "dallas",
        },
        "retries": 5,
        "timeout": 60,
        "insecure": False,
        "cacert": None,
    }


def test_airflow_connection_maps_to_a_v3_connection(
    monkeypatch: pytest.MonkeyPatch, captured: list[dict[str, Any]]
) -> None:
    set_connection(
        monkeypatch,
        "swift_unit",
        host="https://keystone.example.com/v3",
        login="u",
        password=PASSWORD,
        extra={
            "project_id": "p-123",
            "project_name": "proj",
            "domain_name": "Default",
            "region_name": "dallas",
            "endpoint_type": "internal",
            "insecure": "true",
            "cacert": "/etc/ssl/ca.pem",
        },
    )
    SwiftHook("swift_unit").get_conn()
    (kwargs,) = captured
    session = kwargs.pop("session")
    assert isinstance(session, Session)
    assert session.verify is False  # insecure: not the cacert
    assert kwargs == {
        "authurl": "https://keystone.example.com/v3",
        "user": "u",
        "key": PASSWORD,
        "auth_version": "3",
        "os_options": {
            "project_id": "p-123",
            "project_name": "proj",
            "user_domain_name": "Default",
            "project_domain_name": "Default",
            "region_name": "dallas",
            "endpoint_type": "internal",
        },
        "retries": 5,
        "timeout": 60,
        "insecure": True,
        "cacert": "/etc/ssl/ca.pem",
    }


def test_airflow_connection_domain_overrides_aliases_and_explicit_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_connection(
        monkeypatch,
        "swift_unit",
        host="https://keystone.example.com:5000",
        login="u",
        password=PASSWORD,
        extra={
            "auth_version": 2,
            "domain_name": "D",
            "user_domain_name": "UD",
            "region": "london",
            "extra__swift__project_name": "old-style",
            "insecure": False,
        },
    )
    config = SwiftHook("swift_unit").auth_config
    assert config.auth_version == "2.0"
    assert config.auth_url == "https://keystone.example.com:5000/v2.0"
    assert config.os_options() == {
        "project_name": "old-style",
        "user_domain_name": "UD",
        "project_domain_name": "D",
        "region_name": "london",
    }
    assert config.insecure is False
    assert config.source == "Airflow connection 'swift_unit'"


def test_airflow_connection_uri_form_builds_the_url_from_host_port_and_schema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SWIFT_URI", f"swift://u:{PASSWORD}@keystone.example.com:5000/v3")
    config = SwiftHook("swift_uri").auth_config
    assert (config.auth_url, config.auth_version, config.user) == (
        "https://keystone.example.com:5000/v3",
        "3",
        "u",
    )


def test_airflow_connection_v1_url(monkeypatch: pytest.MonkeyPatch, captured: list[dict[str, Any]]) -> None:
    set_connection(
        monkeypatch,
        "swift_unit",
        host="http://127.0.0.1:8080/auth/v1.0",
        login="test:tester",
        password=PASSWORD,
    )
    SwiftHook("swift_unit").get_conn()
    (kwargs,) = captured
    assert "session" not in kwargs
    assert (kwargs["auth_version"], kwargs["user"], kwargs["os_options"]) == ("1.0", "test:tester", {})


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"login": "u", "password": PASSWORD}, "has no host"),
        ({"host": "https://ks.example.com/v3", "password": PASSWORD}, "has no login"),
        ({"host": "https://ks.example.com/v3", "login": "u"}, "has no password"),
        (
            {"host": "https://ks.example.com/v3", "port": 5000, "login": "u", "password": PASSWORD},
            "port and schema must be empty",
        ),
        ({"host": "ftp://ks.example.com/v3", "login": "u", "password": PASSWORD}, "not an http(s) auth URL"),
        (
            {"host": f"https://u:{PASSWORD}@ks.example.com/v3", "login": "u", "password": PASSWORD},
            "holds a user name or password",
        ),
        (
            {
                "host": "https://ks.example.com/v3",
                "login": "u",
                "password": PASSWORD,
                "extra": {"auth_version": "4"},
            },
            "auth_version: '4' is not a Swift auth version",
        ),
        (
            {
                "host": "https://ks.example.com/v3",
                "login": "u",
                "password": PASSWORD,
                "extra": {"insecure": "maybe"},
            },
            "extra insecure: 'maybe' is not true or false",
        ),
    ],
)
def test_invalid_airflow_connections_are_credentials_errors(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, Any], expected: str
) -> None:
    set_connection(monkeypatch, "swift_bad", **values)
    with pytest.raises(CredentialsError) as info:
        _ = SwiftHook("swift_bad").auth_config
    assert info.value.code == "C103"
    assert expected in str(info.value)
    assert "swift_bad" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_undefined_airflow_connection_is_a_credentials_error() -> None:
    with pytest.raises(CredentialsError, match="Airflow connection 'no_such_swift_conn' is not defined"):
        _ = SwiftHook("no_such_swift_conn").auth_config


def test_inline_credentials_never_read_an_airflow_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(conn_id: str) -> None:
        raise AssertionError(f"read connection {conn_id}")

    monkeypatch.setattr(SwiftHook, "get_connection", classmethod(lambda cls, conn_id: forbidden(conn_id)))
    hook = SwiftHook(credentials=inline("http://127.0.0.1:8080/auth/v1.0"))
    assert hook.swift_conn_id is None
    assert hook.auth_config.source == "the manifest's inline Swift credentials"


def test_inline_credentials_with_user_info_in_the_url_are_refused() -> None:
    hook = SwiftHook(credentials=inline(f"http://test:{PASSWORD}@127.0.0.1:8080/auth/v1.0"))
    with pytest.raises(CredentialsError) as info:
        _ = hook.auth_config
    assert "http://127.0.0.1:8080/auth/v1.0 holds a user name or password" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_exactly_one_source_of_credentials() -> None:
    with pytest.raises(ValueError, match="not both"):
        SwiftHook("my_swift", credentials=inline("http://127.0.0.1:8080/auth/v1.0"))
    with pytest.raises(ValueError, match="give swift_conn_id or credentials"):
        SwiftHook(None)
    assert SwiftHook().swift_conn_id == "swift_default"


# --- secrets ------------------------------------------------------------------------------------------


def test_repr_never_shows_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = SwiftHook(credentials=inline("http://127.0.0.1:8080/auth/v1.0"))
    _ = hook.auth_config
    assert PASSWORD not in repr(hook)
    assert "test:tester" in repr(hook)
    assert PASSWORD not in repr(hook.auth_config)
    set_connection(
        monkeypatch,
        "swift_unit",
        host="https://ks.example.com/v3",
        login="u",
        password=PASSWORD,
        extra={"project_id": "p"},
    )
    hook = SwiftHook("swift_unit")
    _ = hook.auth_config
    assert repr(hook) == "SwiftHook(swift_conn_id='swift_unit')"
    assert PASSWORD not in repr(hook.get_conn().session.auth)


def test_swiftclient_logging_reveals_no_prefix_of_secrets() -> None:
    # Importing the hook set it; swiftclient's default (16) logs up to 16 characters of tokens and keys.
    assert swiftclient.client.logger_settings["reveal_sensitive_prefix"] == 0
    assert swiftclient.client.safe_value("X-Auth-Token", KEYSTONE_TOKEN) == "..."


# --- auth v1 errors (scripted server) ---------------------------------------------------------------


def v1_hook(server: ScriptedServer, **kwargs: Any) -> SwiftHook:
    return SwiftHook(credentials=inline(f"{server.url}/auth/v1.0"), **kwargs)


def test_v1_auth_token_is_cached_and_refreshed(server: ScriptedServer) -> None:
    tokens = iter(["AUTH_tk1", "AUTH_tk2", "AUTH_tk3"])
    server.answer = lambda seen: Answer(
        200, None, {"X-Storage-Url": f"{server.url}/v1/AUTH_test", "X-Auth-Token": next(tokens)}
    )
    hook = v1_hook(server)
    assert hook.get_auth() == (f"{server.url}/v1/AUTH_test", "AUTH_tk1")
    assert hook.get_auth() == (f"{server.url}/v1/AUTH_test", "AUTH_tk1")
    assert len(server.seen) == 1
    assert server.seen[0].headers["x-auth-user"] == "test:tester"
    assert server.seen[0].headers["x-auth-key"] == PASSWORD
    assert hook.refresh_auth() == (f"{server.url}/v1/AUTH_test", "AUTH_tk2")
    # a thread that still holds the replaced token does not cause another authentication
    assert hook.refresh_auth(stale_token="AUTH_tk1") == (f"{server.url}/v1/AUTH_test", "AUTH_tk2")
    assert len(server.seen) == 2
    assert hook.refresh_auth(stale_token="AUTH_tk2")[1] == "AUTH_tk3"


def test_v1_refused_password_is_c103_without_secrets(server: ScriptedServer) -> None:
    # the body echoes the key, as a badly behaved auth server might: it must not reach the message
    server.answer = lambda seen: Answer(401, f"bad key {seen.headers.get('x-auth-key')}".encode())
    hook = v1_hook(server, retries=3)
    with pytest.raises(CredentialsError) as info:
        hook.get_auth()
    message = str(info.value)
    assert info.value.code == "C103"
    assert message == (
        f"Swift authentication refused at {server.url}/auth/v1.0 for user 'test:tester' "
        "(HTTP 401 Unauthorized); check the user name and password (the manifest's inline Swift credentials)"
    )
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert len(server.seen) == 1  # a refused password is not retried
    ok, text = hook.test_connection()
    assert not ok
    assert PASSWORD not in text
    assert "401" in text


@pytest.mark.parametrize(
    ("answer", "error", "expected"),
    [
        (Answer(412, b"Bad URL"), CredentialsError, "is not a Swift auth v1.0 endpoint (HTTP 412"),
        (Answer(404, b"nope"), CredentialsError, "check the auth URL and auth_version"),
        (Answer(200, b"<html>a web page</html>"), CredentialsError, "answered without a storage URL"),
        (Answer(503, b"busy"), DataLoadError, "failed: HTTP 503 Service Unavailable"),
    ],
)
def test_v1_auth_failures(
    server: ScriptedServer, answer: Answer, error: type[Exception], expected: str
) -> None:
    server.answer = lambda seen: answer
    with pytest.raises(error, match=r".*") as info:
        v1_hook(server, retries=0).get_auth()
    assert type(info.value) is error
    assert expected in str(info.value)
    assert PASSWORD not in str(info.value)


def test_v1_server_errors_are_retried(server: ScriptedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("airflow_wmltrain.hooks.swift.time.sleep", lambda seconds: None)
    answers = iter(
        [Answer(503), Answer(502), Answer(200, None, {"X-Storage-Url": "http://s/v1/A", "X-Auth-Token": "t"})]
    )
    server.answer = lambda seen: next(answers)
    assert v1_hook(server, retries=5).get_auth() == ("http://s/v1/A", "t")
    assert len(server.seen) == 3


# --- Keystone (scripted server) ---------------------------------------------------------------------


def keystone_hook(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer, extra: dict[str, Any], **kwargs: Any
) -> SwiftHook:
    set_connection(
        monkeypatch,
        "swift_ks",
        host=f"{server.url}/identity",
        login="alice",
        password=kwargs.pop("password", PASSWORD),
        extra=extra,
    )
    return SwiftHook("swift_ks", **kwargs)


def test_keystone_v3_project_id_through_swiftclient(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    server.answer = keystone_v3(
        v3_catalog(
            ("internal", "dallas", "http://internal.dallas/v1/AUTH_p"),
            ("public", "london", "https://london/v1/AUTH_p"),
            ("public", "dallas", "https://dallas/v1/AUTH_p"),
        )
    )
    hook = keystone_hook(
        monkeypatch, server, {"project_id": "p-1", "domain_name": "1026873", "region_name": "dallas"}
    )
    assert hook.get_auth() == ("https://dallas/v1/AUTH_p", KEYSTONE_TOKEN)
    assert hook.conn.url == "https://dallas/v1/AUTH_p"  # swiftclient's connection shares it
    (seen,) = server.seen
    assert seen.body == {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {"user": {"name": "alice", "domain": {"name": "1026873"}, "password": PASSWORD}},
            },
            "scope": {"project": {"id": "p-1"}},
        }
    }


def test_keystone_v3_project_name_domain_and_interface(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    server.answer = keystone_v3(
        v3_catalog(
            ("public", "dallas", "https://dallas/v1/A"), ("internal", "dallas", "http://10.0.0.1/v1/A")
        )
    )
    hook = keystone_hook(
        monkeypatch,
        server,
        {"project_name": "ml", "user_domain_name": "users", "endpoint_type": "internal"},
    )
    assert hook.get_auth()[0] == "http://10.0.0.1/v1/A"
    auth = server.seen[0].body["auth"]
    assert auth["identity"]["password"]["user"]["domain"] == {"name": "users"}
    assert auth["scope"] == {"project": {"name": "ml", "domain": {"name": "Default"}}}


def test_keystone_v3_unknown_region_names_the_regions_it_has(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    server.answer = keystone_v3(
        v3_catalog(("public", "dallas", "https://d"), ("public", "london", "https://l"))
    )
    hook = keystone_hook(monkeypatch, server, {"project_id": "p", "region_name": "tokyo"})
    with pytest.raises(CredentialsError) as info:
        hook.get_auth()
    assert "no public 'object-store' endpoint in region 'tokyo'" in str(info.value)
    assert "the catalog has it in: dallas, london" in str(info.value)


def test_keystone_v3_wrong_password_is_c103_without_secrets(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    server.answer = keystone_v3(v3_catalog(("public", "dallas", "https://d")))
    wrong = "Wrong-pa55word-9876543210-unit"
    hook = keystone_hook(monkeypatch, server, {"project_id": "p"}, password=wrong)
    with pytest.raises(CredentialsError) as info:
        hook.get_auth()
    assert str(info.value) == (
        f"Swift authentication refused at {server.url}/identity/v3 for user 'alice' (HTTP 401 Unauthorized); "
        "check the user name and password (Airflow connection 'swift_ks')"
    )
    assert info.value.__cause__ is None
    ok, text = hook.test_connection()
    assert not ok
    assert wrong not in text
    assert PASSWORD not in text


def test_keystone_v3_reauthenticates_on_refresh(
    monkeypatch: pytest.MonkeyPatch, server: ScriptedServer
) -> None:
    server.answer = keystone_v3(v3_catalog(("public", "dallas", "https://d")), tokens=["tok-1", "tok-2"])
    hook = keystone_hook(monkeypatch, server, {"project_id": "p"})
    assert hook.get_auth() == ("https://d", "tok-1")
    assert hook.get_auth() == ("https://d", "tok-1")
    assert hook.refresh_auth("tok-1") == ("https://d", "tok-2")
    assert len(server.seen) == 2


def test_keystone_v2_tenant(monkeypatch: pytest.MonkeyPatch, server: ScriptedServer) -> None:
    def answer(seen: Seen) -> Answer:
        assert seen.path == "/identity/v2.0/tokens"
        access = {
            "token": {"id": "v2-token", "expires": EXPIRES},
            "user": {"id": "u-1", "name": "alice"},
            "serviceCatalog": [
                {
                    "type": "object-store",
                    "endpoints": [{"region": "RegionOne", "publicURL": "https://v2/AUTH_t"}],
                }
            ],
        }
        return Answer(200, {"access": access})

    server.answer = answer
    hook = keystone_hook(monkeypatch, server, {"auth_version": "2", "project_name": "tenant"})
    assert hook.get_auth() == ("https://v2/AUTH_t", "v2-token")
    assert server.seen[0].body == {
        "auth": {"passwordCredentials": {"username": "alice", "password": PASSWORD}, "tenantName": "tenant"}
    }


def test_keystone_needs_a_project(monkeypatch: pytest.MonkeyPatch, server: ScriptedServer) -> None:
    hook = keystone_hook(monkeypatch, server, {"domain_name": "Default"})
    with pytest.raises(CredentialsError, match="set project_id or project_name"):
        hook.get_auth()
    assert server.seen == []


@pytest.mark.parametrize(
    ("answer", "error", "expected"),
    [
        (Answer(200, b"<html>not keystone</html>"), CredentialsError, "did not answer with JSON"),
        (Answer(201, {"token": {}}), CredentialsError, "answered without a token and catalog"),
        (Answer(404, {"error": {}}), CredentialsError, "is not a Swift auth v3 endpoint (HTTP 404"),
        (Answer(500, {"error": {}}), DataLoadError, "failed: HTTP 500"),
    ],
)
def test_keystone_failures(
    monkeypatch: pytest.MonkeyPatch,
    server: ScriptedServer,
    answer: Answer,
    error: type[Exception],
    expected: str,
) -> None:
    server.answer = lambda seen: answer
    hook = keystone_hook(monkeypatch, server, {"project_id": "p"}, retries=0)
    with pytest.raises(error) as info:
        hook.get_auth()
    assert type(info.value) is error
    assert expected in str(info.value)


def test_keystone_unreachable_is_s302(monkeypatch: pytest.MonkeyPatch, server: ScriptedServer) -> None:
    url = server.url
    server.close()  # nothing listens on the port any more
    set_connection(
        monkeypatch, "swift_gone", host=f"{url}/v3", login="u", password=PASSWORD, extra={"project_id": "p"}
    )
    with pytest.raises(DataLoadError) as info:
        SwiftHook("swift_gone", retries=0).get_auth()
    assert info.value.code == "S302"
    assert str(info.value) == f"cannot reach {url}/v3: [Errno 111] Connection refused"


def test_keystone_config_repr_hides_the_password() -> None:
    config = SwiftAuthConfig(
        auth_url="https://k/v3", auth_version="3", user="u", password=PASSWORD, source="s"
    )
    assert PASSWORD not in repr(config)


# --- provider metadata ------------------------------------------------------------------------------


def test_provider_info_declares_the_swift_connection_type() -> None:
    info = get_provider_info()
    (swift,) = [c for c in info["connection-types"] if c["connection-type"] == "swift"]
    module_name, _, class_name = swift["hook-class-name"].rpartition(".")
    module = __import__(module_name, fromlist=[class_name])
    hook_class = getattr(module, class_name)
    assert hook_class is SwiftHook
    assert swift["hook-name"] == SwiftHook.hook_name
    assert SwiftHook.conn_type == "swift"
    fields = swift["conn-fields"]
    assert {"auth_version", "project_id", "project_name", "domain_name", "region_name"} <= set(fields)
    assert all(spec["label"] and spec["description"] for spec in fields.values())
    # every extra the hook reads is declared (the alias "region" aside)
    from airflow_wmltrain.hooks.swift import EXTRA_KEYS

    assert set(fields) == EXTRA_KEYS - {"region"}
    behaviour = swift["ui-field-behaviour"]
    assert behaviour["relabeling"] == {"host": "Auth URL", "login": "User", "password": "Password / API key"}
    assert "password" not in behaviour["hidden-fields"]  # Airflow masks the standard password field
    assert set(behaviour["hidden-fields"]) == {"schema", "port"}
    # no extra field holds a secret: the password stays in the (masked) password field
    assert not any("password" in name or "key" in name or "secret" in name for name in fields)
    assert {"integration-name": "WML Train", "python-modules": ["airflow_wmltrain.hooks.swift"]} in info[
        "hooks"
    ]


def test_airflow_registers_the_swift_hook_and_its_form() -> None:
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    hook = ProvidersManagerTaskRuntime().hooks["swift"]
    assert hook is not None
    assert (hook.hook_class_name, hook.connection_id_attribute_name, hook.hook_name) == (
        "airflow_wmltrain.hooks.swift.SwiftHook",
        "swift_conn_id",
        "OpenStack Swift",
    )
    assert hook.connection_testable
    manager = ProvidersManager()  # the API server's view: the connection form
    behaviour = manager.field_behaviours["swift"]
    assert behaviour["relabeling"]["password"] == "Password / API key"
    assert behaviour["hidden_fields"] == ["schema", "port"]
    widget = manager.connection_form_widgets["extra__swift__auth_version"]
    assert widget.field["schema"]["title"] == "Auth version"
    assert not widget.is_sensitive


def test_inline_credentials_read_as_the_airflow_connection_holding_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One mapping: inline credentials and the connection ``to_airflow_connection`` makes of them agree."""
    credentials = inline(
        "https://identity.example.com", region="dallas", domain_name="1026873", project_id="p1"
    )
    body = credentials.to_airflow_connection("moved_swift")
    del body["connection_id"]
    monkeypatch.setenv("AIRFLOW_CONN_MOVED_SWIFT", json.dumps(body))
    inline_config = SwiftHook(credentials=credentials).auth_config
    connection_config = SwiftHook("moved_swift").auth_config
    assert replace(inline_config, source="") == replace(connection_config, source="")
    assert inline_config.region_name == "dallas"
    assert inline_config.user_domain_name == inline_config.project_domain_name == "1026873"
