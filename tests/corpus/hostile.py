"""Builders of hostile inputs: archives forged byte by byte, bombs made in memory, hostile manifests.

Nothing here is stored as a file: every bomb is generated, small, by the test that needs it.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class RawEntry:
    """One entry of a forged zip: its name as bytes, its stored data, and what the headers declare."""

    name: bytes
    data: bytes = b""
    size: int | None = None  # the declared uncompressed size; len(data) when None
    crc: int | None = None
    method: int = zipfile.ZIP_STORED
    mode: int = stat.S_IFREG | 0o644
    flags: int = 0


def raw_zip(entries: list[RawEntry]) -> bytes:
    """A zip written header by header, so that names, sizes and modes can be anything."""
    out = io.BytesIO()
    central = io.BytesIO()
    for entry in entries:
        offset = out.tell()
        size = len(entry.data) if entry.size is None else entry.size
        crc = zlib.crc32(entry.data) if entry.crc is None else entry.crc
        out.write(
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                20,
                entry.flags,
                entry.method,
                0,
                0x21,
                crc,
                len(entry.data),
                size,
                len(entry.name),
                0,
            )
        )
        out.write(entry.name)
        out.write(entry.data)
        central.write(
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                (3 << 8) | 20,
                20,
                entry.flags,
                entry.method,
                0,
                0x21,
                crc,
                len(entry.data),
                size,
                len(entry.name),
                0,
                0,
                0,
                0,
                entry.mode << 16,
                offset,
            )
        )
        central.write(entry.name)
    start = out.tell()
    directory = central.getvalue()
    out.write(directory)
    count = len(entries)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(directory), start, 0))
    return out.getvalue()


def deflated_zeros(mib: int) -> bytes:
    """A raw deflate stream of ``mib`` MiB of zeros, built from one 1 MiB block (about 1 KiB) repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(b"\0" * MIB) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * mib + compressor.flush()


def zip_of(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(files: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


TRAIN = b"print('training')\n"
GOOD_FILES = {"convolutional_network.py": TRAIN, "input_data.py": b"X = 1\n"}


def good_zip() -> bytes:
    return zip_of(GOOD_FILES)


def not_zips() -> dict[str, bytes]:
    """Files named ``.zip`` that are something else."""
    tar = tar_of(GOOD_FILES)
    return {
        "tar": tar,
        "tar.gz": gzip.compress(tar),
        "gzip": gzip.compress(TRAIN),
        "bzip2": bz2.compress(tar),
        "xz": lzma.compress(tar),
        "text": b"print('hello')\n",
        "empty": b"",
        "elf": b"\x7fELF\x02\x01\x01" + b"\0" * 100,
        "sfx-stub": b"MZ" + b"\0" * 200 + good_zip(),
        "truncated": good_zip()[:-30],
        "truncated-half": good_zip()[: len(good_zip()) // 2],
        "signature-only": b"PK\x03\x04",
        "central-directory-garbage": good_zip()[:-22] + b"PK\x05\x06" + b"\xff" * 18,
    }


def unsafe_zips() -> dict[str, tuple[bytes, str]]:
    """Zips whose entries would escape, lie or overwrite, with a word of the expected message."""

    def one(name: bytes, **kwargs: object) -> bytes:
        return raw_zip([RawEntry(b"convolutional_network.py", TRAIN), RawEntry(name, b"x", **kwargs)])  # type: ignore[arg-type]

    long_name = b"a" * 256 + b".py"
    return {
        "slip-dotdot": (one(b"../evil.py"), "'..'"),
        "slip-deep-dotdot": (one(b"a/b/../../../evil.py"), "'..'"),
        "slip-absolute": (one(b"/etc/cron.d/evil"), "absolute path"),
        "slip-drive-letter": (one(b"C:\\Windows\\evil.py"), "drive letter"),
        "slip-drive-slash": (one(b"c:/evil.py"), "drive letter"),
        "slip-backslash-dotdot": (one(b"..\\..\\evil.py"), "'..'"),
        "slip-unc": (one(b"\\\\server\\share\\evil.py"), "absolute path"),
        "nul-in-name": (one(b"evil\x00.py"), "NUL"),
        "newline-in-name": (one(b"evil\n.py"), "control character"),
        "symlink": (one(b"link", mode=stat.S_IFLNK | 0o777), "symbolic link"),
        "symlink-to-dotdot": (
            raw_zip(
                [
                    RawEntry(b"convolutional_network.py", TRAIN),
                    RawEntry(b"up", b"../..", mode=stat.S_IFLNK | 0o777),
                ]
            ),
            "symbolic link",
        ),
        "fifo": (one(b"pipe", mode=stat.S_IFIFO | 0o644), "FIFO"),
        "device": (one(b"dev", mode=stat.S_IFCHR | 0o644), "device file"),
        "encrypted": (one(b"secret.py", flags=1), "encrypted"),
        "bzip2-entry": (one(b"b.py", method=zipfile.ZIP_BZIP2), "bzip2"),
        "lzma-entry": (one(b"l.py", method=zipfile.ZIP_LZMA), "LZMA"),
        "duplicate": (one(b"convolutional_network.py"), "duplicate"),
        "duplicate-dot-slash": (one(b"./convolutional_network.py"), "duplicate"),
        "case-collision": (one(b"Convolutional_Network.py"), "letter case"),
        "long-name": (one(long_name), "longer than 255 bytes"),
        "long-folder": (one(b"d" * 300 + b"/a.py"), "longer than 255 bytes"),
        "long-path": (one(b"/".join([b"folder"] * 200) + b"/a.py"), "longer than 1024 bytes"),
        "file-and-folder": (
            raw_zip(
                [
                    RawEntry(b"convolutional_network.py", TRAIN),
                    RawEntry(b"lib", b"1"),
                    RawEntry(b"lib/a.py", b"2"),
                ]
            ),
            "both a file and a folder",
        ),
    }


def bombs() -> dict[str, tuple[bytes, str]]:
    """Zip bombs refused by the default caps (1 GiB of files, 10,000 entries) before a byte is inflated."""
    zeros = deflated_zeros(1100)  # 1100 MiB of zeros in about 1 MiB
    lying_crc = 0  # never checked: the declared size is refused first
    kernel = deflated_zeros(1)
    return {
        "ratio": (
            raw_zip(
                [
                    RawEntry(b"convolutional_network.py", TRAIN),
                    RawEntry(
                        b"weights.bin", zeros, size=1100 * MIB, crc=lying_crc, method=zipfile.ZIP_DEFLATED
                    ),
                ]
            ),
            "zip bomb guard",
        ),
        "count": (
            raw_zip(
                [RawEntry(b"convolutional_network.py", TRAIN)] + [RawEntry(b"f%d" % i) for i in range(10_001)]
            ),
            "entries, more than the cap",
        ),
        "many-small-ratios": (
            raw_zip(
                [RawEntry(b"convolutional_network.py", TRAIN)]
                + [
                    RawEntry(b"w%d.bin" % i, kernel, size=MIB, crc=lying_crc, method=zipfile.ZIP_DEFLATED)
                    for i in range(1100)
                ]
            ),
            "zip bomb guard",
        ),
    }


def nested_bomb() -> bytes:
    """A zip of zips of zeros (the 42.zip idea): only the outer level is ever opened."""
    inner = raw_zip([RawEntry(b"zeros.bin", deflated_zeros(64), size=64 * MIB, method=zipfile.ZIP_DEFLATED)])
    middle = zip_of({f"inner{i}.zip": inner for i in range(16)}, zipfile.ZIP_STORED)
    return zip_of({"convolutional_network.py": TRAIN, **{f"middle{i}.zip": middle for i in range(4)}})
