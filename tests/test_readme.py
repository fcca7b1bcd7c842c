"""The README's examples are run: ```python blocks execute, ```console blocks must print what they show."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(python|console)\n(.*?)```", README, flags=re.S)


def _console_examples():
    for lang, body in BLOCKS:
        if lang != "console":
            continue
        cmd, out = None, []
        for line in body.splitlines():
            if line.startswith("$ "):
                if cmd is not None:
                    yield cmd, "\n".join(out)
                cmd, out = line[2:], []
            else:
                out.append(line)
        if cmd is not None:
            yield cmd, "\n".join(out)


CONSOLE = list(_console_examples())
PYTHON = [body for lang, body in BLOCKS if lang == "python"]


def _normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def test_python_examples_run(tmp_path, monkeypatch, capsys):
    """The Python blocks run in order in one namespace, like a reader pasting them into a session."""
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "__readme__"}
    for i, code in enumerate(PYTHON):
        exec(compile(code, f"README.md (python block {i})", "exec"), ns)


@pytest.mark.parametrize("cmd,expected", CONSOLE, ids=[c for c, _ in CONSOLE] or None)
def test_console_example_output(cmd, expected, tmp_path):
    argv = shlex.split(cmd)
    assert argv[0] == "pycurv", f"README console examples must be pycurv commands, got {cmd!r}"
    proc = subprocess.run([sys.executable, "-m", "pycurv", *argv[1:]], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert _normalise(proc.stdout) == _normalise(expected)


def test_readme_has_examples():
    assert PYTHON, "the README should show the Python API"
