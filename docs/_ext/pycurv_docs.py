"""What the docs make at build time, from the repository and the installed package.

- The README's sections are included by the guide pages, so the README stays the one
  source of their text. When a page includes ``README.md``, an ``<!-- BEGIN
  section:SLUG -->`` / ``<!-- END section:SLUG -->`` pair is put around each of its
  ``##`` sections (SLUG is the heading's GitHub anchor) for the page's
  ``:start-after:`` and ``:end-before:`` options, and the README's links are pointed at
  the page that holds their target: ``(#anchor)`` of a section another page includes,
  ``(bench/RESULTS.md)`` of a file a page includes.
- ``pycurv-cli``: the reference of the ``pycurv`` command, each subcommand's
  ``--help`` as its parser prints it (``pycurv.cli.build_parser``).
- ``pycurv-figure NAME``: a figure rendered now, by the command or code shown above it.
- Each module of ``pycurv_api_modules`` must document every name of its ``__all__``
  with a docstring: a missing one is a warning, so ``-W`` fails the build.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from sphinx.util import logging

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"^(```|~~~)")
_INCLUDE = re.compile(r"^```\{include\}\s+(\S+)\s*$")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(title: str) -> str:
    """GitHub's heading anchor, as MyST makes it (``myst_heading_anchors``)."""
    try:
        from myst_parser.slugs import github_slugify
    except ImportError:  # myst-parser < 5.2
        return re.sub(r"[^\w\u4e00-\u9fff\- ]", "", title.lower().replace(" ", "-"))
    return github_slugify(title)


def _headings(text: str):
    """(line index, level, slug) of each Markdown heading outside code fences."""
    fenced = False
    for i, line in enumerate(text.splitlines()):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^(#{1,6}) (.+?)\s*$", line)
        if m:
            yield i, len(m.group(1)), _slug(m.group(2))


# -- the README's sections ---------------------------------------------------------


def _scan_includes(app) -> None:
    """Which page includes which file, and which README section: ``app.pycurv_includes``."""
    srcdir = Path(app.srcdir)
    found: dict = {}
    for page in sorted(srcdir.rglob("*.md")):
        if "_build" in page.relative_to(srcdir).parts:
            continue
        docname = page.relative_to(srcdir).with_suffix("").as_posix()
        for line in page.read_text(encoding="utf-8").splitlines():
            m = _INCLUDE.match(line)
            if m:
                target = (page.parent / m.group(1)).resolve()
                found.setdefault(("file", target), docname)
            m = re.match(r"^:start-after:\s*<!-- BEGIN section:(\S+) -->", line)
            if m:
                found.setdefault(("section", m.group(1)), docname)
    app.pycurv_includes = found


def _mark_readme(app, relative_path, parent_docname, content) -> None:
    """``include-read``: section markers and retargeted links in an included README.md."""
    path = (Path(app.srcdir) / relative_path).resolve()
    if path.name != "README.md":
        return
    text = content[0]
    lines = text.splitlines()
    includes = getattr(app, "pycurv_includes", {})

    # Each heading's slug -> the ## section that holds it.
    section_of: dict = {}
    starts = []
    current = None
    for i, level, slug in _headings(text):
        if level == 2:
            current = slug
            starts.append((i, slug))
        if current is not None:
            section_of[slug] = current

    def target(link: str) -> str:
        if link.startswith("#"):
            page = includes.get(("section", section_of.get(link[1:], "")))
            return f"/{page}.md{link}" if page else link
        if "://" in link or link.startswith("mailto:"):
            return link
        linked = (path.parent / link.split("#")[0]).resolve()
        page = includes.get(("file", linked))
        if page is None and linked == Path(app.srcdir).resolve():
            page = app.config.root_doc  # the docs themselves: their front page
        return f"/{page}.md" if page else link

    def retarget(line: str) -> str:
        return _LINK.sub(lambda m: f"]({target(m.group(1))})", line)

    out = []
    bounds = {i: slug for i, slug in starts}
    open_slug = None
    fenced = False
    for i, line in enumerate(lines):
        if i in bounds:
            if open_slug is not None:
                out.append(f"<!-- END section:{open_slug} -->")
            open_slug = bounds[i]
            out.append(f"<!-- BEGIN section:{open_slug} -->")
        if _FENCE.match(line):
            fenced = not fenced
            out.append(line)
            continue
        out.append(line if fenced else retarget(line))
    if open_slug is not None:
        out.append(f"<!-- END section:{open_slug} -->")
    content[0] = "\n".join(out) + "\n"


# -- the CLI reference -------------------------------------------------------------


def _subcommands(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            return [(name, helps.get(name), sub) for name, sub in action.choices.items()]
    return []


def _help_text(parser) -> str:
    """``--help`` at a fixed width, without colour, whatever the terminal."""
    env = {"COLUMNS": "80", "NO_COLOR": "1", "PYTHON_COLORS": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        text = parser.format_help()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return re.sub(r"\x1b\[[0-9;]*m", "", text).rstrip() + "\n"


class CliReference(Directive):
    """``.. pycurv-cli::`` — ``pycurv --help`` and a section per subcommand with its ``--help``."""

    has_content = False

    def run(self):
        from pycurv.cli import build_parser

        parser = build_parser()
        document = self.state.document
        out = [nodes.literal_block(text := _help_text(parser), text, language="text")]
        for name, summary, sub in _subcommands(parser):
            title = f"pycurv {name}"
            section = nodes.section(ids=[nodes.make_id(title)], names=[nodes.fully_normalize_name(title)])
            section += nodes.title(title, title)
            if summary:
                section += nodes.paragraph(summary, summary[:1].upper() + summary[1:] + ".")
            help_text = _help_text(sub)
            section += nodes.literal_block(help_text, help_text, language="text")
            document.note_implicit_target(section, section)
            out.append(section)
        return out


# -- figures -----------------------------------------------------------------------


def _cli_figure(*argv):
    def make(path: Path, root: Path) -> None:
        from pycurv.cli import main

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            status = main([*argv, "--plot", str(path)])
        if status != 0:
            raise RuntimeError(f"pycurv {' '.join(argv)} exited with {status}: {err.getvalue()}")

    # The command as a shell line continued with backslashes before an option, to fit the page.
    groups = ["$ pycurv"]
    for word in [*argv, "--plot", "FIGURE.png"]:
        if word.startswith("--") or len(groups) == 1:
            groups.append(word)
        else:
            groups[-1] += " " + word
    lines = [groups[0]]
    for group in groups[1:]:
        if len(lines[-1]) + 1 + len(group) > 72:
            lines.append("   ")
        lines[-1] += " " + group
    make.shown = " \\\n".join(lines)
    make.language = "console"
    return make


# A shortened run of examples/edge_of_stability.py (one learning rate, 500 steps instead of
# three and 3000: about ten seconds on one core). Its figure is the example's own; the
# Tracker's figure is drawn from the same run.
_EOS_CALL = ("edge_of_stability.main(lrs=(0.6,), steps=500, every=25,\n"
             "                              plot=FIGURE, verbose=False)")
_eos_runs: dict = {}


def _edge_of_stability(root: Path, plot: Path):
    if "runs" not in _eos_runs:
        import sys

        examples = str(root / "examples")
        if examples not in sys.path:
            sys.path.insert(0, examples)
        module = importlib.import_module("edge_of_stability")
        # eval: the code run is the code shown above the figure, word for word.
        _eos_runs["runs"] = eval(_EOS_CALL, {"edge_of_stability": module, "FIGURE": str(plot)})
        _eos_runs["figure"] = plot
    return _eos_runs["runs"]


def _eos_figure(path: Path, root: Path) -> None:
    _edge_of_stability(root, path)
    if _eos_runs["figure"] != path:
        import shutil

        shutil.copyfile(_eos_runs["figure"], path)


def _tracker_figure(path: Path, root: Path) -> None:
    runs = _edge_of_stability(root, path.with_name("edge-of-stability.png"))
    tracker, _ = runs[0.6]
    tracker.plot(path)


_eos_figure.shown = "import edge_of_stability  # in examples/\n" + "runs = " + _EOS_CALL.replace("FIGURE", '"FIGURE.png"')
_eos_figure.language = "python"
_tracker_figure.shown = 'tracker, losses = runs[0.6]\ntracker.plot("FIGURE.png")'
_tracker_figure.language = "python"

FIGURES = {
    "stability-region": _cli_figure("bound", "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9",
                                    "--sharpness", "35"),
    "stability-region-minibatch": _cli_figure("bound", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "32",
                                              "--dataset-size", "50000", "--curvature-variance", "2000",
                                              "--sharpness", "30"),
    "nqm": _cli_figure("nqm", "--batch-sizes", "1,4,16,64,256,1024"),
    "edge-of-stability": _eos_figure,
    "tracker": _tracker_figure,
}


class Figure(Directive):
    """``.. pycurv-figure:: NAME`` — the command or code that draws it, then the figure;
    the directive's content is the caption."""

    required_arguments = 1
    has_content = True
    option_spec = {"alt": directives.unchanged, "width": directives.unchanged}

    def run(self):
        env = self.state.document.settings.env
        name = self.arguments[0]
        if name not in FIGURES:
            raise self.error(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
        make = FIGURES[name]
        out_dir = Path(env.app.doctreedir) / "pycurv_figures"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.png"
        make(path, Path(env.srcdir).parent)
        shown = make.shown.replace("FIGURE.png", f"{name}.png")
        code = nodes.literal_block(shown, shown, language=make.language)
        doc_dir = (Path(env.srcdir) / env.docname).parent
        uri = Path(os.path.relpath(path, doc_dir)).as_posix()
        figure = nodes.figure()
        figure += nodes.image(uri=uri, alt=self.options.get("alt", name), width=self.options.get("width", "100%"))
        if self.content:
            parsed = nodes.Element()
            self.state.nested_parse(self.content, self.content_offset, parsed)
            para = next(iter(parsed.findall(nodes.paragraph)), None)
            if para is not None:
                figure += nodes.caption(para.rawsource, "", *para.children)
        return [code, figure]


# -- re-exported names --------------------------------------------------------------


def _home(modules, module, name) -> str:
    """The public module that documents ``module.name`` in full: the most specific one
    whose ``__all__`` holds it and whose name prefixes the object's ``__module__``."""
    obj = getattr(importlib.import_module(module), name)
    where = getattr(obj, "__module__", "") or ""
    homes = [m for m in modules if m != module and (where == m or where.startswith(m + "."))
             and name in getattr(importlib.import_module(m), "__all__", ())]
    return max(homes, key=len) if homes else ""


def _signature(obj) -> str:
    import inspect

    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "()"
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


class Reexport(Directive):
    """``.. pycurv-reexport:: NAME ...`` — an entry for each name the current module
    re-exports: its signature and summary, and a link to its full entry on the page of
    the module it comes from. (A class documented in full on two pages would be two
    descriptions of one canonical object, which Sphinx rejects.)"""

    required_arguments = 1
    final_argument_whitespace = True
    has_content = False

    def run(self):
        import inspect

        from docutils.statemachine import StringList
        from sphinx.util.nodes import nested_parse_with_titles

        env = self.state.document.settings.env
        module = env.ref_context.get("py:module")
        if not module:
            raise self.error("pycurv-reexport needs a current module (py:module or currentmodule)")
        lines = []
        for name in self.arguments[0].split():
            home = _home(env.config.pycurv_api_modules, module, name)
            if not home:
                raise self.error(f"{module}.{name} is not re-exported from another module of pycurv_api_modules")
            obj = getattr(importlib.import_module(module), name)
            if inspect.isclass(obj):
                kind, role = ("exception" if issubclass(obj, BaseException) else "class"), "class"
            else:
                kind, role = "function", "func"
            summary = (inspect.getdoc(obj) or "").split("\n\n")[0].splitlines()
            lines += [f".. py:{kind}:: {name}{_signature(obj)}", ""]
            lines += [f"   {line}" for line in summary] + [""]
            lines += [f"   Re-exported from :mod:`{home}`: see :{role}:`{home}.{name}`.", ""]
        container = nodes.Element()
        nested_parse_with_titles(self.state, StringList(lines, source="pycurv-reexport"), container)
        return container.children


# -- completeness of the API pages -------------------------------------------------


def _check_api(app, env) -> None:
    """Every name of each module's ``__all__`` has a docstring and an entry on the API pages."""
    import inspect

    py = env.get_domain("py")
    for modname in app.config.pycurv_api_modules:
        if modname not in py.modules:
            logger.warning("%s has no API page (no py:module directive)", modname)
        module = importlib.import_module(modname)
        for name in module.__all__:
            full, obj = f"{modname}.{name}", getattr(module, name)
            if inspect.ismodule(obj):
                listed = obj.__name__ in py.modules
            else:
                listed = full in py.objects
            if not listed:
                logger.warning("%s is public (in %s.__all__) but has no entry on the API pages", full, modname)
            if inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj):
                # A class's own docstring: __doc__ is not inherited, but be explicit about it.
                doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
                if not (doc or "").strip():
                    logger.warning("%s is public (in %s.__all__) but has no docstring", full, modname)


def _numpydoc_warnings_as_sphinx_warnings() -> None:
    """numpydoc reports a docstring it cannot parse (an unknown section, whose text it then
    drops) with ``warnings.warn``, which ``-W`` does not see: make each a Sphinx warning."""
    import warnings

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "numpydoc" in str(filename):
            logger.warning("numpydoc: %s", message)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def setup(app):
    _numpydoc_warnings_as_sphinx_warnings()
    app.add_config_value("pycurv_api_modules", [], "env")
    app.connect("builder-inited", _scan_includes)
    app.connect("include-read", _mark_readme)
    app.connect("env-check-consistency", _check_api)
    app.add_directive("pycurv-cli", CliReference)
    app.add_directive("pycurv-figure", Figure)
    app.add_directive("pycurv-reexport", Reexport)
    return {"version": "1", "parallel_read_safe": False, "parallel_write_safe": True}
