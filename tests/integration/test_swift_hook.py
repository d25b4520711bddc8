"""SwiftHook against the real Swift all-in-one (tempauth, auth v1) of scripts/services.

Keystone (a real one, from Debian's package) is tested end to end in tests/integration/test_keystone.py.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
import uuid
from typing import Any
from urllib.parse import quote

import pytest
import swiftclient
from pydantic import SecretStr

from airflow_wmltrain.errors import CredentialsError, DataLoadError
from airflow_wmltrain.hooks.swift import SwiftHook
from airflow_wmltrain.manifest import SwiftConnection

WRONG_PASSWORD = "Wrong-It-pa55word-0123456789abcdef"


def http(method: str, url: str, token: str, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers={"X-Auth-Token": token})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def inline_credentials(store_credentials: dict[str, str]) -> SwiftConnection:
    return SwiftConnection(
        auth_url=store_credentials["swift_auth_url"],
        user_name=store_credentials["user"],
        password=SecretStr(store_credentials["key"]),
    )


@pytest.fixture
def airflow_conn_id(store_credentials: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow connection given as an AIRFLOW_CONN_ environment variable (JSON)."""
    conn_id = f"wmltrain_it_swift_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        json.dumps(
            {
                "conn_type": "swift",
                "host": store_credentials["swift_auth_url"],
                "login": store_credentials["user"],
                "password": store_credentials["key"],
            }
        ),
    )
    return conn_id


def check_token_works(
    storage_url: str, token: str, bucket: str, swift_connection: swiftclient.Connection
) -> None:
    """PUT then GET an object with plain HTTP on the storage URL; swiftclient's own connection sees it."""
    key = f"hook-check/{uuid.uuid4().hex}.txt"
    payload = f"written with the hook's token {uuid.uuid4()}".encode()
    status, _ = http("PUT", f"{storage_url}/{bucket}/{key}", token, payload)
    assert status == 201
    assert http("GET", f"{storage_url}/{bucket}/{key}", token) == (200, payload)
    _, body = swift_connection.get_object(bucket, key)
    assert body == payload
    status, listing = http("GET", f"{storage_url}/{bucket}?format=json", token)
    assert status == 200
    assert key in [item["name"] for item in json.loads(listing)]
    # the token is what grants access
    assert http("GET", f"{storage_url}/{bucket}/{key}", "AUTH_tk-not-a-token")[0] == 401


def test_inline_credentials_authenticate(
    inline_credentials: SwiftConnection, bucket: str, swift_connection: swiftclient.Connection
) -> None:
    hook = SwiftHook(credentials=inline_credentials)
    storage_url, token = hook.get_auth()
    assert storage_url.startswith("http://127.0.0.1:18080/v1/AUTH_")
    check_token_works(storage_url, token, bucket, swift_connection)
    assert hook.get_auth() == (storage_url, token)  # cached
    # the swiftclient connection is authenticated too
    names = [c["name"] for c in hook.get_conn().get_account(full_listing=True)[1]]
    assert bucket in names


def test_airflow_connection_from_environment_authenticates(
    airflow_conn_id: str, bucket: str, swift_connection: swiftclient.Connection
) -> None:
    hook = SwiftHook(airflow_conn_id)
    storage_url, token = hook.get_auth()
    check_token_works(storage_url, token, bucket, swift_connection)
    assert hook.auth_config.auth_version == "1.0"


def test_airflow_connection_uri_with_explicit_version_authenticates(
    store_credentials: dict[str, str], monkeypatch: pytest.MonkeyPatch, bucket: str, swift_connection: Any
) -> None:
    uri = (
        f"swift://{quote(store_credentials['user'], safe='')}:{quote(store_credentials['key'], safe='')}"
        f"@{quote(store_credentials['swift_auth_url'], safe='')}?auth_version=1"
    )
    monkeypatch.setenv("AIRFLOW_CONN_WMLTRAIN_IT_SWIFT_URI", uri)
    storage_url, token = SwiftHook("wmltrain_it_swift_uri").get_auth()
    check_token_works(storage_url, token, bucket, swift_connection)


def test_refresh_auth_gives_a_working_token(
    inline_credentials: SwiftConnection, bucket: str, swift_connection: swiftclient.Connection
) -> None:
    hook = SwiftHook(credentials=inline_credentials)
    _, first = hook.get_auth()
    storage_url, token = hook.refresh_auth(stale_token=first)
    check_token_works(storage_url, token, bucket, swift_connection)


def test_wrong_password_is_c103_without_any_password(
    store_credentials: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    credentials = SwiftConnection(
        auth_url=store_credentials["swift_auth_url"],
        user_name=store_credentials["user"],
        password=SecretStr(WRONG_PASSWORD),
    )
    hook = SwiftHook(credentials=credentials)
    with caplog.at_level(logging.DEBUG), pytest.raises(CredentialsError) as info:
        hook.get_auth()
    message = str(info.value)
    assert info.value.code == "C103"
    assert message == (
        f"Swift authentication refused at {store_credentials['swift_auth_url']} for user "
        f"'{store_credentials['user']}' (HTTP 401 Unauthorized); check the user name and password "
        "(the manifest's inline Swift credentials)"
    )
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__  # the swiftclient exception is not chained
    for text in (message, repr(info.value), json.dumps(info.value.to_dict()), caplog.text):
        assert WRONG_PASSWORD[:8] not in text
    ok, text = hook.test_connection()
    assert not ok
    assert text == message


def test_swiftclient_logs_show_no_part_of_the_token(
    inline_credentials: SwiftConnection, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="swiftclient"):
        _, token = SwiftHook(credentials=inline_credentials).get_auth()
    assert "X-Auth-Token" in caplog.text  # swiftclient did log the response headers
    assert token[:10] not in caplog.text  # python-swiftclient alone logs the first 16 characters


def test_unreachable_endpoint_is_s302(store_credentials: dict[str, str]) -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}/auth/v1.0"
    credentials = SwiftConnection(
        auth_url=url, user_name=store_credentials["user"], password=SecretStr(store_credentials["key"])
    )
    hook = SwiftHook(credentials=credentials, retries=0)
    with pytest.raises(DataLoadError) as info:
        hook.get_auth()
    assert info.value.code == "S302"
    assert str(info.value) == f"cannot reach {url}: [Errno 111] Connection refused"
    ok, text = hook.test_connection()
    assert not ok
    assert text == str(info.value)


def test_wrong_auth_path_is_c103(store_credentials: dict[str, str]) -> None:
    values = {
        "auth_url": "http://127.0.0.1:18080/not-auth",
        "user_name": store_credentials["user"],
        "password": SecretStr(store_credentials["key"]),
    }
    # a URL without a v1 path is taken for a bare Keystone URL, which needs a project
    with pytest.raises(CredentialsError) as info:
        SwiftHook(credentials=SwiftConnection(**values), retries=0).get_auth()
    assert "Keystone v3 at http://127.0.0.1:18080/not-auth/v3 needs a project" in str(info.value)
    assert "end the auth URL with /auth/v1.0 or set auth_version 1" in str(info.value)
    # with one, Swift itself answers the Keystone request
    with pytest.raises(CredentialsError) as info:
        SwiftHook(credentials=SwiftConnection(**values, project_id="p"), retries=0).get_auth()
    assert "http://127.0.0.1:18080/not-auth/v3 is not a Swift auth v3 endpoint (HTTP 4" in str(info.value)
    assert store_credentials["key"] not in str(info.value)


def test_test_connection(inline_credentials: SwiftConnection, airflow_conn_id: str) -> None:
    ok, text = SwiftHook(credentials=inline_credentials).test_connection()
    assert ok, text
    assert "storage URL http://127.0.0.1:18080/v1/AUTH_" in text
    ok, text = SwiftHook(airflow_conn_id).test_connection()
    assert ok, text
    assert inline_credentials.password.get_secret_value() not in text
