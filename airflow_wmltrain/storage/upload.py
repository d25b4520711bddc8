"""Results upload: a local tree (or one file) to ``<bucket>/<prefix>/...``, concurrent and verified.

Small files go in one ``PUT``; files from ``multipart_threshold`` on go as parts of ``part_size`` sent
concurrently (S3 multipart upload, Swift static large object), so one large model file uses every
connection.  Each body is read once, hashed while it is sent, and the store's ETag (the MD5 it
computed) must match, else the part is sent again (retries with backoff, as for downloads).
Progress goes to the log at an interval; a failure is raised as
:class:`~airflow_wmltrain.errors.ResultsStoreError` (S303) naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from airflow_wmltrain.errors import ResultsStoreError
from airflow_wmltrain.storage.base import ObjectStore, UploadedPart
from airflow_wmltrain.storage.progress import DEFAULT_INTERVAL, Progress, TransferResult, megabytes
from airflow_wmltrain.storage.transfer import (
    SignedRequest,
    TransferError,
    etag_is_md5,
    upload_from_fd,
    with_retries,
)

DEFAULT_WORKERS = 16
DEFAULT_PART_SIZE = 64 * 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 128 * 1024 * 1024

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadResult(TransferResult):
    """What an upload did.

    :param files: files uploaded.
    :param bytes: their total size.
    :param seconds: wall time.
    :param skipped: entries not uploaded (symbolic links leading outside the tree, special files).
    """

    skipped: int = 0

    def summary(self) -> str:
        return self.headline("uploaded") + (f", {self.skipped} skipped" if self.skipped else "")


def _files(root: Path, log: logging.Logger) -> tuple[list[tuple[Path, str, int]], int]:
    """Regular files under ``root``: ``(path, relative, size)``, and how many entries were skipped.

    A symbolic link to a file inside the tree is uploaded as that file; links leading outside the tree,
    links to folders and special files are skipped with a warning.
    """
    found: list[tuple[Path, str, int]] = []
    skipped = 0
    real_root = root.resolve()
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in [d for d in dirs if (Path(folder) / d).is_symlink()]:
            # os.walk does not descend into linked folders: say so rather than drop them silently
            log.warning("Not uploading %s: a symbolic link to a folder", Path(folder) / name)
            skipped += 1
        for name in sorted(names):
            path = Path(folder) / name
            real = path.resolve()
            if not real.is_file() or (path.is_symlink() and not real.is_relative_to(real_root)):
                log.warning("Not uploading %s: not a regular file inside %s", path, root)
                skipped += 1
                continue
            found.append((path, path.relative_to(root).as_posix(), real.stat().st_size))
    return found, skipped


def _object_key(prefix: str, relative: str) -> str:
    return f"{prefix.rstrip('/')}/{relative}" if prefix.strip("/") else relative


@dataclass(eq=False)
class _Uploader:
    """One upload: the store, the workers, the counters; parts of at least the store's minimum size."""

    store: ObjectStore
    pool: ThreadPoolExecutor
    progress: Progress
    log: logging.Logger
    part_size: int
    threshold: int

    def __post_init__(self) -> None:
        self.part_size = max(self.part_size, self.store.min_part_size)
        self.threshold = max(self.threshold, self.part_size)

    def send(
        self,
        key: str,
        path: Path,
        sign: Callable[[Mapping[str, str]], SignedRequest],
        offset: int,
        length: int,
    ) -> str:
        """One ``PUT`` of a file region, which the store checks against its MD5; returns the ETag."""

        def attempt() -> str:
            digest = _md5_of(path, offset, length)
            md5 = digest.hex()
            request = sign(self.store.integrity_headers(digest))
            with open(path, "rb") as stream:
                headers = upload_from_fd(
                    self.store.http, request, self.store, key, stream.fileno(), offset=offset, length=length
                )
            etag = headers.get("etag", "").strip('"').lower()
            if etag != md5 and etag_is_md5(headers.get):
                raise TransferError(
                    f"PUT {self.store.describe(key)}: the store computed MD5 {etag or '(none)'}, "
                    f"the file has {md5}",
                    transient=True,
                )
            return etag

        def on_retry(err: TransferError) -> None:
            self.progress.retried()
            self.log.warning("Retrying the upload of %s: %s", key, err)

        try:
            etag = with_retries(self.store, self.store.retry, attempt, on_retry=on_retry)
        except TransferError as err:
            raise ResultsStoreError(f"cannot upload {path}: {err}") from None
        self.progress.add(length, files=0)
        return etag

    def upload(self, path: Path, key: str, size: int) -> list[Future[object]]:
        """Queue the upload of one file; returns the futures to wait for."""
        if size < self.threshold:

            def whole() -> object:
                etag = self.send(
                    key, path, lambda headers: self.store.sign("PUT", key, headers=headers), 0, size
                )
                self.progress.add(0)
                return etag

            return [self.pool.submit(whole)]
        try:
            upload_id = self.store.start_multipart(key)
        except TransferError as err:
            raise ResultsStoreError(f"cannot start the upload of {path}: {err}") from None
        ranges = [
            (n + 1, offset, min(self.part_size, size - offset))
            for n, offset in enumerate(range(0, size, self.part_size))
        ]
        parts: list[UploadedPart] = []
        lock = threading.Lock()
        remaining = [len(ranges)]

        def part(number: int, offset: int, length: int) -> object:
            try:
                etag = self.send(
                    key,
                    path,
                    lambda headers: self.store.sign_part(key, upload_id, number, headers=headers),
                    offset,
                    length,
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    self.store.abort_multipart(key, upload_id)
                raise
            with lock:
                parts.append(UploadedPart(number, etag, length))
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:  # the thread that sends the last part assembles the object
                try:
                    self.store.complete_multipart(key, upload_id, parts)
                except TransferError as err:
                    with contextlib.suppress(Exception):
                        self.store.abort_multipart(key, upload_id)
                    raise ResultsStoreError(f"cannot complete the upload of {path}: {err}") from None
                self.progress.add(0)
            return None

        return [self.pool.submit(part, *r) for r in ranges]


def _md5_of(path: Path, offset: int, length: int) -> bytes:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        stream.seek(offset)
        remaining = length
        while remaining:
            chunk = stream.read(min(remaining, 4 * 1024 * 1024))
            if not chunk:
                raise ResultsStoreError(f"{path} changed while it was uploaded (shorter than expected)")
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.digest()


def upload_tree(
    store: ObjectStore,
    src: str | os.PathLike[str],
    prefix: str,
    *,
    workers: int = DEFAULT_WORKERS,
    part_size: int = DEFAULT_PART_SIZE,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    log: logging.Logger | None = None,
    progress_interval: float = DEFAULT_INTERVAL,
) -> UploadResult:
    """Upload every regular file under ``src`` to ``<prefix>/<relative path>`` (or one file to ``prefix``).

    :param store: the results bucket.
    :param src: a directory, or a single file (uploaded as the key ``prefix``).
    :param prefix: the key prefix (``<training-id>/``), or the key for a single file.
    :param workers: concurrent transfers.
    :param part_size: size of multipart parts.
    :param multipart_threshold: files of at least this size are sent in parts.
    :param log: where progress goes.
    :param progress_interval: seconds between progress lines.
    :raises CredentialsError: (C103) the store refused the credentials.
    :raises BucketNotFoundError: (C101) the results bucket does not exist.
    :raises ResultsStoreError: (S303) a file could not be uploaded.
    """
    log = log or logger
    root = Path(src)
    if root.is_file():
        files, skipped = [(root, "", root.stat().st_size)], 0
    elif root.is_dir():
        files, skipped = _files(root, log)
    else:
        raise ResultsStoreError(f"nothing to upload: {root} does not exist")
    try:
        store.check_bucket(field="training_results_reference.target.bucket")
    except TransferError as err:
        raise ResultsStoreError(f"cannot reach {store.describe()}: {err}") from None
    total = sum(size for _, _, size in files)
    log.info(
        "Uploading %d files, %s from %s to %s", len(files), megabytes(total), root, store.describe(prefix)
    )
    progress = Progress("uploaded", len(files), total, log, progress_interval)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="wmltrain-upload") as pool:
        uploader = _Uploader(store, pool, progress, log, part_size, multipart_threshold)
        futures: list[Future[object]] = []
        try:
            for path, relative, size in files:
                key = _object_key(prefix, relative) if relative else prefix
                futures += uploader.upload(path, key, size)
            progress.wait(futures)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    result = UploadResult(len(files), total, progress.seconds, skipped)
    log.info("Upload done: %s", result.summary())
    return result
