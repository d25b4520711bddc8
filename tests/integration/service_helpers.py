"""Helpers for the tests of the training service against the real Airflow of ``scripts/services up``.

The ``wmltrain`` command line runs as a subprocess (``python -m airflow_wmltrain``), exactly as a user
runs it; the Airflow REST API v2 is reached with an httpx client holding the admin's JWT; buckets are
made and emptied with boto3.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINING_DAG_ID = "wmltrain_training"
RETENTION_DAG_ID = "wmltrain_retention"
TRAINING_ID = re.compile(r"^training-[A-Za-z0-9_-]+$")
MODEL_ID_LINE = re.compile(r"^Model-ID is '(training-[A-Za-z0-9_-]+)'$", re.MULTILINE)
CLI_TIMEOUT_S = 60
API_TIMEOUT_S = 90  # one REST call of the tests' own client


def wait_for(what: str, timeout: float, probe: Callable[[], Any], interval: float = 1.0) -> Any:
    """Call ``probe`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)
        time.sleep(interval)


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the command line -------------------------------------------------------------------------------


@dataclass
class Cli:
    """Runs ``wmltrain`` (``python -m airflow_wmltrain``) against the services' Airflow."""

    env: dict[str, str]
    transcript: list[str] = field(default_factory=list)

    @classmethod
    def for_services(cls, services: dict[str, str], airflow_home: Path) -> Cli:
        # Nothing of the caller's Airflow configuration (pytest may carry AIRFLOW__* variables).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "WMLTRAIN_"))}
        env.update(
            {
                "WMLTRAIN_API_URL": services["WMLTRAIN_AIRFLOW_URL"],
                "WMLTRAIN_USER": services["WMLTRAIN_AIRFLOW_USER"],
                "WMLTRAIN_PASSWORD": services["WMLTRAIN_AIRFLOW_PASSWORD"],
                # A machine of its own: no [wmltrain] settings. `train` checks the submission against the
                # server's framework registry (its busybox framework is the services' own) and resource
                # classes, which the bundled DAG publishes (issue 13 item 6).
                "AIRFLOW_HOME": str(airflow_home),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
            }
        )
        return cls(env=env)

    def args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "airflow_wmltrain", *args]

    def run(self, *args: str, timeout: float = CLI_TIMEOUT_S, env: dict[str, str] | None = None) -> Result:
        """Run one command to its end (it must end by itself within ``timeout``)."""
        started = time.monotonic()
        try:
            proc = subprocess.run(
                self.args(*args),
                env={**self.env, **(env or {})},
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
            pytest.fail(
                f"wmltrain {' '.join(args)} did not end within {timeout:.0f}s; its output so far:\n"
                f"{out[-3000:]}",
                pytrace=False,
            )
        result = Result(list(args), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
        self.transcript.append(result.stdout + result.stderr)
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start a command in the background (``communicate()`` collects it)."""
        return subprocess.Popen(
            self.args(*args),
            env=self.env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ok(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> Result:
        result = self.run(*args, timeout=timeout)
        assert result.code == 0, result.describe()
        return result

    def train(self, model: Path, manifest: Path, *extra: str) -> str:
        """``wmltrain train``; the training id it prints."""
        result = self.ok("train", str(model), str(manifest), *extra)
        return training_id_of(result.stdout)

    def show(self, training_id: str) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.ok("show", training_id, "--json").stdout)
        return document

    def listing(self) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = json.loads(self.ok("list", "--json").stdout)
        return records

    def state(self, training_id: str) -> str:
        return str(self.show(training_id)["state"])

    def wait_until_state(self, training_id: str, states: set[str], timeout: float) -> dict[str, Any]:
        """Poll ``show --json`` until the run is in one of ``states``; its document."""

        def probe() -> dict[str, Any] | None:
            document = self.show(training_id)
            return document if document["state"] in states else None

        return dict(wait_for(f"{training_id} to be {'/'.join(sorted(states))}", timeout, probe))


@dataclass
class Result:
    args: list[str]
    code: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (
            f"wmltrain {' '.join(self.args)} exited {self.code} after {self.seconds:.1f}s\n"
            f"--- stdout:\n{self.stdout[-3000:]}\n--- stderr:\n{self.stderr[-3000:]}"
        )


def training_id_of(stdout: str) -> str:
    """The id of ``Model-ID is 'training-...'`` (the seed service's words)."""
    match = MODEL_ID_LINE.search(stdout)
    assert match, f"no \"Model-ID is 'training-...'\" line in: {stdout!r}"
    training_id = match.group(1)
    assert TRAINING_ID.match(training_id), training_id
    return training_id


def row_of(table: str, training_id: str) -> str | None:
    """The line of ``wmltrain list``'s table that shows ``training_id``."""
    rows = [line for line in table.splitlines() if re.search(rf"(^|\s){re.escape(training_id)}(\s|$)", line)]
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


# --- the REST API -------------------------------------------------------------------------------------


def api_client(services: dict[str, str]) -> httpx.Client:
    """An httpx client for ``/api/v2`` with the admin's JWT (no proxy: loopback)."""
    url = services["WMLTRAIN_AIRFLOW_URL"]
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as anonymous:
        response = anonymous.post(
            "/auth/token",
            json={
                "username": services["WMLTRAIN_AIRFLOW_USER"],
                "password": services["WMLTRAIN_AIRFLOW_PASSWORD"],
            },
        )
    assert response.status_code in (200, 201), response.text
    token = response.json()["access_token"]
    # Patient, as the command line is: the services are shared, and a busy api-server may take a while.
    return httpx.Client(
        base_url=f"{url}/api/v2",
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(API_TIMEOUT_S, connect=10),
        transport=httpx.HTTPTransport(retries=3),  # connection failures (an api-server restarting)
        trust_env=False,
    )


def wait_for_dag(api: httpx.Client, dag_id: str, timeout: float) -> dict[str, Any]:
    def parsed() -> dict[str, Any] | None:
        response = api.get(f"/dags/{dag_id}")
        return response.json() if response.status_code == 200 else None

    return dict(wait_for(f"the DAG {dag_id} to be parsed", timeout, parsed))


def trigger(api: httpx.Client, dag_id: str, conf: dict[str, Any] | None = None) -> str:
    """Trigger a DAG run as the UI does (no logical date); its run id."""
    body: dict[str, Any] = {"logical_date": None}
    if conf is not None:
        body["conf"] = conf
    response = api.post(f"/dags/{dag_id}/dagRuns", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["dag_run_id"])


def wait_for_dag_run(api: httpx.Client, dag_id: str, run_id: str, timeout: float) -> dict[str, Any]:
    """Wait for a DAG run to end; fail with its task logs unless it succeeded."""

    def finished() -> dict[str, Any] | None:
        run = api.get(f"/dags/{dag_id}/dagRuns/{quote(run_id)}").json()
        return run if run.get("state") in ("success", "failed") else None

    run = wait_for(f"run {run_id} of {dag_id} to end", timeout, finished)
    if run["state"] != "success":
        tasks = api.get(f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances").json()["task_instances"]
        logs = "\n".join(
            f"--- {ti['task_id']}[{ti['map_index']}] ({ti['state']}):\n"
            + task_log(api, dag_id, run_id, ti["task_id"], ti["map_index"])[-3000:]
            for ti in tasks
            if ti["state"] != "success"
        )
        pytest.fail(f"run {run_id} of {dag_id} ended {run['state']}\n{logs}", pytrace=False)
    return dict(run)


def task_log(api: httpx.Client, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """A task instance's first try's whole log as the REST API serves it (every field of every line)."""
    params: dict[str, Any] = {"full_content": "true"}
    if map_index >= 0:
        params["map_index"] = map_index
    response = api.get(
        f"/dags/{dag_id}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/logs/1",
        params=params,
        headers={"Accept": "application/json"},
    )
    if response.status_code != 200:
        return f"(no log: HTTP {response.status_code} {response.text[:300]})"
    lines = []
    for line in response.json().get("content", []):
        lines.append(json.dumps(line) if isinstance(line, dict) else str(line))
    return "\n".join(lines)


def quote(value: str) -> str:
    from urllib.parse import quote as _quote

    return _quote(value, safe="")


# --- buckets -------------------------------------------------------------------------------------------


def bucket_name(role: str) -> str:
    return f"wmltrain-it-{role}-{uuid.uuid4().hex[:10]}"


def make_buckets(s3: Any, *roles: str, data: bytes = b"the training data\n") -> list[str]:
    """One fresh bucket per role; a ``data`` bucket gets an ``input.txt``."""
    names = []
    for role in roles:
        name = bucket_name(role)
        s3.create_bucket(Bucket=name)
        if role == "data":
            s3.put_object(Bucket=name, Key="input.txt", Body=data)
        names.append(name)
    return names


def keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    found: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update(obj["Key"] for obj in page.get("Contents", []))
    return found


def read(s3: Any, bucket: str, key: str) -> str:
    return str(s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8", "replace"))


def drop_buckets(s3: Any, names: list[str]) -> None:
    """Empty and remove buckets (one DELETE per object: Swift's s3api wants Content-MD5 on
    DeleteObjects); tried a few times, as a halted run may still be storing its logs."""
    for name in names:
        for attempt in range(3):
            try:
                for key in keys(s3, name):
                    s3.delete_object(Bucket=name, Key=key)
                s3.delete_bucket(Bucket=name)
                break
            except s3.exceptions.NoSuchBucket:
                break
            except Exception:
                if attempt == 2:
                    raise
                time.sleep(2)


# --- secrets -------------------------------------------------------------------------------------------


def leaks(text: str, secret: str) -> list[str]:
    """The places in ``text`` that would reveal ``secret``.

    The store's key may be a common word ("testing"), so only patterns that show it as a value count:
    after a credential-like key (YAML, JSON, ``key=value``), or alone in quotes.
    """
    value = re.escape(secret)
    patterns = [
        rf"(?i)(secret|password|passwd|key|token|credential)[\w-]*[\"']?\s*[:=]\s*[\"']?{value}(?![\w-])",
        rf"[\"']{value}[\"']",
    ]
    found = []
    for pattern in patterns:
        for match in re.finditer(pattern, text):
            start = max(0, match.start() - 80)
            found.append(text[start : match.end() + 20])
    return found


def values_equal_to(document: Any, secret: str, path: str = "$") -> Iterator[str]:
    """JSON paths of ``document`` whose value is ``secret`` (YAML text values are parsed and walked)."""
    import yaml

    if isinstance(document, dict):
        for key, value in document.items():
            yield from values_equal_to(value, secret, f"{path}.{key}")
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from values_equal_to(value, secret, f"{path}[{index}]")
    elif isinstance(document, str):
        if document.strip() == secret:
            yield path
        elif "\n" in document:
            try:
                parsed = yaml.safe_load(document)
            except yaml.YAMLError:
                return
            if isinstance(parsed, dict | list):
                yield from values_equal_to(parsed, secret, f"{path}<yaml>")


def free_port() -> int:
    """A loopback TCP port nothing listens on now (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server a test started, SIGKILL after 10 s."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
