"""The C loops are compiled for several CPU targets and one is chosen at import
(cbn/src/cbn_kernels.h). Every target must give bit-identical results: the loops are
lane-wise IEEE arithmetic in a fixed order and FMA contraction is off.

Each supported target is forced in turn (cbn._kernels.select_cpu_target, the function
behind CBN_CPU_TARGET) and every loop shape of test_kernel_paths is compared with the
baseline target's results, byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import cbn
from cbn import _kernels

from test_kernel_paths import PATH_IDS, PATHS, _data, _run

SUPPORTED = [name for name, ok in _kernels.cpu_targets() if ok]


@pytest.fixture
def restore_target():
    before = _kernels.cpu_target()
    yield
    _kernels.select_cpu_target(before)


def _everything(shape, axis, dtype, params=None):
    """Every output on 2 threads; ``params``: the dtype of the per-channel vectors (default
    the input's: a half input then has half parameters; float32 is PyTorch's mixed mode)."""
    x, w, b, rm, rv, g, r = _data(shape, axis, np.float64)
    x, g, r = (a.astype(dtype) for a in (x, g, r))
    w, b, rm, rv = (a.astype(params or dtype) for a in (w, b, rm, rv))
    return _run(x, w, b, rm, rv, g, r, axis, 2)


def _half(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


def _same_bits_on_every_target(what, compute):
    _kernels.select_cpu_target("base")
    want = compute()
    for target in SUPPORTED:
        _kernels.select_cpu_target(target)
        got = compute()
        assert got.keys() == want.keys()
        for key, b in want.items():
            a = got[key]
            assert a.dtype == b.dtype and a.shape == b.shape
            assert a.tobytes() == b.tobytes(), f"target {target}, {key}: {what}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis,what", PATHS, ids=PATH_IDS)
def test_every_target_gives_the_same_bits(shape, axis, what, dtype, restore_target):
    _same_bits_on_every_target(what, lambda: _everything(shape, axis, dtype))


@pytest.mark.parametrize("params", ["half", "float32"], ids=["half_params", "f32_params"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape,axis,what", PATHS, ids=PATH_IDS)
def test_every_target_gives_the_same_bits_in_half_precision(shape, axis, what, dtype, params,
                                                             restore_target):
    dt = _half(dtype)
    pdt = dt if params == "half" else np.dtype(np.float32)
    _same_bits_on_every_target(what, lambda: _everything(shape, axis, dt, pdt))


def test_the_best_supported_target_is_chosen(restore_target):
    assert _kernels.select_cpu_target(None) == SUPPORTED[0]
    assert _kernels.select_cpu_target("auto") == SUPPORTED[0]
    assert "base" in SUPPORTED


def test_unknown_or_unsupported_targets_are_refused(restore_target):
    before = _kernels.cpu_target()
    with pytest.raises(ValueError, match="unknown CPU target 'sse9'"):
        _kernels.select_cpu_target("sse9")
    with pytest.raises(TypeError):
        _kernels.select_cpu_target(3)
    for name, ok in _kernels.cpu_targets():
        if not ok:
            with pytest.raises(ValueError, match="cannot run"):
                _kernels.select_cpu_target(name)
    assert _kernels.cpu_target() == before


def _import_with(env_value):
    env = dict(os.environ, CBN_CPU_TARGET=env_value)
    code = "import cbn; print(cbn.show_config(mode='dicts')['cpu_target'])"
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("target", SUPPORTED)
def test_cbn_cpu_target_forces_a_target_at_import(target):
    p = _import_with(target)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == target


def test_a_bad_cbn_cpu_target_warns_and_falls_back():
    p = _import_with("nonsense")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == SUPPORTED[0]
    assert "CBN_CPU_TARGET ignored" in p.stderr


def test_show_config_reports_the_build():
    c = cbn.show_config(mode="dicts")
    assert c["cpu_target"] == _kernels.cpu_target()
    assert "-ffp-contract=off" in c["build_flags"]
    assert "-ffast-math" not in c["build_flags"]
    with pytest.raises(ValueError, match="mode"):
        cbn.show_config(mode="json")


def test_show_config_prints(capsys):
    assert cbn.show_config() is None
    out = capsys.readouterr().out
    assert "CPU target:" in out and _kernels.cpu_target() in out
