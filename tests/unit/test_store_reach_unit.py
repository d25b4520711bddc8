"""Reaching stores: proxies, CAs, AWS endpoints and regions, S3 error codes (pure logic; the real TLS
terminator, proxy and region redirect are in tests/integration/test_store_reach.py)."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from airflow_wmltrain.manifest import S3Connection, SwiftConnection
from airflow_wmltrain.storage.transfer import Reach, RetryPolicy, TransferError, with_retries


def test_the_proxy_comes_from_the_environment_and_no_proxy_is_respected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "internal.corp,.lan")
    reach = Reach()
    assert reach.proxy_for("https", "s3.amazonaws.com") == ("proxy.corp:3128", None)
    assert reach.proxy_for("http", "s3.amazonaws.com") is None  # no HTTP_PROXY
    assert reach.proxy_for("https", "internal.corp:443") is None
    assert reach.proxy_for("https", "store.lan") is None


def test_a_proxy_with_credentials_sends_them_as_proxy_authorization() -> None:
    reach = Reach(proxies={"http": "http://me:s%40cret@10.0.0.1"})
    netloc, authorization = reach.proxy_for("http", "store:8080")  # type: ignore[misc]
    assert netloc == "10.0.0.1:80"
    assert authorization == "Basic " + base64.b64encode(b"me:s@cret").decode()


def test_a_connections_proxies_replace_the_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://env-proxy:3128")
    assert Reach(proxies={"http": "http://p:1"}).proxy_for("https", "s3") is None
    assert Reach(proxies={"https": "http://p:1"}).proxy_for("https", "s3") == ("p:1", None)


def test_an_unreadable_ca_bundle_fails_naming_it_and_where_to_give_the_ca(tmp_path: Any) -> None:
    with pytest.raises(TransferError) as caught:
        Reach(verify=str(tmp_path / "missing.pem"), hint="give it here").ssl_context()
    assert "missing.pem" in str(caught.value)
    assert "give it here" in str(caught.value)
    assert caught.value.transient is False
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(TransferError):
        Reach(ca_pem=(tmp_path / "junk.pem").read_text()).ssl_context()


def test_verify_false_checks_no_certificate() -> None:
    import ssl

    context = Reach(verify=False).ssl_context()
    assert context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname


def test_aws_endpoints_come_from_botocore() -> None:
    from airflow_wmltrain.storage.s3 import aws_endpoint

    assert aws_endpoint("cn-north-1") == "https://s3.cn-north-1.amazonaws.com.cn"
    assert aws_endpoint("us-east-1", fips=True) == "https://s3-fips.us-east-1.amazonaws.com"
    assert aws_endpoint("eu-west-3", dualstack=True) == "https://s3.dualstack.eu-west-3.amazonaws.com"


def test_aws_reach_reads_verify_like_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_wmltrain.storage.s3 import aws_reach

    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/corp-ca.pem")
    assert aws_reach(None).verify == "/etc/corp-ca.pem"
    assert aws_reach("False").verify is False
    assert aws_reach("/other.pem").verify == "/other.pem"
    monkeypatch.delenv("AWS_CA_BUNDLE")
    assert aws_reach(None).verify is True


def _store(region: str | None = None, endpoint_url: str | None = None) -> Any:
    from airflow_wmltrain.storage.s3 import S3Store
    from airflow_wmltrain.storage.sigv4 import Credentials

    return S3Store(
        "data", credentials=lambda: Credentials("a", "b"), region=region, endpoint_url=endpoint_url
    )


def test_a_store_on_aws_follows_the_bucket_to_its_region() -> None:
    store = _store("us-east-1")
    assert store.endpoint == "https://s3.us-east-1.amazonaws.com"
    moved = TransferError("x", transient=False, status=301, bucket_region="cn-north-1")
    assert store.redirected(moved)
    assert store.region == "cn-north-1"
    assert store.endpoint == "https://s3.cn-north-1.amazonaws.com.cn"
    assert "data.s3.cn-north-1.amazonaws.com.cn" in store.sign("GET", "k").url
    assert not store.redirected(moved)  # already there
    assert not store.redirected(TransferError("x", transient=False, status=403, bucket_region="eu-west-1"))


def test_a_custom_endpoint_keeps_its_url_and_changes_only_the_signing_region() -> None:
    store = _store("eu-west-3", endpoint_url="http://minio:9000")
    assert store.redirected(TransferError("x", transient=False, status=400, bucket_region="us-east-1"))
    assert store.endpoint == "http://minio:9000"
    assert store.region == "us-east-1"


def test_an_unknown_region_is_refused_with_the_field_to_fix() -> None:
    from airflow_wmltrain.errors import CredentialsError

    with pytest.raises(CredentialsError, match="region"):
        _store("mars-north-1")


class _Store:
    def __init__(self) -> None:
        self.refreshed = 0

    def refresh_credentials(self) -> None:
        self.refreshed += 1

    def redirected(self, error: TransferError) -> bool:
        return False


def test_an_expired_token_answer_renews_the_credentials_once() -> None:
    store = _Store()
    answers: list[Any] = [TransferError("e", transient=False, status=400, error_code="ExpiredToken"), "ok"]

    def action() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    assert with_retries(store, RetryPolicy(attempts=1), action, on_retry=lambda err: None) == "ok"  # type: ignore[arg-type]
    assert store.refreshed == 1


def test_s3_error_codes_decide_retries_and_regions() -> None:
    from airflow_wmltrain.storage.transfer import _status_error

    class Response:
        def __init__(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.status, self.body, self.reason = status, body, "Reason"
            self.headers = headers or {}

        def read(self) -> bytes:
            return self.body

        def getheaders(self) -> list[tuple[str, str]]:
            return list(self.headers.items())

    class Store:
        def describe(self, key: str) -> str:
            return f"s3 http://x b/{key}"

    def error(status: int, body: bytes, headers: dict[str, str] | None = None) -> TransferError:
        return _status_error(Store(), "k", Response(status, body, headers), "GET")  # type: ignore[arg-type]

    assert error(400, b"<Error><Code>RequestTimeout</Code></Error>").transient
    assert not error(400, b"<Error><Code>InvalidArgument</Code></Error>").transient
    expired = error(400, b"<Error><Code>ExpiredToken</Code></Error>")
    assert expired.credentials_expired
    assert "expired" in str(expired)
    moved = error(301, b"", {"x-amz-bucket-region": "eu-west-1"})
    assert moved.bucket_region == "eu-west-1"
    assert "region eu-west-1" in str(moved)
    wrong = error(400, b"<Error><Code>AuthorizationHeaderMalformed</Code><Region>us-east-1</Region></Error>")
    assert wrong.bucket_region == "us-east-1"
    assert not wrong.transient


def test_inline_credentials_take_a_region_and_a_ca_as_pem_never_a_path() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    conn = S3Connection(
        aws_access_key_id="a", aws_secret_access_key="b", region="eu-west-3", ca_certificate=pem
    )
    assert conn.airflow_fields()["extra"] == {"region_name": "eu-west-3", "ca_certificate": pem.strip()}
    for model, fields in (
        (S3Connection, {"aws_access_key_id": "a", "aws_secret_access_key": "b"}),
        (SwiftConnection, {"auth_url": "https://k/v3", "user_name": "u", "password": "p"}),
    ):
        with pytest.raises(ValueError, match="not PEM text"):
            model(**fields, ca_certificate="/etc/ssl/private/worker.key")


def test_a_swift_connections_trust_is_the_stores_trust() -> None:
    from airflow_wmltrain.hooks.swift import SwiftHook

    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    inline = SwiftConnection(
        auth_url="https://k/v3", user_name="u", password="p", project_id="x", ca_certificate=pem
    )
    hook = SwiftHook(None, credentials=inline)
    assert hook.reach.ca_pem == pem.strip()
    assert hook.reach.verify is True
    assert "cacert" in hook.reach.hint


def test_an_aws_connections_session_is_made_once_and_again_only_after_a_refusal() -> None:
    from types import SimpleNamespace

    from airflow_wmltrain.storage.s3 import HookCredentials

    sessions: list[int] = []
    frozen = SimpleNamespace(access_key="AKIA", secret_key="secret-key-1", token="session-token-1")

    class Hook:
        aws_conn_id = "aws_role"

        def get_session(self) -> Any:  # with a role_arn, each new session is an STS AssumeRole
            sessions.append(1)
            return SimpleNamespace(
                get_credentials=lambda: SimpleNamespace(get_frozen_credentials=lambda: frozen)
            )

    credentials = HookCredentials(Hook())  # type: ignore[arg-type]
    for _ in range(5):
        assert credentials().token == "session-token-1"
    assert len(sessions) == 1
    credentials.forget()
    credentials()
    assert len(sessions) == 2


def test_the_status_trigger_keeps_its_store_between_looks_and_drops_it_after_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow_wmltrain.triggers import training_run as module

    opened: list[Any] = []

    class Store:
        closed = False

        def close(self) -> None:
            self.closed = True

    def open_store(reference: Any) -> Store:
        opened.append(Store())
        return opened[-1]

    answers: list[Any] = [None, None, TransferError("down", transient=True), None]

    def read_status(store: Any, training_id: str) -> None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer

    monkeypatch.setattr(module, "open_store", open_store)
    monkeypatch.setattr(module, "read_status", read_status)
    trigger = module.TrainingStatusTrigger(
        training_id="training-x", results={"type": "s3", "bucket": "b", "conn_id": "c"}, poll_interval=1
    )
    assert trigger.look() == "no status yet"
    assert trigger.look() == "no status yet"
    assert len(opened) == 1
    with pytest.raises(module.LookFailed):
        trigger.look()
    trigger.after_failure()
    assert opened[0].closed
    assert trigger.look() == "no status yet"
    assert len(opened) == 2
