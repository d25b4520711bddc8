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
import stat
import threading
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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
#: The longest object name S3 and Swift accept (bytes of UTF-8).
MAX_KEY_BYTES = 1024

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadResult(TransferResult):
    """What an upload did.

    :param files: files uploaded.
    :param bytes: their total size.
    :param seconds: wall time.
    :param skipped: entries not uploaded (symbolic links, special files, reserved names, unreadable).
    """

    skipped: int = 0

    def summary(self) -> str:
        return self.headline("uploaded") + (f", {self.skipped} skipped" if self.skipped else "")


@dataclass(frozen=True)
class _Listed:
    """A regular file found by the walk: where it is, its key below the prefix, and which file it was.

    The file is opened again for each part; ``device``/``inode`` make sure that what is opened (never
    through a link) is the file that was listed.
    """

    path: Path
    relative: str
    size: int
    device: int
    inode: int

    def open(self) -> int:
        """A descriptor of the listed file, opened without following a link (closed by the caller).

        :raises ResultsStoreError: the name now leads elsewhere (a link, a FIFO, another file).
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise ResultsStoreError(f"cannot upload {self.path}: {err.strerror or err}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (self.device, self.inode):
            os.close(fd)
            raise ResultsStoreError(f"cannot upload {self.path}: it was replaced while it was uploaded")
        return fd


@dataclass
class _Tree:
    """What :func:`_files` found: the files to upload, entries skipped, and entries the worker cannot read."""

    files: list[_Listed] = field(default_factory=list)
    skipped: int = 0
    unreadable: list[str] = field(default_factory=list)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept by the file system's surrogateescape
        return False
    return True


def _is_reserved(relative: str, reserved: Collection[str]) -> str | None:
    """The reserved name (``name`` or folder ``name/``) that ``relative`` is or falls under, if any."""
    for name in reserved:
        if relative == name or relative.startswith(name.rstrip("/") + "/"):
            return name
    return None


def _files(root: Path, log: logging.Logger | None, reserved: Collection[str] = ()) -> _Tree:
    """Regular files under ``root``, found without following any link.

    What is under ``root`` may have been written by the training container: a symbolic link (to a file
    or a folder, inside the tree or not), a FIFO, a socket or a device is never followed nor read, only
    named in one warning each.  Folders are listed through descriptors opened with ``O_NOFOLLOW``, so a
    link never leads the walk elsewhere.  Files under a ``reserved`` name are not uploaded (warned);
    folders and files the worker cannot read are listed in ``unreadable`` (warned) and not uploaded.
    """
    walk = _Walk(log, reserved)
    walk.folder(None, root, "")
    return walk.tree


@dataclass
class _Walk:
    """The walk of :func:`_files`."""

    log: logging.Logger | None
    reserved: Collection[str]
    tree: _Tree = field(default_factory=_Tree)

    def skip(self, path: Path, why: str) -> None:
        if self.log is not None:
            self.log.warning("Not uploading %s: %s", path, why)
        self.tree.skipped += 1

    def unreadable(self, path: Path, relative: str, what: str) -> None:
        if self.log is not None:
            self.log.warning("Cannot upload %s: the worker may not read this %s", path, what)
        self.tree.unreadable.append(relative)

    def folder(self, parent: int | None, path: Path, relative: str) -> None:
        """List the folder ``path`` (``relative`` ends in ``/`` unless it is the top)."""
        name = path if parent is None else path.name
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except PermissionError:
            self.unreadable(path, relative, "folder")
            return
        except OSError as err:
            self.skip(path, f"cannot open the folder ({err.strerror or err})")
            return
        try:
            with os.scandir(fd) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except PermissionError:
            self.unreadable(path, relative, "folder")
            entries = []
        try:
            for entry in entries:
                self.entry(fd, path / entry.name, relative + entry.name, entry)
        finally:
            os.close(fd)

    def entry(self, fd: int, path: Path, relative: str, entry: os.DirEntry[str]) -> None:
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            self.folder(fd, path, relative + "/")
        elif not stat.S_ISREG(info.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            self.skip(path, f"{kind} (links and special files are never followed)")
        elif not _is_utf8(relative):
            self.skip(path, "its name is not UTF-8 (object names are); rename it")
        elif (name := _is_reserved(relative, self.reserved)) is not None:
            self.skip(path, f"the name {name} is reserved for the run's own records; use another name")
        elif not os.access(entry.name, os.R_OK, dir_fd=fd):
            self.unreadable(path, relative, "file")
        else:
            self.tree.files.append(_Listed(path, relative, info.st_size, info.st_dev, info.st_ino))


def unreadable_entries(root: str | os.PathLike[str]) -> list[str]:
    """The entries under ``root`` (relative, folders ending in ``/``) that the worker may not read.

    Files a container's root user made for itself (``0600``, folders ``0700``): the caller copies the
    tree out through the Docker API instead (``TrainingDockerHook.copy_out``).
    """
    return _files(Path(root), None).unreadable  # quiet: the upload itself warns


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
        listed: _Listed,
        sign: Callable[[Mapping[str, str]], SignedRequest],
        offset: int,
        length: int,
    ) -> str:
        """One ``PUT`` of a file region, which the store checks against its MD5; returns the ETag."""
        path = listed.path

        def attempt() -> str:
            fd = listed.open()
            try:
                digest = _md5_of(fd, path, offset, length)
                md5 = digest.hex()
                request = sign(self.store.integrity_headers(digest))
                headers = upload_from_fd(
                    self.store.http, request, self.store, key, fd, offset=offset, length=length
                )
            finally:
                os.close(fd)
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

    def upload(self, listed: _Listed, key: str) -> list[Future[object]]:
        """Queue the upload of one file; returns the futures to wait for."""
        path, size = listed.path, listed.size
        if size < self.threshold:

            def whole() -> object:
                etag = self.send(
                    key, listed, lambda headers: self.store.sign("PUT", key, headers=headers), 0, size
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
                    listed,
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


def _md5_of(fd: int, path: Path, offset: int, length: int) -> bytes:
    digest = hashlib.md5(usedforsecurity=False)
    remaining = length
    while remaining:
        chunk = os.pread(fd, min(remaining, 4 * 1024 * 1024), offset)
        if not chunk:
            raise ResultsStoreError(f"{path} changed while it was uploaded (shorter than expected)")
        digest.update(chunk)
        remaining -= len(chunk)
        offset += len(chunk)
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
    reserved: Collection[str] = (),
) -> UploadResult:
    """Upload every regular file under ``src`` to ``<prefix>/<relative path>`` (or one file to ``prefix``).

    No link under ``src`` is ever followed, and only regular files are read (:func:`_files`); each is
    opened with ``O_NOFOLLOW`` and must be the very file that was listed.

    :param store: the results bucket.
    :param src: a directory, or a single file (uploaded as the key ``prefix``).
    :param prefix: the key prefix (``<training-id>/``), or the key for a single file.
    :param workers: concurrent transfers.
    :param part_size: size of multipart parts.
    :param multipart_threshold: files of at least this size are sent in parts.
    :param log: where progress goes.
    :param progress_interval: seconds between progress lines.
    :param reserved: relative names under ``src`` (a folder ends in ``/``) that are not uploaded: the
        keys of the run's own records; each one found is named in a warning.
    :raises CredentialsError: (C103) the store refused the credentials.
    :raises BucketNotFoundError: (C101) the results bucket does not exist.
    :raises ResultsStoreError: (S303) a file could not be uploaded.
    """
    log = log or logger
    root = Path(src)
    try:
        info = root.lstat()
    except FileNotFoundError:
        raise ResultsStoreError(f"nothing to upload: {root} does not exist") from None
    if stat.S_ISREG(info.st_mode):
        files, skipped = [_Listed(root, "", info.st_size, info.st_dev, info.st_ino)], 0
    elif stat.S_ISDIR(info.st_mode):
        tree = _files(root, log, reserved)
        files, skipped = [], tree.skipped + len(tree.unreadable)
        for listed in tree.files:
            if len(_object_key(prefix, listed.relative).encode()) > MAX_KEY_BYTES:
                log.warning(
                    "Not uploading %s: its object name would be longer than %d bytes",
                    listed.path,
                    MAX_KEY_BYTES,
                )
                skipped += 1
            else:
                files.append(listed)
    else:
        raise ResultsStoreError(f"nothing to upload: {root} is not a regular file or a folder")
    try:
        store.check_bucket(field="training_results_reference.target.bucket")
    except TransferError as err:
        raise ResultsStoreError(f"cannot reach {store.describe()}: {err}") from None
    total = sum(listed.size for listed in files)
    log.info(
        "Uploading %d files, %s from %s to %s", len(files), megabytes(total), root, store.describe(prefix)
    )
    progress = Progress("uploaded", len(files), total, log, progress_interval)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="wmltrain-upload") as pool:
        uploader = _Uploader(store, pool, progress, log, part_size, multipart_threshold)
        futures: list[Future[object]] = []
        try:
            for listed in files:
                key = _object_key(prefix, listed.relative) if listed.relative else prefix
                futures += uploader.upload(listed, key)
            progress.wait(futures)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    result = UploadResult(len(files), total, progress.seconds, skipped)
    log.info("Upload done: %s", result.summary())
    return result
