"""Shared plumbing of the subcommands: one-line errors, JSON output, number parsing."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line (``pycurv CMD: error: ...``) and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def run_command(func: Callable, args, *, prog: str) -> int:
    """Runs a subcommand; user errors (bad values, missing packages) become one line and exit 2."""
    from ..errors import MissingDependencyError

    try:
        return int(func(args) or 0)
    except (CliError, MissingDependencyError) as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    except (ValueError, TypeError) as exc:
        # Validation errors from the library name the offending value.
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130


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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


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
