"""Names and labels of the containers this provider creates on a Docker host.

The Docker daemon is the source of truth about runs and GPUs: every container of ours carries
:data:`ROLE` and :data:`TRAINING_ID`; a run's container also carries :data:`GPUS` (the device ids it
was given).  Container names are unique per daemon, which makes them the host-wide mutexes: one run
container per training id (:func:`run_container_name`), one lease per GPU (:func:`gpu_lease_name`).
"""

from __future__ import annotations

import re

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
