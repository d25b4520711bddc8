"""The error tree: each error's base, code, whether a retry may fix it, and the command line's exit status."""

from __future__ import annotations

import pytest

from airflow_wmltrain import errors
from airflow_wmltrain.errors import EXIT_BAD_INPUT, EXIT_RUN_FAILED, EXIT_SERVER_ERROR

TREE = [
    ("WmlTrainError", "Exception", "S000", True, EXIT_SERVER_ERROR),
    ("ClientError", "WmlTrainError", "C100", False, EXIT_BAD_INPUT),
    ("ManifestError", "ClientError", "C101", False, EXIT_BAD_INPUT),
    ("ModelDefinitionError", "ClientError", "C102", False, EXIT_BAD_INPUT),
    ("CredentialsError", "ManifestError", "C103", False, EXIT_BAD_INPUT),
    ("ResourceError", "ManifestError", "C104", False, EXIT_BAD_INPUT),
    ("BucketNotFoundError", "ManifestError", "C101", False, EXIT_BAD_INPUT),
    ("RunConflictError", "ClientError", "C105", False, EXIT_BAD_INPUT),
    ("TrainingFailedError", "ClientError", "C201", False, EXIT_RUN_FAILED),
    ("RunHaltedError", "WmlTrainError", "C200", False, EXIT_RUN_FAILED),
    ("ConfigurationError", "WmlTrainError", "S001", False, EXIT_SERVER_ERROR),
    ("ServerError", "WmlTrainError", "S100", True, EXIT_SERVER_ERROR),
    ("DataLoadError", "ServerError", "S302", True, EXIT_SERVER_ERROR),
    ("ResultsStoreError", "ServerError", "S303", True, EXIT_SERVER_ERROR),
    ("StatusDocumentError", "ServerError", "S304", False, EXIT_SERVER_ERROR),
    ("GpuCapacityError", "ServerError", "S100", True, EXIT_SERVER_ERROR),
    ("ImageMissingError", "ServerError", "S103", True, EXIT_SERVER_ERROR),
]


@pytest.mark.parametrize(("name", "base", "code", "retryable", "exit_status"), TREE, ids=[t[0] for t in TREE])
def test_each_error_declares_its_code_retry_and_exit_status(
    name: str, base: str, code: str, retryable: bool, exit_status: int
) -> None:
    error_class = getattr(errors, name)
    assert error_class.__bases__[0].__name__ == base
    assert (error_class.code, error_class.retryable, error_class.exit_status) == (
        code,
        retryable,
        exit_status,
    )
    error = error_class("what is wrong; how to fix it", field="a.field")
    assert errors.exit_status(error) == exit_status
    assert error.to_dict() == {
        "code": code,
        "field": "a.field",
        "message": "a.field: what is wrong; how to fix it",
        "problems": ["a.field: what is wrong; how to fix it"],
    }
    assert (error_class.__doc__ or "").strip()


def test_a_subclass_elsewhere_may_still_declare_its_code_as_an_attribute() -> None:
    class Elsewhere(errors.ServerError):
        code = "S999"

    class Declared(errors.ClientError, code="C999", exit_status=EXIT_RUN_FAILED):
        pass

    assert (Elsewhere.code, Elsewhere.retryable, Elsewhere.exit_status) == ("S999", True, EXIT_SERVER_ERROR)
    assert (Declared.code, Declared.retryable, Declared.exit_status) == ("C999", False, EXIT_RUN_FAILED)
    assert errors.ClientError.code == "C100"  # declaring a subclass changes nothing of its base
