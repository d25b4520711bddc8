"""The package's one error tree, each error carrying a code from the lifecycle (SPEC §3).

Every refusal of user input is one of these: a code (``C101`` ...), the path of the field or file at
fault, and a one-line message that says what was received and how to fix it.  Messages are built by
this package from field names and non-secret values only; a secret value never reaches ``str(exc)``.

Two questions every caller asks of an error are answered here, once:

* **Can a retry fix it?** :attr:`WmlTrainError.retryable`.  Client errors (bad manifest, bad zip,
  unknown connection, a training process that failed, a halt) cannot: the operator turns them into
  ``AirflowFailException`` so that Airflow's ``retries`` do not re-run input that can never pass.  Server
  errors (no GPU now, an object store that did not answer) can.
* **What does the command line exit with?** :func:`exit_status` (``0`` ok, ``1`` the run failed, ``2``
  bad input or usage, ``3`` server or configuration error).

The transfer errors of the storage layer, the REST API client's errors and the status-document errors
are part of this tree (``storage/transfer.py``, ``service/api.py``, ``lifecycle.py``).
"""

from __future__ import annotations

#: Exit statuses of the ``wmltrain`` command line.
EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_SERVER_ERROR = 3
EXIT_INTERRUPTED = 130


class WmlTrainError(Exception):
    """Base class of the package's errors.

    A subclass declares what differs from its base in its header, e.g.
    ``class ManifestError(ClientError, code="C101")``: ``code``, ``retryable``, ``exit_status``.

    :param message: one line saying what is wrong and how to fix it (no secret values).
    :param field: the path of the field or the file at fault, e.g.
        ``model_definition.execution.resource``; prefixed to the message when given.
    :param problems: every problem found when there were several; ``message`` is the first one.
    """

    code = "S000"
    #: Whether trying the same thing again may succeed (server-side trouble) or never can (bad input).
    retryable = True
    #: What the command line exits with for this error.
    exit_status = EXIT_SERVER_ERROR

    def __init_subclass__(
        cls, *, code: str | None = None, retryable: bool | None = None, exit_status: int | None = None
    ) -> None:
        super().__init_subclass__()
        if code is not None:
            cls.code = code
        if retryable is not None:
            cls.retryable = retryable
        if exit_status is not None:
            cls.exit_status = exit_status

    def __init__(self, message: str, *, field: str | None = None, problems: list[str] | None = None) -> None:
        self.message = " ".join(message.split())
        self.field = field
        text = f"{field}: {self.message}" if field else self.message
        self.problems = problems if problems is not None else [text]
        super().__init__(text)

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly form, for ``--json`` outputs and the run's status document."""
        return {"code": self.code, "field": self.field, "message": str(self), "problems": self.problems}


# What the user submitted: a retry cannot fix it, the input must change.


class ClientError(WmlTrainError, code="C100", retryable=False, exit_status=EXIT_BAD_INPUT):
    """A problem with what the user submitted (codes ``C1xx``/``C2xx``): a retry cannot fix it."""


class ManifestError(ClientError, code="C101"):
    """The training manifest is invalid (``C101``): correct the field the message names."""


class ModelDefinitionError(ClientError, code="C102"):
    """The model-definition archive is invalid (``C102``).

    Give a ``.zip`` of the training code (``cd my-model && zip -r ../model.zip .``); the message says
    what was received instead, or which limit the archive passes.
    """


class CredentialsError(ManifestError, code="C103"):
    """Object-store credentials are missing, malformed or refused (``C103``).

    Give the manifest's bucket valid credentials or an Airflow connection id that holds them.
    """


class ResourceError(ManifestError, code="C104"):
    """The requested resources cannot be understood or given (``C104``): name one of the resource
    classes of ``[wmltrain] resource_classes``."""


class BucketNotFoundError(ManifestError):
    """A bucket named by the manifest does not exist, or these credentials cannot see it (``C101``).

    Create the bucket, correct its name, or give credentials that may read (or write) it.
    """


class RunConflictError(ClientError, code="C105"):
    """The training id is already used by another task instance (its status or its container) (``C105``).

    A retry cannot fix it: give this run another training id.
    """


class TrainingFailedError(ClientError, code="C201", exit_status=EXIT_RUN_FAILED):
    """The training process exited with a non-zero status, or was killed (``C201``).

    Read the run's log (``wmltrain logs``) and fix the training code or its command.
    """


class RunHaltedError(WmlTrainError, code="C200", retryable=False, exit_status=EXIT_RUN_FAILED):
    """The run was halted (its task was marked failed by a person, ``wmltrain halt``, or a deadline).

    No retry runs it again: submit it anew (``wmltrain train``) if it should still train.
    """


# The deployment: a retry may help (capacity, an object store's outage) or not (the configuration).


class ConfigurationError(WmlTrainError, code="S001", retryable=False):
    """The deployment's ``[wmltrain]`` configuration is invalid (server side, ``S001``), or the command
    line's API server settings are: correct the setting the message names."""


class ServerError(WmlTrainError, code="S100"):
    """A problem on the service side (codes ``S1xx``/``S3xx``): trying again later may succeed."""


class DataLoadError(ServerError, code="S302"):
    """Staging the training data failed (``S302``): an object could not be fetched or verified.

    Try again; if it goes on failing, check that the data bucket's objects can be read.
    """


class ResultsStoreError(ServerError, code="S303"):
    """Writing results, logs or the status document failed (``S303``): check that the results bucket can
    be written, then try again."""


class StatusDocumentError(ServerError, code="S304", retryable=False):
    """A run's ``_status.json`` exists but is not its status document (not JSON, wrong shape, other id).

    A retry cannot fix it: the document must be removed or the training id changed.
    """


class GpuCapacityError(ServerError, code="S100"):
    """The Docker host has no free GPU for the run now, or no NVIDIA runtime at all (``S100``).

    Try again later, ask for a smaller resource class, or raise ``[wmltrain] gpu_wait_timeout``.
    """


class ImageMissingError(ServerError, code="S103"):
    """The framework's container image is neither on the Docker host nor pullable (``S103``): pull or
    build it on the host, or correct the framework registry's image name."""


def exit_status(error: BaseException) -> int:
    """The command line's exit status for an error (the one place that maps errors to exit codes)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, WmlTrainError):
        return error.exit_status
    return EXIT_SERVER_ERROR
