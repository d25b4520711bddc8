"""``TrainingRunOperator``: one Airflow task is one training run, from the zip and manifest to the results.

Phases (SPEC §3), each recorded in ``<training-id>/_status.json`` by the run's
:class:`~airflow_wmltrain.runtime.run.TrainingRun` (the one lifecycle home): validate (nothing starts
for invalid input) → ``PENDING`` (image, GPU capacity) → ``DOWNLOADING`` (stage the data, store the zip
and the redacted manifest; a wait for free GPUs is shown in the run's phase) → ``PROCESSING`` (the
framework's container, detached) → wait (in the worker, streaming the log, or deferred to the
triggerer) → ``STORING`` (results and logs) → ``COMPLETED``, ``FAILED`` or ``HALTED``.  Everything asked
of the Docker host goes through :class:`~airflow_wmltrain.hooks.docker.TrainingDockerHook`.

Airflow moves tasks: a scheduler restart, a missed heartbeat or an orphan reset starts a new try while
the old one may still live.  The training id is stable across the tries of a task instance and the
run's container is named after it and labelled with its task instance, so a new try re-attaches to the
container (a name conflict on create means "re-attach"), and the status document records the Docker
host, so a retry goes back there.  Only a try of the task instance that owns a training id (the labels
of its container, the ``airflow`` of its status document) ever re-attaches to, halts or cleans up its
run: another task instance giving the same id is refused (``C105``), whoever submitted it.  A halt
comes only from a person (the task marked failed or success, ``wmltrain halt``) or a deadline
(``execution_timeout``), never from a try being replaced.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import requests
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk import conf
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowRescheduleException,
    AirflowSkipException,
    AirflowTaskTimeout,
)
from docker.errors import DockerException
from docker.types import LogConfig

from airflow_wmltrain.assets import emit_results_event, openlineage_facets
from airflow_wmltrain.errors import (
    ManifestError,
    ResultsStoreError,
    RunConflictError,
    RunHaltedError,
    ServerError,
    TrainingFailedError,
    WmlTrainError,
)
from airflow_wmltrain.hooks.docker import ContainerOutcome, DockerHostError, TrainingDockerHook
from airflow_wmltrain.lifecycle import OWNER_KEYS, RUN_XCOM_PREFIX, STATUS_XCOM_KEY, RunState, RunStatus
from airflow_wmltrain.links.training_run import TrainingResultsLink
from airflow_wmltrain.metrics import JSONL_FILE, MetricsCollector, check_metrics_pattern
from airflow_wmltrain.runtime import labels
from airflow_wmltrain.runtime.run import TrainingRun, submission_digest
from airflow_wmltrain.runtime.workspace import CONTAINER_DIRS
from airflow_wmltrain.service.pools import DEFAULT_DOCKER_URL
from airflow_wmltrain.settings import Settings
from airflow_wmltrain.storage import connections_as_json
from airflow_wmltrain.training_id import check_training_id, derive_training_id
from airflow_wmltrain.waiting import Backoff, WaitTimeoutError, wait_until

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_wmltrain.manifest import TrainingManifest
    from airflow_wmltrain.runtime.gpus import GpuAllocation
    from airflow_wmltrain.submission import Submission

#: Docker host URLs of this machine's own engine (a socket path means another engine elsewhere).
LOCAL_SCHEMES = ("unix:", "npipe:", "http+unix:")
_DEFERRABLE_DEFAULT = conf.getboolean("operators", "default_deferrable", fallback=False)

#: ``DockerOperator`` parameters that make no sense for a training container, and why; refused.
REFUSED_PARAMETERS = {
    "command": "the command comes from the manifest (model_definition.execution.command)",
    "container_name": "the container is named after the training id (one container per run and host)",
    "auto_remove": "the run's container is removed once its results and logs are stored",
    "port_bindings": "a training container serves no ports",
    "tty": "the log is streamed line by line and stored; a TTY would merge and reformat it",
    "xcom_all": "the task's XCom is the run's result; the whole log is stored in the results bucket",
    "retrieve_output": "write outputs into $RESULT_DIR: they are stored in the results bucket",
    "retrieve_output_path": "write outputs into $RESULT_DIR: they are stored in the results bucket",
    "host_tmp_dir": "a run's directories are under [wmltrain] staging_dir",
    "mount_tmp_dir": "a run's directories are under [wmltrain] staging_dir",
    "tmp_dir": "no temporary host folder is mounted; write into $CHECKPOINT_DIR or $RESULT_DIR",
    "privileged": "the training code is not trusted: its container gets no privilege (training_cap_add)",
}
#: The task-instance states that mean a person (or the scheduler, for a task with no try left) ended the
#: task: its run is halted.  Any other state while the task is being stopped means that Airflow moved
#: the task to another try: the run goes on, and that try re-attaches to it.
_HALTING_TI_STATES = frozenset({"failed", "success", "skipped", "removed", "upstream_failed"})
#: Docker errors while following a run: the host may be restarting; look again for this long.
DOCKER_OUTAGE_WAIT = 300.0


@contextmanager
def _airflow_errors() -> Iterator[None]:
    """Map the package's errors onto Airflow's: an error a retry cannot fix fails the task at once
    (``AirflowFailException``, its cause the original error); the others are left to ``retries``."""
    try:
        yield
    except WmlTrainError as err:
        if err.retryable:
            raise
        raise AirflowFailException(f"{err.code} {err}") from err


@dataclass
class _Try:
    """What one try of the task holds while it runs (``on_kill`` reads it from a signal handler).

    :param owner: the task instance (dag, run, task, map index, try), as the run's status records it.
    :param ti: the task instance, to ask Airflow for its state when the task is stopped.
    :param context: the try's context (the asset event of a completed run goes through it).
    :param run: the training run, once the submission is valid.
    :param container_id: the run's container, as soon as it exists.
    :param halt_requested: a person or a deadline asked for a halt.
    :param halter_spawned: the detached halter owns the run's end.
    :param connections: the store connections, resolved for the halter ahead of time.
    :param claimed: the training id is this task instance's (no other task instance's status or
        container has it): only then may a halt touch the run's container and workspace.
    :param metrics_stop: stops the thread that publishes the run's metrics while it trains.
    """

    owner: dict[str, Any] = field(default_factory=dict)
    ti: Any = None
    context: Any = None
    run: TrainingRun | None = None
    container_id: str | None = None
    halt_requested: bool = False
    halter_spawned: bool = False
    connections: dict[str, str] = field(default_factory=dict)
    claimed: bool = False
    metrics_stop: threading.Event | None = None


class TrainingRunOperator(DockerOperator):
    r"""Run one training run (a model-definition zip and a training manifest) on a Docker host.

    The Docker parameters of :class:`~airflow.providers.docker.operators.docker.DockerOperator` that make
    sense for a training container apply to it (``docker_url`` — a list tries each —, ``docker_conn_id``,
    TLS, ``mounts``, ``environment``, ``private_environment``, ``env_file``, ``mem_limit``, ``cpus``,
    ``shm_size``, ``network_mode``, ``user``, ``force_pull``, ``skip_on_exit_code`` (the run is stored
    and the task skipped), ...); the image and the command come from the manifest; the others
    (:data:`REFUSED_PARAMETERS`) are refused when the task is built.

    :param manifest: the training manifest: a path, YAML text or a mapping. (templated)
    :param model_definition: the model-definition zip: a path, ``base64:<data>``, or the URL of an
        object (``s3://bucket/key``, ``swift://container/key``) read with the manifest's credentials.
        (templated)
    :param hyperparameters: ``{"learningRate": 0.01}`` overrides of the command's options. (templated)
    :param training_id: the run's id (``training-...``); derived from the dag, run, task and map index
        when empty, so that it is the same for every try of the task instance. (templated)
    :param image: an image to use instead of the framework registry's. (templated)
    :param deferrable: wait for the container in the triggerer (no worker slot held while it trains).
    :param poll_interval: seconds between two looks at the container while deferred
        (``[wmltrain] poll_interval``).
    :param halt_grace_period: seconds between SIGTERM and SIGKILL when the run is halted
        (``[wmltrain] halt_grace_period``).
    :param submitted_inputs: the manifest and the model definition come from someone who is not the
        DAG's author (a DAG run's ``conf`` or ``params``, as in the bundled training DAG): they are data,
        never paths of the worker — the manifest is YAML text or a mapping, the model definition
        ``base64:`` or an object-store URL — and the run's stores may only name Airflow connections that
        ``[wmltrain] submission_connections`` allows. Off: the DAG's author wrote them (paths allowed, any
        connection).
    :param metrics_pattern: a regular expression matched against each line of the training's output: its
        named groups are metrics (``step`` optional), e.g. ``r"step (?P<step>\d+) loss (?P<loss>\S+)"``;
        default ``[wmltrain] metrics_log_pattern``. Not templated: a submitter never gives one.
    """

    template_fields: Sequence[str] = (
        "manifest",
        "model_definition",
        "hyperparameters",
        "training_id",
        "image",
        "environment",
        "env_file",
        "mounts",
        "docker_conn_id",
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {
        "manifest": "yaml",
        "hyperparameters": "json",
        "env_file": "yaml",
    }
    # A manifest path is read by the operator (not by Jinja as a template file); only env files are.
    template_ext: Sequence[str] = (".env",)
    operator_extra_links = (TrainingResultsLink(),)
    ui_color = "#d8e8f8"

    def __init__(
        self,
        *,
        manifest: str | os.PathLike[str] | Mapping[str, Any],
        model_definition: str | os.PathLike[str] | bytes,
        hyperparameters: Mapping[str, Any] | str | None = None,
        training_id: str | None = None,
        image: str | None = None,
        deferrable: bool = _DEFERRABLE_DEFAULT,
        poll_interval: float | None = None,
        halt_grace_period: int | None = None,
        submitted_inputs: bool = False,
        metrics_pattern: str | None = None,
        **kwargs: Any,
    ) -> None:
        refused = {
            name: why
            for name, why in REFUSED_PARAMETERS.items()
            if kwargs.get(name) not in (None, False, "never", {}, [], "")
        }
        if refused:
            raise ValueError(
                f"TrainingRunOperator {kwargs.get('task_id', '')!r} does not take "
                + "; ".join(f"{name} ({why})" for name, why in refused.items())
            )
        task = kwargs.get("task_id", "")
        check_metrics_pattern(metrics_pattern, field=f"TrainingRunOperator {task!r}: metrics_pattern")
        kwargs["mount_tmp_dir"] = False
        # DockerOperator fills an absent docker_url in from $DOCKER_HOST where the DAG file is parsed (the
        # dag-processor's environment shows in the UI); a task that names no host gets the worker's own
        # when it runs instead (_resolve_docker_host), so that a grid spreads over the GPU hosts' workers.
        self.docker_url_given = bool(kwargs.get("docker_url"))
        super().__init__(image=image or "", **kwargs)
        # A manifest mapping in a DAG file may hold inline credentials: Airflow stores template fields in
        # its serialized_dag table, so the field holds it redacted; the worker, which builds the task
        # from the DAG file, puts the secrets back when it renders the fields.
        self._inline_manifest = manifest if isinstance(manifest, Mapping) else None
        if self._inline_manifest is not None:
            from airflow_wmltrain.manifest import redact_manifest

            manifest = redact_manifest(manifest)
        self.manifest = manifest
        self.model_definition = model_definition
        self.hyperparameters = hyperparameters
        self.training_id = training_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.halt_grace_period = halt_grace_period
        self.submitted_inputs = submitted_inputs
        self.metrics_pattern = metrics_pattern
        self._try = _Try()

    # --- templates: mask the manifest's secrets before Airflow stores the rendered fields -------------

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        self.manifest = source = self._manifest_source()
        if self.submitted_inputs:  # data, never a path: a worker's file is not even read to mask it
            try:
                source = submitted_manifest(source)
            except ManifestError:  # validation says so, later
                source = {}
        _mask_manifest_secrets(source)

    def _manifest_source(self) -> Any:
        """The manifest as written, its inline secrets back in place (see ``__init__``)."""
        if self._inline_manifest is None:
            return self.manifest
        from airflow_wmltrain.manifest import restore_secrets

        return restore_secrets(self.manifest, self._inline_manifest)

    # --- the Docker host ------------------------------------------------------------------------------

    def _resolve_docker_host(self, settings: Settings) -> None:
        """A task that names no ``docker_url`` runs on the worker's Docker host, read when it runs:
        ``[wmltrain] docker_url``, else the worker's ``$DOCKER_HOST``, else the local socket."""
        if self.docker_url_given:
            return
        url = settings.docker_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_URL
        if url != self.docker_url:
            self.docker_url = url
            self.__dict__.pop("hook", None)  # a hook built for the parse-time default

    @cached_property
    def hook(self) -> TrainingDockerHook:
        """The Docker host (cached: one client for the whole task)."""
        return TrainingDockerHook(
            docker_url=self.docker_url,
            docker_conn_id=self.docker_conn_id,
            api_version=self.api_version,
            tls_ca_cert=self.tls_ca_cert,
            tls_client_cert=self.tls_client_cert,
            tls_client_key=self.tls_client_key,
            tls_verify=self.tls_verify,
            tls_hostname=self.tls_hostname,
            tls_ssl_version=self.tls_ssl_version,
            timeout=self.timeout,
        )

    def _host_of(self, training_id: str, recorded: str, recorded_id: str = "") -> TrainingDockerHook:
        """The Docker host a run lives on (``recorded`` by its status or its trigger event, with the
        daemon's id ``recorded_id`` where known; empty: unknown, the task's own): a retry never starts a
        second container on another engine.

        A task whose DAG names its hosts goes back to the recorded one if it is among them. A task that
        names none (the worker's host, :meth:`_resolve_docker_host`) goes back to the recorded URL from
        whichever worker the try landed on. Either way the engine that answers there must be the one the
        run was started on (the same URL may be another machine's engine: every host has
        ``unix:///var/run/docker.sock``); when it is not, or does not answer, the try starts nothing and
        fails *retryable*, so that a later try may land on a worker of the run's host.

        :raises DockerHostError: the run lives on a host this task is not configured for (not retryable),
            or on an engine this worker does not reach (retryable).
        """
        hook = self.hook
        if not recorded:
            return hook
        if recorded == hook.docker_url:
            host = hook
        elif recorded in hook.docker_urls or not self.docker_url_given:
            self.log.info("Training run %s lives on %s: going back there", training_id, recorded)
            host = hook.pinned(recorded)
        else:
            error = DockerHostError(
                f"training run {training_id} was started on the Docker host {recorded}, but this task "
                f"is configured for {', '.join(hook.docker_urls)}; a run never gets a second container: "
                f"give the task that docker_url again, or halt the run (wmltrain halt {training_id})"
            )
            error.retryable = False
            raise error
        if recorded_id:
            try:
                found, why = host.daemon_id, ""
            except (DockerException, DockerHostError, requests.RequestException) as err:
                found, why = "", f"{type(err).__name__}: {err}"
            if found != recorded_id:
                seen = f"finds another engine there ({found[:12]})" if found else f"cannot reach it ({why})"
                error = DockerHostError(
                    f"training run {training_id} lives on the Docker engine {recorded_id[:12]} at "
                    f"{recorded}, and this worker {seen}: this try starts nothing, so that a retry on a "
                    "worker of that host re-attaches to the run (give each host's [wmltrain] docker_url "
                    "an address every worker reaches to re-attach from anywhere), or halt it "
                    f"(wmltrain halt {training_id})"
                )
                error.retryable = True
                raise error
        return host

    # --- who the task is ------------------------------------------------------------------------------

    def _training_id(self, context: Context) -> str:
        if self.training_id:
            return check_training_id(str(self.training_id))
        ti = context["ti"]
        return derive_training_id(
            ti.dag_id, ti.run_id, ti.task_id, -1 if ti.map_index is None else ti.map_index
        )

    @staticmethod
    def _airflow_info(context: Context) -> dict[str, Any]:
        ti = context["ti"]
        return {
            "dag_id": ti.dag_id,
            "run_id": ti.run_id,
            "task_id": ti.task_id,
            "map_index": -1 if ti.map_index is None else ti.map_index,
            "try_number": ti.try_number,
        }

    @staticmethod
    def _publisher(context: Context) -> Callable[[dict[str, Any]], None]:
        """Publishes each status document as an XCom, so the REST API (``wmltrain list``) sees it."""
        ti = context["ti"]

        def publish(document: dict[str, Any]) -> None:
            ti.xcom_push(key=STATUS_XCOM_KEY, value=document)

        return publish

    def _metrics_pattern(self, settings: Settings) -> str | None:
        """The pattern of metrics in the training's output: the task's, else the admin's."""
        return self.metrics_pattern or settings.metrics_log_pattern or None

    def _container_labels(
        self, training_id: str, owner: Mapping[str, Any], gpu_ids: Sequence[str]
    ) -> dict[str, str]:
        user_labels = self.labels if isinstance(self.labels, dict) else dict.fromkeys(self.labels or [], "")
        return {
            **user_labels,
            labels.ROLE: labels.ROLE_RUN,
            labels.TRAINING_ID: training_id,
            labels.GPUS: ",".join(gpu_ids),
            **{label: str(owner[key]) for key, label in labels.OWNER_LABELS.items()},
        }

    # --- execute --------------------------------------------------------------------------------------

    def _validate(self, settings: Settings, training_id: str) -> Submission:
        from airflow_wmltrain.manifest import load_manifest
        from airflow_wmltrain.model_source import resolve_model_definition
        from airflow_wmltrain.submission import check_submission

        if self.submitted_inputs:
            manifest = load_manifest(submitted_manifest(self._manifest_source()), settings=settings)
            _mask_secrets(manifest.secret_values())
            check_submitted_connections(manifest, training_id, settings.submission_connections)
        else:
            manifest = load_manifest(self._manifest_source(), settings=settings)
            _mask_secrets(manifest.secret_values())
        model_definition = resolve_model_definition(
            self.model_definition,
            manifest,
            max_bytes=settings.model_definition_max_bytes,
            submitted=self.submitted_inputs,
        )
        return check_submission(
            model_definition,
            manifest,
            hyperparameters=_hyperparameters(self.hyperparameters),
            settings=settings,
        )

    def execute(self, context: Context) -> dict[str, Any]:  # type: ignore[override]
        settings = Settings.from_airflow_config()
        self._resolve_docker_host(settings)
        training_id = self._training_id(context)
        owner = self._airflow_info(context)
        self._try = _Try(owner=owner, ti=context["ti"], context=context)
        try:
            with _airflow_errors():
                submission = self._validate(settings, training_id)
        except AirflowFailException as failure:  # refused before anything started: listed as failed
            err = failure.__cause__
            assert isinstance(err, WmlTrainError)
            refused = RunStatus(training_id=training_id, airflow=owner).fail(
                RunState.FAILED, err.code, str(err)
            )
            self._publisher(context)(refused.to_dict())
            context["ti"].xcom_push(key=RUN_XCOM_PREFIX + training_id, value="")
            raise
        manifest = submission.manifest
        self.image = self.image or manifest.framework.image
        run = self._try.run = TrainingRun(
            training_id=training_id,
            manifest=manifest,
            settings=settings,
            log=self.log,
            publish=self._publisher(context),
            metrics_pattern=self._metrics_pattern(settings),
        )
        context["ti"].xcom_push(key="training_id", value=training_id)
        context["ti"].xcom_push(key=RUN_XCOM_PREFIX + training_id, value=run.location)
        TrainingResultsLink.persist(context, run.location)
        self.log.info(
            "Training run %s (%s): %s on %s, results in %s",
            training_id,
            manifest.name,
            self.image,
            ", ".join(self.hook.docker_urls),
            run.location,
        )
        with _airflow_errors():
            try:
                return self._execute(run, submission)
            except WmlTrainError as err:
                if not run.status.history and not err.retryable:  # ended before recording anything: say why
                    run.end_in_task(RunState.FAILED, err)
                raise

    def _execute(self, run: TrainingRun, submission: Submission) -> dict[str, Any]:
        owner = self._try.owner
        training_id = run.training_id
        digest = submission_digest(submission)
        prior = run.resume()
        if prior is not None and prior.airflow:
            labels.check_owner(training_id, owner, prior.airflow, "the run")
        recorded = prior.container if prior is not None and not prior.terminal else {}
        hook = self._host_of(training_id, recorded.get("docker_url", ""), recorded.get("docker_id", ""))
        existing = hook.find_run_container(training_id, owner)  # another task instance's: refused
        if existing is None and prior is not None and prior.state is RunState.COMPLETED:
            if prior.digest == digest:
                # An earlier try (or run) of this task instance completed it: same submission, same result.
                self.log.info(
                    "Training run %s was COMPLETED by an earlier try; not training again", training_id
                )
                return self._result(run)
            raise RunConflictError(
                f"training run {training_id} already COMPLETED with another submission (the code, the "
                "manifest or the hyperparameters changed since); to train again, give the task a new "
                "training_id (or leave it empty and trigger a new DAG run)"
            )
        run.workspace.claim(training_id, owner)  # staged by another task instance, no container yet: refused
        # From here on the training id is this task instance's: a halt may touch its container and workspace.
        self._try.claimed = True
        if existing is not None:
            return self._reattach(run, hook, existing)
        if prior is not None and not prior.terminal and prior.state.rank >= RunState.PROCESSING.rank:
            # The status says that the run had a container, and the host has none: someone removed it.
            lost = DockerHostError(
                f"the container of training run {training_id} is gone from the Docker host {hook.docker_url} "
                f"while the run was {prior.state.value}; it was removed (docker rm) or the host lost it"
            )
            lost.retryable = False
            run.end_without_container(RunState.FAILED, lost)
            raise lost
        return self._start(run, hook, submission, digest)

    def _start(
        self, run: TrainingRun, hook: TrainingDockerHook, submission: Submission, digest: str
    ) -> dict[str, Any]:
        manifest = submission.manifest
        run.begin(
            data_location=manifest.data.describe(),
            image=str(self.image),
            command=submission.command,
            hyperparameters=dict(submission.hyperparameters),
            airflow=self._try.owner,
            digest=digest,
            container={"docker_url": hook.docker_url, "docker_id": hook.daemon_id},
        )
        try:
            hook.ensure_image(
                str(self.image),
                force_pull=self.force_pull,
                framework=f"{manifest.framework.name} {manifest.framework.version}",
                log=self.log,
            )
            inventory = self._gpu_inventory(run, hook)  # before staging: fail fast without GPUs
            run.download(submission.model_definition)
            outcome = self._create_and_start(run, hook, submission, inventory)
        except AirflowRescheduleException:
            raise
        except RunConflictError as err:
            # Another task instance created the run's container meanwhile: its workspace, container and
            # status document are left alone (a FAILED written there would stand over its own end); only
            # this task's XCom says why it ended.
            self._try.claimed = False
            run.end_in_task(RunState.FAILED, err)
            raise
        except Exception as err:
            if self._try.halter_spawned:  # the halt owns the run's end now
                raise
            if not run.status.terminal and self._try.container_id is None:
                error = err if isinstance(err, WmlTrainError) else ServerError(f"{type(err).__name__}: {err}")
                state = RunState.HALTED if isinstance(err, RunHaltedError) else RunState.FAILED
                run.end_without_container(state, error)
            raise
        return self._wait(run, hook, outcome)

    def _reattach(
        self, run: TrainingRun, hook: TrainingDockerHook, outcome: ContainerOutcome
    ) -> dict[str, Any]:
        self._try.container_id = outcome.container_id
        self.log.info(
            "Re-attaching to the container %s of training run %s on %s (it is %s); no new run is started",
            outcome.container_id[:12],
            run.training_id,
            hook.docker_url,
            outcome.status,
        )
        if outcome.status == "created":  # an earlier try died between create and start
            hook.start(outcome.container_id)
            outcome = hook.inspect(outcome.container_id)
        if not run.status.history:  # the earlier try died before it wrote a status document
            run.begin(airflow=self._try.owner, image=str(self.image))
        run.processing(outcome, hook.docker_url, hook.daemon_id)
        return self._wait(run, hook, outcome)

    # --- GPUs and the container -----------------------------------------------------------------------

    def _gpu_inventory(self, run: TrainingRun, hook: TrainingDockerHook) -> list[str] | None:
        """The host's GPUs, or ``None`` for a run without GPUs (a CPU run, or the explicit CPU fallback).

        :raises GpuCapacityError: the host has no NVIDIA runtime (and no CPU fallback), or fewer GPUs
            than the run needs at all.
        """
        from airflow_wmltrain.runtime import gpus

        manifest, settings = run.manifest, run.settings
        count = manifest.gpus
        if count == 0:
            return None
        image = str(self.image)
        if not hook.has_nvidia_runtime(image, cache_dir=settings.cache_dir):
            if not settings.cpu_fallback:
                raise gpus.no_nvidia_runtime_error(hook.docker_url)
            self.log.warning("!" * 78)
            self.log.warning(
                "!! NO GPU: the Docker host %s has no NVIDIA runtime; [wmltrain] cpu_fallback is on, so "
                "this '%s' run (%d GPU(s) asked) runs on the CPU only",
                hook.docker_url,
                manifest.resource,
                count,
            )
            self.log.warning("!" * 78)
            return None
        inventory = hook.gpu_inventory(settings.gpu_ids, image=image, cache_dir=settings.cache_dir)
        gpus.check_capacity(count, inventory, resource_class=manifest.resource, docker_url=hook.docker_url)
        return inventory

    def _lease_gpus(
        self, run: TrainingRun, hook: TrainingDockerHook, inventory: list[str] | None
    ) -> list[str]:
        """Lease the run's GPUs on the host: wait for them (the run's phase says who holds them), or
        reschedule the task, as configured."""
        if inventory is None:
            return []
        settings = run.settings
        manifest = run.manifest
        count = manifest.gpus

        def waiting(allocation: GpuAllocation) -> None:
            run.note_phase(f"waiting for {count} GPU(s) on {hook.docker_url}: {allocation.describe()}")

        common: dict[str, Any] = {
            "inventory": inventory,
            "image": str(self.image),
            "resource_class": manifest.resource,
            "log": self.log,
        }
        if settings.gpu_wait == "reschedule":
            allocation = hook.try_allocate_gpus(run.training_id, count, **common)
            if not allocation.granted:
                waiting(allocation)
                self.log.info(
                    "No %d free GPU(s) on %s now (%s); trying again in %d s",
                    count,
                    hook.docker_url,
                    allocation.describe(),
                    settings.gpu_poll_interval,
                )
                from airflow.sdk import timezone

                raise AirflowRescheduleException(  # type: ignore[no-untyped-call]
                    timezone.utcnow() + timedelta(seconds=settings.gpu_poll_interval)
                )
            return list(allocation.gpu_ids)
        return hook.wait_for_gpus(
            run.training_id,
            count,
            timeout=settings.gpu_wait_timeout,
            poll_interval=settings.gpu_poll_interval,
            on_wait=waiting,
            **common,
        )

    def _create_and_start(
        self, run: TrainingRun, hook: TrainingDockerHook, submission: Submission, inventory: list[str] | None
    ) -> ContainerOutcome:
        from airflow_wmltrain.command import render_command
        from airflow_wmltrain.runtime.gpus import gpu_device_request

        self._check_halt("before its container started")
        self._normalize_mounts()
        owner = self._try.owner
        gpu_ids = self._lease_gpus(run, hook, inventory)
        command = render_command(
            submission.manifest.command,
            data_dir=CONTAINER_DIRS["DATA_DIR"],
            result_dir=CONTAINER_DIRS["RESULT_DIR"],
            hyperparameters=submission.hyperparameters,
        )
        environment = {
            "PYTHONUNBUFFERED": "1",
            **(self.unpack_environment_variables(self.env_file) if self.env_file else {}),
            **self.environment,
            **CONTAINER_DIRS,
            "TRAINING_ID": run.training_id,
            "GPU_COUNT": str(len(gpu_ids)),
            "LEARNER_ID": "1",
            "NUM_LEARNERS": "1",
            **self._private_environment,
        }
        log_config = {}
        if self.log_opts_max_size is not None:
            log_config["max-size"] = self.log_opts_max_size
        if self.log_opts_max_file is not None:
            log_config["max-file"] = self.log_opts_max_file
        try:
            self._check_halt("while it waited for GPUs")
            outcome, created = hook.create_run_container(
                run.training_id,
                settings=run.settings,
                image=self.image,
                command=["sh", "-c", command],
                environment=environment,
                host_config=hook.api_client.create_host_config(
                    auto_remove=False,
                    mounts=[*run.workspace.mounts(), *self.mounts],
                    network_mode=self.network_mode,
                    shm_size=self.shm_size,
                    dns=self.dns,
                    dns_search=self.dns_search,
                    cpu_shares=round(self.cpus * 1024),
                    mem_limit=self.mem_limit,
                    cap_add=self.cap_add,
                    extra_hosts=self.extra_hosts,
                    privileged=self.privileged,
                    device_requests=[gpu_device_request(gpu_ids)] if gpu_ids else self.device_requests,
                    log_config=LogConfig(config=log_config),
                    ipc_mode=self.ipc_mode,
                    ulimits=self.ulimits,
                ),
                user=self.user,
                entrypoint=self.format_command(self.entrypoint),
                working_dir=self.working_dir or CONTAINER_DIRS["MODEL_DIR"],
                hostname=self.hostname,
                labels=self._container_labels(run.training_id, owner, gpu_ids),
            )
        finally:
            if gpu_ids:
                hook.release_leases(run.training_id)
        self._try.container_id = outcome.container_id
        if not created:  # another try of this task instance created it meanwhile: re-attach to it
            self.log.info(
                "The container of training run %s already exists (another try created it): re-attaching",
                run.training_id,
            )
            if outcome.status == "created":
                hook.start(outcome.container_id)
                outcome = hook.inspect(outcome.container_id)
            run.processing(outcome, hook.docker_url, hook.daemon_id)
            return outcome
        if self._try.halt_requested:  # halted while the container was being created: it never starts
            hook.remove(outcome.container_id)
            self._try.container_id = None
            raise RunHaltedError("the run was halted before its container started")
        hook.start(outcome.container_id)
        if self._try.halter_spawned:  # halted while it started: the halter stops it and ends the run
            raise RunHaltedError("the run was halted as its container started")
        run.processing(outcome, hook.docker_url, hook.daemon_id)
        self.log.info(
            "Started container %s (%s) with %s: %s",
            outcome.container_id[:12],
            self.image,
            f"GPU(s) {','.join(gpu_ids)}" if gpu_ids else "no GPU",
            command,
        )
        return replace(outcome, status="running")  # following the log tells when it ends

    def _check_halt(self, when: str) -> None:
        if self._try.halt_requested:
            raise RunHaltedError(f"the run was halted {when}")

    # --- waiting and finishing -----------------------------------------------------------------------

    def _wait(self, run: TrainingRun, hook: TrainingDockerHook, outcome: ContainerOutcome) -> dict[str, Any]:
        """Wait for the container — look first: one that already ended is finished at once, and a
        deferrable run defers only when it still trains after ``[wmltrain] defer_after`` seconds (a short
        run is finished here, without a trip through the triggerer and back)."""
        deferrable = self._defers(hook)
        if outcome.running and deferrable and run.settings.defer_after > 0:
            self._try.connections = connections_as_json(run.manifest)  # a halt meanwhile needs them
            self.log.info(
                "Watching container %s for up to %ds before deferring",
                outcome.container_id[:12],
                run.settings.defer_after,
            )
            outcome = hook.wait_ended(outcome.container_id, run.settings.defer_after) or outcome
        if outcome.running and deferrable:
            from airflow_wmltrain.triggers.training_run import TrainingRunTrigger, seal_halt

            self.defer(
                trigger=TrainingRunTrigger(
                    training_id=run.training_id,
                    container_id=outcome.container_id,
                    docker_host=hook.to_dict(),
                    poll_interval=float(self.poll_interval or run.settings.poll_interval),
                    halt=seal_halt(
                        self._halt_params(run, hook, outcome.container_id, "its task was stopped")
                    ),
                    metrics={
                        "interval": float(run.settings.metrics_interval),
                        "owner": {key: self._try.owner[key] for key in OWNER_KEYS},
                    },
                ),
                method_name="execute_complete",
            )
        if outcome.running:
            # Read now what a halt would need: on_kill runs in a signal handler, with seconds to live.
            self._try.connections = connections_as_json(run.manifest)
            outcome = self._follow(run, hook, outcome.container_id)
        else:
            self._show_log(run, hook, outcome.container_id)
        return self._finish(run, hook, outcome)

    def _defers(self, hook: TrainingDockerHook) -> bool:
        """Whether the run may wait in the triggerer. A local socket (``unix://``) the task did not name
        (the worker's own Docker host, :meth:`_resolve_docker_host`) is this machine's engine: the
        triggerer, in general on another machine, would find another engine (or none) at that path, so
        the run waits in the worker instead. To defer, give each GPU host's ``[wmltrain] docker_url`` an
        address the triggerer reaches (``tcp://`` with TLS), or name the host in the DAG."""
        if not self.deferrable:
            return False
        if self.docker_url_given or not hook.docker_url.startswith(LOCAL_SCHEMES):
            return True
        self.log.info(
            "Not deferring: the Docker host %s is this worker's local socket, which the triggerer does not "
            "reach; the run is followed here (give [wmltrain] docker_url a tcp:// address to defer)",
            hook.docker_url,
        )
        return False

    def _show_log(self, run: TrainingRun, hook: TrainingDockerHook, container_id: str) -> None:
        """Copy the whole log of an ended container into the task log."""
        self.log.info("::group::Training log of %s", run.training_id)
        try:
            for line in hook.log_lines(container_id):
                self.log.info("%s", line)
        finally:
            self.log.info("::endgroup::")

    def _follow(self, run: TrainingRun, hook: TrainingDockerHook, container_id: str) -> ContainerOutcome:
        """Stream the container's log into the task log until it exits, collecting the run's metrics;
        ride out a Docker host restart."""
        self.log.info("::group::Training log of %s", run.training_id)
        try:
            with self._watching_metrics(run, hook, container_id) as collector:
                return self._follow_log(run, hook, container_id, collector)
        finally:
            self.log.info("::endgroup::")

    @contextmanager
    def _watching_metrics(
        self, run: TrainingRun, hook: TrainingDockerHook, container_id: str
    ) -> Iterator[MetricsCollector]:
        """Collect the run's metrics while it trains: the log follower feeds the log's lines, a thread
        reads ``$RESULT_DIR/metrics.jsonl`` and publishes (:meth:`TrainingRun.progress`) at most every
        ``[wmltrain] metrics_interval`` seconds.  The thread stops before the run is stored or halted."""
        interval = float(run.settings.metrics_interval)
        collector = MetricsCollector(
            check_metrics_pattern(run.metrics_pattern, field="metrics_pattern"),
            interval=interval,
            publish=run.progress,
            log=self.log,
        )
        stop = self._try.metrics_stop = threading.Event()
        jsonl = run.workspace.results / JSONL_FILE

        def read(offset: int, limit: int) -> bytes | None:  # the workspace is elsewhere after a move
            return hook.read_file(
                container_id, f"{CONTAINER_DIRS['RESULT_DIR']}/{JSONL_FILE}", offset=offset, limit=limit
            )

        def watch() -> None:
            while not stop.wait(interval):
                try:
                    if run.workspace.results.is_dir():
                        collector.read_jsonl(jsonl)
                    else:
                        collector.read_jsonl_with(read)
                except Exception as err:  # metrics never fail a run
                    self.log.warning("Could not read %s (%s)", JSONL_FILE, err)
                if not stop.is_set():
                    collector.publish_if_due()

        watcher = threading.Thread(target=watch, name=f"metrics-{run.training_id}", daemon=True)
        watcher.start()
        try:
            yield collector
        finally:
            stop.set()
            watcher.join(timeout=60)

    def _follow_log(
        self, run: TrainingRun, hook: TrainingDockerHook, container_id: str, collector: MetricsCollector
    ) -> ContainerOutcome:
        """Follow the log (again after a Docker host restart: from its start, so the log's points too)."""
        while True:
            try:
                collector.restart_log()
                hook.follow_logs(container_id, self.log, on_line=collector.feed_line)
                return hook.wait(container_id)
            except (DockerException, requests.RequestException, OSError) as err:
                self.log.warning("Lost the Docker host %s while following the run (%s)", hook.docker_url, err)
            outcome = self._look_again(hook, container_id)
            if not outcome.running:
                return outcome
            self.log.info("The container of %s still runs; following it again", run.training_id)

    def _look_again(self, hook: TrainingDockerHook, container_id: str) -> ContainerOutcome:
        """The container, once the Docker host answers again (a retry re-attaches if it never does)."""

        def look() -> ContainerOutcome:
            hook.close()
            return hook.inspect(container_id)

        try:
            return wait_until(
                look,
                what=f"the Docker host {hook.docker_url} to answer again",
                timeout=DOCKER_OUTAGE_WAIT,
                backoff=Backoff(interval=2.0, max_interval=30.0),
                transient=(
                    DockerException,
                    DockerHostError,
                    requests.RequestException,
                    OSError,
                    AirflowException,
                ),
                on_failure=lambda n, delay, exc: self.log.info(
                    "The Docker host %s does not answer yet (%d, again in %.0f s): %s",
                    hook.docker_url,
                    n,
                    delay,
                    exc,
                ),
            )
        except WaitTimeoutError as err:
            raise DockerHostError(f"{err}; the run is left as it is, a retry re-attaches to it") from None

    def _halt_params(
        self, run: TrainingRun, hook: TrainingDockerHook, container_id: str | None, reason: str
    ) -> dict[str, Any]:
        return {
            "training_id": run.training_id,
            "container_id": container_id,
            "docker_host": hook.to_dict(),
            "manifest": run.manifest.to_dict(redact=False),
            "grace": int(self.halt_grace_period or run.settings.halt_grace_period),
            "reason": reason,
            "metrics_pattern": run.metrics_pattern,
        }

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Finish a deferred run: check the event, show the log, store results and logs, end the run."""
        settings = Settings.from_airflow_config()
        self._resolve_docker_host(settings)
        training_id = self._training_id(context)
        self._try = _Try(owner=self._airflow_info(context), ti=context["ti"], context=context)
        if not isinstance(event, dict) or event.get("training_id") != training_id:
            raise AirflowException(f"an unexpected event resumed the task of {training_id}: {event!r}")
        with _airflow_errors():
            submission = self._validate(settings, training_id)
            run = self._try.run = TrainingRun(
                training_id=training_id,
                manifest=submission.manifest,
                settings=settings,
                log=self.log,
                publish=self._publisher(context),
                metrics_pattern=self._metrics_pattern(settings),
            )
            hook = self._host_of(training_id, str(event.get("docker_url") or ""))  # the trigger's host
            try:
                run.resume()
            except ResultsStoreError as err:  # the store is down as the run ends: keep what it made
                raise run.results_kept(hook, str(event.get("container_id") or ""), err) from None
            hook = self._host_of(  # the engine the run's status names, wherever this try landed
                training_id, hook.docker_url, run.status.container.get("docker_id", "")
            )
            self._try.claimed = True  # its own trigger resumed it: the run is this task instance's
            recorded = run.status.container.get("id", "")
            if recorded and event.get("container_id") != recorded:
                raise AirflowException(
                    f"the event is about container {event.get('container_id')!r}, but training run "
                    f"{training_id} runs in {recorded[:12]}: {event!r}"
                )
            if event.get("status") == "error":
                error = DockerHostError(str(event.get("message") or f"the wait for {training_id} failed"))
                if hook.find_run_container(training_id, self._try.owner) is None and not run.status.terminal:
                    error.retryable = False  # the container is gone: the run is over
                    run.end_without_container(RunState.FAILED, error)
                # Else the container may still train (the host did not answer): a retry re-attaches to it.
                raise error
            if event.get("status") != "exited":
                raise AirflowException(f"an unexpected event resumed the task of {training_id}: {event!r}")
            try:
                outcome = ContainerOutcome.from_event(event)
            except ValueError as err:
                raise AirflowException(f"{err}: {event!r}") from None
            self._try.container_id = outcome.container_id
            self._show_log(run, hook, outcome.container_id)
            return self._finish(run, hook, outcome)

    def _finish(
        self, run: TrainingRun, hook: TrainingDockerHook, outcome: ContainerOutcome
    ) -> dict[str, Any]:
        if self._try.halter_spawned:
            raise RunHaltedError(f"training run {run.training_id} was halted")
        if run.status.terminal:  # ended (e.g. by a halt) while this task was away; tidy what is left
            hook.remove(outcome.container_id)
            run.remove_workspace(hook)
            return self._result(run)
        skip = frozenset(int(code) for code in cast("Iterable[int]", self.skip_on_exit_code))
        run.store(hook, outcome, mem_limit=self.mem_limit, skip_exit_codes=skip)
        if run.status.state is RunState.COMPLETED and outcome.exit_code in skip:
            raise AirflowSkipException(
                f"training run {run.training_id}: the training process exited with {outcome.exit_code}, "
                "one of skip_on_exit_code; its logs and results are stored"
            )
        return self._result(run)

    def _result(self, run: TrainingRun) -> dict[str, Any]:
        """The task's end: its exception for a failed or halted run; for a completed one its return value,
        after the asset event of its results (the one place a task completes a run)."""
        status = run.status
        if status.state is RunState.FAILED:
            raise TrainingFailedError(status.failure_message())
        if status.state is RunState.HALTED:
            raise RunHaltedError(status.failure_message())
        self.log.info("Training run %s COMPLETED; results in %s", run.training_id, run.location)
        if status.metrics:
            self.log.info("Metrics: %s", json.dumps(dict(status.metrics), sort_keys=True))
        return emit_results_event(self.outlets, self._try.context, run.result(), self.log)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """OpenLineage: the run's data bucket (input) and results location (output), as the amazon
        provider's ``SageMakerTrainingOperator`` reports its job's; ``None`` without the openlineage
        provider (:func:`~airflow_wmltrain.assets.openlineage_facets`)."""
        return openlineage_facets(self._try.run)

    # --- halt -----------------------------------------------------------------------------------------

    def _halt_reason(self) -> str | None:
        """Why this task is being stopped, when that is a halt; ``None`` when Airflow moves the task.

        A deadline (``execution_timeout``: Airflow calls ``on_kill`` while handling the time-out) halts.
        Otherwise the task instance's state, asked of the API server, tells: marked failed or success
        (by a person, ``wmltrain halt``, or the scheduler for a task with no try left) halts; anything else
        (up for retry, queued or running again under a new try, cleared) means that Airflow moved the
        task, and the next try re-attaches to the run.
        """
        if isinstance(sys.exc_info()[1], AirflowTaskTimeout):
            return "its task ran past its execution_timeout"
        ti = self._try.ti
        if ti is None:
            return None
        try:
            found = ti.get_task_states(
                dag_id=ti.dag_id,
                map_index=None if ti.map_index is None or ti.map_index < 0 else ti.map_index,
                task_ids=[ti.task_id],
                run_ids=[ti.run_id],
            )
            states = dict(found.get(ti.run_id) or {})
            key = ti.task_id if ti.map_index is None or ti.map_index < 0 else f"{ti.task_id}_{ti.map_index}"
            state = str(states.get(key) or "")
        except Exception as err:  # no answer: leave the run alone (a halt must come from a person)
            self.log.warning("Could not ask Airflow why this task is stopped (%s); the run goes on", err)
            return None
        if state in _HALTING_TI_STATES:
            return f"its task was marked {state}"
        self.log.info("This try is stopped while its task is %s: Airflow moved the task", state or "None")
        return None

    def on_kill(self) -> None:
        """Halt the run when a person or a deadline stops the task; never when Airflow moves it.

        Airflow's supervisor kills the task process a few seconds after asking it to stop, so the halt
        (SIGTERM, the grace period, SIGKILL, storing the logs) is done by a detached process.
        """
        run = self._try.run
        if run is None or not self._try.claimed or run.status.terminal or self._try.halt_requested:
            return  # nothing of a run this task instance owns to halt
        reason = self._halt_reason()
        if reason is None:
            self.log.info(
                "Training run %s goes on: nobody asked for a halt, and the next try re-attaches to it",
                run.training_id,
            )
            return
        self._try.halt_requested = True
        if self._try.metrics_stop is not None:  # no metrics written after the halt's records
            self._try.metrics_stop.set()
        settings = run.settings
        hook = self._host_of(
            run.training_id,
            run.status.container.get("docker_url", ""),
            run.status.container.get("docker_id", ""),
        )
        container_id = self._try.container_id
        if container_id is None:
            try:
                found = hook.find_run_container(run.training_id, self._try.owner)
            except Exception:  # the host does not answer: the halter looks again
                found = None
            container_id = found.container_id if found is not None else None
        if container_id is None and run.status.state.rank < RunState.PROCESSING.rank:
            self.log.info(
                "Halting training run %s (%s): no training container was started", run.training_id, reason
            )
            run.end_without_container(RunState.HALTED, RunHaltedError(f"the run was halted: {reason}"))
            return
        params = self._halt_params(run, hook, container_id, f"the run was halted: {reason}")
        self.log.info(
            "Halting training run %s (%s): stopping its container (SIGKILL after %d s), then storing logs",
            run.training_id,
            reason,
            params["grace"],
        )
        params["connections"] = self._try.connections or connections_as_json(run.manifest)
        if container_id is None:  # the halter looks for it: only this task instance's container will do
            params["owner"] = {key: self._try.owner[key] for key in OWNER_KEYS}
        # The halter writes the run's end to the bucket (the task is gone by then): the task's XCom says
        # what goes on. Written before the halter starts, so that it never lands after the halter's.
        with contextlib.suppress(Exception):
            run.note_phase(f"halting ({reason}): stopping the container, then storing its logs")
        spawn_halter(params, Path(settings.staging_dir) / "halts" / f"{run.training_id}.log")
        self._try.halter_spawned = True


def _hyperparameters(value: Mapping[str, Any] | str | None) -> Mapping[str, Any] | None:
    """The hyperparameters, also when a template rendered them as JSON text."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        raise ManifestError(
            'is text that is not a JSON object; give a mapping such as {"learningRate": 0.01}',
            field="hyperparameters",
        ) from None
    if not isinstance(parsed, dict):
        raise ManifestError("must be a mapping of option name to value", field="hyperparameters")
    return parsed


def submitted_manifest(value: object) -> Mapping[str, Any]:
    """A submitted manifest as data: YAML text or a mapping, never the path of a file of the worker.

    :raises ManifestError: (C101) it is not the YAML of a mapping (the message never quotes it).
    """
    from airflow_wmltrain.manifest import _parse_yaml

    data = _parse_yaml(value, "manifest") if isinstance(value, str) else value
    if not isinstance(data, Mapping):
        raise ManifestError(
            "of a submitted run must be YAML text of a mapping with model_definition, "
            "training_data_reference and training_results_reference; a submitted manifest is never read "
            "from the worker's disk",
            field="manifest",
        )
    return data


def check_submitted_connections(
    manifest: TrainingManifest, training_id: str, patterns: Sequence[str]
) -> None:
    """Refuse a submitted manifest naming an Airflow connection it may not use.

    Allowed: the connections ``wmltrain train`` made of this run's inline credentials, and those matching
    ``[wmltrain] submission_connections`` — but never the moved credentials of another run, nor the
    provider's own API connection (``wmltrain_api``: Airflow credentials).  The model definition's URL is
    read with the data's or the results' connection, so it is covered too.

    :raises ManifestError: (C101) naming the field, the connection id and the setting to change.
    """
    from airflow_wmltrain.manifest import ConnectionId
    from airflow_wmltrain.service.retention import API_CONN_ID
    from airflow_wmltrain.service.runs import MOVED_CONNECTION_PREFIX, moved_connection_id

    own = {moved_connection_id(training_id, role) for role in ("data", "results")}
    for where, reference in (
        ("training_data_reference[0].connection.conn_id", manifest.data),
        ("training_results_reference.connection.conn_id", manifest.results),
    ):
        if not isinstance(reference.connection, ConnectionId):
            continue
        conn_id = reference.connection.conn_id
        if conn_id in own:
            continue
        moved = conn_id.startswith(MOVED_CONNECTION_PREFIX + "training_") and conn_id.endswith(
            ("_data", "_results")
        )
        trusted = moved or conn_id == API_CONN_ID  # never a submitter's, whatever the patterns say
        if not trusted and any(fnmatch.fnmatchcase(conn_id, pattern) for pattern in patterns):
            continue
        allowed = ", ".join(patterns) or "none"
        raise ManifestError(
            f"the Airflow connection '{conn_id}' may not be used by a submitted run (allowed: {allowed}, "
            "and the connections wmltrain train makes of this run's inline credentials); use one of "
            "those, or ask an Airflow admin to add it to [wmltrain] submission_connections",
            field=where,
        )


def spawn_halter(params: Mapping[str, Any], log_path: Path) -> None:
    """Run :func:`airflow_wmltrain.runtime.run.halt_run` in a detached process (it outlives the task)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(  # our own module; the parameters go on stdin, never argv
            [sys.executable, "-m", "airflow_wmltrain.runtime.halter"],
            stdin=subprocess.PIPE,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    assert process.stdin is not None
    process.stdin.write(json.dumps(dict(params)).encode())
    process.stdin.close()


def _mask_secrets(values: Sequence[str]) -> None:
    from airflow.sdk.log import mask_secret

    for value in values:
        mask_secret(value)


def _mask_manifest_secrets(source: object) -> None:
    """Mask the credentials of a rendered manifest, before Airflow stores the rendered fields.

    Runs before validation (which reports any problem later), so it only reads the YAML and masks the
    values of every credential-like key, wherever it is.
    """
    from airflow_wmltrain.manifest import secret_values_of

    _mask_secrets(secret_values_of(source))
