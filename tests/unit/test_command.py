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


@pytest.mark.parametrize("name", ["bad name", "", "1abc", "a;b", "--", "lr\n", "lr\nreboot"])
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


# --- hyperparameters never change the command's structure (issue 10, hole 5) ---------------------------


@pytest.mark.parametrize(
    ("command", "hyperparameters", "rendered"),
    [
        # appended to the training program, not to the end of the line
        (
            "python3 main.py && cp model.pt $RESULT_DIR/",
            {"lr": 0.1},
            "python3 main.py --lr 0.1 && cp model.pt $RESULT_DIR/",
        ),
        ("python3 t.py 2>&1 | tee log.txt", {"lr": 0.1}, "python3 t.py --lr 0.1 2>&1 | tee log.txt"),
        ("python3 t.py > out.log", {"amp": True}, "python3 t.py --amp > out.log"),
        ("python3 t.py  # --lr 5", {"lr": 1}, "python3 t.py --lr 1  # --lr 5"),
        ("bash prep.sh && python3 train.py", {"lr": 1}, "bash prep.sh && python3 train.py --lr 1"),
        # text inside quotes is not an option
        (
            'python3 t.py --name "a --lr 3"',
            {"lr": 1},
            'python3 t.py --name "a --lr 3" --lr 1',
        ),
        (
            "sh -c 'python3 t.py --optimizer adam'",
            {"optimizer": "sgd"},
            "sh -c 'python3 t.py --optimizer adam' --optimizer sgd",
        ),
        # an option of another program is left alone
        ("echo --lr 3 && python3 t.py", {"lr": 1}, "echo --lr 3 && python3 t.py --lr 1"),
        # any quoting of the old value is replaced by one quoted word
        (
            'python3 t.py --optimizer "$OPT" --n 1',
            {"optimizer": "x y"},
            "python3 t.py --optimizer 'x y' --n 1",
        ),
        ("python3 t.py --lr=$(cat lr) -v", {"lr": 0.5}, "python3 t.py --lr=0.5 -v"),
        ("python3 t.py --shift -1", {"shift": 2}, "python3 t.py --shift 2"),
        ("python3 t.py --seed 3 > out 2>&1", {"seed": None}, "python3 t.py > out 2>&1"),
        # here-document bodies are not arguments
        (
            "cat <<EOF > cfg\n--lr 5\nEOF\npython3 t.py --lr 1",
            {"lr": 2},
            "cat <<EOF > cfg\n--lr 5\nEOF\npython3 t.py --lr 2",
        ),
    ],
)
def test_hyperparameters_are_arguments_of_the_training_program(
    command: str, hyperparameters: dict[str, object], rendered: str
) -> None:
    assert apply_hyperparameters(command, hyperparameters) == rendered


def test_a_value_holding_another_option_stays_one_argument() -> None:
    rendered = apply_hyperparameters("python t.py --a 1 --b 2", {"a": "--b", "b": 3})
    assert shlex.split(rendered) == ["python", "t.py", "--a", "--b", "--b", "3"]


def test_hyperparameter_without_a_place_is_refused() -> None:
    with pytest.raises(ManifestError) as info:
        apply_hyperparameters("echo a && echo b", {"lr": 1})
    assert info.value.field == "hyperparameters.lr"
    assert "write --lr in model_definition.execution.command" in str(info.value)


def test_unreadable_command_is_refused_with_hyperparameters() -> None:
    assert apply_hyperparameters("python3 'unbalanced", {}) == "python3 'unbalanced"
    with pytest.raises(ManifestError) as info:
        apply_hyperparameters("python3 'unbalanced", {"lr": 1})
    assert info.value.field == "model_definition.execution.command"
    assert "single quote" in str(info.value)


def test_the_same_option_twice_is_refused() -> None:
    with pytest.raises(ManifestError, match="same option --lr"):
        validate_hyperparameters({"lr": 1, "--lr": 2})


def test_render_substitutes_variables_in_values_as_one_argument() -> None:
    rendered = render_command(
        "python3 t.py", data_dir="/d d", result_dir="/r", hyperparameters={"out": "$DATA_DIR/m"}
    )
    assert shlex.split(rendered) == ["python3", "t.py", "--out", "/d d/m"]


def test_referenced_scripts_after_reserved_words() -> None:
    assert referenced_scripts("if python3 check.py; then python3 train.py; fi") == ["check.py", "train.py"]
