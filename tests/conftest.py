"""Shared test fixtures: the seed manifests and their secret values."""

from __future__ import annotations

import copy
import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SEED_S3 = ROOT / "examples" / "seed" / "manifest-s3.yml"
SEED_SWIFT = ROOT / "examples" / "seed" / "manifest-swift.yml"

#: The secret values written into the seed manifests (placeholders filled in); they must never be shown.
SEED_SECRETS = (
    "2c5a8e6f0b1d4e7a9c3f5b8d1e4a7c0f",
    "f3b9d2e71c5a48b6a0e4d8c2b7f1e9a35d6c0b4e8a2f7c1d",
    "Xq7#pL2m{Rt9vW4z",
)


def zip_bytes(files: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@pytest.fixture
def seed_s3() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(SEED_S3.read_text()))


@pytest.fixture
def seed_swift() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(SEED_SWIFT.read_text()))


@pytest.fixture
def tf_model_zip(tmp_path: Path) -> Path:
    """The seed's tf-model.zip: convolutional_network.py and input_data.py at the top level."""
    path = tmp_path / "tf-model.zip"
    path.write_bytes(
        zip_bytes(
            {"convolutional_network.py": "import input_data\nprint('training')\n", "input_data.py": "X = 1\n"}
        )
    )
    return path


@pytest.fixture(autouse=True)
def no_trigger_settle(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Triggers run in-process by a test fire as soon as they have an answer: the hold after a deferral
    (``PollingTrigger.settle``, for a race of Airflow's scheduler) is its own tests' subject, marked
    ``trigger_settle``; the triggerer of the real services keeps it."""
    if request.node.get_closest_marker("trigger_settle") is None:
        from airflow_wmltrain.triggers.base import PollingTrigger

        monkeypatch.setattr(PollingTrigger, "settle", 0.0)
