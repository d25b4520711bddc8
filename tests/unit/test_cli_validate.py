"""``wmltrain validate``: the seed manifests, exit codes, JSON output, and no secret in any output."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SEED_S3, SEED_SECRETS, SEED_SWIFT, zip_bytes

WMLTRAIN = [str(Path(sys.executable).with_name("wmltrain"))]
MODULE = [sys.executable, "-m", "airflow_wmltrain"]
#: ``wmltrain`` called in this process (its ``main``): the entry points themselves are tested by the
#: seed-manifest tests, which start them as programs; the others need no new interpreter each (importing
#: Airflow costs seconds a process), so that ``make unit`` stays quick.
IN_PROCESS: list[str] = []


def run(command: list[str], *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    if command is IN_PROCESS:
        result = _run_main(list(args))
    else:
        env = {**os.environ, "AIRFLOW_HOME": str(home)}
        result = subprocess.run(
            [*command, *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )
    for secret in SEED_SECRETS:
        assert secret not in result.stdout
        assert secret not in result.stderr
    return result


def _run_main(argv: list[str]) -> subprocess.CompletedProcess[str]:
    from airflow_wmltrain.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    return subprocess.CompletedProcess(["wmltrain", *argv], code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("manifest", [SEED_S3, SEED_SWIFT], ids=["s3-training_data", "swift-reference"])
@pytest.mark.parametrize("command", [WMLTRAIN, MODULE], ids=["wmltrain", "python-m"])
def test_seed_manifests_validate(
    command: list[str], manifest: Path, tf_model_zip: Path, tmp_path: Path
) -> None:
    result = run(command, "validate", str(tf_model_zip), str(manifest), home=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "name       tf-mnist-showtest1" in out
    assert "framework  tensorflow 1.2-py3 -> tensorflow/tensorflow:1.2.0-gpu-py3" in out
    assert "resource   small -> 1 GPU\n" in out
    store = "s3" if manifest == SEED_S3 else "swift"
    assert f"data       {store} bucket 'mnist-training-data'" in out
    assert f"results    {store} bucket 'mnist-training-models'" in out
    assert "command    python3 convolutional_network.py --trainImagesFile ${DATA_DIR}/train-images" in out
    assert "model      tf-model.zip: 2 files" in out
    assert "credentials inline" in result.stderr


def test_json_summary(tf_model_zip: Path, tmp_path: Path) -> None:
    result = run(
        IN_PROCESS,
        "validate",
        str(tf_model_zip),
        str(SEED_SWIFT),
        "--json",
        "-p",
        "learningRate=0.01",
        home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["valid"] is True
    assert summary["framework"] == {
        "name": "tensorflow",
        "version": "1.2-py3",
        "image": "tensorflow/tensorflow:1.2.0-gpu-py3",
    }
    assert (summary["resource"], summary["gpus"]) == ("small", 1)
    assert summary["data"]["type"] == "swift"
    assert summary["data"]["type_as_written"] == "bluemix_objectstore"
    assert summary["data"]["bucket"] == "mnist-training-data"
    assert summary["results"]["bucket"] == "mnist-training-models"
    assert "--learningRate 0.01 --trainingIters" in summary["command"]
    assert summary["hyperparameters"] == {"learningRate": 0.01}
    assert summary["model_definition"]["files"] == 2


def test_invalid_manifest_exits_2_with_one_line(tf_model_zip: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(SEED_SWIFT.read_text().replace("resource: small", "resource: huge"))
    result = run(IN_PROCESS, "validate", str(tf_model_zip), str(bad), home=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "error C104: model_definition.execution.resource: 'huge' is not one of small, medium, large\n"
    )


def test_invalid_manifest_json(tf_model_zip: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text(SEED_S3.read_text().replace("aws_secret_access_key", "aws_secret_key"))
    result = run(IN_PROCESS, "validate", str(tf_model_zip), str(bad), "--json", home=tmp_path)
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "C103"
    assert error["field"] == "training_data_reference[0].connection.aws_secret_key"


def test_script_missing_from_zip(tmp_path: Path) -> None:
    model = tmp_path / "model.zip"
    model.write_bytes(zip_bytes({"input_data.py": "X = 1\n"}))
    result = run(IN_PROCESS, "validate", str(model), str(SEED_S3), home=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error C102: model_definition.execution.command: ")
    assert "convolutional_network.py" in result.stderr


def test_zipped_folder_gets_a_hint(tmp_path: Path) -> None:
    model = tmp_path / "model.zip"
    model.write_bytes(zip_bytes({"tf-model/convolutional_network.py": "", "tf-model/input_data.py": ""}))
    result = run(IN_PROCESS, "validate", str(model), str(SEED_S3), home=tmp_path)
    assert result.returncode == 2
    assert "the zip holds tf-model/convolutional_network.py" in result.stderr


def test_tar_gz_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo("convolutional_network.py")
        archive.addfile(info, io.BytesIO(b""))
    model = tmp_path / "model.zip"
    model.write_bytes(buffer.getvalue())
    result = run(IN_PROCESS, "validate", str(model), str(SEED_S3), home=tmp_path)
    assert result.returncode == 2
    assert "gzip-compressed tar" in result.stderr
    assert "only .zip archives are accepted" in result.stderr


def test_bad_hyperparameter_syntax(tf_model_zip: Path, tmp_path: Path) -> None:
    result = run(IN_PROCESS, "validate", str(tf_model_zip), str(SEED_S3), "-p", "learningRate", home=tmp_path)
    assert result.returncode == 2
    assert "--hyperparameter: 'learningRate' is not NAME=VALUE" in result.stderr


def test_configuration_error_exits_3(tf_model_zip: Path, tmp_path: Path) -> None:
    env_var = "AIRFLOW__WMLTRAIN__RESOURCE_CLASSES"
    os.environ[env_var] = "small"
    try:
        result = run(IN_PROCESS, "validate", str(tf_model_zip), str(SEED_S3), home=tmp_path)
    finally:
        del os.environ[env_var]
    assert result.returncode == 3
    assert "error S001: [wmltrain] resource_classes" in result.stderr


def test_usage_error_exits_2(tmp_path: Path) -> None:
    result = run(IN_PROCESS, "validate", home=tmp_path)
    assert result.returncode == 2
    assert "usage: wmltrain validate" in result.stderr


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    from airflow_wmltrain.cli.main import main

    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_each_command_its_line_description_and_positionals(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    top = _help(capsys)
    assert "stage copy the manifest's training data into a directory, as a training run does " in top
    assert "validate check a model-definition zip and a training manifest without submitting anything " in top
    assert "train submit a training run (model zip + manifest) to Airflow " in top
    stage = _help(capsys, "stage")
    assert (
        "Stage every object of the manifest's data bucket (or prefix) into DEST_DIR through the host's "
        in stage
    )
    assert (
        "MANIFEST.yaml the training manifest (YAML) DEST_DIR the directory to fill (created if missing)"
        in stage
    )
    validate = _help(capsys, "validate")
    assert (
        "offline: exit 0 with a summary, or exit 2 with the first problem (its code and the field at"
        in validate
    )
    assert "MODEL.zip the zipped training code MANIFEST.yaml" in validate
    assert "-p NAME=VALUE, --hyperparameter NAME=VALUE override an option of the command" in validate
    train = _help(capsys, "train")
    assert "whose run id is the new training id, and print it (\"Model-ID is 'training-...'\")." in train
    assert "MODEL.zip the zipped training code, or its s3:// / swift:// URL MANIFEST.yaml" in train
    assert "--param NAME=VALUE, -p NAME=VALUE override an option of the command (repeatable)" in train


def test_two_training_ids_are_a_usage_error_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 13: ``show`` given two ids exited 1, the status of a failed run."""
    from airflow_wmltrain.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["show", "training-a", "training-b"])
    assert exited.value.code == 2
    assert "give one training id" in capsys.readouterr().err


def test_monitor_is_logs_follow() -> None:
    """``bx ml monitor`` users type ``wmltrain monitor ID``: the log, followed until the run ends."""
    from airflow_wmltrain.cli import runs
    from airflow_wmltrain.cli.main import build_parser

    args = build_parser().parse_args(["monitor", "training-a", "--timeout", "60"])
    assert (args.handler, args.follow, args.args) == (runs.run_logs, True, ["training-a"])
