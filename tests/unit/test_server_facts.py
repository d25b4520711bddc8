"""The command line agrees with its server (issue 13, items 6 and 8): ``wmltrain train`` checks a
submission against the server's framework registry and resource classes, which the bundled DAG publishes
in its ``manifest`` parameter's schema (one API call), and reads its own ``[wmltrain]`` settings without
importing Airflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from airflow_wmltrain.errors import EXIT_BAD_INPUT, EXIT_SERVER_ERROR
from airflow_wmltrain.frameworks import FrameworkRegistry
from airflow_wmltrain.service.runs import SERVER_FACTS_KEY, TRAINING_DAG_ID, server_facts
from airflow_wmltrain.settings import Settings
from tests.unit.test_service_resilience import RUNS, SEED_MANIFEST, FakeApi, cli_api

__all__ = ["cli_api"]  # the fixture, used by name

DETAILS = f"/dags/{TRAINING_DAG_ID}/details"
SERVER_ONLY = {"busybox": {"1": {"image": "registry.example/busybox:1", "description": "the server's"}}}


def details(frameworks: dict[str, Any], classes: dict[str, int]) -> dict[str, Any]:
    schema = {"type": "string", SERVER_FACTS_KEY: {"frameworks": frameworks, "resource_classes": classes}}
    return {"dag_id": TRAINING_DAG_ID, "params": {"manifest": {"value": "", "schema": schema}}}


def test_the_registry_round_trips_through_its_published_shape() -> None:
    shipped = FrameworkRegistry.from_settings(Settings())
    again = FrameworkRegistry.from_data(json.loads(json.dumps(shipped.to_data())), "test")
    assert list(again) == list(shipped)


def test_the_bundled_dag_publishes_the_servers_registry_and_resource_classes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow_wmltrain.service.training_dag import build_training_dag

    monkeypatch.setenv("AIRFLOW__WMLTRAIN__FRAMEWORKS", json.dumps(SERVER_ONLY))
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__RESOURCE_CLASSES", "tiny=1,small=1,huge=8")
    dag = build_training_dag()
    published = dag.params.get_param("manifest").schema[SERVER_FACTS_KEY]
    assert published["frameworks"]["busybox"] == SERVER_ONLY["busybox"]
    assert "pytorch" in published["frameworks"]  # the shipped ones too
    assert published["resource_classes"] == {"tiny": 1, "small": 1, "huge": 8}
    assert dag.params.get_param("manifest").resolve("model_definition: {}") == "model_definition: {}"


def test_server_facts_are_read_in_one_call_and_none_from_an_older_server() -> None:
    api = FakeApi(lambda method, path, params, body: details(SERVER_ONLY, {"tiny": 1}))
    facts = server_facts(api)
    assert facts is not None
    assert [fw.image for fw in facts.registry()] == ["registry.example/busybox:1"]
    assert dict(facts.settings(Settings()).resource_classes) == {"tiny": 1}
    assert api.calls == [f"GET {DETAILS}"]
    plain = {"params": {"manifest": {"schema": {"type": "string"}}}}
    older = FakeApi(lambda method, path, params, body: plain)
    assert server_facts(older) is None


def _manifest(tmp_path: Path, framework: dict[str, str], resource: str) -> Path:
    doc = yaml.safe_load(SEED_MANIFEST.read_text())
    doc["model_definition"]["framework"] = framework
    doc["model_definition"]["execution"]["resource"] = resource
    path = tmp_path / "manifest.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _train(tmp_path: Path, manifest: Path) -> list[str]:
    return ["train", "s3://bucket/model.zip", str(manifest), "--api-url", "http://x", "--no-store-check"]


def test_train_accepts_a_framework_and_a_resource_class_only_the_server_has(
    cli_api: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The services' own framework (a deployment's addition) and a class of its own: this machine's
    registry has neither, the server's has both; the run is submitted."""
    from airflow_wmltrain.cli.main import main

    sent: dict[str, Any] = {}

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if (method, path) == ("GET", DETAILS):
            return details(SERVER_ONLY, {"tiny": 1})
        if (method, path) == ("POST", RUNS):
            sent.update(body)
        return body

    cli_api(handler)
    manifest = _manifest(tmp_path, {"name": "busybox", "version": "1"}, "tiny")
    assert main(_train(tmp_path, manifest)) == 0, capsys.readouterr().err
    submitted = yaml.safe_load(sent["conf"]["manifest"])
    assert submitted["model_definition"]["framework"] == {"name": "busybox", "version": "1"}
    assert submitted["model_definition"]["execution"]["resource"] == "tiny"


def test_train_refuses_a_framework_the_server_does_not_have_before_sending_anything(
    cli_api: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """pytorch 2.1 is in this machine's shipped registry, not in the server's: refused (C101), listing
    the server's frameworks; nothing but the one read is sent."""
    from airflow_wmltrain.cli.main import main

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if (method, path) == ("GET", DETAILS):
            return details(SERVER_ONLY, {"small": 1})
        raise AssertionError(f"{method} {path} sent for a refused submission")

    api = cli_api(handler)
    manifest = _manifest(tmp_path, {"name": "pytorch", "version": "2.1"}, "small")
    assert main(_train(tmp_path, manifest)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "C101" in err, err
    assert "supported frameworks: busybox 1" in err, err
    assert api.calls == [f"GET {DETAILS}"]


def test_train_on_a_server_without_the_training_dag_says_so_before_sending_anything(
    cli_api: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from airflow_wmltrain.cli.main import main
    from airflow_wmltrain.service.api import ApiNotFoundError

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if method == "GET":
            raise ApiNotFoundError("HTTP 404", status=404)
        raise AssertionError(f"{method} {path} sent to a server without the DAG")

    cli_api(handler)
    assert main(_train(tmp_path, SEED_MANIFEST)) == EXIT_SERVER_ERROR
    assert f"has no DAG {TRAINING_DAG_ID}" in capsys.readouterr().err


def test_local_settings_come_from_the_environment_then_airflow_cfg_without_importing_airflow(
    tmp_path: Path,
) -> None:
    (tmp_path / "airflow.cfg").write_text(
        "[core]\nexecutor = LocalExecutor\n[wmltrain]\nresource_classes = one=1,two=2\n"
        "model_definition_max_entries = 7\n"
    )
    env = {"AIRFLOW_HOME": str(tmp_path), "AIRFLOW__WMLTRAIN__MODEL_DEFINITION_MAX_ENTRIES": "9"}
    settings = Settings.from_local_config(env)
    assert dict(settings.resource_classes) == {"one": 1, "two": 2}
    assert settings.model_definition_max_entries == 9  # the variable wins, as in Airflow
    assert Settings.from_local_config({"AIRFLOW_HOME": str(tmp_path / "none")}) == Settings()
    code = (
        "import sys; from airflow_wmltrain.settings import Settings; Settings.from_local_config(); "
        "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cli_commands_import_no_airflow_to_start(tmp_path: Path) -> None:
    """What makes every command start in a fraction of a second (benchmarks/cli_startup.py measures it):
    building the parser and validating a manifest import nothing of Airflow."""
    code = (
        "import sys\n"
        "from airflow_wmltrain.cli.main import build_parser\n"
        "build_parser()\n"
        "from airflow_wmltrain.settings import Settings\n"
        "from airflow_wmltrain.manifest import load_manifest\n"
        f"load_manifest({str(SEED_MANIFEST)!r}, settings=Settings.from_local_config())\n"
        "print(sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.')))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_train_json_prints_the_training_id_as_json(
    cli_api: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from airflow_wmltrain.cli.main import main

    sent: dict[str, Any] = {}

    def handler(method: str, path: str, params: dict[str, Any], body: Any) -> Any:
        if (method, path) == ("POST", RUNS):
            sent.update(body)
        return body

    cli_api(handler)
    assert main([*_train(tmp_path, SEED_MANIFEST), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"training_id": sent["dag_run_id"], "state": "QUEUED"}
