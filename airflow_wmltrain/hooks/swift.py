"""OpenStack Swift: the :class:`SwiftHook`, on python-swiftclient (auth v1 and Keystone v2.0/v3).

Credentials come from exactly one source: an Airflow connection of type ``swift`` (recommended), or a
manifest's inline :class:`~airflow_wmltrain.manifest.SwiftConnection` (seed style; no Airflow connection
is read then, so this works without an Airflow database, e.g. from the ``wmltrain`` CLI).  Inline
credentials are read as the connection that would hold them (``SwiftConnection.AIRFLOW_FIELDS``), by the
same code.

The Airflow connection:

- ``host``: the auth URL, e.g. ``https://identity.example.com/v3`` or ``http://127.0.0.1:8080/auth/v1.0``.
  When it has no ``http(s)://`` scheme (a connection written as a URI,
  ``swift://user:key@identity.example.com:5000/v3``), the URL is ``https://<host>[:<port>][/<schema>]``;
  with a scheme, ``port`` and ``schema`` must be empty (the UI hides them).
- ``login``: the user: ``account:user`` for v1 (tempauth, swauth), the user name for Keystone.
- ``password``: the password or API key.
- extra ``auth_version``: ``1``/``1.0``, ``2``/``2.0`` or ``3``; detected from the URL when absent.
- extra ``project_id`` / ``project_name``: the Keystone project (tenant); one is needed for Keystone.
- extra ``domain_name``: the Keystone v3 domain of both the user and the project (``Default`` when
  absent); ``user_domain_name`` and ``project_domain_name`` each override it for their side.
- extra ``region_name`` (or ``region``): the region whose ``object-store`` endpoint is used (the first
  one in the catalog when absent).
- extra ``endpoint_type``: the catalog interface, ``public`` (default), ``internal`` or ``admin``.
- extra ``insecure``: ``true`` to skip TLS certificate verification; extra ``cacert``: a CA bundle file
  on the worker; extra ``ca_certificate``: CA certificates as PEM text (what inline credentials give).
  The same trust is used for the auth endpoint and for the storage URL (:attr:`SwiftHook.reach`).

Auth version, when not given: the URL's path decides (:func:`detect_auth_version`).  ``.../auth/v1.0``,
``.../v1.0`` or ``.../auth/v1`` is v1; ``.../v3`` is Keystone v3; ``.../v2.0`` is Keystone v2.0; any
other URL is taken as a bare Keystone URL and gets ``/v3`` appended (what python-swiftclient does too).

Keystone is spoken by keystoneauth1 (:func:`keystone_session`), whose session is handed to
``swiftclient.client.Connection(session=...)``: it renews the token before it expires (once for all
threads), and python-swiftclient asks it for the endpoint and the token.  The extra ``auth_type``
chooses the Keystone v3 method:

- ``password`` (default): ``login`` and ``password``, scoped to the project;
- ``v3applicationcredential``: the application credential's secret as ``password``, its id as extra
  ``application_credential_id`` (or its name as ``application_credential_name`` and the user as
  ``login``); the project is the credential's own;
- ``token``: an existing Keystone token as ``password``, scoped to the project.

Secrets: the password and tokens never appear in ``repr(hook)``, in a log line or in an error message,
and are registered with Airflow's secrets masker.  python-swiftclient's own request logging would show
the first 16 characters of tokens (and of ``X-Auth-Key``); importing this module sets its
``reveal_sensitive_prefix`` to 0, so that it shows none.
"""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import swiftclient.client
from airflow.sdk import BaseHook, Connection
from airflow.sdk.log import mask_secret
from swiftclient.exceptions import ClientException

from airflow_wmltrain.errors import CredentialsError, DataLoadError, WmlTrainError
from airflow_wmltrain.manifest import SwiftConnection, is_http_url

if TYPE_CHECKING:
    from airflow_wmltrain.storage.transfer import Reach

# python-swiftclient logs (at INFO on failures, DEBUG otherwise) the first 16 characters of tokens and
# keys; show none of them.
swiftclient.client.logger_settings["redact_sensitive_headers"] = True
swiftclient.client.logger_settings["reveal_sensitive_prefix"] = 0

AUTH_V1 = "1.0"
AUTH_V2 = "2.0"
AUTH_V3 = "3"
#: Keystone v3 methods (the extra ``auth_type``).
AUTH_PASSWORD = "password"  # noqa: S105 - a method's name
AUTH_APPLICATION_CREDENTIAL = "v3applicationcredential"
AUTH_TOKEN = "token"  # noqa: S105 - a method's name
AUTH_TYPES = (AUTH_PASSWORD, AUTH_APPLICATION_CREDENTIAL, AUTH_TOKEN)
#: Accepted spellings of ``auth_version`` → the value given to python-swiftclient.
AUTH_VERSIONS: Mapping[str, str] = {
    "1": AUTH_V1,
    "1.0": AUTH_V1,
    "2": AUTH_V2,
    "2.0": AUTH_V2,
    "3": AUTH_V3,
    "3.0": AUTH_V3,
}
_V1_SUFFIXES = ("/auth/v1.0", "/v1.0", "/auth/v1")
#: Extra keys of a ``swift`` Airflow connection.
EXTRA_KEYS = frozenset(
    {
        "auth_version",
        "project_id",
        "project_name",
        "domain_name",
        "user_domain_name",
        "project_domain_name",
        "region_name",
        "region",
        "endpoint_type",
        "insecure",
        "cacert",
        "ca_certificate",
        "auth_type",
        "application_credential_id",
        "application_credential_name",
    }
)
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})
_MIN_SCRUB_LEN = 4  # shorter secrets cannot be told apart from ordinary text
_MAX_BACKOFF_S = 8.0
_MAX_AUTH_RETRIES = 3  # an unreachable auth endpoint is reported within seconds, not minutes
#: Where a user of a ``swift`` connection names the CA of a private endpoint.
CA_HINT = (
    "set the swift connection's extra cacert (a CA bundle path on the worker) or ca_certificate "
    "(PEM text; inline credentials: ca_certificate), or insecure"
)


def display_url(url: str) -> str:
    """``url`` without user-info, query or fragment: what messages and logs may show."""
    try:
        parts = urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:  # an IPv6 literal
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
    except ValueError:
        return "<invalid URL>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def normalize_auth_version(value: object, *, field_name: str = "auth_version") -> str:
    """``1``/``1.0``/``2``/``2.0``/``3`` (string or number) → ``1.0``, ``2.0`` or ``3``.

    :raises CredentialsError: (C103) any other value, naming ``field_name``.
    """
    text = str(value).strip().lower().removeprefix("v")
    if isinstance(value, bool) or text not in AUTH_VERSIONS:
        raise CredentialsError(
            f"'{value}' is not a Swift auth version; use 1 (tempauth/swauth), 2 (Keystone v2.0) or "
            "3 (Keystone v3), or leave it out to detect it from the auth URL",
            field=field_name,
        )
    return AUTH_VERSIONS[text]


def detect_auth_version(auth_url: str, auth_version: object = None) -> tuple[str, str]:
    """The auth version to use and the URL to authenticate at.

    ``auth_version`` wins when given; otherwise the URL's path decides: ending ``/auth/v1.0``, ``/v1.0`` or
    ``/auth/v1`` → v1; ``/v3`` → Keystone v3; ``/v2.0`` (or ``/v2``) → Keystone v2.0; anything else is a
    bare Keystone URL → v3.  A Keystone URL without a version in its path gets ``/v3`` (or ``/v2.0``)
    appended; a trailing slash is dropped.

    :returns: ``(version, url)`` with ``version`` one of ``"1.0"``, ``"2.0"``, ``"3"``.
    :raises CredentialsError: (C103) an unknown ``auth_version``.
    """
    url = auth_url.strip()
    parts = urlsplit(url)
    path = parts.path.rstrip("/")
    last = path.rsplit("/", 1)[-1].lower()
    if auth_version is not None and str(auth_version).strip():
        version = normalize_auth_version(auth_version)
    elif path.lower().endswith(_V1_SUFFIXES):
        version = AUTH_V1
    elif last in ("v2.0", "v2"):
        version = AUTH_V2
    else:
        version = AUTH_V3
    if version != AUTH_V1 and not re.fullmatch(r"v[23](\.0)?", last):
        path = f"{path}/{'v3' if version == AUTH_V3 else 'v2.0'}"
    return version, urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


@dataclass(frozen=True)
class SwiftAuthConfig:
    """Everything needed to authenticate, resolved from a connection or inline credentials.

    :param auth_url: the URL to authenticate at (version suffix included for Keystone).
    :param auth_version: ``"1.0"``, ``"2.0"`` or ``"3"``.
    :param user: ``account:user`` (v1) or the user name (Keystone).
    :param password: the password or API key (not shown by ``repr``).
    :param source: where the credentials come from, for messages (``Airflow connection 'x'``).
    """

    auth_url: str
    auth_version: str
    user: str
    password: str = field(repr=False)
    source: str
    project_id: str | None = None
    project_name: str | None = None
    user_domain_name: str | None = None
    project_domain_name: str | None = None
    region_name: str | None = None
    endpoint_type: str | None = None
    insecure: bool = False
    cacert: str | None = None
    ca_certificate: str | None = field(default=None, repr=False)
    auth_type: str = AUTH_PASSWORD
    application_credential_id: str | None = None
    application_credential_name: str | None = None

    @property
    def display_url(self) -> str:
        """The auth URL as messages show it (no user-info, no query)."""
        return display_url(self.auth_url)

    @property
    def keystone(self) -> bool:
        return self.auth_version != AUTH_V1

    def os_options(self) -> dict[str, str]:
        """python-swiftclient's ``os_options`` (only the values that are set)."""
        options = {
            "project_id": self.project_id,
            "project_name": self.project_name,
            "user_domain_name": self.user_domain_name,
            "project_domain_name": self.project_domain_name,
            "region_name": self.region_name,
            "endpoint_type": self.endpoint_type,
        }
        return {key: value for key, value in options.items() if value}


def _failure_reason(exc: BaseException) -> str:
    """A short reason for a network failure: ``[Errno 111] Connection refused``, ``timed out``..."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\][^'\"()]*", text)
    if match:
        return match.group(0).strip().rstrip(",")
    if isinstance(exc, TimeoutError) or "timed out" in text.lower():
        return "timed out"
    return type(exc).__name__


_CERTIFICATE_FAILED = re.compile(r"CERTIFICATE_VERIFY_FAILED|certificate verify failed", re.IGNORECASE)


def _certificate_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a TLS certificate that is not trusted: ssl's error, or requests' and keystoneauth's
    wrapping of it, which keep its text (``[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed``)."""
    return isinstance(exc, ssl.SSLCertVerificationError) or bool(_CERTIFICATE_FAILED.search(str(exc)))


def keystone_session(config: SwiftAuthConfig, *, timeout: float, verify: bool | str) -> Any:
    """A keystoneauth1 session for python-swiftclient (``Connection(session=...)``), on Keystone v3
    (``password``, ``v3applicationcredential`` or ``token``) or v2.0 (password).

    keystoneauth authenticates on first use, renews the token shortly before it expires (once, for every
    thread: its plugin holds a lock) and after :meth:`invalidate` (a 401 of the store), and finds the
    object-store endpoint in the token's catalog.

    :param verify: requests' ``verify``: ``False``, a CA bundle path, or ``True`` (the system's CAs).
    :raises CredentialsError: (C103) the credentials cannot make a Keystone request (no project...).
    """
    from keystoneauth1 import session as ksa_session
    from keystoneauth1.identity import v2, v3

    url = config.auth_url
    auth: Any
    if config.auth_type == AUTH_APPLICATION_CREDENTIAL:
        if not (config.application_credential_id or (config.application_credential_name and config.user)):
            raise CredentialsError(
                f"an application credential needs its id (extra application_credential_id), or its name "
                f"(extra application_credential_name) and the user's name as login ({config.source})"
            )
        auth = v3.ApplicationCredential(
            url,
            application_credential_secret=config.password,
            application_credential_id=config.application_credential_id,
            application_credential_name=config.application_credential_name,
            username=config.user or None,
            user_domain_name=(config.user_domain_name or "Default") if config.user else None,
        )
        return ksa_session.Session(auth=auth, verify=verify, timeout=timeout)
    if not (config.project_id or config.project_name):
        raise CredentialsError(
            f"Keystone v{config.auth_version} at {config.display_url} needs a project to give a Swift "
            f"endpoint: set project_id or project_name ({config.source}); for a v1 (tempauth, swauth) "
            "endpoint, end the auth URL with /auth/v1.0 or set auth_version 1"
        )
    project: dict[str, Any] = (
        {"project_id": config.project_id}
        if config.project_id
        else {
            "project_name": config.project_name,
            "project_domain_name": config.project_domain_name or "Default",
        }
    )
    if config.auth_version != AUTH_V3:
        auth = v2.Password(
            url,
            username=config.user,
            password=config.password,
            tenant_id=config.project_id,
            tenant_name=None if config.project_id else config.project_name,
        )
    elif config.auth_type == AUTH_TOKEN:
        auth = v3.Token(url, token=config.password, **project)
    else:
        auth = v3.Password(
            url,
            username=config.user,
            password=config.password,
            user_domain_name=config.user_domain_name or "Default",
            **project,
        )
    return ksa_session.Session(auth=auth, verify=verify, timeout=timeout)


def _keystone_failure(config: SwiftAuthConfig, exc: Exception, scrub: Any) -> WmlTrainError:
    """The error of a keystoneauth failure: refused (C103), unreachable or failing (S302), or not Keystone."""
    from keystoneauth1 import exceptions as ksa

    if isinstance(exc, ksa.HttpError):
        return _refusal(config, int(exc.http_status or 0), str(exc.message or "").split(" (HTTP")[0])
    if isinstance(exc, ksa.ConnectionError):  # refused, timed out, TLS
        return _unreachable(config, exc)
    if isinstance(exc, ksa.InvalidResponse):
        return CredentialsError(
            f"{config.display_url} did not answer with JSON: not a Keystone endpoint? Check the auth URL"
        )
    return CredentialsError(
        f"{config.display_url} answered without a token and catalog: not a Keystone "
        f"v{config.auth_version} endpoint? Check the auth URL and auth_version ({scrub(str(exc))[:200]})"
    )


def _no_endpoint(config: SwiftAuthConfig, session: Any) -> CredentialsError:
    """The error of a catalog without the object-store endpoint asked for, naming the regions it has."""
    wanted = (config.endpoint_type or "public").lower().removesuffix("url")
    try:
        endpoints = session.auth.get_access(session).service_catalog.get_endpoints(
            service_type="object-store", interface=wanted
        )
        regions = sorted(
            {
                e.get("region_id") or e.get("region") or "(no region)"
                for e in endpoints.get("object-store", [])
            }
        )
    except Exception:  # the catalog itself cannot be read: say what is known
        regions = []
    where = f" in region '{config.region_name}'" if config.region_name else ""
    if regions:
        hint = f"; the catalog has it in: {', '.join(regions)} (set region_name to one of them)"
    else:
        hint = "; check the project (a token scoped to another project has another catalog)"
    return CredentialsError(
        f"Keystone at {config.display_url} gave user '{config.user}' no {wanted} 'object-store' "
        f"endpoint{where}{hint}"
    )


def _refusal(config: SwiftAuthConfig, status: int, reason: str) -> WmlTrainError:
    """The error for an HTTP error status from the auth endpoint."""
    status_text = f"HTTP {status} {reason}".strip()
    if status in (401, 403):
        return CredentialsError(
            f"Swift authentication refused at {config.display_url} for user '{config.user}' "
            f"({status_text}); check the user name and password ({config.source})"
        )
    if status >= 500:
        return DataLoadError(f"Swift authentication at {config.display_url} failed: {status_text}")
    return CredentialsError(
        f"{config.display_url} is not a Swift auth v{config.auth_version} endpoint ({status_text}); "
        f"check the auth URL and auth_version ({config.source})"
    )


class _UntrustedCertificate(DataLoadError):
    """S302, as any endpoint out of reach, but not authenticated again at once: only the connection's CA
    settings fix it (as a store's untrusted certificate is not retried by the transfer engine)."""


def _unreachable(config: SwiftAuthConfig, exc: BaseException) -> DataLoadError:
    where = f"cannot reach {config.display_url}"
    if _certificate_failure(exc):
        return _UntrustedCertificate(f"{where}: TLS certificate verification failed ({CA_HINT})")
    return DataLoadError(f"{where}: {_failure_reason(exc)}")


class SwiftHook(BaseHook):
    """OpenStack Swift through python-swiftclient.

    :param swift_conn_id: the Airflow connection (type ``swift``); see the module's documentation for
        its fields.  Not read when ``credentials`` is given.
    :param credentials: a manifest's inline Swift credentials, used instead of an Airflow connection.
    :param timeout: seconds for each HTTP request.
    :param retries: how many times python-swiftclient retries a failed request; authentication is retried
        at most 3 times, and only on server errors and network failures (a refused password never).
    """

    conn_name_attr = "swift_conn_id"
    default_conn_name = "swift_default"
    conn_type = "swift"
    hook_name = "OpenStack Swift"

    def __init__(
        self,
        swift_conn_id: str | None = default_conn_name,
        *,
        credentials: SwiftConnection | None = None,
        timeout: float = 60,
        retries: int = 5,
    ) -> None:
        super().__init__()
        if credentials is not None and swift_conn_id not in (None, self.default_conn_name):
            raise ValueError("give either swift_conn_id or credentials, not both")
        if credentials is None and not swift_conn_id:
            raise ValueError("give swift_conn_id or credentials")
        self.swift_conn_id = None if credentials is not None else swift_conn_id
        self.credentials = credentials
        self.timeout = timeout
        self.retries = retries
        self._auth_lock = threading.Lock()

    def __repr__(self) -> str:
        if self.credentials is not None:
            return (
                f"{type(self).__name__}(credentials=<inline: {display_url(self.credentials.auth_url)} "
                f"user {self.credentials.user_name!r}>)"
            )
        return f"{type(self).__name__}(swift_conn_id={self.swift_conn_id!r})"

    # --- configuration ----------------------------------------------------------------------------

    @cached_property
    def auth_config(self) -> SwiftAuthConfig:
        """The resolved credentials (reads the Airflow connection on first use).

        :raises CredentialsError: (C103) the connection is missing, incomplete or invalid.
        """
        if self.credentials is not None:
            config = self._config_from_inline(self.credentials)
        else:
            assert self.swift_conn_id is not None
            config = self._config_from_connection(self.swift_conn_id)
        mask_secret(config.password)
        return config

    def _config_from_inline(self, credentials: SwiftConnection) -> SwiftAuthConfig:
        # Read as the Airflow connection that would hold them: one mapping, SwiftConnection.AIRFLOW_FIELDS.
        fields = credentials.to_airflow_connection("")
        fields["conn_id"] = fields.pop("connection_id")
        return self._config_from(Connection(**fields), "the manifest's inline Swift credentials")

    def _config_from_connection(self, conn_id: str) -> SwiftAuthConfig:
        from airflow.sdk.exceptions import AirflowNotFoundException

        try:
            conn = self.get_connection(conn_id)
        except AirflowNotFoundException:
            raise CredentialsError(
                f"the Airflow connection '{conn_id}' is not defined; create it (type swift) or give the "
                "credentials inline"
            ) from None
        return self._config_from(conn, f"Airflow connection '{conn_id}'")

    def _config_from(self, conn: Connection, source: str) -> SwiftAuthConfig:
        """The credentials from the fields of a ``swift`` connection (see the module's documentation)."""
        extra = _plain_extra(conn.extra_dejson)
        unknown = sorted(set(extra) - EXTRA_KEYS)
        if unknown:
            self.log.warning("%s: ignoring unknown extra keys %s", source, ", ".join(unknown))

        def text(key: str) -> str | None:
            value = extra.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                return None
            return str(value).strip()

        auth_url = _connection_url(conn.host, conn.port, conn.schema, source)
        _check_no_user_info(auth_url, source)
        auth_type = (text("auth_type") or AUTH_PASSWORD).lower()
        if auth_type not in AUTH_TYPES:
            raise CredentialsError(
                f"'{auth_type}' is not a Keystone method; use {', '.join(AUTH_TYPES)}",
                field=f"{source} extra auth_type",
            )
        if not conn.login and auth_type == AUTH_PASSWORD:
            raise CredentialsError(f"{source} has no login: set it to the Swift user name")
        if not conn.password:
            what = {
                AUTH_APPLICATION_CREDENTIAL: "the application credential's secret",
                AUTH_TOKEN: "the token",
            }
            raise CredentialsError(
                f"{source} has no password: set it to {what.get(auth_type, 'the password or API key')}"
            )
        auth_version = extra.get("auth_version")
        try:
            version, url = detect_auth_version(auth_url, auth_version)
        except CredentialsError as exc:
            raise CredentialsError(exc.message, field=f"{source} extra auth_version") from None
        domain = text("domain_name")
        if auth_type != AUTH_PASSWORD and version != AUTH_V3:
            raise CredentialsError(
                f"auth_type {auth_type} needs Keystone v3 (auth_version 3, an auth URL ending in /v3)",
                field=f"{source} extra auth_type",
            )
        return SwiftAuthConfig(
            auth_url=url,
            auth_version=version,
            user=conn.login or "",
            password=conn.password,
            source=source,
            project_id=text("project_id"),
            project_name=text("project_name"),
            user_domain_name=text("user_domain_name") or domain,
            project_domain_name=text("project_domain_name") or domain,
            region_name=text("region_name") or text("region"),
            endpoint_type=text("endpoint_type"),
            insecure=_boolean(extra.get("insecure", False), f"{source} extra insecure"),
            cacert=text("cacert"),
            ca_certificate=text("ca_certificate"),
            auth_type=auth_type,
            application_credential_id=text("application_credential_id"),
            application_credential_name=text("application_credential_name"),
        )

    # --- the client -------------------------------------------------------------------------------

    def connection_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``swiftclient.client.Connection`` (``session`` for Keystone)."""
        config = self.auth_config
        kwargs: dict[str, Any] = {
            "authurl": config.auth_url,
            "user": config.user,
            "key": config.password,
            "auth_version": config.auth_version,
            "os_options": config.os_options(),
            "retries": self.retries,
            "timeout": self.timeout,
            "insecure": config.insecure,
            "cacert": self._ca_bundle if config.ca_certificate else config.cacert,
        }
        if config.keystone:
            verify: bool | str = False if config.insecure else (self._ca_bundle or True)
            kwargs["session"] = keystone_session(config, timeout=self.timeout, verify=verify)
        return kwargs

    @cached_property
    def reach(self) -> Reach:
        """How the auth endpoint and the storage URL are reached: the connection's CAs (the transfer
        engine's proxies from the environment)."""
        from airflow_wmltrain.storage.transfer import Reach

        config = self.auth_config
        verify: bool | str = False if config.insecure else (config.cacert or True)
        return Reach(verify=verify, ca_pem=config.ca_certificate, hint=CA_HINT)

    @cached_property
    def _ca_bundle(self) -> str | None:
        """The CA bundle file of the requests-based clients (python-swiftclient's v1 authentication,
        keystoneauth), which read files only: the connection's ``cacert``, or, with ``ca_certificate``,
        a private file of this process holding the system's CAs (or ``cacert``'s) and those."""
        config = self.auth_config
        if not config.ca_certificate:
            return config.cacert
        import atexit
        import tempfile

        base = config.cacert or ssl.get_default_verify_paths().cafile
        with tempfile.NamedTemporaryFile("w", prefix="wmltrain-ca-", suffix=".pem", delete=False) as pem:
            if base and os.path.isfile(base):
                with open(base, encoding="utf-8") as bundle:
                    pem.write(bundle.read() + "\n")
            pem.write(config.ca_certificate)
        atexit.register(_remove_quietly, pem.name)
        return pem.name

    @cached_property
    def conn(self) -> swiftclient.client.Connection:
        """The python-swiftclient connection (created once; authenticates on first use)."""
        return swiftclient.client.Connection(**self.connection_kwargs())

    def get_conn(self) -> swiftclient.client.Connection:
        """The python-swiftclient connection."""
        return self.conn

    # --- authentication ---------------------------------------------------------------------------

    def get_auth(self) -> tuple[str, str]:
        """The storage URL and a token, authenticating once (the token is then reused).

        :raises CredentialsError: (C103) the credentials are refused or invalid.
        :raises DataLoadError: (S302) the auth endpoint cannot be reached or fails.
        """
        with self._auth_lock:
            conn = self.conn
            if conn.url and conn.token and conn.session is not None:
                # Keystone: the session's token, renewed by keystoneauth before it expires
                try:
                    token = conn.session.get_token()
                except Exception as exc:
                    conn.url = conn.token = None
                    raise self._failure(exc) from None
                if token != conn.token:
                    mask_secret(token)
                    conn.token = token
                return str(conn.url), str(token)
            if conn.url and conn.token:
                return str(conn.url), str(conn.token)
            return self._authenticate()

    def refresh_auth(self, stale_token: str | None = None) -> tuple[str, str]:
        """Authenticate again (after the store answered 401) and return the new storage URL and token.

        :param stale_token: the token that was refused; when another thread has already replaced it,
            the current one is returned without authenticating again.
        """
        with self._auth_lock:
            conn = self.conn
            if stale_token is not None and conn.token and conn.token != stale_token and conn.url:
                return str(conn.url), str(conn.token)
            conn.url = conn.token = None
            if conn.session is not None:
                conn.session.invalidate()
            return self._authenticate()

    def _authenticate(self) -> tuple[str, str]:
        config = self.auth_config
        retries = min(self.retries, _MAX_AUTH_RETRIES)
        attempt = 0
        while True:
            try:
                url, token = self._authenticate_once()
            except DataLoadError as exc:
                if attempt >= retries or isinstance(exc, _UntrustedCertificate):
                    raise
                delay = min(0.5 * 2**attempt, _MAX_BACKOFF_S)
                attempt += 1
                self.log.warning("%s; retrying in %.1f s (%d/%d)", exc, delay, attempt, retries)
                time.sleep(delay)
                continue
            mask_secret(token)
            self.log.info(
                "Authenticated to Swift at %s as %s (auth v%s); storage URL %s",
                config.display_url,
                config.user,
                config.auth_version,
                url,
            )
            return url, token

    def _authenticate_once(self) -> tuple[str, str]:
        config = self.auth_config
        conn = self.conn
        try:
            url, token = conn.get_auth()
        except Exception as exc:
            raise self._failure(exc) from None
        if not url and token and conn.session is not None:  # the catalog has no such endpoint
            conn.url = conn.token = None
            raise _no_endpoint(config, conn.session)
        if not url or not token:
            conn.url = conn.token = None
            raise CredentialsError(
                f"{config.display_url} answered without a storage URL or token: not a Swift auth "
                f"v{config.auth_version} endpoint? Check the auth URL ({config.source})"
            )
        return str(url), str(token)

    def _failure(self, exc: Exception) -> WmlTrainError:
        """The error of a failed authentication, whichever client failed."""
        from keystoneauth1 import exceptions as ksa

        config = self.auth_config
        if isinstance(exc, WmlTrainError):  # already clear
            return exc
        if isinstance(exc, ClientException):
            return self._client_exception(exc)
        if isinstance(exc, ksa.EndpointNotFound):
            return _no_endpoint(config, self.conn.session)
        if isinstance(exc, ksa.ClientException) or (
            config.keystone and isinstance(exc, LookupError | TypeError)
        ):
            return _keystone_failure(config, exc, self.scrub)  # (a body without the token's fields)
        if isinstance(exc, OSError):  # requests' exceptions (ConnectionError, Timeout, SSLError) are OSErrors
            return _unreachable(config, exc)
        raise exc

    def _client_exception(self, exc: ClientException) -> WmlTrainError:
        config = self.auth_config
        if exc.http_status is not None:
            if 200 <= exc.http_status < 300:  # a 2xx page without X-Storage-Url
                return CredentialsError(
                    f"{config.display_url} answered without a storage URL: not a Swift auth "
                    f"v{config.auth_version} endpoint? Check the auth URL ({config.source})"
                )
            return _refusal(config, int(exc.http_status), str(exc.http_reason or ""))
        # No HTTP status: swiftclient refused the arguments (scheme, missing project...).
        return CredentialsError(
            f"Swift authentication at {config.display_url} for user '{config.user}' is not possible: "
            f"{self.scrub(str(exc.msg).strip())} ({config.source})"
        )

    def scrub(self, text: str) -> str:
        """``text`` with the password and the current token replaced by ``***`` (for foreign messages)."""
        secrets = []
        if "auth_config" in self.__dict__:
            secrets.append(self.auth_config.password)
        if "conn" in self.__dict__ and self.conn.token:
            secrets.append(str(self.conn.token))
        for secret in secrets:
            if len(secret) >= _MIN_SCRUB_LEN:
                text = text.replace(secret, "***")
        return text

    def test_connection(self) -> tuple[bool, str]:
        """Authenticate afresh and read the account; ``(ok, message)``, the message free of secrets."""
        try:
            storage_url, _ = self.refresh_auth()
            self.conn.head_account()
        except WmlTrainError as exc:
            return False, str(exc)
        except ClientException as exc:
            status = f"HTTP {exc.http_status} {exc.http_reason or ''}".strip()
            return False, f"reading the Swift account at {display_url(self.conn.url or '')} failed: {status}"
        except Exception as exc:  # the UI shows the message: never let a secret through
            return False, f"{type(exc).__name__}: {self.scrub(str(exc))}"
        config = self.auth_config
        return True, (
            f"Authenticated at {config.display_url} as {config.user} (auth v{config.auth_version}); "
            f"storage URL {display_url(storage_url)}"
        )


def _connection_url(host: str | None, port: int | None, schema: str | None, source: str) -> str:
    host = (host or "").strip()
    if not host:
        raise CredentialsError(
            f"{source} has no host: set it to the auth URL, e.g. https://identity.example.com/v3"
        )
    schema = (schema or "").strip().strip("/")
    if re.match(r"(?i)^[a-z][a-z0-9+.-]*://", host):
        if port or schema:
            raise CredentialsError(
                f"{source}: the host is a whole URL ({display_url(host)}), so port and schema must be "
                "empty; put everything in the host"
            )
        url = host
    else:
        url = f"https://{host}{f':{port}' if port else ''}{f'/{schema}' if schema else ''}"
    if not is_http_url(url):
        raise CredentialsError(
            f"{source}: the host {display_url(url)} is not an http(s) auth URL; write e.g. "
            "https://identity.example.com/v3"
        )
    return url


def _check_no_user_info(url: str, source: str) -> None:
    if "@" in urlsplit(url).netloc:
        raise CredentialsError(
            f"the auth URL {display_url(url)} holds a user name or password ({source}); give them in "
            "the user and password fields instead"
        )


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _plain_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The extra, Airflow 2's ``extra__swift__<key>`` spelling mapped to ``<key>`` (the plain one wins)."""
    prefix = "extra__swift__"
    plain = {key.removeprefix(prefix): value for key, value in extra.items() if key.startswith(prefix)}
    plain.update({key: value for key, value in extra.items() if not key.startswith(prefix)})
    return plain


def _boolean(value: object, field_name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise CredentialsError(f"'{value}' is not true or false", field=field_name)
