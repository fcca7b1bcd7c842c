"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build/html``.

The guides include the README's sections (one source of truth, see
``_ext/pycurv_docs.py``), the API pages document the installed ``pycurv``
from its numpydoc docstrings, and the CLI reference and the figures are made
at build time from the installed package.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
# The docs describe the installed package: the source tree has no compiled core, so it
# must not shadow the installed one (``python -m sphinx`` run from the repository root
# would put the root first on sys.path).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import pycurv  # noqa: E402

project = "pycurv"
author = "the pycurv developers"
copyright = "the pycurv developers"
version = release = pycurv.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "pycurv_docs",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
templates_path: list = []

# Markdown: GitHub-style heading anchors, so the README's own links (#which-loss-...) work.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
# The README's sections start at H2 (its H1 is the project's name), and so does every
# guide page that includes one of them: a page titled by an H2 is intended here.
suppress_warnings = ["myst.header"]

# API pages: documented objects in source order, signatures without the type noise
# of long annotations (the numpydoc sections carry the types).
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"show-inheritance": False}
autosummary_generate = False
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "alabaster"
html_title = f"pycurv {release}"
html_theme_options = {
    "description": "Sharpness of a loss and the training-stability bounds it implies",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
html_static_path: list = []
html_show_sourcelink = False

# Checked by _ext/pycurv_docs.py: every name of each __all__ has a docstring and an entry.
pycurv_api_modules = ["pycurv", "pycurv.stability", "pycurv.solvers", "pycurv.torch", "pycurv.jax", "pycurv.distributed"]
