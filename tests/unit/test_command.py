"""Run-time command rendering: variables, hyperparameter overrides, and the scripts a command runs."""

from __future__ import annotations

import shlex

import pytest

from airflow_wmltrain.command import (
    apply_hyperparameters,
    referenced_scripts,
    render_command,
    substitute_variables,
    validate_hyperparameters,
)
from airflow_wmltrain.errors import ManifestError

SEED = (
    "python3 convolutional_network.py --trainImagesFile ${DATA_DIR}/train-images-idx3-ubyte.gz "
    "--learningRate 0.001 --trainingIters 2000000"
)


def test_data_and_result_dirs_are_substituted_in_both_forms() -> None:
    command = (
        "python3 t.py --data ${DATA_DIR}/x --alt $DATA_DIR/y --out $RESULT_DIR --keep $DATA_DIRECTORY $HOME"
    )
    rendered = render_command(command, data_dir="/mnt/data", result_dir="/mnt/results")
    assert (
        rendered
        == "python3 t.py --data /mnt/data/x --alt /mnt/data/y --out /mnt/results --keep $DATA_DIRECTORY $HOME"
    )


def test_substituted_paths_are_quoted() -> None:
    assert substitute_variables("ls $DATA_DIR", {"DATA_DIR": "/a b"}) == "ls '/a b'"
    assert substitute_variables("ls $D", {"D": "/x\\1"}) == "ls '/x\\1'"


def test_hyperparameter_replaces_an_existing_option() -> None:
    assert apply_hyperparameters(SEED, {"learningRate": 0.01}).endswith(
        "--learningRate 0.01 --trainingIters 2000000"
    )


def test_hyperparameter_is_appended_when_absent() -> None:
    assert apply_hyperparameters(SEED, {"batchSize": 64}) == f"{SEED} --batchSize 64"


def test_hyperparameter_keeps_the_equals_form() -> None:
    assert apply_hyperparameters("python t.py --lr=0.1 --x 1", {"lr": 0.5}) == "python t.py --lr=0.5 --x 1"


def test_hyperparameter_flags_and_removal() -> None:
    command = "python t.py --verbose --lr 0.1 --seed 3"
    assert apply_hyperparameters(command, {"verbose": False, "seed": None}) == "python t.py --lr 0.1"
    assert apply_hyperparameters(command, {"amp": True}) == f"{command} --amp"
    assert apply_hyperparameters(command, {"verbose": True}) == command


def test_hyperparameter_values_are_shell_quoted() -> None:
    rendered = apply_hyperparameters("python t.py", {"name": "run one; rm -rf /"})
    assert shlex.split(rendered) == ["python", "t.py", "--name", "run one; rm -rf /"]


def test_hyperparameter_does_not_touch_longer_options() -> None:
    assert (
        apply_hyperparameters("python t.py --lr-decay 0.9", {"lr": 0.1})
        == "python t.py --lr-decay 0.9 --lr 0.1"
    )


def test_hyperparameter_name_with_dashes_is_used_as_given() -> None:
    assert apply_hyperparameters("th main.lua -lr 0.1", {"-lr": 0.2}) == "th main.lua -lr 0.2"


def test_render_applies_overrides_then_variables() -> None:
    rendered = render_command(
        SEED, data_dir="/d", result_dir="/r", hyperparameters={"out": "${RESULT_DIR}/m"}
    )
    assert shlex.split(rendered)[-2:] == ["--out", "/r/m"]
    assert "--trainImagesFile /d/train-images-idx3-ubyte.gz" in rendered


@pytest.mark.parametrize("name", ["bad name", "", "1abc", "a;b", "--"])
def test_invalid_hyperparameter_names(name: str) -> None:
    with pytest.raises(ManifestError) as info:
        validate_hyperparameters({name: 1})
    assert info.value.code == "C101"
    assert info.value.field == "hyperparameters"


def test_invalid_hyperparameter_values() -> None:
    with pytest.raises(ManifestError) as info:
        validate_hyperparameters({"lr": [0.1, 0.2]})
    assert str(info.value) == "hyperparameters.lr: must be a string, number, true/false or null, got a list"


def test_hyperparameters_must_be_a_mapping() -> None:
    with pytest.raises(ManifestError):
        validate_hyperparameters(["lr"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("command", "scripts"),
    [
        (SEED, ["convolutional_network.py"]),
        ("python -u -W ignore src/train.py --x 1", ["src/train.py"]),
        ("python3.11 ./a.py", ["a.py"]),
        ("CUDA_LAUNCH_BLOCKING=1 exec python3 t.py | tee log.txt", ["t.py"]),
        ("bash prepare.sh && python3 train.py; th eval.lua", ["prepare.sh", "train.py", "eval.lua"]),
        ("./run.sh --fast", ["run.sh"]),
        ("caffe train --solver=lenet_solver.prototxt", ["lenet_solver.prototxt"]),
        ("python3 ${MODEL_DIR}/nested/t.py", ["nested/t.py"]),
        ("python3 $MODEL_DIR/t.py", ["t.py"]),
        ("python3 -m torch.distributed.run train.py", []),
        ("python3 -c 'print(1)'", []),
        ("python3 /opt/app/t.py", []),
        ("python3 ${DATA_DIR}/t.py", []),
        ("cd src && python3 t.py", []),
        ("python3 a.py && cd x && python3 b.py", ["a.py"]),
        ("torchrun --nproc_per_node=2 train.py", []),
        ("python3 'unbalanced", []),
        ("Rscript fit.R", ["fit.R"]),
        ("python3 prep.py\npython3 train.py --name 'a  b'\n", ["prep.py", "train.py"]),
        ("set -e\ncd src\npython3 t.py", []),
    ],
)
def test_referenced_scripts(command: str, scripts: list[str]) -> None:
    assert referenced_scripts(command) == scripts
