"""The lifecycle of a training run (SPEC §3) and its status document, ``<training-id>/_status.json``.

States only move forward: ``QUEUED → PENDING → DOWNLOADING → PROCESSING → STORING → COMPLETED | FAILED
| HALTED`` (skipping is allowed; a failed or halted run still passes through ``STORING`` so its logs are
written).  :class:`RunStatus` is the document kept in the results bucket, rewritten at every transition:
the state history with timestamps, the error code and message of a failure, the image, the GPUs given,
and the metrics.  It is what ``TrainingRunSensor`` and ``wmltrain show`` read; it holds no secret.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from airflow_wmltrain.errors import StatusDocumentError

STATUS_FILE = "_status.json"
MANIFEST_FILE = "_manifest.yml"
SUBMITTED_CODE = "_submitted_code/model.zip"
TRAINING_LOG = "learner-1/training-log.txt"
LOAD_DATA_LOG = "learner-1/load-data.log"
#: Version of the status document's shape.
STATUS_VERSION = 1
#: The XCom key under which a task publishes its run's status document (``wmltrain list`` reads it).
STATUS_XCOM_KEY = "wmltrain_status"
#: The XCom key ``wmltrain_run_<training-id>``: finds a run's task by its id with one REST call.
RUN_XCOM_PREFIX = "wmltrain_run_"


def results_location(store_type: str, bucket: str, training_id: str) -> str:
    """Where a run's files are: ``s3://bucket/training-id/`` or ``swift://container/training-id/``."""
    return f"{store_type}://{bucket}/{training_id}/"


class RunState(str, Enum):
    """A training run's state, in lifecycle order."""

    QUEUED = "QUEUED"
    PENDING = "PENDING"
    DOWNLOADING = "DOWNLOADING"
    PROCESSING = "PROCESSING"
    STORING = "STORING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    HALTED = "HALTED"

    @property
    def terminal(self) -> bool:
        """Whether the run is over."""
        return self in TERMINAL_STATES

    @property
    def rank(self) -> int:
        """Position in the lifecycle; the terminal states share the last rank."""
        return min(_ORDER.index(self), _ORDER.index(RunState.COMPLETED))


_ORDER = list(RunState)
#: The fields of ``RunStatus.airflow`` that name the task instance a run belongs to.
OWNER_KEYS = ("dag_id", "run_id", "task_id", "map_index")
TERMINAL_STATES = frozenset({RunState.COMPLETED, RunState.FAILED, RunState.HALTED})


class TransitionError(ValueError):
    """A transition that would move a run backwards or out of a terminal state."""


def iso_time(moment: datetime) -> str:
    """A time as the status documents write it: UTC, ISO 8601 with milliseconds and a ``Z``."""
    utc = moment.astimezone(timezone.utc) if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso() -> str:
    """The current time, as :func:`iso_time` writes it."""
    return iso_time(datetime.now(timezone.utc))


def parse_time(text: str) -> datetime | None:
    """An ISO 8601 time (``Z`` or an offset; UTC when it has none), or ``None`` when it is not one."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Transition:
    """One entry of the state history.

    :param state: the state entered.
    :param at: when, ISO 8601 UTC.
    """

    state: RunState
    at: str

    def to_dict(self) -> dict[str, str]:
        return {"state": self.state.value, "at": self.at}


@dataclass(frozen=True)
class RunStatus:
    """The status document of one training run (immutable; transitions return a new one).

    :param training_id: the run's id.
    :param name: the manifest's ``model_definition.name``.
    :param history: every state entered, with its time.
    :param results_location: where the run's files are (``s3://bucket/training-id/`` ...).
    :param data_location: where its data comes from (a description without secrets).
    :param image: the framework's container image.
    :param command: the command the container runs (hyperparameters applied, no secret).
    :param gpus: the GPU ids given to the run (empty on CPU).
    :param error: ``{"code": ..., "message": ...}`` when the run failed or was halted.
    :param exit_code: the training process's exit status, once known.
    :param metrics: the run's metrics: the last value of each (``$RESULT_DIR/metrics.json`` wins at the end).
    :param steps: the metrics per step while the run trains, oldest first, each point
        ``{"step": 120, "loss": 0.31, ...}`` (numbers only; a bounded number of points).
    :param hyperparameters: the hyperparameters the run was given (``{"learningRate": 0.01}``).
    :param airflow: where it runs in Airflow (dag_id, run_id, task_id, map_index, try_number).
    :param container: the Docker container's id and host (``docker_url``): a retry goes back there.
    :param digest: a digest of the submission (zip, manifest, hyperparameters): a cleared task reuses a
        COMPLETED run only for the same submission.
    :param phase: what the run is doing within its state when that is worth saying, e.g. waiting for
        GPUs and who holds them (empty otherwise).
    """

    training_id: str
    name: str = ""
    history: tuple[Transition, ...] = ()
    results_location: str = ""
    data_location: str = ""
    image: str = ""
    command: str = ""
    gpus: tuple[str, ...] = ()
    error: Mapping[str, str] | None = None
    exit_code: int | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    steps: tuple[Mapping[str, float], ...] = ()
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    airflow: Mapping[str, Any] = field(default_factory=dict)
    container: Mapping[str, str] = field(default_factory=dict)
    digest: str = ""
    phase: str = ""

    @property
    def state(self) -> RunState:
        """The current state (``QUEUED`` before any transition)."""
        return self.history[-1].state if self.history else RunState.QUEUED

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def entered(self, state: RunState) -> str | None:
        """When the run entered ``state`` (``None`` if it did not)."""
        return next((t.at for t in self.history if t.state is state), None)

    def advance(self, state: RunState, *, at: str | None = None, **changes: Any) -> RunStatus:
        """The document after entering ``state`` (and applying ``changes`` to other fields).

        Entering the current state again only applies the changes.

        :raises TransitionError: the run is over, or ``state`` comes before the current one.
        """
        current = self.state
        if state is current and self.history:
            return replace(self, **changes) if changes else self
        if current.terminal:
            raise TransitionError(
                f"run {self.training_id} is {current.value}; it cannot become {state.value}"
            )
        if self.history and state.rank < current.rank:
            raise TransitionError(
                f"run {self.training_id} is {current.value}; states only move forward, not to {state.value}"
            )
        return replace(self, history=(*self.history, Transition(state, at or now_iso())), **changes)

    def fail(self, state: RunState, code: str, message: str, **changes: Any) -> RunStatus:
        """The document after the run ended ``FAILED`` or ``HALTED`` with an error code and message."""
        if state not in (RunState.FAILED, RunState.HALTED):
            raise ValueError(f"{state.value} is not a failure state")
        return self.advance(state, error={"code": code, "message": message}, **changes)

    def same_task(self, airflow: Mapping[str, Any]) -> bool:
        """Whether this run belongs to the task instance ``airflow`` (dag, run, task, map index)."""
        return all(str(self.airflow.get(key)) == str(airflow.get(key)) for key in OWNER_KEYS)

    def result(self) -> dict[str, Any]:
        """What a task returns for the run (its XCom): small and JSON — the one result shape."""
        return {
            "training_id": self.training_id,
            "state": self.state.value,
            "results_location": self.results_location,
            "gpus": list(self.gpus),
            "metrics": dict(self.metrics),
            "hyperparameters": dict(self.hyperparameters),
        }

    def failure_message(self) -> str:
        """``training-abc FAILED: C201 the training process exited with status 3 ...``."""
        error = self.error or {}
        code = str(error.get("code") or "")
        message = str(error.get("message") or "no reason was recorded")
        head = f"{self.training_id} {self.state.value}"
        return f"{head}: {code} {message}" if code else f"{head}: {message}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (``_status.json``)."""
        return {
            "version": STATUS_VERSION,
            "training_id": self.training_id,
            "name": self.name,
            "state": self.state.value,
            "submitted_at": self.history[0].at if self.history else None,
            "updated_at": self.history[-1].at if self.history else None,
            "history": [t.to_dict() for t in self.history],
            "results_location": self.results_location,
            "data_location": self.data_location,
            "image": self.image,
            "command": self.command,
            "gpus": list(self.gpus),
            "error": dict(self.error) if self.error else None,
            "exit_code": self.exit_code,
            "metrics": dict(self.metrics),
            "steps": [dict(point) for point in self.steps],
            "hyperparameters": dict(self.hyperparameters),
            "airflow": dict(self.airflow),
            "container": dict(self.container),
            "digest": self.digest,
            "phase": self.phase,
            "written_at": time.time(),
        }

    @classmethod
    def from_json(cls, body: bytes, *, where: str, training_id: str) -> RunStatus:
        """Read the bytes of ``_status.json`` (the one reader of status documents).

        :param body: the document.
        :param where: where it was read, for messages.
        :param training_id: the run it must belong to.
        :raises StatusDocumentError: not JSON, not a status document, or another run's.
        """
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise StatusDocumentError(
                f"{where} is not JSON ({exc}); it is not a training-run status document"
            ) from None
        if not isinstance(document, Mapping):
            raise StatusDocumentError(f"{where} is JSON but not an object; it is not a status document")
        try:
            status = cls.from_dict(document)
        except ValueError as exc:
            raise StatusDocumentError(f"{where}: {exc}") from None
        if status.training_id != training_id:
            raise StatusDocumentError(f"{where} is the status of {status.training_id}, not of {training_id}")
        return status

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> RunStatus:
        """Read a status document back.

        :raises ValueError: the document is not a status document.
        """
        try:
            history = tuple(
                Transition(RunState(item["state"]), str(item["at"])) for item in document.get("history", [])
            )
            error = document.get("error")
            return cls(
                training_id=str(document["training_id"]),
                name=str(document.get("name") or ""),
                history=history,
                results_location=str(document.get("results_location") or ""),
                data_location=str(document.get("data_location") or ""),
                image=str(document.get("image") or ""),
                command=str(document.get("command") or ""),
                gpus=tuple(str(g) for g in document.get("gpus") or ()),
                error={str(k): str(v) for k, v in error.items()} if isinstance(error, Mapping) else None,
                exit_code=document.get("exit_code"),
                metrics=dict(document.get("metrics") or {}),
                steps=tuple(
                    dict(point) for point in document.get("steps") or () if isinstance(point, Mapping)
                ),
                hyperparameters=dict(document.get("hyperparameters") or {}),
                airflow=dict(document.get("airflow") or {}),
                container={str(k): str(v) for k, v in (document.get("container") or {}).items()},
                digest=str(document.get("digest") or ""),
                phase=str(document.get("phase") or ""),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a training-run status document: {exc}") from None
