"""The content cache shared by the runs of one host: each object is fetched once per principal and
hard-linked into every data directory of that principal's runs that needs it.

An entry is a file named by the SHA-256 of ``(principal, endpoint, bucket, key, ETag, size)``: a
changed object has another ETag, hence another entry, and is fetched again.  The principal (who
reads: the S3 access key id, the Swift auth URL, domain and user) is part of the key because a
store's permissions are per principal and may be per object: a principal that can list a bucket
but not read an object in it must not get that object's bytes from an entry another principal
fetched.  So no principal ever obtains through the cache bytes it did not GET itself with its own
credentials; runs of different principals on the same data each fetch it once.

Entries are read-only, written under a temporary name and renamed into place, so a reader never sees a
partial entry.  Fetches of the same entry by several runs at once (a grid starting on one host) are
serialised by ``flock`` on one of 4,096 lock files, so each object is fetched once (and runs staging the
same data at once follow the first one: they reuse its listing and link each object as it arrives, see
:meth:`ObjectCache.staging_lock`), and at most ``fetch_slots`` objects
are fetched at once on the host, however many runs stage together.  The cache's size is capped: least
recently used entries (by modification time, which every use refreshes) are evicted after a staging; a
run that linked an evicted entry keeps its data (a hard link is a name of the same file).

The cache and the runs' data directories must be on the same file system (hard links); the staging
directory ``[wmltrain] staging_dir`` holds both.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from airflow_wmltrain.storage.base import ObjectInfo

LOCK_STRIPES_HEX = 3  # 16**3 = 4096 lock files
TEMP_MAX_AGE = 6 * 3600.0  # temporary files older than this are leftovers of killed processes


@dataclass(frozen=True)
class EvictionResult:
    """What an eviction pass did.

    :param entries: entries in the cache before the pass.
    :param bytes: their total size.
    :param evicted: entries removed.
    :param evicted_bytes: bytes removed.
    """

    entries: int
    bytes: int
    evicted: int
    evicted_bytes: int


class ObjectCache:
    """A content cache in a directory.

    :param root: the cache directory (created when missing).
    :param max_bytes: the size above which least recently used entries are evicted.
    :param fetch_slots: how many objects may be fetched at once on this host, by all the runs staging
        through this cache together (a grid starting on one host does not multiply the load on the store).
    """

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int, fetch_slots: int = 16) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fetch_slots = max(1, fetch_slots)
        self.objects = self.root / "objects"
        self.temp = self.root / "tmp"
        self.locks = self.root / "locks"
        self.slots = self.root / "slots"
        self.listings = self.root / "listings"
        self._thread = threading.local()
        for folder in (self.objects, self.temp, self.locks, self.slots, self.listings):
            folder.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ObjectCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    def entry(self, endpoint: str, bucket: str, info: ObjectInfo, *, principal: str) -> Path:
        """Where the entry for this version of this object, as fetched by ``principal``, is (whether or
        not it exists)."""
        identity = "\0".join((principal, endpoint, bucket, info.key, info.etag, str(info.size)))
        digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()
        return self.objects / digest[:2] / digest

    @staticmethod
    def has(entry: Path, size: int) -> bool:
        """Whether the entry exists with the expected size."""
        try:
            return entry.stat().st_size == size
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def lock(self, entry: Path, *, blocking: bool) -> Iterator[bool]:
        """Hold the entry's fetch lock; yields ``False`` at once when not ``blocking`` and it is taken."""
        with _flock(self.locks / f"{entry.name[:LOCK_STRIPES_HEX]}.lock", blocking=blocking) as held:
            yield held

    def _listing_path(self, identity: str) -> Path:
        digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()
        return self.listings / f"{digest[:32]}.json"

    def write_listing(self, identity: str, objects: list[ObjectInfo]) -> None:
        """Keep the listing of the staging that holds the lock of ``identity`` (after :meth:`lead`), for the
        runs following it."""
        temp = self.temp_file()
        temp.write_text(json.dumps([[o.key, o.size, o.etag, o.md5] for o in objects]))
        os.replace(temp, self._listing_path(identity))

    def read_listing(self, identity: str) -> list[ObjectInfo] | None:
        """The listing written by the staging that took the lock of ``identity`` last, once it has written
        it; ``None`` before (or when it died first).  An older listing is never taken, however recent."""
        try:
            taken = self._staging_lock_path(identity).stat().st_mtime_ns
            path = self._listing_path(identity)
            if path.stat().st_mtime_ns < taken:
                return None
            return [ObjectInfo(key, size, etag, md5) for key, size, etag, md5 in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            return None

    def _staging_lock_path(self, identity: str) -> Path:
        digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()
        return self.locks / f"staging-{digest[:32]}.lock"

    @contextlib.contextmanager
    def staging_lock(self, identity: str, *, blocking: bool) -> Iterator[bool]:
        """Hold the lock of one staging's data (endpoint, bucket, prefix) on this host.

        Yields ``False`` at once when not ``blocking`` and another run holds it.  The run that stages under
        it (the leader) calls :meth:`lead` first, then :meth:`write_listing`; a run that finds it taken
        follows: it reads that listing (:meth:`read_listing`) and links the objects as they arrive.
        """
        with _flock(self._staging_lock_path(identity), blocking=blocking) as held:
            yield held

    def lead(self, identity: str) -> None:
        """Mark the staging lock of ``identity`` as just taken by a leader (held by the caller): listings
        written before now are no longer read."""
        os.utime(self._staging_lock_path(identity))

    @contextlib.contextmanager
    def fetch_slot(self) -> Iterator[None]:
        """Hold one of the host's fetch slots (waiting for one when all are taken).

        Each thread keeps its slots' lock files open and tries the one it had last time first, so
        taking a free slot costs one ``flock`` call.
        """
        held: dict[int, int] = self._thread.__dict__.setdefault("slots", {})
        preferred = self._thread.__dict__.get("preferred")
        order = random.sample(range(self.fetch_slots), self.fetch_slots)
        if preferred is not None:
            order.remove(preferred)
            order.insert(0, preferred)
        taken = None
        for slot in order:
            fd = held.get(slot)
            if fd is None:
                fd = held[slot] = os.open(
                    self.slots / f"{slot}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            taken = slot
            break
        if taken is None:  # all taken: wait for one
            taken = order[0]
            fcntl.flock(held[taken], fcntl.LOCK_EX)
        self._thread.preferred = taken
        try:
            yield
        finally:
            fcntl.flock(held[taken], fcntl.LOCK_UN)

    def temp_file(self) -> Path:
        """A fresh temporary path in the cache (same file system as the entries)."""
        return self.temp / f"{os.getpid()}-{uuid.uuid4().hex}"

    def commit(self, temp: Path, entry: Path) -> None:
        """Make a verified temporary file the entry: read-only, renamed into place atomically."""
        os.chmod(temp, 0o444)
        entry.parent.mkdir(exist_ok=True)
        os.replace(temp, entry)

    @staticmethod
    def touch(entry: Path) -> None:
        """Mark the entry as just used (for least-recently-used eviction)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(entry)

    def evict(self, *, log: logging.Logger | None = None) -> EvictionResult | None:
        """Remove least recently used entries until the cache is under its cap.

        Returns ``None`` when another process is already evicting (it does the work).
        """
        fd = os.open(self.root / "evict.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            self._remove_stale_temp_files()
            entries: list[tuple[float, int, str]] = []
            for shard in os.scandir(self.objects):
                if shard.is_dir(follow_symlinks=False):
                    for item in os.scandir(shard.path):
                        st = item.stat(follow_symlinks=False)
                        entries.append((st.st_mtime, st.st_size, item.path))
            total = sum(size for _, size, _ in entries)
            evicted = evicted_bytes = 0
            if total > self.max_bytes:
                entries.sort()
                for _, size, path in entries:
                    if total - evicted_bytes <= self.max_bytes:
                        break
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        evicted += 1
                        evicted_bytes += size
            if evicted and log is not None:
                log.info(
                    "Cache %s: evicted %d least recently used entries (%.1f MB) to stay under %.1f MB",
                    self.root,
                    evicted,
                    evicted_bytes / 1e6,
                    self.max_bytes / 1e6,
                )
            return EvictionResult(len(entries), total, evicted, evicted_bytes)
        finally:
            os.close(fd)

    def _remove_stale_temp_files(self) -> None:
        deadline = time.time() - TEMP_MAX_AGE
        for item in os.scandir(self.temp):
            with contextlib.suppress(FileNotFoundError):
                if item.stat(follow_symlinks=False).st_mtime < deadline:
                    os.unlink(item.path)


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created); yields ``False`` at once when not ``blocking``
    and another process holds it.  The descriptor is not inherited by child processes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
