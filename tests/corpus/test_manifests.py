"""Hostile manifests: huge ones, YAML bombs, wrong types for every field, missing and unknown fields,
hostile bucket names and prefixes, bad hyperparameters."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.conftest import SEED_S3, SEED_SWIFT
from tests.corpus.conftest import Refusals

SEEDS = {"s3": yaml.safe_load(SEED_S3.read_text()), "swift": yaml.safe_load(SEED_SWIFT.read_text())}
CANONICAL = {"training_data": "training_data_reference", "training_results": "training_results_reference"}
#: Fields that may be left out.
OPTIONAL = {
    "description",
    "author",
    "name@author",
    "email",
    "endpoint_url",
    "region",
    "domain_name",
    "domainName",
    "project_id",
    "projectId",
    "prefix",
}


def leaves(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for key, child in node.items():
            yield from leaves(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from leaves(child, (*path, index))
    else:
        yield path


def branches(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path (leaves and mappings)."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield (*path, key)
            yield from branches(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from branches(child, (*path, index))


def field_of(path: tuple[Any, ...]) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else CANONICAL.get(part, part)
    return text


def edited(seed: str, path: tuple[Any, ...], value: Any = None, *, delete: bool = False) -> str:
    document = copy.deepcopy(SEEDS[seed])
    node = document
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return yaml.safe_dump(document)


WRONG_TYPES = [["a", "list"], {"a": "mapping"}, 12.5, True]
CASES = [
    (seed, path, index) for seed in SEEDS for path in leaves(SEEDS[seed]) for index in range(len(WRONG_TYPES))
]


@pytest.mark.parametrize(("seed", "path", "index"), CASES, ids=str)
def test_wrong_type_for_every_field(refused: Refusals, seed: str, path: tuple[Any, ...], index: int) -> None:
    error = refused(manifest=edited(seed, path, WRONG_TYPES[index]), code=_code_of(path))
    assert error.field is not None
    assert error.field.startswith(field_of(path)), (error.field, field_of(path))


def _code_of(path: tuple[Any, ...]) -> str:
    if "connection" in path:
        return "C103"
    if path[-1:] == ("resource",):
        return "C104"
    return "C101"


REQUIRED = [
    (seed, path)
    for seed in SEEDS
    for path in branches(SEEDS[seed])
    if path[-1] not in OPTIONAL and not (path[-1] == "name" and "author" in path)
]


@pytest.mark.parametrize(("seed", "path"), REQUIRED, ids=str)
def test_missing_fields(refused: Refusals, seed: str, path: tuple[Any, ...]) -> None:
    if isinstance(path[-1], int):
        pytest.skip("a list item")
    error = refused(manifest=edited(seed, path, delete=True), code=_code_of(path))
    assert error.field is not None
    assert field_of(path).startswith(error.field) or error.field.startswith(field_of(path[:-1]))


def _mapping_paths(seed: str) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = [()]
    for path in branches(SEEDS[seed]):
        node: Any = SEEDS[seed]
        for part in path:
            node = node[part]
        if isinstance(node, dict):
            found.append(path)
        elif isinstance(node, list):
            found += [(*path, i) for i, item in enumerate(node) if isinstance(item, dict)]
    return found


@pytest.mark.parametrize(("seed", "path"), [(s, p) for s in SEEDS for p in _mapping_paths(s)], ids=str)
def test_unknown_fields(refused: Refusals, seed: str, path: tuple[Any, ...]) -> None:
    error = refused(
        manifest=edited(seed, (*path, "bogus_key"), "x"), code=_code_of(path), words=("bogus_key",)
    )
    assert error.field is not None
    assert error.field.endswith("bogus_key")


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


def test_huge_manifest(refused: Refusals) -> None:
    text = SEED_S3.read_text().replace(
        "description: Simple MNIST model implemented in TF", "description: " + "x" * (2 * 1024 * 1024)
    )
    refused(manifest=text, code="C101", words=("1,048,576",))


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "word"),
    [
        (BILLION_LAUGHS, "aliases"),
        (SEED_S3.read_text() + BILLION_LAUGHS, "aliases"),
        ("a: &a [*a]\n", "refers to a value that holds it"),
        ("[" * 1000 + "]" * 1000, "nested"),
        ("{a: " * 40 + "1" + "}" * 40, "nested"),
        ("!!python/object/apply:os.system ['touch pwned']", "constructor"),
        ("when: 2024-02-30\n", "cannot be read"),
        ("a: 'unclosed\n", "not valid YAML"),
        ("\x00\x01", "not valid YAML"),
        ("[1, 2]", "must be a YAML mapping"),
        ("", "must be a YAML mapping"),
    ],
    ids=[
        "billion-laughs",
        "seed-plus-laughs",
        "recursive",
        "deep-list",
        "deep-map",
        "python-tag",
        "bad-date",
        "unclosed",
        "binary",
        "list",
        "empty",
    ],
)
def test_yaml_bombs_and_garbage(refused: Refusals, text: str, word: str) -> None:
    refused(manifest=text, code="C101", words=(word,))


HOSTILE_BUCKETS = [
    "evil:8443#",
    "evil.example.com:443/x",
    "a@evil",
    "x?y=1",
    "UPPER",
    "two..dots",
    "10.0.0.1",
    "xn--evil",
    "b-s3alias",
    "-x-",
    "ab",
    "x" * 64,
    "sp ace",
    "tab\tname",
    "crlf\r\nHost: evil",
]


@pytest.mark.parametrize("bucket", HOSTILE_BUCKETS)
@pytest.mark.parametrize("where", ["source", "target"])
def test_hostile_s3_bucket_names(refused: Refusals, bucket: str, where: str) -> None:
    path = (
        ("training_data", 0, "source", "bucket")
        if where == "source"
        else ("training_results", "target", "bucket")
    )
    refused(manifest=edited("s3", path, bucket), code="C101", field=field_of(path))


@pytest.mark.parametrize("bucket", ["a/b", "\u00e9" * 129, "nul\x00byte", "../up"])
def test_hostile_swift_container_names(refused: Refusals, bucket: str) -> None:
    path = ("training_results_reference", "target", "bucket")
    refused(manifest=edited("swift", path, bucket), code="C101", field=field_of(path))


@pytest.mark.parametrize("prefix", ["../other", "a/../../b", "./..", "a\r\nb"])
def test_hostile_prefixes(refused: Refusals, prefix: str) -> None:
    path = ("training_data", 0, "source", "prefix")
    refused(manifest=edited("s3", path, prefix), code="C101", field=field_of(path))


@pytest.mark.parametrize("name", ["a;b", "$(touch x)", "`x`", "a b", "--", "1lr", "lr\nreboot"])
def test_hostile_hyperparameter_names(refused: Refusals, name: str) -> None:
    refused(hyperparameters={name: "1"}, code="C101", field="hyperparameters")
