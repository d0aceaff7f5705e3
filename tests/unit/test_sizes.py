"""Size limits on the package's code, read from the source: no class over 300 lines or 20
methods, no function (method, nested function) over 60 lines. A unit that grows past them
is split by responsibility; the limits have no exceptions."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGE = ROOT / "minimesh"
MAX_CLASS_LINES = 300
MAX_METHODS = 20
MAX_FUNCTION_LINES = 60


def oversized(source: str, name: str) -> list[str]:
    """Every class and function in `source` (a module called `name`) past a limit, as
    `name:line kind qualified.name (what)`."""
    found: list[str] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                qualified = f"{prefix}{child.name}"
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                if isinstance(child, ast.ClassDef):
                    methods = sum(isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef) for b in child.body)
                    if lines > MAX_CLASS_LINES or methods > MAX_METHODS:
                        found.append(f"{name}:{child.lineno} class {qualified} ({lines} lines, {methods} methods)")
                elif lines > MAX_FUNCTION_LINES:
                    found.append(f"{name}:{child.lineno} function {qualified} ({lines} lines)")
                visit(child, f"{qualified}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def test_no_class_or_function_in_the_package_is_past_its_limit() -> None:
    found = [
        problem
        for path in sorted(PACKAGE.rglob("*.py"))
        for problem in oversized(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not found, "split these by responsibility:\n" + "\n".join(found)


def test_the_limits_are_counted_as_written() -> None:
    def body(lines: int, indent: str = "    ") -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(lines))

    def methods(count: int) -> str:
        return "".join(f"    def m{i}(self) -> None: ...\n" for i in range(count))

    source = (
        f"class Fine:\n{methods(MAX_METHODS)}"
        f"class Crowded:\n{methods(MAX_METHODS + 1)}"
        f"class Roomy:\n{body(MAX_CLASS_LINES - 1)}"
        f"class Tall:\n{body(MAX_CLASS_LINES)}"
        f"def fits():\n{body(MAX_FUNCTION_LINES - 1)}"
        f"async def grows():\n{body(MAX_FUNCTION_LINES)}"
        f"class Outer:\n    def inner(self) -> None:\n{body(MAX_FUNCTION_LINES, '        ')}"
    )
    assert [problem.split(" ", 1)[1] for problem in oversized(source, "m.py")] == [
        f"class Crowded ({MAX_METHODS + 1 + 1} lines, {MAX_METHODS + 1} methods)",
        f"class Tall ({MAX_CLASS_LINES + 1} lines, 0 methods)",
        f"function grows ({MAX_FUNCTION_LINES + 1} lines)",
        f"function Outer.inner ({MAX_FUNCTION_LINES + 1} lines)",
    ]
