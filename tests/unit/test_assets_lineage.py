"""Issue 11 item 6: a completed run's asset event, the ``swift://`` asset scheme, the provider info's
entries and the OpenLineage datasets of ``TrainingRunOperator`` (no service needed)."""

from __future__ import annotations

import functools
import importlib
import json
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from airflow.sdk import Asset, AssetAlias
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException, TaskDeferred
from airflow.sdk.execution_time.context import OutletEventAccessors

from airflow_wmltrain import assets
from airflow_wmltrain.get_provider_info import get_provider_info
from airflow_wmltrain.links.training_run import TrainingResultsLink
from airflow_wmltrain.manifest import load_manifest
from airflow_wmltrain.operators.training_run import TrainingRunOperator
from airflow_wmltrain.settings import Settings
from airflow_wmltrain.training_id import derive_training_id
from tests.unit.conftest import DATA_BUCKET, IMAGE, RESULTS_BUCKET, FakeTi, manifest_doc
from tests.unit.fakes import FakeDocker, RunScript


def import_string(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


# --- the swift:// scheme -------------------------------------------------------------------------------


def test_swift_sanitizer_keeps_a_container_uri() -> None:
    parts = urlsplit("swift://models/mnist")
    assert assets.sanitize_uri(parts) == parts


@pytest.mark.parametrize(
    ("uri", "rule"),
    [("swift:///mnist", "must not be empty"), ("swift://" + "c" * 257 + "/x", "at most 256 bytes")],
)
def test_swift_sanitizer_refuses_a_uri_without_a_valid_container(uri: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        assets.sanitize_uri(urlsplit(uri))


def test_airflow_uses_the_swift_sanitizer_for_swift_assets() -> None:
    """Registered under asset-uris: Airflow itself refuses a swift asset without a container."""
    assert Asset("swift://models/mnist/").uri == "swift://models/mnist"
    with pytest.raises(ValueError, match="container name must not be empty"):
        Asset("swift:///mnist")


def test_swift_asset_factory_and_openlineage_converter(monkeypatch: pytest.MonkeyPatch) -> None:
    asset = assets.create_asset(container="models", key="training-1/", extra={"a": 1})
    assert (asset.uri, asset.extra) == ("swift://models/training-1", {"a": 1})
    fake_dataset = _fake_openlineage(monkeypatch)
    assert assets.convert_asset_to_openlineage(asset, None) == fake_dataset("swift://models", "training-1")
    assert assets.convert_asset_to_openlineage(Asset("swift://models"), None) == fake_dataset(
        "swift://models", "/"
    )


# --- the provider info ---------------------------------------------------------------------------------


def test_provider_info_is_valid_for_airflows_schema() -> None:
    import jsonschema
    from airflow import providers_manager

    schema = json.loads((Path(providers_manager.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_provider_info_registers_the_swift_scheme_with_importable_functions() -> None:
    [entry] = get_provider_info()["asset-uris"]
    assert entry["schemes"] == ["swift"]
    assert import_string(entry["handler"]) is assets.sanitize_uri
    assert import_string(entry["factory"]) is assets.create_asset
    assert import_string(entry["to_openlineage_converter"]) is assets.convert_asset_to_openlineage


def test_provider_info_lists_the_operator_hooks_sensors_triggers_and_links() -> None:
    info = get_provider_info()
    modules = {
        kind: [m for item in info[kind] for m in item["python-modules"]]
        for kind in ("operators", "hooks", "sensors", "triggers")
    }
    assert modules == {
        "operators": ["airflow_wmltrain.operators.training_run", "airflow_wmltrain.operators.best_run"],
        "hooks": ["airflow_wmltrain.hooks.swift", "airflow_wmltrain.hooks.docker"],
        "sensors": ["airflow_wmltrain.sensors.training_run"],
        "triggers": ["airflow_wmltrain.triggers.training_run"],
    }
    for module in (m for listed in modules.values() for m in listed):
        importlib.import_module(module)
    [link] = info["extra-links"]
    assert import_string(link) is TrainingResultsLink


# --- results_asset -------------------------------------------------------------------------------------


def test_results_asset_is_one_asset_with_or_without_the_trailing_slash() -> None:
    assert results_key("s3://unit-results/") == results_key("s3://unit-results")
    assert assets.results_asset("swift://models/mnist/").uri == "swift://models/mnist"


def results_key(location: str) -> tuple[str, str]:
    asset = assets.results_asset(location)
    return asset.name, asset.uri


@pytest.mark.parametrize(
    ("location", "says"),
    [
        ("http://example.com/x", "s3://bucket/"),
        ("s3://Bad_Bucket/", "S3 bucket name is 3 to 63"),
        ("swift:///x", "must not be empty"),
        ("s3://unit-results/?x=1", "s3://bucket/"),
    ],
)
def test_results_asset_refuses_what_is_not_a_results_location(location: str, says: str) -> None:
    with pytest.raises(ValueError, match=rf"results_asset\(.*{says}"):
        assets.results_asset(location)


def test_event_extra_holds_id_location_and_json_metrics() -> None:
    result = {"training_id": "t-1", "results_location": "s3://b/t-1/", "gpus": ["0"], "state": "COMPLETED"}
    metrics = {"accuracy": 0.9, "loss": math.nan, "best": math.inf, "note": "ok"}
    assert assets.results_event_extra({**result, "metrics": metrics}) == {
        "training_id": "t-1",
        "results_location": "s3://b/t-1/",
        "metrics": {"accuracy": 0.9, "loss": None, "best": None, "note": "ok"},
    }


# --- the operator: the asset event on completion -------------------------------------------------------

COMMAND = "sh train.sh"
ALIAS = AssetAlias("unit-models")
BUCKET_ASSET = assets.results_asset(f"s3://{RESULTS_BUCKET}/")
OTHER_ASSET = Asset("s3://elsewhere/models")


@pytest.fixture
def make_op(make_op: Callable[..., TrainingRunOperator]) -> Callable[..., TrainingRunOperator]:
    """The operator of tests/unit/conftest.py, with this module's outlets."""
    return functools.partial(
        make_op, manifest=manifest_doc(command=COMMAND), outlets=[ALIAS, BUCKET_ASSET, OTHER_ASSET]
    )


def run_context(ti: FakeTi) -> Any:
    return {"ti": ti, "task_instance": ti, "outlet_events": OutletEventAccessors()}


def training_id_of(ti: FakeTi) -> str:
    return derive_training_id(ti.dag_id, ti.run_id, ti.task_id, ti.map_index)


def assert_announced(events: OutletEventAccessors, ti: FakeTi, metrics: dict[str, Any]) -> None:
    tid = training_id_of(ti)
    extra = {"training_id": tid, "results_location": f"s3://{RESULTS_BUCKET}/{tid}/", "metrics": metrics}
    [alias_event] = events[ALIAS].asset_alias_events
    assert alias_event.source_alias_name == "unit-models"
    assert alias_event.dest_asset_key.uri == f"s3://{RESULTS_BUCKET}/{tid}"
    assert alias_event.dest_asset_key.name == f"s3://{RESULTS_BUCKET}/{tid}"
    assert alias_event.extra == extra
    assert events[BUCKET_ASSET].extra == extra
    assert events[OTHER_ASSET].extra == {}  # not the results' bucket: Airflow's plain event only


@pytest.mark.usefixtures("wmltrain_env", "stores")
def test_a_completed_run_emits_its_results_asset_event(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi
) -> None:
    docker_api.run_script = RunScript(files={"metrics.json": '{"accuracy": 0.8}'})
    context = run_context(ti)
    result = make_op().execute(context)
    assert result["state"] == "COMPLETED"
    assert_announced(context["outlet_events"], ti, {"accuracy": 0.8})


@pytest.mark.usefixtures("wmltrain_env", "stores")
def test_a_deferred_run_emits_its_event_when_it_completes(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi
) -> None:
    docker_api.run_script = RunScript(running=True)
    deferring = run_context(ti)
    with pytest.raises(TaskDeferred):
        make_op(deferrable=True).execute(deferring)
    assert len(deferring["outlet_events"]) == 0
    [container] = docker_api.run_containers()
    docker_api.finish(container.id, exit_code=0)
    event = {
        "status": "exited",
        "training_id": training_id_of(ti),
        "docker_url": "",
        "container_id": container.id,
        "container_status": "exited",
        "exit_code": 0,
        "oom_killed": False,
        "finished_at": "2026-01-01T00:00:00Z",
        "docker_error": "",
    }
    context = run_context(ti)
    assert make_op(deferrable=True).execute_complete(context, event)["state"] == "COMPLETED"
    assert_announced(context["outlet_events"], ti, {})


@pytest.mark.usefixtures("wmltrain_env", "stores")
def test_a_failed_run_emits_no_event(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi
) -> None:
    docker_api.run_script = RunScript(exit_code=1)
    context = run_context(ti)
    with pytest.raises(AirflowFailException, match="C201"):
        make_op().execute(context)
    assert len(context["outlet_events"]) == 0


@pytest.mark.usefixtures("wmltrain_env", "stores")
def test_a_skipped_run_emits_no_event(
    make_op: Callable[..., TrainingRunOperator], docker_api: FakeDocker, ti: FakeTi
) -> None:
    docker_api.run_script = RunScript(exit_code=99)
    context = run_context(ti)
    with pytest.raises(AirflowSkipException):
        make_op(skip_on_exit_code=99).execute(context)
    assert len(context["outlet_events"]) == 0


@pytest.mark.usefixtures("wmltrain_env", "stores")
def test_a_task_without_outlets_needs_no_outlet_events(
    make_op: Callable[..., TrainingRunOperator], ti: FakeTi
) -> None:
    assert make_op(outlets=[]).execute({"ti": ti, "task_instance": ti})["state"] == "COMPLETED"  # type: ignore[arg-type]


# --- OpenLineage ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeDataset:
    namespace: str
    name: str


@dataclass
class FakeOperatorLineage:
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)


def _fake_openlineage(monkeypatch: pytest.MonkeyPatch) -> type[FakeDataset]:
    """The openlineage provider and client as far as the provider uses them (neither is installed here)."""
    extractors = types.ModuleType("airflow.providers.openlineage.extractors")
    extractors.OperatorLineage = FakeOperatorLineage  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage.extractors", extractors)
    from airflow.providers.common.compat.openlineage import facet

    monkeypatch.setattr(facet, "Dataset", FakeDataset)
    return FakeDataset


def test_lineage_datasets_are_the_data_prefix_and_the_results_location() -> None:
    doc = manifest_doc()
    doc["training_data_reference"][0]["source"]["prefix"] = "mnist/2026-01-01/"
    manifest = load_manifest(
        doc, settings=Settings(frameworks=json.dumps({"busybox": {"1": {"image": IMAGE}}}))
    )
    assert assets.lineage_datasets(manifest.data, manifest.results, "training-1") == (
        [(f"s3://{DATA_BUCKET}", "mnist/2026-01-01")],
        [(f"s3://{RESULTS_BUCKET}", "training-1")],
    )
    whole = load_manifest(
        manifest_doc(), settings=Settings(frameworks=json.dumps({"busybox": {"1": {"image": IMAGE}}}))
    )
    assert assets.lineage_datasets(whole.data, whole.results, "t")[0] == [(f"s3://{DATA_BUCKET}", "/")]


@pytest.mark.usefixtures("wmltrain_env", "stores")
def test_operator_reports_openlineage_inputs_and_outputs_on_complete(
    make_op: Callable[..., TrainingRunOperator], ti: FakeTi, monkeypatch: pytest.MonkeyPatch
) -> None:
    op = make_op(outlets=[])
    assert op.get_openlineage_facets_on_complete(ti) is None  # no run yet
    op.execute({"ti": ti, "task_instance": ti})  # type: ignore[arg-type]
    _fake_openlineage(monkeypatch)
    lineage = op.get_openlineage_facets_on_complete(ti)
    assert lineage == FakeOperatorLineage(
        inputs=[FakeDataset(f"s3://{DATA_BUCKET}", "/")],
        outputs=[FakeDataset(f"s3://{RESULTS_BUCKET}", training_id_of(ti))],
    )


@pytest.mark.usefixtures("wmltrain_env", "stores")
def test_operator_reports_no_lineage_without_the_openlineage_provider(
    make_op: Callable[..., TrainingRunOperator], ti: FakeTi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage.extractors", None)  # import fails
    op = make_op(outlets=[])
    op.execute({"ti": ti, "task_instance": ti})  # type: ignore[arg-type]
    assert op.get_openlineage_facets_on_complete(ti) is None
