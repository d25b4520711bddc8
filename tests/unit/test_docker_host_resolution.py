"""Which Docker host a task runs on when its DAG names none, and what a retry does when it lands on a worker
of another host (issue 12: a grid spread over the GPU hosts' Celery workers).

``DockerOperator`` fills an absent ``docker_url`` in from ``$DOCKER_HOST`` where the DAG file is parsed; a
``TrainingRunOperator`` that names no host reads ``[wmltrain] docker_url``, else ``$DOCKER_HOST``, on the
worker when the task runs. A run's status records its engine's id, so that a retry never starts a second
container on another engine, even one reached by the same URL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_wmltrain.hooks.docker import DockerHostError
from airflow_wmltrain.lifecycle import RunState
from airflow_wmltrain.operators.training_run import DEFAULT_DOCKER_URL, TrainingRunOperator
from airflow_wmltrain.runtime import gpus
from airflow_wmltrain.settings import Settings
from tests.unit.conftest import FakeTi
from tests.unit.fakes import FakeDocker, MemoryStore
from tests.unit.test_operator_unit import context, owner_labels, prior_run, run_name, status_in

pytestmark = pytest.mark.usefixtures("wmltrain_env", "stores")

#: Where the dag-processor's ``$DOCKER_HOST`` points: nothing answers there.
PARSE_TIME_HOST = "tcp://127.0.0.1:9"


@pytest.fixture
def parsed_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DAG is parsed with the dag-processor's ``$DOCKER_HOST`` and no ``[wmltrain] docker_url``."""
    monkeypatch.setenv("DOCKER_HOST", PARSE_TIME_HOST)
    monkeypatch.delenv("AIRFLOW__WMLTRAIN__DOCKER_URL", raising=False)


def on_worker(monkeypatch: pytest.MonkeyPatch, *, setting: str | None = None, docker_host: str | None = None):
    """The worker's environment when the task runs."""
    for name, value in (("AIRFLOW__WMLTRAIN__DOCKER_URL", setting), ("DOCKER_HOST", docker_host)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_task_without_docker_url_runs_on_the_workers_setting(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    op = make_op(docker_url=None)
    assert op.docker_url == PARSE_TIME_HOST  # DockerOperator's parse-time default, as the UI shows it
    on_worker(monkeypatch, setting=docker_api.url, docker_host="tcp://127.0.0.1:7")
    result = op.execute(context(ti))
    assert result["state"] == "COMPLETED"
    assert run_name(ti) in docker_api.created
    container = status_in(results, ti)["container"]
    assert container["docker_url"] == docker_api.url
    assert container["docker_id"] == docker_api.daemon_id


@pytest.mark.usefixtures("parsed_elsewhere")
def test_without_the_setting_the_workers_docker_host_is_used(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    op = make_op(docker_url=None)
    on_worker(monkeypatch, docker_host=docker_api.url)
    assert op.execute(context(ti))["state"] == "COMPLETED"
    assert run_name(ti) in docker_api.created


def test_nothing_set_means_the_local_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    op = TrainingRunOperator(task_id="t", manifest={}, model_definition="m.zip")
    on_worker(monkeypatch)
    op._resolve_docker_host(Settings())
    assert op.docker_url == DEFAULT_DOCKER_URL == "unix://var/run/docker.sock"


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_docker_url_the_dag_names_wins_over_the_workers(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeDocker() as workers_own:
        on_worker(monkeypatch, setting=workers_own.url, docker_host=workers_own.url)
        assert make_op(docker_url=docker_api.url).execute(context(ti))["state"] == "COMPLETED"
        assert workers_own.created == []
    assert run_name(ti) in docker_api.created


def test_the_setting_is_read_from_airflows_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__DOCKER_URL", " tcp://gpu-1.example.com:2376 ")
    assert Settings.from_airflow_config().docker_url == "tcp://gpu-1.example.com:2376"
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__DOCKER_URL", "")
    assert Settings.from_airflow_config().docker_url is None


# --- a retry that lands on a worker of another host -------------------------------------------------------


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_retry_on_another_workers_host_re_attaches_through_the_recorded_url(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The run started on host A (its worker died); the retry lands on host B's worker, which reaches A's
    engine by the recorded URL (tcp://, or a socket of the same machine): it re-attaches there."""
    with FakeDocker() as host_a:
        prior_run(
            ti,
            settings_dir=tmp_path,
            state=RunState.PROCESSING,
            container={"docker_url": host_a.url, "docker_id": host_a.daemon_id},
        )
        container = host_a.add_container(
            run_name(ti), container_labels=owner_labels(ti), status="exited", log="ok\n"
        )
        gpus.clear_caches()
        on_worker(monkeypatch, setting=docker_api.url)  # host B's worker
        result = make_op(docker_url=None).execute(context(ti))
        assert result["state"] == "COMPLETED"
        assert host_a.find(container.id) is None  # stored and removed on A
        assert host_a.created == []
    assert docker_api.created == []  # B started nothing


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_retry_that_finds_another_engine_at_the_recorded_url_starts_nothing_and_may_retry(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Every host has unix:///var/run/docker.sock: the URL alone does not say which engine. The run
    started on engine A; a retry on host B reaches B's engine at the same URL: it must not start a second
    container there, and fails retryable so that a later try may land on A's worker."""
    engine_a = "A" * 12 + ":OTHER:ENGINE"
    prior_run(
        ti,
        settings_dir=tmp_path,
        state=RunState.DOWNLOADING,
        container={"docker_url": docker_api.url, "docker_id": engine_a},
    )
    on_worker(monkeypatch, setting=docker_api.url)
    with pytest.raises(DockerHostError, match=r"lives on the Docker engine AAAAAAAAAAAA .* another engine"):
        make_op(docker_url=None).execute(context(ti))
    assert docker_api.created == []
    assert status_in(results, ti)["state"] == "DOWNLOADING"  # left for the run's own host


@pytest.mark.usefixtures("parsed_elsewhere")
def test_a_retry_that_cannot_reach_the_runs_host_starts_nothing_and_may_retry(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    results: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    gone = "unix:///run/no-such-host/docker.sock"
    prior_run(
        ti,
        settings_dir=tmp_path,
        state=RunState.PROCESSING,
        container={"docker_url": gone, "docker_id": "ENGINE:OF:HOST:A"},
    )
    on_worker(monkeypatch, setting=docker_api.url)
    with pytest.raises(DockerHostError, match="cannot reach it") as caught:
        make_op(docker_url=None).execute(context(ti))
    assert caught.value.retryable
    assert docker_api.created == []
    assert status_in(results, ti)["state"] == "PROCESSING"


def test_a_dag_that_names_other_hosts_still_fails_at_once(
    make_op: Callable[..., TrainingRunOperator],
    docker_api: FakeDocker,
    ti: FakeTi,
    tmp_path: Path,
) -> None:
    prior_run(
        ti,
        settings_dir=tmp_path,
        state=RunState.PROCESSING,
        container={"docker_url": "tcp://10.0.0.9:2375", "docker_id": "X"},
    )
    with pytest.raises(AirflowFailException, match="configured for"):
        make_op().execute(context(ti))
    assert docker_api.created == []


# --- deferring ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "resolved", "defers"),
    [
        (None, "unix:///var/run/docker.sock", False),  # the worker's own engine: the triggerer is elsewhere
        (None, "tcp://gpu-1.example.com:2376", True),  # an address every machine reaches
        ("unix:///var/run/docker.sock", None, True),  # the DAG's author named it: as before
    ],
)
def test_a_run_on_the_workers_local_socket_is_followed_in_the_worker(
    given: str | None, resolved: str | None, defers: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    op = TrainingRunOperator(
        task_id="t", manifest={}, model_definition="m.zip", docker_url=given, deferrable=True
    )
    op._resolve_docker_host(Settings(docker_url=resolved))
    assert op._defers(op.hook) is defers
    op.deferrable = False
    assert op._defers(op.hook) is False


# --- a remote engine over TLS -------------------------------------------------------------------------------


def _certificates(folder: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files (``openssl`` would
    make the same for a dockerd --tlsverify)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, key: Any, issuer: Any, issuer_key: Any, **kind: Any) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=kind.get("ca", False), path_length=None), critical=True)
        )
        ca = kind.get("ca", False)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        if not ca:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
            )
        if "san" in kind:
            builder = builder.add_extension(kind["san"], critical=False)
        if "usage" in kind:
            builder = builder.add_extension(x509.ExtendedKeyUsage([kind["usage"]]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    files: dict[str, str] = {}

    def write(name: str, cert: Any, key: Any) -> None:
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}-key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        files[name], files[f"{name}-key"] = str(folder / f"{name}.pem"), str(folder / f"{name}-key.pem")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wmltrain test CA")])
    ca = issue("wmltrain test CA", ca_key, ca_name, ca_key, ca=True)
    write("ca", ca, ca_key)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    write(
        "server",
        issue("127.0.0.1", server_key, ca_name, ca_key, san=san, usage=ExtendedKeyUsageOID.SERVER_AUTH),
        server_key,
    )
    write(
        "client",
        issue("worker", client_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
        client_key,
    )
    return files


def test_a_remote_engine_over_tls_runs_the_training(
    make_op: Callable[..., TrainingRunOperator],
    ti: FakeTi,
    results: MemoryStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``tcp://`` + the Docker provider's TLS parameters, against an engine that checks the client's
    certificate (dockerd --tlsverify): the run completes and its status records the engine. The worker's
    environment names the system's CA bundle (as many images do), which must not replace the daemon's CA."""
    import ssl

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ssl.get_default_verify_paths().openssl_cafile)
    certs = _certificates(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs["server"], certs["server-key"])
    server.load_verify_locations(certs["ca"])
    server.verify_mode = ssl.CERT_REQUIRED
    with FakeDocker(tls=server) as remote:
        op = make_op(
            docker_url=remote.url,
            tls_ca_cert=certs["ca"],
            tls_client_cert=certs["client"],
            tls_client_key=certs["client-key"],
        )
        assert op.execute(context(ti))["state"] == "COMPLETED"
        assert run_name(ti) in remote.created
        container = status_in(results, ti)["container"]
        assert container["docker_url"] == remote.url.replace("tcp://", "https://")
        assert container["docker_id"] == remote.daemon_id


def test_a_remote_engine_over_tls_refuses_a_worker_without_its_certificate(
    make_op: Callable[..., TrainingRunOperator], ti: FakeTi, tmp_path: Path
) -> None:
    import ssl

    certs = _certificates(tmp_path)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs["server"], certs["server-key"])
    server.load_verify_locations(certs["ca"])
    server.verify_mode = ssl.CERT_REQUIRED
    with FakeDocker(tls=server) as remote:
        # Without a client certificate the Docker provider uses no TLS at all (it builds a TLS config
        # only from all three files): plain HTTP, which the engine refuses; the host is named.
        op = make_op(docker_url=remote.url, tls_ca_cert=certs["ca"])
        with pytest.raises(DockerHostError, match=f"no Docker host answered \\({remote.url}: "):
            op.execute(context(ti))
        assert remote.created == []


def test_a_docker_url_list_falls_over_to_the_first_host_that_answers(docker_api: FakeDocker) -> None:
    """``docker_url=[down, up]``: the hook uses the second, names it as the host in use, and says which
    failed when none answers (issue 9: only the first URL of a list was ever used)."""
    from airflow_wmltrain.hooks.docker import TrainingDockerHook

    down = "tcp://127.0.0.1:9"  # the discard port: nothing answers
    hook = TrainingDockerHook(docker_url=[down, docker_api.url], api_version="1.43", timeout=3)
    assert hook.docker_url == down  # nothing asked yet: the first given
    hook.api_client.ping()
    assert hook.docker_url == docker_api.url
    with pytest.raises(DockerHostError, match=r"no Docker host answered \(tcp://127\.0\.0\.1:9: "):
        TrainingDockerHook(docker_url=[down], api_version="1.43", timeout=3).api_client  # noqa: B018
