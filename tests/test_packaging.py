"""What the installed distribution ships besides code: type information, the license, its metadata."""

from __future__ import annotations

import importlib.metadata
import pathlib

import pycurv

PACKAGE = pathlib.Path(pycurv.__file__).parent


def test_type_information_is_installed():
    assert (PACKAGE / "py.typed").is_file()
    compiled = {p.name.split(".")[0] for p in PACKAGE.iterdir() if p.suffix in (".so", ".pyd")}
    assert "_core" in compiled
    for name in compiled:  # a stub beside every compiled module (_core, and _cuda when built)
        assert (PACKAGE / f"{name}.pyi").is_file(), name


def test_license_is_in_the_distribution():
    dist = importlib.metadata.distribution("pycurv")
    assert dist.metadata["License-Expression"] == "BSD-3-Clause"
    licenses = [f for f in dist.files or [] if f.name == "LICENSE"]
    assert licenses, "no LICENSE among the installed distribution's files"
    assert licenses[0].read_text().startswith("BSD 3-Clause License")


def test_test_extra_does_not_pin_torch():
    reqs = importlib.metadata.requires("pycurv") or []
    torch = [r for r in reqs if r.startswith("torch") and 'extra == "test"' in r]
    assert torch and "==" not in torch[0].split(";")[0], torch
