"""The training command: run-time substitution, hyperparameter overrides and the scripts it names.

The manifest's ``execution.command`` is kept as the user wrote it; nothing is substituted at parse time.
At run time :func:`render_command` replaces ``${DATA_DIR}``/``$DATA_DIR``, ``${RESULT_DIR}``/
``$RESULT_DIR`` (and any other variable the caller passes) by the run's paths and applies hyperparameter
overrides (replacing ``--name value`` or ``--name=value`` where the option is an argument of the training
program, appending ``--name value`` to it where it is not).  The command is read as the shell reads it,
so that a value is always one argument of the training program, whatever it holds and however the
command quotes or chains: nothing else in the command line changes.  The result is a shell command line
(run with ``sh -c``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from airflow_wmltrain.errors import ManifestError

COMMAND_FIELD = "model_definition.execution.command"
HYPERPARAMETERS_FIELD = "hyperparameters"

HyperparameterValue = str | int | float | bool | None

_NAME = re.compile(r"-{0,2}[A-Za-z_][A-Za-z0-9_.\-]*")
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
    options: dict[str, str] = {}
    for name, value in hyperparameters.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ManifestError(
                f"'{name}' is not an option name; use letters, digits, '_', '-' or '.', e.g. learningRate",
                field=field,
            )
        if value is not None and not isinstance(value, str | int | float | bool):
            raise ManifestError(
                f"must be a string, number, true/false or null, got a {type(value).__name__}",
                field=f"{field}.{name}",
            )
        option = option_name(name)
        if option in options:
            raise ManifestError(
                f"'{options[option]}' and '{name}' are the same option {option}; give it once", field=field
            )
        options[option] = name
        checked[name] = value
    return checked


def apply_hyperparameters(command: str, hyperparameters: Mapping[str, object] | None) -> str:
    """Apply overrides to a command line, each value as exactly one argument of the training program.

    The command is read as the shell reads it (quotes, ``$(...)``, backticks, comments, ``;``/``&&``/
    ``|``/newline chains, redirections).  The *training commands* are the simple commands that run an
    interpreter or launcher (``python3 x.py``, ``bash x.sh``, ``th``, ``./x``, ``torchrun``...; the
    whole line when it is one simple command).  A value replaces the option's value where the option is
    an argument of a training command and is appended, as ``--name value``, to the last training
    command otherwise; ``True`` makes the option a bare flag, ``False`` and ``None`` remove it.  Values
    are shell-quoted words of their own; nothing else in the command changes (text inside quotes, other
    commands of a chain, comments).

    :raises ManifestError: (C101) when the command cannot be read as a shell command line, or has
        several parts and none of them is a training command, so that an option has no place.
    """
    checked = validate_hyperparameters(hyperparameters)
    if not checked:
        return command
    try:
        tokens = _tokens(command)
    except ValueError as err:
        raise ManifestError(
            f"{err}; hyperparameters cannot be applied to it: correct the quoting", field=COMMAND_FIELD
        ) from None
    commands = _simple_commands(tokens)
    training = [part for part in commands if _is_training(part)]
    if not training and len(commands) == 1:
        training = commands
    edits: list[tuple[int, int, str]] = []
    appended: list[str] = []
    for name, value in checked.items():
        option = option_name(name)
        found = False
        for part in training:
            for first, last in _occurrences(part, option):
                found = True
                start = part.words[first].start
                end = part.words[last].end
                if value is None or value is False:
                    edits.append((part.words[first - 1].end, end, ""))
                elif value is True:
                    edits.append((start, end, option))
                elif part.words[first].text.startswith(f"{option}="):
                    edits.append((start, end, f"{option}={_quote(value)}"))
                else:
                    edits.append((start, end, f"{option} {_quote(value)}"))
        if found or value is None or value is False:
            continue
        if not training:
            raise ManifestError(
                f"'{option}' is not in the command, and none of its {len(commands)} parts runs a training "
                f"script (python3 x.py, bash x.sh...) to add it to; write {option} in "
                f"{COMMAND_FIELD} where it belongs",
                field=f"{HYPERPARAMETERS_FIELD}.{name}",
            )
        appended.append(option if value is True else f"{option} {_quote(value)}")
    if appended:
        at = training[-1].arguments_end
        edits.append((at, at, "".join(f" {text}" for text in appended)))
    for start, end, text in sorted(edits, key=lambda edit: (edit[0], edit[1]), reverse=True):
        command = command[:start] + text + command[end:]
    return command


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
    :param hyperparameters: overrides, see :func:`apply_hyperparameters`; ``${DATA_DIR}`` and
        ``${RESULT_DIR}`` in a string value are replaced too (the value stays one argument).
    """
    variables = {"DATA_DIR": data_dir, "RESULT_DIR": result_dir}
    values = {
        name: _substitute_in_value(value, variables) if isinstance(value, str) else value
        for name, value in validate_hyperparameters(hyperparameters).items()
    }
    return apply_hyperparameters(substitute_variables(command, variables), values)


def _substitute_in_value(value: str, variables: Mapping[str, str]) -> str:
    for name, path in variables.items():
        value = re.sub(_VARIABLE.format(name=re.escape(name)), path.replace("\\", "\\\\"), value)
    return value


# --- reading a command line as the shell does -------------------------------------------------------

_OPERATORS = sorted(
    ["&&", "||", ";;", ";&", ";", "&", "|&", "|", "(", ")", "<<-", "<<", "<>", "<&", ">&", ">>", ">|", "<",
     ">", "&>>", "&>", "\n"],
    key=len,
    reverse=True,
)  # fmt: skip
_CONTROL = frozenset({"&&", "||", ";;", ";&", ";", "&", "|&", "|", "(", ")", "\n"})
_BLANKS = " \t\r"
_WORD_END = frozenset(_BLANKS + "\n;&|()<>")
_RESERVED = frozenset({"if", "then", "else", "elif", "do", "while", "until", "!", "{"})


@dataclass(frozen=True)
class _Token:
    """A word or an operator of a command line: its text as written, where it is, and what it means.

    :param value: the word with its quotes removed (``$X``, ``$(...)`` kept as written); the operator.
    :param literal: whether ``value`` is what the program receives (no expansion, no pattern).
    """

    text: str
    start: int
    end: int
    value: str
    operator: bool = False
    literal: bool = True


@dataclass(frozen=True)
class _SimpleCommand:
    """One program and its arguments (the words that are not redirections), and where its arguments end."""

    words: list[_Token]

    @property
    def values(self) -> list[str]:
        return [word.value for word in self.words]

    @property
    def arguments_end(self) -> int:
        return self.words[-1].end


def _tokens(command: str) -> list[_Token]:
    """The words and operators of a shell command line (POSIX ``sh`` rules, comments and here-documents
    left out).

    :raises ValueError: saying what is unbalanced (a quote, ``$(``, a backtick...).
    """
    tokens: list[_Token] = []
    heredocs: list[tuple[str, bool]] = []
    i, n = 0, len(command)
    while i < n:
        ch = command[i]
        if ch in _BLANKS or command.startswith("\\\n", i):
            i += 1 if ch in _BLANKS else 2
        elif ch == "#":
            while i < n and command[i] != "\n":
                i += 1
        elif ch == "\n" and heredocs:
            tokens.append(_Token("\n", i, i + 1, "\n", operator=True))
            i = _skip_heredocs(command, i + 1, heredocs)
            heredocs = []
        else:
            operator = next((op for op in _OPERATORS if command.startswith(op, i)), None)
            if operator is not None:
                tokens.append(_Token(operator, i, i + len(operator), operator, operator=True))
                i += len(operator)
                if operator in ("<<", "<<-"):
                    while i < n and command[i] in _BLANKS:
                        i += 1
                    end, value, _ = _word(command, i)
                    if end == i:
                        raise ValueError("a here-document ('<<') has no delimiter word")
                    tokens.append(_Token(command[i:end], i, end, value))
                    heredocs.append((value, operator == "<<-"))
                    i = end
                continue
            end, value, literal = _word(command, i)
            io_number = value.isdigit() and end < n and command[end] in "<>"
            tokens.append(_Token(command[i:end], i, end, value, operator=io_number, literal=literal))
            i = end
    return tokens


def _word(command: str, i: int) -> tuple[int, str, bool]:
    """Read the word that starts at ``i``: ``(end, value, literal)``."""
    value: list[str] = []
    literal = True
    n = len(command)
    start = i
    while i < n and command[i] not in _WORD_END:
        ch = command[i]
        if ch == "\\":
            if i + 1 < n and command[i + 1] != "\n":
                value.append(command[i + 1])
            i += 2
        elif ch == "'":
            close = command.find("'", i + 1)
            if close < 0:
                raise ValueError("a single quote (') is not closed")
            value.append(command[i + 1 : close])
            i = close + 1
        elif ch == '"':
            i, inner, inner_literal = _double_quoted(command, i + 1)
            value.append(inner)
            literal = literal and inner_literal
        elif ch in "$`":
            end = _expansion(command, i)
            value.append(command[i:end])
            literal = literal and end == i + 1  # a lone '$' is itself
            i = end
        else:
            if ch in "*?[" or (ch == "~" and i == start):
                literal = False
            value.append(ch)
            i += 1
    return i, "".join(value), literal


def _double_quoted(command: str, i: int) -> tuple[int, str, bool]:
    value: list[str] = []
    literal = True
    while i < len(command):
        ch = command[i]
        if ch == '"':
            return i + 1, "".join(value), literal
        if ch == "\\" and i + 1 < len(command):
            following = command[i + 1]
            if following != "\n":
                value.append(following if following in '$`"\\' else ch + following)
            i += 2
        elif ch in "$`":
            end = _expansion(command, i)
            value.append(command[i:end])
            literal = literal and end == i + 1
            i = end
        else:
            value.append(ch)
            i += 1
    raise ValueError('a double quote (") is not closed')


def _expansion(command: str, i: int) -> int:
    """The end of the ``$...`` or backtick expansion at ``i``."""
    n = len(command)
    if command[i] == "`":
        j = i + 1
        while j < n and command[j] != "`":
            j += 2 if command[j] == "\\" else 1
        if j >= n:
            raise ValueError("a backtick (`) is not closed")
        return j + 1
    if command.startswith("$(", i) or command.startswith("${", i):
        closing = ")" if command[i + 1] == "(" else "}"
        opening = command[i + 1]
        depth, j = 1, i + 2
        while j < n:
            ch = command[j]
            if ch == "\\":
                j += 2
                continue
            if ch == "'" and closing == ")":
                j = command.find("'", j + 1)
                if j < 0:
                    break
            elif ch == '"':
                j, _, _ = _double_quoted(command, j + 1)
                continue
            elif ch in "$`" and j + 1 < n and (ch == "`" or command[j + 1] in "({"):
                j = _expansion(command, j)
                continue
            elif ch == opening:
                depth += 1
            elif ch == closing:
                depth -= 1
                if depth == 0:
                    return j + 1
            j += 1
        raise ValueError(f"'${opening}' is not closed by '{closing}'")
    j = i + 1
    if j < n and (command[j].isalnum() or command[j] == "_"):
        if command[j].isdigit():
            return j + 1
        while j < n and (command[j].isalnum() or command[j] == "_"):
            j += 1
        return j
    if j < n and command[j] in "@*#?-$!":
        return j + 1
    return j


def _skip_heredocs(command: str, i: int, heredocs: list[tuple[str, bool]]) -> int:
    """Skip the bodies of the here-documents opened on the line that ended at ``i``; the index after them."""
    for delimiter, strip_tabs in heredocs:
        while i < len(command):
            newline = command.find("\n", i)
            line_end = len(command) if newline < 0 else newline
            line = command[i:line_end]
            i = line_end + 1
            if (line.lstrip("\t") if strip_tabs else line) == delimiter:
                break
    return min(i, len(command))


def _simple_commands(tokens: list[_Token]) -> list[_SimpleCommand]:
    """Split tokens into simple commands, leaving out redirections (operator and target word)."""
    commands: list[_SimpleCommand] = []
    words: list[_Token] = []
    redirect_target = False
    for token in tokens:
        if token.operator and token.value in _CONTROL:
            if words:
                commands.append(_SimpleCommand(words))
            words, redirect_target = [], False
        elif token.operator:
            redirect_target = not token.value.isdigit() or redirect_target
        elif redirect_target:
            redirect_target = False
        else:
            words.append(token)
    if words:
        commands.append(_SimpleCommand(words))
    return commands


def _program_index(values: list[str]) -> int:
    """The index of the program among a simple command's words (after ``exec``, ``NAME=value``, ``if``...)."""
    index = 0
    while index < len(values) and (
        values[index] in _PREFIX_WORDS or values[index] in _RESERVED or _ASSIGNMENT.match(values[index])
    ):
        index += 1
    return index


def _is_training(part: _SimpleCommand) -> bool:
    values = part.values
    index = _program_index(values)
    if index >= len(values):
        return False
    program = values[index]
    base = PurePosixPath(program).name
    return (
        program.startswith("./")
        or bool(_PYTHON.match(base))
        or base in _SHELLS
        or base in _OTHER_INTERPRETERS
        or base in _LAUNCHERS
        or base == "caffe"
    )


def _occurrences(part: _SimpleCommand, option: str) -> list[tuple[int, int]]:
    """Where ``option`` is an argument of a simple command: ``(its word, its value's word or its own)``."""
    found: list[tuple[int, int]] = []
    words = part.words
    for index in range(_program_index(part.values) + 1, len(words)):
        word = words[index]
        if word.text.startswith(f"{option}="):
            found.append((index, index))
        elif word.literal and word.value == option:
            following = words[index + 1] if index + 1 < len(words) else None
            takes_value = following is not None and (
                not following.value.startswith("-") or _NEGATIVE_NUMBER.match(following.value) is not None
            )
            found.append((index, index + 1 if takes_value else index))
    return found


# --- the scripts a command names ------------------------------------------------------------------

_PREFIX_WORDS = {"exec", "time", "nohup", "env", "stdbuf"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
# Interpreter options that take a separate argument, and those after which no script follows.
_OPTION_WITH_ARGUMENT = {"python": {"-W", "-X", "--check-hash-based-pycs"}, "shell": {"-o", "-O"}}
_NO_SCRIPT = {"python": {"-c", "-m", "-"}, "shell": {"-c", "-s", "-"}}
_SHELLS = {"sh", "bash", "dash", "zsh"}
_OTHER_INTERPRETERS = {"th", "lua", "luajit", "Rscript", "perl", "julia"}
_LAUNCHERS = {"torchrun", "accelerate", "deepspeed", "horovodrun", "mpirun", "mpiexec"}
_MODEL_DIR_PREFIX = re.compile(r"^(\$\{MODEL_DIR\}|\$MODEL_DIR)/")


def referenced_scripts(command: str) -> list[str]:
    """The files of the model definition that a command runs, as paths relative to the model directory.

    Understood: ``python[3[.x]] [options] script.py``, ``sh``/``bash script.sh``, ``th``/``lua``/
    ``Rscript``/``perl``/``julia script``, ``./script``, ``caffe train --solver=file``, each after
    ``exec``/``time``/``env``/``nohup``, ``if``/``then``/``do``... or ``NAME=value`` prefixes, in every
    part of a ``&&``/``;``/``|`` chain and on every line.  A part that changes directory (``cd``) ends
    the analysis; absolute paths, paths with variables other than ``$MODEL_DIR`` and ``-c``/``-m`` forms
    are not checked.
    """
    try:
        tokens = _tokens(command)
    except ValueError:
        return []  # unbalanced quotes: the shell will say so; nothing to check here
    scripts: list[str] = []
    for part in _simple_commands(tokens):
        values = part.values
        if values[_program_index(values) :][:1] == ["cd"]:
            break
        script = _script_of(values)
        if script is not None:
            path = _relative_model_path(script)
            if path is not None and path not in scripts:
                scripts.append(path)
    return scripts


def _script_of(words: list[str]) -> str | None:
    index = _program_index(words)
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
