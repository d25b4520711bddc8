"""The training command: run-time substitution, hyperparameter overrides and the scripts it names.

The manifest's ``execution.command`` is kept as the user wrote it; nothing is substituted at parse time.
At run time :func:`render_command` applies hyperparameter overrides (replacing ``--name value`` or
``--name=value`` where the option is present, appending ``--name value`` where it is not) and then
replaces ``${DATA_DIR}``/``$DATA_DIR``, ``${RESULT_DIR}``/``$RESULT_DIR`` (and any other variable the
caller passes) by the run's paths.  The result is a shell command line (run with ``sh -c``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath

from airflow_wmltrain.errors import ManifestError

COMMAND_FIELD = "model_definition.execution.command"
HYPERPARAMETERS_FIELD = "hyperparameters"

HyperparameterValue = str | int | float | bool | None

_NAME = re.compile(r"^-{0,2}[A-Za-z_][A-Za-z0-9_.\-]*$")
# A shell word as it appears in the command: quoted or bare (stops at whitespace and ; & |).
_WORD = r"""(?:'[^']*'|"(?:[^"\\]|\\.)*"|[^\s;&|'"]+)+"""
_VARIABLE = "(?:\\$\\{{{name}\\}}|\\${name}(?![A-Za-z0-9_]))"


def option_name(name: str) -> str:
    """The command-line option for a hyperparameter name: ``learningRate`` → ``--learningRate``."""
    return name if name.startswith("-") else f"--{name}"


def validate_hyperparameters(
    hyperparameters: Mapping[str, object] | None, *, field: str = HYPERPARAMETERS_FIELD
) -> dict[str, HyperparameterValue]:
    """Check a hyperparameter mapping: option-like names and scalar values.

    :raises ManifestError: (C101) naming the offending entry.
    """
    if hyperparameters is None:
        return {}
    if not isinstance(hyperparameters, Mapping):
        raise ManifestError(
            f"must be a mapping of option name to value, got a {type(hyperparameters).__name__}", field=field
        )
    checked: dict[str, HyperparameterValue] = {}
    for name, value in hyperparameters.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ManifestError(
                f"'{name}' is not an option name; use letters, digits, '_', '-' or '.', e.g. learningRate",
                field=field,
            )
        if value is not None and not isinstance(value, str | int | float | bool):
            raise ManifestError(
                f"must be a string, number, true/false or null, got a {type(value).__name__}",
                field=f"{field}.{name}",
            )
        checked[name] = value
    return checked


def apply_hyperparameters(command: str, hyperparameters: Mapping[str, object] | None) -> str:
    """Apply overrides to a command line.

    A value replaces the option's value where the option is present and is appended as
    ``--name value`` otherwise; ``True`` makes the option a bare flag, ``False`` and ``None`` remove it.
    """
    for name, value in validate_hyperparameters(hyperparameters).items():
        command = _apply_one(command, option_name(name), value)
    return command


def _apply_one(command: str, option: str, value: HyperparameterValue) -> str:
    occurrence = re.compile(
        rf"(?:(?<=\s)|^){re.escape(option)}(?:=(?P<eq>{_WORD})|(?P<sep>\s+)(?P<val>(?!-){_WORD}))?(?=\s|$|[;&|])"
    )
    if value is None or value is False:
        return re.sub(r"\s{2,}", " ", occurrence.sub("", command)).strip()

    def replace(match: re.Match[str]) -> str:
        if value is True:
            return option
        return f"{option}={_quote(value)}" if match.group("eq") is not None else f"{option} {_quote(value)}"

    new, count = occurrence.subn(replace, command)
    if count:
        return new
    return f"{command.rstrip()} {option}" if value is True else f"{command.rstrip()} {option} {_quote(value)}"


def _quote(value: str | int | float) -> str:
    return shlex.quote(str(value)) if isinstance(value, str) else repr(value)


def substitute_variables(command: str, variables: Mapping[str, str]) -> str:
    """Replace ``${NAME}`` and ``$NAME`` for each given variable; other variables are left to the shell."""
    for name, value in variables.items():
        pattern = re.compile(_VARIABLE.format(name=re.escape(name)))
        command = pattern.sub(shlex.quote(value).replace("\\", "\\\\"), command)
    return command


def render_command(
    command: str,
    *,
    data_dir: str,
    result_dir: str,
    hyperparameters: Mapping[str, object] | None = None,
) -> str:
    """The command line a training container runs.

    :param command: the manifest's ``execution.command``.
    :param data_dir: path of the staged data inside the container (``${DATA_DIR}``).
    :param result_dir: path of the results directory inside the container (``${RESULT_DIR}``).
    :param hyperparameters: overrides, see :func:`apply_hyperparameters`.
    """
    command = apply_hyperparameters(command, hyperparameters)
    return substitute_variables(command, {"DATA_DIR": data_dir, "RESULT_DIR": result_dir})


# --- the scripts a command names ------------------------------------------------------------------

_SEPARATORS = {"&&", "||", ";", "|", "&", ";;", "|&", "\n"}
_PREFIX_WORDS = {"exec", "time", "nohup", "env", "stdbuf"}
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
# Interpreter options that take a separate argument, and those after which no script follows.
_OPTION_WITH_ARGUMENT = {"python": {"-W", "-X", "--check-hash-based-pycs"}, "shell": {"-o", "-O"}}
_NO_SCRIPT = {"python": {"-c", "-m", "-"}, "shell": {"-c", "-s", "-"}}
_SHELLS = {"sh", "bash", "dash", "zsh"}
_OTHER_INTERPRETERS = {"th", "lua", "luajit", "Rscript", "perl", "julia"}
_MODEL_DIR_PREFIX = re.compile(r"^(\$\{MODEL_DIR\}|\$MODEL_DIR)/")


def referenced_scripts(command: str) -> list[str]:
    """The files of the model definition that a command runs, as paths relative to the model directory.

    Understood: ``python[3[.x]] [options] script.py``, ``sh``/``bash script.sh``, ``th``/``lua``/
    ``Rscript``/``perl``/``julia script``, ``./script``, ``caffe train --solver=file``, each after
    ``exec``/``time``/``env``/``nohup`` or ``NAME=value`` prefixes, in every part of a ``&&``/``;``/``|``
    chain and on every line.  A part that changes directory (``cd``) ends the analysis; absolute paths,
    paths with variables other than ``$MODEL_DIR`` and ``-c``/``-m`` forms are not checked.
    """
    lexer = shlex.shlex(command, posix=True, punctuation_chars="();<>|&\n")
    lexer.whitespace = " \t\r"  # a newline separates commands, as in the shell
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:
        return []  # unbalanced quotes: the shell will say so; nothing to check here
    scripts: list[str] = []
    for part in _split(words):
        if part and part[0] == "cd":
            break
        script = _script_of(part)
        if script is not None:
            path = _relative_model_path(script)
            if path is not None and path not in scripts:
                scripts.append(path)
    return scripts


def _split(words: Iterable[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for word in words:
        if word in _SEPARATORS:
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


def _script_of(words: list[str]) -> str | None:
    index = 0
    while index < len(words) and (words[index] in _PREFIX_WORDS or re.match(r"^[A-Za-z_]\w*=", words[index])):
        index += 1
    if index >= len(words):
        return None
    program, rest = words[index], words[index + 1 :]
    base = PurePosixPath(program).name
    if program.startswith("./"):
        return program
    if base == "caffe":
        for word in rest:
            if word.startswith("--solver="):
                return word.split("=", 1)[1]
        return None
    if _PYTHON.match(base):
        return _first_operand(rest, "python")
    if base in _SHELLS:
        return _first_operand(rest, "shell")
    if base in _OTHER_INTERPRETERS:
        return _first_operand(rest, "other")
    return None


def _first_operand(words: list[str], kind: str) -> str | None:
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif word in _NO_SCRIPT.get(kind, set()) or word.startswith(">") or word.startswith("<"):
            return None
        elif word in _OPTION_WITH_ARGUMENT.get(kind, set()):
            skip_next = True
        elif not word.startswith("-"):
            return word
    return None


def _relative_model_path(script: str) -> str | None:
    script = _MODEL_DIR_PREFIX.sub("", script)
    if "$" in script or script.startswith("/") or script.startswith("~"):
        return None
    path = PurePosixPath(script)
    parts = [p for p in path.parts if p not in (".", "")]
    return "/".join(parts) if parts else None
