"""The house rules that keep the code readable (issue 26): every public module says what it exports, no module
grows past ~500 lines, no function body past 80. The layers contract itself is import-linter's (`make test`)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import imgclf

PACKAGE = Path(imgclf.__file__).parent
MODULE_LINES = 520  # "about 500": a module past this holds two concepts; split it
FUNCTION_BODY_LINES = 80  # from the first statement after the docstring: signatures and docstrings may be long
# A module that must stay longer is named here with its limit and the reason (none today: config.py became config/).
LONG_MODULES: dict[str, int] = {}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _public(path: Path) -> bool:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return not any(part.startswith("_") for part in parts if part != "__init__")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(("imgclf", *(part for part in parts if part != "__init__")))


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return node.end_lineno - body[0].lineno + 1


@pytest.mark.parametrize("path", [p for p in _modules() if _public(p)], ids=_name)
def test_every_public_module_lists_what_it_exports(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module = importlib.import_module(_name(path))
    exported = getattr(module, "__all__", None)
    if path.name == "__init__.py" and len(tree.body) <= 1:
        return  # a bare package marker with a docstring only
    assert exported is not None, f"{path.relative_to(PACKAGE)} has no __all__"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{path.relative_to(PACKAGE)}: __all__ names {missing}, which it does not define"
    defined = [
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_")
    ]
    unlisted = sorted(set(defined) - set(exported))
    assert not unlisted, f"{path.relative_to(PACKAGE)}: public {unlisted} not in __all__ (list it, or name it _private)"


def test_modules_and_functions_stay_within_a_readable_size():
    long_modules, long_functions = [], []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        lines = text.count("\n")
        if lines > LONG_MODULES.get(str(path.relative_to(PACKAGE)), MODULE_LINES):
            long_modules.append(f"{path.relative_to(PACKAGE)} ({lines} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _body_lines(node) > FUNCTION_BODY_LINES:
                long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({_body_lines(node)})")
    assert not long_modules, f"modules over {MODULE_LINES} lines: {long_modules}"
    assert not long_functions, f"function bodies over {FUNCTION_BODY_LINES} lines: {long_functions}"


def test_benchmarks_and_scripts_import_only_what_imgclf_has():
    """The benchmarks are not run by the tests, so a name moved between modules would break them silently
    (fashion_mnist.py imported `auto_early_pool` from models.registry after it had moved to device)."""
    root = PACKAGE.parent.parent
    missing = []
    for path in sorted([*root.glob("benchmarks/*.py"), *root.glob("scripts/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "imgclf":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names if not _has(module, a.name)]
    assert not missing, f"imports of names imgclf does not have: {missing}"


def _has(module, name: str) -> bool:
    if hasattr(module, name):
        return True
    try:
        importlib.import_module(f"{module.__name__}.{name}")
        return True
    except ImportError:
        return False
