"""The provider's settings: the ``[wmltrain]`` section of Airflow's configuration.

Defaults are declared once, in :mod:`airflow_wmltrain.get_provider_info` (Airflow shows them in
``airflow config list``); this module reads them into a typed, immutable :class:`Settings`.  Pure-logic
code takes a ``Settings`` argument so tests can build one directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from airflow_wmltrain.errors import ConfigurationError
from airflow_wmltrain.get_provider_info import get_provider_info
from airflow_wmltrain.metrics import check_metrics_pattern
from airflow_wmltrain.runtime.hardening import parse_capabilities, parse_memory

SECTION = "wmltrain"
#: What staging may check of each object (``[wmltrain] verify``).
VERIFY_MODES = ("md5", "size")


def _defaults() -> dict[str, Any]:
    options = get_provider_info()["config"][SECTION]["options"]
    return {name: spec["default"] for name, spec in options.items()}


def parse_resource_classes(text: str) -> Mapping[str, int]:
    """Parse ``small=1,medium=2,large=4`` into an ordered mapping of resource class to GPU count."""
    classes: dict[str, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, count = item.partition("=")
        name = name.strip()
        if not sep or not name or not count.strip().isdigit():
            raise ConfigurationError(
                f"'{item.strip()}' is not a name=gpus pair; write e.g. small=1,medium=2,large=4",
                field=f"[{SECTION}] resource_classes",
            )
        classes[name] = int(count)
    if not classes:
        raise ConfigurationError("no resource class is defined", field=f"[{SECTION}] resource_classes")
    return MappingProxyType(classes)


def parse_patterns(text: str) -> tuple[str, ...]:
    """Parse ``wmltrain_*, team_a_*`` into glob patterns (``[wmltrain] submission_connections``)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


_DEFAULTS = _defaults()


@dataclass(frozen=True)
class Settings:
    """Typed view of the ``[wmltrain]`` configuration section.

    :param resource_classes: resource class name -> number of GPUs.
    :param frameworks_file: optional YAML registry merged over the shipped one.
    :param frameworks: optional inline YAML/JSON registry, merged last.
    :param model_definition_max_bytes: cap on a model zip's total uncompressed size.
    :param model_definition_max_entries: cap on a model zip's number of entries.
    :param docker_url: the Docker host of a task that gives none, resolved on the worker (``None``: the
        worker's ``DOCKER_HOST``, else the local socket).
    :param staging_dir: root of the runs' data directories and of the staging cache.
    :param cache_max_bytes: size cap of the staging cache.
    :param transfer_workers: concurrent transfers of a staging or an upload.
    :param verify: what staging checks of each object: ``md5`` (its size, and its content against the
        ETag when that is an MD5) or ``size`` (its size only: less CPU on large objects).
    :param part_size: multipart upload part size.
    :param multipart_threshold: files of at least this size are uploaded in parts.
    :param gpu_ids: the GPUs runs may use on the Docker host, or ``auto`` (detected).
    :param gpu_wait: ``wait`` or ``reschedule`` when no GPU is free.
    :param gpu_wait_timeout: seconds to wait for free GPUs before failing with S100.
    :param gpu_poll_interval: seconds between two looks for free GPUs.
    :param cpu_fallback: run without GPUs on a host without an NVIDIA runtime.
    :param halt_grace_period: seconds between SIGTERM and SIGKILL when a run is halted.
    :param poll_interval: seconds between two looks at a container from the triggerer.
    :param defer_after: seconds a deferrable run's task watches its container before deferring.
    :param metrics_interval: seconds between two publications of a run's metrics while it trains.
    :param metrics_log_pattern: the regular expression of metrics in the training's output (empty:
        none), checked when the settings are read.
    :param training_retries: retries of the bundled training DAG's task (``0``: none).
    :param training_retry_delay: seconds before such a retry.
    :param submission_connections: glob patterns of the connection ids a submitted run may name.
    :param training_network: Docker network of training containers whose task sets none.
    :param training_user: user of training containers whose task sets none (empty: the image's).
    :param training_cap_add: capabilities given back to training containers (all others are dropped).
    :param training_pids_limit: most processes and threads of a training container (``0``: no limit).
    :param training_memory: memory limit (``64g``, ``90pct`` of the host, ``""``: none) of training
        containers whose task sets no ``mem_limit``.
    :param training_shm_size: size of ``/dev/shm`` of training containers whose task sets none.
    """

    resource_classes: Mapping[str, int] = field(
        default_factory=lambda: parse_resource_classes(_DEFAULTS["resource_classes"])
    )
    frameworks_file: str | None = _DEFAULTS["frameworks_file"]
    frameworks: str | None = _DEFAULTS["frameworks"]
    model_definition_max_bytes: int = int(_DEFAULTS["model_definition_max_bytes"])
    model_definition_max_entries: int = int(_DEFAULTS["model_definition_max_entries"])
    docker_url: str | None = _DEFAULTS["docker_url"]
    staging_dir: str = _DEFAULTS["staging_dir"]
    cache_max_bytes: int = int(_DEFAULTS["cache_max_bytes"])
    transfer_workers: int = int(_DEFAULTS["transfer_workers"])
    verify: str = _DEFAULTS["verify"]
    part_size: int = int(_DEFAULTS["part_size"])
    multipart_threshold: int = int(_DEFAULTS["multipart_threshold"])
    gpu_ids: str = _DEFAULTS["gpu_ids"]
    gpu_wait: str = _DEFAULTS["gpu_wait"]
    gpu_wait_timeout: int = int(_DEFAULTS["gpu_wait_timeout"])
    gpu_poll_interval: int = int(_DEFAULTS["gpu_poll_interval"])
    cpu_fallback: bool = _DEFAULTS["cpu_fallback"] == "True"
    halt_grace_period: int = int(_DEFAULTS["halt_grace_period"])
    poll_interval: int = int(_DEFAULTS["poll_interval"])
    defer_after: int = int(_DEFAULTS["defer_after"])
    metrics_interval: int = int(_DEFAULTS["metrics_interval"])
    metrics_log_pattern: str = _DEFAULTS["metrics_log_pattern"]
    training_retries: int = int(_DEFAULTS["training_retries"])
    training_retry_delay: int = int(_DEFAULTS["training_retry_delay"])
    submission_connections: tuple[str, ...] = field(
        default_factory=lambda: parse_patterns(_DEFAULTS["submission_connections"])
    )
    # The training container's hardening (airflow_wmltrain.runtime.hardening).
    training_network: str = _DEFAULTS["training_network"]
    training_user: str = _DEFAULTS["training_user"]
    training_cap_add: tuple[str, ...] = parse_capabilities(
        _DEFAULTS["training_cap_add"], field=f"[{SECTION}] training_cap_add"
    )
    training_pids_limit: int = int(_DEFAULTS["training_pids_limit"])
    training_memory: str = parse_memory(_DEFAULTS["training_memory"], field=f"[{SECTION}] training_memory")
    training_shm_size: str = parse_memory(
        _DEFAULTS["training_shm_size"], field=f"[{SECTION}] training_shm_size"
    )

    @property
    def cache_dir(self) -> str:
        """The content cache shared by the runs of a host."""
        return f"{self.staging_dir.rstrip('/')}/cache"

    @classmethod
    def from_airflow_config(cls) -> Settings:
        """Read the ``[wmltrain]`` section through Airflow's configuration (``airflow.cfg``,
        ``AIRFLOW__WMLTRAIN__*`` variables, their ``_cmd``/``_secret`` forms): what the workers read."""
        from airflow.sdk import conf

        return cls.from_lookup(lambda option, fallback: conf.get(SECTION, option, fallback=fallback))

    @classmethod
    def from_local_config(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the ``[wmltrain]`` section without importing Airflow (the command line starts in a tenth of
        the time, see ``benchmarks/cli_startup.py``): an ``AIRFLOW__WMLTRAIN__<OPTION>`` variable, else
        the option in ``$AIRFLOW_HOME/airflow.cfg`` (``~/airflow``), else the default. Airflow's
        ``_cmd``/``_secret`` forms and secrets backends are not read here; nothing the command line
        needs is a secret.
        """
        return cls.from_lookup(local_config_lookup(SECTION, environ))

    @classmethod
    def from_lookup(cls, lookup: Callable[[str, Any], Any]) -> Settings:
        """Parse and check the ``[wmltrain]`` options that ``lookup(option, fallback)`` gives.

        :raises ConfigurationError: naming the option and the fix.
        """

        def get(option: str) -> str | None:
            value = lookup(option, _DEFAULTS[option])
            return str(value) if value not in ("", None) else _DEFAULTS[option]

        def get_int(option: str, *, minimum: int = 1) -> int:
            raw = get(option)
            try:
                value = int(str(raw))
            except ValueError:
                raise ConfigurationError(
                    f"'{raw}' is not a whole number", field=f"[{SECTION}] {option}"
                ) from None
            if value < minimum:
                what = "positive" if minimum == 1 else f"at least {minimum}"
                raise ConfigurationError(f"must be {what}, got {value}", field=f"[{SECTION}] {option}")
            return value

        def get_choice(option: str, choices: tuple[str, ...]) -> str:
            value = (get(option) or "").strip().lower()
            if value not in choices:
                raise ConfigurationError(
                    f"'{value}' is not one of {', '.join(choices)}", field=f"[{SECTION}] {option}"
                )
            return value

        def get_bool(option: str) -> bool:
            value = (get(option) or "").strip().lower()
            if value in ("true", "1", "yes", "on"):
                return True
            if value in ("false", "0", "no", "off", ""):
                return False
            raise ConfigurationError(f"'{value}' is not True or False", field=f"[{SECTION}] {option}")

        def get_gpu_ids() -> str:
            value = (get("gpu_ids") or "auto").strip()
            if value.lower() == "auto":
                return "auto"
            ids = [item.strip() for item in value.split(",")]
            if not all(ids) or len(set(ids)) != len(ids):
                raise ConfigurationError(
                    f"'{value}' is not a list of distinct GPU ids; write e.g. 0,1,2,3 or auto",
                    field=f"[{SECTION}] gpu_ids",
                )
            return ",".join(ids)

        def get_pattern(option: str) -> str:
            raw = lookup(option, _DEFAULTS[option]) or ""
            try:
                check_metrics_pattern(str(raw), field=f"[{SECTION}] {option}")
            except ValueError as err:
                raise ConfigurationError(str(err).partition(": ")[2], field=f"[{SECTION}] {option}") from None
            return str(raw).strip()

        def hardening_settings() -> dict[str, Any]:
            """The training container's hardening; an empty ``training_cap_add`` gives no capability."""
            network = (get("training_network") or "").strip()
            if network == "host" or network.startswith("container:"):
                raise ConfigurationError(
                    f"'{network}' shares a network namespace of the host or of another container; use "
                    "bridge, none or a Docker network's name",
                    field=f"[{SECTION}] training_network",
                )
            cap_add = lookup("training_cap_add", _DEFAULTS["training_cap_add"])
            shm_size = parse_memory(get("training_shm_size") or "", field=f"[{SECTION}] training_shm_size")
            if shm_size.endswith("pct"):
                raise ConfigurationError(
                    f"'{shm_size}' is not a size; write e.g. 2g (0: Docker's default)",
                    field=f"[{SECTION}] training_shm_size",
                )
            return {
                "training_network": network or _DEFAULTS["training_network"],
                "training_user": (lookup("training_user", "") or "").strip(),
                "training_cap_add": parse_capabilities(
                    str(cap_add or ""), field=f"[{SECTION}] training_cap_add"
                ),
                "training_pids_limit": get_int("training_pids_limit", minimum=0),
                "training_memory": parse_memory(
                    get("training_memory") or "", field=f"[{SECTION}] training_memory"
                ),
                "training_shm_size": shm_size,
            }

        return cls(
            resource_classes=parse_resource_classes(get("resource_classes") or ""),
            frameworks_file=get("frameworks_file"),
            frameworks=get("frameworks"),
            model_definition_max_bytes=get_int("model_definition_max_bytes"),
            model_definition_max_entries=get_int("model_definition_max_entries"),
            docker_url=(get("docker_url") or "").strip() or None,
            staging_dir=get("staging_dir") or _DEFAULTS["staging_dir"],
            cache_max_bytes=get_int("cache_max_bytes"),
            transfer_workers=get_int("transfer_workers"),
            verify=get_choice("verify", VERIFY_MODES),
            part_size=get_int("part_size"),
            multipart_threshold=get_int("multipart_threshold"),
            gpu_ids=get_gpu_ids(),
            gpu_wait=get_choice("gpu_wait", ("wait", "reschedule")),
            gpu_wait_timeout=get_int("gpu_wait_timeout"),
            gpu_poll_interval=get_int("gpu_poll_interval"),
            cpu_fallback=get_bool("cpu_fallback"),
            halt_grace_period=get_int("halt_grace_period"),
            poll_interval=get_int("poll_interval"),
            defer_after=get_int("defer_after", minimum=0),
            metrics_interval=get_int("metrics_interval"),
            metrics_log_pattern=get_pattern("metrics_log_pattern"),
            training_retries=get_int("training_retries", minimum=0),
            training_retry_delay=get_int("training_retry_delay", minimum=0),
            submission_connections=parse_patterns(get("submission_connections") or ""),
            **hardening_settings(),
        )


def local_config_lookup(section: str, environ: Mapping[str, str] | None = None) -> Callable[[str, Any], Any]:
    """``lookup(option, fallback)`` of one section of this machine's Airflow configuration, without
    importing Airflow: an ``AIRFLOW__<SECTION>__<OPTION>`` variable, else ``$AIRFLOW_HOME/airflow.cfg``
    (``$AIRFLOW_CONFIG``; ``~/airflow``), else ``fallback``.

    :raises ConfigurationError: the file cannot be read.
    """
    import configparser
    import os

    env = os.environ if environ is None else environ
    home = env.get("AIRFLOW_HOME") or os.path.join(os.path.expanduser("~"), "airflow")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(env.get("AIRFLOW_CONFIG") or os.path.join(home, "airflow.cfg"), encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError) as err:
        raise ConfigurationError(f"cannot be read: {err}", field="airflow.cfg") from None

    def lookup(option: str, fallback: Any) -> Any:
        variable = f"AIRFLOW__{section.upper()}__{option.upper()}"
        if variable in env:
            return env[variable]
        return parser.get(section, option, fallback=fallback)

    return lookup
