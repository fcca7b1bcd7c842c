"""The adapters are optional: import pycurv (and pycurv.noise, pycurv.track) needs NumPy only,
and a missing framework gives one sentence naming the extra."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code):
    # outside the source tree, so the installed package is imported
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)


def test_noise_and_track_stay_numpy_only():
    proc = _run("import sys, pycurv, pycurv.noise, pycurv.track, pycurv.cli.sharpness; "
                "print([m for m in ('torch', 'jax', 'matplotlib', 'scipy') if m in sys.modules])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_missing_framework_names_the_extra(framework):
    proc = _run(f"import sys; sys.modules[{framework!r}] = None\n"
                f"import pycurv\n"
                f"try:\n    import pycurv.{framework}\n"
                f"except pycurv.MissingDependencyError as exc:\n    print(exc)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"pycurv.{framework} needs {framework}, which is not installed: "
                                   f"pip install 'pycurv[{framework}]'")


def test_cli_without_torch_is_one_line():
    proc = _run("import sys; sys.modules['torch'] = None\n"
                "from pycurv.cli import main\nraise SystemExit(main(['sharpness']))")
    assert proc.returncode == 2
    assert proc.stderr == "pycurv sharpness: error: pycurv sharpness needs torch, which is not installed: " \
                          "pip install 'pycurv[torch]'\n"
