"""A training submission: a model-definition zip and a manifest, checked together.

This is the one place that decides whether a submission is acceptable, before anything is queued or
written: the manifest (C101/C103/C104), the zip (C102), and that the scripts the command runs are in the
zip (C102).  ``wmltrain validate`` prints :meth:`Submission.summary`; the operator and ``wmltrain train``
use the same check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_wmltrain.command import (
    COMMAND_FIELD,
    HyperparameterValue,
    apply_hyperparameters,
    referenced_scripts,
    validate_hyperparameters,
)
from airflow_wmltrain.frameworks import FrameworkRegistry
from airflow_wmltrain.manifest import ConnectionId, StoreReference, TrainingManifest, load_manifest
from airflow_wmltrain.model_definition import ModelDefinition
from airflow_wmltrain.settings import Settings


@dataclass(frozen=True)
class Submission:
    """A valid submission.

    :param manifest: the normalised manifest.
    :param model_definition: the checked zip.
    :param hyperparameters: the overrides applied to the command.
    """

    manifest: TrainingManifest
    model_definition: ModelDefinition
    hyperparameters: Mapping[str, HyperparameterValue] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The command with the hyperparameters applied (``${DATA_DIR}`` still unsubstituted)."""
        return apply_hyperparameters(self.manifest.command, self.hyperparameters)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description with no secret in it."""
        m = self.manifest
        return {
            "valid": True,
            "name": m.name,
            "description": m.description,
            "framework": {
                "name": m.framework.name,
                "version": m.framework.version,
                "image": m.framework.image,
            },
            "resource": m.resource,
            "gpus": m.gpus,
            "command": self.command,
            "hyperparameters": dict(self.hyperparameters),
            "data": _store_summary(m.data),
            "results": _store_summary(m.results),
            "model_definition": {
                "name": self.model_definition.name,
                "files": len(self.model_definition.files),
                "uncompressed_bytes": self.model_definition.uncompressed_bytes,
                "sha256": self.model_definition.sha256,
            },
        }


def _store_summary(ref: StoreReference) -> dict[str, Any]:
    conn = ref.connection
    return {
        "type": ref.type,
        "type_as_written": ref.type_as_written,
        "bucket": ref.bucket,
        "prefix": ref.prefix,
        "credentials": f"airflow connection {conn.conn_id}" if isinstance(conn, ConnectionId) else "inline",
        "location": ref.describe(),
    }


def check_submission(
    model_definition: str | os.PathLike[str] | bytes | ModelDefinition,
    manifest: str | os.PathLike[str] | Mapping[str, Any] | TrainingManifest,
    *,
    hyperparameters: Mapping[str, object] | None = None,
    settings: Settings | None = None,
    registry: FrameworkRegistry | None = None,
) -> Submission:
    """Check a model definition and a manifest together.

    :param model_definition: path or bytes of the zip (or an already loaded one).
    :param manifest: path, YAML text or mapping (or an already loaded one).
    :param hyperparameters: overrides for the command.
    :param settings: the ``[wmltrain]`` settings; defaults when omitted.
    :param registry: the framework registry; built from ``settings`` when omitted.
    :raises WmlTrainError: the first problem found (manifest, then hyperparameters, then zip).
    """
    settings = settings or Settings()
    if not isinstance(manifest, TrainingManifest):
        manifest = load_manifest(manifest, settings=settings, registry=registry)
    overrides = validate_hyperparameters(hyperparameters)
    if not isinstance(model_definition, ModelDefinition):
        model_definition = ModelDefinition.load(model_definition, settings=settings)
    command = apply_hyperparameters(manifest.command, overrides)
    model_definition.require_files(referenced_scripts(command), field=COMMAND_FIELD)
    return Submission(manifest=manifest, model_definition=model_definition, hyperparameters=overrides)
