"""The API reference covers every public name, and ``help()`` of every module class shows its
constructor's parameters.

Building the reference (Sphinx) and looking at it in a browser is ``.ci/docs``'s job; these
tests need neither and run everywhere.
"""

import inspect
import pydoc
import re
from pathlib import Path

import pytest

import cbn
import cbn.distributed

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.rst"


def _documented():
    """{module: names} listed in docs/api.rst's autosummary blocks."""
    if not API.is_file():
        pytest.skip("no docs/ next to the tests")
    out, module, in_block = {}, None, False
    for line in API.read_text().splitlines():
        m = re.match(r"\.\. currentmodule:: (\S+)", line)
        if m:
            module = m.group(1)
            continue
        if line.startswith(".. autosummary::"):
            in_block = True
            continue
        if in_block:
            name = line.strip()
            if not name or name.startswith(":"):
                continue
            if not line.startswith("   "):
                in_block = False
                continue
            out.setdefault(module, set()).add(name)
    return out


@pytest.mark.parametrize("module", [cbn, cbn.distributed], ids=lambda m: m.__name__)
def test_every_public_name_has_a_page(module):
    listed = _documented()
    public = {n for n in module.__all__ if not n.startswith("_")}
    here = listed.get(module.__name__, set())
    # a name cbn re-exports from cbn.distributed may be listed under either
    also = listed.get("cbn.distributed", set()) if module is cbn else set()
    missing = sorted(n for n in public if n not in here and n not in also)
    assert not missing, f"public names of {module.__name__} missing from docs/api.rst"
    for name in here:
        assert hasattr(module, name), f"docs/api.rst lists {module.__name__}.{name}"


def _module_classes():
    seen = []
    for cls in (cbn.BatchNorm, cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d,
                cbn.SyncBatchNorm):
        if cls not in seen:
            seen.append(cls)
    return seen


@pytest.mark.parametrize("cls", _module_classes(), ids=lambda c: c.__name__)
def test_help_shows_every_constructor_parameter(cls):
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    # the class's own docstring, up to the first method: help() prints it first
    own = inspect.getdoc(cls) or ""
    assert own.splitlines()[0] in text
    section = own.split("Parameters\n----------\n", 1)
    assert len(section) == 2, f"{cls.__name__}'s docstring has no Parameters section"
    documented = set(re.findall(r"^(\w+) :", section[1], flags=re.M))
    params = [p for p in inspect.signature(cls).parameters if p != "self"]
    missing = [p for p in params if p not in documented]
    assert not missing, f"{cls.__name__}: parameters not in its docstring: {missing}"
