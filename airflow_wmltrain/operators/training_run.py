"""``TrainingRunOperator``: one Airflow task is one training run, from the zip and manifest to the results.

Phases (SPEC §3), each recorded with a timestamp in ``<training-id>/_status.json`` of the results bucket:
validate (nothing starts for invalid input) → ``DOWNLOADING`` (stage the data bucket, store the zip and
the redacted manifest) → GPUs leased on the Docker host → ``PROCESSING`` (the framework's container,
detached) → wait (in the worker, streaming the log, or deferred to the triggerer) → ``STORING`` (results
and logs) → ``COMPLETED``, ``FAILED`` or ``HALTED``.  The training id is stable across the retries of a
task instance and the run's container is named after it, so a retry re-attaches to the container of an
earlier try instead of starting a second one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk import conf
from airflow.sdk.exceptions import AirflowRescheduleException
from docker.errors import APIError, ImageNotFound, NotFound
from docker.types import LogConfig

from airflow_wmltrain.errors import (
    ImageMissingError,
    ManifestError,
    RunHaltedError,
    ServerError,
    TrainingFailedError,
    WmlTrainError,
)
from airflow_wmltrain.lifecycle import RUN_XCOM_PREFIX, STATUS_XCOM_KEY, RunState, RunStatus
from airflow_wmltrain.links.training_run import TrainingResultsLink
from airflow_wmltrain.runtime import container, gpus, labels
from airflow_wmltrain.runtime.docker_host import DockerHost
from airflow_wmltrain.runtime.run import TrainingRun
from airflow_wmltrain.runtime.workspace import CONTAINER_DIRS
from airflow_wmltrain.settings import Settings
from airflow_wmltrain.training_id import check_training_id, derive_training_id

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_wmltrain.manifest import TrainingManifest
    from airflow_wmltrain.submission import Submission

_DEFERRABLE_DEFAULT = conf.getboolean("operators", "default_deferrable", fallback=False)


class TrainingRunOperator(DockerOperator):
    """Run one training run (a model-definition zip and a training manifest) on a Docker host.

    The Docker parameters of :class:`~airflow.providers.docker.operators.docker.DockerOperator`
    (``docker_url``, ``docker_conn_id``, TLS, ``mounts``, ``environment``, ``private_environment``,
    ``mem_limit``, ``shm_size``, ``network_mode``, ``user``, ...) apply to the training container; the
    image and the command come from the manifest.

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
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("mount_tmp_dir", False)
        super().__init__(image=image or "", **kwargs)
        self.manifest = manifest
        self.model_definition = model_definition
        self.hyperparameters = hyperparameters
        self.training_id = training_id
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.halt_grace_period = halt_grace_period
        self._run: TrainingRun | None = None
        self._container_id: str | None = None
        self._halted = False
        self._halt_connections: dict[str, str] = {}

    # --- templates: mask the manifest's secrets before Airflow stores the rendered fields -------------

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        super().render_template_fields(context, jinja_env)
        _mask_manifest_secrets(self.manifest)

    # --- helpers --------------------------------------------------------------------------------------

    @property
    def docker_host(self) -> DockerHost:
        url = self.docker_url if isinstance(self.docker_url, str) else self.docker_url[0]
        return DockerHost(
            docker_url=url,
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

    @property
    def _gpu_log(self) -> Any:
        return self.log

    def _settings(self) -> Settings:
        return Settings.from_airflow_config()

    def _training_id(self, context: Context) -> str:
        if self.training_id:
            return check_training_id(str(self.training_id))
        ti = context["ti"]
        return derive_training_id(
            ti.dag_id, ti.run_id, ti.task_id, -1 if ti.map_index is None else ti.map_index
        )

    def _same_task(self, status: RunStatus, context: Context) -> bool:
        """Whether ``status`` was written by a try of this very task instance."""
        mine = self._airflow_info(context)
        return all(
            status.airflow.get(key) == mine[key] for key in ("dag_id", "run_id", "task_id", "map_index")
        )

    def _new_run(
        self, context: Context, training_id: str, manifest: TrainingManifest, settings: Settings
    ) -> TrainingRun:
        return TrainingRun(
            training_id=training_id,
            manifest=manifest,
            settings=settings,
            log=self.log,
            on_status=self._publisher(context),
        )

    @staticmethod
    def _publisher(context: Context) -> Callable[[dict[str, Any]], None]:
        """Publishes each status document as an XCom, so the REST API (``wmltrain list``) sees it."""
        ti = context["ti"]

        def publish(document: dict[str, Any]) -> None:
            ti.xcom_push(key=STATUS_XCOM_KEY, value=document)

        return publish

    @staticmethod
    def _airflow_info(context: Context) -> dict[str, Any]:
        ti = context["ti"]
        return {
            "dag_id": ti.dag_id,
            "run_id": ti.run_id,
            "task_id": ti.task_id,
            "map_index": ti.map_index,
            "try_number": ti.try_number,
        }

    def _container_labels(self, training_id: str, context: Context, gpu_ids: Sequence[str]) -> dict[str, str]:
        info = self._airflow_info(context)
        user_labels = self.labels if isinstance(self.labels, dict) else dict.fromkeys(self.labels or [], "")
        return {
            **user_labels,
            labels.ROLE: labels.ROLE_RUN,
            labels.TRAINING_ID: training_id,
            labels.GPUS: ",".join(gpu_ids),
            labels.DAG_ID: str(info["dag_id"]),
            labels.RUN_ID: str(info["run_id"]),
            labels.TASK_ID: str(info["task_id"]),
            labels.MAP_INDEX: str(info["map_index"]),
        }

    # --- execute --------------------------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:  # type: ignore[override]
        from airflow_wmltrain.manifest import load_manifest
        from airflow_wmltrain.model_source import resolve_model_definition
        from airflow_wmltrain.submission import check_submission

        settings = self._settings()
        training_id = self._training_id(context)
        try:
            manifest = load_manifest(self.manifest, settings=settings)
            _mask_secrets(manifest.secret_values())
            model_definition = resolve_model_definition(
                self.model_definition, manifest, max_bytes=settings.model_definition_max_bytes
            )
            submission = check_submission(
                model_definition,
                manifest,
                hyperparameters=_hyperparameters(self.hyperparameters),
                settings=settings,
            )
        except WmlTrainError as err:  # refused before anything started; listed as failed, with the reason
            self._publisher(context)(_refused(training_id, err, self._airflow_info(context)))
            context["ti"].xcom_push(key=RUN_XCOM_PREFIX + training_id, value="")
            raise
        self.image = self.image or manifest.framework.image
        run = self._run = self._new_run(context, training_id, manifest, settings)
        context["ti"].xcom_push(key="training_id", value=training_id)
        context["ti"].xcom_push(key=RUN_XCOM_PREFIX + training_id, value=run.location)
        TrainingResultsLink.persist(context, run.location)
        self.log.info(
            "Training run %s (%s): %s on %s, results in %s",
            training_id,
            manifest.name,
            manifest.framework.image if not self.image else self.image,
            self.docker_host.docker_url,
            run.location,
        )

        existing = container.find_run_container(self.cli, training_id)
        if existing is not None:
            return self._reattach(context, run, existing, settings)
        prior = run.read_status()
        if prior is not None and prior.state is RunState.COMPLETED and self._same_task(prior, context):
            # An earlier try of this task instance completed the run, then died before telling Airflow.
            self.log.info("Training run %s was COMPLETED by an earlier try; not training again", training_id)
            run.status = prior
            return self._result(run)
        run.status = RunStatus(
            training_id=training_id,
            name=manifest.name,
            results_location=run.location,
            data_location=manifest.data.describe(),
            image=str(self.image),
            command=submission.command,
            airflow=self._airflow_info(context),
        )
        try:
            run.record(RunState.DOWNLOADING)
            self._ensure_image(manifest)
            inventory = self._gpu_inventory(run, settings)  # before staging: fail fast on a host without GPUs
            run.download(submission.model_definition)
            container_id, gpu_ids = self._start_container(context, run, submission, settings, inventory)
        except AirflowRescheduleException:
            raise
        except WmlTrainError as err:
            if not run.status.terminal:
                run.end_without_container(RunState.FAILED, err)
            raise
        except Exception as err:  # a Docker API error, a bad mount...: the run still ends, with the reason
            if not run.status.terminal:
                run.end_without_container(RunState.FAILED, ServerError(f"{type(err).__name__}: {err}"))
            raise
        self._container_id = container_id
        run.record(
            RunState.PROCESSING,
            gpus=tuple(gpu_ids),
            container={"id": container_id, "docker_url": self.docker_host.docker_url},
        )
        return self._wait(context, run, container_id, settings)

    def _reattach(
        self, context: Context, run: TrainingRun, info: dict[str, Any], settings: Settings
    ) -> dict[str, Any]:
        container_id = str(info["Id"])
        self._container_id = container_id
        outcome = container.ContainerOutcome.from_inspect(info)
        run.status = run.read_status() or run.status
        self.log.info(
            "Re-attaching to the container %s of training run %s (it is %s); no new run is started",
            container_id[:12],
            run.training_id,
            outcome.status,
        )
        if outcome.status == "created":  # an earlier try died between create and start
            self.cli.start(container_id)
        if run.status.state.rank < RunState.PROCESSING.rank:
            run.record(RunState.PROCESSING)
        return self._wait(context, run, container_id, settings)

    def _ensure_image(self, manifest: TrainingManifest) -> None:
        image = str(self.image)
        if not self.force_pull:
            try:
                self.cli.inspect_image(image)
                return
            except ImageNotFound:
                pass
        self.log.info("Pulling the image %s", image)
        try:
            for output in self.cli.pull(image, stream=True, decode=True):
                if isinstance(output, dict) and "status" in output and "id" not in output:
                    self.log.info("%s", output["status"])
        except (APIError, NotFound) as err:
            framework = f"{manifest.framework.name} {manifest.framework.version}"
            raise ImageMissingError(
                f"the image {image} of framework {framework} is not on the Docker host "
                f"{self.docker_host.docker_url} and cannot be pulled ({err.explanation or err}); build or "
                "load it there (see images/), or map the framework to another image in "
                "[wmltrain] frameworks_file",
                field="model_definition.framework",
            ) from None

    def _gpu_inventory(self, run: TrainingRun, settings: Settings) -> list[str] | None:
        """The host's GPUs, or ``None`` for a run without GPUs (a CPU run, or the explicit CPU fallback).

        :raises GpuCapacityError: the host has no NVIDIA runtime (and no CPU fallback), or fewer GPUs
            than the run needs at all.
        """
        manifest = run.manifest
        count = manifest.gpus
        if count == 0:
            return None
        image = str(self.image)
        url = self.docker_host.docker_url
        if not gpus.has_nvidia_runtime(self.cli, image, docker_url=url):
            if not settings.cpu_fallback:
                raise gpus.no_nvidia_runtime_error(url)
            self.log.warning("!" * 78)
            self.log.warning(
                "!! NO GPU: the Docker host %s has no NVIDIA runtime; [wmltrain] cpu_fallback is on, so "
                "this '%s' run (%d GPU(s) asked) runs on the CPU only",
                url,
                manifest.resource,
                count,
            )
            self.log.warning("!" * 78)
            return None
        inventory = gpus.gpu_inventory(self.cli, settings.gpu_ids, image=image, docker_url=url)
        gpus.check_capacity(count, inventory, resource_class=manifest.resource, docker_url=url)
        return inventory

    def _lease_gpus(self, run: TrainingRun, settings: Settings, inventory: list[str] | None) -> list[str]:
        """Lease the run's GPUs on the host: wait for them, or reschedule the task, as configured."""
        if inventory is None:
            return []
        manifest = run.manifest
        count = manifest.gpus
        image = str(self.image)
        url = self.docker_host.docker_url
        if settings.gpu_wait == "reschedule":
            allocation = gpus.try_allocate_gpus(
                self.cli,
                run.training_id,
                count,
                inventory=inventory,
                image=image,
                resource_class=manifest.resource,
                docker_url=url,
                log=self._gpu_log,
            )
            if not allocation.granted:
                self.log.info(
                    "No %d free GPU(s) on %s now (%s); trying again in %d s",
                    count,
                    url,
                    allocation.describe(),
                    settings.gpu_poll_interval,
                )
                from airflow.sdk import timezone

                raise AirflowRescheduleException(  # type: ignore[no-untyped-call]
                    timezone.utcnow() + timedelta(seconds=settings.gpu_poll_interval)
                )
            return list(allocation.gpu_ids)
        return gpus.wait_for_gpus(
            self.cli,
            run.training_id,
            count,
            inventory=inventory,
            image=image,
            timeout=settings.gpu_wait_timeout,
            poll_interval=settings.gpu_poll_interval,
            log=self._gpu_log,
            resource_class=manifest.resource,
            docker_url=url,
        )

    def _start_container(
        self,
        context: Context,
        run: TrainingRun,
        submission: Submission,
        settings: Settings,
        inventory: list[str] | None,
    ) -> tuple[str, list[str]]:
        from airflow_wmltrain.command import render_command

        if self._halted:
            raise RunHaltedError("the run was halted before its container started")
        self._normalize_mounts()
        gpu_ids = self._lease_gpus(run, settings, inventory)
        if self._halted:  # halted while it waited for GPUs
            gpus.release_leases(self.cli, run.training_id)
            raise RunHaltedError("the run was halted before its container started")
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
            created = self.cli.create_container(
                image=self.image,
                command=["sh", "-c", command],
                name=labels.run_container_name(run.training_id),
                environment=environment,
                host_config=self.cli.create_host_config(
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
                    device_requests=[gpus.gpu_device_request(gpu_ids)] if gpu_ids else self.device_requests,
                    log_config=LogConfig(config=log_config),
                    ipc_mode=self.ipc_mode,
                    ulimits=self.ulimits,
                ),
                user=self.user,
                entrypoint=self.format_command(self.entrypoint),
                working_dir=self.working_dir or CONTAINER_DIRS["MODEL_DIR"],
                hostname=self.hostname,
                labels=self._container_labels(run.training_id, context, gpu_ids),
            )
        finally:
            if gpu_ids:
                gpus.release_leases(self.cli, run.training_id)
        container_id = str(created["Id"])
        try:
            self.cli.start(container_id)
        except APIError as err:
            container.remove(self.cli, container_id)
            if gpus.is_no_driver_error(err):
                raise gpus.no_nvidia_runtime_error(self.docker_host.docker_url) from None
            raise ServerError(f"the Docker host could not start the training container: {err}") from None
        self.log.info(
            "Started container %s (%s) with %s: %s",
            container_id[:12],
            self.image,
            f"GPU(s) {','.join(gpu_ids)}" if gpu_ids else "no GPU",
            command,
        )
        return container_id, gpu_ids

    # --- waiting and finishing -----------------------------------------------------------------------

    def _wait(
        self, context: Context, run: TrainingRun, container_id: str, settings: Settings
    ) -> dict[str, Any]:
        if self.deferrable:
            from airflow_wmltrain.triggers.training_run import TrainingRunTrigger

            self.defer(
                trigger=TrainingRunTrigger(
                    training_id=run.training_id,
                    container_id=container_id,
                    docker_host=self.docker_host.to_dict(),
                    poll_interval=float(self.poll_interval or settings.poll_interval),
                    halt=self._halt_params(run, container_id, settings),
                ),
                method_name="execute_complete",
            )
        # Read now what a halt would need: on_kill runs in a signal handler, with seconds to live.
        self._halt_connections = _resolved_connections(run.manifest)
        self.log.info("::group::Training log of %s", run.training_id)
        try:
            container.follow_logs(self.cli, container_id, self.log)
        finally:
            self.log.info("::endgroup::")
        self.cli.wait(container_id)
        return self._finish(run, container_id)

    def _halt_params(self, run: TrainingRun, container_id: str, settings: Settings) -> dict[str, Any]:
        return {
            "training_id": run.training_id,
            "container_id": container_id,
            "docker_host": self.docker_host.to_dict(),
            "manifest": run.manifest.to_dict(redact=False),
            "grace": int(self.halt_grace_period or settings.halt_grace_period),
        }

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Finish a deferred run: show its log, store its results and logs, end it."""
        from airflow_wmltrain.manifest import load_manifest

        settings = self._settings()
        manifest = load_manifest(self.manifest, settings=settings)
        _mask_secrets(manifest.secret_values())
        training_id = str(event.get("training_id") or self._training_id(context))
        run = self._run = self._new_run(context, training_id, manifest, settings)
        run.status = run.read_status() or run.status
        container_id = str(event.get("container_id", ""))
        self._container_id = container_id or None
        if event.get("status") != "exited":
            error = ServerError(str(event.get("message") or f"the wait for {training_id} failed: {event}"))
            if container.find_run_container(self.cli, training_id) is None and not run.status.terminal:
                run.end_without_container(RunState.FAILED, error)  # the container is gone: the run is over
            # Else the container may still train (the host did not answer): a retry re-attaches to it.
            raise error
        self.log.info("::group::Training log of %s", training_id)
        try:
            for line in container.log_lines(self.cli, container_id):
                self.log.info("%s", line)
        finally:
            self.log.info("::endgroup::")
        return self._finish(run, container_id)

    def _finish(self, run: TrainingRun, container_id: str) -> dict[str, Any]:
        if self._halted:
            raise RunHaltedError(f"training run {run.training_id} was halted")
        if run.status.terminal:  # ended (e.g. by a halt) while this task was away; tidy what is left
            container.remove(self.cli, container_id)
            run.workspace.remove()
            return self._result(run)
        run.store(self.cli, container_id, mem_limit=self.mem_limit)
        return self._result(run)

    def _result(self, run: TrainingRun) -> dict[str, Any]:
        status = run.status
        error = status.error or {}
        if status.state is RunState.FAILED:
            raise TrainingFailedError(f"training run {run.training_id} FAILED: {error.get('message', '')}")
        if status.state is RunState.HALTED:
            raise RunHaltedError(f"training run {run.training_id} was HALTED: {error.get('message', '')}")
        self.log.info("Training run %s COMPLETED; results in %s", run.training_id, run.location)
        if status.metrics:
            self.log.info("Metrics: %s", json.dumps(dict(status.metrics), sort_keys=True))
        return run.result()

    # --- halt -----------------------------------------------------------------------------------------

    def on_kill(self) -> None:
        """Halt the run: the container is stopped and the run ends ``HALTED`` with its logs stored.

        Airflow's supervisor kills the task process a few seconds after asking it to stop, so the halt
        (SIGTERM, the grace period, SIGKILL, storing the logs) is done by a detached process.
        """
        run, container_id = self._run, self._container_id
        if run is None or run.status.terminal:
            return
        if container_id is None:
            self._halted = True
            self.log.info("Halting: no training container was started")
            run.end_without_container(RunState.HALTED, RunHaltedError("the run was halted before it started"))
            return
        try:
            finished = not container.inspect(self.cli, container_id).running
        except Exception:  # unknown: halt it
            finished = False
        if finished:  # the training is over and this task is storing it: let it (a retry finishes it)
            self.log.info("Training run %s is being stored; not halting it", run.training_id)
            return
        self._halted = True
        settings = run.settings
        params = self._halt_params(run, container_id, settings)
        self.log.info(
            "Halting training run %s: stopping container %s (SIGKILL after %d s), then storing its logs",
            run.training_id,
            container_id[:12],
            params["grace"],
        )
        params["connections"] = self._halt_connections
        spawn_halter(params, Path(settings.staging_dir) / "halts" / f"{run.training_id}.log")


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


def _refused(training_id: str, error: WmlTrainError, airflow: dict[str, Any]) -> dict[str, Any]:
    """The status document of a run refused at validation (it is published, not written to a bucket)."""
    status = RunStatus(training_id=training_id, airflow=airflow)
    return status.fail(RunState.FAILED, error.code, str(error)).to_dict()


def _resolved_connections(manifest: TrainingManifest) -> dict[str, str]:
    """The manifest's Airflow connections, read now (the halter runs outside the task: no API to ask)."""
    from airflow.sdk import BaseHook

    from airflow_wmltrain.manifest import ConnectionId

    resolved = {}
    for reference in (manifest.results, manifest.data):
        if isinstance(reference.connection, ConnectionId):
            conn_id = reference.connection.conn_id
            resolved[conn_id] = BaseHook.get_connection(conn_id).as_json()
    return resolved


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
