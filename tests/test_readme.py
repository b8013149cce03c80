"""The README's Python snippets run as written.

Every ```python block of README.md runs on its own, in a fresh namespace and a temporary
working directory, so a snippet that uses a name it does not define, or an API that changed,
fails here. A snippet that imports an optional package (PyTorch, ml_dtypes, mpi4py) is skipped when
that package is not installed.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
OPTIONAL = {"torch", "ml_dtypes", "sklearn", "threadpoolctl", "mpi4py"}


def _snippets():
    """(first line number in README.md, code) of each ```python block."""
    text = README.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S):
        line = text.count("\n", 0, m.start(1)) + 1
        out.append((line, m.group(1)))
    return out


SNIPPETS = _snippets()


def _imports(code):
    """Top-level package names the code imports."""
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3
    # every snippet brings its own imports: none relies on an earlier one's names
    for line, code in SNIPPETS:
        assert {"numpy", "cbn"} <= _imports(code), f"README.md line {line}"


@pytest.mark.parametrize("line,code", SNIPPETS, ids=[f"line{ln}" for ln, _ in SNIPPETS])
def test_readme_snippet_runs(line, code, tmp_path, monkeypatch):
    for name in sorted(_imports(code) & OPTIONAL):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"the snippet needs {name}")
    monkeypatch.chdir(tmp_path)
    # Padded so that a traceback names the snippet's line in README.md.
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    exec(compiled, {"__name__": "__readme__"})
