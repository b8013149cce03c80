"""The float16 and bfloat16 loop tables of cbn/src (cbn_ops_h, cbn_ops_b) against the
float table, in C: tests/capi/half_loops.c, compiled here with the system compiler and
the flags setup.py gives the kernels, then run. It checks every CPU target this machine
runs (results bit-identical to converting the data exactly to float, running the float
loops and rounding their outputs to nearest even), and the conversions exhaustively."""

import os
import platform
import shutil
import subprocess
import sysconfig

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(HERE, "capi", "half_loops.c")


def _compiler():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc = cc.split()[0]
    return shutil.which(cc) or shutil.which("cc")


def _flags():
    flags = ["-O2", "-ffp-contract=off", "-fno-math-errno", "-std=gnu11",
             "-I", os.path.join(ROOT, "cbn", "src"),
             "-I", os.path.join(ROOT, "cbn", "include")]
    # the targets' `#pragma GCC target` regions: x86-64 with GCC, as in setup.py
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-DCBN_MULTI_TARGET")
    return flags


@pytest.fixture(scope="module")
def half_loops(tmp_path_factory):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler")
    out = str(tmp_path_factory.mktemp("half_loops") / "half_loops")
    cmd = [cc] + _flags() + [SRC, "-o", out, "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and "-DCBN_MULTI_TARGET" in cmd:
        # a compiler without GCC's target pragmas (clang): the base target only
        cmd.remove("-DCBN_MULTI_TARGET")
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail("half_loops.c does not compile:\n" + r.stderr[-4000:])
    return out


def test_half_loops_against_float(half_loops):
    r = subprocess.run([half_loops, "3000"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok"), r.stdout
    # every target the installed module has and this CPU runs was checked (the harness
    # compiles the same target list as the module, unless the compiler lacks the pragmas)
    if "-DCBN_MULTI_TARGET" in _flags():
        from cbn import _kernels
        for name, supported in _kernels.cpu_targets():
            if supported:
                assert f"target {name}: checked" in r.stdout, (name, r.stdout)
