"""The package is an Airflow provider: Airflow discovers it and its [wmltrain] configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from airflow_wmltrain import __version__
from airflow_wmltrain.get_provider_info import get_provider_info

AIRFLOW = str(Path(sys.executable).with_name("airflow"))


def airflow(*args: str, home: Path) -> str:
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "false"}
    result = subprocess.run(
        [AIRFLOW, *args], capture_output=True, text=True, env=env, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_airflow_lists_the_provider(tmp_path: Path) -> None:
    providers = json.loads(airflow("providers", "list", "--output", "json", home=tmp_path))
    ours = [p for p in providers if p["package_name"] == "airflow-wmltrain"]
    assert len(ours) == 1
    assert ours[0]["version"] == __version__


def test_airflow_knows_the_wmltrain_section(tmp_path: Path) -> None:
    out = airflow("config", "list", "--section", "wmltrain", "--include-descriptions", home=tmp_path)
    assert "[wmltrain]" in out
    assert "Resource classes a manifest's" in out
    value = airflow("config", "get-value", "wmltrain", "resource_classes", home=tmp_path)
    assert value.strip() == "small=1,medium=2,large=4"


def test_provider_info_declares_every_setting_with_a_description() -> None:
    options = get_provider_info()["config"]["wmltrain"]["options"]
    assert set(options) == {
        "resource_classes",
        "docker_url",
        "training_retries",
        "training_retry_delay",
        "frameworks_file",
        "frameworks",
        "model_definition_max_bytes",
        "model_definition_max_entries",
        "staging_dir",
        "cache_max_bytes",
        "transfer_workers",
        "verify",
        "part_size",
        "multipart_threshold",
        "gpu_ids",
        "gpu_wait",
        "gpu_wait_timeout",
        "gpu_poll_interval",
        "cpu_fallback",
        "halt_grace_period",
        "poll_interval",
        "defer_after",
        "metrics_interval",
        "metrics_log_pattern",
        "retention_days",
        "submission_connections",
        "training_network",
        "training_user",
        "training_cap_add",
        "training_pids_limit",
        "training_memory",
        "training_shm_size",
    }
    assert all(spec["description"].strip() and "default" in spec for spec in options.values())


def test_the_plugin_loads_without_fastapi_and_serves_the_runs_endpoint(tmp_path: Path) -> None:
    """Every task process loads the plugins (``integrate_macros_plugins``): loading ours must not import
    FastAPI (0.2-0.5 s at each task's start); the API server, which reads ``fastapi_apps``, gets the app."""
    code = (
        "import sys\n"
        "from airflow import plugins_manager\n"
        "plugins_manager.integrate_macros_plugins()\n"
        "plugins = [p for p in plugins_manager._get_plugins()[0] if p.name == 'wmltrain']\n"
        "print(len(plugins), 'fastapi' in sys.modules)\n"
        "apps = plugins[0].fastapi_apps\n"
        "print(apps[0]['url_prefix'], sorted(r.path for r in apps[0]['app'].routes if r.path == '/runs'))\n"
    )
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "false"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
        cwd=tmp_path,  # not the repository root, whose egg-info would register the plugin twice
    )
    assert result.returncode == 0, result.stderr
    loaded, served = result.stdout.strip().splitlines()
    assert loaded == "1 False"
    assert served == "/wmltrain ['/runs']"
