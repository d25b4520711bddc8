"""How a GET's body reaches the file (``transfer.download_to_fd``), against a real socket server whose
answers the test writes byte for byte: spliced in the kernel when nothing is hashed on the way, read and
written otherwise, and refused when it is short, stalls or is longer than the range asked for."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from airflow_wmltrain.storage.s3 import S3Store
from airflow_wmltrain.storage.sigv4 import Credentials
from airflow_wmltrain.storage.transfer import TransferError, download_to_fd

MiB = 1024 * 1024
BODY = os.urandom(3 * MiB + 5)

# Writes one answer on the accepted connection: (socket, the request's bytes).
Answer = Callable[[socket.socket, bytes], None]


def _headers(status: str, length: int, content_range: str | None = None) -> bytes:
    extra = f"Content-Range: {content_range}\r\n" if content_range else ""
    return f'HTTP/1.1 {status}\r\nContent-Length: {length}\r\n{extra}ETag: "e"\r\n\r\n'.encode()


def _range(offset: int, length: int, sent: int | None = None) -> bytes:
    """A 206 answer with the bytes of BODY asked for (``sent`` of them, announced as such, when given)."""
    sent = length if sent is None else sent
    head = _headers("206 Partial Content", sent, f"bytes {offset}-{offset + length - 1}/{len(BODY)}")
    return head + BODY[offset : offset + sent]


def _in_pieces(conn: socket.socket, data: bytes, piece: int = 200 * 1024) -> None:
    """Send ``data`` in pieces with pauses, as a busy store does: the client reads it in many calls."""
    for start in range(0, len(data), piece):
        conn.sendall(data[start : start + piece])
        time.sleep(0.002)


class _Server:
    accepted = 0  # connections accepted by the test's server


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], S3Store]]:
    """A server answering every request of every connection (one connection at a time) with what the
    test's function writes; gives a store on it."""
    servers: list[socket.socket] = []
    threads: list[threading.Thread] = []
    stores: list[S3Store] = []
    _Server.accepted = 0

    def start(answer: Answer) -> S3Store:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def run() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = server.accept()
                    _Server.accepted += 1
                    with conn:
                        while request := _request(conn):
                            answer(conn, request)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        port = server.getsockname()[1]
        store = S3Store(
            "data", credentials=lambda: Credentials("a", "b"), endpoint_url=f"http://127.0.0.1:{port}"
        )
        stores.append(store)
        return store

    yield start
    for store in stores:
        store.http.close()  # this thread's connections: the server's reads end
    for server in servers:
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_RDWR)  # wakes its accept()
        server.close()
    for thread in threads:
        thread.join(timeout=5)


def _request(conn: socket.socket) -> bytes:
    """The next request's head, or b"" when the client closed the connection."""
    request = b""
    while b"\r\n\r\n" not in request:
        got = conn.recv(65536)
        if not got:
            return b""
        request += got
    return request


@pytest.fixture
def splices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the bytes ``os.splice`` moved from a socket (the kernel path taken)."""
    moved: list[int] = []
    real = os.splice

    def counting(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        n = real(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("offset_dst") is None:  # socket -> pipe
            moved.append(n)
        return n

    monkeypatch.setattr(os, "splice", counting)
    return moved


def _file(tmp_path: Path, fill: bytes = b"x", size: int = 6 * MiB) -> int:
    path = tmp_path / "object"
    path.write_bytes(fill * size)
    return os.open(path, os.O_RDWR)


def test_a_range_is_spliced_into_the_file_at_its_offset(
    serve: Callable[[Answer], S3Store], splices: list[int], tmp_path: Path
) -> None:
    offset, length = MiB, 2 * MiB + 5
    store = serve(lambda conn, _: _in_pieces(conn, _range(offset, length)))
    fd = _file(tmp_path)
    try:
        download_to_fd(store.http, store, "k", fd, size=len(BODY), md5=None, offset=offset, length=length)
    finally:
        os.close(fd)
    data = (tmp_path / "object").read_bytes()
    assert data[offset : offset + length] == BODY[offset : offset + length]
    assert data[:offset] == b"x" * offset
    assert set(data[offset + length :]) == {ord("x")}
    assert sum(splices) > MiB  # most of it never went through Python


def test_a_hashed_body_is_read_not_spliced(
    serve: Callable[[Answer], S3Store], splices: list[int], tmp_path: Path
) -> None:
    store = serve(lambda conn, _: _in_pieces(conn, _headers("200 OK", len(BODY)) + BODY))
    fd = _file(tmp_path, size=0)
    try:
        md5 = hashlib.md5(BODY, usedforsecurity=False).hexdigest()
        download_to_fd(store.http, store, "k", fd, size=len(BODY), md5=md5, etag=md5)
    finally:
        os.close(fd)
    assert (tmp_path / "object").read_bytes() == BODY
    assert splices == []


def test_a_body_cut_short_is_a_transient_error(
    serve: Callable[[Answer], S3Store], splices: list[int], tmp_path: Path
) -> None:
    def answer(conn: socket.socket, _: bytes) -> None:
        _in_pieces(conn, _headers("200 OK", len(BODY)) + BODY[: 2 * MiB])
        conn.shutdown(socket.SHUT_RDWR)  # the store goes away mid-body

    store = serve(answer)
    fd = _file(tmp_path, size=0)
    try:
        with pytest.raises(TransferError) as raised:
            download_to_fd(store.http, store, "k", fd, size=len(BODY), md5=None)
    finally:
        os.close(fd)
    assert raised.value.transient
    assert f"received {2 * MiB} bytes, expected {len(BODY)}" in str(raised.value)
    assert splices  # the splice path saw the end of the stream


def test_a_stalled_body_times_out(
    serve: Callable[[Answer], S3Store], splices: list[int], tmp_path: Path
) -> None:
    stall = threading.Event()

    def answer(conn: socket.socket, _: bytes) -> None:
        conn.sendall(_headers("200 OK", len(BODY)) + BODY[:MiB])
        stall.wait(10)

    store = serve(answer)
    store.http.timeout = 0.5
    fd = _file(tmp_path, size=0)
    started = time.monotonic()
    try:
        with pytest.raises(TransferError, match="timed out") as raised:
            download_to_fd(store.http, store, "k", fd, size=len(BODY), md5=None)
    finally:
        os.close(fd)
        stall.set()
    assert raised.value.transient
    assert time.monotonic() - started < 5


def test_an_answer_longer_than_the_range_is_refused_without_writing_past_it(
    serve: Callable[[Answer], S3Store], tmp_path: Path
) -> None:
    offset, length = MiB, MiB
    store = serve(lambda conn, _: _in_pieces(conn, _range(offset, length, sent=2 * MiB)))
    fd = _file(tmp_path)
    try:
        with pytest.raises(TransferError, match="expected 1048576"):
            download_to_fd(store.http, store, "k", fd, size=len(BODY), md5=None, offset=offset, length=length)
    finally:
        os.close(fd)
    assert set((tmp_path / "object").read_bytes()[offset + length :]) == {ord("x")}


@pytest.mark.parametrize("refused", ["socket", "file"])
def test_where_splice_is_refused_the_rest_is_read(
    refused: str, serve: Callable[[Answer], S3Store], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = os.splice

    def refusing(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        if (kwargs.get("offset_dst") is None) == (refused == "socket"):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "splice", refusing)
    store = serve(lambda conn, _: _in_pieces(conn, _headers("200 OK", len(BODY)) + BODY))
    fd = _file(tmp_path, size=0)
    try:
        download_to_fd(store.http, store, "k", fd, size=len(BODY), md5=None)
    finally:
        os.close(fd)
    assert (tmp_path / "object").read_bytes() == BODY


def _asked(request: bytes) -> tuple[int, int]:
    """The (offset, length) of a request's Range header."""
    line = next(x for x in request.decode().split("\r\n") if x.lower().startswith("range:"))
    first, last = line.split("=", 1)[1].split("-")
    return int(first), int(last) - int(first) + 1


def test_the_connection_carries_the_next_range_after_a_splice(
    serve: Callable[[Answer], S3Store], splices: list[int], tmp_path: Path
) -> None:
    store = serve(lambda conn, request: _in_pieces(conn, _range(*_asked(request))))
    fd = _file(tmp_path, size=0)
    try:
        for offset in range(0, len(BODY), MiB):
            length = min(MiB, len(BODY) - offset)
            download_to_fd(store.http, store, "k", fd, size=len(BODY), md5=None, offset=offset, length=length)
    finally:
        os.close(fd)
    assert (tmp_path / "object").read_bytes() == BODY
    assert _Server.accepted == 1  # four ranges, one keep-alive connection
    assert sum(splices) > MiB


def test_a_range_from_elsewhere_in_the_object_is_refused(
    serve: Callable[[Answer], S3Store], tmp_path: Path
) -> None:
    """A 206 of the right length but other bytes: with verify = size nothing else would notice."""
    store = serve(lambda conn, _: _in_pieces(conn, _range(0, MiB)))
    fd = _file(tmp_path)
    try:
        with pytest.raises(
            TransferError, match="asked for bytes 1048576-2097151 of 3145733, the store"
        ) as raised:
            download_to_fd(store.http, store, "k", fd, size=len(BODY), md5=None, offset=MiB, length=MiB)
    finally:
        os.close(fd)
    assert raised.value.transient
    assert set((tmp_path / "object").read_bytes()) == {ord("x")}


def test_a_full_disk_is_raised_as_is_and_drops_the_connection(
    serve: Callable[[Answer], S3Store], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Not the store's fault, so not a (retried) TransferError; the body is left unread, so the
    connection is dropped, not reused; the pipe is closed."""
    real = os.splice

    def full(src: int, dst: int, count: int, *args: object, **kwargs: object) -> int:
        if kwargs.get("offset_dst") is not None:  # pipe -> file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, count, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "splice", full)
    store = serve(lambda conn, _: _in_pieces(conn, _headers("200 OK", len(BODY)) + BODY))
    fd = _file(tmp_path, size=0)
    pipes = _pipes()
    try:
        with pytest.raises(OSError, match="No space left") as raised:
            download_to_fd(store.http, store, "k", fd, size=len(BODY), md5=None)
    finally:
        os.close(fd)
    assert raised.value.errno == errno.ENOSPC
    assert not isinstance(raised.value, TransferError)
    assert store.http._local.__dict__.get("pool") == {}  # the half-read connection was dropped
    assert _pipes() == pipes  # and no pipe was left open


def _pipes() -> set[str]:
    """This process's open pipes."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("pipe:"):
                found.add(target)
    return found
