"""A run's directories on the Docker host, and where the training container sees them.

``<[wmltrain] staging_dir>/runs/<training-id>/`` holds ``data`` (the staged bucket, mounted read-only:
its files are hard links of the host's staging cache), ``model`` (the extracted model definition),
``results``, ``logs`` and ``checkpoints`` (all mounted into the training container), and ``worker``: the
worker's own files (the logs it writes), never mounted, so that nothing the container does reaches
them.  The staging directory must be a path that the worker and the
Docker daemon both see (SPEC §4); when a worker resumes a run it cannot see there (another machine), the
results are read through the Docker API instead (``TrainingDockerHook.copy_out``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from docker.errors import DockerException
from docker.types import Mount
from requests import RequestException

from airflow_wmltrain.errors import RunConflictError
from airflow_wmltrain.runtime import labels

if TYPE_CHECKING:
    from docker import APIClient

logger = logging.getLogger(__name__)

#: Seconds the helper container that removes what the worker may not may take.
REMOVAL_TIMEOUT = 120

#: The task instance that owns a run's workspace, at its top (never mounted, never uploaded).
OWNER_FILE = "owner.json"
#: The most of an owner file read.
_OWNER_MAX_BYTES = 4096

#: Where the container sees each directory, and the environment variable naming it.
CONTAINER_DIRS = {
    "DATA_DIR": "/mnt/data",
    "RESULT_DIR": "/mnt/results",
    "MODEL_DIR": "/job/model-code",
    "LOG_DIR": "/job/logs",
    "CHECKPOINT_DIR": "/mnt/checkpoints",
}


class _RunDirectory:
    """The attribute ``name`` of a :class:`Workspace`: the run's directory ``<root>/<name>``."""

    def __set_name__(self, owner: type[Workspace], name: str) -> None:
        self.name = name

    @overload
    def __get__(self, workspace: None, owner: type[Workspace]) -> _RunDirectory: ...

    @overload
    def __get__(self, workspace: Workspace, owner: type[Workspace]) -> Path: ...

    def __get__(self, workspace: Workspace | None, owner: type[Workspace]) -> Path | _RunDirectory:
        return self if workspace is None else workspace.root / self.name


@dataclass(frozen=True)
class Workspace:
    """The directories of one run.

    :param root: ``<staging_dir>/runs/<training-id>``.
    """

    root: Path
    #: The staged data bucket (hard links of the staging cache), mounted read-only.
    data = _RunDirectory()
    #: The extracted model definition (the container's default working directory).
    model = _RunDirectory()
    #: What the training writes for the results bucket.
    results = _RunDirectory()
    #: The training's logs, uploaded with the results.
    logs = _RunDirectory()
    #: The training's checkpoints (not uploaded).
    checkpoints = _RunDirectory()
    #: The worker's own files (the logs it writes), not mounted: the container cannot reach them.
    worker = _RunDirectory()

    @classmethod
    def for_run(cls, staging_dir: str, training_id: str) -> Workspace:
        return cls(Path(staging_dir) / "runs" / training_id)

    def create(self) -> None:
        """Make the directories (not ``model``: the zip is extracted there atomically).

        The writable ones are open to any container user.
        """
        self.data.mkdir(parents=True, exist_ok=True)
        for path in (self.results, self.logs, self.checkpoints):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o777)  # noqa: S103 - the training image's user is not known; the run owns it

    def exists(self) -> bool:
        return self.results.is_dir()

    def worker_dir(self) -> Path:
        """:attr:`worker`, made when missing (only the worker may enter it)."""
        self.worker.mkdir(mode=0o700, parents=True, exist_ok=True)
        return self.worker

    def claim(self, training_id: str, owner: Mapping[str, Any]) -> None:
        """Make the workspace this task instance's, or refuse it when another task instance's holds it.

        Before a run's container exists, its training id is already listed (``wmltrain list``) while its
        data is staged here: a second task instance given that id (the bundled DAG triggered with it) must
        not share the data, the code or the results, nor remove them when it fails. The first to claim
        writes its owner (:data:`~airflow_wmltrain.runtime.labels.OWNER_LABELS`) into ``owner.json`` at
        the top of the workspace (no container mounts it; it is not uploaded), atomically (a full file
        linked into place, or nothing); a try of the same task instance finds itself there.

        :raises RunConflictError: (C105) the workspace belongs to another task instance.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / OWNER_FILE
        mine = {key: owner.get(key) for key in labels.OWNER_LABELS}
        draft = path.with_name(f".{OWNER_FILE}.{uuid.uuid4().hex}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(mine, file)
            os.link(draft, path)  # fails when an owner is already there
            return
        except FileExistsError:
            pass
        finally:
            draft.unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as file:
                found = json.loads(file.read(_OWNER_MAX_BYTES))
        except (OSError, ValueError) as err:
            raise RunConflictError(
                f"the workspace {self.root} of training run {training_id} has an owner file that cannot be "
                f"read ({err}); remove {path} if no task instance runs it"
            ) from None
        labels.check_owner(training_id, owner, found if isinstance(found, dict) else {}, "the workspace")

    def mounts(self) -> list[Mount]:
        """Bind mounts for the training container (the data read-only)."""
        paths = {
            "DATA_DIR": self.data,
            "RESULT_DIR": self.results,
            "MODEL_DIR": self.model,
            "LOG_DIR": self.logs,
            "CHECKPOINT_DIR": self.checkpoints,
        }
        return [
            Mount(CONTAINER_DIRS[name], str(path.resolve()), type="bind", read_only=name == "DATA_DIR")
            for name, path in paths.items()
        ]

    def remove(self, docker: APIClient | None = None, image: str = "") -> bool:
        """Delete the run's directories (the cache entries the data links to stay); whether they are gone.

        What the container's root user made for itself (a ``0700`` folder, its files) the worker may not
        delete: given the run's Docker host and image, a short-lived container of that image, as root,
        with only this run's directory mounted, deletes it (its entrypoint ``rm``; no network).
        """
        shutil.rmtree(self.root, ignore_errors=True)
        if not os.path.lexists(self.root):
            return True
        if docker is not None and image:
            try:
                _remove_as_root(docker, image, self.root)
            except (DockerException, RequestException, OSError) as err:
                logger.warning("Cannot remove %s through the Docker host: %s", self.root, err)
            shutil.rmtree(self.root, ignore_errors=True)
        return not os.path.lexists(self.root)


def _remove_as_root(docker: APIClient, image: str, root: Path) -> None:
    """Delete what is in ``root`` from a container of ``image``, as root, ``root`` its only mount."""
    inside = "/run-directory"
    names = sorted(os.listdir(root))
    if names:
        container = docker.create_container(
            image,
            entrypoint=["rm", "-rf", "--"],
            command=[f"{inside}/{name}" for name in names],
            user="0:0",
            network_disabled=True,
            labels={labels.ROLE: "workspace-removal"},
            host_config=docker.create_host_config(
                mounts=[Mount(inside, str(root.resolve()), type="bind")], network_mode="none"
            ),
        )
        try:
            docker.start(container["Id"])
            docker.wait(container["Id"], timeout=REMOVAL_TIMEOUT)
        finally:
            from airflow_wmltrain.hooks.docker import remove_container

            with contextlib.suppress(DockerException, RequestException):
                remove_container(docker, container["Id"])
