#!/usr/bin/env python3
"""How a large download's bytes reach the file: the receiver's CPU per GB for each write path.

Four sender threads in a child process stream 256 MiB each over loopback TCP; four receiver threads write
them into four files under ``--dir``, each by one method:

* ``pwrite``: ``recv_into`` a reused 1 MiB buffer, then ``os.pwrite`` (what staging does, two copies);
* ``mmap``: ``recv_into`` straight into a memory-mapped, preallocated file (one copy, a page fault per
  page; what staging did for byte ranges before ``4e50ce9``);
* ``splice``: socket -> pipe -> file with ``os.splice`` (one copy in the kernel; not usable on TLS).

Each method runs ``--repeat`` times, interleaved; the receiver's user and system CPU (``getrusage``) and
wall time are reported with each method's median CPU as a ratio to ``pwrite``'s, measured in the same run.
"""

from __future__ import annotations

import argparse
import fcntl
import mmap
import os
import resource
import socket
import statistics
import threading
import time
from pathlib import Path

SIZE = 256 * 1024 * 1024
STREAMS = 4
CHUNK = 1024 * 1024
F_SETPIPE_SZ = 1031
METHODS = ("pwrite", "mmap", "splice")


def send(port: int) -> None:
    data = memoryview(os.urandom(CHUNK))
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        while sent < SIZE:
            sent += s.send(data[: min(CHUNK, SIZE - sent)])


def receive(method: str, conn: socket.socket, path: Path) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, SIZE)
        got = 0
        if method == "mmap":
            with mmap.mmap(fd, SIZE) as mapped, memoryview(mapped) as whole:
                while got < SIZE:
                    with whole[got:] as rest:
                        n = conn.recv_into(rest)
                    if not n:
                        break
                    got += n
        elif method == "pwrite":
            buffer = memoryview(bytearray(CHUNK))
            while got < SIZE:
                n = conn.recv_into(buffer)
                if not n:
                    break
                chunk = buffer[:n]
                while chunk:
                    written = os.pwrite(fd, chunk, got)
                    got += written
                    chunk = chunk[written:]
        else:
            r, w = os.pipe()
            try:
                fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
                while got < SIZE:
                    n = os.splice(conn.fileno(), w, min(CHUNK, SIZE - got))
                    if not n:
                        break
                    done = 0
                    while done < n:
                        done += os.splice(r, fd, n - done, offset_dst=got + done)
                    got += n
            finally:
                os.close(r)
                os.close(w)
    finally:
        os.close(fd)
        conn.close()


def one_run(method: str, directory: Path) -> tuple[float, float, float]:
    """(wall s, user s, sys s) of the receiver for STREAMS x SIZE bytes."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(STREAMS)
        port = server.getsockname()[1]
        child = os.fork()
        if child == 0:  # the senders' CPU is not the receiver's
            threads = [threading.Thread(target=send, args=(port,)) for _ in range(STREAMS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            os._exit(0)
        conns = [server.accept()[0] for _ in range(STREAMS)]
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        threads = [
            threading.Thread(target=receive, args=(method, conn, directory / f"stream-{i}"))
            for i, conn in enumerate(conns)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
        os.waitpid(child, 0)
    for i in range(STREAMS):
        (directory / f"stream-{i}").unlink(missing_ok=True)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="where the files are written")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    directory = args.dir / f"wmltrain-write-path-{os.getpid()}"
    directory.mkdir(parents=True)
    runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in METHODS}
    try:
        for _ in range(args.repeat):
            for method in METHODS:
                runs[method].append(one_run(method, directory))
    finally:
        directory.rmdir()
    gb = STREAMS * SIZE / 1e9
    peer = statistics.median(u + s for _, u, s in runs["pwrite"]) / gb
    print(f"{STREAMS} x {SIZE >> 20} MiB over loopback into {args.dir}, {args.repeat} runs each\n")
    print("| method | median CPU-s per GB | vs pwrite | CPU-s per GB, each run (user + sys) | wall s, each |")
    print("|---|---:|---:|---|---|")
    for method in METHODS:
        cpu = [(u + s) / gb for _, u, s in runs[method]]
        each = ", ".join(f"{c:.2f}" for c in cpu)
        walls = ", ".join(f"{w:.2f}" for w, _, _ in runs[method])
        median = statistics.median(cpu)
        print(f"| {method} | {median:.2f} | {median / peer:.2f}× | {each} | {walls} |")


if __name__ == "__main__":
    main()
