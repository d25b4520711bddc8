"""The exceptions of the training-run contract, each carrying a code from the lifecycle (SPEC §3).

Every refusal of user input is one of these: a code (``C101`` ...), the path of the field or file at
fault, and a one-line message that says what was received and how to fix it.  Messages are built by
this package from field names and non-secret values only; a secret value never reaches ``str(exc)``.
"""

from __future__ import annotations


class WmlTrainError(Exception):
    """Base class of the package's errors.

    :param message: one line saying what is wrong and how to fix it (no secret values).
    :param field: the path of the field or the file at fault, e.g.
        ``model_definition.execution.resource``; prefixed to the message when given.
    :param problems: every problem found when there were several; ``message`` is the first one.
    """

    code = "S000"

    def __init__(self, message: str, *, field: str | None = None, problems: list[str] | None = None) -> None:
        self.message = " ".join(message.split())
        self.field = field
        text = f"{field}: {self.message}" if field else self.message
        self.problems = problems if problems is not None else [text]
        super().__init__(text)

    def to_dict(self) -> dict[str, object]:
        """A JSON-friendly form, for ``--json`` outputs and the run's status document."""
        return {"code": self.code, "field": self.field, "message": str(self), "problems": self.problems}


class ClientError(WmlTrainError):
    """A problem with what the user submitted (codes ``C1xx``/``C2xx``)."""

    code = "C100"


class ManifestError(ClientError):
    """The training manifest is invalid (``C101``)."""

    code = "C101"


class ModelDefinitionError(ClientError):
    """The model-definition archive is invalid (``C102``)."""

    code = "C102"


class CredentialsError(ManifestError):
    """Object-store credentials are missing, malformed or refused (``C103``)."""

    code = "C103"


class ResourceError(ManifestError):
    """The requested resources cannot be understood or given (``C104``)."""

    code = "C104"


class BucketNotFoundError(ManifestError):
    """A bucket named by the manifest does not exist, or these credentials cannot see it (``C101``)."""


class ConfigurationError(WmlTrainError):
    """The deployment's ``[wmltrain]`` configuration is invalid (server side, ``S001``)."""

    code = "S001"


class ServerError(WmlTrainError):
    """A problem on the service side (codes ``S1xx``/``S3xx``)."""

    code = "S100"


class DataLoadError(ServerError):
    """Staging the training data failed (``S302``): an object could not be fetched or verified."""

    code = "S302"


class ResultsStoreError(ServerError):
    """Writing results, logs or the status document failed (``S303``)."""

    code = "S303"


class TrainingFailedError(ClientError):
    """The training process exited with a non-zero status, or was killed (``C201``)."""

    code = "C201"


class GpuCapacityError(ServerError):
    """The Docker host has no free GPU for the run now, or no NVIDIA runtime at all (``S100``)."""

    code = "S100"


class ImageMissingError(ServerError):
    """The framework's container image is neither on the Docker host nor pullable (``S103``)."""

    code = "S103"


class RunHaltedError(WmlTrainError):
    """The run was halted (the task was marked failed or cleared, or ``wmltrain halt``)."""

    code = "C200"
