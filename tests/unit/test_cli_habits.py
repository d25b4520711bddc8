"""Habits of a good command line (issue 13 item 9): a token kept until it expires, shell completion."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from airflow_wmltrain.service.api import AirflowApi, TokenCache


def _jwt(expires_in: float) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS512'})}.{part({'sub': '1', 'exp': time.time() + expires_in})}.c2ln"


class CountingApi(AirflowApi):
    """Answers ``POST /auth/token`` with a fresh token, and ``GET`` with 401 for ``refused`` tokens."""

    def __init__(self, cache: TokenCache, *, lifetime: float = 3600, password: str = "pw") -> None:
        super().__init__("http://airflow.test", "admin", password, token_cache=cache)
        self.lifetime = lifetime
        self.minted: list[str] = []
        self.refused: set[str] = set()

    def _send(
        self, method: str, path: str, *, body: Any = None, token: str | None = None
    ) -> tuple[int, bytes]:
        if path == "/auth/token":
            self.minted.append(_jwt(self.lifetime))
            return 201, json.dumps({"access_token": self.minted[-1]}).encode()
        if token in self.refused:
            return 401, b'{"detail": "Token Expired"}'
        return 200, b"{}"


def test_a_token_is_fetched_once_for_many_commands_and_kept_private(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path / "cache")
    first = CountingApi(cache)
    first.call("GET", "/version")
    for _ in range(3):  # three more commands, each a new process with a new client
        later = CountingApi(cache)
        later.call("GET", "/version")
        assert later.minted == []
    [path] = (tmp_path / "cache").iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
    assert "admin" not in path.name
    assert "pw" not in path.name


def test_a_token_about_to_expire_or_refused_is_replaced(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path / "cache")
    CountingApi(cache, lifetime=30).call("GET", "/version")  # less than the margin left
    again = CountingApi(cache)
    again.call("GET", "/version")
    assert len(again.minted) == 1
    revoked = CountingApi(cache)
    revoked.refused.add(again.minted[0])
    revoked.call("GET", "/version")
    assert len(revoked.minted) == 1  # the refused token was dropped and replaced
    assert CountingApi(cache).token() == revoked.minted[0]


def test_another_password_is_not_answered_from_the_cache(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path / "cache")
    CountingApi(cache).call("GET", "/version")
    other = CountingApi(cache, password="wrong")
    other.call("GET", "/version")
    assert len(other.minted) == 1  # the server was asked (and would have refused a wrong password)


def test_a_cache_directory_others_may_write_is_not_used(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    cache = TokenCache(shared)
    CountingApi(cache).call("GET", "/version")
    assert list(shared.iterdir()) == []
    (shared / "planted").write_text(_jwt(3600))
    assert cache.get("http://airflow.test", "admin", "pw") is None


def test_completion_answers_through_argcomplete(tmp_path: Path) -> None:
    out = tmp_path / "completions"
    line = "wmltrain mon"
    env = {
        **os.environ,
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_IFS": "\n",
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
    }
    done = subprocess.run(
        [sys.executable, "-m", "airflow_wmltrain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text().split() == ["monitor"]
    line = "wmltrain list --st"
    env.update(COMP_LINE=line, COMP_POINT=str(len(line)))
    subprocess.run(
        [sys.executable, "-m", "airflow_wmltrain"], env=env, capture_output=True, timeout=60, check=False
    )
    assert out.read_text().split() == ["--state"]
