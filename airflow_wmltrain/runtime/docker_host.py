"""How to reach a Docker host: the operator's Docker parameters in a serialisable form.

The operator (a ``DockerOperator``), the trigger that waits for a container in the triggerer, and the
halt path all need the same client; :class:`DockerHost` carries the parameters between them (a trigger's
kwargs must be plain JSON) and builds the Docker provider's ``DockerHook`` from them.  TLS material is
given as file paths, as the Docker provider takes it; registry passwords stay in the Airflow connection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from docker.constants import DEFAULT_TIMEOUT_SECONDS

if TYPE_CHECKING:
    from airflow.providers.docker.hooks.docker import DockerHook
    from docker import APIClient


@dataclass(frozen=True)
class DockerHost:
    """The parameters of a Docker client.

    :param docker_url: the daemon's URL (``unix:///var/run/docker.sock``, ``tcp://host:2376``).
    :param docker_conn_id: an Airflow ``docker`` connection (registry login), or ``None``.
    :param api_version: the Engine API version, ``auto`` or ``None``.
    :param tls_ca_cert: path of the CA certificate.
    :param tls_client_cert: path of the client certificate.
    :param tls_client_key: path of the client key.
    :param tls_verify: verify the daemon's certificate.
    :param tls_hostname: the name to check the certificate against (or ``False``).
    :param tls_ssl_version: the TLS version.
    :param timeout: seconds before an API call times out.
    """

    docker_url: str
    docker_conn_id: str | None = None
    api_version: str | None = None
    tls_ca_cert: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None
    tls_verify: bool = True
    tls_hostname: str | bool | None = None
    tls_ssl_version: str | None = None
    timeout: int = DEFAULT_TIMEOUT_SECONDS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DockerHost:
        return cls(**data)

    def hook(self) -> DockerHook:
        """The Docker provider's hook for this host."""
        from airflow.providers.docker.hooks.docker import DockerHook

        tls = DockerHook.construct_tls_config(
            ca_cert=self.tls_ca_cert,
            client_cert=self.tls_client_cert,
            client_key=self.tls_client_key,
            verify=self.tls_verify,
            assert_hostname=self.tls_hostname,
            ssl_version=self.tls_ssl_version,
        )
        return DockerHook(
            docker_conn_id=self.docker_conn_id,
            base_url=self.docker_url,
            version=self.api_version,
            tls=tls,
            timeout=self.timeout,
        )

    def client(self) -> APIClient:
        """A low-level Docker client (``docker.APIClient``)."""
        return self.hook().api_client
