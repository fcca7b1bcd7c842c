"""Every subcommand over a table of bad inputs: exit status 2, one line on stderr, never a traceback.

Errors in the user's own code (a setup file, its setup function, its loss) are
theirs: reported with their file and line, exit status 1, nothing on stdout.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import torch

from pycurv.cli import main  # noqa: E402

NO_CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"

# (argv, the start of the message after "pycurv CMD: error: ")
BAD_INPUTS = [
    (["demo", "--n", "5"], "--n must be at least 20 for the built-in spectrum, got 5"),
    (["demo", "--n", "many"], "argument --n: not an integer: 'many'"),
    (["demo", "--tol", "2"], "tol must be a number with 0 < tol < 1, got tol=2.0"),
    (["demo", "--seed", "-1"], "argument --seed: must satisfy 0 <= seed < 2**64, got '-1'"),
    (["demo", "--seed", str(2**64)], f"argument --seed: must satisfy 0 <= seed < 2**64, got '{2**64}'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["sharpness", "--device", "nonsense"], "argument --device: not a torch device: 'nonsense'"),
    (["sharpness", "--device", NO_CUDA_DEVICE], f"argument --device: '{NO_CUDA_DEVICE}' "),
    (["sharpness", "missing.py"], "no such file: missing.py"),
    (["sharpness", "not_a_module:f"], "cannot import module 'not_a_module': no module named 'not_a_module'"),
    (["sharpness", "--seed", str(2**64)], f"seed must be below 2**64 (seeds are 64-bit), got seed={2**64}"),
    (["sharpness", "--lr", "-1"], "argument --lr: must be > 0, got '-1'"),
    (["sharpness", "--optimizer", "nesterov"], "argument --optimizer: invalid choice: 'nesterov'"),
    (["sharpness", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["sharpness", "--batch-size", "512"], "--batch-size must be smaller than the data set (512 samples), got 512"),
    (["spectrum", "--n-steps", "0"], "argument --n-steps: must be >= 1, got '0'"),
    (["spectrum", "missing.py"], "no such file: missing.py"),
    (["spectrum", "--plot", "/missing-dir/d.png"], "argument --plot: no such folder: '/missing-dir'"),
    (["spectrum", "--seed", str(2**64)], f"seed must be below 2**64 (seeds are 64-bit), got seed={2**64}"),
    (["bound", "--optimizer", "sgd", "--lr", "0.1", "--plot", "/missing-dir/x.png"],
     "argument --plot: no such folder: '/missing-dir' (to write '/missing-dir/x.png')"),
    (["bound", "--optimizer", "sgd", "--lr", "0.1", "--plot", "."], "argument --plot: '.' is a folder"),
    (["bound", "--optimizer", "foo", "--lr", "0.1"],
     "argument --optimizer: unknown optimizer 'foo' (choose from sgd, adam, adamw, rmsprop, in any case)"),
    (["bound", "--optimizer", "sgd"], "the following arguments are required: --lr"),
    (["bound", "--optimizer", "sgd", "--lr", "nan"], "argument --lr: must be finite, got 'nan'"),
    (["bound", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "8"],
     "--batch-size needs --dataset-size, --curvature-variance too"),
    (["lr-max", "--optimizer", "adam", "--sharpness", "-1"], "argument --sharpness: must be >= 0, got '-1'"),
    (["lr-max", "--optimizer", "sgd", "--sharpness", "1", "--momentum", "1.5"],
     "argument --momentum: must satisfy 0 <= value < 1, got '1.5'"),
    (["lr-max", "--optimizer", "sgd", "--sharpness", "1", "--plot", "/missing-dir/p.png"],
     "argument --plot: no such folder: '/missing-dir'"),
    (["nqm", "--lrs", "1"], "argument --lrs: must be >= 2"),
    (["nqm", "--power", "1000"],
     "--power 1000 with --dim 100: h_i = 1·i^-1000 underflows to 0 from i = 3 on; lower --power or --dim (at most 2)"),
    (["nqm", "--dim", "1e12"], "--dim 1000000000000 with --lrs 80 needs about 1.31 PiB (1.48e+15 bytes), more than "),
    (["nqm", "--dim", "0"], "argument --dim: must be >= 1, got '0'"),
    (["nqm", "--dim", "1.5"], "argument --dim: not an integer: '1.5'"),
    (["nqm", "--curvatures", "1,2", "--dim", "3"], "--curvatures and --dim exclude each other"),
    (["nqm", "--curvatures", "1,2", "--noise", "1"], "--noise needs one value per curvature (2), got 1"),
    (["nqm", "--plot", "/missing-dir/x.png"], "argument --plot: no such folder: '/missing-dir'"),
    (["nqm", "--target", "0", "--curvatures", "1"], "argument --target: must be > 0, got '0'"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
]


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


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = _main(capsys, argv)
    assert code == 2, (code, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert err.startswith(f"pycurv {argv[0]}: error: {message}"), err


def test_the_table_covers_every_subcommand():
    from pycurv.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {argv[0] for argv, _ in BAD_INPUTS}


def test_a_bad_input_from_the_shell_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pycurv", "bound", "--optimizer", "sgd", "--lr", "0.1", "--plot",
                           "/missing-dir/x.png"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("pycurv bound: error: argument --plot: no such folder: '/missing-dir' "
                           "(to write '/missing-dir/x.png')\n")


def test_extreme_but_valid_inputs_work_quietly(capsys):
    code, out, err = _main(capsys, ["nqm", "--top", "1e300", "--json"])
    assert code == 0 and err == "" and '"critical_batch_size"' in out
    code, out, err = _main(capsys, ["nqm", "--top", "1e-300", "--batch-sizes", "1,1024", "--json"])
    assert code == 0 and err == ""
    code, out, err = _main(capsys, ["bound", "--optimizer", "SGD", "--lr", "0.1", "--json"])
    assert code == 0 and err == "" and '"optimizer": "sgd"' in out


def test_help_texts_are_plain(capsys):
    for cmd in ("demo", "sharpness", "bound", "lr-max", "nqm", "info"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "``" not in text, (cmd, text)
        description = text.split("\n\n")[1]
        assert not description.startswith(("options:", "positional arguments:")), (cmd, text)
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "\npycurv demo: extreme eigenvalues of a built-in Hessian-like operator.\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    assert "build flags" in capsys.readouterr().out.split("\n\n")[1]
    with pytest.raises(SystemExit):
        main(["bound", "--help"])
    assert "any case (SGD, Adam, AdamW, RMSprop as in torch.optim)" in " ".join(capsys.readouterr().out.split())


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
