"""Results upload (``airflow_wmltrain.storage.upload``) and small documents (``ObjectStore.put_json`` ...)
against the real Swift, through its S3 API and its Swift API; everything written through one API is read
back through the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import swiftclient

from airflow_wmltrain.errors import WmlTrainError
from airflow_wmltrain.storage.transfer import TransferError
from airflow_wmltrain.storage.upload import upload_tree
from tests.integration.storage_helpers import KINDS, MiB, empty_bucket, open_results_store

PART_SIZE = 5 * MiB  # S3's smallest part
THRESHOLD = 6 * MiB
LARGE = 13 * MiB  # 3 parts: 5 + 5 + 3 MiB

# A results tree as a run leaves it: nested folders, unicode and spaces, an empty file, one large file.
SMALL_FILES: dict[str, bytes] = {
    "learner-1/training-log.txt": b"epoch 1 loss 0.5\nepoch 2 loss 0.25\n",
    "ünïcødé dir/with space ✓.txt": "données d'été\n".encode(),
    "empty.txt": b"",
    "a/b/c/d/metrics.json": b'{"accuracy": 0.98}',
}


@pytest.fixture
def bucket(segments_cleanup: str, s3_client: Any) -> Iterator[str]:
    """The conftest's fresh bucket, emptied several objects at a time afterwards (and its segments)."""
    yield segments_cleanup
    empty_bucket(s3_client, segments_cleanup)


def read_other_api(kind: str, bucket: str, key: str, s3_client: Any, swift: swiftclient.Connection) -> bytes:
    """An object's bytes through the API that did not write it."""
    if kind == "s3":
        return bytes(swift.get_object(bucket, key)[1])
    return bytes(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read())


def keys_other_api(kind: str, bucket: str, s3_client: Any, swift: swiftclient.Connection) -> set[str]:
    if kind == "s3":
        return {obj["name"] for obj in swift.get_container(bucket, full_listing=True)[1]}
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def md5(data: bytes) -> hashlib._Hash:
    return hashlib.md5(data, usedforsecurity=False)


# --- 13. a tree, with a multipart / static large object --------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_upload_tree_reads_back_through_the_other_api(
    kind: str,
    bucket: str,
    s3_client: Any,
    swift_connection: swiftclient.Connection,
    creds: dict[str, str],
    tmp_path: Path,
) -> None:
    large = os.urandom(LARGE)
    files = {**SMALL_FILES, "model/weights.bin": large}
    src = tmp_path / "results"
    for relative, data in files.items():
        (src / relative).parent.mkdir(parents=True, exist_ok=True)
        (src / relative).write_bytes(data)
    prefix = "training-It_x1"

    result = upload_tree(
        open_results_store(kind, bucket, creds),
        src,
        prefix,
        workers=4,
        part_size=PART_SIZE,
        multipart_threshold=THRESHOLD,
    )
    assert (result.files, result.bytes, result.skipped) == (len(files), sum(map(len, files.values())), 0)
    assert keys_other_api(kind, bucket, s3_client, swift_connection) == {f"{prefix}/{r}" for r in files}
    for relative, data in files.items():
        assert read_other_api(kind, bucket, f"{prefix}/{relative}", s3_client, swift_connection) == data, (
            relative
        )

    # The large file went in 3 parts: an S3 multipart upload / a Swift static large object.
    parts = [large[i : i + PART_SIZE] for i in range(0, LARGE, PART_SIZE)]
    assert len(parts) == 3
    big_key = f"{prefix}/model/weights.bin"
    listing = {obj["name"]: obj for obj in swift_connection.get_container(bucket, full_listing=True)[1]}
    # Swift's SLO ETag: the MD5 of the concatenated (hex) MD5s of the segments.
    slo_etag = md5("".join(md5(p).hexdigest() for p in parts).encode()).hexdigest()
    assert listing[big_key].get("slo_etag", "").strip('"') == slo_etag, listing[big_key]
    headers = swift_connection.head_object(bucket, big_key)
    assert headers.get("x-static-large-object") == "True"
    assert int(headers["content-length"]) == LARGE
    s3_etag = s3_client.head_object(Bucket=bucket, Key=big_key)["ETag"].strip('"')
    if kind == "s3":  # S3's multipart ETag: the MD5 of the concatenated (binary) MD5s of the parts, "-3"
        assert s3_etag == md5(b"".join(md5(p).digest() for p in parts)).hexdigest() + "-3"
    else:  # s3api shows an SLO it did not make with the SLO's ETag and "-N"
        assert s3_etag == f"{slo_etag}-N"
    # Small files are plain objects whose ETag is their MD5.
    for relative, data in SMALL_FILES.items():
        assert listing[f"{prefix}/{relative}"]["hash"] == md5(data).hexdigest()
        assert "slo_etag" not in listing[f"{prefix}/{relative}"]


# --- 14. one file; symbolic links ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_upload_single_file_to_a_key(
    kind: str,
    bucket: str,
    s3_client: Any,
    swift_connection: swiftclient.Connection,
    creds: dict[str, str],
    tmp_path: Path,
) -> None:
    data = os.urandom(100_000)
    (tmp_path / "model.zip").write_bytes(data)
    key = "training-It_x1/_submitted_code/model.zip"
    result = upload_tree(open_results_store(kind, bucket, creds), tmp_path / "model.zip", key)
    assert (result.files, result.bytes, result.skipped) == (1, len(data), 0)
    assert keys_other_api(kind, bucket, s3_client, swift_connection) == {key}
    assert read_other_api(kind, bucket, key, s3_client, swift_connection) == data


@pytest.mark.parametrize("kind", KINDS)
def test_upload_never_follows_a_symlink_nor_reads_a_special_file(
    kind: str,
    bucket: str,
    s3_client: Any,
    swift_connection: swiftclient.Connection,
    creds: dict[str, str],
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"not a result\n")
    src = tmp_path / "results"
    (src / "sub").mkdir(parents=True)
    (src / "real.txt").write_bytes(b"real\n")
    (src / "sub" / "link-inside").symlink_to("../real.txt")
    (src / "link-outside").symlink_to(outside / "secret.txt")
    (src / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(src / "fifo")

    result = upload_tree(open_results_store(kind, bucket, creds), src, "run")
    # the tree may be the training container's: even a link inside it is not followed
    assert (result.files, result.skipped) == (1, 4)
    assert keys_other_api(kind, bucket, s3_client, swift_connection) == {"run/real.txt"}


def test_upload_counts_a_directory_symlink_leading_outside_as_skipped(
    bucket: str,
    s3_client: Any,
    swift_connection: swiftclient.Connection,
    creds: dict[str, str],
    tmp_path: Path,
) -> None:
    """``UploadResult.skipped`` counts "symbolic links leading outside the tree": a link to a folder
    outside is one, and leaving it out silently hides from the user that results were not uploaded."""
    outside = tmp_path / "dataset"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"data that is not a result\n")
    src = tmp_path / "results"
    src.mkdir()
    (src / "model.bin").write_bytes(b"model\n")
    (src / "data").symlink_to(outside, target_is_directory=True)

    result = upload_tree(open_results_store("s3", bucket, creds), src, "run")
    assert keys_other_api("s3", bucket, s3_client, swift_connection) == {"run/model.bin"}
    assert (result.files, result.skipped) == (1, 1)


# --- 15. small documents ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_put_json_get_json_and_put_bytes(
    kind: str,
    bucket: str,
    s3_client: Any,
    swift_connection: swiftclient.Connection,
    creds: dict[str, str],
) -> None:
    store = open_results_store(kind, bucket, creds)
    document = {
        "training_id": "training-It_x1",
        "state": "COMPLETED",
        "history": [{"state": "QUEUED", "at": "2026-11-26T05:00:00Z"}, {"state": "COMPLETED", "at": None}],
        "metrics": {"accuracy": 0.98, "loss": [0.5, 0.25]},
        "name": "ünïcødé ✓",
    }
    key = "training-It_x1/_status.json"
    etag = store.put_json(key, document)
    raw = read_other_api(kind, bucket, key, s3_client, swift_connection)
    assert etag == md5(raw).hexdigest()
    assert json.loads(raw) == document
    assert store.get_json(key) == document
    assert swift_connection.head_object(bucket, key)["content-type"].startswith("application/json")

    data = os.urandom(4096)
    odd_key = "dir with space/ünï ✓.bin"
    assert store.put_bytes(odd_key, data) == md5(data).hexdigest()
    assert read_other_api(kind, bucket, odd_key, s3_client, swift_connection) == data
    assert store.get_bytes(odd_key) == data
    assert store.put_bytes("empty", b"") == md5(b"").hexdigest()
    assert read_other_api(kind, bucket, "empty", s3_client, swift_connection) == b""


@pytest.mark.parametrize("kind", KINDS)
def test_put_bytes_damaged_in_transit_keeps_the_previous_content(
    kind: str,
    bucket: str,
    s3_client: Any,
    swift_connection: swiftclient.Connection,
    creds: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``put_bytes`` is "verified by its MD5": the store must refuse a body that is not the one whose MD5
    was sent, so that a damaged write never replaces the object (S3 checks Content-MD5: 400 BadDigest;
    Swift checks the request's ETag header: 422)."""
    store = open_results_store(kind, bucket, creds)
    key = "training-It_x1/_status.json"
    store.put_json(key, {"state": "PROCESSING"})
    before = read_other_api(kind, bucket, key, s3_client, swift_connection)

    send = store.request

    def damaging(method: str, key: str, **kwargs: Any) -> Any:
        body = kwargs.get("body")
        if method == "PUT" and body:
            kwargs["body"] = bytes([body[0] ^ 0x20]) + body[1:]  # same length, one bit changed
        return send(method, key, **kwargs)

    monkeypatch.setattr(store, "request", damaging)
    with pytest.raises(TransferError):
        store.put_json(key, {"state": "COMPLETED"})
    assert read_other_api(kind, bucket, key, s3_client, swift_connection) == before


# --- 16. a missing bucket ----------------------------------------------------------------------------------


def _drop_containers(swift: swiftclient.Connection, *names: str) -> None:
    for container in names:
        try:
            for obj in swift.get_container(container, full_listing=True)[1]:
                swift.delete_object(container, obj["name"])
            swift.delete_container(container)
        except swiftclient.ClientException:
            pass


@pytest.mark.parametrize("kind", KINDS)
def test_upload_to_missing_bucket_names_it(
    kind: str, creds: dict[str, str], swift_connection: swiftclient.Connection, tmp_path: Path
) -> None:
    missing = f"wmltrain-it-missing-{uuid.uuid4().hex[:12]}"
    src = tmp_path / "results"
    src.mkdir()
    (src / "model.bin").write_bytes(os.urandom(7 * MiB))  # multipart
    (src / "log.txt").write_bytes(b"log\n")
    try:
        with pytest.raises(WmlTrainError) as caught:
            upload_tree(
                open_results_store(kind, missing, creds),
                src,
                "run",
                part_size=PART_SIZE,
                multipart_threshold=THRESHOLD,
            )
    finally:
        _drop_containers(swift_connection, f"{missing}_segments")
    # Today: "S303 cannot upload .../log.txt: PUT swift http://... <missing>/run/log.txt: not found (404)" or
    # "S303 cannot start the upload of .../model.bin: POST s3 ... <missing>/run/model.bin: not found (404)":
    # the bucket is only part of a path, and "not found" reads as if a file were missing.
    assert f"bucket '{missing}' does not exist" in str(caught.value)


def test_upload_to_missing_swift_container_creates_nothing(
    creds: dict[str, str], swift_connection: swiftclient.Connection, tmp_path: Path
) -> None:
    """A large file for a container that does not exist: refused before anything is sent or created
    (today the segments container "<missing>_segments" is created, every segment is uploaded, and only
    the manifest's PUT finds out; the empty segments container is left behind)."""
    missing = f"wmltrain-it-missing-{uuid.uuid4().hex[:12]}"
    (tmp_path / "model.bin").write_bytes(os.urandom(7 * MiB))
    try:
        with pytest.raises(WmlTrainError):
            upload_tree(
                open_results_store("swift", missing, creds),
                tmp_path / "model.bin",
                "run/model.bin",
                part_size=PART_SIZE,
                multipart_threshold=THRESHOLD,
            )
        containers = {c["name"] for c in swift_connection.get_account(full_listing=True)[1]}
        assert {name for name in containers if name.startswith(missing)} == set()
    finally:
        _drop_containers(swift_connection, f"{missing}_segments")
