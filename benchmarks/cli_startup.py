#!/usr/bin/env python3
"""How fast each ``wmltrain`` command starts (issue 13 item 8: every command within 0.5 s).

Each measured command runs as a fresh process, as a user types it; the time is the whole process, from
its start to its exit. Commands that need no server are measured whole: ``--help`` of each command and
``validate`` of the MNIST example (zip + manifest, offline). A command that talks to the API server
spends most of its time waiting for it, so its start-up is measured as ``COMMAND --help`` (everything
it imports to parse its arguments) — the work after that is the server's.

Peers, in the same run: ``python -c pass`` (the interpreter alone, the floor) and ``python -c "import
airflow.sdk"`` (what reading settings through Airflow's configuration costs: what ``validate`` and
``train`` paid before they read ``[wmltrain]`` with ``Settings.from_local_config``). The report gives the
median of ``--repeat`` runs per command, after one untimed warm-up each, and each command's ratio to the
interpreter alone. No service is needed::

    .venv/bin/python benchmarks/cli_startup.py --repeat 7 > result.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 0.5


def commands(model_zip: Path) -> list[tuple[str, list[str]]]:
    python = sys.executable
    cli = [python, "-m", "airflow_wmltrain"]
    manifest = str(REPO / "examples" / "mnist" / "manifest.yaml")
    return [
        ("peer: python -c pass", [python, "-c", "pass"]),
        ("peer: python -c 'import airflow.sdk'", [python, "-c", "import airflow.sdk"]),
        ("wmltrain --help", [*cli, "--help"]),
        *[
            (f"wmltrain {name} --help", [*cli, name, "--help"])
            for name in ("validate", "stage", "train", "list", "show", "logs", "monitor", "halt", "pools")
        ],
        ("wmltrain validate MODEL.zip MANIFEST (offline)", [*cli, "validate", str(model_zip), manifest]),
    ]


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, check=False)
    return time.perf_counter() - started, proc.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per command (default 5)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model_zip = Path(scratch) / "model.zip"
        with zipfile.ZipFile(model_zip, "w") as archive:
            for path in sorted((REPO / "examples" / "mnist" / "model").glob("*.py")):
                archive.write(path, path.name)
        # A machine of its own: no Airflow home, and the example's framework in this machine's registry.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": scratch,
            "AIRFLOW_HOME": str(Path(scratch) / "airflow"),
            "AIRFLOW__WMLTRAIN__FRAMEWORKS_FILE": str(REPO / "examples" / "frameworks-local.yaml"),
        }
        rows = []
        for name, command in commands(model_zip):
            _, code = timed(command, env)  # warm-up: the page cache, .pyc files
            times = []
            for _ in range(args.repeat):
                seconds, code = timed(command, env)
                times.append(seconds)
            rows.append((name, statistics.median(times), min(times), max(times), code))
            print(f"[cli_startup] {name}: {statistics.median(times):.3f} s (exit {code})", file=sys.stderr)
    floor = rows[0][1]
    python = sys.version.split()[0]
    print(f"Medians of {args.repeat} runs per command (after one warm-up), seconds; Python {python}.")
    print()
    print("| command | median s | min s | max s | ÷ python -c pass | target ≤ 0.5 s | exit |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, median, low, high, code in rows:
        verdict = "(peer)" if name.startswith("peer") else ("met" if median <= TARGET_S else "missed")
        cells = f"{median:.3f} | {low:.3f} | {high:.3f} | {median / floor:.1f}×"
        print(f"| {name} | {cells} | {verdict} | {code} |")
    print()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"Load average at the end: {load}; nproc {os.cpu_count()}.")
    missed = [name for name, median, *_ in rows if not name.startswith("peer") and median > TARGET_S]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
