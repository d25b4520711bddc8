"""Hostile model-definition archives: not zips, zip slip, links, bombs, long and case-colliding names."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from airflow_wmltrain.submission import check_submission
from tests.conftest import SEED_S3
from tests.corpus.conftest import Refusals, validate
from tests.corpus.hostile import bombs, nested_bomb, not_zips, unsafe_zips

NOT_ZIPS = not_zips()
UNSAFE = unsafe_zips()


@pytest.mark.parametrize("kind", sorted(NOT_ZIPS))
def test_files_named_zip_that_are_not_zips(refused: Refusals, kind: str) -> None:
    error = refused(model=NOT_ZIPS[kind], code="C102", field="model.zip")
    assert "zip -r ../model.zip ." in str(error)


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_entries(refused: Refusals, kind: str) -> None:
    data, word = UNSAFE[kind]
    refused(model=data, code="C102", words=(word,), field="model.zip")


@pytest.fixture(scope="module")
def bomb_archives() -> dict[str, tuple[bytes, str]]:
    return bombs()


@pytest.mark.parametrize("kind", ["ratio", "count", "many-small-ratios"])
def test_bombs_are_refused_before_inflating(
    refused: Refusals, bomb_archives: dict[str, tuple[bytes, str]], kind: str
) -> None:
    data, word = bomb_archives[kind]
    assert len(data) < 4 * 1024 * 1024
    refused(model=data, code="C102", words=(word,), field="model.zip")


def test_nested_bomb_is_never_unpacked(tmp_path: Path) -> None:
    """Inner archives are files like any other: accepted, counted at their own size, never opened."""
    model = tmp_path / "model.zip"
    model.write_bytes(nested_bomb())
    submission = check_submission(model, SEED_S3)
    assert submission.model_definition.uncompressed_bytes < 16 * 1024 * 1024
    dest = submission.model_definition.extract(tmp_path / "out")
    written = sum(path.stat().st_size for path in dest.rglob("*") if path.is_file())
    assert written == submission.model_definition.uncompressed_bytes
    assert sorted(p.name for p in dest.iterdir())[:2] == ["convolutional_network.py", "middle0.zip"]
    assert zipfile.is_zipfile(dest / "middle0.zip")
    assert validate([str(model), str(SEED_S3)]).returncode == 0
