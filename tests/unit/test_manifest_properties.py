"""Property-based: any mutation of a valid manifest is either valid or refused with a field-naming error."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from airflow_wmltrain.errors import ManifestError
from airflow_wmltrain.manifest import TrainingManifest, load_manifest
from tests.conftest import SEED_S3, SEED_SECRETS, SEED_SWIFT

SEEDS = [yaml.safe_load(SEED_S3.read_text()), yaml.safe_load(SEED_SWIFT.read_text())]
FIELD_MESSAGE = re.compile(r"^[^\n]+?: [^\n]+$")
KNOWN_KEYS = [
    "model_definition", "name", "description", "author", "email", "framework", "version", "execution",
    "command", "resource", "training_data_reference", "training_data", "training_results_reference",
    "training_results", "connection", "source", "target", "bucket", "type", "prefix", "conn_id",
    "endpoint_url", "aws_access_key_id", "aws_secret_access_key", "auth_url", "user_name", "username",
    "password", "region", "domain_name", "domainName", "project_id", "projectId",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        ["small", "medium", "large", "s3", "swift", "bluemix_objectstore", "1.2-py3", "tensorflow"]
    ),
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12), st.integers(0, 3))


def _containers(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path] if isinstance(node, dict | list) else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in children:
        found += _containers(child, (*path, key))
    return found


@st.composite
def mutated_manifests(draw: st.DrawFn) -> dict[str, Any]:
    document = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_containers(document)))
        node: Any = document
        for step in path:
            node = node[step]
        action = draw(st.sampled_from(["delete", "replace", "add", "rename"]))
        members = list(node.keys()) if isinstance(node, dict) else list(range(len(node)))
        if action == "add" or not members:
            if isinstance(node, dict):
                node[draw(keys)] = draw(values)
            else:
                node.append(draw(values))
            continue
        member = draw(st.sampled_from(members))
        if action == "delete":
            del node[member]
        elif action == "replace":
            node[member] = draw(values)
        elif isinstance(node, dict):
            node[draw(keys)] = node.pop(member)
    return document


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_manifests())
def test_mutations_are_valid_or_refused_naming_a_field(document: dict[str, Any]) -> None:
    try:
        manifest = load_manifest(document)
    except ManifestError as err:
        assert err.code in {"C101", "C103", "C104"}
        text = str(err)
        assert err.field, text
        assert text.startswith(f"{err.field}: ")
        assert FIELD_MESSAGE.match(text), text
        for secret in SEED_SECRETS:
            assert secret not in text
            assert all(secret not in problem for problem in err.problems)
    else:
        assert isinstance(manifest, TrainingManifest)
        assert all(secret not in manifest.to_yaml() for secret in SEED_SECRETS)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_valid_or_refused(text: str) -> None:
    try:
        load_manifest(text)
    except ManifestError as err:
        assert FIELD_MESSAGE.match(str(err)), str(err)
