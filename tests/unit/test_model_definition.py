"""Tests of :mod:`airflow_wmltrain.model_definition`: the model-definition zip and its refusals."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import stat
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from airflow_wmltrain.errors import ModelDefinitionError
from airflow_wmltrain.model_definition import ModelDefinition
from airflow_wmltrain.settings import Settings

ZIP_FIX = "zip -r ../model.zip ."
ACCEPTED = "only .zip archives are accepted"
SECRET = b"AWS_SECRET_ACCESS_KEY = 'do-not-leak-this'\n"

Entry = tuple[str | zipfile.ZipInfo, bytes]


def make_zip(entries: Iterable[Entry], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of ``(name or ZipInfo, data)`` pairs, in that order (duplicates allowed)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(buf, "w", compression) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return buf.getvalue()


def unix_entry(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def central_headers(data: bytes) -> list[int]:
    """Offsets of the central-directory headers, walked from the end-of-central-directory record."""
    eocd = data.rindex(b"PK\x05\x06")
    count, _size, offset = struct.unpack_from("<HII", data, eocd + 10)
    headers = []
    for _ in range(count):
        assert data[offset : offset + 4] == b"PK\x01\x02"
        headers.append(offset)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, offset + 28)
        offset += 46 + name_len + extra_len + comment_len
    return headers


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def patch_central(data: bytes, index: int, field_offset: int, fmt: str, value: int) -> bytes:
    return patch(data, central_headers(data)[index] + field_offset, fmt, value)


def local_header(data: bytes, index: int) -> int:
    return int(struct.unpack_from("<I", data, central_headers(data)[index] + 42)[0])


def refusal(
    source: str | os.PathLike[str] | bytes, *, max_bytes: int | None = None, max_entries: int | None = None
) -> ModelDefinitionError:
    with pytest.raises(ModelDefinitionError) as info:
        ModelDefinition.load(source, max_bytes=max_bytes, max_entries=max_entries)
    return info.value


def assert_refused(
    exc: ModelDefinitionError, field: str, *words: str, accepted: bool = False
) -> ModelDefinitionError:
    assert exc.code == "C102"
    assert exc.field == field
    text = str(exc)
    assert text.startswith(f"{field}: ")
    assert "\n" not in text
    for word in words:
        assert word in text, f"{word!r} not in {text!r}"
    if accepted:
        assert ACCEPTED in text
        assert ZIP_FIX in text
    return exc


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as archive:  # type: ignore[call-overload]
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


GOOD = [("train.py", b"print('hi')\n"), ("lib/model.py", b"x = 1\n"), ("lib/deep/util.py", b"y = 2\n")]


# --- accepted archives ---------------------------------------------------------------------------------


def test_load_file_reports_name_size_hash_and_files(tmp_path: Path) -> None:
    data = make_zip(GOOD)
    md = ModelDefinition.load(write(tmp_path, "model.zip", data))
    assert md.name == "model.zip"
    assert md.size == len(data)
    assert md.sha256 == hashlib.sha256(data).hexdigest()
    assert md.files == ("lib/deep/util.py", "lib/model.py", "train.py")
    assert md.uncompressed_bytes == sum(len(content) for _, content in GOOD)
    assert md.path == tmp_path / "model.zip"
    assert md.open_bytes() == data
    with md.open_stream() as stream:
        assert stream.read() == data


def test_load_accepts_str_path(tmp_path: Path) -> None:
    md = ModelDefinition.load(str(write(tmp_path, "model.zip", make_zip(GOOD))))
    assert md.contains("train.py")


def test_load_bytes(tmp_path: Path) -> None:
    data = make_zip(GOOD)
    md = ModelDefinition.load(data)
    assert md.name == "<bytes>"
    assert md.path is None
    assert md.sha256 == hashlib.sha256(data).hexdigest()
    assert md.open_bytes() == data
    dest = md.extract(tmp_path / "out")
    assert (dest / "lib" / "deep" / "util.py").read_bytes() == b"y = 2\n"


def test_bytes_refusal_field_is_model_definition() -> None:
    assert_refused(refusal(b"hello world"), "model_definition", "not a zip archive", accepted=True)


def test_nested_folders_are_accepted() -> None:
    md = ModelDefinition.load(make_zip([("a/b/c/d/e/f.py", b"1"), ("a/b/g.txt", b"2"), ("a/", b"")]))
    assert md.files == ("a/b/c/d/e/f.py", "a/b/g.txt")


def test_zip_named_tar_is_accepted(tmp_path: Path) -> None:
    md = ModelDefinition.load(write(tmp_path, "model.tar", make_zip(GOOD)))
    assert md.name == "model.tar"
    assert "train.py" in md.files


def test_stored_entries_are_accepted() -> None:
    md = ModelDefinition.load(make_zip(GOOD, zipfile.ZIP_STORED))
    assert len(md.files) == 3


def test_dot_slash_names_are_normalised() -> None:
    md = ModelDefinition.load(make_zip([("./", b""), ("./src/./train.py", b"1"), ("./README", b"2")]))
    assert md.files == ("README", "src/train.py")


def test_backslash_names_are_normalised(tmp_path: Path) -> None:
    md = ModelDefinition.load(make_zip([("src\\pkg\\train.py", b"1")]))
    assert md.files == ("src/pkg/train.py",)
    dest = md.extract(tmp_path / "out")
    assert (dest / "src" / "pkg" / "train.py").read_bytes() == b"1"


def test_caps_default_to_settings() -> None:
    data = make_zip(GOOD)
    exc = refusal_with_settings(data, Settings(model_definition_max_entries=2))
    assert_refused(exc, "model_definition", "3 entries", "cap of 2", "model_definition_max_entries")
    exc = refusal_with_settings(data, Settings(model_definition_max_bytes=10))
    assert_refused(exc, "model_definition", "cap of 10", "model_definition_max_bytes")
    assert ModelDefinition.load(data).files  # Settings() defaults: 1 GiB, 10000 entries


def refusal_with_settings(data: bytes, settings: Settings) -> ModelDefinitionError:
    with pytest.raises(ModelDefinitionError) as info:
        ModelDefinition.load(data, settings=settings)
    return info.value


def test_explicit_caps_win_over_settings() -> None:
    md = ModelDefinition.load(
        make_zip(GOOD), max_entries=3, settings=Settings(model_definition_max_entries=1)
    )
    assert len(md.files) == 3


# --- refused by content --------------------------------------------------------------------------------


def test_gzip_tar_is_refused(tmp_path: Path) -> None:
    data = gzip.compress(tar_bytes({"train.py": SECRET}))
    exc = refusal(write(tmp_path, "model.tar.gz", data))
    assert_refused(exc, "model.tar.gz", "a gzip-compressed tar archive (.tar.gz)", accepted=True)


def test_gzip_tar_named_zip_is_refused(tmp_path: Path) -> None:
    data = gzip.compress(tar_bytes({"train.py": SECRET}))
    exc = refusal(write(tmp_path, "model.zip", data))
    assert_refused(exc, "model.zip", "gzip-compressed tar archive", accepted=True)


def test_plain_gzip_is_refused(tmp_path: Path) -> None:
    exc = refusal(write(tmp_path, "train.py.gz", gzip.compress(SECRET)))
    assert_refused(exc, "train.py.gz", "a gzip-compressed file (.gz)", accepted=True)
    assert "tar" not in str(exc).split(";")[0]


def test_plain_tar_is_refused(tmp_path: Path) -> None:
    exc = refusal(write(tmp_path, "model.tar", tar_bytes({"train.py": SECRET})))
    assert_refused(exc, "model.tar", "a tar archive (.tar)", accepted=True)


def test_bzip2_is_refused(tmp_path: Path) -> None:
    exc = refusal(write(tmp_path, "model.bz2", bz2.compress(SECRET)))
    assert_refused(exc, "model.bz2", "bzip2-compressed file", accepted=True)
    exc = refusal(write(tmp_path, "model.tbz", bz2.compress(tar_bytes({"a.py": SECRET}))))
    assert_refused(exc, "model.tbz", "bzip2-compressed tar archive (.tar.bz2)", accepted=True)


def test_xz_is_refused(tmp_path: Path) -> None:
    exc = refusal(write(tmp_path, "model.xz", lzma.compress(SECRET)))
    assert_refused(exc, "model.xz", "xz-compressed file", accepted=True)
    exc = refusal(write(tmp_path, "model.zip", lzma.compress(tar_bytes({"a.py": SECRET}))))
    assert_refused(exc, "model.zip", "xz-compressed tar archive (.tar.xz)", accepted=True)


def test_7z_is_refused(tmp_path: Path) -> None:
    exc = refusal(write(tmp_path, "model.7z", b"7z\xbc\xaf\x27\x1c\x00\x04" + SECRET))
    assert_refused(exc, "model.7z", "7z archive", accepted=True)


def test_rar_is_refused(tmp_path: Path) -> None:
    exc = refusal(write(tmp_path, "model.rar", b"Rar!\x1a\x07\x01\x00" + SECRET))
    assert_refused(exc, "model.rar", "RAR archive", accepted=True)


def test_other_content_is_refused_without_dumping_it(tmp_path: Path) -> None:
    exc = refusal(write(tmp_path, "model.zip", SECRET * 3))
    assert_refused(exc, "model.zip", "not a zip archive (starts with 0x4157535f)", accepted=True)
    assert "do-not-leak" not in str(exc)
    assert "AWS" not in str(exc)


@pytest.mark.parametrize(
    "data",
    [
        gzip.compress(tar_bytes({"a.py": SECRET})),
        tar_bytes({"a.py": SECRET}),
        bz2.compress(SECRET),
        lzma.compress(SECRET),
        SECRET,
    ],
    ids=["tgz", "tar", "bz2", "xz", "text"],
)
def test_refusals_never_show_content(data: bytes) -> None:
    text = str(refusal(data))
    assert "do-not-leak" not in text
    assert "SECRET" not in text


def test_self_extracting_zip_is_refused() -> None:
    exc = refusal(b"MZ\x90\x00" + make_zip(GOOD))
    assert_refused(exc, "model_definition", "not a zip archive (starts with 0x4d5a9000)")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.zip"
    exc = refusal(path)
    assert_refused(exc, "model.zip", "file not found", str(path))


def test_empty_file_is_refused(tmp_path: Path) -> None:
    exc = refusal(write(tmp_path, "model.zip", b""))
    assert_refused(exc, "model.zip", "empty file", accepted=True)


def test_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "tf-model"
    folder.mkdir()
    exc = refusal(folder)
    assert_refused(exc, "tf-model", "folder", f"cd {folder} && zip -r ../model.zip .")


def test_fifo_path_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "model.zip"
    os.mkfifo(fifo)
    assert_refused(refusal(fifo), "model.zip", "not a regular file")


# --- corrupt archives ----------------------------------------------------------------------------------


def test_truncated_zip_is_refused(tmp_path: Path) -> None:
    data = make_zip(GOOD)
    exc = refusal(write(tmp_path, "model.zip", data[: len(data) - 40]))
    assert_refused(exc, "model.zip", "corrupt or truncated", ZIP_FIX)


def test_bad_central_directory_is_refused() -> None:
    data = make_zip(GOOD)
    exc = refusal(patch(data, central_headers(data)[1], "<I", 0xDEADBEEF))
    assert_refused(exc, "model_definition", "corrupt or truncated", "central directory")


def test_crc_error_is_refused_on_extract(tmp_path: Path) -> None:
    data = make_zip([("a.py", b"first file"), ("b.py", b"second file")], zipfile.ZIP_STORED)
    data = data.replace(b"second file", b"SECOND FILE")
    md = ModelDefinition.load(data)  # the central directory is fine: refused only when read
    with pytest.raises(ModelDefinitionError) as info:
        md.extract(tmp_path / "out")
    assert_refused(info.value, "model_definition", "entry 'b.py'", "corrupt", "CRC")


def test_unsupported_compression_is_refused() -> None:
    exc = refusal(make_zip([("a.py", b"x" * 100)], zipfile.ZIP_BZIP2))
    assert_refused(exc, "model_definition", "entry 'a.py'", "bzip2", "stored and deflate")
    exc = refusal(make_zip([("a.py", b"x" * 100)], zipfile.ZIP_LZMA))
    assert_refused(exc, "model_definition", "LZMA")


# --- unsafe entries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["/etc/cron.d/x", "C:\\Windows\\x.py", "C:/Windows/x.py", "\\\\server\\x.py"]
)
def test_absolute_entry_is_refused(name: str) -> None:
    exc = refusal(make_zip([("ok.py", b"1"), (name, b"2")]))
    assert_refused(exc, "model_definition", f"entry '{name}'", "absolute path", ZIP_FIX)


@pytest.mark.parametrize("name", ["../evil.py", "a/../../evil.py", "a/../b.py", "a\\..\\..\\evil.py", ".."])
def test_dot_dot_entry_is_refused(name: str) -> None:
    exc = refusal(make_zip([("ok.py", b"1"), (name, b"2")]))
    assert_refused(exc, "model_definition", f"entry '{name}'", "'..'")


def test_nul_in_entry_name_is_refused() -> None:
    data = make_zip([("ok.py", b"1"), ("evilX.py", b"2")]).replace(b"evilX.py", b"evil\x00.py")
    exc = refusal(data)
    assert_refused(exc, "model_definition", "entry 'evil\\x00.py'", "NUL")


def test_symlink_entry_is_refused() -> None:
    data = make_zip([("ok.py", b"1"), (unix_entry("data", stat.S_IFLNK | 0o777), b"/etc/passwd")])
    assert_refused(refusal(data), "model_definition", "entry 'data'", "symbolic link")


@pytest.mark.parametrize("kind", [stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK])
def test_special_file_entry_is_refused(kind: int) -> None:
    data = make_zip([("ok.py", b"1"), (unix_entry("dev", kind | 0o644), b"")])
    assert_refused(refusal(data), "model_definition", "entry 'dev'", "device file, FIFO or socket")


def test_encrypted_entry_is_refused() -> None:
    data = make_zip([("ok.py", b"1"), ("secret.py", b"2")])
    data = patch_central(data, 1, 8, "<H", 0x1)
    assert_refused(refusal(data), "model_definition", "entry 'secret.py'", "encrypted", "password")


@pytest.mark.parametrize(
    ("first", "second", "path"),
    [
        ("a.py", "a.py", "a.py"),
        ("a.py", "./a.py", "a.py"),
        ("d/a.py", "d\\a.py", "d/a.py"),
        ("d/a.py", "d//a.py", "d/a.py"),
    ],
)
def test_duplicate_entries_are_refused(first: str, second: str, path: str) -> None:
    exc = refusal(make_zip([(first, b"1"), (second, b"2")]))
    assert_refused(
        exc, "model_definition", f"entry '{second}' is a duplicate", f"holds '{path}' more than once"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [("A.py", "a.py"), ("src/Model.py", "SRC/model.py"), ("Lib/", "lib/"), ("Caf\u00e9.py", "Cafe\u0301.py")],
)
def test_paths_differing_only_in_case_are_refused(first: str, second: str) -> None:
    exc = refusal(make_zip([(first, b"1" if not first.endswith("/") else b""), (second, b"")]))
    assert_refused(exc, "model_definition", "differ only in letter case", ZIP_FIX)


@pytest.mark.parametrize(
    "name", ["x" * 256 + ".py", "d/" + "\u00e9" * 128 + "/a.py", "/".join(["folder"] * 200) + "/a.py"]
)
def test_names_a_file_system_cannot_hold_are_refused(name: str) -> None:
    exc = refusal(make_zip([("ok.py", b"1"), (name, b"2")]))
    assert_refused(exc, "model_definition", "longer than")


def test_longest_names_are_accepted(tmp_path: Path) -> None:
    name = "x" * 252 + ".py"
    dest = ModelDefinition.load(make_zip([(name, b"1")])).extract(tmp_path / "out")
    assert (dest / name).read_bytes() == b"1"


def test_folder_entry_with_data_is_refused() -> None:
    data = make_zip([("ok.py", b"1"), (unix_entry("weird", stat.S_IFDIR | 0o755), b"data")])
    assert_refused(refusal(data), "model_definition", "entry 'weird' is a folder that holds 4 bytes")


def test_file_that_is_also_a_folder_is_refused() -> None:
    exc = refusal(make_zip([("lib", b"1"), ("lib/a.py", b"2")]))
    assert_refused(exc, "model_definition", "'lib' is both a file and a folder")


# --- zip bomb guards and emptiness ---------------------------------------------------------------------


def test_total_size_cap_is_refused() -> None:
    data = make_zip([("a.bin", b"\0" * 600), ("b.bin", b"\0" * 600)])
    assert ModelDefinition.load(data, max_bytes=1200).uncompressed_bytes == 1200
    exc = refusal(data, max_bytes=1199)
    assert_refused(
        exc,
        "model_definition",
        "1200 bytes",
        "cap of 1199",
        "zip bomb guard",
        "[wmltrain] model_definition_max_bytes",
    )


def test_entry_count_cap_is_refused() -> None:
    data = make_zip([(f"f{i}.py", b"") for i in range(5)])
    assert len(ModelDefinition.load(data, max_entries=5).files) == 5
    exc = refusal(data, max_entries=4)
    assert_refused(
        exc,
        "model_definition",
        "5 entries",
        "cap of 4",
        "zip bomb guard",
        "[wmltrain] model_definition_max_entries",
    )


def test_empty_archive_is_refused() -> None:
    assert_refused(refusal(make_zip([])), "model_definition", "holds no files")


def test_archive_with_only_folders_is_refused() -> None:
    assert_refused(refusal(make_zip([("a/", b""), ("a/b/", b"")])), "model_definition", "holds no files")


def test_invalid_caps_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        ModelDefinition.load(make_zip(GOOD), max_bytes=0)


# --- extract -------------------------------------------------------------------------------------------


def test_extract_produces_exact_tree_and_exec_bits(tmp_path: Path) -> None:
    data = make_zip(
        [
            (unix_entry("run.sh", stat.S_IFREG | 0o755), b"#!/bin/sh\necho hi\n"),
            (unix_entry("train.py", stat.S_IFREG | 0o644), b"print(1)\n"),
            ("pkg/", b""),
            ("pkg/__init__.py", b""),
            ("pkg/sub/mod.py", b"z = 3\n"),
            ("empty/", b""),
            ("win\\style.py", b"w"),
        ]
    )
    dest = ModelDefinition.load(data).extract(tmp_path / "work" / "code")
    assert dest == tmp_path / "work" / "code"
    tree = sorted(str(p.relative_to(dest)) for p in dest.rglob("*"))
    assert tree == [
        "empty",
        "pkg",
        "pkg/__init__.py",
        "pkg/sub",
        "pkg/sub/mod.py",
        "run.sh",
        "train.py",
        "win",
        "win/style.py",
    ]
    assert (dest / "run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "pkg" / "sub" / "mod.py").read_bytes() == b"z = 3\n"
    assert (dest / "pkg" / "__init__.py").read_bytes() == b""
    assert os.stat(dest / "run.sh").st_mode & 0o100
    assert not os.stat(dest / "train.py").st_mode & 0o111
    assert not os.stat(dest / "pkg" / "sub" / "mod.py").st_mode & 0o111
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert sorted(os.listdir(tmp_path / "work")) == ["code"]  # no temporary sibling left


def test_extract_is_atomic_on_crc_error(tmp_path: Path) -> None:
    data = make_zip([("a.py", b"first file"), ("b/c.py", b"second file")], zipfile.ZIP_STORED)
    md = ModelDefinition.load(data.replace(b"second file", b"second fil3"))
    with pytest.raises(ModelDefinitionError) as info:
        md.extract(tmp_path / "out")
    assert_refused(info.value, "model_definition", "entry 'b/c.py'", "CRC")
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []


def test_extract_is_atomic_on_write_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = ModelDefinition.load(make_zip(GOOD))
    calls: list[str] = []
    real_open = os.open

    def failing_open(path: str, flags: int, mode: int = 0o777, **kwargs: object) -> int:
        if str(path).endswith("model.py"):  # the second file written
            calls.append(str(path))
            raise OSError(28, "No space left on device")
        return real_open(path, flags, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        md.extract(tmp_path / "out")
    assert len(calls) == 1
    assert os.listdir(tmp_path) == []


def test_extract_refuses_existing_dest(tmp_path: Path) -> None:
    md = ModelDefinition.load(make_zip(GOOD))
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        md.extract(dest)
    assert os.listdir(dest) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_extract_refuses_dangling_symlink_dest(tmp_path: Path) -> None:
    md = ModelDefinition.load(make_zip(GOOD))
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        md.extract(tmp_path / "link")
    assert not (tmp_path / "elsewhere").exists()


def test_extract_refuses_entry_larger_than_its_header_says(tmp_path: Path) -> None:
    """A central directory that declares 10 bytes for a 2 MiB entry: the 1 MiB cap is not reached."""
    data = make_zip([("a.py", b"1"), ("big.bin", b"A" * (2 * 1024 * 1024))], zipfile.ZIP_STORED)
    data = patch_central(data, 1, 24, "<I", 10)  # uncompressed size
    md = ModelDefinition.load(data, max_bytes=1024 * 1024)
    assert md.uncompressed_bytes == 11
    with pytest.raises(ModelDefinitionError) as info:
        md.extract(tmp_path / "out")
    assert_refused(info.value, "model_definition", "entry 'big.bin'", "corrupt")
    assert os.listdir(tmp_path) == []


def test_extract_writes_no_more_than_declared_even_with_matching_crc(tmp_path: Path) -> None:
    import zlib

    big = b"A" * (2 * 1024 * 1024)
    data = make_zip([("big.bin", big)], zipfile.ZIP_STORED)
    data = patch_central(data, 0, 24, "<I", 10)
    data = patch_central(data, 0, 16, "<I", zlib.crc32(big[:10]))
    dest = ModelDefinition.load(data, max_bytes=1024).extract(tmp_path / "out")
    assert (dest / "big.bin").stat().st_size == 10


def test_extract_refuses_entry_shorter_than_its_header_says(tmp_path: Path) -> None:
    data = make_zip([("a.py", b"0123456789")], zipfile.ZIP_STORED)
    data = patch_central(data, 0, 24, "<I", 100)
    md = ModelDefinition.load(data)
    with pytest.raises(ModelDefinitionError) as info:
        md.extract(tmp_path / "out")
    assert_refused(info.value, "model_definition", "entry 'a.py'", "holds 10 bytes, not the 100")
    assert os.listdir(tmp_path) == []


def endless_read(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
    """A decompressor that ignores the declared sizes and never ends."""
    return b"B" * (n if n > 0 else 4096)


def test_extract_caps_actual_bytes_per_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = ModelDefinition.load(make_zip([("a.py", b"0123456789")]), max_bytes=10_000_000)
    monkeypatch.setattr(zipfile.ZipExtFile, "read", endless_read)
    with pytest.raises(ModelDefinitionError) as info:
        md.extract(tmp_path / "out")
    assert_refused(info.value, "model_definition", "entry 'a.py'", "more data than its header declares")
    assert os.listdir(tmp_path) == []


def test_extract_caps_actual_total_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md = ModelDefinition.load(make_zip([("a.bin", b"\0" * 1000)]), max_bytes=1000)
    monkeypatch.setattr(zipfile.ZipExtFile, "read", endless_read)
    with pytest.raises(ModelDefinitionError) as info:
        md.extract(tmp_path / "out")
    assert_refused(
        info.value, "model_definition", "cap of 1000 bytes", "zip bomb guard", "model_definition_max_bytes"
    )
    assert os.listdir(tmp_path) == []


def test_extract_refuses_file_changed_since_load(tmp_path: Path) -> None:
    path = write(tmp_path, "model.zip", make_zip(GOOD))
    md = ModelDefinition.load(path)
    path.write_bytes(make_zip([("other.py", b"1")]))
    with pytest.raises(ModelDefinitionError) as info:
        md.extract(tmp_path / "out")
    assert_refused(info.value, "model.zip", "changed since it was loaded")
    with pytest.raises(ModelDefinitionError):
        md.open_bytes()
    assert sorted(os.listdir(tmp_path)) == ["model.zip"]


# --- lookups -------------------------------------------------------------------------------------------


def test_contains_normalises_paths() -> None:
    md = ModelDefinition.load(make_zip(GOOD))
    assert md.contains("train.py")
    assert md.contains("./train.py")
    assert md.contains("lib//deep/./util.py")
    assert md.contains("./lib/model.py")
    assert not md.contains("lib")  # folders are not files
    assert not md.contains("../train.py")
    assert not md.contains("lib/../train.py")  # '..' is never looked up, as in entries
    assert not md.contains("/train.py")
    assert not md.contains("missing.py")


def test_require_files_present() -> None:
    md = ModelDefinition.load(make_zip(GOOD))
    md.require_files(["./train.py", "lib/model.py"], field="model_definition.execution.command")


def test_require_files_missing() -> None:
    md = ModelDefinition.load(make_zip(GOOD))
    with pytest.raises(ModelDefinitionError) as info:
        md.require_files(["train.py", "evaluate.py", "nope/x.sh"], field="model_definition.execution.command")
    exc = assert_refused(
        info.value, "model_definition.execution.command", "'evaluate.py' is not in the model definition"
    )
    assert len(exc.problems) == 2
    assert "'nope/x.sh'" in exc.problems[1]
    assert all(p.startswith("model_definition.execution.command: ") for p in exc.problems)


def test_require_files_suggests_close_match() -> None:
    md = ModelDefinition.load(make_zip(GOOD))
    with pytest.raises(ModelDefinitionError) as info:
        md.require_files(["trian.py"], field="model_definition.execution.command")
    assert_refused(info.value, "model_definition.execution.command", "did you mean train.py?")


def test_require_files_zipped_folder_hint(tmp_path: Path) -> None:
    data = make_zip(
        [
            ("tf-model/", b""),
            ("tf-model/convolutional_network.py", b"1"),
            ("tf-model/input_data.py", b"2"),
            ("__MACOSX/tf-model/._convolutional_network.py", b"3"),
        ]
    )
    md = ModelDefinition.load(write(tmp_path, "model.zip", data))
    with pytest.raises(ModelDefinitionError) as info:
        md.require_files(["convolutional_network.py"], field="model_definition.execution.command")
    assert_refused(
        info.value,
        "model_definition.execution.command",
        "'convolutional_network.py' is not in the model definition 'model.zip'",
        "the zip holds tf-model/convolutional_network.py: zip the folder's contents "
        "(cd tf-model && zip -r ../model.zip .) or use tf-model/convolutional_network.py in the command",
    )
