"""The package's shape: no import cycle, `to_torch` independent of imports, small modules and
functions in the optimize flow, and the flow's boundary with the models."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import plinio_onnx

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package (``plinio_onnx.passes`` included): name → (file, is a package)."""
    packages = {"plinio_onnx": Path(plinio_onnx.__file__).parent,
                "plinio_onnx.passes": Path(plinio_onnx.passes.__file__).parent}
    modules = {}
    for package, folder in packages.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Module → the package's modules it imports, anywhere in it (function-local imports too).
    ``from a.b import c`` depends on ``a.b.c`` when that is a module, else on ``a.b``."""
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        deps.add(sub)
                    elif target in modules:
                        deps.add(target)
        graph[name] = deps - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first walk (empty: the graph is acyclic)."""
    state: dict[str, int] = {}
    path: list[str] = []
    found = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_import_graph_sees_the_package():
    graph = _import_graph()
    assert {"plinio_onnx.to_torch.builder", "plinio_onnx.passes.pit", "plinio_onnx.functions.pit"} <= graph.keys()
    assert "plinio_onnx.to_torch.context" in graph["plinio_onnx.functions.pit"]
    assert "plinio_onnx.to_torch.ops" in graph["plinio_onnx.to_torch.builder"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycle():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


_STRUCTURE = """
import json, sys, types
{before}
from plinio_onnx.load import load
from plinio_onnx.passes import pit
from plinio_onnx.to_torch import to_torch
graph = pit(load(sys.argv[1]))
{after}
module = to_torch(graph)
print(json.dumps({{"methods": "plinio_onnx.methods.pit" in sys.modules,
                  "modules": sorted(type(m).__name__ for m in module.modules()),
                  "parameters": sorted(n for n, _ in module.named_parameters()),
                  "code": module.code}}))
"""
# The package's __init__ imports the methods: a stand-in keeps them out.
_WITHOUT_METHODS = """
stand_in = types.ModuleType("plinio_onnx.methods")
stand_in.MPS = stand_in.PIT = stand_in.SuperNet = stand_in.ODiMO = stand_in.odimo = stand_in.ParallelLatency = None
stand_in.SearchableModel = type("SearchableModel", (), {})  # what the optimize flow names
sys.modules["plinio_onnx.methods"] = stand_in
"""
# The methods imported, and a PIT model (whose module is fused) built first.
_WITH_METHODS = "import plinio_onnx.methods"
_PIT_FIRST = "plinio_onnx.methods.PIT(graph)"


def _structure(before: str, after: str = "") -> dict:
    script = _STRUCTURE.format(before=before, after=after)
    out = subprocess.run([sys.executable, "-c", script, str(MODELS / "tcn.onnx")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_to_torch_independent_of_imports():
    # Whatever was imported (and built) before, to_torch builds the module it is asked for: one
    # call per node; the fused masks only where a method requests them (`module_passes`).
    alone = _structure(_WITHOUT_METHODS)
    after_methods = _structure(_WITH_METHODS, _PIT_FIRST)
    assert not alone.pop("methods") and after_methods.pop("methods")
    assert alone == after_methods
    assert "PITMasks" not in alone["modules"] and "channel_mask(" in alone["code"]
    import plinio_onnx as po
    fused = po.PIT(MODELS / "tcn.onnx").module
    assert any(type(m).__name__ == "PITMasks" for m in fused.modules())


OPTIMIZE = ROOT / "plinio_onnx" / "optimize"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_optimize_package_has_small_modules_and_functions():
    modules = sorted(OPTIMIZE.glob("*.py"))
    assert {p.stem for p in modules} >= {"config", "data", "checkpoint", "report", "control", "progress",
                                         "flow", "methods"}
    too_long = []
    for path in modules:
        text = path.read_text()
        lines = len(text.splitlines())
        if lines >= 600:
            too_long.append(f"{path.name}: {lines} lines")
        for fn in _functions(ast.parse(text)):
            length = fn.end_lineno - fn.lineno + 1
            if length >= 80:
                too_long.append(f"{path.name}:{fn.lineno} {fn.name}: {length} lines")
    assert not too_long, too_long


# torch's own private members the flow reads, each with why there is no public way.
_TORCH_PRIVATE = {
    "_use_count": "a tensor's C++ reference count: gloo's release of a collective's tensors (distributed.py)",
}


def test_the_flow_reads_no_private_member_of_a_model():
    """The flow talks to searchable models through `SearchHooks` and their public API only."""
    found = []
    for path in sorted(OPTIMIZE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.attr not in _TORCH_PRIVATE:
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not found, found



# What each package may import (docs/architecture.md); the command-line modules may import anything.
_ALLOWED = {
    "errors": set(), "atomic": set(), "heap": set(), "host": set(), "runtime": {"errors"},
    "graph": {"errors", "atomic", "serialize"}, "serialize": set(), "file_weights": {"serialize"},
    "analysis": {"graph"},
    "records": {"analysis", "errors"},
    "cost": {"graph", "host", "records", "errors"},
    "to_torch": {"graph", "load", "functions", "host", "errors"},
    "functions": {"to_torch", "graph", "host", "errors", "atomic"},
    "passes": {"analysis", "cost", "functions", "graph", "heap", "records", "errors"},
    "load": {"graph", "file_weights", "passes", "errors"}, "sync": {"graph", "errors"}, "finalize": {"graph", "passes", "errors"},
    "methods": {"cost", "finalize", "functions", "graph", "hardware", "heap", "host", "load", "passes", "records",
                "sync", "to_torch", "errors"},
    "regularizers": {"errors", "host"},
    "hardware": {"analysis", "cost", "host", "load", "runtime", "errors", "passes", "finalize"},
    "optimize": {"atomic", "cost", "data", "errors", "finite", "graph", "hardware", "load", "methods", "regularizers",
                 "runtime", "sync",
                 "to_torch", "analysis", "finalize", "functions", "host", "passes", "records"},
    "training_graph": {"graph", "records", "errors"}, "requantize": {"graph", "load", "errors"},
    "training_artifacts": {"graph", "load", "optimize", "training_graph", "requantize", "errors"},
}


def _package(module: str) -> str:
    parts = module.split(".")
    return "passes" if parts[1:2] == ["passes"] else parts[1] if len(parts) > 1 else ""


def test_packages_import_only_what_the_architecture_allows():
    found = []
    for module, imported in _import_graph().items():
        package = _package(module)
        if package not in _ALLOWED:
            continue  # the command line and the package's __init__ may import anything
        for target in imported:
            other = _package(target)
            if other and other != package and other not in _ALLOWED[package]:
                found.append(f"{module} imports {target}")
    assert not found, found
