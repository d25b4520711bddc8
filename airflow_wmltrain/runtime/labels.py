"""Names and labels of the containers this provider creates on a Docker host.

The Docker daemon is the source of truth about runs and GPUs: every container of ours carries
:data:`ROLE` and :data:`TRAINING_ID`; a run's container also carries :data:`GPUS` (the device ids it
was given).  Container names are unique per daemon, which makes them the host-wide mutexes: one run
container per training id (:func:`run_container_name`), one lease per GPU (:func:`gpu_lease_name`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from airflow_wmltrain.errors import RunConflictError

PREFIX = "wmltrain"

#: ``run`` (a training container) or ``gpu-lease`` (a created, never started, GPU mutex).
ROLE = "wmltrain.role"
ROLE_RUN = "run"
ROLE_GPU_LEASE = "gpu-lease"
#: A short-lived container that probes the host's NVIDIA runtime or lists its GPUs (removed after).
ROLE_GPU_PROBE = "gpu-probe"
#: The training id the container belongs to.
TRAINING_ID = "wmltrain.training-id"
#: Comma-separated GPU ids given to the run (empty for a CPU run); on a lease, the one GPU it guards.
GPUS = "wmltrain.gpus"
#: Where the run came from, for people looking at ``docker ps``.
DAG_ID = "wmltrain.dag-id"
RUN_ID = "wmltrain.run-id"
TASK_ID = "wmltrain.task-id"
MAP_INDEX = "wmltrain.map-index"
#: The task instance that owns a run's container: only a try of that task instance re-attaches to it.
OWNER_LABELS = {"dag_id": DAG_ID, "run_id": RUN_ID, "task_id": TASK_ID, "map_index": MAP_INDEX}
#: Daemon label (``dockerd --label wmltrain.gpus=0,1,2,3``) naming the GPUs a host offers to runs.
DAEMON_GPUS = "wmltrain.gpus"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def run_container_name(training_id: str) -> str:
    """The one container a training id may have on a daemon."""
    return f"{PREFIX}-{_UNSAFE.sub('_', training_id)}"


def gpu_lease_name(gpu_id: str) -> str:
    """The lease container guarding one GPU of a daemon."""
    return f"{PREFIX}-gpu-lease-{_UNSAFE.sub('_', gpu_id)}"


def check_owner(training_id: str, owner: Mapping[str, Any], found: Mapping[str, Any], what: str) -> None:
    """Refuse a training id that another task instance's run already uses: a run (its container, its
    status document) is only ever re-attached to, halted or stored by a try of the task instance that
    owns it.

    :param owner: this task instance (:data:`OWNER_LABELS`' keys: dag, run, task, map index).
    :param found: the owner that the container's labels or the status document record.
    :param what: what was found, for the message (``the container``, ``the run``).
    :raises RunConflictError: (C105, not retryable) naming the owner.
    """
    mine = {key: str(owner.get(key, "")) for key in OWNER_LABELS}
    theirs = {key: str(found.get(key, "")) for key in OWNER_LABELS}
    if mine != theirs:
        raise RunConflictError(
            f"training id {training_id} is already used by {what} of task {theirs['dag_id']}/"
            f"{theirs['run_id']}/{theirs['task_id']}[{theirs['map_index']}]; give this task another "
            "training_id (or leave it empty: a unique one is derived)"
        )
