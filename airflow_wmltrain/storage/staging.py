"""Staging: every object of a bucket (or prefix) into a run's data directory, verified and resumable.

1. List the objects and plan their local paths (a key that would leave the data directory, or that is
   both a file and a folder, is refused before anything is fetched).
2. Objects already staged (a previous, interrupted staging) are kept as they are.
3. Each other object is hard-linked from the host's content cache (the entries this principal fetched:
   :func:`cache_principal`), or fetched into it first: one
   streamed GET, verified (size always, MD5 when the ETag is one), retried with backoff, written
   under a temporary name and renamed.  When another run is fetching the same object, this one does
   other objects first and links that one once it is there (a grid on one host fetches each object
   once).  Without a cache, objects are fetched straight into the data directory (still under a
   temporary name) and remember their ETag in an extended attribute, for resuming.

Progress (files, bytes, rate, cache hits) goes to the log at an interval; failures are raised as
:class:`~airflow_wmltrain.errors.DataLoadError` (S302) naming the object.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from airflow_wmltrain.errors import DataLoadError
from airflow_wmltrain.storage.base import ObjectInfo, ObjectStore
from airflow_wmltrain.storage.cache import ObjectCache
from airflow_wmltrain.storage.progress import DEFAULT_INTERVAL, Progress, TransferResult, megabytes
from airflow_wmltrain.storage.s3 import S3Store
from airflow_wmltrain.storage.swift import SwiftStore
from airflow_wmltrain.storage.transfer import TransferError, download_to_fd, with_retries

DEFAULT_WORKERS = 16
RANGE_WORKERS = 4  # concurrent ranges of one large object
DEFAULT_RANGE_SIZE = 64 * 1024 * 1024
# A run following another's staging of the same data looks for newly cached objects this often; a look
# goes on until this many objects in a row are not there yet (the leader fetches in listing order, a few
# dozen at once).  Every FOLLOW_FULL_LOOK_S seconds at least (and never more than 5 % of the time), a look
# checks every object still missing: the leader may leave more than the lookahead for its end.
FOLLOW_INTERVAL = 0.2
FOLLOW_LOOKAHEAD = 64
FOLLOW_FULL_LOOK_S = 2.0
FOLLOW_FULL_LOOK_TIMES = 20  # the time between two full looks is at least this many times the last one's
ETAG_XATTR = "user.wmltrain.etag"
PARTIAL_DIR = ".wmltrain-partial"

logger = logging.getLogger(__name__)


class Outcome(Enum):
    STAGED = "already staged"
    CACHED = "linked from the cache"
    FETCHED = "fetched"
    DEFERRED = "being fetched by another run"


@dataclass(frozen=True)
class PlannedObject:
    """An object and the path it gets in the data directory.

    :param info: the object as listed.
    :param path: its path relative to the data directory (posix).
    """

    info: ObjectInfo
    path: str


@dataclass(frozen=True)
class StagingResult(TransferResult):
    """What a staging did.

    :param files: files in the data directory.
    :param bytes: their total size.
    :param seconds: wall time.
    :param from_cache: files hard-linked from the cache without fetching.
    :param fetched_files: files fetched from the store by this staging.
    :param fetched_bytes: bytes fetched from the store by this staging.
    :param already_staged: files kept from an earlier, interrupted staging.
    """

    from_cache: int
    fetched_files: int
    fetched_bytes: int
    already_staged: int = 0

    def summary(self) -> str:
        return (
            f"{self.headline('staged')}: {self.from_cache} from the cache, "
            f"{self.fetched_files} fetched ({megabytes(self.fetched_bytes)})"
            + (f", {self.already_staged} already staged" if self.already_staged else "")
        )


def plan_objects(objects: Sequence[ObjectInfo], prefix: str) -> list[PlannedObject]:
    """The local path of each object, refusing keys that would escape or clash.

    Folder markers (keys ending in ``/``) are skipped; empty segments (``a//b``) are dropped.

    :raises DataLoadError: (S302) naming the offending key.
    """
    planned: dict[str, PlannedObject] = {}
    for info in objects:
        relative = info.key[len(prefix) :] if info.key.startswith(prefix) else info.key
        if relative.endswith("/") or not relative:
            continue
        if "\0" in relative:
            raise DataLoadError(f"object key {info.key!r} contains a NUL character; rename the object")
        parts = [part for part in relative.split("/") if part]
        if any(part in (".", "..") for part in parts):
            raise DataLoadError(
                f"object key {info.key!r} would escape the data directory ('.' or '..' segment); "
                "rename the object"
            )
        path = "/".join(parts)
        if path in planned:
            raise DataLoadError(
                f"object keys {planned[path].info.key!r} and {info.key!r} map to the same file {path!r}"
            )
        planned[path] = PlannedObject(info, path)
    for path, item in planned.items():
        parent = path.rpartition("/")[0]
        while parent:
            if parent in planned:
                raise DataLoadError(
                    f"object {planned[parent].info.key!r} is a file "
                    f"but {item.info.key!r} needs it to be a folder"
                )
            parent = parent.rpartition("/")[0]
    return sorted(planned.values(), key=lambda p: p.path)


def cache_principal(store: ObjectStore) -> str | None:
    """Who reads ``store``, as the cache keys its entries (:meth:`ObjectCache.entry`); ``None`` when the
    store's kind has no known principal (it is then staged without the cache).

    S3: the access key id (temporary credentials: each session's own).  Swift: the auth URL, the user's
    domain and the user (the project is in the storage URL, the entries' endpoint).  A principal given
    with a wrong secret never reaches the cache: :meth:`ObjectStore.check_bucket` refuses it first.
    """
    if isinstance(store, S3Store):
        return f"s3\0{store.credentials().access_key}"
    if isinstance(store, SwiftStore):
        config = store.auth.hook.auth_config
        return f"swift\0{config.auth_url}\0{config.user_domain_name or ''}\0{config.user}"
    return None


def _cache_for(
    store: ObjectStore, cache: ObjectCache | None, prefix: str, log: logging.Logger
) -> tuple[ObjectCache | None, str, str]:
    """The cache to stage ``store`` through (``None``: none), the principal its entries are keyed by, and
    the identity of this staging's data for that principal (its listing and its lock in the cache)."""
    principal = cache_principal(store) if cache is not None else None
    if cache is not None and principal is None:
        log.warning("%s: no principal known for this kind of store: staging without the cache", store.kind)
        cache = None
    principal = principal or ""
    return cache, principal, staging_identity(principal, store, prefix)


def staging_identity(principal: str, store: ObjectStore, prefix: str) -> str:
    """The identity of one staging's data (``prefix``, ending in ``/`` unless empty) for ``principal``:
    the key of its listing and of its lock in the cache."""
    return f"{principal}\0{store.endpoint}\0{store.bucket}\0{prefix}"


@dataclass(eq=False)
class _Stager:
    """One staging: the store, the destination, the cache, and the counters."""

    store: ObjectStore
    dest: Path
    cache: ObjectCache | None
    progress: Progress
    log: logging.Logger
    range_size: int | None = None
    verify_md5: bool = True
    principal: str = ""
    fetched_files: int = field(default=0, init=False)
    fetched_bytes: int = field(default=0, init=False)
    lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    copy_warned: bool = field(default=False, init=False)
    entries: dict[str, Path] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.endpoint = self.store.endpoint
        self.partial = self.dest / PARTIAL_DIR

    def entry(self, info: ObjectInfo) -> Path:
        """The object's cache entry, computed once per object: a follower asks at every look."""
        entry = self.entries.get(info.key)
        if entry is None:
            assert self.cache is not None
            entry = self.entries[info.key] = self.cache.entry(
                self.endpoint, self.store.bucket, info, principal=self.principal
            )
        return entry

    # --- resuming -------------------------------------------------------------------------------

    def already_staged(self, item: PlannedObject) -> bool:
        target = self.dest / item.path
        try:
            st = target.stat()
        except FileNotFoundError:
            return False
        if st.st_size != item.info.size:
            return False
        if self.cache is not None:
            entry = self.entry(item.info)
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(st, entry.stat()):
                    return True
        try:
            return os.getxattr(target, ETAG_XATTR).decode() == item.info.etag
        except OSError:
            return False

    # --- one object -------------------------------------------------------------------------------

    def stage(self, item: PlannedObject, *, blocking: bool) -> Outcome:
        if self.cache is None:
            self.fetch(item, self.dest / item.path, final=True)
            return Outcome.FETCHED
        entry = self.entry(item.info)
        for _ in range(3):  # an entry evicted between the check and the link is fetched again
            if self.cache.has(entry, item.info.size):
                if self.link(entry, item):
                    return Outcome.CACHED
                continue
            with self.cache.lock(entry, blocking=blocking) as locked:
                if not locked:
                    return Outcome.DEFERRED
                if not self.cache.has(entry, item.info.size):
                    temp = self.cache.temp_file()
                    try:
                        with self.cache.fetch_slot():
                            self.fetch(item, temp, final=False)
                        self.cache.commit(temp, entry)
                    finally:
                        with contextlib.suppress(FileNotFoundError):
                            temp.unlink()
                    fetched = True
                else:
                    fetched = False
            if self.link(entry, item):
                return Outcome.FETCHED if fetched else Outcome.CACHED
        raise DataLoadError(f"{self.store.describe(item.info.key)}: the cache entry keeps disappearing")

    def link_cached(self, item: PlannedObject) -> bool:
        """Link the object from the cache when it is there; ``False`` when it must be fetched."""
        if self.cache is None:
            return False
        entry = self.entry(item.info)
        return self.cache.has(entry, item.info.size) and self.link(entry, item)

    def link(self, entry: Path, item: PlannedObject) -> bool:
        """Hard-link a cache entry to the object's path (atomically replacing what is there)."""
        target = self.dest / item.path
        try:
            os.link(entry, target)  # the common case: nothing there yet; a link is atomic
        except FileNotFoundError:
            return False  # evicted meanwhile
        except FileExistsError:
            pass
        except OSError:
            pass
        else:
            ObjectCache.touch(entry)
            return True
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.link")
        try:
            os.link(entry, temp)
        except FileNotFoundError:
            return False  # evicted meanwhile
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM):
                raise
            if not self.copy_warned:
                self.copy_warned = True
                self.log.warning(
                    "Cannot hard-link from the cache %s into %s (%s): copying instead; put the cache and the "
                    "data directories on one file system ([wmltrain] staging_dir) to avoid copies",
                    self.cache.root if self.cache else "",
                    self.dest,
                    os.strerror(err.errno or 0),
                )
            shutil.copyfile(entry, temp)
        os.replace(temp, target)
        ObjectCache.touch(entry)
        return True

    def fetch_ranges(
        self, info: ObjectInfo, fd: int, size: int, on_retry: Callable[[TransferError], None]
    ) -> None:
        """GET a large object as concurrent byte ranges (each retried) into the file, and verify its MD5
        (when it has one) as the ranges arrive, in order."""
        ranges = [(offset, min(size, info.size - offset)) for offset in range(0, info.size, size)]
        os.posix_fallocate(fd, 0, info.size)  # a full disk is ENOSPC here, before any GET
        digest = hashlib.md5(usedforsecurity=False) if info.md5 and self.verify_md5 else None
        md5_etag = [True]

        def one(offset: int, length: int) -> None:
            def attempt() -> None:
                if not download_to_fd(
                    self.store.http,
                    self.store,
                    info.key,
                    fd,
                    size=info.size,
                    md5=None,
                    offset=offset,
                    length=length,
                    etag=info.etag,
                ):
                    md5_etag[0] = False

            with_retries(self.store, self.store.retry, attempt, on_retry=on_retry)

        # Ranges complete roughly in order: this thread hashes each one as soon as it and those before it
        # are in, so hashing overlaps the transfer. It reads them through a read-only mapping of the file:
        # the pages are in the page cache, mapped without a copy.
        with (
            ThreadPoolExecutor(max_workers=min(len(ranges), RANGE_WORKERS)) as pool,
            mmap.mmap(fd, info.size, access=mmap.ACCESS_READ) as mapped,
            memoryview(mapped) as whole,
        ):
            futures = [pool.submit(one, offset, length) for offset, length in ranges]
            try:
                for future, (offset, length) in zip(futures, ranges, strict=True):
                    future.result()
                    if digest is not None:
                        with whole[offset : offset + length] as part:
                            digest.update(part)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        # md5_etag: transfer.etag_is_md5 of every range's answer (not for SSE-KMS or customer keys)
        if digest is not None and md5_etag[0] and digest.hexdigest() != info.md5:
            message = f"GET {self.store.describe(info.key)}: content MD5 does not match the ETag {info.md5}"
            raise TransferError(message, transient=True)

    def fetch(self, item: PlannedObject, path: Path, *, final: bool) -> None:
        """GET the object into ``path`` (via a temporary name in the data directory when ``final``)."""
        info = item.info
        temp = self.partial / f"{uuid.uuid4().hex}" if final else path

        def on_retry(err: TransferError) -> None:
            self.progress.retried()
            self.log.warning("Retrying %s: %s", info.key, err)

        def attempt() -> None:
            fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                if self.range_size and info.size > 2 * self.range_size:
                    self.fetch_ranges(info, fd, self.range_size, on_retry)
                else:
                    download_to_fd(
                        self.store.http,
                        self.store,
                        info.key,
                        fd,
                        size=info.size,
                        md5=info.md5 if self.verify_md5 else None,
                        etag=info.etag,
                    )
            finally:
                os.close(fd)

        try:
            with_retries(self.store, self.store.retry, attempt, on_retry=on_retry)
        except (TransferError, OSError) as err:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            if isinstance(err, TransferError):
                raise DataLoadError(f"cannot stage {info.key!r}: {err}") from None
            raise
        if final:
            with contextlib.suppress(OSError):  # without xattrs, a resumed staging fetches the file again
                os.setxattr(temp, ETAG_XATTR, info.etag.encode())
            os.replace(temp, path)
        with self.lock:
            self.fetched_files += 1
            self.fetched_bytes += info.size


def _leader_gone(cache: ObjectCache, identity: str) -> bool:
    """Whether no run holds the staging lock of ``identity`` any more (it ended, or died)."""
    with cache.staging_lock(identity, blocking=False) as free:
        return free


def _leaders_listing(
    cache: ObjectCache, identity: str, log: logging.Logger, interval: float
) -> list[ObjectInfo] | None:
    """The listing the leader writes before it fetches; ``None`` if it ends (or dies) without one."""
    next_note = time.monotonic() + interval
    while True:
        objects = cache.read_listing(identity)
        if objects is not None:
            return objects
        if _leader_gone(cache, identity):
            return cache.read_listing(identity)
        if time.monotonic() >= next_note:
            log.info("Still waiting for the other run's listing")
            next_note = time.monotonic() + interval
        time.sleep(FOLLOW_INTERVAL)


def _linked(stager: _Stager, progress: Progress, item: PlannedObject) -> bool:
    """Link the object from the cache if it is there (and count it)."""
    if stager.link_cached(item):
        progress.add(item.info.size, cached=True)
        return True
    return False


def _follow(
    stager: _Stager, progress: Progress, cache: ObjectCache, identity: str, todo: list[PlannedObject]
) -> list[PlannedObject]:
    """Link the objects the leader fetches as they reach the cache, until it ends; returns those still
    missing then (the leader died or was stopped: the caller fetches them).

    Each look checks the gaps again (objects the leader has not fetched although it fetched later ones),
    then goes on from where the last look stopped until ``FOLLOW_LOOKAHEAD`` objects in a row are missing:
    it costs the gaps, what arrived since the last look and the lookahead, not the whole listing.  A full
    look, now and then, goes past any run of missing objects.
    """
    gaps: list[PlannedObject] = []
    cursor = 0
    next_report = time.monotonic() + progress.interval
    next_full = 0.0
    while True:
        leader_gone = _leader_gone(cache, identity)  # before the look: it then sees all the leader fetched
        started = time.monotonic()
        full = leader_gone or started >= next_full
        gaps = [item for item in gaps if not _linked(stager, progress, item)]
        misses_from: int | None = None  # where the current run of missing objects began
        index = cursor
        while index < len(todo):
            if _linked(stager, progress, todo[index]):
                if misses_from is not None:
                    gaps.extend(todo[misses_from:index])
                    misses_from = None
            elif misses_from is None:
                misses_from = index
            elif index - misses_from + 1 >= FOLLOW_LOOKAHEAD and not full:
                break
            index += 1
        cursor = index if misses_from is None else misses_from  # the last run of misses: looked at again
        if leader_gone or (not gaps and cursor == len(todo)):  # all linked: no need to wait for the leader
            return gaps + todo[cursor:]
        if full:
            next_full = time.monotonic() + max(
                FOLLOW_FULL_LOOK_S, FOLLOW_FULL_LOOK_TIMES * (time.monotonic() - started)
            )
        if time.monotonic() >= next_report:
            progress.report()
            next_report = time.monotonic() + progress.interval
        time.sleep(FOLLOW_INTERVAL)


def _fetch_all(
    stager: _Stager, progress: Progress, todo: list[PlannedObject], workers: int, log: logging.Logger
) -> None:
    """Stage the objects with a pool of threads; those another run is fetching are linked at the end."""

    def run(item: PlannedObject, blocking: bool) -> Outcome:
        outcome = stager.stage(item, blocking=blocking)
        if outcome is not Outcome.DEFERRED:
            progress.add(item.info.size, cached=outcome is Outcome.CACHED)
        return outcome

    if not todo:
        return
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="wmltrain-stage") as pool:
        try:
            futures = [pool.submit(run, item, False) for item in todo]
            progress.wait(futures)
            deferred = [item for item, f in zip(todo, futures, strict=True) if f.result() is Outcome.DEFERRED]
            if deferred:
                log.info("Waiting for %d objects that are being fetched concurrently", len(deferred))
                progress.wait([pool.submit(run, item, True) for item in deferred])
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def stage(
    store: ObjectStore,
    dest: str | os.PathLike[str],
    *,
    prefix: str = "",
    cache: ObjectCache | None = None,
    workers: int = DEFAULT_WORKERS,
    log: logging.Logger | None = None,
    progress_interval: float = DEFAULT_INTERVAL,
    range_size: int | None = DEFAULT_RANGE_SIZE,
    verify: str = "md5",
) -> StagingResult:
    """Copy every object under ``prefix`` into ``dest`` (created if missing), through the cache.

    :param store: the bucket to read.
    :param dest: the data directory.
    :param prefix: only objects under this prefix; their paths are relative to it.
    :param cache: the host's content cache; ``None`` fetches straight into ``dest``.
    :param workers: concurrent transfers.
    :param log: where progress goes (the task's logger).
    :param progress_interval: seconds between progress lines.
    :param range_size: objects larger than twice this are fetched as concurrent ranges of this size;
        ``None`` fetches every object with one streamed GET.
    :param verify: ``md5``: each object's size, and its content against its ETag when that is an MD5
        (hashed as the bytes arrive); ``size``: its size only (``[wmltrain] verify``).
    :raises CredentialsError: (C103) the store refused the credentials.
    :raises BucketNotFoundError: (C101) the bucket does not exist.
    :raises DataLoadError: (S302) an object could not be listed, fetched or verified.
    """
    log = log or logger
    target = Path(dest)
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # a prefix is a folder: "data" must not take "dataset/x"
    try:
        store.check_bucket(field="training_data_reference[0].source.bucket")
        cache, principal, identity = _cache_for(store, cache, prefix, log)
        with contextlib.ExitStack() as single_flight:
            objects = None
            # Runs staging the same data on this host at once (a grid): the first (the leader) lists and
            # fetches; the others follow it: they reuse its listing and link each object as it reaches the
            # cache (a few system calls per file), fetching nothing.  If the leader dies, its lock goes with
            # it and a follower fetches what is still missing itself.
            following = cache is not None and not single_flight.enter_context(
                cache.staging_lock(identity, blocking=False)
            )
            if cache is not None and following:
                log.info(
                    "Another run on this host is staging %s: following it (its listing, then its objects as "
                    "they arrive)",
                    store.describe(prefix),
                )
                objects = _leaders_listing(cache, identity, log, progress_interval)
            elif cache is not None:
                cache.lead(identity)
            if objects is None:
                objects = list(store.list_objects(prefix))
                if cache is not None:
                    cache.write_listing(identity, objects)
            planned = plan_objects(objects, prefix)
            total = sum(item.info.size for item in planned)
            log.info(
                "Staging %s: %d objects, %s into %s%s",
                store.describe(prefix),
                len(planned),
                megabytes(total),
                target,
                f" (cache {cache.root})" if cache else "",
            )
            progress = Progress("staged", len(planned), total, log, progress_interval)
            stager = _Stager(
                store=store,
                dest=target,
                cache=cache,
                progress=progress,
                log=log,
                range_size=range_size,
                verify_md5=verify == "md5",
                principal=principal,
            )
            target.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(stager.partial, ignore_errors=True)  # leftovers of a killed staging
            stager.partial.mkdir()
            for folder in sorted({str(Path(item.path).parent) for item in planned} - {"."}):
                (target / folder).mkdir(parents=True, exist_ok=True)

            # Objects already staged or in the cache take a few system calls each: no thread needed.
            todo = []
            already = 0
            for item in planned:
                if stager.already_staged(item):
                    already += 1
                    progress.add(item.info.size, cached=True)
                elif following or not _linked(stager, progress, item):  # a follower's first look links
                    todo.append(item)
            if cache is not None and following:
                todo = _follow(stager, progress, cache, identity, todo)
            _fetch_all(stager, progress, todo, workers, log)

        with contextlib.suppress(OSError):
            stager.partial.rmdir()
        if cache is not None:
            cache.evict(log=log)
        result = StagingResult(
            files=len(planned),
            bytes=total,
            seconds=progress.seconds,
            from_cache=progress.cached_files - already,
            fetched_files=stager.fetched_files,
            fetched_bytes=stager.fetched_bytes,
            already_staged=already,
        )
        log.info("Staging done: %s", result.summary())
        return result
    except TransferError as err:  # what retries could not fix, outside one object (listing, bucket)
        raise DataLoadError(f"cannot stage {store.describe(prefix)}: {err}") from None
    except OSError as err:  # the local side: disk full, permissions...
        raise DataLoadError(f"cannot stage into {target}: {err.strerror or err}") from None
