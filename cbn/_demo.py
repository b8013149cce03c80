"""``python -m cbn demo``: the seed experiments of ``examples/`` in their quick form.

The examples are one set of files: ``examples/*.py`` in the source tree, which the wheel
installs as ``cbn/examples/*.py`` (``package-dir`` in pyproject.toml), so the demo runs
from an installed wheel in any directory as well as from a checkout. Each example is a
script with ``main(argv) -> dict``; the demo imports it by path and calls ``main``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["EXAMPLES", "examples_dir", "build_parser", "main"]

#: Name -> (one-line description, argv for the quick form, modules it needs beyond cbn).
EXAMPLES: Dict[str, tuple] = {
    "deep_mlp": ("a 100-layer MLP: per-layer output std with and without BatchNorm1d",
                 ["--quick"], ()),
    "bad_init_regression": ("a badly initialized regression MLP that only learns with BN",
                            ["--quick"], ()),
    "digits": ("scikit-learn's handwritten digits, an MLP with and without BN",
               ["--quick"], ("sklearn",)),
}

_PIP_NAMES = {"sklearn": "scikit-learn"}


def examples_dir() -> Optional[Path]:
    """The folder holding the example scripts: ``cbn/examples`` of an installed package,
    else ``examples/`` next to the ``cbn`` folder of a source tree; None if neither."""
    package = Path(__file__).resolve().parent
    for where in (package / "examples", package.parent / "examples"):
        if all((where / f"{name}.py").is_file() for name in EXAMPLES):
            return where
    return None


def _missing(modules: Sequence[str]) -> List[str]:
    """The modules of ``modules`` that do not import (None in sys.modules counts)."""
    out = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            out.append(name)
    return out


def _run_example(where: Path, name: str, argv: List[str]) -> None:
    """Import ``where/name.py`` as a fresh module and call its ``main(argv)``; sys.path and
    the examples' helper module (``_mlp``) are restored afterwards."""
    saved_path = list(sys.path)
    saved_helper = sys.modules.pop("_mlp", None)
    try:
        spec = importlib.util.spec_from_file_location(f"cbn_demo_{name}", where / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(argv)
    finally:
        sys.path[:] = saved_path
        sys.modules.pop("_mlp", None)
        if saved_helper is not None:
            sys.modules["_mlp"] = saved_helper


def build_parser(prog: str = "python -m cbn demo") -> argparse.ArgumentParser:
    """The ``demo`` sub-command's arguments."""
    listing = "\n".join(f"  {name:<20} {desc}" for name, (desc, _, _) in EXAMPLES.items())
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the seed experiments (examples/) in their quick form: "
                    "NumPy networks that use cbn.BatchNorm1d.",
        epilog=f"examples:\n{listing}\n\n'digits' needs scikit-learn; when it is not "
               "installed the default run skips it and says so.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"examples to run, of {', '.join(EXAMPLES)} (default: all)")
    return p


def _check_names(p: argparse.ArgumentParser, names: List[str]) -> None:
    unknown = [n for n in names if n not in EXAMPLES]
    if unknown:
        p.error(f"unknown example {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(EXAMPLES)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the chosen examples (all by default); returns the exit status."""
    p = build_parser()
    args = p.parse_args(argv)
    _check_names(p, args.names)
    where = examples_dir()
    if where is None:
        print("cbn demo: the example scripts are missing from this installation "
              f"(looked in {Path(__file__).resolve().parent / 'examples'}); "
              "reinstall cbn from its wheel or sdist.", file=sys.stderr)
        return 2
    explicit = bool(args.names)
    for name in args.names or list(EXAMPLES):
        desc, quick_argv, needs = EXAMPLES[name]
        missing = _missing(needs)
        if missing:
            pip = [_PIP_NAMES.get(m, m) for m in missing]
            msg = (f"the '{name}' example needs {', '.join(pip)}, which is not installed: "
                   f"pip install {' '.join(pip)}  (or pip install 'cbn[examples]')")
            if explicit:
                print(f"cbn demo: {msg}", file=sys.stderr)
                return 2
            print(f"\n=== {name}: skipped; {msg}")
            continue
        print(f"\n=== {name} {' '.join(quick_argv)}: {desc}", flush=True)
        _run_example(where, name, list(quick_argv))
    return 0
