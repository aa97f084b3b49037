"""The package's shape: no import cycle (lazy imports counted), few loose modules, small modules,
and every module a table names by string imports."""
from __future__ import annotations

import ast
import importlib
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "edge_effnet")
MAX_TOP_LEVEL = 8
MAX_LINES = 450


def modules() -> dict[str, str]:
    """dotted module name -> file path, for every module of edge_effnet."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return found


def imports_of(name: str, path: str, known: set[str]) -> set[str]:
    """Every edge_effnet module `name` imports, at the top or inside a function."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name}
    return out


def test_no_import_cycle():
    mods = modules()
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_layout_small_and_named():
    mods = modules()
    top = [m for m, p in mods.items() if os.path.dirname(p) == PACKAGE and not p.endswith("__init__.py")]
    assert len(top) <= MAX_TOP_LEVEL, top
    for part in ("model", "export", "runtime", "bench", "evaluate", "train"):
        assert f"edge_effnet.{part}" in mods
    long = {m: n for m, p in mods.items() if (n := len(open(p).read().splitlines())) > MAX_LINES}
    assert not long, long


def test_table_strings_import():
    """Modules and functions named by strings in the tables exist (a rename cannot leave one dangling)."""
    from edge_effnet.export.formats import FORMATS, MODES
    from edge_effnet.runtime.backends import BACKEND_TABLE

    for fmt in FORMATS.values():
        module = importlib.import_module(fmt.module)
        assert callable(module.convert) and callable(module.inspect), fmt.name
    reports = [m.report for m in MODES.values() if m.report]
    assert reports
    for report in reports:
        module, function = report.split(":")
        assert callable(getattr(importlib.import_module(module), function))
    for name, row in BACKEND_TABLE.items():
        assert row.extension.startswith(".") and row.module and "pip install" in row.install, name


def test_the_standalone_pi_classifier_knows_the_runtimes_the_library_does():
    """tools/rpi_classify.py cannot import edge_effnet: its copy of the runtime facts (file type,
    module, PyPI name, the order auto tries them) must match runtime.backends."""
    import importlib.util

    from edge_effnet.runtime.backends import AUTO_ORDER, BACKEND_TABLE

    spec = importlib.util.spec_from_file_location("rpi_classify", os.path.join(ROOT, "tools", "rpi_classify.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    light = [name for name in AUTO_ORDER if BACKEND_TABLE[name].light]
    assert list(tool.RUNTIMES) == light
    for name, row in tool.RUNTIMES.items():
        backend = BACKEND_TABLE[name]
        assert (row.suffix, row.module.split(".")[0], row.package) == \
            (backend.extension, backend.module, backend.package), name
