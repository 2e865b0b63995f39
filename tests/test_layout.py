"""The package's layering (docs/architecture.md), checked statically over stepflow_tl/.

Every ``import`` in the package (module level or inside a function) is resolved to the
module it names. The rules:

- each module belongs to one layer; a layer imports only layers below it (and itself);
- so the graph of imports between subpackages has no cycle, and nothing but the
  facade (``stepflow_tl/__init__.py``, ``__main__.py``) imports the CLI;
- no module imports the package root (the facade is for users, not for the library);
- a ``_private`` name is imported only inside its own subpackage;
- only the rule engine (``traces/formats.py``) defines segmentation rules: the names of
  the rules, the format tags as text, and branches on a format's name;
- the examples use the public API and never the CLI.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stepflow_tl"
# Bottom to top; a layer may import the layers before it. checks, errors and stats are the base.
LAYERS = ("base", "tl", "traces", "viz", "saliency", "interventions", "engines", "study", "cli")
BASE_MODULES = {"checks", "errors", "stats"}
FACADE = {"stepflow_tl", "stepflow_tl.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "facade"
    if parts[1] in BASE_MODULES:
        return "base"
    return parts[1]


def _is_package(module: str) -> bool:
    return (ROOT / Path(*module.split(".")) / "__init__.py").is_file()


def _imports(path: Path):
    """``(line, imported module, [names])`` of every stepflow_tl import in ``path``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stepflow_tl":
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "stepflow_tl":
                continue
            names = [a.name for a in node.names]
            if node.module is None or _is_package(target):
                # "from . import x" / "from .pkg import mod": a submodule is imported by name
                subs = [n for n in names if (ROOT / Path(*target.split("."), n + ".py")).is_file()
                        or _is_package(f"{target}.{n}")]
                for n in subs:
                    yield node.lineno, f"{target}.{n}", []
                names = [n for n in names if n not in subs]
                if not names:
                    continue
            yield node.lineno, target, names


def _all_imports():
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for line, target, names in _imports(path):
            yield path.relative_to(ROOT), line, module, target, names


def test_every_module_is_in_a_layer():
    unknown = sorted({_layer(_module_name(p)) for p in PACKAGE.rglob("*.py")} - set(LAYERS) - {"facade", "__main__"})
    assert not unknown, f"modules outside the layers of docs/architecture.md: {unknown}"


def test_imports_flow_down_the_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for path, line, module, target, _ in _all_imports():
        if module in FACADE:
            continue
        src, dst = _layer(module), _layer(target)
        if dst == "facade":
            bad.append(f"{path}:{line} imports the package root {target} (import from the subpackage)")
        elif rank[dst] > rank[src]:
            bad.append(f"{path}:{line}: {src} imports {target} ({dst} is above {src})")
    assert not bad, "\n".join(bad)


def test_no_cycle_between_subpackages():
    edges = {}
    for _, _, module, target, _ in _all_imports():
        src, dst = _layer(module), _layer(target)
        if module not in FACADE and src != dst:
            edges.setdefault(src, set()).add(dst)
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError(f"import cycle between subpackages: {' -> '.join(stack[stack.index(node):] + [node])}")
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in sorted(edges):
        visit(node)


def test_the_library_never_imports_the_cli():
    bad = [f"{path}:{line} imports {target}" for path, line, module, target, _ in _all_imports()
           if _layer(target) == "cli" and _layer(module) != "cli" and module not in FACADE]
    assert not bad, "\n".join(bad)


# TransformerLens' HookPoint is the one backend-neutral piece every layer may use.
BACKEND_NEUTRAL = {"transformer_lens.hook_points"}


def _absolute_imports(node: ast.AST) -> list:
    """The absolute module names an ``import`` / ``from ... import`` node names (none for others)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level:
        return [node.module or ""]
    return []


def test_only_tl_knows_the_backends():
    """Outside tl/ no module asks ``adapter(model).kind`` or imports transformers or
    TransformerLens internals: what differs between the backends has one home."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _layer(_module_name(path)) == "tl":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = _absolute_imports(node)
            for target in targets:
                if target.split(".")[0] in ("transformers", "transformer_lens") and target not in BACKEND_NEUTRAL:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
            if (isinstance(node, ast.Attribute) and node.attr == "kind" and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) == "adapter"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} asks adapter(...).kind")
    assert not bad, "\n".join(bad)


def test_only_the_engine_module_imports_vllm():
    """vLLM's internals have one home, ``engines/vllm.py`` (which checks its version)."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "engines" / "vllm.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = _absolute_imports(node)
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {t}" for t in targets if t.split(".")[0] == "vllm"]
    assert not bad, "\n".join(bad)


def test_private_names_stay_in_their_subpackage():
    bad = []
    for path, line, module, target, names in _all_imports():
        if _layer(module) == _layer(target):
            continue
        private = [n for n in names if n.startswith("_")]
        private += [part for part in target.split(".") if part.startswith("_") and part != "__init__"]
        if private:
            bad.append(f"{path}:{line} imports {private} from {target}")
    assert not bad, "\n".join(bad)


RULE_ENGINE = PACKAGE / "traces" / "formats.py"
# The rules of steps: formats and their tags and markers, splits and their "auto", the
# parser, token ownership. A module that defines one of these names is a second engine.
RULE_NAMES = {
    "FORMATS", "FORMAT_CHOICES", "SPLITS", "SPLIT_CHOICES", "AUTO_SPLIT", "SHORT_SENTENCE_CHARS", "THINK_OPEN",
    "THINK_CLOSE", "HARMONY_END_TAGS", "HARMONY_HEAD_TAGS", "HARMONY_MESSAGE", "HARMONY_TAGS", "SUMMARY_MARKERS",
    "SUMMARY_MARKER_RE", "SENTENCE_END", "SENTENCE_CLOSERS", "StepParser", "step_starts", "detect_format",
    "resolve_format", "resolve_split", "format_for_parts", "render_output", "prompt_for_output",
    "token_owner", "token_labels", "question_labels", "harmony_channel_mode", "harmony_initial_mode",
}
FORMAT_TAGS = ("<think>", "</think>", "<|channel|>", "<|message|>", "<|start|>", "<|end|>", "<|return|>",
               "<|call|>", "<|constrain|>")
FORMAT_NAMES = {"r1", "harmony", "plain"}


def _names_a_format(node) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "format" in name or name == "fmt"


def test_only_the_rule_engine_defines_segmentation_rules():
    """Elsewhere: no definition of a rule's name, no format tag in code (docstrings may
    quote them), no ``format == "r1"``-style branch: adding a format or a split touches
    traces/formats.py only."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == RULE_ENGINE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
        where = f"{path.relative_to(ROOT)}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in RULE_NAMES:
                bad.append(f"{where}:{node.lineno} defines {node.name}")
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                bad += [f"{where}:{node.lineno} defines {t.id}" for t in targets
                        if isinstance(t, ast.Name) and t.id in RULE_NAMES]
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and any(tag in node.value for tag in FORMAT_TAGS)):
                bad.append(f"{where}:{node.lineno} writes a format tag: {node.value[:40]!r}")
            elif isinstance(node, ast.Compare) and any(map(_names_a_format, [node.left] + node.comparators)):
                values = [c for c in node.comparators + [node.left] for c in (c.elts if isinstance(c, ast.Tuple) else [c])]
                if any(isinstance(v, ast.Constant) and v.value in FORMAT_NAMES for v in values):
                    bad.append(f"{where}:{node.lineno} branches on a format's name")
    assert not bad, "segmentation rules outside traces/formats.py:\n" + "\n".join(bad)


def test_examples_use_the_public_api_and_not_the_cli():
    bad = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stepflow_tl"):
                parts = node.module.split(".")
                if "cli" in parts or len(parts) > 2 or any(a.name.startswith("_") for a in node.names):
                    bad.append(f"{path.name}:{node.lineno} from {node.module} import ...")
    assert not bad, "examples must import from stepflow_tl or a subpackage, never the CLI:\n" + "\n".join(bad)


@pytest.mark.parametrize("entry", ["stepflow_tl", "stepflow_tl.cli"])
def test_the_package_imports_in_a_fresh_interpreter(entry):
    """Each entry point imports on its own (an import cycle between modules would fail here)."""
    code = f"import importlib; importlib.import_module({entry!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
