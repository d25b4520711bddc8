#!/usr/bin/env python3
"""Warm re-stage with the cache keyed by principal (issue 10, hole 10) against the code before it.

The content cache's entries are keyed by who reads (S3 access key id; Swift auth URL, domain and
user) as well as by the object, so that no principal obtains bytes through the cache that it could not
GET itself.  This measures what that costs where it matters, the warm re-stage (every object already in
the cache): ours at ``HEAD`` (the working tree) against ours at ``--before`` (a git revision, the code
before the change), each also against its own cold stage (empty cache), on the same bucket.

Run it from the repository root with the project's virtual environment, after starting the services::

    eval "$(scripts/services up)"
    .venv/bin/python benchmarks/cache_principal.py --before REVISION [--objects 2000 --size 65536 --repeat 5]

``--stand-in`` serves the bucket from a stand-in S3 in this process instead (no services needed: it
measures our side alone, listing and linking, when the services are busy).

Each measurement is a fresh worker process per version (alternating, ``--repeat`` times) that opens the
S3 store once, then times ``stage()`` cold (new cache, new destination) and warm (same cache, new
destination).  Interpreter start-up and imports are excluded.  Prints a Markdown table of medians.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

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


@contextmanager
def stand_in(objects: int, size: int) -> Iterator[dict[str, str]]:
    """A stand-in S3 endpoint in this process serving the bucket (listing in pages of 1,000, GETs)."""
    data = {f"data/{i:05d}.bin": os.urandom(size) for i in range(objects)}
    etags = {key: hashlib.md5(body, usedforsecurity=False).hexdigest() for key, body in data.items()}
    keys = sorted(data)
    ns = "http://s3.amazonaws.com/doc/2006-03-01/"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.reply(b"")

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == f"/{BUCKET}":
                start = int(parse_qs(query).get("continuation-token", ["0"])[0])
                page = keys[start : start + 1000]
                more = start + 1000 < len(keys)
                items = "".join(
                    f'<Contents><Key>{k}</Key><Size>{len(data[k])}</Size><ETag>"{etags[k]}"</ETag></Contents>'
                    for k in page
                )
                tail = f"<NextContinuationToken>{start + 1000}</NextContinuationToken>" if more else ""
                xml = f'<ListBucketResult xmlns="{ns}"><IsTruncated>{str(more).lower()}</IsTruncated>{tail}'
                self.reply((xml + items + "</ListBucketResult>").encode())
                return
            key = path.removeprefix(f"/{BUCKET}/")
            self.reply(data[key], {"etag": f'"{etags[key]}"'})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {
            "WMLTRAIN_S3_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
            "WMLTRAIN_S3_REGION": "us-east-1",
            "WMLTRAIN_STORE_USER": "bench",
            "WMLTRAIN_STORE_KEY": "bench-secret",
        }
    finally:
        server.shutdown()
        server.server_close()


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
    parser.add_argument(
        "--stand-in", action="store_true", help="a stand-in S3 in this process, not the services"
    )
    args = parser.parse_args()
    with ExitStack() as stack:
        if args.stand_in:
            env = stack.enter_context(stand_in(args.objects, args.size))
        else:
            env = services_env()
            ensure_bucket(env, args.objects, args.size)
        runs = run_all(args, env)
    store = "a stand-in S3 in the benchmark's process" if args.stand_in else "the services' Swift (S3 API)"
    report(args, runs, store)
    return 0


def run_all(args: argparse.Namespace, env: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
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
    return runs


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], store: str) -> None:
    median = {
        name: {phase: statistics.median(r[phase]["s"] for r in rs) for phase in ("cold", "warm")}
        for name, rs in runs.items()
    }
    mb = args.objects * args.size / 1e6
    print(
        f"{args.objects} objects × {args.size} B ({mb:.0f} MB) from {store}; medians of {args.repeat}, s:\n"
    )
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


if __name__ == "__main__":
    sys.exit(main())
