"""cbn's type information as a user sees it: ``mypy --strict`` on small user programs.

user_script.py exercises the public API (functional calls, modules, state_dict, backward,
fold, the Keras converters, threads) and must type-check cleanly; it is also run, so what
it asserts about the values is true. bad_script.py misuses the API: mypy must report exactly
its marked lines, which shows that it reads cbn's annotations and the compiled module's stub
(``_kernels.pyi``) rather than ``Any``. cbn's own modules are analysed with ``--follow-imports=silent``, as
mypy treats an installed package: their annotations count, their internals are not judged.
The mypy tests skip when mypy is not installed (it is in the ``test`` extra).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tokenize
from pathlib import Path

import pytest

import cbn

HERE = Path(__file__).resolve().parent
#: the directory that holds the cbn package being tested (the source tree or site-packages)
PACKAGE_ROOT = Path(cbn.__file__).resolve().parent.parent


def _installed() -> bool:
    """Whether the cbn under test is installed in site-packages (mypy finds it there through
    ``--python-executable``, and refuses a site-packages directory in MYPYPATH)."""
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    return PACKAGE_ROOT in site


def run_mypy(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("mypy")
    env = dict(os.environ)
    env.pop("MYPYPATH", None)
    if not _installed():                     # the source tree, or an editable install
        env["MYPYPATH"] = str(PACKAGE_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--no-color-output", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"),
         "--python-executable", sys.executable, script],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=600)


def test_package_ships_type_information():
    pkg = PACKAGE_ROOT / "cbn"
    assert (pkg / "py.typed").is_file()
    assert (pkg / "_kernels.pyi").is_file()


def test_user_script_passes_mypy_strict(tmp_path):
    r = run_mypy("user_script.py", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_script_errors_are_reported(tmp_path):
    r = run_mypy("bad_script.py", tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    with open(HERE / "bad_script.py", "rb") as f:
        marked = {tok.start[0] for tok in tokenize.tokenize(f.readline)
                  if tok.type == tokenize.COMMENT and re.match(r"# E\b", tok.string)}
    reported = {int(m.group(1)) for m in re.finditer(r"^bad_script\.py:(\d+): error:",
                                                     r.stdout, re.M)}
    assert len(marked) >= 8
    assert reported == marked, r.stdout


def test_user_script_runs():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(PACKAGE_ROOT)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    r = subprocess.run([sys.executable, str(HERE / "user_script.py")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "user script ok" in r.stdout
