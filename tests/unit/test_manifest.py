"""The training manifest contract: every field of SPEC §1, both seed spellings, every refusal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_wmltrain.errors import CredentialsError, ManifestError, ResourceError
from airflow_wmltrain.manifest import (
    REDACTED,
    ConnectionId,
    S3Connection,
    SwiftConnection,
    load_manifest,
    redact_manifest,
    redact_url,
    secret_values_of,
)
from airflow_wmltrain.settings import Settings, parse_resource_classes
from tests.conftest import SEED_S3, SEED_SECRETS, SEED_SWIFT

Mutation = Callable[[dict[str, Any]], None]


def refusal(manifest: Any, error: type[ManifestError] = ManifestError, **kwargs: Any) -> ManifestError:
    with pytest.raises(error) as info:
        load_manifest(manifest, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    for secret in SEED_SECRETS:
        assert secret not in text
        assert all(secret not in problem for problem in info.value.problems)
    return info.value


# --- the seed, verbatim -------------------------------------------------------------------------------


def test_seed_s3_manifest_with_training_data_spelling() -> None:
    m = load_manifest(SEED_S3)
    assert m.name == "tf-mnist-showtest1"
    assert m.description == "Simple MNIST model implemented in TF"
    assert (m.author_name, m.author_email) == ("WML User", "wmluser@ibm.com")
    assert (m.framework.name, m.framework.version) == ("tensorflow", "1.2-py3")
    assert m.framework.image == "tensorflow/tensorflow:1.2.0-gpu-py3"
    assert (m.resource, m.gpus) == ("small", 1)
    assert m.command.startswith("python3 convolutional_network.py --trainImagesFile ${DATA_DIR}/train-images")
    assert m.command.endswith("--learningRate 0.001 --trainingIters 2000000")
    assert (m.data.type, m.data.bucket) == ("s3", "mnist-training-data")
    assert (m.results.type, m.results.bucket) == ("s3", "mnist-training-models")
    assert isinstance(m.data.connection, S3Connection)
    assert m.data.connection.endpoint_url == "https://s3.us-south.cloud-object-storage.appdomain.cloud"
    assert m.data.connection.aws_secret_access_key.get_secret_value() == SEED_SECRETS[1]


def test_seed_swift_manifest_with_reference_spelling() -> None:
    m = load_manifest(SEED_SWIFT)
    assert (m.data.type, m.data.type_as_written, m.data.bucket) == (
        "swift",
        "bluemix_objectstore",
        "mnist-training-data",
    )
    assert (m.results.type, m.results.bucket) == ("swift", "mnist-training-models")
    conn = m.data.connection
    assert isinstance(conn, SwiftConnection)
    assert conn.auth_url == "https://identity.open.softlayer.com"
    assert conn.region == "dallas"
    assert conn.domain_name == "1026873"  # numeric console id read by YAML as an int, kept as written
    assert conn.project_id == "8d2a6f4e1b9c4d7a8e3f5b0c2d6a9e1f"


def test_manifest_from_text_path_string_and_mapping(seed_s3: dict[str, Any]) -> None:
    assert load_manifest(SEED_S3.read_text()).name == "tf-mnist-showtest1"
    assert load_manifest(str(SEED_S3)).name == "tf-mnist-showtest1"
    assert load_manifest(seed_s3).name == "tf-mnist-showtest1"


def test_command_keeps_variables_for_run_time() -> None:
    assert "${DATA_DIR}/t10k-labels-idx1-ubyte.gz" in load_manifest(SEED_SWIFT).command


def test_missing_file_is_named(tmp_path: Path) -> None:
    err = refusal(tmp_path / "nope.yaml")
    assert err.code == "C101"
    assert err.field == str(tmp_path / "nope.yaml")
    assert "file not found" in str(err)


def test_yaml_error_gives_position_but_never_the_line() -> None:
    text = SEED_SWIFT.read_text().replace("password: Xq7#pL2m{Rt9vW4z", "password: 'Xq7#pL2m{Rt9vW4z")
    err = refusal(text)
    assert "not valid YAML at line" in str(err)


@pytest.mark.parametrize("document", ["- a\n- b\n", "", "just text"])
def test_top_level_must_be_a_mapping(document: str) -> None:
    assert "must be a YAML mapping" in str(refusal(document))


# --- keys ---------------------------------------------------------------------------------------------


def test_both_spellings_at_once_are_refused(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data_reference"] = seed_s3["training_data"]
    err = refusal(seed_s3)
    assert err.field == "training_data"
    assert "not both" in str(err)


@pytest.mark.parametrize(
    ("mutate", "field", "hint"),
    [
        (lambda d: d.__setitem__("training_result", {}), "training_result", "did you mean 'training_results"),
        (
            lambda d: d["model_definition"].__setitem__("executon", d["model_definition"].pop("execution")),
            "model_definition.executon",
            "did you mean 'execution'",
        ),
        (
            lambda d: d["model_definition"]["execution"].__setitem__("resources", "small"),
            "model_definition.execution.resources",
            "did you mean 'resource'",
        ),
        (
            lambda d: d["model_definition"]["framework"].__setitem__("versoin", "1"),
            "model_definition.framework.versoin",
            "expected name, version",
        ),
        (
            lambda d: d["training_data"][0]["source"].__setitem__("buckt", "x"),
            "training_data_reference[0].source.buckt",
            "did you mean 'bucket'",
        ),
        (
            lambda d: d["model_definition"]["author"].__setitem__("mail", "a@b.c"),
            "model_definition.author.mail",
            "did you mean 'email'",
        ),
    ],
)
def test_unknown_keys_are_refused_with_their_path(
    seed_s3: dict[str, Any], mutate: Mutation, field: str, hint: str
) -> None:
    mutate(seed_s3)
    err = refusal(seed_s3)
    assert err.field == field
    assert "unknown key" in str(err)
    assert hint in str(err)


def test_unknown_connection_key_is_refused(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"][0]["connection"]["aws_secret_acces_key"] = "oops"
    err = refusal(seed_s3, CredentialsError)
    assert err.code == "C103"
    assert err.field is not None
    assert err.field.startswith("training_data_reference[0].connection")


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("model_definition", "name"), "model_definition.name"),
        (("model_definition", "framework"), "model_definition.framework"),
        (("model_definition", "framework", "version"), "model_definition.framework.version"),
        (("model_definition", "execution", "command"), "model_definition.execution.command"),
        (("model_definition",), "model_definition"),
        (("training_results",), "training_results_reference"),
        (("training_data",), "training_data_reference"),
    ],
)
def test_required_fields(seed_s3: dict[str, Any], path: tuple[str, ...], field: str) -> None:
    parent = seed_s3
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    err = refusal(seed_s3)
    assert err.field == field
    assert "is required" in str(err)


def test_description_and_author_are_optional(seed_s3: dict[str, Any]) -> None:
    del seed_s3["model_definition"]["description"]
    del seed_s3["model_definition"]["author"]
    m = load_manifest(seed_s3)
    assert (m.description, m.author_name, m.author_email) == ("", None, None)


def test_author_email_is_checked(seed_s3: dict[str, Any]) -> None:
    seed_s3["model_definition"]["author"]["email"] = "not-an-address"
    assert refusal(seed_s3).field == "model_definition.author.email"


@pytest.mark.parametrize(("value", "kind"), [(["x"], "a list"), (42, "a number"), ({"a": 1}, "a mapping")])
def test_name_must_be_a_string(seed_s3: dict[str, Any], value: Any, kind: str) -> None:
    seed_s3["model_definition"]["name"] = value
    err = refusal(seed_s3)
    assert str(err) == f"model_definition.name: must be a string, got {kind}"


# --- execution ----------------------------------------------------------------------------------------


def test_resource_classes_map_to_gpus(seed_s3: dict[str, Any]) -> None:
    for resource, gpus in (("small", 1), ("medium", 2), ("large", 4)):
        seed_s3["model_definition"]["execution"]["resource"] = resource
        assert load_manifest(seed_s3).gpus == gpus


def test_unknown_resource_is_c104(seed_s3: dict[str, Any]) -> None:
    seed_s3["model_definition"]["execution"]["resource"] = "huge"
    err = refusal(seed_s3, ResourceError)
    assert err.code == "C104"
    assert str(err) == "model_definition.execution.resource: 'huge' is not one of small, medium, large"


def test_resource_classes_come_from_settings(seed_s3: dict[str, Any]) -> None:
    settings = Settings(resource_classes=parse_resource_classes("small=1,xlarge=8"))
    seed_s3["model_definition"]["execution"]["resource"] = "xlarge"
    assert load_manifest(seed_s3, settings=settings).gpus == 8
    seed_s3["model_definition"]["execution"]["resource"] = "large"
    assert "is not one of small, xlarge" in str(refusal(seed_s3, ResourceError, settings=settings))


@pytest.mark.parametrize("command", ["", "   ", None])
def test_command_must_not_be_empty(seed_s3: dict[str, Any], command: Any) -> None:
    seed_s3["model_definition"]["execution"]["command"] = command
    assert refusal(seed_s3).field == "model_definition.execution.command"


def test_command_is_kept_as_written(seed_s3: dict[str, Any]) -> None:
    script = "set -e\npython3 prep.py --tag 'a  b'\npython3 convolutional_network.py\n"
    seed_s3["model_definition"]["execution"]["command"] = script
    assert load_manifest(seed_s3).command == script.strip()


def test_command_must_be_a_string(seed_s3: dict[str, Any]) -> None:
    seed_s3["model_definition"]["execution"]["command"] = ["python3", "train.py"]
    assert str(refusal(seed_s3)) == "model_definition.execution.command: must be a string, got a list"


# --- framework ----------------------------------------------------------------------------------------


def test_unknown_framework_lists_the_supported_ones(seed_s3: dict[str, Any]) -> None:
    seed_s3["model_definition"]["framework"]["name"] = "theano"
    err = refusal(seed_s3)
    assert err.field == "model_definition.framework.name"
    assert "framework 'theano' is not supported" in str(err)
    assert "tensorflow 1.15-py3, 1.2-py3" in str(err)
    assert "pytorch" in str(err)


def test_unknown_version_lists_the_versions(seed_s3: dict[str, Any]) -> None:
    seed_s3["model_definition"]["framework"]["version"] = "0.9"
    err = refusal(seed_s3)
    assert err.field == "model_definition.framework.version"
    assert "supported versions of tensorflow: 1.15-py3, 1.2-py3" in str(err)


def test_version_read_as_a_number_must_be_quoted(seed_s3: dict[str, Any]) -> None:
    seed_s3["model_definition"]["framework"]["version"] = 1.2
    assert "quote it" in str(refusal(seed_s3))


def test_framework_name_is_case_insensitive(seed_s3: dict[str, Any]) -> None:
    seed_s3["model_definition"]["framework"]["name"] = "TensorFlow"
    assert load_manifest(seed_s3).framework.name == "tensorflow"


# --- references ---------------------------------------------------------------------------------------


def test_exactly_one_data_reference(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"].append(seed_s3["training_data"][0])
    err = refusal(seed_s3)
    assert err.field == "training_data_reference"
    assert "exactly one data reference is supported, got 2" in str(err)


def test_data_reference_list_must_not_be_empty(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"] = []
    assert str(refusal(seed_s3)) == "training_data_reference: must not be empty"


def test_data_reference_must_be_a_list(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"] = seed_s3["training_data"][0]
    assert "must be a list with one entry" in str(refusal(seed_s3))


@pytest.mark.parametrize("type_", ["s3", "bluemix_objectstore", "swift"])
def test_store_types(seed_swift: dict[str, Any], seed_s3: dict[str, Any], type_: str) -> None:
    doc = seed_s3 if type_ == "s3" else seed_swift
    key = "training_data" if type_ == "s3" else "training_data_reference"
    doc[key][0]["source"]["type"] = type_
    m = load_manifest(doc)
    assert m.data.type == ("s3" if type_ == "s3" else "swift")
    assert m.data.type_as_written == type_


def test_unknown_store_type(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_results"]["target"]["type"] = "gcs"
    err = refusal(seed_s3)
    assert err.field == "training_results_reference.target.type"
    assert "'gcs' is not one of s3, bluemix_objectstore" in str(err)


@pytest.mark.parametrize("bucket", ["a/b", "x" * 300, "tab\tname"])
def test_bucket_names(seed_s3: dict[str, Any], bucket: str) -> None:
    seed_s3["training_results"]["target"]["bucket"] = bucket
    err = refusal(seed_s3)
    assert err.field == "training_results_reference.target.bucket"
    assert "is not a bucket name" in str(err)


HOSTILE_S3_BUCKETS = [
    "evil:8443#",  # would send the signed request to another host (virtual-hosted addressing)
    "evil.com:443/x",
    "a@evil",
    "Upper",
    "under_score",
    "ab",
    "x" * 64,
    "-starts-with-hyphen",
    "ends-with-hyphen-",
    "two..dots",
    "192.168.1.10",
    "xn--punycode",
    "bucket-s3alias",
    "sp ace",
    "d\u00e9j\u00e0",
]


@pytest.mark.parametrize("bucket", HOSTILE_S3_BUCKETS)
@pytest.mark.parametrize("where", ["data", "results"])
def test_s3_bucket_names_follow_aws_rules(seed_s3: dict[str, Any], bucket: str, where: str) -> None:
    if where == "data":
        seed_s3["training_data"][0]["source"]["bucket"] = bucket
        field = "training_data_reference[0].source.bucket"
    else:
        seed_s3["training_results"]["target"]["bucket"] = bucket
        field = "training_results_reference.target.bucket"
    err = refusal(seed_s3)
    assert err.code == "C101"
    assert err.field == field
    assert "\n" not in str(err)


@pytest.mark.parametrize("bucket", ["abc", "my.bucket-1", "x" * 63, "0-9"])
def test_valid_s3_bucket_names(seed_s3: dict[str, Any], bucket: str) -> None:
    seed_s3["training_results"]["target"]["bucket"] = bucket
    assert load_manifest(seed_s3).results.bucket == bucket


@pytest.mark.parametrize(
    ("bucket", "valid"), [("Mixed_Case OK", True), ("\u00e9" * 128, True), ("\u00e9" * 129, False)]
)
def test_swift_container_names_follow_swift_rules(
    seed_swift: dict[str, Any], bucket: str, valid: bool
) -> None:
    seed_swift["training_results_reference"]["target"]["bucket"] = bucket
    if valid:
        assert load_manifest(seed_swift).results.bucket == bucket
    else:
        err = refusal(seed_swift)
        assert err.field == "training_results_reference.target.bucket"
        assert "256 bytes" in str(err)


def test_source_prefix_refuses_control_characters(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"][0]["source"]["prefix"] = "a\r\nb"
    err = refusal(seed_s3)
    assert err.field == "training_data_reference[0].source.prefix"
    assert "\n" not in str(err)


def test_source_prefix_is_normalised_and_cannot_escape(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"][0]["source"]["prefix"] = "/mnist/v2"
    assert load_manifest(seed_s3).data.prefix == "mnist/v2/"
    seed_s3["training_data"][0]["source"]["prefix"] = "mnist/../other"
    assert refusal(seed_s3).field == "training_data_reference[0].source.prefix"


# --- connections --------------------------------------------------------------------------------------


def test_swift_console_names_are_mapped(seed_swift: dict[str, Any]) -> None:
    conn = seed_swift["training_data_reference"][0]["connection"]
    conn["username"] = conn.pop("user_name")
    conn["projectId"] = conn.pop("project_id")
    conn["domainName"] = conn.pop("domain_name")
    m = load_manifest(seed_swift)
    assert isinstance(m.data.connection, SwiftConnection)
    assert m.data.connection.user_name == "admin_4f7e2b9c1d3a5e8f0b6c2d4a7e9f1b3c5d8e0a2"
    assert m.data.connection.project_id == "8d2a6f4e1b9c4d7a8e3f5b0c2d6a9e1f"
    assert m.data.connection.domain_name == "1026873"


def test_console_and_manifest_name_together_are_refused(seed_swift: dict[str, Any]) -> None:
    seed_swift["training_results_reference"]["connection"]["projectId"] = "other"
    err = refusal(seed_swift, CredentialsError)
    assert "give project_id or projectId" in str(err)


def test_swift_optional_keys(seed_swift: dict[str, Any]) -> None:
    conn = seed_swift["training_data_reference"][0]["connection"]
    for key in ("region", "domain_name", "project_id"):
        del conn[key]
    assert isinstance(load_manifest(seed_swift).data.connection, SwiftConnection)


def test_s3_endpoint_is_optional(seed_s3: dict[str, Any]) -> None:
    del seed_s3["training_data"][0]["connection"]["endpoint_url"]
    m = load_manifest(seed_s3)
    assert isinstance(m.data.connection, S3Connection)
    assert m.data.connection.endpoint_url is None


def test_conn_id_instead_of_credentials(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"][0]["connection"] = {"conn_id": "mnist_s3"}
    seed_s3["training_results"]["connection"] = {"conn_id": "results_s3"}
    m = load_manifest(seed_s3)
    assert m.data.connection == ConnectionId(conn_id="mnist_s3")
    assert m.secret_values() == []
    assert "Airflow connection 'results_s3'" in m.results.describe()


def test_conn_id_with_inline_credentials_is_refused(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"][0]["connection"]["conn_id"] = "mnist_s3"
    err = refusal(seed_s3, CredentialsError)
    assert "conn_id cannot be combined with inline credentials" in str(err)


def test_empty_connection_is_refused(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_results"]["connection"] = {}
    err = refusal(seed_s3, CredentialsError)
    assert err.field == "training_results_reference.connection"


def test_s3_keys_with_swift_type_are_refused(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"][0]["source"]["type"] = "bluemix_objectstore"
    err = refusal(seed_s3, CredentialsError)
    assert "S3 key(s) but source.type is 'bluemix_objectstore'" in str(err)


def test_swift_keys_with_s3_type_are_refused(seed_swift: dict[str, Any]) -> None:
    seed_swift["training_results_reference"]["target"]["type"] = "s3"
    err = refusal(seed_swift, CredentialsError)
    assert "Swift key(s) but target.type is 's3'" in str(err)


@pytest.mark.parametrize("key", ["aws_access_key_id", "aws_secret_access_key"])
def test_missing_s3_secret(seed_s3: dict[str, Any], key: str) -> None:
    del seed_s3["training_results"]["connection"][key]
    err = refusal(seed_s3, CredentialsError)
    assert str(err) == f"training_results_reference.connection.{key}: is required"


def test_missing_swift_password(seed_swift: dict[str, Any]) -> None:
    del seed_swift["training_data_reference"][0]["connection"]["password"]
    err = refusal(seed_swift, CredentialsError)
    assert err.field == "training_data_reference[0].connection.password"


def test_empty_secret_is_refused(seed_swift: dict[str, Any]) -> None:
    seed_swift["training_data_reference"][0]["connection"]["password"] = ""
    assert "must not be empty" in str(refusal(seed_swift, CredentialsError))


def test_numeric_secret_must_be_quoted_and_is_not_echoed(seed_swift: dict[str, Any]) -> None:
    seed_swift["training_data_reference"][0]["connection"]["password"] = 918273645
    err = refusal(seed_swift, CredentialsError)
    assert "put the value in quotes" in str(err)
    assert "918273645" not in str(err)


def test_auth_url_must_be_http(seed_swift: dict[str, Any]) -> None:
    seed_swift["training_data_reference"][0]["connection"]["auth_url"] = "<auth-url>"
    err = refusal(seed_swift, CredentialsError)
    assert str(err) == (
        "training_data_reference[0].connection.auth_url: the value is not an http(s) URL; "
        "write e.g. https://host:443"
    )


def test_bad_url_with_credentials_is_not_echoed(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"][0]["connection"]["endpoint_url"] = f"ftp://user:{SEED_SECRETS[0]}@host"
    assert "the value is not an http(s) URL" in str(refusal(seed_s3, CredentialsError))


# --- redaction ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SEED_S3, SEED_SWIFT])
def test_redacted_manifest_has_no_secret(path: Path) -> None:
    m = load_manifest(path)
    text = m.to_yaml()
    for secret in SEED_SECRETS:
        assert secret not in text
        assert secret not in repr(m)
    assert REDACTED in text
    assert yaml.safe_load(text)["model_definition"]["execution"]["command"] == m.command
    assert set(m.secret_values()) <= set(SEED_SECRETS)
    assert m.secret_values()


def test_canonical_form_round_trips(seed_swift: dict[str, Any]) -> None:
    m = load_manifest(seed_swift)
    assert load_manifest(m.to_dict(redact=False)) == m


def test_redact_raw_and_invalid_manifests(seed_s3: dict[str, Any]) -> None:
    seed_s3["training_data"][0]["connection"]["endpoint_url"] = (
        f"https://u:{SEED_SECRETS[0]}@cos.example.com/x"
    )
    seed_s3["unknown"] = {"nested": [{"password": "hunter2"}]}
    redacted = redact_manifest(seed_s3)
    text = yaml.safe_dump(redacted)
    for secret in (*SEED_SECRETS, "hunter2"):
        assert secret not in text
    assert redacted["training_data"][0]["connection"]["endpoint_url"] == "https://u:***@cos.example.com/x"
    assert seed_s3["unknown"]["nested"][0]["password"] == "hunter2"  # the input is not modified


def test_redact_url() -> None:
    assert redact_url("https://h:1/p") == "https://h:1/p"
    assert redact_url("https://me:pw@h:1/p") == "https://me:***@h:1/p"


def test_errors_never_show_secrets_from_anywhere(seed_swift: dict[str, Any]) -> None:
    """Every problem of a manifest full of mistakes is described without a secret value."""
    conn = seed_swift["training_data_reference"][0]["connection"]
    conn["pasword"] = conn["password"]
    conn["auth_url"] = f"https://x:{SEED_SECRETS[2]}@"
    seed_swift["training_results_reference"]["connection"]["password"] = [SEED_SECRETS[2]]
    with pytest.raises(ManifestError) as info:
        load_manifest(seed_swift)
    assert all(SEED_SECRETS[2] not in p for p in info.value.problems)


def test_secret_values_are_what_redaction_removes(seed_s3: dict[str, Any]) -> None:
    """One walker: every value redaction replaces is one the maskers get, and the other way round."""
    seed_s3["training_data"][0]["connection"]["endpoint_url"] = "https://u:urlpass@cos.example.com/x"
    seed_s3["unknown"] = {"nested": [{"password": "hunter2"}], "token": {"apikey": 12345}}
    found = secret_values_of(seed_s3)
    assert set(found) == {*SEED_SECRETS[:2], "urlpass", "hunter2", "12345"}
    text = yaml.safe_dump(redact_manifest(seed_s3))
    assert not [value for value in found if value in text]
    assert secret_values_of(yaml.safe_dump(seed_s3, sort_keys=False)) == found  # YAML text: the same


@pytest.mark.parametrize("path", [SEED_S3, SEED_SWIFT])
def test_manifest_secret_values_match_its_source(path: Path) -> None:
    m = load_manifest(path)
    assert m.secret_values() == secret_values_of(m) == secret_values_of(m.to_dict(redact=False))
    assert set(m.secret_values()) == set(secret_values_of(path))


def test_unreadable_source_has_no_secret_values() -> None:
    assert secret_values_of("no/such/manifest.yml") == []
    assert secret_values_of("a: [unclosed") == []


# --- inline credentials as Airflow connections ----------------------------------------------------------


def test_s3_credentials_as_an_airflow_connection() -> None:
    conn = S3Connection.model_validate(
        {"endpoint_url": "https://s3.example.com", "aws_access_key_id": "AK", "aws_secret_access_key": "SK"}
    )
    assert conn.to_airflow_connection("c1") == {
        "connection_id": "c1",
        "conn_type": "aws",
        "login": "AK",
        "password": "SK",
        "extra": '{"endpoint_url": "https://s3.example.com"}',
    }
    bare = S3Connection.model_validate({"aws_access_key_id": "AK", "aws_secret_access_key": "SK"})
    assert bare.to_airflow_connection("c2")["extra"] is None


def test_swift_credentials_as_an_airflow_connection() -> None:
    conn = SwiftConnection.model_validate(
        {
            "auth_url": "https://identity.example.com/v3",
            "user_name": "me",
            "password": "pw",
            "region": "dallas",
            "project_id": "p1",
        }
    )
    assert conn.airflow_fields() == {
        "host": "https://identity.example.com/v3",
        "login": "me",
        "password": "pw",
        "extra": {"region_name": "dallas", "project_id": "p1"},
    }
    assert conn.to_airflow_connection("c3") == {
        "connection_id": "c3",
        "conn_type": "swift",
        "host": "https://identity.example.com/v3",
        "login": "me",
        "password": "pw",
        "extra": '{"region_name": "dallas", "project_id": "p1"}',
    }
