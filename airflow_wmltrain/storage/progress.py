"""Progress of a long transfer in the task log: files and bytes done, rate, at an interval (not per file)."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass, field
from typing import Any

DEFAULT_INTERVAL = 15.0


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@dataclass(frozen=True)
class TransferResult:
    """What a transfer did (the results of staging and upload extend it).

    :param files: files transferred.
    :param bytes: their total size.
    :param seconds: wall time.
    """

    files: int
    bytes: int
    seconds: float

    def headline(self, verb: str) -> str:
        """``staged 3 files, 1.0 MB in 2.0 s (0.5 MB/s)``."""
        rate = self.bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return f"{verb} {self.files} files, {megabytes(self.bytes)} in {self.seconds:.1f} s ({rate:.1f} MB/s)"


@dataclass
class Progress:
    """Counters of a transfer, safe to update from worker threads.

    :param verb: what is done (``staged``, ``uploaded``), for the log lines.
    :param total_files: files to transfer.
    :param total_bytes: bytes to transfer.
    :param log: where progress lines go.
    :param interval: seconds between progress lines.
    """

    verb: str
    total_files: int
    total_bytes: int
    log: logging.Logger
    interval: float = DEFAULT_INTERVAL
    files: int = 0
    bytes: int = 0
    cached_files: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, *, files: int = 1, cached: bool = False) -> None:
        """Count ``nbytes`` more bytes and ``files`` more finished files."""
        with self._lock:
            self.files += files
            self.bytes += nbytes
            self.cached_files += files if cached else 0

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def report(self) -> None:
        """Log one progress line."""
        with self._lock:
            files, nbytes, cached = self.files, self.bytes, self.cached_files
        seconds = max(self.seconds, 1e-9)
        percent = 100.0 * nbytes / self.total_bytes if self.total_bytes else 100.0
        self.log.info(
            "%s %d/%d files, %s of %s (%.0f%%), %.1f MB/s%s",
            self.verb,
            files,
            self.total_files,
            megabytes(nbytes),
            megabytes(self.total_bytes),
            percent,
            nbytes / seconds / 1e6,
            f", {cached} from the cache" if cached else "",
        )

    def wait(self, futures: list[Future[Any]]) -> None:
        """Wait for the futures, logging progress every ``interval``; re-raise the first failure."""
        pending = set(futures)
        next_report = time.monotonic() + self.interval
        while pending:
            done, pending = wait(
                pending, timeout=max(0.0, next_report - time.monotonic()), return_when=FIRST_EXCEPTION
            )
            for future in done:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()  # type: ignore[misc]
            if time.monotonic() >= next_report and pending:
                self.report()
                next_report = time.monotonic() + self.interval
