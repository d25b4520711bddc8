"""The staging cache never hands a principal bytes it could not GET itself (issue 10, hole 10).

Two principals of one Swift account, on the real Swift all-in-one (both APIs): the owner ``test:tester``
and ``test:reader``, a user without rights of its own to whom the container's ACL
(``X-Container-Read: test:reader``) grants listing and reading.  The object ``secret/model.bin`` is a
multipart upload, a static large object whose segments s3api keeps in ``<container>+segments``, whose
ACL does not name the reader: the reader can list the object, with its size and ETag, but cannot GET its
bytes (the proxy reads the segments as the reader) — list-without-read, which
the services' Swift (s3api without S3 ACLs, tempauth) cannot express otherwise (bucket policies and
per-object ACLs need ``s3_acl``).

The services' proxy knows one user only (``test:tester``): the test starts a private ``swift-proxy-server``
on another port with the same rings, storage servers and memcached, whose tempauth also knows
``test:reader``, and stops it at the end.  Both principals go through it, so that the cache entries of the
owner's staging (keyed by endpoint) are the ones the reader's staging would find.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import swiftclient

from airflow_wmltrain.errors import DataLoadError
from airflow_wmltrain.storage import open_store
from airflow_wmltrain.storage.cache import ObjectCache
from airflow_wmltrain.storage.staging import stage
from airflow_wmltrain.storage.transfer import RetryPolicy, TransferError
from tests.integration.service_helpers import free_port
from tests.integration.storage_helpers import KINDS, MiB, data_reference

READER = "test:reader"
READER_KEY = f"reader-{uuid.uuid4().hex[:12]}"
BIG_CACHE = 1 << 40


@pytest.fixture(scope="module")
def private_proxy(services: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second Swift proxy (the services' configuration plus the user ``test:reader``); its URL."""
    state = Path(services.get("WMLTRAIN_SERVICES_DIR", "/var/tmp/wmltrain-services"))
    config = configparser.RawConfigParser(strict=False)
    config.optionxform = str  # type: ignore[assignment,method-assign]
    config.read(state / "swift" / "etc" / "proxy-server.conf")
    port = free_port()
    config["DEFAULT"]["bind_port"] = str(port)
    config["DEFAULT"]["workers"] = "1"
    config["filter:tempauth"][f"user_test_{READER.split(':')[1]}"] = READER_KEY  # no .admin: ACLs only
    work = tmp_path_factory.mktemp("private-proxy")
    conf = work / "proxy-server.conf"
    with conf.open("w") as file:
        config.write(file)
    log = (work / "proxy.log").open("wb")
    proc = subprocess.Popen(
        ["/usr/bin/swift-proxy-server", str(conf), "-v"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthcheck", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"the private Swift proxy did not start: {(work / 'proxy.log').read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _creds(services: dict[str, str], proxy: str, user: str, key: str) -> dict[str, str]:
    return {
        "user": user,
        "key": key,
        "s3_endpoint": proxy,
        "s3_region": services["WMLTRAIN_S3_REGION"],
        "swift_auth_url": f"{proxy}/auth/v1.0",
    }


@pytest.fixture
def shared_data(
    bucket: str, s3_client: Any, swift_connection: swiftclient.Connection, segments_cleanup: str
) -> dict[str, bytes]:
    """``bucket`` readable by the reader through its ACL, holding ``open/a.bin`` (readable) and
    ``secret/model.bin``: a multipart upload, i.e. a static large object whose segments s3api keeps in
    ``<bucket>+segments``, which is not open to the reader."""
    objects = {"open/a.bin": os.urandom(300 * 1024), "secret/model.bin": os.urandom(5 * MiB + 100 * 1024)}
    swift_connection.post_container(bucket, {"X-Container-Read": READER})
    secret = objects["secret/model.bin"]
    upload = s3_client.create_multipart_upload(Bucket=bucket, Key="secret/model.bin")["UploadId"]
    parts = []
    for number, part in enumerate((secret[: 5 * MiB], secret[5 * MiB :]), start=1):
        answer = s3_client.upload_part(
            Bucket=bucket, Key="secret/model.bin", UploadId=upload, PartNumber=number, Body=part
        )
        parts.append({"PartNumber": number, "ETag": answer["ETag"]})
    s3_client.complete_multipart_upload(
        Bucket=bucket, Key="secret/model.bin", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    # s3api gives the segments' container the bucket's ACL when it makes it: take it away.
    swift_connection.post_container(f"{bucket}+segments", {"X-Remove-Container-Read": "x"})
    s3_client.put_object(Bucket=bucket, Key="open/a.bin", Body=objects["open/a.bin"])
    return objects


def _digests(root: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", KINDS)
def test_a_principal_that_can_list_but_not_read_gets_nothing_through_the_cache(
    kind: str,
    services: dict[str, str],
    private_proxy: str,
    bucket: str,
    shared_data: dict[str, bytes],
    tmp_path: Path,
) -> None:
    owner = _creds(services, private_proxy, services["WMLTRAIN_STORE_USER"], services["WMLTRAIN_STORE_KEY"])
    reader = _creds(services, private_proxy, READER, READER_KEY)
    retry = RetryPolicy(attempts=2, base_delay=0.01)
    secret = hashlib.sha256(shared_data["secret/model.bin"]).hexdigest()

    # The premise, checked on the store itself: the reader lists the secret object but cannot GET it.
    with open_store(data_reference(kind, bucket, reader), retry=retry) as store:
        listed = {info.key: info.size for info in store.list_objects()}
        assert listed == {key: len(data) for key, data in shared_data.items()}
        assert store.get_bytes("open/a.bin") == shared_data["open/a.bin"]
        with pytest.raises(TransferError):
            store.get_bytes("secret/model.bin")

    cache = ObjectCache(tmp_path / "cache", max_bytes=BIG_CACHE)
    with open_store(data_reference(kind, bucket, owner), retry=retry) as store:
        result = stage(store, tmp_path / "owner", cache=cache)
    assert result.fetched_files == 2
    assert secret in _digests(tmp_path / "owner")

    # The reader's stagings on the same host, with the owner's entries in the cache.  What it may read it
    # fetches itself (the owner's entry is not linked), then re-stages warm from its own entry.
    with open_store(data_reference(kind, bucket, reader), retry=retry) as store:
        first = stage(store, tmp_path / "reader-open-1", prefix="open/", cache=cache)
        again = stage(store, tmp_path / "reader-open-2", prefix="open/", cache=cache)
        assert (first.fetched_files, first.from_cache) == (1, 0), "not linked from the owner's entry"
        assert (again.fetched_files, again.from_cache) == (0, 1), "the reader's own re-stage is warm"
        assert (tmp_path / "reader-open-2" / "a.bin").read_bytes() == shared_data["open/a.bin"]
        # What it may list but not read it does not get: its own GET is refused, whatever the cache holds.
        with pytest.raises(DataLoadError, match=r"secret/model\.bin") as refused:
            stage(store, tmp_path / "reader", cache=cache)
        assert refused.value.code == "S302"
        assert secret not in _digests(tmp_path / "reader"), "the reader got the secret through the cache"
    cached = [hashlib.sha256(p.read_bytes()).hexdigest() for p in cache.objects.rglob("*") if p.is_file()]
    assert cached.count(secret) == 1, "the owner's entry only"
