"""The Examples sections of cbn's docstrings, run as doctests.

Every docstring example in the public modules runs here (so the README's test command
runs them), each as its own test. Every public function and class must have an Examples
section with at least one example: a name added to a public ``__all__`` without one fails
test_public_names_have_examples.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import pkgutil

import numpy as np
import pytest

import cbn

#: the modules whose docstrings are user documentation (cbn._threads holds the thread
#: functions cbn re-exports; cbn._state the state, file and converter methods that the
#: module classes inherit, and cbn.load)
MODULES = ["cbn", "cbn.functional", "cbn.modules", "cbn._state", "cbn.fusion", "cbn._threads",
           "cbn.distributed", "cbn._config"]
#: cbn.distributed is a package: its files' docstrings are documentation too
MODULES += ["cbn.distributed." + m.name for m in pkgutil.iter_modules(
    importlib.import_module("cbn.distributed").__path__) if m.name != "__main__"]
#: modules whose examples run too, but whose names are bindings (ctypes structs and
#: constants of the C ABI) or need an optional package (cbn.jax: jax)
EXAMPLES_ONLY = ["cbn.abi"] + (["cbn.jax"] if importlib.util.find_spec("jax") else [])

#: public names whose docstring is not in a Python module: openmp_enabled is defined in the
#: compiled cbn/_kernels.pyx; the package docstring (cbn.__doc__) shows it in use.
COMPILED = {"openmp_enabled", "capi", "output_pool"}

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _doctests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in MODULES + EXAMPLES_ONLY:
        module = importlib.import_module(name)
        tests += [t for t in finder.find(module) if t.examples]
    return sorted(tests, key=lambda t: t.name)


DOCTESTS = _doctests()


def test_doctests_were_found():
    names = {t.name for t in DOCTESTS}
    assert {"cbn", "cbn.functional.batch_norm", "cbn.modules.BatchNorm",
            "cbn._state.StateMixin.load_state_dict", "cbn.fusion.fold"} <= names
    assert len(DOCTESTS) >= 30


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples(test):
    out = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    globs = test.globs
    test.globs = dict(globs)                 # a fresh namespace for each run
    try:
        with np.printoptions(legacy=False):
            result = runner.run(test, out=out.append, clear_globs=True)
    finally:
        test.globs = globs
    assert result.attempted > 0
    assert result.failed == 0, "".join(out)


def _public_objects():
    """(qualified name, object) for each public function, class and method."""
    seen = {}
    for modname in MODULES[1:]:
        module = importlib.import_module(modname)
        for name in module.__all__:
            seen.setdefault(name, getattr(module, name))
    for name in cbn.__all__:
        obj = getattr(cbn, name)
        if callable(obj) and name not in COMPILED:
            seen.setdefault(name, obj)
    out = []
    for name, obj in sorted(seen.items()):
        out.append((name, obj))
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__call__":
                    continue
                if isinstance(member, property):
                    member = member.fget
                elif isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isfunction(member):
                    out.append((f"{name}.{attr}", member))
    return out


def test_public_names_have_examples():
    lacking = [name for name, obj in _public_objects()
               if "Examples\n" not in (inspect.getdoc(obj) or "")
               or ">>> " not in (inspect.getdoc(obj) or "")]
    assert not lacking, f"public names without an Examples section: {lacking}"


def test_batch_norm_docstring_is_complete():
    doc = inspect.getdoc(cbn.batch_norm)
    for section in ("Parameters", "Returns", "Raises", "See Also", "Notes", "Examples"):
        assert f"\n{section}\n{'-' * len(section)}\n" in doc, section
    params = inspect.signature(cbn.batch_norm).parameters
    described = doc.split("Parameters\n")[1].split("Returns\n")[0]
    for p in params:
        assert p in described, p
