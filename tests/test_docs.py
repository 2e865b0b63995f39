"""The README's and the quickstart's code runs as written, from the public API.

Each page's ```python blocks run in order in one namespace (as a reader pastes them into
one session), on the tiny random model and with smaller budgets: the substitutions below
are the only changes, and each must apply, so an edited page cannot silently skip them.
A separate check reads every Python snippet in README, docs/ and examples/ and requires
one import path per public name: a name on the facade (`stepflow_tl.__all__`) is imported
from `stepflow_tl`, anything else from a subpackage, never from a private module.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import stepflow_tl

ROOT = Path(__file__).resolve().parents[1]
FAST = {
    "README.md": {
        "load_model()": 'load_model("tiny")',
        "blocks.3.attn.hook_step_pattern": "blocks.1.attn.hook_step_pattern",
        "max_new_tokens=64": "max_new_tokens=8",
    },
    "docs/quickstart.md": {
        "load_model()": 'load_model("tiny")',
        "blocks.2.attn.hook_step_pattern": "blocks.1.attn.hook_step_pattern",
        "max_new_tokens=64": "max_new_tokens=8",
        "n_per_level=6, levels=(1, 2, 3)": "n_per_level=1, levels=(1,)",
        "max_new_tokens=112": "max_new_tokens=8",
    },
}


def python_blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize("page", sorted(FAST))
def test_page_code_runs(page, tmp_path, monkeypatch):
    code = "\n".join(python_blocks((ROOT / page).read_text(encoding="utf-8")))
    assert code, f"{page} has no python code blocks"
    for old, new in FAST[page].items():
        assert old in code, f"{page} no longer contains {old!r}; update FAST in this test"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # the snippets write trace.html, out/study/...
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, page, "exec"), namespace)
    if page == "README.md":
        assert namespace["result"].maps.shape[0] == 2 and (tmp_path / "trace.html").is_file()
        assert len(namespace["out"]) == 1 and namespace["out"][0].interventions
    else:
        assert (tmp_path / "out/study/report.html").is_file()
        assert set(namespace["study"].summary()["condition"]) == {"baseline", "stepflow", "random_stepflow"}


IMPORT = re.compile(r"^\s*from (stepflow_tl[\w.]*) import (\([^)]*\)|[^\n#]*)", re.MULTILINE)


def snippet_imports():
    """``(where, module, name)`` of every stepflow_tl import in the docs and examples (by
    pattern: some doc snippets are fragments that do not parse as a whole)."""
    sources = [(p, python_blocks(p.read_text(encoding="utf-8"))) for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    sources += [(p, [p.read_text(encoding="utf-8")]) for p in sorted((ROOT / "examples").glob("*.py"))]
    for path, blocks in sources:
        for block in blocks:
            for module, names in IMPORT.findall(block):
                for name in names.strip("()").replace("\n", " ").split(","):
                    if name.strip():
                        yield path.relative_to(ROOT), module, name.split(" as ")[0].strip()


def test_docs_and_examples_use_one_import_path_per_name():
    public = set(stepflow_tl.__all__)
    bad = []
    for where, module, name in snippet_imports():
        if name in public and module != "stepflow_tl":
            bad.append(f"{where}: {name} from {module} (it is on the facade: from stepflow_tl import {name})")
        elif module.count(".") > 1 or name.startswith("_") or ".cli" in module:
            bad.append(f"{where}: {name} from {module} (import from stepflow_tl or a subpackage)")
        elif module != "stepflow_tl" and name not in getattr(__import__(module, fromlist=["_"]), "__all__", ()):
            bad.append(f"{where}: {name} is not in {module}.__all__")
    assert not bad, "\n".join(bad)
