"""The code's shape: small modules and functions, and the boundaries between packages."""
from __future__ import annotations

import ast

from _util import ROOT

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


def test_the_flow_reads_no_private_member_of_a_model():
    """The flow talks to searchable models through `SearchHooks` and their public API only."""
    found = []
    for path in sorted(OPTIMIZE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                owner = node.value
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    found.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not found, found

