"""Arguments that used to crash the process or be silently wrong.

Thread counts far beyond the machine (a segfault or "libgomp: Thread creation failed"),
ints too large for C, non-finite momentum, running statistics that are not 1-D. Each either
works, with the same bits as a plain call, or raises a ValueError/TypeError naming the
argument with nothing written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cbn
from cbn import _reference, _threads

from conftest import make_input, make_params

C = 4
BIG = (64, C, 512)                # 2**17 values: runs parallel when asked


class State:
    """Valid float64 arguments (training) and copies of everything a call could write."""

    def __init__(self, shape=(5, C, 3)):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(shape)
        self.dy = rng.standard_normal(shape)
        self.w = rng.uniform(0.5, 1.5, C)
        self.b = rng.uniform(-1, 1, C)
        self.rm = rng.uniform(-1, 1, C)
        self.rv = rng.uniform(0.5, 2, C)
        self.out = np.full(shape, 42.0)
        self._copies = {k: v.copy() for k, v in vars(self).items()
                        if isinstance(v, np.ndarray)}

    def forward(self, **kw):
        args = dict(weight=self.w, bias=self.b, running_mean=self.rm, running_var=self.rv,
                    training=True, momentum=0.1, eps=1e-5, out=self.out)
        args.update(kw)
        return cbn.batch_norm(kw.pop("input", self.x), **{k: v for k, v in args.items()
                                                         if k != "input"})

    def backward(self, **kw):
        args = dict(grad_output=self.dy, input=self.x, weight=self.w, save_mean=self.rm,
                    save_invstd=self.rv, training=True)
        args.update(kw)
        return cbn.batch_norm_backward(**args)

    def normalize(self, **kw):
        args = dict(axis=1)
        args.update(kw)
        return cbn.functional.normalize(self.x, self.rm, self.rv, self.b, **args)

    def assert_unchanged(self):
        for k, v in self._copies.items():
            np.testing.assert_array_equal(getattr(self, k), v, err_msg=f"{k} was modified")


def _raises(call, exc, match, shape=(5, C, 3)):
    s = State(shape)
    with pytest.raises(exc, match=match):
        call(s)
    s.assert_unchanged()


def _all_paths(x, n_threads):
    """Every entry point on x (fast path when x is C-contiguous, general otherwise)."""
    w, b, rm, rv = make_params(x.shape[1], x.dtype)
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5,
                                       n_threads=n_threads)
    ye = cbn.batch_norm(x, rm, rv, w, b, False, n_threads=n_threads)
    g = cbn.batch_norm_backward(x, x, w, sm, si, True, n_threads=n_threads)
    a = cbn.functional.normalize(x, rm, rv, b, n_threads=n_threads)
    return (y, sm, si, rm, rv, ye, a) + tuple(g)


# ------------------------------------------------------------------------ thread counts


@pytest.mark.parametrize("layout", ["plain", "strided"])
@pytest.mark.parametrize("n", [10 ** 6, 2 ** 31 - 1, 2 ** 31, 2 ** 70])
def test_huge_thread_counts_run_clipped(n, layout):
    x = make_input(BIG, 1, np.float32)
    if layout == "strided":
        x = np.asfortranarray(x)               # the general path
    expected = _all_paths(x, 1)
    for got, want in zip(_all_paths(x, n), expected):
        assert np.array_equal(got, want)
    cbn.set_num_threads(n)
    assert cbn.get_num_threads() == _threads.MAX_THREADS
    for got, want in zip(_all_paths(x, None), expected):
        assert np.array_equal(got, want)


def test_max_threads_is_documented_and_sane():
    assert _threads.MAX_THREADS >= 16
    assert "MAX_THREADS" in (cbn.set_num_threads.__doc__ or "")
    cbn.set_num_threads(_threads.MAX_THREADS + 1)
    assert cbn.get_num_threads() == _threads.MAX_THREADS


def test_omp_num_threads_huge_is_clipped():
    if not cbn.openmp_enabled():
        pytest.skip("cbn built without OpenMP")
    root = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cbn, numpy as np; "
            "from cbn import _threads; x = np.ones((64, 4, 512), np.float32); "
            "cbn.batch_norm(x, None, None, training=True); "
            "print(cbn.get_num_threads() == _threads.MAX_THREADS)")
    env = dict(os.environ, OMP_NUM_THREADS="100000")
    out = subprocess.run([sys.executable, "-c", code, root], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux's")
@pytest.mark.skipif("address" in os.environ.get("CBN_SANITIZE", ""),
                    reason="AddressSanitizer reserves terabytes of address space")
def test_many_threads_under_address_space_limit_do_not_kill_the_process():
    # 5000 threads under a 4 GB address space: libgomp could not create them and ended
    # the process ("libgomp: Thread creation failed"); clipped, the call completes.
    root = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    code = textwrap.dedent("""
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        import numpy as np, cbn
        limit = 4 << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        x = np.ones((64, 4, 512), np.float32)
        x[0] = 2.0
        for n in (5000, 10 ** 6):
            y = cbn.batch_norm(x, None, None, training=True, n_threads=n)
            assert np.isfinite(y).all()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("n", [True, False])
def test_bool_thread_count_is_type_error(n):
    for shape in ((5, C, 3), BIG):
        _raises(lambda s: s.forward(n_threads=n), TypeError, "n_threads", shape)
        _raises(lambda s: s.backward(n_threads=n), TypeError, "n_threads", shape)
        _raises(lambda s: s.normalize(n_threads=n), TypeError, "n_threads", shape)
    cbn.set_num_threads(2)
    with pytest.raises(TypeError, match="bool"):
        cbn.set_num_threads(n)
    assert cbn.get_num_threads() == 2


def test_requested_num_threads_reads_the_setting():
    assert _threads.requested_num_threads() is None
    cbn.set_num_threads(3)
    assert _threads.requested_num_threads() == 3
    cbn.set_num_threads(None)
    assert _threads.requested_num_threads() is None


# ----------------------------------------------------------------- ints too large for C


@pytest.mark.parametrize("axis", [2 ** 63, 2 ** 70, -2 ** 70])
def test_axis_too_large_for_c(axis):
    _raises(lambda s: s.forward(axis=axis), ValueError, "axis")
    _raises(lambda s: s.backward(axis=axis), ValueError, "axis")
    _raises(lambda s: s.normalize(axis=axis), ValueError, "axis")


@pytest.mark.parametrize("name", ["eps", "momentum"])
def test_real_too_large_for_float(name):
    _raises(lambda s: s.forward(**{name: 10 ** 400}), ValueError, name)


# ---------------------------------------------------------------------------- momentum


@pytest.mark.parametrize("momentum", [np.nan, np.inf, -np.inf, np.float32(np.nan)])
@pytest.mark.parametrize("layout", ["plain", "strided"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_finite_momentum_functional(momentum, layout, training):
    def call(s):
        x = s.x if layout == "plain" else np.asfortranarray(s.x)
        s.forward(input=x, momentum=momentum, training=training, out=None)
    _raises(call, ValueError, "momentum")


@pytest.mark.parametrize("momentum", [np.nan, np.inf, -np.inf])
def test_non_finite_momentum_module(momentum):
    with pytest.raises(ValueError, match="momentum"):
        cbn.BatchNorm1d(C, momentum=momentum)
    # assigned after construction: refused by the call, with nothing updated
    bn = cbn.BatchNorm1d(C, dtype=np.float64)
    bn.momentum = momentum
    state = {k: np.copy(v) for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="momentum"):
        bn(np.random.default_rng(0).standard_normal((8, C)))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


# ------------------------------------------------------------ running statistics' shape


def _running_layouts(dtype):
    """(name, array of C = 4 values whose C-order reading is `base`) for several layouts."""
    base = np.array([0.5, -1.0, 2.0, 0.25], dtype)
    f22 = np.asfortranarray(base.reshape(2, 2))
    strided = np.zeros(8, dtype)[::2]
    strided[...] = base
    neg = np.empty(4, dtype)[::-1]
    neg[...] = base
    return [("1d", base.copy()), ("c_2x2", base.reshape(2, 2).copy()), ("f_2x2", f22),
            ("col_4x1", base.reshape(4, 1).copy()), ("strided", strided),
            ("negative", neg), ("transposed_2x2", base.reshape(2, 2).T.copy().T)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", range(7))
def test_running_stats_of_any_shape_are_updated(layout, dtype):
    x = make_input((6, C, 5), 1, dtype)
    name, rm = _running_layouts(dtype)[layout]
    rv = np.abs(rm) + 1.0
    want_rm = rm.reshape(-1).astype(np.float64)        # C-order reading, as for weights
    want_rv = rv.reshape(-1).astype(np.float64)
    y_ref, _, _ = _reference.batch_norm_forward(x, None, None, want_rm, want_rv, True, 0.1,
                                                1e-5)
    y = cbn.batch_norm(x, rm, rv, training=True, momentum=0.1)
    np.testing.assert_allclose(rm.reshape(-1), want_rm, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(rv.reshape(-1), want_rv, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    # and eval reads them in the same order
    ye = cbn.batch_norm(x, rm, rv, training=False)
    ye_ref = _reference.batch_norm(x, rm.reshape(-1), rv.reshape(-1), training=False)
    np.testing.assert_allclose(ye, ye_ref, rtol=1e-5, atol=1e-5)
