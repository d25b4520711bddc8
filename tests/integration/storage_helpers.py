"""Helpers shared by the staging and upload tests against the real Swift (S3 API and Swift API).

- manifests and stores for a bucket, through either API, with inline credentials or an Airflow
  connection id;
- the proxy's access log, parsed into the requests made on one bucket (to count GETs);
- the object server's ``.data`` file of an object (to corrupt it);
- trees of files and their checksums; the ``wmltrain`` command line in a subprocess.

The proxy logs one line per client request (``proxy-logging`` is first in its pipeline): S3 requests
with their S3 path (``GET /<bucket>/<key>``), Swift requests with theirs
(``GET /v1/AUTH_test/<bucket>/<key>``);
the path is percent-quoted once more than on the wire (``%20`` is written ``%2520``) and the query is
part of it (``%3F``).  Requests the proxy makes itself (container info lookups: ``HEAD ...?...states``)
have ``-`` as their client address and are not counted.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from airflow_wmltrain.manifest import StoreReference, load_manifest
from airflow_wmltrain.storage import ObjectStore, open_store

REPO_ROOT = Path(__file__).resolve().parents[2]
WMLTRAIN = REPO_ROOT / ".venv" / "bin" / "wmltrain"
KINDS = ("s3", "swift")
MANIFEST_TYPES = {"s3": "s3", "swift": "bluemix_objectstore"}
KiB = 1024
MiB = 1024 * 1024


# --- manifests and stores -------------------------------------------------------------------------------


def inline_connection(kind: str, creds: Mapping[str, str], *, secret: str | None = None) -> dict[str, str]:
    """A manifest's inline connection for ``kind`` (``s3`` or ``swift``), optionally with another secret."""
    if kind == "s3":
        return {
            "endpoint_url": creds["s3_endpoint"],
            "aws_access_key_id": creds["user"],
            "aws_secret_access_key": secret if secret is not None else creds["key"],
        }
    return {
        "auth_url": creds["swift_auth_url"],
        "user_name": creds["user"],
        "password": secret if secret is not None else creds["key"],
    }


def airflow_connection_json(kind: str, creds: Mapping[str, str]) -> str:
    """The JSON of an ``AIRFLOW_CONN_<ID>`` environment variable for ``kind``."""
    import json

    if kind == "s3":
        return json.dumps(
            {
                "conn_type": "aws",
                "login": creds["user"],
                "password": creds["key"],
                "extra": {"endpoint_url": creds["s3_endpoint"], "region_name": creds["s3_region"]},
            }
        )
    return json.dumps(
        {
            "conn_type": "swift",
            "host": creds["swift_auth_url"],
            "login": creds["user"],
            "password": creds["key"],
        }
    )


def manifest_document(
    kind: str, bucket: str, connection: Mapping[str, str], *, prefix: str = ""
) -> dict[str, Any]:
    """A valid training manifest whose data (and results) are ``bucket`` through ``kind``'s API."""
    source: dict[str, str] = {"bucket": bucket, "type": MANIFEST_TYPES[kind]}
    if prefix:
        source["prefix"] = prefix
    return {
        "model_definition": {
            "name": "staging-it",
            "framework": {"name": "tensorflow", "version": "1.2-py3"},
            "execution": {"command": "python3 x.py", "resource": "small"},
        },
        "training_data_reference": [{"connection": dict(connection), "source": source}],
        "training_results_reference": {
            "connection": dict(connection),
            "target": {"bucket": bucket, "type": MANIFEST_TYPES[kind]},
        },
    }


def write_manifest(path: Path, document: Mapping[str, Any]) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(dict(document), allow_unicode=True))
    return path


def data_reference(
    kind: str,
    bucket: str,
    creds: Mapping[str, str],
    *,
    prefix: str = "",
    secret: str | None = None,
    connection: Mapping[str, str] | None = None,
) -> StoreReference:
    """A manifest's data reference (validated and normalised as for a run: ``a/b`` becomes ``a/b/``)."""
    conn = connection if connection is not None else inline_connection(kind, creds, secret=secret)
    return load_manifest(manifest_document(kind, bucket, conn, prefix=prefix)).data


def open_data_store(
    kind: str,
    bucket: str,
    creds: Mapping[str, str],
    *,
    secret: str | None = None,
    connection: Mapping[str, str] | None = None,
) -> ObjectStore:
    """The store of a manifest's data reference (the code path a training run takes)."""
    return open_store(data_reference(kind, bucket, creds, secret=secret, connection=connection))


def open_results_store(kind: str, bucket: str, creds: Mapping[str, str]) -> ObjectStore:
    return open_store(load_manifest(manifest_document(kind, bucket, inline_connection(kind, creds))).results)


# --- objects and trees ----------------------------------------------------------------------------------


def put_objects(s3_client: Any, bucket: str, objects: Mapping[str, bytes], *, workers: int = 8) -> None:
    """PUT every object through the S3 API (boto3 sends keys as they are, ``..`` included)."""

    def put(item: tuple[str, bytes]) -> None:
        s3_client.put_object(Bucket=bucket, Key=item[0], Body=item[1])

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, objects.items()))


def empty_bucket(s3_client: Any, bucket: str, *, workers: int = 8) -> None:
    """Delete every object of ``bucket``, several at a time (the ``bucket`` fixture deletes one by one)."""
    keys = [
        obj["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for obj in page.get("Contents", [])
    ]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda key: s3_client.delete_object(Bucket=bucket, Key=key), keys))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_tree(objects: Mapping[str, bytes], prefix: str = "") -> dict[str, str]:
    """What a staging of ``prefix`` must produce: relative path → SHA-256, folder markers left out."""
    return {
        key[len(prefix) :]: sha256(data)
        for key, data in objects.items()
        if key.startswith(prefix) and not key.endswith("/")
    }


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones and leftovers included): relative path → SHA-256."""
    found: dict[str, str] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            found[path.relative_to(root).as_posix()] = sha256(path.read_bytes())
    return found


def leftovers(root: Path) -> list[str]:
    """Temporary things a staging must not leave in a data directory."""
    found = []
    for folder, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            if name == ".wmltrain-partial" or name.endswith(".link"):
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return found


def cache_entries(cache_root: Path) -> list[Path]:
    objects = cache_root / "objects"
    if not objects.is_dir():
        return []
    return [entry for shard in objects.iterdir() if shard.is_dir() for entry in shard.iterdir()]


def count_cache_entries(cache_root: Path) -> int:
    """The number of entries, tolerant of a writer adding shards meanwhile."""
    try:
        return sum(len(os.listdir(shard)) for shard in os.scandir(cache_root / "objects") if shard.is_dir())
    except FileNotFoundError:
        return 0


# --- the proxy's access log -----------------------------------------------------------------------------

_LINE = re.compile(r"^proxy-server: (\S+) (\S+) (\S+) (\S+) (\S+) (\S+) (\d{3}) ")


@dataclass(frozen=True)
class LoggedRequest:
    """One client request to the proxy.

    :param api: ``s3`` or ``swift``.
    :param method: the HTTP method.
    :param bucket: the bucket (container).
    :param key: the object's key, ``""`` for a request on the bucket itself.
    :param query: the query string (decoded).
    :param status: the HTTP status.
    """

    api: str
    method: str
    bucket: str
    key: str
    query: str
    status: int


class ProxyLog:
    """The requests started since the last :meth:`mark` (or since this object was made).

    A request is logged when its response ends, which may be a moment after the client read the last
    byte: requests are told apart by the start time the proxy logs (the third field from the end), not
    by where their line is.
    """

    def __init__(self, path: Path, s3_endpoint: str) -> None:
        self.path = path
        self.s3_endpoint = s3_endpoint
        self.mark()

    def mark(self) -> None:
        self.since = time.time()
        self.offset = self.path.stat().st_size

    def _sync(self) -> str:
        """Make an unsigned request with a unique path and wait until the proxy logged it: the requests
        answered before it are in the log then (one proxy worker)."""
        marker = f"wmltrain-log-marker-{uuid.uuid4().hex}"
        parts = urlsplit(self.s3_endpoint)
        conn = http.client.HTTPConnection(parts.netloc, timeout=10)
        try:
            conn.request("HEAD", f"/{marker}")
            conn.getresponse().read()
        finally:
            conn.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if marker.encode() in self._read():
                time.sleep(0.05)  # requests still being logged when the marker was (it came after them)
                return marker
            time.sleep(0.02)
        raise AssertionError(f"the proxy did not log the request {marker} in {self.path}")

    def _read(self) -> bytes:
        with open(self.path, "rb") as stream:
            stream.seek(self.offset)
            return stream.read()

    def requests(self, bucket: str) -> list[LoggedRequest]:
        """The client requests on ``bucket`` (through either API) since the mark."""
        self._sync()
        found = []
        for raw in self._read().decode("utf-8", "replace").splitlines():
            match = _LINE.match(raw)
            if not match or match.group(1) == "-":
                continue
            try:
                started = float(raw.split(" ")[-3])
            except (ValueError, IndexError):
                continue
            if started < self.since:
                continue
            method, logged_path, status = match.group(4), match.group(5), int(match.group(7))
            path, _, query = unquote(logged_path).partition("?")
            if path.startswith("/v1/"):
                segments = path.split("/", 4)  # '', 'v1', account, bucket, key
                api, name, key = "swift", segments[3] if len(segments) > 3 else "", segments[4:]
            else:
                segments = path.split("/", 2)  # '', bucket, key
                api, name, key = "s3", segments[1], segments[2:]
            if unquote(name) == bucket:
                found.append(
                    LoggedRequest(api, method, bucket, unquote(key[0]) if key else "", query, status)
                )
        return found

    def object_gets(self, bucket: str) -> list[str]:
        """The keys of the objects GET on ``bucket`` since the mark (one item per request)."""
        return [r.key for r in self.requests(bucket) if r.method == "GET" and r.key]


# --- the object server's files --------------------------------------------------------------------------


def swift_metadata(path: Path) -> dict[bytes, bytes]:
    """The pickled metadata Swift keeps in a ``.data`` file's extended attributes (split when large)."""
    blob = b""
    index = 0
    while True:
        name = "user.swift.metadata" + (str(index) if index else "")
        try:
            blob += os.getxattr(path, name)
        except OSError:
            break
        index += 1
    meta: dict[bytes, bytes] = pickle.loads(blob)  # our own test server's files
    return meta


def find_data_file(services_dir: str, bucket: str, key: str, *, since: float) -> Path:
    """The object server's ``.data`` file holding ``bucket/key`` (written after ``since``)."""
    root = Path(services_dir) / "swift" / "srv"
    wanted = key.encode()
    matches = []
    for folder, _, names in os.walk(root):
        if "/objects" not in folder:
            continue
        for name in names:
            if not name.endswith(".data"):
                continue
            path = Path(folder) / name
            try:
                if path.stat().st_mtime < since:
                    continue
                meta = swift_metadata(path)
            except (OSError, pickle.UnpicklingError):
                continue
            parts = meta.get(b"name", b"").split(b"/", 3)  # b'', account, container, object
            if len(parts) == 4 and parts[2] == bucket.encode() and parts[3] == wanted:
                matches.append(path)
    if len(matches) != 1:
        raise AssertionError(f"expected one .data file for {bucket}/{key} under {root}, found {matches}")
    return matches[0]


# --- the command line -----------------------------------------------------------------------------------


def cli_env(airflow_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env["AIRFLOW_HOME"] = str(airflow_home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    if WMLTRAIN.exists():
        return [str(WMLTRAIN), *args]
    return [sys.executable, "-m", "airflow_wmltrain", *args]  # pragma: no cover - other layouts


def run_cli(
    args: Iterable[str], airflow_home: Path, *, timeout: float = 180, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args),
        env=cli_env(airflow_home, env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class BackgroundCli:
    """``wmltrain`` running in the background, its output going to files (no pipe to fill up)."""

    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def wait(self, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        try:
            returncode = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        return subprocess.CompletedProcess(
            self.process.args,
            returncode,
            self.stdout_path.read_text(errors="replace"),
            self.stderr_path.read_text(errors="replace"),
        )

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start_cli(args: Iterable[str], airflow_home: Path, *, output: Path) -> BackgroundCli:
    """Start ``wmltrain`` in the background; stdout and stderr go to ``output``.stdout / .stderr."""
    stdout_path, stderr_path = output.with_suffix(".stdout"), output.with_suffix(".stderr")
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        process = subprocess.Popen(cli_command(*args), env=cli_env(airflow_home), stdout=out, stderr=err)
    return BackgroundCli(process, stdout_path, stderr_path)
