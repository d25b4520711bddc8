"""Provider metadata read by Airflow's providers manager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from airflow_wmltrain import __version__


def _field(label: str, description: str, type_: str = "string") -> dict[str, Any]:
    """An optional extra field of the connection form."""
    return {"label": label, "schema": {"type": [type_, "null"]}, "description": description}


def _option(description: str, type_: str, example: str, default: str | None) -> dict[str, Any]:
    """A ``[wmltrain]`` option as the providers manager reads it (all were added in 0.1.0)."""
    return {
        "description": description + "\n",
        "type": type_,
        "version_added": "0.1.0",
        "example": example,
        "default": default,
    }


#: The extra fields of the Swift connection form: name -> (label, description[, type]); optional strings
#: but for ``insecure``, a check box.
_SWIFT_FIELDS: dict[str, tuple[str, str] | tuple[str, str, str]] = {
    "auth_version": (
        "Auth version",
        "1 (tempauth/swauth: user is account:user), 2 (Keystone v2.0) or 3 (Keystone v3). Detected from the "
        "auth URL when empty: .../auth/v1.0 is 1, .../v2.0 is 2, .../v3 or a URL without a version is 3.",
    ),
    "project_id": (
        "Project id",
        "Keystone project (tenant) id; this or the project name is needed for Keystone.",
    ),
    "project_name": ("Project name", "Keystone project (tenant) name, when no project id is given."),
    "domain_name": ("Domain name", "Keystone v3 domain of the user and the project (Default when empty)."),
    "user_domain_name": (
        "User domain name",
        "Keystone v3 domain of the user, when it differs from the domain name.",
    ),
    "project_domain_name": (
        "Project domain name",
        "Keystone v3 domain of the project, when it differs from the domain name.",
    ),
    "region_name": (
        "Region",
        "Region of the object-store endpoint in the Keystone catalog, e.g. dallas (the first one when "
        "empty).",
    ),
    "endpoint_type": (
        "Endpoint interface",
        "Keystone catalog interface: public (default), internal or admin.",
    ),
    "auth_type": (
        "Keystone method",
        "Keystone v3: password (default; the user and password), v3applicationcredential (the password is "
        "the application credential's secret) or token (the password is a Keystone token).",
    ),
    "application_credential_id": (
        "Application credential id",
        "With auth_type v3applicationcredential: the credential's id (its project is the credential's own).",
    ),
    "application_credential_name": (
        "Application credential name",
        "With auth_type v3applicationcredential and no id: the credential's name (the user is the login).",
    ),
    "insecure": (
        "Skip TLS verification",
        "Do not verify the TLS certificates of the auth and storage URLs.",
        "boolean",
    ),
    "cacert": ("CA bundle", "Path of a CA bundle file on the workers, used to verify TLS certificates."),
    "ca_certificate": (
        "CA certificates (PEM)",
        "The CA certificates themselves, as PEM text, trusted besides the CA bundle (a private CA).",
    ),
}

#: The ``[wmltrain]`` options: name -> (description, type, example, default).
_OPTIONS: dict[str, tuple[str, str, str, str | None]] = {
    "resource_classes": (
        "Resource classes a manifest's ``model_definition.execution.resource`` may name, with the number of "
        "GPUs each gets, as ``name=gpus`` pairs.",
        "string",
        "small=1,medium=2,large=4,xlarge=8",
        "small=1,medium=2,large=4",
    ),
    "frameworks_file": (
        "A YAML file of frameworks (name -> version -> image) merged over the registry shipped with the "
        "provider; see the README for its format.",
        "string",
        "/opt/airflow/config/wmltrain-frameworks.yaml",
        None,
    ),
    "frameworks": (
        "Frameworks given inline, as YAML or JSON in the same format as ``frameworks_file``; merged last.",
        "string",
        '{"pytorch": {"2.13": {"image": "registry.example.com/pytorch:2.13"}}}',
        None,
    ),
    "model_definition_max_bytes": (
        "Largest total uncompressed size of a model-definition zip, in bytes (a guard against zip bombs).",
        "integer",
        "1073741824",
        "1073741824",
    ),
    "docker_url": (
        "The Docker host of this worker's training runs when a task gives no ``docker_url``: read on the "
        "worker when the task runs (not when the DAG is parsed), so that each GPU host's Celery worker "
        "starts the runs of a shared queue on its own Docker engine. Empty: the worker's ``DOCKER_HOST``, "
        "else ``unix://var/run/docker.sock``. Give an address the other workers (and the triggerer, for "
        "deferrable runs) can reach, such as ``tcp://gpu-1.example.com:2376`` with TLS, to let a retry that "
        "lands on another host re-attach to the run from there.",
        "string",
        "tcp://gpu-1.example.com:2376",
        None,
    ),
    "staging_dir": (
        "Where training data is staged on a worker host: each run's data directory and the content cache "
        "shared by the runs (``<staging_dir>/cache``) live here, on one file system so that cached objects "
        "are hard-linked, not copied. When workers run in containers, this must be a path the Docker host "
        "sees too.",
        "string",
        "/srv/wmltrain",
        "/var/tmp/wmltrain",
    ),
    "cache_max_bytes": (
        "Size of the staging cache above which the least recently used objects are evicted, in bytes.",
        "integer",
        "107374182400",
        "53687091200",
    ),
    "transfer_workers": ("Concurrent transfers of one staging or upload.", "integer", "32", "16"),
    "verify": (
        "What staging checks of each object: md5 (its size, and its content's MD5 against the ETag when the "
        "ETag is one) or size (its size only: no hashing, less CPU on large objects).",
        "string",
        "size",
        "md5",
    ),
    "part_size": (
        "Size of the parts of a multipart upload (S3 parts, Swift segments) and of the byte ranges in which "
        "objects larger than twice this are fetched, in bytes.",
        "integer",
        "134217728",
        "67108864",
    ),
    "multipart_threshold": (
        "Files of at least this size are uploaded in parts, in bytes.",
        "integer",
        "268435456",
        "134217728",
    ),
    "model_definition_max_entries": (
        "Largest number of entries in a model-definition zip.",
        "integer",
        "10000",
        "10000",
    ),
    "gpu_ids": (
        "The GPUs of the Docker host that training runs may use, as the ids the NVIDIA runtime knows "
        "(``0,1,2,3``), or ``auto``: the Docker daemon's label ``wmltrain.gpus`` (``dockerd --label "
        "wmltrain.gpus=0,1,2,3``) when it has one, else the GPUs ``nvidia-smi`` lists in a probe container "
        "of the run's image (probed once per host per 10 minutes for all of a worker's tasks).",
        "string",
        "0,1,2,3",
        "auto",
    ),
    "gpu_wait": (
        "What a run does when the Docker host has no free GPU for it: ``wait`` polls in the worker until "
        "GPUs free up (up to ``gpu_wait_timeout``), ``reschedule`` gives the worker slot back and tries "
        "again after ``gpu_poll_interval`` (the task shows as up for reschedule).",
        "string",
        "reschedule",
        "wait",
    ),
    "gpu_wait_timeout": (
        "Seconds a run waits for free GPUs before it fails with S100.",
        "integer",
        "3600",
        "86400",
    ),
    "gpu_poll_interval": (
        "Seconds between two looks for free GPUs; a waiting run also looks as soon as a run container of "
        "the host exits (the Docker host's events).",
        "integer",
        "30",
        "5",
    ),
    "cpu_fallback": (
        "Run on the CPU when the Docker host has no NVIDIA runtime (the task log says so loudly). Off by "
        "default: a run that asked for GPUs fails with S100 instead.",
        "boolean",
        "True",
        "False",
    ),
    "halt_grace_period": (
        "Seconds a halted training container gets between SIGTERM and SIGKILL.",
        "integer",
        "60",
        "30",
    ),
    "retention_days": (
        "Days a training run's history is kept in Airflow (the wmltrain_retention DAG removes older ended "
        "runs; the files in the buckets stay).",
        "float",
        "30",
        "7",
    ),
    "poll_interval": (
        "Seconds between two looks at a training container while a deferred run waits in the triggerer.",
        "integer",
        "30",
        "10",
    ),
    "defer_after": (
        "Seconds a deferrable run's task watches its container before it defers: a run that ends by "
        "then is finished in the worker (no trip through the triggerer and back); 0 defers at once.",
        "integer",
        "60",
        "30",
    ),
    "metrics_interval": (
        "Seconds between two publications of a training run's metrics while it trains (its status "
        "document and the task's status XCom, read by wmltrain metrics and wmltrain show).",
        "integer",
        "60",
        "30",
    ),
    "metrics_log_pattern": (
        "A regular expression matched against each line of the training's output; its named groups are "
        "metrics (``step`` optional), e.g. ``step (?P<step>\\d+) loss (?P<loss>[-+.\\deE]+)``. Empty: only "
        "``$RESULT_DIR/metrics.jsonl`` is read. A task's ``metrics_pattern`` replaces it. Set by an admin "
        "only: a submitted manifest cannot give one (a pattern runs in the workers and the triggerer).",
        "string",
        "loss=(?P<loss>[0-9.eE+-]+)",
        "",
    ),
    "training_retries": (
        "Retries of the bundled wmltrain_training DAG's task: a run whose worker was killed (or that failed "
        "on the server side) is re-attached to its container by the retry instead of lost. Failures of the "
        "submission itself (bad manifest, training exited non-zero, halted) are never retried.",
        "integer",
        "0",
        "2",
    ),
    "training_retry_delay": (
        "Seconds between a failed try of the bundled DAG's task and its retry.",
        "integer",
        "60",
        "30",
    ),
    "submission_connections": (
        "The Airflow connections a submitted run (the bundled wmltrain_training DAG: wmltrain train, the "
        "UI's trigger form) may name for its data, its results and its model-definition URL: "
        "comma-separated glob patterns of connection ids. The connections wmltrain train makes of a run's "
        "inline credentials (wmltrain_<training id>_data/_results) are allowed to that run only, and the "
        "retention task's wmltrain_api to none, whatever the patterns say. DAG authors' own "
        "TrainingRunOperator tasks may name any connection.",
        "string",
        "wmltrain_*,team_a_store_*",
        "wmltrain_*",
    ),
    # --- the training container's hardening (airflow_wmltrain.runtime.hardening) ---
    "training_network": (
        "Docker network of training containers whose task sets no ``network_mode``: ``bridge`` (Docker's "
        "default; the training code can reach the network, e.g. to download pretrained weights or "
        "packages, and also the services the Docker host's bridge reaches) or ``none`` (no network at "
        "all: the hardened choice, for images that hold all they need; data and results go through the "
        "run's mounted directories either way), or the name of a Docker network. A DAG author's "
        "``network_mode`` overrides it for a task (``host`` and ``container:...`` are refused); a "
        "submitter cannot.",
        "string",
        "none",
        "bridge",
    ),
    "training_user": (
        "User (``uid:gid``, ``uid`` or a name of the image) that training containers run as when their "
        "task sets no ``user``; empty: the image's own user (root for most framework images). A non-root "
        "user keeps root-owned files out of the results; the run's writable directories are open to any "
        "user, the data and the model code readable by any user.",
        "string",
        "1000:1000",
        "",
    ),
    "training_cap_add": (
        "Capabilities given back to training containers, which start with none (``cap_drop=ALL``): the "
        "default is what framework images need to run as root (change file owners and modes, read and "
        "write any file of the container, switch user, signal their processes). NET_RAW, MKNOD, SETFCAP, "
        "SETPCAP, NET_BIND_SERVICE, SYS_CHROOT and AUDIT_WRITE of Docker's default set are left out; "
        "only Docker's default set plus IPC_LOCK and SYS_NICE may be named. A DAG author's ``cap_add`` "
        "adds to it. Empty: no capability at all. Every training container also runs with "
        "``no-new-privileges`` (setuid programs do not raise privileges) and no ``privileged``.",
        "string",
        "CHOWN,DAC_OVERRIDE,FOWNER",
        "CHOWN,DAC_OVERRIDE,FOWNER,FSETID,KILL,SETGID,SETUID",
    ),
    "training_pids_limit": (
        "Most processes and threads a training container may have at once (a fork bomb stops there). "
        "PyTorch's data-loader workers and their threads count; ``0``: no limit.",
        "integer",
        "16384",
        "4096",
    ),
    "training_memory": (
        "Memory limit of training containers whose task sets no ``mem_limit``: a size (``64g``), a share "
        "of the Docker host's memory (``90pct``: the host keeps some for its daemon and the worker, and "
        "a run that takes too much is killed as out of memory, C201, instead of the host), or ``0`` (no "
        "limit). ``/dev/shm`` counts in it.",
        "string",
        "64g",
        "90pct",
    ),
    "training_shm_size": (
        "Size of ``/dev/shm`` of training containers whose task sets no ``shm_size`` (Docker's default "
        "64m is too small for PyTorch's data-loader workers, which pass batches through it). Memory is "
        "only used as it is written, within ``training_memory``.",
        "string",
        "8g",
        "2g",
    ),
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-wmltrain",
        "name": "WML Train",
        "description": "GPU deep-learning training runs (model zip + YAML training manifest) as "
        "Airflow tasks: data staged from S3 or OpenStack Swift, the framework's container run "
        "on a Docker host with the right GPUs, model and logs written back to the results bucket.\n",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "WML Train",
                "external-doc-url": "https://pypi.org/project/airflow-wmltrain/",
                "tags": ["software"],
            }
        ],
        "operators": [
            {
                "integration-name": "WML Train",
                "python-modules": [
                    "airflow_wmltrain.operators.training_run",
                    "airflow_wmltrain.operators.best_run",
                ],
            }
        ],
        "hooks": [
            {"integration-name": "WML Train", "python-modules": ["airflow_wmltrain.hooks.swift"]},
            {"integration-name": "WML Train", "python-modules": ["airflow_wmltrain.hooks.docker"]},
        ],
        "sensors": [
            {"integration-name": "WML Train", "python-modules": ["airflow_wmltrain.sensors.training_run"]}
        ],
        "triggers": [
            {"integration-name": "WML Train", "python-modules": ["airflow_wmltrain.triggers.training_run"]}
        ],
        "extra-links": ["airflow_wmltrain.links.training_run.TrainingResultsLink"],
        # swift:// assets (a run's results location, airflow_wmltrain.assets); s3:// is the amazon provider's.
        "asset-uris": [
            {
                "schemes": ["swift"],
                "handler": "airflow_wmltrain.assets.sanitize_uri",
                "factory": "airflow_wmltrain.assets.create_asset",
                "to_openlineage_converter": "airflow_wmltrain.assets.convert_asset_to_openlineage",
            }
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_wmltrain.hooks.swift.SwiftHook",
                "hook-name": "OpenStack Swift",
                "connection-type": "swift",
                "conn-fields": {name: _field(*spec) for name, spec in _SWIFT_FIELDS.items()},
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port"],
                    "relabeling": {"host": "Auth URL", "login": "User", "password": "Password / API key"},
                    "placeholders": {
                        "host": "https://identity.example.com/v3 or http://swift.example.com:8080/auth/v1.0",
                        "login": "user name (Keystone) or account:user (v1)",
                        "password": "password or API key",
                        "auth_version": "3",
                        "project_id": "0123456789abcdef0123456789abcdef",
                        "domain_name": "Default",
                        "region_name": "dallas",
                    },
                },
            }
        ],
        "config": {
            "wmltrain": {
                "description": "Settings of the airflow-wmltrain provider (training runs on GPU hosts).",
                "options": {name: _option(*spec) for name, spec in _OPTIONS.items()},
            }
        },
    }
