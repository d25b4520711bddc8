"""Training ids: ``training-`` and a short id, stable across the retries of one Airflow task instance.

A run started by a ``TrainingRunOperator`` task gets an id derived from where it runs (dag id, run id,
task id, map index), so a retry of the same task instance finds the container and the results of its
earlier try instead of starting a second run.  Ids are valid Airflow run ids (the bundled training DAG
uses the training id as its run id), container names and object-key folders.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

from airflow_wmltrain.errors import ManifestError

PREFIX = "training-"
PATTERN = re.compile(r"^training-[A-Za-z0-9_-]{1,64}$")
_LENGTH = 12


def _short(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")[:_LENGTH]


def derive_training_id(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """The training id of one task instance (the same for every try of it)."""
    key = "\x1f".join((dag_id, run_id, task_id, str(map_index))).encode()
    return PREFIX + _short(hashlib.sha256(key).digest())


def new_training_id() -> str:
    """A fresh random training id, e.g. ``training-DOl4q2LkR7xQ``."""
    return PREFIX + _short(secrets.token_bytes(12))


def check_training_id(value: str, *, field: str = "training_id") -> str:
    """Return ``value`` when it is a valid training id.

    :raises ManifestError: it is not ``training-`` followed by 1 to 64 of ``A-Z a-z 0-9 _ -``.
    """
    if not isinstance(value, str) or not PATTERN.match(value):
        raise ManifestError(
            f"{value!r} is not a training id; write 'training-' followed by 1 to 64 letters, digits, "
            "'_' or '-' (e.g. training-DOl4q2LkR), or leave it empty to derive one from the task",
            field=field,
        )
    return value
