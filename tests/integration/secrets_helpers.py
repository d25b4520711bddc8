"""Helpers of the secrets scan (issue 10, ``test_secrets_scan.py``): marker credentials, the encoded forms
in which a leak could hide, a relay that lets marker credentials into the services' object store, and the
readers of every place a run leaves text in (the metadata database with its encrypted trigger rows, the
Docker daemons' containers, the processes' command lines, files).

The services' store has one account (``test:tester`` / ``testing``, a common word that cannot be searched
for). The scan needs credentials that occur nowhere else, and runs that still reach the store with them:
:class:`ResigningRelay` stands between the product and the store, checks that each request is signed
with the marker keys (so the markers are what the product really used) and signs it again with the real
keys.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import hashlib
import hmac
import http.client
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote, urlsplit

import docker

# --- markers and their forms ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Marker:
    """One marker credential: ``name`` says which (e.g. ``inline secret key``), ``value`` is unique."""

    name: str
    value: str


def new_markers() -> dict[str, Marker]:
    """Marker credentials unique to this session. Secrets hold ``/`` and ``+`` (as AWS secret keys do),
    so that their URL-encoded and base64 forms differ from the plain one."""
    key = uuid.uuid4().hex[:10]
    return {
        "inline_ak": Marker("inline access key id", f"AKIAWMLINL{key.upper()}"),
        "inline_sk": Marker("inline secret key", f"wmlScanInl/{key}+Sec"),
        "conn_ak": Marker("connection access key id", f"AKIAWMLCON{key.upper()}"),
        "conn_sk": Marker("connection secret key", f"wmlScanCon/{key}+Sec"),
        "cli_ak": Marker("CLI manifest access key id", f"AKIAWMLCLI{key.upper()}"),
        "cli_sk": Marker("CLI manifest secret key", f"wmlScanCli/{key}+Sec"),
    }


def _base64_cores(raw: bytes) -> dict[str, str]:
    """The base64 text that encodes ``raw`` wherever it sits in a longer value: at each of the three byte
    offsets, only the characters that ``raw`` alone determines."""
    cores: dict[str, str] = {}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode()
        core = encoded[math.ceil(8 * offset / 6) : (8 * (offset + len(raw))) // 6]
        cores[f"base64 (offset {offset})"] = core
        cores[f"base64url (offset {offset})"] = core.translate(str.maketrans("+/", "-_"))
    return cores


def forms(marker: Marker) -> dict[str, str]:
    """Every form in which ``marker`` may appear: plain, URL- and form-encoded (upper and lower case
    escapes, twice encoded), JSON-escaped, and base64 (standard and URL-safe, at any alignment)."""
    value = marker.value
    url = quote(value, safe="")
    found = {
        "plain": value,
        "URL-encoded": url,
        "URL-encoded (lower-case escapes)": re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), url),
        "form-encoded": quote_plus(value),
        "URL-encoded twice": quote(url, safe=""),
        "JSON-escaped": json.dumps(value)[1:-1].replace("/", "\\/"),
        **_base64_cores(value.encode()),
    }
    unique: dict[str, str] = {}
    for name, text in found.items():
        if text not in unique.values():
            unique[name] = text
    return unique


@dataclass
class Hit:
    where: str
    marker: Marker
    form: str
    context: str

    def __str__(self) -> str:
        return f"{self.where}: the {self.marker.name} ({self.form}) in …{self.context}…"


class Scanner:
    """Searches texts for every form of every marker and keeps the hits by category."""

    def __init__(self, markers: Iterable[Marker]) -> None:
        self.patterns = [(m, name, text) for m in markers for name, text in forms(m).items()]
        self.hits: dict[str, list[Hit]] = {}
        self.scanned: dict[str, int] = {}
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def scan(self, category: str, where: str, text: str | bytes | None) -> list[Hit]:
        """Record (once per place, marker and form) the markers in ``text``; what was found."""
        if text is None:
            return []
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        found: list[Hit] = []
        for marker, form, needle in self.patterns:
            start = text.find(needle)
            if start < 0:
                continue
            context = text[max(0, start - 60) : start + len(needle) + 40].replace(needle, f"<{form}>")
            hit = Hit(where, marker, form, " ".join(context.split()))
            key = (where, marker.value, form)
            with self._lock:
                if key not in self._seen:
                    self._seen.add(key)
                    found.append(hit)
        with self._lock:
            self.hits.setdefault(category, []).extend(found)
            self.scanned[category] = self.scanned.get(category, 0) + 1
        return found

    def count(self, category: str) -> None:
        """Count a place of ``category`` as scanned (one searched elsewhere, e.g. by the database)."""
        with self._lock:
            self.scanned[category] = self.scanned.get(category, 0) + 1

    def report(self, category: str) -> str:
        hits = self.hits.get(category, [])
        return "\n".join(f"  - {hit}" for hit in hits)


# --- the re-signing relay ---------------------------------------------------------------------------------

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/([^,]+), SignedHeaders=([^,]+), Signature=([0-9a-f]+)"
)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _canonical_query(raw: str) -> str:
    pairs = []
    for part in raw.split("&") if raw else []:
        name, _, value = part.partition("=")
        pairs.append((quote(unquote(name), safe="~"), quote(unquote(value), safe="~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def sigv4_signature(
    secret: str, scope: str, moment: str, method: str, target: str, headers: Any, signed: str
) -> str:
    """The SigV4 signature of a request as received (``target``: its raw path and query)."""
    path, _, query = target.partition("?")
    names = signed.split(";")
    canonical = "\n".join(
        (
            method,
            path,
            _canonical_query(query),
            "".join(
                f"{n}:{','.join(' '.join(v.split()) for v in headers.get_all(n) or [])}\n" for n in names
            ),
            signed,
            headers.get("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
        )
    )
    day, region, service, _ = scope.split("/")
    to_sign = f"AWS4-HMAC-SHA256\n{moment}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _hmac(f"AWS4{secret}".encode(), day)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class ResigningRelay:
    """An S3 endpoint on loopback in front of the store: a request signed with a marker key pair (checked)
    is signed again with the store's real keys and passed on; any other request is refused (403), so a run
    that does not use the markers fails visibly. Counts the requests of each marker access key."""

    def __init__(self, target: str, real_access_key: str, real_secret: str, pairs: dict[str, str]) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.real = (real_access_key, real_secret)
        self.pairs = dict(pairs)  # marker access key id -> marker secret key
        self.used: dict[str, int] = {}
        self.refused: list[str] = []
        self._lock = threading.Lock()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                relay._forward(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="resigning-relay", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _refuse(self, handler: BaseHTTPRequestHandler, why: str) -> None:
        with self._lock:
            self.refused.append(f"{handler.command} {handler.path}: {why}")
        body = f"<Error><Code>AccessDenied</Code><Message>relay: {why}</Message></Error>".encode()
        handler.send_response(403)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        headers = handler.headers
        if headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    handler.rfile.readline()
                    break
                chunks.append(handler.rfile.read(size))
                handler.rfile.readline()
            body = b"".join(chunks)
        else:
            body = handler.rfile.read(int(headers.get("Content-Length") or 0))
        match = AUTH.fullmatch(headers.get("Authorization", ""))
        if match is None:
            self._refuse(handler, "not signed with SigV4 in the Authorization header")
            return
        access_key, scope, signed, signature = match.groups()
        secret = self.pairs.get(access_key)
        if secret is None:
            self._refuse(handler, f"access key {access_key!r} is no marker")
            return
        moment = headers.get("x-amz-date", "")
        args = (scope, moment, handler.command, handler.path, headers, signed)
        if not hmac.compare_digest(sigv4_signature(secret, *args), signature):
            self._refuse(handler, "the signature was not made with the marker secret key")
            return
        with self._lock:
            self.used[access_key] = self.used.get(access_key, 0) + 1
        resigned = sigv4_signature(self.real[1], *args)
        authorization = (
            f"AWS4-HMAC-SHA256 Credential={self.real[0]}/{scope}, "
            f"SignedHeaders={signed}, Signature={resigned}"
        )
        upstream = http.client.HTTPConnection(*self.target, timeout=120)
        try:
            upstream.putrequest(handler.command, handler.path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                lower = name.lower()
                if lower in HOP_BY_HOP or lower in ("content-length", "authorization"):
                    continue
                upstream.putheader(name, value)
            upstream.putheader("Authorization", authorization)
            upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
            handler.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() in HOP_BY_HOP or (
                    name.lower() == "content-length" and handler.command != "HEAD"
                ):
                    continue
                handler.send_header(name, value)
            if handler.command != "HEAD":
                handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
        finally:
            upstream.close()


# --- where the services keep things -----------------------------------------------------------------------


def airflow_config(services: dict[str, str]) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read(Path(services["WMLTRAIN_AIRFLOW_HOME"]) / "airflow.cfg")
    return parser


def staging_dir(services: dict[str, str]) -> Path:
    """``[wmltrain] staging_dir`` of the services' Airflow processes (their environment file says it)."""
    env = Path(services["WMLTRAIN_AIRFLOW_HOME"]) / "airflow.env"
    for line in env.read_text().splitlines():
        if line.startswith("export AIRFLOW__WMLTRAIN__STAGING_DIR="):
            import shlex

            return Path(shlex.split(line.removeprefix("export "))[0].partition("=")[2])
    return Path(services["WMLTRAIN_AIRFLOW_HOME"]) / "staging"


class MetadataDb:
    """The services' PostgreSQL metadata database (``[database] sql_alchemy_conn``), read-only use."""

    def __init__(self, services: dict[str, str]) -> None:
        import psycopg2
        from cryptography.fernet import Fernet, MultiFernet

        config = airflow_config(services)
        url = config.get("database", "sql_alchemy_conn").replace("postgresql+psycopg2://", "postgresql://")
        self.connection = psycopg2.connect(url)
        self.connection.autocommit = True
        keys = [k.strip() for k in config.get("core", "fernet_key", fallback="").split(",") if k.strip()]
        self.fernet = MultiFernet([Fernet(k.encode()) for k in keys]) if keys else None

    def close(self) -> None:
        self.connection.close()

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def decrypt(self, text: str) -> str:
        """A Fernet-encrypted column's clear text (as Airflow reads it); unencrypted text as it is."""
        if self.fernet is None or text.startswith("{"):
            return text
        try:
            return self.fernet.decrypt(text.encode()).decode("utf-8", "replace")
        except Exception:
            return text

    def triggers(self) -> list[tuple[int, str, str, str]]:
        """Every trigger row: id, classpath, its kwargs decrypted, and the DAG of the task deferred on it."""
        rows = self.query(
            "SELECT t.id, t.classpath, t.kwargs, coalesce(min(ti.dag_id), '') FROM trigger t "
            "LEFT JOIN task_instance ti ON ti.trigger_id = t.id GROUP BY t.id, t.classpath, t.kwargs"
        )
        return [(int(i), str(c), self.decrypt(str(k)), str(d)) for i, c, k, d in rows]

    def tables(self) -> list[str]:
        rows = self.query(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
        )
        return [str(r[0]) for r in rows]

    def rows_holding(self, table: str, needles: list[str]) -> list[str]:
        """The rows of ``table`` (as text) holding any of ``needles``."""
        condition = " OR ".join(["strpos(t::text, %s) > 0"] * len(needles))
        rows = self.query(f'SELECT t::text FROM "{table}" AS t WHERE {condition}', needles)
        return [str(r[0]) for r in rows]


# --- samples taken while the runs go on --------------------------------------------------------------------


@dataclass
class Sampler:
    """Every second while the runs go on: the trigger rows (decrypted), the command lines of the
    machine's processes, and every container created on the Docker daemons, inspected at its creation
    (a run's container is removed when the run ends). All scanned into ``scanner`` at once."""

    scanner: Scanner
    db: MetadataDb
    docker_urls: list[str]
    seen_triggers: set[int] = field(default_factory=set)
    inspected: set[str] = field(default_factory=set)
    names: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    trigger_dags: set[str] = field(default_factory=set)  # the DAGs of the tasks deferred on them
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self._threads.append(threading.Thread(target=self._poll, name="secrets-sampler", daemon=True))
        for url in self.docker_urls:
            self._threads.append(threading.Thread(target=self._events, args=(url,), daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_triggers()
                self.sample_processes()
            except Exception as err:
                self.errors.append(f"{time.strftime('%H:%M:%S')} {type(err).__name__}: {err}"[:300])
            self._stop.wait(0.5)

    def sample_triggers(self) -> None:
        for trigger_id, classpath, kwargs, dag_id in self.db.triggers():
            self.seen_triggers.add(trigger_id)
            self.trigger_dags.add(dag_id)
            self.scanner.scan("trigger", f"trigger row {trigger_id} ({classpath}) kwargs, decrypted", kwargs)

    def sample_processes(self) -> None:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                line = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                self.scanner.scan("processes", f"command line of pid {proc.name} ({line[:60]}…)", line)

    def _events(self, url: str) -> None:
        while not self._stop.is_set():
            try:
                client = docker.APIClient(base_url=url, timeout=3600)
                inspector = docker.APIClient(base_url=url, timeout=10)
                for info in inspector.containers(all=True):
                    self.inspect(inspector, url, str(info["Id"]))
                stream = client.events(filters={"type": "container", "event": ["create"]}, decode=True)
                for event in stream:
                    if self._stop.is_set():
                        return
                    self.inspect(inspector, url, str(event.get("id")))
            except Exception as err:
                self.errors.append(f"events of {url}: {type(err).__name__}: {err}"[:300])
                self._stop.wait(1)

    def inspect(self, client: docker.APIClient, url: str, container_id: str) -> None:
        if container_id in self.inspected:
            return
        self.inspected.add(container_id)
        try:
            info = client.inspect_container(container_id)
        except docker.errors.NotFound:
            return
        name = str(info.get("Name", container_id[:12]))
        self.names.add(name.lstrip("/"))
        self.scanner.scan("docker", f"docker inspect {name} on {url}", json.dumps(info))


def scan_tree(scanner: Scanner, category: str, root: Path, *, since: float = 0.0) -> int:
    """Scan every regular file under ``root`` changed since ``since``; how many."""
    count = 0
    if not root.exists():
        return 0
    for path in sorted(root.rglob("*")):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since:
                scanner.scan(category, f"file {path}", path.read_bytes())
                count += 1
    return count


def log_offsets(directory: Path) -> dict[Path, int]:
    """The sizes of the ``*.log`` files of ``directory`` now (what :func:`scan_new_log_text` skips)."""
    return {path: path.stat().st_size for path in directory.glob("*.log")}


def scan_new_log_text(scanner: Scanner, category: str, directory: Path, offsets: dict[Path, int]) -> None:
    """Scan what the services' logs received since ``offsets`` was taken."""
    for path in sorted(directory.glob("*.log")):
        with path.open("rb") as handle:
            handle.seek(offsets.get(path, 0))
            scanner.scan(category, f"service log {path} (written during the scan)", handle.read())
