"""The import graph of the installed package: no circles, and the layers of DESIGN §1 hold.

Every ``import`` statement counts, including those inside functions: a lazy
import that runs in a circle still ties the two modules together.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pycurv

ROOT = Path(pycurv.__file__).resolve().parent

ADAPTERS = ("pycurv.torch", "pycurv.jax")
CLI = ("pycurv.cli", "pycurv.__main__")
PROCESS_GROUPS = ("pycurv.distributed",)
# The solver: driver, operators, results, checks, the device runner, the
# sharded-basis driver and the Communicator protocol it needs.
SOLVER = ("pycurv.lanczos", "pycurv._drive", "pycurv._sharded", "pycurv._comm", "pycurv.operators",
          "pycurv.results", "pycurv._checks", "pycurv._gpu", "pycurv._devices", "pycurv._native",
          "pycurv.errors", "pycurv._optional", "pycurv._memory")


def _modules():
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    # Compiled modules import nothing of ours; a stub (.pyi) declares one that this build may lack (_cuda).
    for path in sorted(list(ROOT.rglob("*.so")) + list(ROOT.rglob("*.pyd")) + list(ROOT.rglob("*.pyi"))):
        parts = list(path.relative_to(ROOT.parent).parts)
        parts[-1] = parts[-1].split(".")[0]
        out.setdefault(".".join(parts), (None, False))
    return out


MODULES = _modules()


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _resolve(module: str, is_package: bool, node) -> set:
    """The pycurv modules an import statement loads (parents' ``__init__`` not counted)."""
    found = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == "pycurv" and alias.name in MODULES:
                found.add(alias.name)
        return found
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "pycurv":
        return found
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.add(sub if sub in MODULES else target)
    return {m for m in found if m in MODULES}


def _graph():
    graph = {}
    for name, (path, is_package) in MODULES.items():
        if path is None:
            graph[name] = set()
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _resolve(name, is_package, node)
        edges.discard(name)
        graph[name] = edges
    return graph


GRAPH = _graph()


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, comps = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_walk_sees_the_package():
    assert "pycurv.lanczos" in GRAPH and "pycurv.torch.operator" in GRAPH and "pycurv.jax.tracker" in GRAPH
    assert "pycurv._drive" in GRAPH["pycurv.lanczos"]
    assert "pycurv.torch.functions" in GRAPH["pycurv.torch.tracker"]
    assert "pycurv._core" in GRAPH["pycurv._native"]


def test_cycle_finder_finds_a_planted_circle():
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["pycurv._comm"].add("pycurv.lanczos")  # lanczos -> _sharded -> _drive -> _comm -> lanczos
    assert any("pycurv.lanczos" in c and "pycurv._comm" in c for c in _cycles(planted))


def test_no_import_circles():
    assert _cycles(GRAPH) == []


def test_nothing_below_the_adapters_imports_an_adapter_or_the_cli():
    bad = [(m, t) for m, targets in GRAPH.items() if not _under(m, ADAPTERS + CLI)
           for t in targets if _under(t, ADAPTERS + CLI)]
    assert bad == []


def test_the_solver_never_imports_process_group_code():
    bad = [(m, t) for m, targets in GRAPH.items() if _under(m, SOLVER) for t in targets
           if _under(t, PROCESS_GROUPS + ADAPTERS + CLI)]
    assert bad == []
    assert all(m in MODULES for m in SOLVER)


def test_the_tracker_core_knows_no_framework():
    tree = ast.parse(MODULES["pycurv.track"][0].read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add((node.module or "").split(".")[0])
    assert not roots & {"torch", "jax", "optax"}
    assert not any(_under(t, ADAPTERS) for t in GRAPH["pycurv.track"])


def test_importing_from_the_source_folder_says_it_shadows_the_installed_package():
    """From the repository root (where the README's install leaves the user) ./pycurv hides the installed one."""
    repo = Path(__file__).resolve().parent.parent
    source = repo / "pycurv"
    if source.resolve() == ROOT or any(source.glob("_core*.so")) or any(source.glob("_core*.pyd")):
        pytest.skip("the source folder is the installed package here (an in-place or editable build)")
    proc = subprocess.run([sys.executable, "-c", "import pycurv"], cwd=repo, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: pycurv is installed (in {ROOT}), but Python imported the source folder "
                           f"{source} instead"), last
    assert last.endswith("Change to another directory (e.g. cd ..) and run again")
