#!/usr/bin/env python3
"""Warm re-stage with the cache keyed by principal (issue 10, hole 10) against the code before it.

The content cache's entries are keyed by who reads (S3 access key id; Swift auth URL, domain and
user) as well as by the object, so that no principal obtains bytes through the cache that it could not
GET itself.  This measures what that costs where it matters, the warm re-stage (every object already in
the cache): ours at ``HEAD`` (the working tree) against ours at ``--before`` (a git revision, the code
before the change), each also against its own cold stage (empty cache), on the same bucket.

Run it from the repository root with the project's virtual environment, after starting the services::

    eval "$(scripts/services up)"
    .venv/bin/python benchmarks/cache_principal.py --before 7f0c1e2 [--objects 2000 --size 65536 --repeat 5]

Each measurement is a fresh worker process per version (alternating, ``--repeat`` times) that opens the
S3 store once, then times ``stage()`` cold (new cache, new destination) and warm (same cache, new
destination).  Interpreter start-up and imports are excluded.  Prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUCKET = "wmltrain-bench-principal"

WORKER = r"""
import json, sys, time
from airflow_wmltrain.storage.cache import ObjectCache
from airflow_wmltrain.storage.s3 import S3Store
from airflow_wmltrain.storage.sigv4 import Credentials
from airflow_wmltrain.storage.staging import stage

spec = json.loads(sys.argv[1])
keys = Credentials(spec["user"], spec["key"], None)
store = S3Store(
    spec["bucket"], credentials=lambda: keys, endpoint_url=spec["endpoint"], region=spec["region"]
)
cache = ObjectCache(spec["cache"], max_bytes=1 << 40)
out = {}
for phase in ("cold", "warm"):
    started = time.perf_counter()
    result = stage(store, f"{spec['dest']}-{phase}", cache=cache)
    seconds = time.perf_counter() - started
    out[phase] = {"s": seconds, "fetched": result.fetched_files, "cached": result.from_cache}
store.close()
print(json.dumps(out))
"""


def services_env() -> dict[str, str]:
    env = dict(os.environ)
    if "WMLTRAIN_S3_ENDPOINT" not in env:
        out = subprocess.run(
            [str(REPO / "scripts" / "services"), "env"], capture_output=True, text=True, check=True
        ).stdout
        for line in out.splitlines():
            if line.startswith("export ") and "=" in line:
                name, _, value = line[len("export ") :].partition("=")
                env.setdefault(name, value.strip("'\""))
    with urllib.request.urlopen(f"{env['WMLTRAIN_S3_ENDPOINT']}/healthcheck", timeout=5) as answer:  # noqa: S310
        answer.read()
    return env


def ensure_bucket(env: dict[str, str], objects: int, size: int) -> None:
    """The bucket with ``objects`` objects of ``size`` random bytes (made once, then reused)."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3",
        endpoint_url=env["WMLTRAIN_S3_ENDPOINT"],
        region_name=env.get("WMLTRAIN_S3_REGION", "us-east-1"),
        aws_access_key_id=env["WMLTRAIN_STORE_USER"],
        aws_secret_access_key=env["WMLTRAIN_STORE_KEY"],
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )
    try:
        s3.head_bucket(Bucket=BUCKET)
    except Exception:  # missing: create it
        s3.create_bucket(Bucket=BUCKET)
    have = {
        obj["Key"]: obj["Size"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for obj in page.get("Contents", [])
    }
    wanted = [f"data/{i:05d}.bin" for i in range(objects)]
    missing = [key for key in wanted if have.get(key) != size]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket=BUCKET, Key=key, Body=os.urandom(size)), missing))
    for key in set(have) - set(wanted):
        s3.delete_object(Bucket=BUCKET, Key=key)
    if missing:
        print(f"created {len(missing)} objects in {BUCKET}", file=sys.stderr)


def checkout(revision: str, into: Path) -> Path:
    """The package as it was at ``revision`` (``git archive``), importable from the returned folder."""
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "airflow_wmltrain"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure(root: Path, env: dict[str, str], scratch: Path, name: str) -> dict[str, Any]:
    spec = {
        "bucket": BUCKET,
        "endpoint": env["WMLTRAIN_S3_ENDPOINT"],
        "region": env.get("WMLTRAIN_S3_REGION", "us-east-1"),
        "user": env["WMLTRAIN_STORE_USER"],
        "key": env["WMLTRAIN_STORE_KEY"],
        "cache": str(scratch / f"{name}-cache"),
        "dest": str(scratch / f"{name}-dest"),
    }
    child_env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=child_env,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{name}: the worker failed:\n{out.stderr[-3000:]}")
    for path in scratch.iterdir():
        shutil.rmtree(path)
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    assert result["warm"]["fetched"] == 0, (
        f"{name}: the warm stage fetched {result['warm']['fetched']} objects"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--before", required=True, help="git revision of the code before the change")
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64 * 1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    args = parser.parse_args()
    env = services_env()
    ensure_bucket(env, args.objects, args.size)
    with tempfile.TemporaryDirectory(prefix="wmltrain-bench-principal-", dir="/var/tmp") as work:
        versions = {"before": checkout(args.before, Path(work) / "before"), "after": REPO}
        scratch = Path(work) / "scratch"
        scratch.mkdir()
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in versions}
        for repeat in range(args.repeat):
            order = list(versions) if repeat % 2 == 0 else list(reversed(versions))
            for name in order:
                runs[name].append(measure(versions[name], env, scratch, name))
                print(f"{name} #{repeat + 1}: {runs[name][-1]}", file=sys.stderr)
    median = {
        name: {phase: statistics.median(r[phase]["s"] for r in rs) for phase in ("cold", "warm")}
        for name, rs in runs.items()
    }
    mb = args.objects * args.size / 1e6
    print(f"{args.objects} objects × {args.size} B ({mb:.0f} MB), medians of {args.repeat}, seconds:\n")
    print("| code | cold stage | warm re-stage | warm ÷ cold | warm runs |")
    print("| --- | --- | --- | --- | --- |")
    for name, rs in runs.items():
        label = f"before ({args.before})" if name == "before" else "after (principal-keyed)"
        warm = ", ".join(f"{r['warm']['s']:.3f}" for r in rs)
        ratio = median[name]["warm"] / median[name]["cold"]
        print(f"| {label} | {median[name]['cold']:.2f} | {median[name]['warm']:.3f} | {ratio:.1%} | {warm} |")
    print(f"\nwarm re-stage after ÷ before: {median['after']['warm'] / median['before']['warm']:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps({"runs": runs, "median": median, "args": vars(args) | {"json": None}})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
