"""The documentation: docs/ builds with Sphinx without a warning, and documents every public name.

The build runs in a subprocess (``python -m sphinx -W``), as a reader or CI would run
it, into a temporary folder: a broken reference, a malformed docstring or a README
section that a guide page can no longer find fails it. Every name of each public
module's ``__all__`` must have a docstring and an entry, with text, on its API page.
"""

from __future__ import annotations

import html
import importlib
import inspect
import re
import subprocess
import sys

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
# Each public module and its API page.
API_PAGES = {
    "pycurv": "api/pycurv",
    "pycurv.stability": "api/stability",
    "pycurv.solvers": "api/solvers",
    "pycurv.torch": "api/torch",
    "pycurv.jax": "api/jax",
    "pycurv.distributed": "api/distributed",
}
MIN_PAGES = 18  # index, 8 guides, examples, CLI, API index and 6 module pages

pytestmark = pytest.mark.skipif(not (DOCS / "conf.py").is_file(), reason="needs the repository's docs/ folder")


def _source_pages():
    return sorted(p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*")
                  if p.suffix in (".md", ".rst") and not {"_build", "_ext"} & set(p.relative_to(DOCS).parts))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The HTML site, built once for this module (about 20 s)."""
    tmp = tmp_path_factory.mktemp("docs")
    out = tmp / "html"
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-q",
                           str(DOCS), str(out)], cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stderr[-6000:]}"
    return out


def test_docs_build_without_warnings(site):
    pages = _source_pages()
    built = sorted(p.relative_to(site).with_suffix("").as_posix() for p in site.rglob("*.html")
                   if p.name not in ("genindex.html", "search.html", "py-modindex.html"))
    assert built == pages
    assert len(pages) >= MIN_PAGES, pages
    for name in ("stability-region.png", "nqm.png", "edge-of-stability.png", "tracker.png"):
        assert (site / "_images" / name).stat().st_size > 10_000, name


def _undocumented(module) -> list:
    """Names of ``module.__all__`` without a docstring of their own (modules, classes, functions)."""
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj):
            doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
            if not (doc or "").strip():
                missing.append(name)
    return missing


def _entry_text(page_html: str, full_name: str):
    """The text of the entry for ``full_name`` on an HTML page, or None without one."""
    m = re.search(rf'<dt[^>]*\bid="{re.escape(full_name)}"[^>]*>.*?</dt>\s*<dd>(.*?)</dd>', page_html, flags=re.S)
    if m is None:
        return None
    return html.unescape(re.sub(r"<[^>]+>", " ", m.group(1))).strip()


def _unlisted(module, page_html: str, site) -> list:
    """Names of ``module.__all__`` without an entry with text on ``page_html``.

    A submodule listed in ``__all__`` counts as listed when it has its own page."""
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.ismodule(obj):
            page = API_PAGES.get(obj.__name__)
            if page is None or f'id="module-{obj.__name__}"' not in (site / f"{page}.html").read_text("utf-8"):
                missing.append(name)
        elif not _entry_text(page_html, f"{module.__name__}.{name}"):
            missing.append(name)
    return missing


@pytest.mark.parametrize("modname", API_PAGES)
def test_public_names_have_docstrings(modname):
    module = importlib.import_module(modname)
    assert _undocumented(module) == [], f"public names of {modname} without a docstring"


@pytest.mark.parametrize("modname", API_PAGES)
def test_public_names_have_entries(site, modname):
    module = importlib.import_module(modname)
    page_html = (site / f"{API_PAGES[modname]}.html").read_text("utf-8")
    assert _unlisted(module, page_html, site) == [], f"public names of {modname} missing from {API_PAGES[modname]}"


def test_checks_catch_a_missing_docstring_and_a_missing_entry(site):
    """The two checks above do fail: a new public function without a docstring or a page."""
    import types

    fake = types.ModuleType("pycurv")
    fake.__all__ = ["lanczos", "brand_new"]
    fake.lanczos = importlib.import_module("pycurv").lanczos
    exec("def brand_new(x):\n    return x\n", fake.__dict__)
    page_html = (site / "api/pycurv.html").read_text("utf-8")
    assert _undocumented(fake) == ["brand_new"]
    assert _unlisted(fake, page_html, site) == ["brand_new"]


def test_cli_reference_lists_every_subcommand(site):
    from pycurv.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    page = (site / "cli.html").read_text("utf-8")
    for name, subparser in sub.choices.items():
        assert f'id="pycurv-{name}"' in page, name
        for action in subparser._actions:
            for flag in action.option_strings:
                assert html.escape(flag) in page, f"pycurv {name} {flag}"
