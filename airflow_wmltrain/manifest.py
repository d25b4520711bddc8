"""The training manifest: load, validate, normalise and redact (SPEC §1).

A manifest is a YAML file, YAML text or an already-parsed mapping.  Both spellings of the seed are
accepted (``training_data_reference``/``training_results_reference`` and ``training_data``/
``training_results``); unknown keys are refused with their path so that a typo is never ignored.
Every refusal is a :class:`~airflow_wmltrain.errors.ManifestError` (C101), or its subclasses
:class:`~airflow_wmltrain.errors.CredentialsError` (C103, the ``connection`` blocks) and
:class:`~airflow_wmltrain.errors.ResourceError` (C104, ``execution.resource``), whose one-line message
starts with the field path and never contains a secret value.

``${DATA_DIR}``/``${RESULT_DIR}`` in the command are left as written; see :mod:`airflow_wmltrain.command`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from airflow_wmltrain.errors import CredentialsError, ManifestError, ResourceError
from airflow_wmltrain.frameworks import Framework, FrameworkRegistry
from airflow_wmltrain.settings import Settings

StoreType = Literal["s3", "swift"]

#: ``source.type``/``target.type`` values → store type.
STORE_TYPES: Mapping[str, StoreType] = {"s3": "s3", "bluemix_objectstore": "swift", "swift": "swift"}
#: Console credential names (IBM Cloud / Bluemix) → manifest names, for Swift connections.
SWIFT_CONSOLE_KEYS: Mapping[str, str] = {
    "username": "user_name",
    "projectId": "project_id",
    "domainName": "domain_name",
}
#: Keys whose values are secrets wherever they appear in a manifest.
SECRET_KEYS = frozenset(
    {"password", "aws_secret_access_key", "aws_access_key_id", "apikey", "api_key", "token"}
)
REDACTED = "***"

DATA_KEYS = ("training_data_reference", "training_data")
RESULTS_KEYS = ("training_results_reference", "training_results")

NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


def _strip(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strip_strings(cls, value: Any) -> Any:
        return _strip(value)


class _ConnectionModel(_Model):
    @field_validator("*", mode="before")
    @classmethod
    def _integer_ids(cls, value: Any, info: ValidationInfo) -> Any:
        # Console credentials hold numeric ids (a domain name such as 1026873) that YAML reads as
        # integers; they are names, so take them as written.  Secrets must be quoted instead: YAML
        # may already have changed a number (0123 is read as 83), so guessing could send a wrong key.
        if isinstance(value, int) and not isinstance(value, bool) and info.field_name not in SECRET_KEYS:
            return str(value)
        return value


# --- connections ------------------------------------------------------------------------------------


def is_http_url(value: str) -> bool:
    """Whether ``value`` is an ``http(s)://`` URL with a host name."""
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        return False


def _http_url(value: str | None) -> str | None:
    if value is None:
        return None
    if not is_http_url(value):
        # Never echoed: a value that is no URL may be a key pasted into the wrong field, and a URL's
        # user-info may hold a password.
        raise PydanticCustomError(
            "wmltrain", "the value is not an http(s) URL; write e.g. https://host:443", {}
        )
    return value


#: The most PEM text a manifest's ``ca_certificate`` may hold (a bundle of a few dozen CAs).
MAX_CA_CERTIFICATE_BYTES = 256 * 1024


def _pem_certificates(value: str | None) -> str | None:
    """CA certificates as PEM text, never a path: a submitter names no file of the worker."""
    if value is None:
        return None
    if len(value.encode()) > MAX_CA_CERTIFICATE_BYTES:
        raise PydanticCustomError(
            "wmltrain", "is longer than {limit} bytes", {"limit": MAX_CA_CERTIFICATE_BYTES}
        )
    if "-----BEGIN CERTIFICATE-----" not in value:
        raise PydanticCustomError(
            "wmltrain",
            "is not PEM text: paste the CA certificate itself (-----BEGIN CERTIFICATE-----...), "
            "not a file name",
            {},
        )
    return value


def _not_empty_secret(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        raise PydanticCustomError("wmltrain", "must not be empty")
    return value


class ConnectionId(_ConnectionModel):
    """An Airflow connection holds the credentials (recommended: nothing secret in the manifest).

    :param conn_id: the Airflow connection id.
    """

    conn_id: NonEmptyStr


class _InlineConnection(_ConnectionModel):
    """Inline credentials, and the Airflow connection that holds the same credentials.

    :attr:`AIRFLOW_FIELDS` is the one mapping between a manifest's credential names and an Airflow
    connection's fields, used both ways: :meth:`airflow_fields` (and :meth:`to_airflow_connection`)
    turn inline credentials into a connection, and the Swift hook reads inline credentials through
    them with the very code that reads a ``swift`` connection.
    """

    #: The type of the Airflow connection that holds these credentials.
    AIRFLOW_CONN_TYPE: ClassVar[str]
    #: Manifest name → Airflow connection field: ``host``, ``login``, ``password`` or ``extra.<key>``.
    AIRFLOW_FIELDS: ClassVar[Mapping[str, str]]

    def airflow_fields(self) -> dict[str, Any]:
        """The credentials as an Airflow connection's fields (secrets in clear; unset extras left out).

        :returns: ``{"host"/"login"/"password": ..., "extra": {...}}`` (the fields this type maps).
        """
        fields: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, target in self.AIRFLOW_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if target.startswith("extra."):
                if value:
                    extra[target.removeprefix("extra.")] = value
            else:
                fields[target] = value
        return {**fields, "extra": extra}

    def to_airflow_connection(self, conn_id: str) -> dict[str, Any]:
        """An Airflow connection holding these credentials: the body of the REST API's
        ``POST /connections`` (without ``connection_id`` it is also what ``AIRFLOW_CONN_<ID>`` takes as JSON).

        :param conn_id: the connection id.
        """
        fields = self.airflow_fields()
        extra = fields.pop("extra")
        return {
            "connection_id": conn_id,
            "conn_type": self.AIRFLOW_CONN_TYPE,
            **fields,
            "extra": json.dumps(extra) if extra else None,
        }


class S3Connection(_InlineConnection):
    """Inline S3 credentials (seed style); an Airflow ``aws`` connection holds the same.

    :param endpoint_url: the S3 endpoint (IBM COS, MinIO, Ceph, Swift s3api...); AWS when omitted.
    :param aws_access_key_id: access key id.
    :param aws_secret_access_key: secret access key.
    :param region: the bucket's region (AWS: where botocore finds its endpoint; also the signing region).
    :param ca_certificate: the CA that signed the endpoint's TLS certificate, as PEM text (a private CA).
    """

    AIRFLOW_CONN_TYPE: ClassVar[str] = "aws"
    AIRFLOW_FIELDS: ClassVar[Mapping[str, str]] = {
        "aws_access_key_id": "login",
        "aws_secret_access_key": "password",
        "endpoint_url": "extra.endpoint_url",
        "region": "extra.region_name",
        "ca_certificate": "extra.ca_certificate",
    }

    endpoint_url: NonEmptyStr | None = None
    aws_access_key_id: SecretStr
    aws_secret_access_key: SecretStr
    region: Annotated[StrictStr, Field(pattern=r"^[a-z0-9-]{1,40}$")] | None = None
    ca_certificate: NonEmptyStr | None = None

    _check_url = field_validator("endpoint_url")(_http_url)
    _check_ca = field_validator("ca_certificate")(_pem_certificates)
    _check_secrets = field_validator("aws_access_key_id", "aws_secret_access_key")(_not_empty_secret)


class SwiftConnection(_InlineConnection):
    """Inline OpenStack Swift credentials (seed style; console names are mapped before validation); an
    Airflow ``swift`` connection holds the same.

    :param auth_url: Keystone (``.../v3``) or v1 (``.../auth/v1.0``) authentication URL.
    :param user_name: user name.
    :param password: password or API key.
    :param region: region name.
    :param domain_name: Keystone v3 user/project domain name.
    :param project_id: Keystone v3 project id.
    :param ca_certificate: the CA that signed the auth and storage endpoints' TLS certificates, as PEM text.
    """

    AIRFLOW_CONN_TYPE: ClassVar[str] = "swift"
    AIRFLOW_FIELDS: ClassVar[Mapping[str, str]] = {
        "auth_url": "host",
        "user_name": "login",
        "password": "password",
        "region": "extra.region_name",
        "domain_name": "extra.domain_name",
        "project_id": "extra.project_id",
        "ca_certificate": "extra.ca_certificate",
    }

    auth_url: NonEmptyStr
    user_name: NonEmptyStr
    password: SecretStr
    region: NonEmptyStr | None = None
    domain_name: NonEmptyStr | None = None
    project_id: NonEmptyStr | None = None
    ca_certificate: NonEmptyStr | None = None

    _check_url = field_validator("auth_url")(_http_url)
    _check_ca = field_validator("ca_certificate")(_pem_certificates)
    _check_secrets = field_validator("password")(_not_empty_secret)


Connection = ConnectionId | S3Connection | SwiftConnection

_CONNECTION_MODELS: Mapping[StoreType, type[S3Connection] | type[SwiftConnection]] = {
    "s3": S3Connection,
    "swift": SwiftConnection,
}


# --- the manifest as written --------------------------------------------------------------------------


class _Author(_Model):
    name: StrictStr | None = None
    email: StrictStr | None = None

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
            raise PydanticCustomError("wmltrain", "'{value}' is not an e-mail address", {"value": value})
        return value


class _FrameworkSpec(_Model):
    name: NonEmptyStr
    version: NonEmptyStr

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            raise PydanticCustomError(
                "wmltrain",
                "{value} was read as a number; quote it, e.g. version: '{value}'",
                {"value": value},
            )
        return _strip(value)


class _Execution(_Model):
    # Kept as written (only the ends stripped): inside quotes spacing matters, and the newlines of a
    # YAML literal block (``command: |``) separate shell commands.
    command: NonEmptyStr
    resource: NonEmptyStr


class _ModelDefinition(_Model):
    name: NonEmptyStr
    description: StrictStr = ""
    author: _Author | None = None
    framework: _FrameworkSpec
    execution: _Execution


def _bucket(value: str) -> str:
    if len(value) > 255 or "/" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise PydanticCustomError(
            "wmltrain",
            "'{value}' is not a bucket name: at most 255 characters, no '/' (put folders in source.prefix)",
            {"value": _shown_name(value)},
        )
    return value


def _shown_name(value: str) -> str:
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IP_ADDRESS = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_S3_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_S3_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
SWIFT_CONTAINER_MAX_BYTES = 256


def bucket_name_problem(store: StoreType, name: str) -> str | None:
    """Why ``name`` is not a valid bucket (S3) or container (Swift) name, or ``None`` when it is.

    S3 names follow AWS's rules for general purpose buckets, so that a name is always one host label
    (virtual-hosted addressing puts it in the URL's host): 3 to 63 characters, lowercase letters,
    digits, dots and hyphens, starting and ending with a letter or digit, no ``..``, not an IP address,
    none of AWS's reserved prefixes and suffixes.  Swift container names are at most 256 bytes of
    UTF-8, with no ``/``.
    """
    if store == "swift":
        if not name:
            return "a container name must not be empty"
        if "/" in name:
            return "a container name has no '/' (put folders in source.prefix)"
        if len(name.encode("utf-8", "surrogatepass")) > SWIFT_CONTAINER_MAX_BYTES:
            return f"a container name is at most {SWIFT_CONTAINER_MAX_BYTES} bytes of UTF-8"
        return None
    rule = (
        "an S3 bucket name is 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending "
        "with a letter or digit"
    )
    if not _S3_BUCKET.fullmatch(name):
        return rule
    if ".." in name:
        return "an S3 bucket name has no two dots in a row"
    if _IP_ADDRESS.fullmatch(name):
        return "an S3 bucket name is not an IP address"
    if name.startswith(_S3_RESERVED_PREFIXES) or name.endswith(_S3_RESERVED_SUFFIXES):
        return (
            f"an S3 bucket name does not start with {', '.join(_S3_RESERVED_PREFIXES)} nor end with "
            f"{', '.join(_S3_RESERVED_SUFFIXES)} (reserved by AWS)"
        )
    return None


def _check_bucket_name(store: StoreType, name: str, field: str) -> None:
    problem = bucket_name_problem(store, name)
    if problem is not None:
        raise ManifestError(f"'{_shown_name(name)}' is not a valid name: {problem}", field=field)


def _prefix(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise PydanticCustomError(
            "wmltrain", "'{value}' must not contain control characters", {"value": _shown_name(value)}
        )
    parts = [p for p in value.strip("/").split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise PydanticCustomError(
            "wmltrain", "'{value}' must not contain '.' or '..' segments", {"value": _shown_name(value)}
        )
    return "/".join(parts) + "/" if parts else ""


class _Source(_Model):
    bucket: NonEmptyStr
    type: NonEmptyStr
    prefix: StrictStr = ""

    _check_bucket = field_validator("bucket")(_bucket)
    _check_prefix = field_validator("prefix")(_prefix)


class _Target(_Model):
    bucket: NonEmptyStr
    type: NonEmptyStr

    _check_bucket = field_validator("bucket")(_bucket)


class _DataReference(_Model):
    connection: dict[str, Any]
    source: _Source


class _ResultsReference(_Model):
    connection: dict[str, Any]
    target: _Target


class _Manifest(_Model):
    model_definition: _ModelDefinition
    training_data_reference: list[_DataReference] = Field(min_length=1)
    training_results_reference: _ResultsReference


# --- the normalised manifest --------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreReference:
    """Where a run's data comes from or its results go.

    :param type: ``s3`` or ``swift`` (``bluemix_objectstore`` in the seed).
    :param bucket: bucket (S3) or container (Swift) name.
    :param connection: inline credentials or an Airflow connection id.
    :param prefix: only objects under this prefix (data source only), ending with ``/`` or empty.
    :param type_as_written: the ``type`` value as the manifest spells it.
    """

    type: StoreType
    bucket: str
    connection: Connection
    prefix: str = ""
    type_as_written: str = ""

    def describe(self) -> str:
        """``s3 bucket 'mnist-data' at https://... (inline credentials)`` — never a secret."""
        where = f"{self.type} bucket '{self.bucket}'"
        if self.prefix:
            where += f" prefix '{self.prefix}'"
        conn = self.connection
        if isinstance(conn, ConnectionId):
            return f"{where} (Airflow connection '{conn.conn_id}')"
        url = conn.endpoint_url if isinstance(conn, S3Connection) else conn.auth_url
        at = f" at {redact_url(url)}" if url else ""
        return f"{where}{at} (inline credentials)"


@dataclass(frozen=True)
class TrainingManifest:
    """A valid, normalised training manifest.

    :param name: ``model_definition.name`` (not unique).
    :param description: ``model_definition.description``.
    :param author_name: ``model_definition.author.name``.
    :param author_email: ``model_definition.author.email``.
    :param framework: the resolved framework, with its image.
    :param command: ``execution.command``, whitespace-normalised, variables not substituted.
    :param resource: the resource class (``small``...).
    :param gpus: GPUs of that class, from ``[wmltrain] resource_classes``.
    :param data: the one training-data reference.
    :param results: the results reference.
    """

    name: str
    description: str
    author_name: str | None
    author_email: str | None
    framework: Framework
    command: str
    resource: str
    gpus: int
    data: StoreReference
    results: StoreReference

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """The manifest in canonical form (``*_reference`` spelling).

        :param redact: replace secrets by ``***`` (the default); ``False`` only to hand credentials on.
        """

        def connection(ref: StoreReference) -> dict[str, Any]:
            conn = ref.connection.model_dump(exclude_none=True)
            return {k: (v.get_secret_value() if isinstance(v, SecretStr) else v) for k, v in conn.items()}

        author = {k: v for k, v in (("name", self.author_name), ("email", self.author_email)) if v}
        model_definition: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "framework": {"name": self.framework.name, "version": self.framework.version},
            "execution": {"command": self.command, "resource": self.resource},
        }
        if author:
            model_definition["author"] = author
        source: dict[str, Any] = {
            "bucket": self.data.bucket,
            "type": self.data.type_as_written or self.data.type,
        }
        if self.data.prefix:
            source["prefix"] = self.data.prefix
        document = {
            "model_definition": model_definition,
            "training_data_reference": [{"connection": connection(self.data), "source": source}],
            "training_results_reference": {
                "connection": connection(self.results),
                "target": {
                    "bucket": self.results.bucket,
                    "type": self.results.type_as_written or self.results.type,
                },
            },
        }
        return redact_manifest(document) if redact else document

    def to_yaml(self) -> str:
        """The redacted canonical manifest as YAML (what ``_manifest.yml`` in the results holds)."""
        return yaml.safe_dump(self.to_dict(redact=True), sort_keys=False, allow_unicode=True)

    def secret_values(self) -> list[str]:
        """Every secret value of the manifest, for log maskers (see :func:`secret_values_of`)."""
        return secret_values_of(self)


# --- redaction ----------------------------------------------------------------------------------------


def _replace_url_password(url: str, replace: Callable[[str], Any]) -> str:
    """``url`` with the password of its user-info part replaced by ``replace(password)``.

    :raises ValueError: ``url`` is not a valid URL.
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:{replace(parts.password)}@{parts.hostname}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit(parts._replace(netloc=netloc))


def redact_url(url: str) -> str:
    """A URL without the password of its user-info part."""
    return _replace_url_password(url, lambda _: REDACTED)


def _map_secrets(node: Any, secret: Callable[[Any], Any]) -> Any:
    """``node`` (a manifest in any form) rebuilt with every secret value replaced by ``secret(value)``.

    The one walk over a manifest's secrets, for redaction (:func:`redact_manifest`) and for log maskers
    (:func:`secret_values_of`): a value of :data:`SECRET_KEYS` at any depth (unless null or empty;
    ``secret`` gets it whole, a mapping or list included), a :class:`~pydantic.SecretStr` anywhere and
    the password in a URL's user-info part.  The input is not modified.
    """
    if isinstance(node, TrainingManifest):
        node = node.to_dict(redact=False)
    if isinstance(node, Mapping):
        return {
            key: secret(value)
            if isinstance(key, str) and key in SECRET_KEYS and value not in (None, "")
            else _map_secrets(value, secret)
            for key, value in node.items()
        }
    if isinstance(node, list | tuple):
        return [_map_secrets(item, secret) for item in node]
    if isinstance(node, SecretStr):
        return secret(node)
    if isinstance(node, str) and "://" in node and "@" in node:
        try:
            return _replace_url_password(node, secret)
        except ValueError:
            return node
    return node


def redact_manifest(manifest: Any) -> Any:
    """The manifest (any form: valid or not, normalised or raw) with every secret value replaced.

    This is the one function used wherever a manifest is shown, logged or stored: values of
    :data:`SECRET_KEYS` (at any depth) become ``***`` and passwords inside URLs are removed.
    """
    return _map_secrets(manifest, lambda _: REDACTED)


def restore_secrets(redacted: Any, original: Any) -> Any:
    """``redacted`` (a copy of ``original`` made by :func:`redact_manifest`, then perhaps rendered by
    Jinja) with each value that is still the redaction of the original's value at the same place given
    its original value back; what rendering changed stays as rendered.  A mapping manifest written in a
    DAG file is kept redacted in the operator's template field (Airflow stores template fields in its
    ``serialized_dag`` table) and restored on the worker, which builds the operator from the DAG file.
    """
    if isinstance(redacted, Mapping) and isinstance(original, Mapping):
        restored = {}
        for key, value in redacted.items():
            before = original.get(key)
            if before is not None and value != before and redact_manifest({key: before})[key] == value:
                restored[key] = before  # a secret value (or a mapping of them), as the DAG file wrote it
            else:
                restored[key] = restore_secrets(value, before)
        return restored
    if isinstance(redacted, list | tuple) and isinstance(original, list | tuple):
        return [
            restore_secrets(value, original[i] if i < len(original) else None)
            for i, value in enumerate(redacted)
        ]
    if original is not None and redacted != original and redact_manifest(original) == redacted:
        return original
    return redacted


def secret_values_of(source: Any) -> list[str]:
    """Every secret value in a manifest (path, YAML text, mapping, valid or not; a
    :class:`TrainingManifest`), for log maskers: what :func:`redact_manifest` would replace.

    This needs no validation, so it can run before it (e.g. right after Airflow renders a templated
    manifest); an unreadable source has no secrets.
    """
    try:
        data = source if isinstance(source, Mapping | TrainingManifest) else read_manifest_source(source)[0]
    except (ManifestError, OSError, TypeError, ValueError):
        return []
    found: list[str] = []

    def collect(value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str | int) and value != "":
            found.append(str(value))
        elif isinstance(value, Mapping | list | tuple):  # e.g. ``token: {password: ...}``
            _map_secrets(value, collect)
        return value

    _map_secrets(data, collect)
    return found


# --- loading ------------------------------------------------------------------------------------------


def read_manifest_source(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Any, str]:
    """Parse a manifest source into plain data; returns ``(data, name)`` where name labels the source.

    A ``Path``, or a one-line string ending in ``.yml``/``.yaml`` or naming an existing file, is read as
    a file; any other string is YAML text.
    """
    if isinstance(source, Mapping):
        _check_expanded_size(source, "manifest")
        return dict(source), "manifest"
    if isinstance(source, os.PathLike) or (
        isinstance(source, str)
        and "\n" not in source
        and (source.strip().endswith((".yml", ".yaml")) or os.path.isfile(source))
    ):
        path = Path(source)
        try:
            with path.open("rb") as file:
                raw = file.read(MAX_MANIFEST_BYTES + 1)
            if len(raw) > MAX_MANIFEST_BYTES:
                raise ManifestError(
                    f"is more than the {MAX_MANIFEST_BYTES:,} bytes a training manifest may have; "
                    "keep data out of the manifest",
                    field=str(path),
                )
            text = raw.decode("utf-8")
        except FileNotFoundError:
            raise ManifestError(
                "file not found; give the path of the training manifest (YAML)", field=str(path)
            ) from None
        except UnicodeDecodeError:
            raise ManifestError(
                "not a text file; the training manifest is YAML (UTF-8)", field=str(path)
            ) from None
        except OSError as err:
            raise ManifestError(f"cannot be read: {err.strerror}", field=str(path)) from None
        return _parse_yaml(text, str(path)), str(path)
    if isinstance(source, str):
        return _parse_yaml(source, "manifest"), "manifest"
    raise ManifestError(
        f"a manifest is a YAML file path, YAML text or a mapping, not a {type(source).__name__}"
    )


#: Largest manifest read, in bytes (a manifest is a few hundred bytes; this bounds parsing's time).
MAX_MANIFEST_BYTES = 1024 * 1024
#: Most values a manifest may hold once its YAML aliases are expanded (a billion-laughs guard), and
#: deepest nesting.
MAX_MANIFEST_VALUES = 10_000
MAX_MANIFEST_DEPTH = 32


def _parse_yaml(text: str, name: str) -> Any:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"is {size:,} bytes, more than the {MAX_MANIFEST_BYTES:,} a training manifest may have; "
            "keep data out of the manifest",
            field=name,
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        # Never echo the offending line: it may hold a credential.
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or "syntax error"
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ManifestError(f"not valid YAML{at}: {problem}", field=name) from None
    except RecursionError:
        raise ManifestError(
            f"not valid YAML: nested more than {MAX_MANIFEST_DEPTH} levels", field=name
        ) from None
    except (ValueError, OverflowError, TypeError) as err:  # e.g. a date that does not exist: 2024-02-30
        raise ManifestError(
            f"not valid YAML: a value cannot be read ({type(err).__name__})", field=name
        ) from None
    _check_expanded_size(data, name)
    return data


def _check_expanded_size(data: Any, name: str) -> None:
    """Refuse a document that nests too deeply, refers to itself, or expands (through YAML aliases, which
    share one value among many places) to more than :data:`MAX_MANIFEST_VALUES` values."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any, depth: int) -> int:
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ManifestError("not valid: a YAML alias refers to a value that holds it", field=name)
        if depth > MAX_MANIFEST_DEPTH:
            raise ManifestError(f"not valid: nested more than {MAX_MANIFEST_DEPTH} levels", field=name)
        open_nodes.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_MANIFEST_VALUES:
                raise ManifestError(
                    f"not valid: holds more than {MAX_MANIFEST_VALUES:,} values once its YAML aliases "
                    "are expanded; write the manifest out without such aliases",
                    field=name,
                )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(data, 0)


def load_manifest(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    settings: Settings | None = None,
    registry: FrameworkRegistry | None = None,
) -> TrainingManifest:
    """Load, validate and normalise a training manifest.

    :param source: a YAML file path, YAML text or a mapping.
    :param settings: the ``[wmltrain]`` settings (resource classes); defaults when omitted.
    :param registry: the framework registry; built from ``settings`` when omitted.
    :raises ManifestError: (C101/C103/C104) naming the first invalid field.
    """
    settings = settings or Settings()
    data, name = read_manifest_source(source)
    if not isinstance(data, Mapping):
        raise ManifestError(
            f"must be a YAML mapping with model_definition, training_data_reference and "
            f"training_results_reference, got {_kind(data)}",
            field=name,
        )
    document = _canonical_spelling(data)
    try:
        raw = _Manifest.model_validate(document)
    except ValidationError as err:
        raise _refusal(err, _Manifest, document) from None
    if len(raw.training_data_reference) != 1:
        raise ManifestError(
            f"exactly one data reference is supported, got {len(raw.training_data_reference)}; "
            "put all the training data in one bucket (or prefix)",
            field="training_data_reference",
        )
    execution = raw.model_definition.execution
    gpus = settings.resource_classes.get(execution.resource)
    if gpus is None:
        raise ResourceError(
            f"'{execution.resource}' is not one of {', '.join(settings.resource_classes)}",
            field="model_definition.execution.resource",
        )
    framework = (registry or FrameworkRegistry.from_settings(settings)).resolve(
        raw.model_definition.framework.name, raw.model_definition.framework.version
    )
    data_ref, results_ref = raw.training_data_reference[0], raw.training_results_reference
    data_store = _store(data_ref.connection, data_ref.source.type, ("training_data_reference", 0), "source")
    results_store = _store(
        results_ref.connection, results_ref.target.type, ("training_results_reference",), "target"
    )
    _check_bucket_name(data_store[0], data_ref.source.bucket, "training_data_reference[0].source.bucket")
    _check_bucket_name(
        results_store[0], results_ref.target.bucket, "training_results_reference.target.bucket"
    )
    author = raw.model_definition.author
    return TrainingManifest(
        name=raw.model_definition.name,
        description=raw.model_definition.description,
        author_name=author.name if author else None,
        author_email=author.email if author else None,
        framework=framework,
        command=execution.command,
        resource=execution.resource,
        gpus=gpus,
        data=StoreReference(
            type=data_store[0],
            bucket=data_ref.source.bucket,
            connection=data_store[1],
            prefix=data_ref.source.prefix,
            type_as_written=data_ref.source.type,
        ),
        results=StoreReference(
            type=results_store[0],
            bucket=results_ref.target.bucket,
            connection=results_store[1],
            type_as_written=results_ref.target.type,
        ),
    )


def _canonical_spelling(data: Mapping[Any, Any]) -> dict[Any, Any]:
    document = dict(data)
    for canonical, seed in (DATA_KEYS, RESULTS_KEYS):
        if canonical in document and seed in document:
            raise ManifestError(
                f"give either {canonical} or {seed} (the same thing spelled two ways), not both", field=seed
            )
        if seed in document:
            document[canonical] = document.pop(seed)
    data_refs = document.get("training_data_reference")
    if isinstance(data_refs, Mapping):
        raise ManifestError(
            "must be a list with one entry; write '- connection: ...' (note the '-')",
            field="training_data_reference",
        )
    return document


def _store(
    connection: Mapping[str, Any], type_: str, loc: tuple[int | str, ...], kind: str
) -> tuple[StoreType, Connection]:
    path = _path(loc)
    store = STORE_TYPES.get(type_)
    if store is None:
        raise ManifestError(
            f"'{type_}' is not one of s3, bluemix_objectstore (OpenStack Swift), swift",
            field=f"{path}.{kind}.type",
        )
    field = f"{path}.connection"
    if not connection:
        raise CredentialsError(
            "is empty; give conn_id (an Airflow connection, recommended) or the store's credentials",
            field=field,
        )
    model: type[ConnectionId] | type[S3Connection] | type[SwiftConnection]
    keys = dict(connection)
    if "conn_id" in keys:
        if len(keys) > 1:
            others = ", ".join(sorted(str(k) for k in keys if k != "conn_id"))
            raise CredentialsError(
                f"conn_id cannot be combined with inline credentials ({others}); keep only conn_id",
                field=field,
            )
        model = ConnectionId
    else:
        if store == "swift":
            for console, name in SWIFT_CONSOLE_KEYS.items():
                if console in keys:
                    if name in keys:
                        raise CredentialsError(
                            f"give {name} or {console} (the console's name for it), not both", field=field
                        )
                    keys[name] = keys.pop(console)
        model = _CONNECTION_MODELS[store]
        other = _CONNECTION_MODELS["swift" if store == "s3" else "s3"]
        foreign = set(keys) & (set(other.model_fields) - set(model.model_fields))
        if foreign:
            raise CredentialsError(
                f"{', '.join(sorted(foreign))}: {'Swift' if store == 's3' else 'S3'} key(s) "
                f"but {kind}.type is '{type_}'; "
                f"give {', '.join(model.model_fields)} or change {kind}.type",
                field=field,
            )
    try:
        return store, model.model_validate(keys)
    except ValidationError as err:
        raise _refusal(err, model, keys, (*loc, "connection")) from None


# --- turning pydantic errors into one-line messages ---------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _path(loc: tuple[int | str, ...]) -> str:
    """``('training_data_reference', 0, 'source')`` → ``training_data_reference[0].source``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", part):
            text += f".{part}" if text else part
        else:  # a key with dots, spaces, colons... or an empty one: show it quoted
            text += f"[{part!r}]"
    return text or "manifest"


def _lookup(document: Any, loc: tuple[int | str, ...]) -> Any:
    for part in loc:
        try:
            document = document[part]
        except (KeyError, IndexError, TypeError):
            return None
    return document


def _expected_keys(model: type[BaseModel], document: Any, loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model allows at ``loc`` (walking nested models through their annotations)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_in(annotation)
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _message(error: Any, model: type[BaseModel], document: Any, *, secret: bool) -> str:
    kind, loc = error["type"], tuple(error["loc"])
    value = _lookup(document, loc)
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        expected = _expected_keys(model, document, loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), expected, n=1)
        did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
        return f"unknown key; {did_you_mean}expected {', '.join(expected)}"
    if kind in ("string_type", "string_sub_type"):
        if secret and isinstance(value, int | float):
            return f"must be a string, got {_kind(value)}; put the value in quotes"
        return f"must be a string, got {_kind(value)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping, got {_kind(value)}"
    if kind == "list_type":
        return f"must be a list, got {_kind(value)}"
    if kind == "invalid_key":
        return "keys must be names (strings)"
    if kind in ("string_too_short", "too_short"):
        return "must not be empty"
    if kind == "wmltrain":  # our own messages: written never to include a secret value
        return str(error["msg"])
    return f"is not valid ({kind.replace('_', ' ')})"


def _refusal(
    err: ValidationError, model: type[BaseModel], document: Any, prefix: tuple[int | str, ...] = ()
) -> ManifestError:
    """One error for a failed validation: the first problem as message, all of them in ``problems``."""
    # A misspelt key also makes the right one "missing": report the unknown key first.
    errors = sorted(
        err.errors(include_input=False, include_url=False), key=lambda e: e["type"] != "extra_forbidden"
    )
    found: list[tuple[tuple[int | str, ...], str]] = []
    for error in errors:
        loc = tuple(error["loc"])
        secret = bool(loc) and str(loc[0]) in SECRET_KEYS
        found.append(((*prefix, *loc), _message(error, model, document, secret=secret)))
    loc, message = found[0]
    error_type: type[ManifestError] = ManifestError
    if "connection" in loc:
        error_type = CredentialsError
    elif loc[-1:] == ("resource",):
        error_type = ResourceError
    return error_type(
        message, field=_path(loc), problems=[f"{_path(where)}: {text}" for where, text in found]
    )


__all__ = [
    "STORE_TYPES",
    "Connection",
    "ConnectionId",
    "S3Connection",
    "StoreReference",
    "SwiftConnection",
    "TrainingManifest",
    "bucket_name_problem",
    "is_http_url",
    "load_manifest",
    "read_manifest_source",
    "redact_manifest",
    "redact_url",
    "secret_values_of",
]
