"""The hostile-input corpus: every input goes through the public entry points and must be refused (or
contained) with its code and a one-line message, leaving nothing written."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import pytest

from airflow_wmltrain.errors import WmlTrainError
from airflow_wmltrain.submission import check_submission
from tests.conftest import SEED_S3, SEED_SECRETS
from tests.corpus.hostile import good_zip


def validate(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``wmltrain validate`` run in this process (its ``main``), as tests/unit/test_cli_validate.py does."""
    from airflow_wmltrain.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["validate", *argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
    return subprocess.CompletedProcess(["wmltrain", "validate", *argv], code, out.getvalue(), err.getvalue())


def snapshot(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.lstat().st_size for path in root.rglob("*")}


class Refusals:
    """Submit through ``check_submission`` and ``wmltrain validate``; both must refuse alike."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(
        self,
        *,
        model: bytes | None = None,
        manifest: str | None = None,
        hyperparameters: dict[str, str] | None = None,
        code: str,
        words: tuple[str, ...] = (),
        field: str | None = None,
    ) -> WmlTrainError:
        folder = self.root / "submission"
        folder.mkdir(exist_ok=True)
        model_path, manifest_path = folder / "model.zip", folder / "manifest.yml"
        model_path.write_bytes(good_zip() if model is None else model)
        manifest_path.write_text(SEED_S3.read_text() if manifest is None else manifest)
        before = snapshot(self.root)
        with pytest.raises(WmlTrainError) as info:
            check_submission(model_path, manifest_path, hyperparameters=hyperparameters)
        error = info.value
        text = str(error)
        assert error.code == code, text
        assert not error.retryable
        assert "\n" not in text
        assert len(text) < 600, text
        for word in words:
            assert word in text, f"{word!r} not in {text!r}"
        if field is not None:
            assert error.field == field, text
        pairs = [f"--hyperparameter={name}={value}" for name, value in (hyperparameters or {}).items()]
        result = validate([str(model_path), str(manifest_path), *pairs])
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr.startswith(f"error {code}: "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        for secret in SEED_SECRETS:
            assert secret not in text
            assert secret not in result.stderr
        assert snapshot(self.root) == before, "something was written"
        return error


@pytest.fixture
def refused(tmp_path: Path) -> Refusals:
    return Refusals(tmp_path)
