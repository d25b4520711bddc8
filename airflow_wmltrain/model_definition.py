"""The model definition: the user's training code, submitted as a ``.zip`` archive (SPEC §1, step 1).

:meth:`ModelDefinition.load` reads a zip from a file or from bytes and refuses, with a
:class:`~airflow_wmltrain.errors.ModelDefinitionError` (``C102``) whose one-line message says what was
received and what is accepted, anything that is not a plain, safe zip of regular files.  What the
archive *is* is decided by its content, never by its name: a ``model.zip`` that holds a gzip-compressed
tar is refused, a zip named ``model.tar`` is accepted.

Rules, all checked when the archive is loaded (before anything is queued):

* only zip archives, starting with a zip signature (``PK``); gzip (and tar.gz), tar, bzip2, xz, zstd,
  7z, rar and anything else are refused with the fix (``cd <code dir> && zip -r ../model.zip .``);
  a zip behind a stub (self-extracting executables) is refused too;
* a missing, unreadable, non-regular or empty file, and a corrupt archive (bad central directory,
  undecodable names) are refused;
* entry paths must be relative and stay inside the archive: absolute paths (``/x``, ``C:\\x``,
  ``C:/x``, ``\\\\server\\x``), any ``..`` component, NUL or other control characters are refused;
  so are names a file system cannot hold (a file or folder name over 255 bytes, a path over 1024
  bytes), and two paths that differ only in letter case or Unicode form (``A.py`` and ``a.py``: one
  file on macOS and Windows);
* **backslashes are normalised, not refused**: zips made by some Windows tools use ``\\`` as the
  folder separator, so ``src\\train.py`` is read as ``src/train.py`` (as Info-ZIP ``unzip`` does).  The
  absolute-path and ``..`` rules are applied after that normalisation;
* symbolic links, device files, FIFOs and sockets (the Unix file type in ``external_attr >> 16``),
  encrypted entries, duplicate paths (after normalisation: ``./a.py`` and ``a.py`` are the same
  path) and a path that is both a file and a folder are refused;
* only the *stored* and *deflate* compression methods are accepted (what ``zip``, Windows, macOS and
  7-Zip produce by default).  bzip2 and LZMA entries are refused: Python's :mod:`zipfile` decompresses
  them without an output limit, so one small bzip2 entry could expand to gigabytes in memory before
  any size check runs;
* zip-bomb guard: the number of entries may not exceed ``[wmltrain] model_definition_max_entries``
  and the total declared uncompressed size may not exceed ``[wmltrain] model_definition_max_bytes``.
  There is **no compression-ratio rule**: deflate cannot exceed about 1032:1, the declared total is
  capped, and :meth:`ModelDefinition.extract` caps the bytes it actually writes (a header that lies
  about a size cannot get more than the cap onto disk), so a ratio rule would only refuse legitimate
  files such as zero-initialised weights;
* an archive with no regular file (empty, or folders only) is refused.  Nested folders are fine.

Messages name entries and files, never their content.
"""

from __future__ import annotations

import bz2
import difflib
import errno
import hashlib
import io
import lzma
import os
import secrets
import shutil
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, NamedTuple

from airflow_wmltrain.errors import ModelDefinitionError
from airflow_wmltrain.settings import SECTION, Settings

__all__ = ["ModelDefinition"]

BYTES_NAME = "<bytes>"
"""The :attr:`ModelDefinition.name` of a model definition loaded from bytes."""

BYTES_FIELD = "model_definition"
"""The ``field`` of the errors about a model definition loaded from bytes."""

ZIP_HINT = "cd <code dir> && zip -r ../model.zip ."
"""The command that makes an acceptable archive of a folder's contents."""

_ACCEPTED = f"only .zip archives are accepted; create one with: {ZIP_HINT}"
_HEAD_BYTES = 64 * 1024
_CHUNK = 1024 * 1024
_MAX_SHOWN = 120
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
_COMPRESSION_NAMES = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA", 9: "deflate64", 98: "PPMd"}
_DOS_DIRECTORY = 0x10
# Longest file or folder name (Linux, macOS and Windows file systems: 255 bytes), and longest path in
# the archive (the extraction folder's own path must still fit in the system's 4096 bytes).
_MAX_NAME_BYTES = 255
_MAX_PATH_BYTES = 1024
_FLAG_ENCRYPTED = 0x1
# Errors that zipfile and its decompressors raise on damaged input.
_CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    ValueError,
    OverflowError,
    struct.error,
    NotImplementedError,
    IndexError,
    KeyError,
)


class _Limits(NamedTuple):
    """The zip-bomb guard's caps (``[wmltrain] model_definition_max_bytes``/``_max_entries``)."""

    #: Total declared uncompressed size of the files, and bytes written when extracting.
    max_bytes: int
    #: Number of entries.
    max_entries: int


class _Source(NamedTuple):
    """Where a model definition was loaded from."""

    #: The file's name, or ``"<bytes>"``.
    name: str
    #: The ``field`` of the errors about it.
    field: str
    #: The file, when it was loaded from one (read again by ``extract``).
    path: Path | None = None
    #: Its bytes, when it was loaded from bytes.
    data: bytes | None = None


class _Entry(NamedTuple):
    """One validated archive entry."""

    info: zipfile.ZipInfo
    path: str
    is_dir: bool
    executable: bool


def _show(text: str) -> str:
    """Quote an entry or file name for a one-line message: control characters escaped, long names cut."""
    shown = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
    if len(shown) > _MAX_SHOWN:
        shown = shown[: _MAX_SHOWN - 3] + "..."
    return f"'{shown}'"


def _one_line(exc: BaseException) -> str:
    """A short, single-line, printable rendering of a library exception (no bytes dumped)."""
    text = str(exc) or type(exc).__name__
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _decompressed_start(head: bytes, kind: str) -> bytes:
    """The first decompressed bytes of a compressed stream's ``head``, or ``b""`` when unknown."""
    try:
        if kind == "gzip":
            return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(head, 512)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(head, max_length=512)
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(head, max_length=512)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError):
        return b""


def _is_tar(block: bytes) -> bool:
    return block[257:262] == b"ustar"


def _sniff(head: bytes) -> str | None:
    """Say what a non-zip file is, from its first bytes; ``None`` when it starts like a zip."""
    if head.startswith(_ZIP_SIGNATURES):
        return None
    compressed = (
        ("gzip", b"\x1f\x8b", "gzip", ".gz"),
        ("bzip2", b"BZh", "bzip2", ".bz2"),
        ("xz", b"\xfd7zXZ\x00", "xz", ".xz"),
    )
    for kind, magic, label, suffix in compressed:
        if head.startswith(magic):
            if _is_tar(_decompressed_start(head, kind)):
                return f"a {label}-compressed tar archive (.tar{suffix})"
            return f"a {label}-compressed file ({suffix})"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "a zstandard-compressed file (.zst)"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "a 7z archive (.7z)"
    if head.startswith(b"Rar!\x1a\x07"):
        return "a RAR archive (.rar)"
    if _is_tar(head):
        return "a tar archive (.tar)"
    return f"not a zip archive (starts with 0x{head[:4].hex()})"


def _normalise_entry(raw: str) -> tuple[str, bool] | str:
    """Normalise an archive entry name.

    :param raw: the name as stored in the archive's central directory.
    :return: ``(path, ends_with_slash)``, or a string saying why the name is refused.
    """
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in raw):
        return "has a NUL or control character in its name"
    name = raw.replace("\\", "/")
    if name.startswith("/"):
        return "has an absolute path"
    first = name.split("/", 1)[0]
    if len(first) >= 2 and first[1] == ":" and first[0].isascii() and first[0].isalpha():
        return "has an absolute path (a Windows drive letter)"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return "has a '..' component (it would be written outside the extraction folder)"
    if any(len(part.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES for part in parts):
        return (
            f"has a file or folder name longer than {_MAX_NAME_BYTES} bytes, more than a file system allows"
        )
    path = "/".join(parts)
    if len(path.encode("utf-8", "surrogatepass")) > _MAX_PATH_BYTES:
        return f"has a path longer than {_MAX_PATH_BYTES} bytes"
    return path, name.endswith("/")


def _normalise_lookup(path: str) -> str | None:
    """Normalise a path to look up in the archive; ``None`` when it cannot be inside it."""
    if path.startswith("/"):
        return None
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _scan(archive: zipfile.ZipFile, field: str, limits: _Limits) -> list[_Entry]:
    """Validate every entry of an open archive against the rules of this module.

    :param archive: the open zip archive.
    :param field: the ``field`` of the errors raised.
    :param limits: the caps on the number of entries and their total declared uncompressed size.
    :return: the entries, in archive order.
    """
    max_bytes, max_entries = limits
    infos = archive.infolist()
    if len(infos) > max_entries:
        raise ModelDefinitionError(
            f"the zip has {len(infos)} entries, more than the cap of {max_entries} (zip bomb guard); "
            f"remove unneeded files or raise [{SECTION}] model_definition_max_entries",
            field=field,
        )
    entries: list[_Entry] = []
    seen: set[str] = set()
    folded: dict[str, str] = {}
    total = 0
    for info in infos:
        where = f"entry {_show(info.orig_filename)}"
        normalised = _normalise_entry(info.orig_filename)
        if isinstance(normalised, str):
            raise ModelDefinitionError(
                f"{where} {normalised}; entries must be relative paths inside the archive: {ZIP_HINT}",
                field=field,
            )
        path, slash = normalised
        if info.flag_bits & _FLAG_ENCRYPTED:
            raise ModelDefinitionError(
                f"{where} is encrypted (password-protected); zip the code without a password: {ZIP_HINT}",
                field=field,
            )
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "a device file, FIFO or socket"
            raise ModelDefinitionError(
                f"{where} is {what}; only regular files and folders are accepted "
                f"(zip the files themselves, e.g. without zip's --symlinks option)",
                field=field,
            )
        is_dir = slash or kind == stat.S_IFDIR or bool(info.external_attr & _DOS_DIRECTORY)
        if is_dir and info.file_size:
            raise ModelDefinitionError(
                f"{where} is a folder that holds {info.file_size} bytes of data; the zip is corrupt, "
                f"re-create it with: {ZIP_HINT}",
                field=field,
            )
        if not is_dir and info.compress_type not in _SUPPORTED_COMPRESSION:
            method = _COMPRESSION_NAMES.get(info.compress_type, f"method {info.compress_type}")
            raise ModelDefinitionError(
                f"{where} is compressed with {method}; only stored and deflate entries are accepted "
                f"(zip's default): {ZIP_HINT}",
                field=field,
            )
        if not path:
            if is_dir:
                continue  # "./": the archive's root folder itself
            raise ModelDefinitionError(f"{where} has an empty path; {ZIP_HINT}", field=field)
        if path in seen:
            raise ModelDefinitionError(
                f"{where} is a duplicate: the zip holds '{path}' more than once; "
                f"re-create it from a clean folder: {ZIP_HINT}",
                field=field,
            )
        seen.add(path)
        key = unicodedata.normalize("NFC", path).casefold()
        if key in folded:
            raise ModelDefinitionError(
                f"{where} and '{folded[key]}' differ only in letter case (or Unicode form): they would be "
                f"one file on macOS and Windows; rename one of them and re-create the zip: {ZIP_HINT}",
                field=field,
            )
        folded[key] = path
        if not is_dir:
            total += info.file_size
        entries.append(_Entry(info, path, is_dir, bool(mode & 0o111) and not is_dir))
    if total > max_bytes:
        raise ModelDefinitionError(
            f"the zip's files add up to {total} bytes uncompressed, more than the cap of {max_bytes} "
            f"bytes (zip bomb guard); leave data sets out of the model definition (they belong in the "
            f"training data bucket) or raise [{SECTION}] model_definition_max_bytes",
            field=field,
        )
    files = {entry.path for entry in entries if not entry.is_dir}
    if not files:
        raise ModelDefinitionError(
            f"the zip holds no files (it is empty or holds only folders); {ZIP_HINT}", field=field
        )
    for entry in entries:
        for parent in PurePosixPath(entry.path).parents:
            if str(parent) in files:
                raise ModelDefinitionError(
                    f"'{parent}' is both a file and a folder in the zip; re-create it with: {ZIP_HINT}",
                    field=field,
                )
    return entries


def _corrupt(field: str, exc: BaseException, entry: str | None = None) -> ModelDefinitionError:
    """The error for an archive, or one of its entries, that cannot be read."""
    where = f"entry {_show(entry)} of the zip is corrupt" if entry else "the zip is corrupt or truncated"
    return ModelDefinitionError(
        f"{where} ({_one_line(exc)}); re-create the archive with: {ZIP_HINT}", field=field
    )


def _signature(entries: Iterable[_Entry]) -> list[tuple[str, bool, int, int]]:
    return [(entry.path, entry.is_dir, entry.info.file_size, entry.info.CRC) for entry in entries]


class ModelDefinition:
    """A validated model-definition zip.

    Build one with :meth:`load`.  The archive's bytes are kept in memory when it was loaded from
    bytes; when it was loaded from a file, the file is read again by :meth:`extract`,
    :meth:`open_stream` and :meth:`open_bytes`, which refuse it if it changed in the meantime.

    :param name: the file name it came from, or ``"<bytes>"``.
    :param size: the size of the zip itself, in bytes.
    :param sha256: the SHA-256 of the zip's bytes, hexadecimal.
    :param files: the paths of its regular files (posix, normalised, sorted).
    :param uncompressed_bytes: the total declared uncompressed size of its files.
    """

    name: str
    size: int
    sha256: str
    files: tuple[str, ...]
    uncompressed_bytes: int

    def __init__(
        self, source: _Source, *, size: int, sha256: str, entries: list[_Entry], limits: _Limits
    ) -> None:
        self.name = source.name
        self.size = size
        self.sha256 = sha256
        self.files = tuple(sorted(entry.path for entry in entries if not entry.is_dir))
        self.uncompressed_bytes = sum(entry.info.file_size for entry in entries if not entry.is_dir)
        self._field = source.field
        self._entries = entries
        self._file_set = frozenset(self.files)
        self._limits = limits
        self._path = source.path
        self._data = source.data

    def __repr__(self) -> str:
        return (
            f"ModelDefinition(name={self.name!r}, size={self.size}, files={len(self.files)}, "
            f"sha256={self.sha256[:12]!r})"
        )

    @property
    def path(self) -> Path | None:
        """The file it was loaded from, or ``None`` when it was loaded from bytes."""
        return self._path

    @classmethod
    def load(
        cls,
        source: str | os.PathLike[str] | bytes,
        *,
        max_bytes: int | None = None,
        max_entries: int | None = None,
        settings: Settings | None = None,
    ) -> ModelDefinition:
        """Read and validate a model-definition zip.

        :param source: the path of the zip file, or its bytes.
        :param max_bytes: cap on the total uncompressed size; defaults to the settings'
            ``model_definition_max_bytes``.
        :param max_entries: cap on the number of entries; defaults to the settings'
            ``model_definition_max_entries``.
        :param settings: where the caps' defaults come from; ``Settings()`` when ``None``.
        :return: the validated model definition.
        :raises ModelDefinitionError: (``C102``) when the source is not an acceptable zip.
        """
        if max_bytes is None or max_entries is None:
            settings = settings if settings is not None else Settings()
            max_bytes = settings.model_definition_max_bytes if max_bytes is None else max_bytes
            max_entries = settings.model_definition_max_entries if max_entries is None else max_entries
        if max_bytes <= 0 or max_entries <= 0:
            raise ValueError(f"max_bytes and max_entries must be positive, got {max_bytes}, {max_entries}")
        limits = _Limits(max_bytes, max_entries)
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            return cls._load_stream(io.BytesIO(data), _Source(BYTES_NAME, BYTES_FIELD, data=data), limits)
        path = Path(os.fspath(source))
        field = path.name or str(path)
        stream = cls._open_file(path, field)
        with stream:
            return cls._load_stream(stream, _Source(field, field, path=path), limits)

    @staticmethod
    def _open_file(path: Path, field: str) -> IO[bytes]:
        """Open a zip file for reading, refusing what is not a readable regular file."""
        try:
            info = path.stat()
        except FileNotFoundError:
            raise ModelDefinitionError(
                f"file not found: {_show(str(path))}; give the path of the model definition zip",
                field=field,
            ) from None
        except OSError as exc:
            raise ModelDefinitionError(
                f"cannot read {_show(str(path))}: {exc.strerror or _one_line(exc)}", field=field
            ) from None
        if stat.S_ISDIR(info.st_mode):
            raise ModelDefinitionError(
                f"received the folder {_show(str(path))}, not a zip; only .zip archives are accepted; "
                f"create one with: cd {path} && zip -r ../model.zip .",
                field=field,
            )
        if not stat.S_ISREG(info.st_mode):
            raise ModelDefinitionError(
                f"received {_show(str(path))}, which is not a regular file; {_ACCEPTED}", field=field
            )
        try:
            return path.open("rb")
        except OSError as exc:
            raise ModelDefinitionError(
                f"cannot read {_show(str(path))}: {exc.strerror or _one_line(exc)}", field=field
            ) from None

    @classmethod
    def _load_stream(cls, stream: IO[bytes], source: _Source, limits: _Limits) -> ModelDefinition:
        field = source.field
        head = stream.read(_HEAD_BYTES)
        if not head:
            raise ModelDefinitionError(f"received an empty file (0 bytes); {_ACCEPTED}", field=field)
        what = _sniff(head)
        if what is not None:
            prefix = "received " if not what.startswith("not ") else "received a file that is "
            raise ModelDefinitionError(f"{prefix}{what}; {_ACCEPTED}", field=field)
        digest = hashlib.sha256(head)
        size = len(head)
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
        stream.seek(0)
        archive, entries = _open_and_scan(stream, field, limits)
        archive.close()
        return cls(source, size=size, sha256=digest.hexdigest(), entries=entries, limits=limits)

    def contains(self, path: str) -> bool:
        """Whether the archive holds a regular file at ``path``.

        :param path: a relative posix path; ``./a/b.py``, ``a//b.py`` and ``a/b.py`` are the same.
        :return: ``True`` when that file is in the archive (folders do not count).
        """
        normalised = _normalise_lookup(path)
        return normalised is not None and normalised in self._file_set

    def require_files(self, paths: Iterable[str], *, field: str) -> None:
        """Check that files a manifest refers to are in the archive.

        :param paths: relative paths, e.g. the script of ``execution.command``.
        :param field: the manifest field they come from, e.g. ``model_definition.execution.command``.
        :raises ModelDefinitionError: (``C102``) naming every missing path; when a missing file is in
            the archive under a single top-level folder (the folder was zipped instead of its
            contents), the message says so and gives both fixes.
        """
        problems: list[str] = []
        for path in paths:
            if self.contains(path):
                continue
            problems.append(self._missing(path, field))
        if problems:
            raise ModelDefinitionError(
                problems[0], field=field, problems=[f"{field}: {problem}" for problem in problems]
            )

    def _missing(self, path: str, field: str) -> str:
        """The message for one file that the archive lacks."""
        shown = _show(path)
        normalised = _normalise_lookup(path)
        if normalised is None:
            return f"{shown} is not a relative path inside the model definition {_show(self.name)}"
        text = f"{shown} is not in the model definition {_show(self.name)}"
        nested = [f for f in self.files if f.partition("/")[2] == normalised]
        if len(nested) == 1:
            folder = nested[0].partition("/")[0]
            where = "in the command" if field.endswith("command") else f"in {field}"
            return (
                f"{text}; the zip holds {nested[0]}: zip the folder's contents "
                f"(cd {folder} && zip -r ../model.zip .) or use {nested[0]} {where}"
            )
        close = difflib.get_close_matches(normalised, self.files, n=1)
        if close:
            return f"{text}; did you mean {close[0]}?"
        sample = ", ".join(self.files[:5]) + (", ..." if len(self.files) > 5 else "")
        return f"{text}; it holds {len(self.files)} file(s): {sample}"

    def open_stream(self) -> IO[bytes]:
        """Open the zip's bytes for reading (for an upload); the caller closes the stream.

        :return: a binary stream positioned at the start of the zip.
        """
        if self._data is not None:
            return io.BytesIO(self._data)
        assert self._path is not None
        return self._open_file(self._path, self._field)

    def open_bytes(self) -> bytes:
        """The zip's bytes.

        :return: the bytes of the archive, as loaded.
        :raises ModelDefinitionError: (``C102``) when the file changed since it was loaded.
        """
        if self._data is not None:
            return self._data
        with self.open_stream() as stream:
            data = stream.read()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise self._changed()
        return data

    def _changed(self) -> ModelDefinitionError:
        return ModelDefinitionError(
            "the file changed since it was loaded and validated; submit it again", field=self._field
        )

    def extract(self, dest: str | os.PathLike[str]) -> Path:
        """Extract the archive into a new folder, safely and atomically.

        The files are written into a temporary sibling of ``dest``, which is renamed to ``dest`` once
        every entry has been written and its CRC checked; on any failure the temporary folder is
        removed and nothing appears at ``dest``.  ``dest`` is checked again just before the rename (a
        folder created at ``dest`` in between is refused, except that POSIX lets a rename replace an
        *empty* folder created in that instant).  No symbolic link is followed or created, the
        executable bit of entries that had one is kept (files get ``0o777`` or ``0o666`` less the
        umask), and the bytes actually written are capped by the entries' declared sizes and by
        ``max_bytes``, whatever the headers say.

        :param dest: the folder to create; its parent is created when missing.
        :return: ``dest`` as a :class:`~pathlib.Path`.
        :raises FileExistsError: when ``dest`` already exists.
        :raises ModelDefinitionError: (``C102``) when an entry is corrupt (bad CRC, bad data), is
            larger than its header said, or when the file changed since it was loaded.
        """
        target = Path(os.fspath(dest))
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "extraction folder already exists", str(target))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._make_temp_dir(target)
        try:
            with self.open_stream() as stream:
                archive, entries = _open_and_scan(stream, self._field, self._limits)
                with archive:
                    if _signature(entries) != _signature(self._entries):
                        raise self._changed()
                    self._extract_entries(archive, entries, tmp)
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "extraction folder already exists", str(target))
            try:
                os.rename(tmp, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise FileExistsError(exc.errno, "extraction folder already exists", str(target)) from exc
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @staticmethod
    def _make_temp_dir(target: Path) -> Path:
        """Create an empty, uniquely named sibling folder of ``target`` (mode ``0o777`` less the umask)."""
        while True:
            tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.partial"
            try:
                os.mkdir(tmp)
            except FileExistsError:
                continue
            return tmp

    def _extract_entries(self, archive: zipfile.ZipFile, entries: list[_Entry], root: Path) -> None:
        written = 0
        for entry in entries:
            out_path = root.joinpath(*entry.path.split("/"))
            if entry.is_dir:
                out_path.mkdir(parents=True, exist_ok=True)
                continue
            out_path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            flags |= getattr(os, "O_CLOEXEC", 0)
            fd = os.open(out_path, flags, 0o777 if entry.executable else 0o666)
            with os.fdopen(fd, "wb") as out:
                entry_written = 0
                for chunk in self._read_entry(archive, entry):
                    entry_written += len(chunk)
                    written += len(chunk)
                    if written > self._limits.max_bytes:
                        raise ModelDefinitionError(
                            f"extracting wrote more than the cap of {self._limits.max_bytes} bytes "
                            f"(zip bomb guard); raise [{SECTION}] model_definition_max_bytes "
                            "if the code really is that large",
                            field=self._field,
                        )
                    if entry_written > entry.info.file_size:
                        raise ModelDefinitionError(
                            f"entry {_show(entry.path)} holds more data than its header declares "
                            f"({entry.info.file_size} bytes); the zip is corrupt or forged (zip bomb guard)",
                            field=self._field,
                        )
                    out.write(chunk)
            if entry_written != entry.info.file_size:
                raise ModelDefinitionError(
                    f"entry {_show(entry.path)} holds {entry_written} bytes, not the {entry.info.file_size} "
                    f"its header declares; the zip is corrupt: re-create it with: {ZIP_HINT}",
                    field=self._field,
                )

    def _read_entry(self, archive: zipfile.ZipFile, entry: _Entry) -> Iterator[bytes]:
        """Yield an entry's decompressed bytes; zipfile checks the CRC when the last chunk is read."""
        try:
            with archive.open(entry.info) as src:
                while True:
                    chunk = src.read(_CHUNK)
                    if not chunk:
                        return
                    yield chunk
        except _CORRUPT_ERRORS as exc:
            raise _corrupt(self._field, exc, entry.path) from exc


def _open_and_scan(stream: IO[bytes], field: str, limits: _Limits) -> tuple[zipfile.ZipFile, list[_Entry]]:
    """Open ``stream`` as a zip and validate its entries; the caller closes the returned archive."""
    try:
        archive = zipfile.ZipFile(stream)
    except _CORRUPT_ERRORS as exc:
        raise _corrupt(field, exc) from exc
    try:
        return archive, _scan(archive, field, limits)
    except BaseException:
        archive.close()
        raise
