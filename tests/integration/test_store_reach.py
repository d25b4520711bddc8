"""Stores where enterprises keep them: behind a TLS terminator with a private CA, behind an HTTP proxy,
in another region than the connection says (issue 13, items 1 and 3).

Real parts: ``stunnel4`` terminates TLS in front of the services' Swift S3 API with a certificate of a
CA made here (``openssl``); ``tinyproxy`` is the proxy, and its log shows what went through it.  Both
are Debian packages that ``scripts/services up`` installs; each test module starts its own on free
loopback ports.  The bucket is in ``us-east-1`` (s3api's ``location``), so a connection that says
``eu-west-3`` gets s3api's ``AuthorizationHeaderMalformed`` with ``<Region>us-east-1</Region>``: the
answer AWS gives too.

Swift behind the terminator is a second Swift proxy on the services' rings whose tempauth hands out
``https`` storage URLs (``storage_url_scheme``), with ``stunnel4`` in front of it: the auth request and
every GET/PUT of the store then go through TLS, as behind a real load balancer.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from airflow_wmltrain.errors import DataLoadError
from airflow_wmltrain.manifest import ConnectionId, S3Connection, StoreReference, SwiftConnection
from airflow_wmltrain.storage import open_store
from airflow_wmltrain.storage.transfer import RetryPolicy, TransferError
from tests.integration.service_helpers import free_port, stop_process

pytestmark = pytest.mark.integration


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited: {log.read_text(errors='replace')[-2000:]}", pytrace=False)
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"{process.args[0]} does not listen on {port}", pytrace=False)


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA of our own and a certificate it signed for 127.0.0.1 (no system trusts it)."""
    where = tmp_path_factory.mktemp("ca")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=where, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=wmltrain test CA",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr")  # fmt: skip
    (where / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.cnf", "-out", "server.pem")  # fmt: skip
    return {"ca": where / "ca.pem", "cert": where / "server.pem", "key": where / "server.key"}


def _stunnel(
    backend: str, private_ca: dict[str, Path], where: Path
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """``stunnel4`` terminating TLS on a free loopback port in front of ``backend`` (``host:port``)."""
    if shutil.which("stunnel4") is None:
        pytest.fail("stunnel4 is not installed: run scripts/services up", pytrace=False)
    port = free_port()
    log = where / "stunnel.log"
    config = where / "stunnel.conf"
    config.write_text(
        f"foreground = yes\npid =\ndebug = 6\noutput = {log}\n"
        f"[store]\naccept = 127.0.0.1:{port}\nconnect = {backend}\n"
        f"cert = {private_ca['cert']}\nkey = {private_ca['key']}\n"
    )
    process = subprocess.Popen(["stunnel4", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    _wait_for_port(port, process, log)
    return process, port, log


@pytest.fixture(scope="module")
def tls_endpoint(
    store_credentials: dict[str, str], private_ca: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """``stunnel4`` in front of the S3 API: ``{"url": https://127.0.0.1:<port>, "log": path}``."""
    backend = store_credentials["s3_endpoint"].split("://", 1)[1].rstrip("/")
    process, port, log = _stunnel(backend, private_ca, tmp_path_factory.mktemp("stunnel"))
    yield {"url": f"https://127.0.0.1:{port}", "log": log}
    stop_process(process)


@pytest.fixture(scope="module")
def swift_tls_endpoint(
    services: dict[str, str], private_ca: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Swift (v1 auth) behind ``stunnel4``: ``{"auth_url": https://127.0.0.1:<port>/auth/v1.0, "log": path}``.

    A second proxy of the services' Swift (same rings, account and memcache) whose tempauth builds
    ``https`` storage URLs from the Host the client sent, so the storage URL names the terminator too.
    """
    where = tmp_path_factory.mktemp("swift-tls")
    swift_etc = Path(services["WMLTRAIN_SERVICES_DIR"]) / "swift" / "etc"
    base = (swift_etc / "proxy-server.conf").read_text()
    proxy_port = free_port()
    conf, replaced = re.subn(r"(?m)^bind_port = .*$", f"bind_port = {proxy_port}", base)
    assert replaced == 1, "the services' proxy-server.conf has no bind_port line"
    conf = re.sub(r"(?m)^workers = .*$", "workers = 0", conf)
    conf = re.sub(r"(?m)^log_name = .*$", "log_name = proxy-tls", conf)
    conf, replaced = re.subn(
        r"(?m)^\[filter:tempauth\]$", "[filter:tempauth]\nstorage_url_scheme = https", conf
    )
    assert replaced == 1, "the services' proxy-server.conf has no tempauth"
    (where / "proxy-server.conf").write_text(conf)
    plog = where / "proxy.log"
    proxy = subprocess.Popen(
        ["/usr/bin/python3", shutil.which("swift-proxy-server") or "swift-proxy-server",
         str(where / "proxy-server.conf")],
        stdout=plog.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_for_port(proxy_port, proxy, plog)
        tunnel, port, log = _stunnel(f"127.0.0.1:{proxy_port}", private_ca, where)
        try:
            yield {"auth_url": f"https://127.0.0.1:{port}/auth/v1.0", "log": log}
        finally:
            stop_process(tunnel)
    finally:
        stop_process(proxy)


@pytest.fixture(scope="module")
def http_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``tinyproxy`` on loopback: ``{"url": http://127.0.0.1:<port>, "log": path}``."""
    if shutil.which("tinyproxy") is None:
        pytest.fail("tinyproxy is not installed: run scripts/services up", pytrace=False)
    where = tmp_path_factory.mktemp("tinyproxy")
    port = free_port()
    log = where / "tinyproxy.log"
    config = where / "tinyproxy.conf"
    config.write_text(
        f'Port {port}\nListen 127.0.0.1\nTimeout 60\nAllow 127.0.0.1\nLogFile "{log}"\nLogLevel Connect\n'
        "MaxClients 50\n"
    )
    process = subprocess.Popen(["tinyproxy", "-d", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)  # fmt: skip
    _wait_for_port(port, process, log)
    yield {"url": f"http://127.0.0.1:{port}", "log": log}
    stop_process(process)


@pytest.fixture
def tls_bucket(s3_client: Any) -> Iterator[str]:
    name = f"reach-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    yield name
    for item in s3_client.list_objects_v2(Bucket=name).get("Contents", []):
        s3_client.delete_object(Bucket=name, Key=item["Key"])
    s3_client.delete_bucket(Bucket=name)


def _aws_connection(monkeypatch: pytest.MonkeyPatch, creds: dict[str, str], **extra: Any) -> ConnectionId:
    conn_id = f"reach_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        json.dumps({"conn_type": "aws", "login": creds["user"], "password": creds["key"], "extra": extra}),
    )
    return ConnectionId(conn_id=conn_id)


def _round_trip(reference: StoreReference) -> None:
    with open_store(reference, retry=RetryPolicy(attempts=3, base_delay=0.05)) as store:
        store.check_bucket()
        store.put_bytes("hello.txt", b"through the looking glass")
        assert store.get_bytes("hello.txt") == b"through the looking glass"
        assert [info.key for info in store.list_objects()] == ["hello.txt"]


def _accepted(log: Path) -> int:
    return sum("accepted connection" in line for line in log.read_text(errors="replace").splitlines())


def _assert_one_handshake(log: Path, before: int) -> None:
    """One connection since ``before``: stunnel logs it after the failed handshake, so wait for that line,
    then as long as a retry's backoff would take."""
    deadline = time.monotonic() + 10
    while _accepted(log) - before < 1:
        assert time.monotonic() < deadline, "stunnel logged no connection"
        time.sleep(0.05)
    time.sleep(1.0)
    assert _accepted(log) - before == 1, "a certificate failure must not be retried"


def test_a_store_behind_a_private_ca_is_reached_with_the_aws_connections_ca_bundle(
    tls_endpoint: dict[str, Any], private_ca: dict[str, Path], store_credentials: dict[str, str],
    tls_bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    connection = _aws_connection(
        monkeypatch, store_credentials,
        endpoint_url=tls_endpoint["url"], region_name="us-east-1", verify=str(private_ca["ca"]),
    )  # fmt: skip
    _round_trip(StoreReference(type="s3", bucket=tls_bucket, connection=connection))


def test_aws_ca_bundle_names_the_ca_when_the_connection_does_not(
    tls_endpoint: dict[str, Any], private_ca: dict[str, Path], store_credentials: dict[str, str],
    tls_bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_CA_BUNDLE", str(private_ca["ca"]))
    connection = _aws_connection(monkeypatch, store_credentials, endpoint_url=tls_endpoint["url"])
    _round_trip(StoreReference(type="s3", bucket=tls_bucket, connection=connection))


@pytest.mark.parametrize("kind", ["s3", "swift"])
def test_inline_credentials_give_the_ca_as_pem_text(
    kind: Literal["s3", "swift"], request: pytest.FixtureRequest, private_ca: dict[str, Path],
    store_credentials: dict[str, str], tls_bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    pem = private_ca["ca"].read_text()
    user, key = store_credentials["user"], store_credentials["key"]
    inline: S3Connection | SwiftConnection
    if kind == "s3":
        url = request.getfixturevalue("tls_endpoint")["url"]
        inline = S3Connection(
            endpoint_url=url, aws_access_key_id=user, aws_secret_access_key=key, ca_certificate=pem
        )
    else:
        url = request.getfixturevalue("swift_tls_endpoint")["auth_url"]
        inline = SwiftConnection(auth_url=url, user_name=user, password=key, ca_certificate=pem)
    _round_trip(StoreReference(type=kind, bucket=tls_bucket, connection=inline))


def test_without_the_ca_the_store_fails_at_once_naming_the_endpoint_and_where_to_give_the_ca(
    tls_endpoint: dict[str, Any], store_credentials: dict[str, str], tls_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    connection = _aws_connection(monkeypatch, store_credentials, endpoint_url=tls_endpoint["url"])
    before = _accepted(tls_endpoint["log"])
    with (
        open_store(
            StoreReference(type="s3", bucket=tls_bucket, connection=connection), retry=RetryPolicy(attempts=5)
        ) as store,
        pytest.raises(TransferError) as caught,
    ):
        store.check_bucket()
    message = str(caught.value)
    host = tls_endpoint["url"].split("://", 1)[1]
    assert f"TLS certificate of {host} is not trusted" in message
    assert "verify" in message
    assert "AWS_CA_BUNDLE" in message
    assert "ca_certificate" in message
    assert caught.value.transient is False
    _assert_one_handshake(tls_endpoint["log"], before)


def test_https_goes_through_the_proxy_with_connect_and_no_proxy_is_respected(
    tls_endpoint: dict[str, Any], http_proxy: dict[str, Any], private_ca: dict[str, Path],
    store_credentials: dict[str, str], tls_bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    host = tls_endpoint["url"].split("://", 1)[1]
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", http_proxy["url"])
    connection = _aws_connection(
        monkeypatch, store_credentials, endpoint_url=tls_endpoint["url"], verify=str(private_ca["ca"])
    )
    reference = StoreReference(type="s3", bucket=tls_bucket, connection=connection)
    _round_trip(reference)
    tunnels = [line for line in http_proxy["log"].read_text().splitlines() if f"CONNECT {host}" in line]
    assert tunnels, "the proxy saw no CONNECT to the store"

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    seen = len(http_proxy["log"].read_text().splitlines())
    with open_store(reference) as store:
        store.check_bucket()
    assert all(host not in line for line in http_proxy["log"].read_text().splitlines()[seen:])


def test_plain_http_goes_through_the_proxy_named_by_the_connection(
    http_proxy: dict[str, Any], store_credentials: dict[str, str], tls_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    endpoint = store_credentials["s3_endpoint"].rstrip("/")
    connection = _aws_connection(
        monkeypatch, store_credentials,
        endpoint_url=endpoint, config_kwargs={"proxies": {"http": http_proxy["url"]}},
    )  # fmt: skip
    _round_trip(StoreReference(type="s3", bucket=tls_bucket, connection=connection))
    forwarded = [
        line for line in http_proxy["log"].read_text().splitlines() if f"{endpoint}/{tls_bucket}" in line
    ]
    assert forwarded, "the proxy forwarded no request of the store"


def test_a_bucket_in_another_region_than_the_connection_says_is_followed_there(
    store_credentials: dict[str, str], tls_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = _aws_connection(
        monkeypatch, store_credentials, endpoint_url=store_credentials["s3_endpoint"], region_name="eu-west-3"
    )
    reference = StoreReference(type="s3", bucket=tls_bucket, connection=connection)
    with open_store(reference, retry=RetryPolicy(attempts=1)) as store:
        store.check_bucket()
        assert store.region == "us-east-1"  # type: ignore[attr-defined]
        store.put_bytes("where.txt", b"here")
        assert store.get_bytes("where.txt") == b"here"


def _swift_connection(
    monkeypatch: pytest.MonkeyPatch, creds: dict[str, str], auth_url: str, **extra: Any
) -> ConnectionId:
    conn_id = f"reach_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        json.dumps({"conn_type": "swift", "host": auth_url, "login": creds["user"], "password": creds["key"],
                    "extra": extra}),
    )  # fmt: skip
    return ConnectionId(conn_id=conn_id)


def test_swift_behind_a_private_ca_authenticates_and_transfers_with_the_connections_cacert(
    swift_tls_endpoint: dict[str, Any], private_ca: dict[str, Path], store_credentials: dict[str, str],
    tls_bucket: str, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The issue's case: the auth path honoured ``cacert`` but every GET/PUT of the storage URL failed."""
    connection = _swift_connection(
        monkeypatch, store_credentials, swift_tls_endpoint["auth_url"], cacert=str(private_ca["ca"])
    )
    reference = StoreReference(type="swift", bucket=tls_bucket, connection=connection)
    before = _accepted(swift_tls_endpoint["log"])
    _round_trip(reference)
    with open_store(reference) as store:
        assert store.endpoint.startswith(swift_tls_endpoint["auth_url"].split("/auth/", 1)[0])
    # the auth request and the storage requests all came through the terminator
    assert _accepted(swift_tls_endpoint["log"]) - before >= 2


def test_swift_without_the_ca_fails_at_once_naming_where_to_give_it(
    swift_tls_endpoint: dict[str, Any], store_credentials: dict[str, str], tls_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    connection = _swift_connection(monkeypatch, store_credentials, swift_tls_endpoint["auth_url"])
    before = _accepted(swift_tls_endpoint["log"])
    reference = StoreReference(type="swift", bucket=tls_bucket, connection=connection)
    with (
        pytest.raises(DataLoadError) as caught,
        open_store(reference, retry=RetryPolicy(attempts=5)) as store,
    ):
        store.check_bucket()
    message = str(caught.value)
    assert f"cannot reach {swift_tls_endpoint['auth_url']}: TLS certificate verification failed" in message
    assert "cacert" in message
    assert "ca_certificate" in message
    _assert_one_handshake(swift_tls_endpoint["log"], before)
