"""Airflow assets and OpenLineage datasets of training runs: what a completed run announces.

A run's results are at its results location, ``s3://bucket/training-id/`` or
``swift://container/training-id/`` (:func:`~airflow_wmltrain.lifecycle.results_location`).  A DAG that
evaluates or deploys new models is scheduled on them in one of two ways, chosen by what the training
task declares in its ``outlets``:

* ``outlets=[AssetAlias("mnist-models")]``: each completed run emits an event for the asset of its
  own results location (``s3://bucket/training-id``, created on the fly) through the alias; a DAG with
  ``schedule=[AssetAlias("mnist-models")]`` runs for each.
* ``outlets=[results_asset("s3://bucket/")]``: an asset the DAG's author declares, which contains the
  results locations (the results bucket, or a folder of it); a DAG with the same asset in its
  ``schedule`` runs for each completed run.  Airflow matches an event to a schedule by the asset's URI
  exactly, so both DAGs name the same asset.

Either way the event's ``extra`` is :func:`results_event_extra`: the training id, the results location
and the run's final metrics; a failed, halted or skipped run emits nothing.  An outlet asset that does
not contain the run's results location gets Airflow's plain event (no ``extra``) and a warning in the
task log.

The provider registers the ``swift`` scheme (``asset-uris`` in the provider info) with
:func:`sanitize_uri`, :func:`create_asset` and :func:`convert_asset_to_openlineage`, as the amazon
provider does for ``s3``.  :func:`openlineage_facets` is what ``TrainingRunOperator`` reports to
OpenLineage: the data bucket (input) and the results location (output); nothing when the openlineage
provider is not installed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import SplitResult, unquote, urlsplit

from airflow.sdk import Asset, AssetAlias

from airflow_wmltrain.lifecycle import results_location
from airflow_wmltrain.manifest import bucket_name_problem

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_wmltrain.manifest import StoreReference
    from airflow_wmltrain.runtime.run import TrainingRun

__all__ = [
    "convert_asset_to_openlineage",
    "create_asset",
    "emit_results_event",
    "lineage_datasets",
    "openlineage_facets",
    "results_asset",
    "results_event_extra",
    "sanitize_uri",
]

#: The store types whose locations are assets: a manifest's ``type`` after normalisation.
SCHEMES = ("s3", "swift")


# --- the swift:// scheme, registered under asset-uris ---------------------------------------------------


def sanitize_uri(uri: SplitResult) -> SplitResult:
    """Check a ``swift://container/path`` asset URI (Airflow has already normalised it).

    :raises ValueError: no container, or a name Swift refuses, named with the rule.
    """
    problem = bucket_name_problem("swift", unquote(uri.netloc))
    if problem:
        raise ValueError(f"asset URI swift://{uri.netloc}{uri.path}: {problem} (swift://container/path)")
    return uri


def create_asset(*, container: str, key: str = "", extra: dict[str, Any] | None = None) -> Asset:
    """The asset of an object or folder ``key`` of a Swift container (the provider's asset factory)."""
    return Asset(uri=f"swift://{container}/{key}", extra=extra)


def _parts(uri: str) -> tuple[str, str]:
    """``(scheme://bucket, path)`` of a location, the path without its slashes at either end."""
    parts = urlsplit(uri)
    return f"{parts.scheme.lower()}://{parts.netloc}", parts.path.strip("/")


def _dataset(location: str) -> tuple[str, str]:
    """OpenLineage ``(namespace, name)`` of a location: ``("s3://bucket", "training-id")``, name ``/`` for a
    whole bucket (what the amazon provider's converter makes of an ``s3`` asset)."""
    namespace, path = _parts(location)
    return namespace, path or "/"


def convert_asset_to_openlineage(asset: Asset, lineage_context: Any) -> Any:
    """Translate a ``swift://`` asset to an OpenLineage dataset (the provider's converter)."""
    from airflow.providers.common.compat.openlineage.facet import Dataset

    namespace, name = _dataset(asset.uri)
    return Dataset(namespace=namespace, name=name)


# --- what a DAG author declares ------------------------------------------------------------------------


def results_asset(location: str, *, name: str | None = None) -> Asset:
    """The asset a training task lists in ``outlets`` and a downstream DAG in ``schedule``.

    :param location: the results bucket (``s3://results-bucket/``) or a folder of it that contains the
        results locations of the task's runs (``swift://container/`` ...).
    :param name: the asset's name; its URI when omitted.
    :raises ValueError: not an ``s3://`` or ``swift://`` location, or a bucket name the store refuses.
    """
    parts = urlsplit(location)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or parts.query or parts.fragment:
        raise ValueError(
            f"results_asset({location!r}): a results location is s3://bucket/[folder/] or "
            "swift://container/[folder/] (the manifest's training_results_reference)"
        )
    problem = bucket_name_problem("s3" if scheme == "s3" else "swift", unquote(parts.netloc))
    if problem:
        raise ValueError(f"results_asset({location!r}): {problem}")
    return _asset(location, name)


def _asset(uri: str, name: str | None = None) -> Asset:
    """An asset named by its normalised URI unless named: ``s3://b`` and ``s3://b/`` are one asset."""
    normalised = Asset(uri=uri).uri
    return Asset(uri=normalised, name=name or normalised)


def _contains(asset_uri: str, location: str) -> bool:
    """Whether the asset ``asset_uri`` is ``location`` or a folder of it."""
    (asset_root, asset_path), (root, path) = _parts(asset_uri), _parts(location)
    return asset_root == root and (not asset_path or path == asset_path or path.startswith(asset_path + "/"))


def _json_scalar(value: Any) -> Any:
    """A metric as an event's ``extra`` can hold it: NaN and infinities (which JSON has not) are ``None``."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def results_event_extra(result: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extra`` of a completed run's asset event, from the task's result (its XCom)."""
    metrics = cast("Mapping[str, Any]", result.get("metrics") or {})
    return {
        "training_id": result["training_id"],
        "results_location": result["results_location"],
        "metrics": {str(key): _json_scalar(value) for key, value in metrics.items()},
    }


def emit_results_event(
    outlets: Iterable[object], context: Context, result: dict[str, Any], log: logging.Logger | Any
) -> dict[str, Any]:
    """Announce a completed run to the task's outlets (see the module's docstring); return ``result``.

    :param outlets: the task's ``outlets``.
    :param context: the task's context; its ``outlet_events`` receive the events.
    :param result: the completed run's result (``RunStatus.result()``).
    :param log: the task's logger.
    """
    outlets = list(outlets)
    if not outlets:
        return result
    location = str(result["results_location"])
    extra = results_event_extra(result)
    events = context["outlet_events"]
    for outlet in outlets:
        if isinstance(outlet, AssetAlias):
            events[outlet].add(_asset(location), extra=extra)
        elif isinstance(outlet, Asset) and _contains(outlet.uri, location):
            events[outlet].extra.update(extra)
        elif isinstance(outlet, Asset):
            log.warning(
                "Outlet asset %s does not contain the results location %s: its event carries no training "
                "id (list the results bucket, e.g. results_asset(%r), or an AssetAlias)",
                outlet.uri,
                location,
                _parts(location)[0] + "/",
            )
    return result


# --- OpenLineage ---------------------------------------------------------------------------------------


def lineage_datasets(
    data: StoreReference, results: StoreReference, training_id: str
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """OpenLineage ``(namespace, name)`` of a run's inputs (the data bucket, or its prefix) and outputs
    (its results location), named as the ``s3`` and ``swift`` asset converters name them."""
    data_location = f"{data.type}://{data.bucket}/{data.prefix}"
    return [_dataset(data_location)], [_dataset(results_location(results.type, results.bucket, training_id))]


def openlineage_facets(run: TrainingRun | None) -> Any:
    """The ``OperatorLineage`` of a run (see :func:`lineage_datasets`), as the amazon provider's
    ``SageMakerTrainingOperator`` reports its job's; ``None`` without the openlineage provider or a run."""
    if run is None:
        return None
    try:
        from airflow.providers.openlineage.extractors import (  # type: ignore[import-not-found,unused-ignore]
            OperatorLineage,
        )
    except ImportError:
        return None
    from airflow.providers.common.compat.openlineage.facet import Dataset

    inputs, outputs = lineage_datasets(run.manifest.data, run.manifest.results, run.training_id)
    return OperatorLineage(
        inputs=[Dataset(namespace=namespace, name=name) for namespace, name in inputs],
        outputs=[Dataset(namespace=namespace, name=name) for namespace, name in outputs],
    )
