"""The framework registry and the [wmltrain] settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_wmltrain.errors import ConfigurationError, ManifestError
from airflow_wmltrain.frameworks import FrameworkRegistry
from airflow_wmltrain.settings import Settings, parse_resource_classes


def test_shipped_registry_has_the_seed_frameworks() -> None:
    registry = FrameworkRegistry.from_settings(Settings())
    names = {fw.name for fw in registry}
    assert {"tensorflow", "pytorch", "keras", "caffe", "torch", "mxnet"} <= names
    assert registry.resolve("tensorflow", "1.2-py3").image == "tensorflow/tensorflow:1.2.0-gpu-py3"


def test_registry_file_adds_overrides_and_removes(tmp_path: Path) -> None:
    path = tmp_path / "frameworks.yaml"
    path.write_text(
        "pytorch:\n"
        "  '2.13': {image: local/pytorch:2.13-cpu}\n"
        "  '2.5': null\n"
        "tensorflow:\n"
        "  1.2-py3: local/tf:1.2\n"
    )
    registry = FrameworkRegistry.from_settings(Settings(frameworks_file=str(path)))
    assert registry.resolve("pytorch", "2.13").image == "local/pytorch:2.13-cpu"
    assert registry.resolve("tensorflow", "1.2-py3").image == "local/tf:1.2"
    with pytest.raises(ManifestError) as info:
        registry.resolve("pytorch", "2.5")
    assert "supported versions of pytorch: 1.13, 2.1, 2.13" in str(info.value)


def test_inline_registry_is_merged_last(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("mxnet: {'1.9': {image: from-file}}\n")
    settings = Settings(frameworks_file=str(path), frameworks='{"mxnet": {"1.9": {"image": "inline"}}}')
    assert FrameworkRegistry.from_settings(settings).resolve("mxnet", "1.9").image == "inline"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "must map framework names to versions"),
        ("pytorch: [1]", "must map versions"),
        ("pytorch: {'2': {tag: x}}", "an 'image' is required"),
        ("pytorch: {'2': {image: x, gpu: true}}", "unknown key(s) gpu"),
        ("pytorch: {", "not valid YAML"),
    ],
)
def test_invalid_registry_is_a_configuration_error(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        FrameworkRegistry.from_settings(Settings(frameworks=text))
    assert message in str(info.value)
    assert info.value.field == "[wmltrain] frameworks"


def test_missing_registry_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        FrameworkRegistry.from_settings(Settings(frameworks_file=str(tmp_path / "none.yaml")))
    assert "cannot read the file" in str(info.value)


def test_resource_classes_parse() -> None:
    assert dict(parse_resource_classes("small=1, medium=2,large=4,")) == {"small": 1, "medium": 2, "large": 4}
    for bad in ("small", "small=x", "=1", ""):
        with pytest.raises(ConfigurationError):
            parse_resource_classes(bad)


def test_settings_from_airflow_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__RESOURCE_CLASSES", "tiny=1,huge=16")
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__MODEL_DEFINITION_MAX_ENTRIES", "12")
    settings = Settings.from_airflow_config()
    assert dict(settings.resource_classes) == {"tiny": 1, "huge": 16}
    assert settings.model_definition_max_entries == 12
    assert settings.model_definition_max_bytes == Settings().model_definition_max_bytes


def test_settings_reject_bad_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__WMLTRAIN__MODEL_DEFINITION_MAX_BYTES", "lots")
    with pytest.raises(ConfigurationError) as info:
        Settings.from_airflow_config()
    assert str(info.value) == "[wmltrain] model_definition_max_bytes: 'lots' is not a whole number"
