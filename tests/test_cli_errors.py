"""Errors in the user's own code (a setup file, its setup function, its loss) are theirs.

Reported with their file and line, exit status 1, nothing on stdout: exit
status 2 is for pycurv's own arguments.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

import torch  # noqa: F401 - a test dependency: its absence must fail, not skip

from pycurv.cli import main  # noqa: E402


def _main(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)


# ---- errors in the user's own code ----------------------------------------------------------

GOOD = """\
import torch

def setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    return model, {loss}, (x, torch.zeros(8, 1, dtype=torch.float64))
"""

# (file text, line of the error in it, the exception line, at import or in setup())
USER_ERRORS = {
    "value_error": ("import torch\n\ndef setup():\n    raise ValueError('my bad value')\n", 4,
                    "ValueError: my bad value"),
    "runtime_error": ("def helper():\n    raise RuntimeError('boom')\n\ndef setup():\n    return helper()\n", 2,
                      "RuntimeError: boom"),
    "type_error": ("def setup():\n    return len(3)\n", 2, "TypeError: object of type 'int' has no len()"),
    "syntax_error": ("def setup():\n    return 1 +\n", 2, "SyntaxError: invalid syntax"),
    "import_error": ("import torch\nimport not_a_module_of_anyone\n\ndef setup():\n    pass\n", 2,
                     "ModuleNotFoundError: No module named 'not_a_module_of_anyone'"),
    "at_import": ("import torch\nSCALE = 1 / 0\n", 2, "ZeroDivisionError: division by zero"),
    "key_error": ("def setup():\n    d = {}\n    return d['model']\n", 3, "KeyError: 'model'"),
}


@pytest.mark.parametrize("kind", list(USER_ERRORS))
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_errors_in_the_users_setup_carry_their_file_and_line(tmp_path, capsys, kind, json_flag):
    text, line, last = USER_ERRORS[kind]
    path = tmp_path / f"setup_{kind}.py"
    path.write_text(text)
    code, out, err = _main(capsys, ["sharpness", str(path), *json_flag])
    assert code == 1 and out == ""
    first = err.splitlines()[0]
    assert first.startswith(f"pycurv sharpness: error in your code ({path}, line {line}"), err
    assert last in first, err
    assert "site-packages/pycurv" not in err  # pycurv's own frames are not shown as theirs
    assert f'File "{path}", line {line}' in err
    if kind != "syntax_error":  # a SyntaxError has no frames of theirs, only its line
        assert err.splitlines()[1] == "Traceback of your code (most recent call last):"


@pytest.mark.parametrize("status", [0, 3, "bye"])
@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["text", "json"])
def test_sys_exit_in_setup_is_an_error_not_success(tmp_path, capsys, status, json_flag):
    path = tmp_path / "exits.py"
    path.write_text(f"import sys\n\ndef setup():\n    sys.exit({status!r})\n")
    code, out, err = _main(capsys, ["sharpness", str(path), *json_flag])
    assert code == 1 and out == ""
    assert err == (f"pycurv sharpness: error in your code ({path}, line 4, in setup): it called sys.exit({status!r}) "
                   "instead of returning; pycurv needs the setup to return (or define) model, loss_fn, "
                   "data[, optimizer]\n")


def test_errors_in_a_users_module_and_function_target(tmp_path, capsys):
    (tmp_path / "mymod.py").write_text("import torch\n\ndef make():\n    raise ValueError('no data yet')\n")
    (tmp_path / "brokenmod.py").write_text("import torch\nfrom torch import no_such_name\n")
    code, out, err = _main(capsys, ["sharpness", "mymod:make"])
    assert code == 1 and out == ""
    assert err.startswith(f"pycurv sharpness: error in your code ({tmp_path / 'mymod.py'}, line 4, in make): "
                          "ValueError: no data yet\n")
    code, out, err = _main(capsys, ["sharpness", "brokenmod:setup"])
    assert code == 1 and out == ""  # their ImportError is theirs, not "cannot import module"
    assert err.startswith(f"pycurv sharpness: error in your code ({tmp_path / 'brokenmod.py'}, line 2, in <module>): "
                          "ImportError: cannot import name 'no_such_name'")


def test_an_error_in_the_users_loss_is_theirs(tmp_path, capsys):
    path = tmp_path / "badloss.py"
    path.write_text(textwrap.dedent(GOOD.format(loss="my_loss")) +
                    "\n\ndef my_loss(out, y):\n    raise ValueError('my loss is broken')\n")
    code, out, err = _main(capsys, ["sharpness", str(path), "--json"])
    assert code == 1 and out == ""
    assert err.startswith(f"pycurv sharpness: error in your code ({path}, line 11, in my_loss): "
                          "ValueError: my loss is broken\n"), err
    # and a setup that works still works
    path.write_text(textwrap.dedent(GOOD.format(loss="lambda o, y: ((o - y) ** 2).mean()")))
    code, out, err = _main(capsys, ["sharpness", str(path), "--json", "--no-min"])
    assert code == 0 and err == ""
