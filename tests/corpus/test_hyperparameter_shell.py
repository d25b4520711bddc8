"""Shell metacharacters in hyperparameter values, in every quoting context of the command: the rendered
command is run by a real ``sh -c`` (as the training container does) and a tiny script records the argv it
received.  Each value must arrive as exactly one argument of the training script, and nothing else may
run: no file named ``pwned`` appears, and the command's other parts run as written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_wmltrain.command import render_command

PY = f"{sys.executable} -S"
SCRIPT = (
    "import json, sys\nwith open('argv.jsonl', 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
)

#: ``(command, files its other parts make)``: the option in every quoting context, chains, comments.
CONTEXTS = {
    "unquoted": (f"{PY} t.py --opt old --n 1", ()),
    "single": (f"{PY} t.py --opt 'old' --n 1", ()),
    "double": (f'{PY} t.py --opt "old" --n 1', ()),
    "double-variable": (f'{PY} t.py --opt "$OLD" --n 1', ()),
    "equals": (f"{PY} t.py --opt=old --n 1", ()),
    "command-substitution": (f"{PY} t.py --opt=$(echo old) --n 1", ()),
    "backticks": (f"{PY} t.py --opt `echo old` --n 1", ()),
    "semicolon": (f"{PY} t.py --opt old; touch after-semicolon", ("after-semicolon",)),
    "and": (f"{PY} t.py --opt old && touch after-and", ("after-and",)),
    "pipe": (f"{PY} t.py --opt old | cat > piped", ("piped",)),
    "absent-newline": (f"{PY} t.py\ntouch next-line", ("next-line",)),
    "absent-and-cp": (f"{PY} t.py && cp argv.jsonl copied", ("copied",)),
    "absent-after-other": (f"touch first && {PY} t.py", ("first",)),
    "absent-redirect": (f"{PY} t.py > out.log 2>&1", ("out.log",)),
    "comment": (f"{PY} t.py  # --opt old", ()),
    "quoted-lookalike": (f'echo "--opt old" > note; {PY} t.py --name "a --opt b"', ("note",)),
    "single-quoted-sh": (f"sh -c '{PY} t.py --opt old'", ()),
}

VALUES = [
    '"; touch pwned; "',
    "'; touch pwned; '",
    "$(touch pwned)",
    "`touch pwned`",
    "a\ntouch pwned",
    "x && touch pwned",
    "x | touch pwned",
    "x; touch pwned",
    "> pwned",
    "$OLD ${OLD} $HOME",
    "\\\" \\' \\\\",
    "* ? [a]",
    "~",
    "",
    "--n touch",
    "-1",
    "\t spaced \t",
    "\u00e9 \u00fc\u00ef \u20ac",
    "#comment",
    "old",
]


def received(workdir: Path) -> list[list[str]]:
    lines = (workdir / "argv.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("context", sorted(CONTEXTS))
@pytest.mark.parametrize("value", VALUES, ids=[ascii(v) for v in VALUES])
def test_value_is_one_argument_and_nothing_else_runs(tmp_path: Path, context: str, value: str) -> None:
    command, made = CONTEXTS[context]
    (tmp_path / "t.py").write_text(SCRIPT)
    rendered = render_command(command, data_dir="/d", result_dir="/r", hyperparameters={"opt": value})
    env = {"PATH": os.environ["PATH"], "OLD": "old", "HOME": "/home/x"}
    done = subprocess.run(
        ["sh", "-c", rendered], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, (rendered, done.stderr)
    assert not (tmp_path / "pwned").exists(), rendered
    for name in made:
        assert (tmp_path / name).exists(), (rendered, name)
    [argv] = received(tmp_path)
    if context == "single-quoted-sh":
        # the option is inside sh's quoted script: left alone; the override is an argument of sh itself
        assert argv == ["--opt", "old"]
        return
    if "--opt=" in command:
        assert argv == [f"--opt={value}", "--n", "1"], rendered
        return
    assert argv.count("--opt") == 1 or value == "--opt", (rendered, argv)
    at = argv.index("--opt")
    assert argv[at + 1] == value, (rendered, argv)
    expected_rest = {"quoted-lookalike": ["--name", "a --opt b"]}.get(
        context, ["--n", "1"] if "--n 1" in command else []
    )
    assert [*argv[:at], *argv[at + 2 :]] == expected_rest, (rendered, argv)
