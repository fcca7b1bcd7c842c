"""Shared plumbing of the subcommands: one-line errors, JSON output, number parsing."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import traceback
from typing import Any, Callable, Iterable, Optional


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class UserCodeError(Exception):
    """An exception raised inside the user's own code (a setup file or function).

    Reported as theirs, with their file and line and the traceback of their
    frames, exit status 1: exit status 2 is for pycurv's own arguments.
    ``files`` are the user's source files (the setup script or module), counted
    as theirs wherever they live.
    """

    def __init__(self, exc: BaseException, files: Iterable[str] = ()):
        super().__init__(str(exc))
        self.exc = exc
        self.files = tuple(os.path.realpath(f) for f in files if f)


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line (``pycurv CMD: error: ...``) and exit status 2.

    Descriptions may come from module docstrings: their reST literals
    (````pycurv demo````) are shown without the backticks.
    """

    def __init__(self, *args, **kwargs):
        if isinstance(kwargs.get("description"), str):
            kwargs["description"] = kwargs["description"].replace("``", "")
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def run_command(func: Callable, args, *, prog: str) -> int:
    """Runs a subcommand and reports how it failed.

    Bad arguments (pycurv's validation, missing packages, out of memory for
    the sizes asked) are one line and exit status 2. An exception raised in
    the user's own code (their setup, model or loss) is reported as theirs:
    their file and line, the traceback of their frames, exit status 1.
    """
    from ..errors import MissingDependencyError, PycurvError

    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except UserCodeError as exc:
        sys.stderr.write(user_code_report(prog, exc.exc, exc.files) or f"{prog}: error in your code: {exc}\n")
        return 1
    except (CliError, MissingDependencyError) as exc:
        sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
        return 2
    except PycurvError as exc:
        if isinstance(exc, (ValueError, TypeError)):  # an argument pycurv rejected
            sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
            return 2
        # What the measurement found (NaN products, no convergence): said in one line, exit 1.
        sys.stderr.write(f"{prog}: error: {type(exc).__name__}: {_one_line(exc)}\n")
        return 1
    except BaseException as exc:  # noqa: BLE001 - classified below, re-raised if it is pycurv's own bug
        report = user_code_report(prog, exc)
        if report is not None:
            sys.stderr.write(report)
            return 1
        if isinstance(exc, (ValueError, TypeError)):
            # Validation errors from the library name the offending value.
            sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
            return 2
        if isinstance(exc, MemoryError):  # the sizes asked for: pycurv's own messages name the bytes
            sys.stderr.write(f"{prog}: error: out of memory: {_one_line(exc) or 'an allocation failed'}\n")
            return 2
        if isinstance(exc, OSError):  # a file pycurv was asked to write or read
            sys.stderr.write(f"{prog}: error: {_one_line(exc)}\n")
            return 2
        raise


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _library_dirs() -> tuple:
    """Folders whose code is not the user's: pycurv, the standard library and installed packages."""
    import pycurv

    dirs = {os.path.dirname(os.path.realpath(pycurv.__file__))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.realpath(path))
    return tuple(d + os.sep for d in dirs)


def _is_users(filename: str, files: tuple, libraries: tuple) -> bool:
    if not filename or filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    path = os.path.realpath(filename)
    if path in files:
        return True
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not path.startswith(libraries)


def user_code_report(prog: str, exc: BaseException, files: Iterable[str] = ()) -> Optional[str]:
    """The report of an exception that passed through the user's code, or None if it did not.

    First line: ``PROG: error in your code (FILE, line N, in FUNC): Type: message``;
    then the traceback from the user's outermost frame on (pycurv's own frames
    above it are not theirs). A SyntaxError in their file shows its line.
    """
    files = tuple(os.path.realpath(f) for f in files if f)
    libraries = _library_dirs()
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [i for i, f in enumerate(frames) if _is_users(f.filename, files, libraries)]
    syntax = isinstance(exc, SyntaxError) and exc.filename and _is_users(exc.filename, files, libraries)
    if syntax:
        where = f"{exc.filename}, line {exc.lineno}"
    elif mine:
        f = frames[mine[-1]]
        where = f"{f.filename}, line {f.lineno}, in {f.name}"
    else:
        return None
    if isinstance(exc, SystemExit):
        return (f"{prog}: error in your code ({where}): it called sys.exit({exc.code!r}) instead of returning; "
                "pycurv needs the setup to return (or define) model, loss_fn, data[, optimizer]\n")
    last = traceback.format_exception_only(type(exc), exc)
    head = f"{prog}: error in your code ({where}): {_one_line(last[-1])}\n"
    if not mine:  # a SyntaxError: its own lines show the file, the line and where
        return head + "".join(last)
    body = traceback.format_list(frames[mine[0]:])
    return head + "Traceback of your code (most recent call last):\n" + "".join(body) + "".join(last)


def finite_float(text: str) -> float:
    """argparse type: a finite real number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def integer(text: str) -> int:
    """argparse type: an integer, also written as a float with an integer value (``1e6``)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not math.isfinite(value) or not value.is_integer() or abs(value) > 2.0 ** 53:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
    return int(value)


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def seed64(text: str) -> int:
    """argparse type: a 64-bit seed, 0 <= seed < 2**64."""
    value = integer(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must satisfy 0 <= seed < 2**64, got {text!r}")
    return value


def output_file(text: str) -> str:
    """argparse type: a file to write (--plot): its folder must exist and be writable."""
    if not text:
        raise argparse.ArgumentTypeError("empty file name")
    folder = os.path.dirname(os.path.abspath(text)) or os.sep
    if os.path.isdir(text):
        example = os.path.join(text, "plot.png")
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name, e.g. {example!r}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no such folder: {folder!r} (to write {text!r})")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {folder!r}: permission denied")
    return text


def emit_json(obj: Any) -> None:
    """Strict JSON (no NaN/Infinity) on stdout."""
    sys.stdout.write(json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n")


def _strict(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_strict(v) for v in obj.tolist()]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj
