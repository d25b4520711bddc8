"""Fuzzing manifest and zip parsing: every input loads or is refused with a WmlTrainError, never a
traceback of another kind (bounded examples: seconds)."""

from __future__ import annotations

import contextlib
import io
import zipfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_wmltrain.command import apply_hyperparameters, referenced_scripts
from airflow_wmltrain.errors import WmlTrainError
from airflow_wmltrain.manifest import load_manifest
from airflow_wmltrain.model_definition import ModelDefinition
from tests.conftest import SEED_S3, SEED_SWIFT
from tests.corpus.hostile import good_zip

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEED_TEXTS = [SEED_S3.read_text(), SEED_SWIFT.read_text()]
YAML_BITS = [
    ":",
    "- ",
    "&a ",
    "*a",
    "!!",
    "[",
    "]",
    "{",
    "}",
    "'",
    '"',
    "\n",
    "  ",
    "#",
    "|",
    ">",
    "?",
    ",",
    "~",
    "null",
    "2024-02-30",
    "0x",
    "1e999",
    ".inf",
    "<<: *a",
    "%YAML 1.1\n",
    "---\n",
    "\t",
    "\x00",
]


@st.composite
def mutated_yaml(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(SEED_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 20))
        insert = draw(st.one_of(st.sampled_from(YAML_BITS), st.text(max_size=8)))
        text = text[:at] + insert + text[at + cut :]
    return text


def loads_or_refuses(source: object) -> None:
    try:
        load_manifest(source)  # type: ignore[arg-type]
    except WmlTrainError as err:
        assert "\n" not in str(err)


@FUZZ
@given(mutated_yaml())
def test_mutated_manifest_text(text: str) -> None:
    loads_or_refuses(text)


@FUZZ
@given(st.text(max_size=200))
def test_any_text_as_manifest(text: str) -> None:
    if "\n" not in text and (text.strip().endswith((".yml", ".yaml"))):
        text += "\n"  # a one-line path-like string is read as a path: not this test's subject
    loads_or_refuses(text)


values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.binary(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["model_definition", "training_data", "training_results_reference", "x"]), values
    )
)
def test_any_mapping_as_manifest(document: dict[str, object]) -> None:
    loads_or_refuses(document)


GOOD = good_zip()


@st.composite
def mutated_zip(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([GOOD, _zip_with_folder()])))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "byte", "cut", "insert"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[at] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, ord("/"), ord("."), ord("\\")]))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 40))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        if not data:
            data = bytearray(b"PK")
    return bytes(data)


def _zip_with_folder() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("src/", b"")
        archive.writestr("src/train.py", b"print(1)\n" * 20)
        archive.writestr("run.sh", b"python3 src/train.py\n")
    return buffer.getvalue()


@FUZZ
@given(mutated_zip())
def test_mutated_zip(data: bytes) -> None:
    try:
        model = ModelDefinition.load(data)
    except WmlTrainError as err:
        assert err.code == "C102"
        assert "\n" not in str(err)
        return
    with contextlib.suppress(WmlTrainError):
        model.open_bytes()


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_as_zip(data: bytes) -> None:
    try:
        ModelDefinition.load(b"PK\x03\x04" + data)
    except WmlTrainError as err:
        assert err.code == "C102"


COMMAND_BITS = [
    *"ab -='\"\\$`(){};&|<>#\n\t*~!",
    "python3 t.py",
    "--x",
    "--x=",
    "<<E",
    "E",
    "2>&1",
    "$(",
    "${",
]


@FUZZ
@given(
    st.lists(st.sampled_from(COMMAND_BITS), max_size=20).map("".join),
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
)
def test_any_command_with_hyperparameters(command: str, value: object) -> None:
    referenced_scripts(command)
    try:
        apply_hyperparameters(command, {"x": value})
    except WmlTrainError as err:
        assert err.code == "C101"
