"""How much of the public API says its types: the share of annotated parameters of every public
function and method of stepflow_tl (``self``/``cls`` left out; a private module, class or
function, or a dunder other than ``__init__``/``__call__``, is not public).

``python tests/test_annotations.py`` prints the share and every parameter still without one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stepflow_tl"
TARGET = 0.90


def public_parameters(package: Path = PACKAGE) -> list[tuple[str, bool]]:
    """``("path:line function(param)", annotated)`` for every public parameter."""
    out = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent)
        if any(part.startswith("_") and part not in ("__init__.py", "__main__.py") for part in rel.parts[1:]):
            continue
        _visit(ast.parse(path.read_text(encoding="utf-8")).body, "", False, str(rel), out)
    return out


def _visit(body: list, prefix: str, in_class: bool, rel: str, out: list) -> None:
    for node in body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            _visit(node.body, f"{prefix}{node.name}.", True, rel, out)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.name.startswith("_") and node.name not in ("__init__", "__call__"):
                continue
            a = node.args
            params = a.posonlyargs + a.args + a.kwonlyargs + [p for p in (a.vararg, a.kwarg) if p]
            static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
            if in_class and not static and params and params[0].arg in ("self", "cls"):
                params = params[1:]
            for p in params:
                out.append((f"{rel}:{node.lineno} {prefix}{node.name}({p.arg})", p.annotation is not None))


def share(params: list[tuple[str, bool]]) -> float:
    return sum(ok for _, ok in params) / len(params)


def test_public_parameters_are_annotated():
    params = public_parameters()
    missing = [name for name, ok in params if not ok]
    print(f"annotated public parameters: {len(params) - len(missing)}/{len(params)} = {share(params):.1%}")
    assert len(params) > 500, "the scan found too few functions; is PACKAGE right?"
    assert share(params) >= TARGET, "add annotations to:\n" + "\n".join(missing)


if __name__ == "__main__":
    found = public_parameters()
    print(f"annotated public parameters: {sum(ok for _, ok in found)}/{len(found)} = {share(found):.1%}")
    print("\n".join(name for name, ok in found if not ok))
