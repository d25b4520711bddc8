"""Staging (``airflow_wmltrain.storage.staging``) against the real Swift, through its S3 API and its Swift
API: trees, refusals, verification, resuming, the shared cache and its eviction, progress, and the
``wmltrain stage`` command line.

Requests are counted in the Swift proxy's access log (``storage_helpers.ProxyLog``); corruption is made by
editing the object server's ``.data`` files (one replica: nothing repairs them behind our back).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from airflow_wmltrain.errors import BucketNotFoundError, CredentialsError, DataLoadError
from airflow_wmltrain.storage import ObjectInfo, open_store
from airflow_wmltrain.storage.cache import ObjectCache
from airflow_wmltrain.storage.staging import (
    FOLLOW_INTERVAL,
    cache_principal,
    plan_objects,
    stage,
    staging_identity,
)
from airflow_wmltrain.storage.swift import SwiftStore
from airflow_wmltrain.storage.transfer import RetryPolicy
from tests.integration.storage_helpers import (
    KINDS,
    BackgroundCli,
    KiB,
    MiB,
    ProxyLog,
    airflow_connection_json,
    cache_entries,
    count_cache_entries,
    data_reference,
    empty_bucket,
    expected_tree,
    find_data_file,
    inline_connection,
    leftovers,
    manifest_document,
    open_data_store,
    put_objects,
    run_cli,
    start_cli,
    tree,
    write_manifest,
)

BIG_CACHE = 1 << 30
WRONG_SECRET = "Wr0ng-Secret-It-5fd3a9c1e7b2"  # distinctive: any occurrence in a message is a leak

# Unicode, spaces, deep prefixes, 0-byte objects, folder markers (0-byte keys ending in "/": skipped),
# and a key that shares the string prefix "a/b" without being in the folder "a/b/".
TREE_OBJECTS: dict[str, bytes] = {
    "top.txt": b"top level\n",
    "empty.bin": b"",
    "a/b/c/d/e/f.txt": b"deep\n" * 100,
    "a/b/c/empty": b"",
    "a/b/sibling.bin": os.urandom(70 * KiB),
    "a/b/folder marker/": b"",
    "a/b/ünïcødé ✓/données d'été.txt": "é ✓\n".encode() * 10,
    "a/bc.txt": b"same string prefix, another folder\n",
    "dir/": b"",
    "dir/inside.txt": b"inside\n",
    "with space/two  spaces .txt": b"spaces\n",
    "日本語/データ.csv": b"1,2,3\n",
}


@pytest.fixture
def bucket(bucket: str, s3_client: Any) -> Iterator[str]:
    """The conftest's fresh bucket, emptied several objects at a time afterwards (faster teardown)."""
    yield bucket
    empty_bucket(s3_client, bucket)


def objects_of(count: int, size: int, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}obj-{i:04d}.bin": os.urandom(size) for i in range(count)}


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret leaked into: {text[:2000]}"


# --- 1. the same tree through both APIs -----------------------------------------------------------------


def test_s3_and_swift_stage_identical_trees(
    bucket: str,
    s3_client: Any,
    creds: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    put_objects(s3_client, bucket, TREE_OBJECTS)
    whole = expected_tree(TREE_OBJECTS)
    assert "dir" not in whole  # folder markers are not files
    assert "a/b/folder marker" not in whole
    cache = ObjectCache(tmp_path / "cache", max_bytes=BIG_CACHE)

    staged = {}
    for kind, with_cache in (("s3", True), ("swift", False)):
        dest = tmp_path / f"{kind}-all"
        result = stage(open_data_store(kind, bucket, creds), dest, cache=cache if with_cache else None)
        staged[kind] = tree(dest)
        assert (result.files, result.bytes) == (len(whole), sum(len(TREE_OBJECTS[k]) for k in whole))
        assert (result.fetched_files, result.from_cache) == (len(whole), 0)
        assert leftovers(dest) == []
        assert (dest / "dir").is_dir()
    assert staged["s3"] == staged["swift"] == whole

    # A prefix (written without its trailing slash, normalised by the manifest), with Airflow connections.
    sub = expected_tree(TREE_OBJECTS, "a/b/")
    assert set(sub) == {"c/d/e/f.txt", "c/empty", "sibling.bin", "ünïcødé ✓/données d'été.txt"}
    for kind in KINDS:
        conn_id = f"wmltrain_it_{kind}_{uuid.uuid4().hex[:8]}"
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", airflow_connection_json(kind, creds))
        reference = data_reference(kind, bucket, creds, prefix="a/b", connection={"conn_id": conn_id})
        assert reference.prefix == "a/b/"
        dest = tmp_path / f"{kind}-prefix"
        result = stage(open_store(reference), dest, prefix=reference.prefix, cache=cache)
        assert tree(dest) == sub
        assert result.files == len(sub)
        if kind == "s3":  # same endpoint, bucket, keys and ETags as the inline staging: all in the cache
            assert (result.fetched_files, result.from_cache) == (0, len(sub))
        else:  # the cache was only filled through the S3 endpoint: another endpoint, other entries
            assert (result.fetched_files, result.from_cache) == (len(sub), 0)


# --- 2. keys that would escape the data directory -------------------------------------------------------


@pytest.mark.parametrize(("kind", "key"), [("s3", "../evil"), ("swift", "a/../../b")])
def test_keys_escaping_the_data_dir_are_refused(
    kind: str,
    key: str,
    bucket: str,
    s3_client: Any,
    creds: dict[str, str],
    proxy_log: ProxyLog,
    tmp_path: Path,
) -> None:
    # Swift 2.30 and its s3api store such keys verbatim: boto3 sends PUT /<bucket>/../evil without
    # normalising it, the proxy does not resolve dot segments, and both listings return the key as written.
    put_objects(s3_client, bucket, {"good.txt": b"good\n", key: b"evil\n"})
    assert key in [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    base = tmp_path / "runs"
    dest = base / "run-1" / "data"

    with pytest.raises(DataLoadError) as caught:
        stage(
            open_data_store(kind, bucket, creds),
            dest,
            cache=ObjectCache(tmp_path / "cache", max_bytes=BIG_CACHE),
        )
    assert caught.value.code == "S302"
    assert repr(key) in str(caught.value)
    assert "escape the data directory" in str(caught.value)
    assert not dest.exists()  # refused before anything was created ...
    assert tree(base) == {}  # ... or written anywhere near it
    assert count_cache_entries(tmp_path / "cache") == 0
    assert proxy_log.object_gets(bucket) == []  # ... or fetched


def test_plan_objects_refuses_unsafe_keys() -> None:
    def info(key: str) -> ObjectInfo:
        return ObjectInfo(key, 1, "0" * 32, "0" * 32)

    for key in ("..", "../x", "a/..", "a/../../b", "./x", "a/./b", "a/b/.", "x\0y"):
        with pytest.raises(DataLoadError, match=re.escape(repr(key))):
            plan_objects([info("ok.txt"), info(key)], "")
    # Empty segments and leading slashes stay inside the data directory.
    planned = plan_objects([info("a//b"), info("/abs/x"), info("marker/"), info("p/q")], "")
    assert [(p.info.key, p.path) for p in planned] == [("a//b", "a/b"), ("/abs/x", "abs/x"), ("p/q", "p/q")]
    # Two keys for one file, and a file that another key needs as a folder.
    with pytest.raises(DataLoadError, match=r"'a//b' and 'a/b'|'a/b' and 'a//b'"):
        plan_objects([info("a//b"), info("a/b")], "")
    with pytest.raises(DataLoadError, match="'x' is a file but 'x/y' needs it to be a folder"):
        plan_objects([info("x"), info("x/y")], "")
    # Under a prefix, the escape is judged on the path relative to it.
    with pytest.raises(DataLoadError, match=re.escape(repr("data/../../x"))):
        plan_objects([info("data/../../x")], "data/")


# --- 3. corrupted objects -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
@pytest.mark.parametrize("kind", KINDS)
def test_corrupted_object_is_refused(
    kind: str,
    damage: str,
    services: dict[str, str],
    bucket: str,
    s3_client: Any,
    creds: dict[str, str],
    proxy_log: ProxyLog,
    tmp_path: Path,
) -> None:
    since = time.time() - 1
    victim = os.urandom(200 * KiB)
    put_objects(s3_client, bucket, {"good.txt": b"good\n", "victim.bin": victim})
    data_file = find_data_file(services["WMLTRAIN_SERVICES_DIR"], bucket, "victim.bin", since=since)
    size = data_file.stat().st_size
    assert size == len(victim)
    if damage == "flipped byte":
        with open(data_file, "r+b") as stream:
            stream.seek(size // 2)
            byte = stream.read(1)[0]
            stream.seek(size // 2)
            stream.write(bytes([byte ^ 0x01]))
        assert data_file.stat().st_size == size
    else:
        os.truncate(data_file, size - 1000)
    # S3 through the cache, Swift straight into the data directory: both ways of fetching.
    cache = ObjectCache(tmp_path / "cache", max_bytes=BIG_CACHE) if kind == "s3" else None
    dest = tmp_path / "dest"

    with pytest.raises(DataLoadError) as caught:
        stage(open_data_store(kind, bucket, creds), dest, cache=cache, workers=2)
    assert caught.value.code == "S302"
    assert "'victim.bin'" in str(caught.value)
    assert not (dest / "victim.bin").exists()
    # Nothing but the good object, anywhere in the data directory (temporary files included).
    assert set(tree(dest)) <= {"good.txt"}
    if cache is not None:
        assert all(entry.read_bytes() == b"good\n" for entry in cache_entries(cache.root))
        assert list(cache.temp.iterdir()) == []

    statuses = [r.status for r in proxy_log.requests(bucket) if r.method == "GET" and r.key == "victim.bin"]
    if damage == "flipped byte":
        # The object server sends the bytes, finds the MD5 wrong at the end and quarantines the file: the
        # client's MD5 check refuses the body and its retry gets 404.
        assert statuses[0] == 200, statuses
        assert statuses[-1] == 404, statuses
    else:
        assert statuses == [404]  # a .data file of the wrong size is quarantined when opened


def test_corrupted_object_fetched_in_ranges_is_refused(
    services: dict[str, str],
    bucket: str,
    s3_client: Any,
    creds: dict[str, str],
    proxy_log: ProxyLog,
    tmp_path: Path,
) -> None:
    """Ranged GETs never read a whole ``.data`` file, so the object server does not notice the damage:
    the client's MD5 of the assembled ranges must, on every try."""
    since = time.time() - 1
    victim = os.urandom(200 * KiB)
    put_objects(s3_client, bucket, {"victim.bin": victim})
    data_file = find_data_file(services["WMLTRAIN_SERVICES_DIR"], bucket, "victim.bin", since=since)
    with open(data_file, "r+b") as stream:
        stream.seek(150 * KiB)
        byte = stream.read(1)[0]
        stream.seek(150 * KiB)
        stream.write(bytes([byte ^ 0x01]))
    store = open_store(data_reference("s3", bucket, creds), retry=RetryPolicy(attempts=2, base_delay=0.01))
    cache = ObjectCache(tmp_path / "cache", max_bytes=BIG_CACHE)
    dest = tmp_path / "dest"

    with pytest.raises(DataLoadError) as caught:
        stage(store, dest, cache=cache, range_size=64 * KiB)
    assert caught.value.code == "S302"
    assert "'victim.bin'" in str(caught.value)
    assert "does not match" in str(caught.value)
    assert tree(dest) == {}
    assert cache_entries(cache.root) == []
    assert list(cache.temp.iterdir()) == []
    statuses = [r.status for r in proxy_log.requests(bucket) if r.method == "GET" and r.key == "victim.bin"]
    assert statuses == [206] * 8  # 2 tries of 4 ranges (64 + 64 + 64 + 8 KiB)

    # [wmltrain] verify = size: the size only, no hashing: the damage goes through (the trade-off named
    # in the README), which shows that the MD5 check above is what refused it.
    sized = stage(store, tmp_path / "sized", cache=None, range_size=64 * KiB, verify="size")
    assert sized.fetched_files == 1
    staged = (tmp_path / "sized" / "victim.bin").read_bytes()
    assert len(staged) == len(victim)
    assert staged != victim


@pytest.mark.parametrize("kind", KINDS)
def test_large_objects_fetched_in_ranges(
    kind: str, bucket: str, s3_client: Any, creds: dict[str, str], proxy_log: ProxyLog, tmp_path: Path
) -> None:
    objects = {"big.bin": os.urandom(3 * MiB + 5), "exactly-two-ranges.bin": os.urandom(2 * MiB), "s": b"s"}
    put_objects(s3_client, bucket, objects)
    proxy_log.mark()
    for with_cache in (True, False):
        dest = tmp_path / f"dest-{with_cache}"
        cache = ObjectCache(tmp_path / "cache", max_bytes=BIG_CACHE) if with_cache else None
        result = stage(open_data_store(kind, bucket, creds), dest, cache=cache, range_size=1 * MiB)
        assert tree(dest) == expected_tree(objects)
        assert (result.fetched_files, result.fetched_bytes) == (3, sum(map(len, objects.values())))
    by_key: dict[str, list[int]] = {}
    for r in proxy_log.requests(bucket):
        if r.method == "GET" and r.key:
            by_key.setdefault(r.key, []).append(r.status)
    assert by_key["big.bin"] == [206] * 8  # 4 ranges (3 of 1 MiB, one of 5 bytes), twice
    assert by_key["exactly-two-ranges.bin"] == [200] * 2  # not larger than 2 ranges: one GET
    assert by_key["s"] == [200] * 2


# --- 4. an interrupted staging resumes ------------------------------------------------------------------


def test_interrupted_staging_resumes(
    bucket: str, s3_client: Any, creds: dict[str, str], proxy_log: ProxyLog, tmp_path: Path
) -> None:
    count, size, workers = 400, 128 * KiB, 2
    objects = objects_of(count, size)
    put_objects(s3_client, bucket, objects)
    proxy_log.mark()
    manifest = write_manifest(
        tmp_path / "manifest.yml", manifest_document("s3", bucket, inline_connection("s3", creds))
    )
    cache_dir, dest = tmp_path / "cache", tmp_path / "dest"
    args = [
        "stage",
        str(manifest),
        str(dest),
        "--workers",
        str(workers),
        "--cache-dir",
        str(cache_dir),
        "--json",
    ]

    first = start_cli(args, tmp_path / "home", output=tmp_path / "first")
    try:
        deadline = time.monotonic() + 180
        while count_cache_entries(cache_dir) < count // 2:
            assert first.process.poll() is None, f"the staging ended before the kill: {first.output()}"
            assert time.monotonic() < deadline, "the staging did not get halfway in time"
            time.sleep(0.01)
    finally:
        first.kill()  # SIGKILL: no cleanup of any kind
    assert first.process.returncode == -9

    store = open_data_store("s3", bucket, creds)
    infos = {info.key: info for info in store.list_objects()}
    cache = ObjectCache(cache_dir, max_bytes=BIG_CACHE)
    principal = cache_principal(store)
    assert principal is not None
    cached = {
        key
        for key, info in infos.items()
        if cache.has(cache.entry(store.endpoint, bucket, info, principal=principal), size)
    }
    linked = {key for key in objects if (dest / key).exists()}
    assert count // 2 <= len(cached) < count
    assert linked <= cached

    second = run_cli(args, tmp_path / "home")
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout)
    assert result["files"] == count
    assert result["already_staged"] == len(linked)
    assert result["from_cache"] == len(cached - linked)
    assert result["fetched_files"] == count - len(cached)
    assert result["fetched_bytes"] == (count - len(cached)) * size
    assert tree(dest) == expected_tree(objects)
    assert leftovers(dest) == []

    # Each object was fetched once across both runs; those in flight at the kill (at most one per worker)
    # may have been fetched twice, and never one that was already in the cache.
    gets = Counter(proxy_log.object_gets(bucket))
    assert set(gets) == set(objects)
    twice = {key for key, n in gets.items() if n > 1}
    assert max(gets.values()) <= 2
    assert len(twice) <= workers, twice
    assert not twice & cached


# --- 5. concurrent stagings share the cache -------------------------------------------------------------


def test_concurrent_stagings_share_the_cache(
    bucket: str, s3_client: Any, creds: dict[str, str], proxy_log: ProxyLog, tmp_path: Path
) -> None:
    count, size = 200, 64 * KiB
    objects = objects_of(count, size, prefix="shard/")
    put_objects(s3_client, bucket, objects)
    proxy_log.mark()
    manifest = write_manifest(
        tmp_path / "manifest.yml", manifest_document("s3", bucket, inline_connection("s3", creds))
    )
    cache_dir = tmp_path / "cache"
    runs = [
        start_cli(
            [
                "stage",
                str(manifest),
                str(tmp_path / f"dest{i}"),
                "--workers",
                "4",
                "--cache-dir",
                str(cache_dir),
                "--json",
            ],
            tmp_path / f"home{i}",
            output=tmp_path / f"run{i}",
        )
        for i in (1, 2)
    ]
    done = [run.wait() for run in runs]
    assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
    results = [json.loads(d.stdout) for d in done]

    expected = expected_tree(objects)
    for i in (1, 2):
        assert tree(tmp_path / f"dest{i}") == expected
        assert leftovers(tmp_path / f"dest{i}") == []
    # Every object was fetched by exactly one of the two runs and linked by the other.
    assert [r["files"] for r in results] == [count, count]
    assert sum(r["fetched_files"] for r in results) == count, results
    assert sum(r["from_cache"] for r in results) == count, results
    gets = Counter(proxy_log.object_gets(bucket))
    assert set(gets) == set(objects)
    assert count <= sum(gets.values()) <= count + 2  # a retried GET (server busy) is tolerated

    entries = {entry.stat().st_ino: entry for entry in cache_entries(cache_dir)}
    assert len(entries) == count
    for key in objects:
        first, second = (tmp_path / "dest1" / key).stat(), (tmp_path / "dest2" / key).stat()
        assert first.st_ino == second.st_ino
        assert first.st_ino in entries
        assert first.st_nlink == 3  # the cache entry and the two data directories


def test_a_follower_links_what_the_leader_fetches_while_it_runs_and_fetches_what_a_dead_leader_left(
    bucket: str, s3_client: Any, creds: dict[str, str], proxy_log: ProxyLog, tmp_path: Path
) -> None:
    """The leader (this test) holds the staging lock and has written its listing. It fetches a/ before the
    follower starts and b/ while the follower runs: the follower links both while the lock is held and
    fetches nothing. Then the leader dies (its lock goes): the follower fetches c/ itself."""
    groups = {name: objects_of(8, 4 * KiB, prefix=f"{name}/") for name in ("a", "b", "c")}
    everything = {key: data for group in groups.values() for key, data in group.items()}
    put_objects(s3_client, bucket, everything)
    store = open_data_store("s3", bucket, creds)
    cache = ObjectCache(tmp_path / "cache", max_bytes=BIG_CACHE)
    identity = staging_identity(cache_principal(store) or "", store, "")
    dest = tmp_path / "dest"
    results: list[Any] = []

    def linked(name: str) -> int:
        return len(list((dest / name).glob("*.bin")))

    def wait_until_linked(name: str) -> None:
        deadline = time.monotonic() + 30
        while linked(name) < len(groups[name]):
            assert time.monotonic() < deadline, f"the follower did not link {name}/ while the leader ran"
            time.sleep(0.05)

    def follow() -> None:
        try:
            results.append(stage(store, dest, prefix="", cache=cache))
        except BaseException as err:  # shown by the assertion below, not lost in the thread
            results.append(err)

    with cache.staging_lock(identity, blocking=True):
        cache.lead(identity)
        cache.write_listing(identity, list(store.list_objects("")))
        # cache entries are keyed by object, not by the staging's prefix: the leader's fetches, by group
        stage(store, tmp_path / "leader-a", prefix="a/", cache=cache)
        proxy_log.mark()
        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        wait_until_linked("a")
        assert proxy_log.object_gets(bucket) == []
        stage(store, tmp_path / "leader-b", prefix="b/", cache=cache)
        wait_until_linked("b")
        time.sleep(4 * FOLLOW_INTERVAL)
        assert follower.is_alive(), "the follower ended while the leader still held the lock"
        assert linked("c") == 0
        assert sorted(proxy_log.object_gets(bucket)) == sorted(groups["b"]), "only the leader fetched"
        proxy_log.mark()
    follower.join(timeout=120)
    assert not follower.is_alive()
    (result,) = results
    assert not isinstance(result, BaseException), "".join(traceback.format_exception(result))
    assert tree(dest) == expected_tree(everything)
    assert (result.from_cache, result.fetched_files) == (16, 8)
    assert sorted(proxy_log.object_gets(bucket)) == sorted(groups["c"])


# --- 6. and 7. a changed object is fetched again; a warm cache fetches nothing --------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_changed_object_is_fetched_again(
    kind: str, bucket: str, s3_client: Any, creds: dict[str, str], proxy_log: ProxyLog, tmp_path: Path
) -> None:
    objects = objects_of(5, 10 * KiB)
    put_objects(s3_client, bucket, objects)
    cache = ObjectCache(tmp_path / "cache", max_bytes=BIG_CACHE)
    first = stage(open_data_store(kind, bucket, creds), tmp_path / "old", cache=cache)
    assert first.fetched_files == 5

    changed = {**objects, "obj-0002.bin": os.urandom(10 * KiB)}  # same size, other content
    put_objects(s3_client, bucket, {"obj-0002.bin": changed["obj-0002.bin"]})
    proxy_log.mark()
    second = stage(open_data_store(kind, bucket, creds), tmp_path / "new", cache=cache)
    assert (second.fetched_files, second.from_cache, second.fetched_bytes) == (1, 4, 10 * KiB)
    assert proxy_log.object_gets(bucket) == ["obj-0002.bin"]
    assert tree(tmp_path / "new") == expected_tree(changed)
    assert tree(tmp_path / "old") == expected_tree(objects)  # the earlier run's data is untouched


@pytest.mark.parametrize("kind", KINDS)
def test_warm_cache_fetches_nothing(
    kind: str, bucket: str, s3_client: Any, creds: dict[str, str], proxy_log: ProxyLog, tmp_path: Path
) -> None:
    objects = {**objects_of(20, 8 * KiB, prefix="x/"), "empty": b""}
    put_objects(s3_client, bucket, objects)
    cache = ObjectCache(tmp_path / "cache", max_bytes=BIG_CACHE)
    stage(open_data_store(kind, bucket, creds), tmp_path / "one", cache=cache)
    proxy_log.mark()

    again = stage(open_data_store(kind, bucket, creds), tmp_path / "two", cache=cache)
    assert (again.files, again.fetched_files, again.fetched_bytes, again.from_cache) == (21, 0, 0, 21)
    assert proxy_log.object_gets(bucket) == []
    assert tree(tmp_path / "two") == expected_tree(objects)
    for key in objects:
        assert (tmp_path / "one" / key).stat().st_ino == (tmp_path / "two" / key).stat().st_ino


# --- 8. and 9. wrong credentials, missing bucket --------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_credentials_are_refused_without_secrets(
    kind: str, bucket: str, creds: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dest = tmp_path / "dest"
    with pytest.raises(CredentialsError) as caught:
        stage(open_data_store(kind, bucket, creds, secret=WRONG_SECRET), dest, cache=None)
    err = caught.value
    assert err.code == "C103"
    assert bucket in str(err) or kind == "swift"  # Swift refuses at authentication, before any bucket
    text = "".join(traceback.format_exception(err)) + json.dumps(err.to_dict()) + repr(err)
    assert_no_secret(text, WRONG_SECRET, creds["key"])
    assert_no_secret(caplog.text, WRONG_SECRET, creds["key"])
    assert not dest.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_missing_bucket_is_named(kind: str, creds: dict[str, str], tmp_path: Path) -> None:
    name = f"wmltrain-it-missing-{uuid.uuid4().hex[:12]}"
    dest = tmp_path / "dest"
    with pytest.raises(BucketNotFoundError) as caught:
        stage(open_data_store(kind, name, creds), dest)
    assert caught.value.code == "C101"
    assert caught.value.field == "training_data_reference[0].source.bucket"
    assert f"bucket '{name}' does not exist" in str(caught.value)
    assert not dest.exists()


@dataclass(frozen=True)
class CliRuns:
    """The finished ``wmltrain stage`` runs, by (case, kind); ``missing`` is the missing bucket's name."""

    runs: dict[tuple[str, str], subprocess.CompletedProcess[str]]
    missing: str


@pytest.fixture(scope="module")
def cli_runs(
    store_credentials: dict[str, str], s3_client: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CliRuns]:
    """``wmltrain stage`` with wrong credentials, a missing bucket and (for its output) a good manifest:
    started all at once (each takes seconds to start)."""
    root = tmp_path_factory.mktemp("cli")
    existing = f"wmltrain-it-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=existing)
    s3_client.put_object(Bucket=existing, Key="hello.txt", Body=b"hello\n")
    missing = f"wmltrain-it-missing-{uuid.uuid4().hex[:12]}"
    # S3's --json output is parsed by the resuming and concurrency tests; the missing bucket is the same
    # code for both APIs once the store is open (tested in-process for both).
    cases = {
        ("wrong credentials", "s3"): (existing, WRONG_SECRET),
        ("wrong credentials", "swift"): (existing, WRONG_SECRET),
        ("missing bucket", "s3"): (missing, None),
        ("good", "swift"): (existing, None),
    }
    started: dict[tuple[str, str], BackgroundCli] = {}
    try:
        for n, ((case, kind), (name, secret)) in enumerate(cases.items()):
            conn = inline_connection(kind, store_credentials, secret=secret)
            manifest = write_manifest(root / f"manifest{n}.yml", manifest_document(kind, name, conn))
            dest, cache = str(root / f"dest{n}"), str(root / "cache")
            args = ["stage", str(manifest), dest, "--cache-dir", cache, "--json"]
            started[(case, kind)] = start_cli(args, root / f"home{n}", output=root / f"out{n}")
        yield CliRuns({key: run.wait() for key, run in started.items()}, missing)
    finally:
        for run in started.values():
            run.kill()
        s3_client.delete_object(Bucket=existing, Key="hello.txt")
        s3_client.delete_bucket(Bucket=existing)


def _stderr_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("kind", KINDS)
def test_cli_wrong_credentials(kind: str, cli_runs: CliRuns, creds: dict[str, str]) -> None:
    done = cli_runs.runs[("wrong credentials", kind)]
    assert done.returncode == 2, done.stderr
    lines = _stderr_lines(done)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error C103: "), lines
    assert_no_secret(done.stdout + done.stderr, WRONG_SECRET, creds["key"])


@pytest.mark.parametrize("kind", ["s3"])
def test_cli_missing_bucket(kind: str, cli_runs: CliRuns) -> None:
    done = cli_runs.runs[("missing bucket", kind)]
    missing = cli_runs.missing
    assert done.returncode == 2, done.stderr
    lines = _stderr_lines(done)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error C101: "), lines
    assert f"bucket '{missing}' does not exist" in lines[0]


@pytest.mark.parametrize("kind", ["swift"])
def test_cli_json_output_is_only_the_result(kind: str, cli_runs: CliRuns) -> None:
    """``--json`` prints one JSON document on stdout (logs go to stderr), so that scripts can parse it."""
    done = cli_runs.runs[("good", kind)]
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, lines
    result = json.loads(lines[0])
    assert (result["files"], result["bytes"], result["fetched_files"]) == (1, 6, 1)


# --- 10. no cache: straight into the data directory, resumable ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_no_cache_stages_and_resumes(
    kind: str, bucket: str, s3_client: Any, creds: dict[str, str], proxy_log: ProxyLog, tmp_path: Path
) -> None:
    objects = {**objects_of(8, 16 * KiB, prefix="d/"), "z/empty": b""}
    put_objects(s3_client, bucket, objects)
    dest = tmp_path / "dest"
    first = stage(open_data_store(kind, bucket, creds), dest, cache=None)
    assert (first.files, first.fetched_files, first.from_cache, first.already_staged) == (9, 9, 0, 0)
    assert tree(dest) == expected_tree(objects)
    assert leftovers(dest) == []

    removed = ["d/obj-0001.bin", "d/obj-0005.bin", "z/empty"]
    for key in removed:
        (dest / key).unlink()
    proxy_log.mark()
    second = stage(open_data_store(kind, bucket, creds), dest, cache=None)
    assert (second.fetched_files, second.already_staged, second.from_cache) == (3, 6, 0)
    assert sorted(proxy_log.object_gets(bucket)) == removed
    assert tree(dest) == expected_tree(objects)
    assert leftovers(dest) == []


# --- 11. cache eviction ---------------------------------------------------------------------------------


def test_cache_eviction_drops_least_recently_used_and_keeps_staged_data(
    bucket: str, s3_client: Any, creds: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    size = 10 * KiB
    objects = {**objects_of(3, size, "a/"), **objects_of(3, size, "b/"), **objects_of(3, size, "c/")}
    put_objects(s3_client, bucket, objects)
    root = tmp_path / "cache"
    roomy = ObjectCache(root, max_bytes=BIG_CACHE)

    def run(prefix: str, dest: str, cache: ObjectCache) -> None:
        stage(open_data_store("s3", bucket, creds), tmp_path / dest, prefix=prefix, cache=cache)
        time.sleep(0.02)  # distinct modification times from one staging to the next

    run("a/", "a1", roomy)
    run("b/", "b1", roomy)
    run("a/", "a2", roomy)  # a/ is used again: b/ is now the least recently used
    assert len(cache_entries(root)) == 6
    caplog.set_level(logging.INFO)
    cap = 65 * KiB  # 9 entries of 10 KiB: the 3 oldest must go
    run("c/", "c1", ObjectCache(root, max_bytes=cap))

    remaining = {entry.stat().st_ino for entry in cache_entries(root)}
    assert sum(entry.stat().st_size for entry in cache_entries(root)) <= cap
    inodes = {d: {p.stat().st_ino for p in (tmp_path / d).iterdir()} for d in ("a1", "a2", "b1", "c1")}
    assert remaining == inodes["a2"] | inodes["c1"]
    assert inodes["a1"] == inodes["a2"]
    assert not inodes["b1"] & remaining
    assert "evicted 3 least recently used entries" in caplog.text
    # A data directory keeps its files when their entries are evicted (a hard link is a name of the file).
    assert tree(tmp_path / "b1") == expected_tree(objects, "b/")
    assert all(p.stat().st_nlink == 1 for p in (tmp_path / "b1").iterdir())
    # An evicted object is simply fetched again.
    again = stage(open_data_store("s3", bucket, creds), tmp_path / "b2", prefix="b/", cache=roomy)
    assert (again.fetched_files, again.from_cache) == (3, 0)


# --- 12. progress in the log, no credentials -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_progress_lines_and_summary_without_credentials(
    kind: str,
    bucket: str,
    s3_client: Any,
    creds: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    count, size, interval = 200, 16 * KiB, 0.05
    put_objects(s3_client, bucket, objects_of(count, size))
    log = logging.getLogger(f"wmltrain.it.progress.{uuid.uuid4().hex[:6]}")
    caplog.set_level(logging.DEBUG)
    store = open_data_store(kind, bucket, creds)
    result = stage(store, tmp_path / "dest", cache=None, workers=1, log=log, progress_interval=interval)

    records = [r for r in caplog.records if r.name == log.name]
    progress = [r for r in records if re.match(rf"staged \d+/{count} files, ", r.getMessage())]
    assert result.seconds > 4 * interval, "the bucket staged too fast to see progress; make it bigger"
    assert len(progress) >= 3, [r.getMessage() for r in records]
    done = [int(re.match(r"staged (\d+)/", r.getMessage()).group(1)) for r in progress]  # type: ignore[union-attr]
    assert done == sorted(done)
    assert done[-1] < count
    gaps = [b.created - a.created for a, b in itertools.pairwise(progress)]
    assert min(gaps) >= interval * 0.9, gaps
    assert len(progress) <= result.seconds / interval + 1  # at the interval, not per file
    megabytes = f"{count * size / 1e6:,.1f} MB"
    assert records[0].getMessage().startswith(f"Staging {kind} ")
    assert f"{count} objects, {megabytes} into {tmp_path / 'dest'}" in records[0].getMessage()
    summary = records[-1].getMessage()
    assert summary.startswith(f"Staging done: staged {count} files, {megabytes} in "), summary
    assert summary.endswith(f"0 from the cache, {count} fetched ({megabytes})"), summary

    secrets = [creds["key"]]
    if isinstance(store, SwiftStore):
        secrets.append(store.auth.get()[1])  # the token
    everything = "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records)
    assert_no_secret(everything, *secrets)
    for marker in ("Signature=", "Credential=", "AUTH_tk"):  # an S3 signature, a tempauth token
        assert marker not in everything


def test_an_object_changed_after_the_listing_is_refused(
    bucket: str, s3_client: Any, creds: dict[str, str], tmp_path: Path
) -> None:
    """GETs carry If-Match with the listed ETag: a version that changed meanwhile is never mixed in."""
    s3_client.put_object(Bucket=bucket, Key="data.bin", Body=b"version one")
    with open_store(data_reference("s3", bucket, creds)) as store:
        listed = list(store.list_objects())
        s3_client.put_object(Bucket=bucket, Key="data.bin", Body=b"version two")
        store.list_objects = lambda prefix="": iter(listed)  # type: ignore[method-assign]
        with pytest.raises(DataLoadError, match="changed while it was staged"):
            stage(store, tmp_path / "dest", cache=None, workers=2)
    assert not (tmp_path / "dest" / "data.bin").exists()


def test_cli_stage_through_an_airflow_connection_prints_only_its_own_lines(
    bucket: str, s3_client: Any, creds: dict[str, str], tmp_path: Path
) -> None:
    """No INFO line of the amazon provider about where the connection's credentials came from (issue 13
    item 11): only staging's own progress and summary."""
    put_objects(s3_client, bucket, {"a.txt": b"a"})
    manifest = write_manifest(
        tmp_path / "manifest.yml", manifest_document("s3", bucket, {"conn_id": "stage_quiet"})
    )
    env = {"AIRFLOW_CONN_STAGE_QUIET": airflow_connection_json("s3", creds)}
    done = run_cli(["stage", str(manifest), str(tmp_path / "dest"), "--no-cache"], tmp_path / "home", env=env)
    assert done.returncode == 0, done.stderr
    assert "credentials retrieved" not in done.stderr, done.stderr
    assert all(line.startswith("Staging") for line in _stderr_lines(done)), done.stderr
