"""Swift behind a real Keystone v3 (issue 13 item 2): passwords, application credentials, tokens that
expire or are revoked while a run transfers.

Real parts, all Debian packages that ``scripts/services up`` installs: Keystone (``keystone``, on SQLite,
Fernet tokens that live ``TOKEN_LIFE_S`` seconds, served by its own WSGI script), and a second Swift proxy
on the services' rings whose pipeline validates Keystone tokens (``keystonemiddleware``'s ``authtoken``,
no token cache, and Swift's ``keystoneauth``).  keystoneauth renews a token when it has less than two
minutes left, so with tokens of ``TOKEN_LIFE_S`` = 125 s a run renews every few seconds: the renewal the
provider relies on happens inside one test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_wmltrain.errors import CredentialsError
from airflow_wmltrain.manifest import ConnectionId, StoreReference
from airflow_wmltrain.storage import open_store
from airflow_wmltrain.storage.transfer import RetryPolicy
from tests.integration.service_helpers import free_port, stop_process

pytestmark = pytest.mark.integration

SYS_PY = "/usr/bin/python3"  # Debian's: keystone, swift and keystonemiddleware are its packages
TOKEN_LIFE_S = 125
ADMIN_PASSWORD = "keystone-admin-" + uuid.uuid4().hex[:8]
ALICE_PASSWORD = "alice-" + uuid.uuid4().hex[:12]
SWIFT_PASSWORD = "swift-" + uuid.uuid4().hex[:12]


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args} exited: {log.read_text(errors='replace')[-3000:]}", pytrace=False)
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} does not answer: {log.read_text(errors='replace')[-3000:]}", pytrace=False)


class Keystone:
    """A Keystone of our own and the admin's REST calls (keystoneauth, as the provider speaks it)."""

    def __init__(self, url: str) -> None:
        from keystoneauth1 import session
        from keystoneauth1.identity import v3

        self.url = url
        auth = v3.Password(
            f"{url}/v3",
            username="admin",
            password=ADMIN_PASSWORD,
            user_domain_id="default",
            project_name="admin",
            project_domain_id="default",
        )
        self.admin = session.Session(auth=auth)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return dict(self.admin.post(f"{self.url}/v3{path}", json=body).json())

    def put(self, path: str) -> None:
        self.admin.put(f"{self.url}/v3{path}")

    def find(self, kind: str, name: str) -> str:
        found = self.admin.get(f"{self.url}/v3/{kind}", params={"name": name}).json()[kind]
        return str(found[0]["id"])

    def revoke(self, token: str) -> None:
        self.admin.delete(f"{self.url}/v3/auth/tokens", headers={"X-Subject-Token": token})

    def issued(self, log: Path) -> int:
        """Tokens issued so far (Keystone's access log: each ``POST /v3/auth/tokens``)."""
        return log.read_text(errors="replace").count("POST /v3/auth/tokens")


@pytest.fixture(scope="module")
def keystone_swift(
    services: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Keystone and a Keystone-guarded Swift proxy: ``{"auth_url", "project_id", "app_id", "app_secret",
    "keystone", "keystone_log"}``."""
    for tool in ("keystone-manage", "keystone-wsgi-public", "swift-proxy-server"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/services up", pytrace=False)
    home = tmp_path_factory.mktemp("keystone")
    kport, sport = free_port(), free_port()
    kurl = f"http://127.0.0.1:{kport}"
    conf = home / "keystone.conf"
    conf.write_text(
        f"[DEFAULT]\nlog_file = {home / 'keystone-app.log'}\n"
        f"[database]\nconnection = sqlite:///{home / 'keystone.db'}\n"
        f"[token]\nprovider = fernet\nexpiration = {TOKEN_LIFE_S}\n"
        f"[fernet_tokens]\nkey_repository = {home / 'fernet-keys'}\n"
        f"[fernet_receipts]\nkey_repository = {home / 'fernet-keys'}\n"
        f"[credential]\nkey_repository = {home / 'credential-keys'}\n"
    )

    def manage(*args: str) -> None:
        done = subprocess.run(
            [SYS_PY, shutil.which("keystone-manage") or "", "--config-file", str(conf), *args],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"keystone-manage {args[0]}: {done.stderr[-3000:]}"

    manage("db_sync")
    # WAL: a request's write does not wait for a read another of Keystone's connections left open
    import sqlite3

    with sqlite3.connect(home / "keystone.db") as db:
        db.execute("PRAGMA journal_mode=WAL")
    manage("fernet_setup", "--keystone-user", "root", "--keystone-group", "root")
    manage("credential_setup", "--keystone-user", "root", "--keystone-group", "root")
    manage(
        "bootstrap",
        "--bootstrap-password", ADMIN_PASSWORD,
        "--bootstrap-admin-url", f"{kurl}/v3/",
        "--bootstrap-public-url", f"{kurl}/v3/",
        "--bootstrap-internal-url", f"{kurl}/v3/",
        "--bootstrap-region-id", "RegionOne",
    )  # fmt: skip
    klog = home / "keystone.log"
    keystone_process = subprocess.Popen(
        [SYS_PY, shutil.which("keystone-wsgi-public") or "", "--host", "127.0.0.1", "--port", str(kport),
         "--", "--config-file", str(conf)],
        stdout=klog.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    proxy_process = None
    try:
        _wait_http(f"{kurl}/v3", keystone_process, klog)
        keystone = Keystone(kurl)
        service_project = keystone.post("/projects", {"project": {"name": "service", "domain_id": "default"}})
        project = keystone.post("/projects", {"project": {"name": "wmltrain", "domain_id": "default"}})
        project_id = project["project"]["id"]
        member = keystone.find("roles", "member")
        admin_role = keystone.find("roles", "admin")
        alice = keystone.post(
            "/users", {"user": {"name": "alice", "domain_id": "default", "password": ALICE_PASSWORD}}
        )["user"]["id"]
        swift_user = keystone.post(
            "/users", {"user": {"name": "swift", "domain_id": "default", "password": SWIFT_PASSWORD}}
        )["user"]["id"]
        keystone.put(f"/projects/{project_id}/users/{alice}/roles/{member}")
        keystone.put(f"/projects/{service_project['project']['id']}/users/{swift_user}/roles/{admin_role}")
        service = keystone.post("/services", {"service": {"type": "object-store", "name": "swift"}})
        for interface in ("public", "internal"):
            keystone.post(
                "/endpoints",
                {
                    "endpoint": {
                        "service_id": service["service"]["id"],
                        "interface": interface,
                        "region_id": "RegionOne",
                        "url": f"http://127.0.0.1:{sport}/v1/AUTH_$(project_id)s",
                    }
                },
            )
        # alice's application credential (made with her own token, as a user does)
        from keystoneauth1 import session
        from keystoneauth1.identity import v3

        alice_session = session.Session(
            auth=v3.Password(
                f"{kurl}/v3", username="alice", password=ALICE_PASSWORD, user_domain_id="default",
                project_id=project_id,
            )
        )  # fmt: skip
        credential = alice_session.post(
            f"{kurl}/v3/users/{alice}/application_credentials",
            json={"application_credential": {"name": f"wmltrain-{uuid.uuid4().hex[:6]}"}},
        ).json()["application_credential"]

        swift_etc = Path(services["WMLTRAIN_SERVICES_DIR"]) / "swift" / "etc"
        proxy_conf = home / "proxy-server.conf"
        proxy_conf.write_text(
            f"""[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {sport}
workers = 0
user = root
swift_dir = {swift_etc}
log_name = keystone-proxy

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats authtoken keystoneauth
    copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
www_authenticate_uri = {kurl}/v3
auth_url = {kurl}
auth_type = password
username = swift
password = {SWIFT_PASSWORD}
project_name = service
user_domain_id = default
project_domain_id = default
delay_auth_decision = True
token_cache_time = -1
include_service_catalog = False

[filter:keystoneauth]
use = egg:swift#keystoneauth
operator_roles = admin, member

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:18211

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
"""
        )
        plog = home / "proxy.log"
        proxy_process = subprocess.Popen(
            [SYS_PY, shutil.which("swift-proxy-server") or "", str(proxy_conf)],
            stdout=plog.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        _wait_http(f"http://127.0.0.1:{sport}/healthcheck", proxy_process, plog)
        yield {
            "auth_url": f"{kurl}/v3",
            "project_id": project_id,
            "app_id": credential["id"],
            "app_secret": credential["secret"],
            "keystone": keystone,
            "keystone_log": klog,
        }
    finally:
        if proxy_process is not None:
            stop_process(proxy_process)
        stop_process(keystone_process)


def _connection(monkeypatch: pytest.MonkeyPatch, **fields: Any) -> ConnectionId:
    conn_id = f"ks_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "swift", **fields}))
    return ConnectionId(conn_id=conn_id)


def _password(monkeypatch: pytest.MonkeyPatch, ks: dict[str, Any]) -> ConnectionId:
    return _connection(
        monkeypatch, host=ks["auth_url"], login="alice", password=ALICE_PASSWORD,
        extra={"project_id": ks["project_id"], "region_name": "RegionOne"},
    )  # fmt: skip


def _app_credential(monkeypatch: pytest.MonkeyPatch, ks: dict[str, Any], secret: str) -> ConnectionId:
    return _connection(
        monkeypatch, host=ks["auth_url"], password=secret,
        extra={"auth_type": "v3applicationcredential", "application_credential_id": ks["app_id"]},
    )  # fmt: skip


def _store(connection: ConnectionId, container: str) -> Any:
    reference = StoreReference(type="swift", bucket=container, connection=connection)
    return open_store(reference, retry=RetryPolicy(attempts=3, base_delay=0.1))


def test_a_password_reaches_the_projects_swift_through_keystone(
    keystone_swift: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    container = f"ks-{uuid.uuid4().hex[:8]}"
    with _store(_password(monkeypatch, keystone_swift), container) as store:
        store.request("PUT", "")
        store.put_bytes("a.txt", b"alpha")
        assert store.get_bytes("a.txt") == b"alpha"
        assert f"AUTH_{keystone_swift['project_id']}" in store.endpoint


def test_an_application_credential_reaches_swift_and_a_wrong_secret_is_c103(
    keystone_swift: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    container = f"ks-{uuid.uuid4().hex[:8]}"
    with _store(
        _app_credential(monkeypatch, keystone_swift, keystone_swift["app_secret"]), container
    ) as store:
        store.request("PUT", "")
        store.put_bytes("b.txt", b"beta")
        assert [info.key for info in store.list_objects()] == ["b.txt"]
    wrong = _app_credential(monkeypatch, keystone_swift, "not-the-secret")
    with _store(wrong, container) as store, pytest.raises(CredentialsError) as caught:
        store.check_bucket()
    assert "refused" in str(caught.value)
    assert "not-the-secret" not in str(caught.value)


def test_a_token_is_renewed_before_it_expires_while_a_run_transfers(
    keystone_swift: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens live TOKEN_LIFE_S s and keystoneauth renews those with less than 120 s left: over ten
    seconds of transfers, new tokens come in, and no request is refused."""
    container = f"ks-{uuid.uuid4().hex[:8]}"
    with _store(
        _app_credential(monkeypatch, keystone_swift, keystone_swift["app_secret"]), container
    ) as store:
        store.request("PUT", "")
        tokens = set()
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < 12:
            store.put_bytes(f"obj-{n}", str(n).encode())
            assert store.get_bytes(f"obj-{n}") == str(n).encode()
            tokens.add(store.auth.get()[1])
            n += 1
            time.sleep(0.5)
    assert len(tokens) >= 2, "the token was not renewed"


def test_a_token_revoked_mid_run_is_replaced_and_the_transfer_goes_on(
    keystone_swift: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    container = f"ks-{uuid.uuid4().hex[:8]}"
    with _store(_password(monkeypatch, keystone_swift), container) as store:
        store.request("PUT", "")
        store.put_bytes("before", b"1")
        revoked = store.auth.get()[1]
        keystone_swift["keystone"].revoke(revoked)
        store.put_bytes("after", b"2")  # Swift answers 401 to the revoked token: a new one, once
        assert store.auth.get()[1] != revoked
        assert store.get_bytes("after") == b"2"
