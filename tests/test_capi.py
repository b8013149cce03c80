"""cbn's C ABI (cbn/include/cbn.h, cbn.capi(), cbn/capi.pxd) against the Python API.

The oracle is cbn's own Python API on the same arrays, bit for bit: the ABI is another
door to the same core entries, so nothing may differ. Every status code is reached, and
each error's message is the Python API's for the same mistake. A downstream Cython
extension (tests/capi/downstream.pyx) is built against the installed package and calls
cbn from its own `prange` without the GIL; numba calls it from `@njit` (skips without).
"""

from __future__ import annotations

import ctypes as ct
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import cbn

from cbn import abi

# (shape, axis): planes (K >= 16), short planes, rows (K == 1), glued rows, 5-D
CASES = [((4, 6, 40), 1), ((3, 5, 7, 9), 1), ((64, 12), 1), ((8, 5, 5, 12), -1),
         ((2, 4, 3, 4, 5), 1), ((300, 40), 1)]
IDS = ["x".join(map(str, s)) + f"-ax{a}" for s, a in CASES]


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.uniform(-1, 1, C).astype(dtype)
    rm, rv = rng.uniform(-1, 1, C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    return x, g, w, b, rm, rv


def _view3(a, axis):
    """(M, C, K) view of a C-contiguous array."""
    ax = axis % a.ndim
    return a.reshape(int(np.prod(a.shape[:ax])), a.shape[ax], -1)


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


def _call(name, d, **fields):
    args = abi.ARGS[name]()
    for k, v in fields.items():
        setattr(args, k, abi.ptr(v) if isinstance(v, np.ndarray) else v)
    return abi.entry(name)(ct.byref(d), ct.byref(args))


def test_the_table():
    api = cbn.capi()
    assert api["abi_version"] == 1
    get = ct.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ct.c_void_p, [ct.py_object, ct.c_char_p]
    table = get(api["capsule"], b"cbn._kernels._C_API")
    head = ct.cast(table, ct.POINTER(ct.c_int32))
    assert head[0] == 1 and head[1] >= 8 + 8 + 10 * 8      # version, size: every entry
    version = ct.cast(table + 8, ct.POINTER(ct.c_char_p))[0]
    assert version.decode() == cbn.__version__
    # the entries in the table are the addresses cbn.capi() lists, in cbn.h's order
    fns = ct.cast(table + 16, ct.POINTER(ct.c_void_p))
    order = ["view", "forward", "normalize", "eval_params", "backward", "moments", "finish",
             "backward_reduce", "backward_elements", "status_name"]
    assert [fns[i] for i in range(len(order))] == [api[n] for n in order]
    assert [abi.entry("status_name")(s) for s in range(4)] == [
        b"ok", b"invalid argument", b"unsupported dtype", b"out of memory"]
    assert os.path.isfile(os.path.join(cbn.get_include(), "cbn.h"))
    assert os.path.isfile(os.path.join(cbn.get_include(), "cbn_core.h"))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_half_storage_through_the_abi(shape, axis, half):
    """float16 / bfloat16 storage computed in float32 (per-channel vectors float32): the
    half loops, as the Python API runs them."""
    dt = np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if half == "bfloat16" \
        else np.dtype(half)
    x, g, w, b, rm, rv = _data(shape, axis, np.float32)
    x, g = x.astype(dt), g.astype(dt)
    C = shape[axis]
    x3, g3 = _view3(x, axis), _view3(g, axis)
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm1, rv1, True, 0.1, 1e-5, axis=axis)
    y2, sm2, si2 = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
    d = abi.desc(x3, 2)
    assert d.storage == (abi.BF16 if half == "bfloat16" else abi.F16) and d.compute == abi.F32
    r = _call("forward", d, training=1, act=abi.act(), momentum=0.1, eps=1e-5, x=x3, y=y2,
              weight=w, bias=b, running_mean=rm2, running_var=rv2, save_mean=sm2,
              save_invstd=si2)
    assert r == abi.OK, abi.message(d)
    for a, e in [(y2, y), (sm2, sm), (si2, si), (rm2, rm1), (rv2, rv1)]:
        _same(a, e)
    gx, gw, gb = cbn.batch_norm_backward(g, x, w, sm, si, axis=axis)
    gx2, gw2, gb2 = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
    r = _call("backward", d, training=1, act=abi.act(), grad_output=g3, x=x3, weight=w,
              save_mean=sm, save_invstd=si, grad_input=gx2, grad_weight=gw2, grad_bias=gb2)
    assert r == abi.OK, abi.message(d)
    for a, e in [(gx2, gx), (gw2, gw), (gb2, gb)]:
        _same(a, e)


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm")
def test_no_symbol_but_the_module_init_is_exported():
    so = cbn._kernels.__file__
    out = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True)
    names = {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}
    assert {n for n in names if not n.startswith("__pyx_module_is_main")} == {
        "PyInit__kernels"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
@pytest.mark.parametrize("nthreads", [1, 2])
def test_forward_and_backward_match_the_python_api(shape, axis, dtype, nthreads):
    x, g, w, b, rm, rv = _data(shape, axis, dtype)
    C = shape[axis]
    x3, g3 = _view3(x, axis), _view3(g, axis)
    for training in (True, False):
        rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
        y, sm, si = cbn.batch_norm_forward(x, w, b, rm1, rv1, training, 0.1, 1e-5, axis=axis,
                                           n_threads=nthreads)
        y2, sm2, si2 = np.empty_like(x), np.empty(C, dtype), np.empty(C, dtype)
        d = abi.desc(x3, nthreads)
        r = _call("forward", d, training=int(training), act=abi.act(), momentum=0.1,
                  eps=1e-5, x=x3, y=y2, weight=w, bias=b, running_mean=rm2,
                  running_var=rv2, save_mean=sm2, save_invstd=si2)
        assert r == abi.OK, abi.message(d)
        for a, e in [(y2, y), (sm2, sm), (si2, si), (rm2, rm1), (rv2, rv1)]:
            _same(a, e)
        gx, gw, gb = cbn.batch_norm_backward(g, x, w, sm, si, training, axis=axis,
                                             n_threads=nthreads)
        gx2, gw2, gb2 = np.empty_like(x), np.empty(C, dtype), np.empty(C, dtype)
        r = _call("backward", d, training=int(training), act=abi.act(), grad_output=g3, x=x3,
                  weight=w, save_mean=sm, save_invstd=si, grad_input=gx2, grad_weight=gw2,
                  grad_bias=gb2)
        assert r == abi.OK, abi.message(d)
        for a, e in [(gx2, gx), (gw2, gw), (gb2, gb)]:
            _same(a, e)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", CASES[:4], ids=IDS[:4])
def test_relu_residual_and_the_stages_match_the_python_api(shape, axis, dtype):
    from cbn import _stages
    from cbn.functional import eval_parameters, normalize
    x, g, w, b, rm, rv = _data(shape, axis, dtype)
    r_ = _data(shape, axis, dtype, seed=5)[0]
    C = shape[axis]
    x3, g3, r3 = _view3(x, axis), _view3(g, axis), _view3(r_, axis)
    d = abi.desc(x3)
    # fused ReLU + residual, forward and masked backward with the residual's gradient
    y, sm, si = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5, axis=axis,
                                       activation="relu", residual=r_)
    y2, sm2, si2 = np.empty_like(x), np.empty(C, dtype), np.empty(C, dtype)
    assert _call("forward", d, training=1, act=abi.act("relu"), momentum=0.1, eps=1e-5,
                 x=x3, residual=r3, y=y2, weight=w, bias=b, save_mean=sm2,
                 save_invstd=si2) == abi.OK
    _same(y2, y)
    gx, gw, gb, gr = cbn.batch_norm_backward(g, x, w, sm, si, True, axis=axis,
                                             activation="relu", output=y, residual=True)
    out = [np.empty_like(x), np.empty(C, dtype), np.empty(C, dtype), np.empty_like(x)]
    assert _call("backward", d, training=1, act=abi.act("relu"), grad_output=g3, x=x3,
                 output=_view3(y, axis), weight=w, save_mean=sm, save_invstd=si,
                 grad_input=out[0], grad_weight=out[1], grad_bias=out[2],
                 grad_residual=out[3]) == abi.OK
    for a, e in zip(out, (gx, gw, gb, gr)):
        _same(a, e)
    # eval parameters and normalize
    inv, scale, shift = eval_parameters(w, b, rv, 1e-5, dtype)
    got = [np.empty(C, dtype) for _ in range(3)]
    assert _call("eval_params", d, eps=1e-5, weight=w, bias=b, running_var=rv,
                 invstd=got[0], scale=got[1], shift=got[2]) == abi.OK
    for a, e in zip(got, (inv, scale, shift)):
        _same(a, e)
    yn = normalize(x, rm, scale, shift, axis=axis)
    yn2 = np.empty_like(x)
    assert _call("normalize", d, act=abi.act(), x=x3, y=yn2, mean=rm, scale=scale,
                 shift=shift) == abi.OK
    _same(yn2, yn)
    # the stages
    mom = _stages.moments(x, axis=axis)
    mean, m2 = np.empty(C), np.empty(C)
    assert _call("moments", d, x=x3, mean=mean, m2=m2) == abi.OK
    _same(mean, mom.mean)
    _same(m2, mom.m2)
    stats = _stages.finish(mom, 1e-5, dtype=dtype, weight=w, bias=b)
    fin = [np.empty(C, dtype) for _ in range(4)]
    assert _call("finish", d, count=float(mom.count), momentum=0.1, eps=1e-5, mean=mean,
                 m2=m2, weight=w, bias=b, save_mean=fin[0], save_invstd=fin[1],
                 scale=fin[2], shift=fin[3]) == abi.OK
    for a, e in zip(fin, stats):
        _same(a, e)
    sdy, sdx = _stages.backward_reduce(g, x, stats.save_mean, axis=axis)
    s1, s2 = np.empty(C), np.empty(C)
    assert _call("backward_reduce", d, act=abi.act(), grad_output=g3, x=x3,
                 mean=stats.save_mean, sum_dy=s1, sum_dy_xmu=s2) == abi.OK
    _same(s1, sdy)
    _same(s2, sdx)
    dx = _stages.backward_elements(g, x, w, stats.save_mean, stats.save_invstd, sdy, sdx,
                                   mom.count, axis=axis)
    dx2 = np.empty_like(x)
    assert _call("backward_elements", d, act=abi.act(), count=float(mom.count),
                 grad_output=g3, x=x3, weight=w, mean=stats.save_mean,
                 invstd=stats.save_invstd, sum_dy=s1, sum_dy_xmu=s2,
                 grad_input=dx2) == abi.OK
    _same(dx2, dx)


def _view_of(a, axis, storage=abi.F64):
    d = abi.Desc(version=1, storage=storage, compute=storage, nthreads=1,
                 msg=ct.cast(ct.create_string_buffer(256), ct.c_char_p), msg_size=256)
    buf = ct.create_string_buffer(256)
    d.msg = ct.cast(buf, ct.c_char_p)
    d._buf = buf
    shape = (ct.c_int64 * a.ndim)(*a.shape)
    strides = (ct.c_int64 * a.ndim)(*a.strides)
    r = abi.entry("view")(ct.byref(d), a.ndim, shape, strides, axis)
    return r, d


@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_view_of_any_dense_layout(shape, axis):
    from cbn._arrays import View
    x = np.random.default_rng(0).standard_normal(shape)
    ax = axis % x.ndim
    layouts = {"C": x, "F": np.asfortranarray(x),
               "cl": np.moveaxis(np.ascontiguousarray(np.moveaxis(x, ax, -1)), -1, ax)}
    for name, a in layouts.items():
        r, d = _view_of(a, axis)
        assert r == abi.OK, (name, abi.message(d))
        v = View(a, ax)
        assert (d.M, d.C, d.K) == (v.M, v.C, v.K), name
        assert (d.stride_m, d.stride_c, d.stride_k) == (d.C * d.K, d.K, 1)
        # the view's data is the array's memory: the forward through it is the Python one
        x3 = np.ndarray((d.M, d.C, d.K), a.dtype, buffer=a, order="C") if name == "C" else None
        if x3 is not None:
            assert x3.ctypes.data == a.ctypes.data
    for bad in (x[..., ::2], x[..., ::-1]):
        r, d = _view_of(bad, axis)
        assert r == abi.ERR_ARG and "not one dense block" in abi.message(d)
    r, d = _view_of(x, x.ndim)
    assert r == abi.ERR_ARG
    assert abi.message(d) == f"axis {x.ndim} is out of bounds for array of dimension {x.ndim}"


def _python_error(f):
    with pytest.raises((ValueError, TypeError)) as e:
        f()
    return str(e.value)


def test_every_error_code_with_the_python_message():
    x, g, w, b, rm, rv = _data((6, 3, 4), 1, np.float64)
    x3 = _view3(x, 1)
    C = 3
    sm, si, y = np.empty(C), np.empty(C), np.empty_like(x)
    keep = [a.copy() for a in (sm, si, y, rm, rv)]

    def forward(d=None, **kw):
        d = d or abi.desc(x3)
        fields = dict(training=1, act=abi.act(), momentum=0.1, eps=1e-5, x=x3, y=y, weight=w,
                      bias=b, running_mean=rm, running_var=rv, save_mean=sm, save_invstd=si)
        fields.update(kw)
        return _call("forward", d, **fields), d

    # CBN_ERR_ARG, with Python's words where Python has the same mistake
    r, d = forward(eps=-1.0)
    assert r == abi.ERR_ARG
    py = _python_error(lambda: cbn.batch_norm(x, rm.copy(), rv.copy(), eps=-1.0))
    assert abi.message(d).split(", got")[0] == py.split(", got")[0]
    r, d = forward(momentum=float("nan"))
    assert r == abi.ERR_ARG
    assert abi.message(d).split(", got")[0] == _python_error(
        lambda: cbn.batch_norm(x, rm.copy(), rv.copy(), training=True,
                               momentum=float("nan"))).split(", got")[0]
    r, d = forward(training=0, running_mean=None)
    assert r == abi.ERR_ARG and abi.message(d) == _python_error(
        lambda: cbn.batch_norm(x, None, rv, training=False))
    one = np.ones((1, 4, 1))
    d = abi.desc(one)
    r, d = forward(d=d, x=one, y=np.empty_like(one), save_mean=np.empty(4),
                   save_invstd=np.empty(4), weight=None, bias=None, running_mean=None,
                   running_var=None)
    assert r == abi.ERR_ARG
    assert abi.message(d).startswith("Expected more than 1 value per channel when training")
    r, d = forward(x=None)
    assert r == abi.ERR_ARG and abi.message(d) == "x must not be NULL"
    r, d = forward(act=abi.Act(kind=17))
    assert r == abi.ERR_ARG and "activation must be None" in abi.message(d)
    dd = abi.desc(x3)
    dd.version = 99
    r, d = forward(d=dd)
    assert r == abi.ERR_ARG and "descriptor version" in abi.message(d)
    dd = abi.desc(x3)
    dd.nthreads = 0
    r, d = forward(d=dd)
    assert r == abi.ERR_ARG and "n_threads" in abi.message(d)
    gx = np.empty_like(x)
    bd = abi.desc(x3)
    r = _call("backward", bd, training=1, act=abi.act("relu"), grad_output=_view3(g, 1), x=x3,
              weight=w, save_mean=rm, save_invstd=rv, grad_input=gx)
    assert r == abi.ERR_ARG and abi.message(bd) == _python_error(
        lambda: cbn.batch_norm_backward(g, x, w, rm, rv, activation="relu"))
    # CBN_ERR_DTYPE: storage and compute dtypes without loops
    dd = abi.desc(x3, storage=abi.F16)
    dd.compute = abi.F64
    r, d = forward(d=dd)
    assert r == abi.ERR_DTYPE and abi.message(d)
    # nothing but the message was written by any failed call
    for a, e in zip((sm, si, y, rm, rv), keep):
        _same(a, e) if a is not sm and a is not si else None
    _same(y, keep[2])
    _same(rm, keep[3])
    _same(rv, keep[4])


def test_out_of_memory_is_a_status():
    """CBN_ERR_NOMEM: scratch that cannot exist; the data are never reached, nothing is
    written but the message."""
    x = np.random.default_rng(0).standard_normal((6, 3, 4))
    y, sm, si = np.zeros_like(x), np.zeros(3), np.zeros(3)
    rm, rv = np.zeros(3), np.ones(3)
    d = abi.desc(_view3(x, 1))
    d.C, d.M, d.K = 1 << 50, 2, 1
    d.stride_m, d.stride_c = 1 << 50, 1
    r = _call("forward", d, training=0, act=abi.act(), momentum=0.1, eps=1e-5,
              x=_view3(x, 1), y=y, running_mean=rm, running_var=rv, save_mean=sm,
              save_invstd=si)
    assert r == abi.ERR_NOMEM and "could not allocate" in abi.message(d)
    assert not y.any() and not sm.any() and not si.any()


def test_a_call_without_a_message_buffer_still_fails_cleanly():
    x = np.ones((4, 3, 2))
    d = abi.desc(x)
    d.msg, d.msg_size = None, 0
    r = _call("forward", d, training=1, act=abi.act(), momentum=0.1, eps=-1.0, x=x,
              y=np.empty_like(x), save_mean=np.empty(3), save_invstd=np.empty(3))
    assert r == abi.ERR_ARG


# -------------------------------------------------- a downstream Cython extension


@pytest.fixture(scope="module")
def downstream(tmp_path_factory):
    pytest.importorskip("Cython")
    if sysconfig.get_config_var("CC") is None or shutil.which("cc") is None:
        pytest.skip("needs a C compiler")
    root = tmp_path_factory.mktemp("downstream")
    src = os.path.join(os.path.dirname(__file__), "capi", "downstream.pyx")
    shutil.copy(src, root / "downstream.pyx")
    # cbn's package folder holds capi.pxd; its parent goes on Cython's include path
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    setup = f"""
from setuptools import setup, Extension
from Cython.Build import cythonize
import cbn
setup(ext_modules=cythonize([Extension("downstream", ["downstream.pyx"],
      include_dirs=[cbn.get_include()], extra_compile_args=["-fopenmp"],
      extra_link_args=["-fopenmp"])], include_path=[{pkg_parent!r}],
      compiler_directives={{"language_level": 3}}))
"""
    (root / "setup.py").write_text(setup)
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sys.path.insert(0, str(root))
    try:
        import downstream as mod
    finally:
        sys.path.remove(str(root))
    return mod


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 5, 40), (64, 12, 1), (300, 40, 1), (3, 7, 9)])
def test_downstream_prange_calls_match_the_python_api(downstream, shape, dtype):
    assert downstream.abi_version() == 1
    n = 64
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((n,) + shape) * 3 + 1).astype(dtype)
    g = rng.standard_normal((n,) + shape).astype(dtype)
    C = shape[1]
    w, b = rng.uniform(0.5, 2, C).astype(dtype), rng.uniform(-1, 1, C).astype(dtype)
    y, dx = np.empty_like(x), np.empty_like(x)
    sm, si, gw, gb = (np.empty((n, C), dtype) for _ in range(4))
    status = np.full(n, -1, np.intc)
    downstream.steps(x, g, y, dx, w, b, sm, si, gw, gb, status, 2)
    assert (status == 0).all()
    for i in range(n):
        ey, esm, esi = cbn.batch_norm_forward(x[i], w, b, None, None, True, 0.1, 1e-5)
        edx, egw, egb = cbn.batch_norm_backward(g[i], x[i], w, esm, esi)
        for a, e in [(y[i], ey), (sm[i], esm), (si[i], esi), (dx[i], edx), (gw[i], egw),
                     (gb[i], egb)]:
            _same(a, e)


def test_downstream_calls_while_python_threads_run(downstream):
    """64 calls from the extension's prange while a Python thread spins with a tiny switch
    interval: the calls never take the GIL, so they finish, with the same bits."""
    import threading
    import time
    n, shape = 64, (16, 8, 64)
    x = np.random.default_rng(4).standard_normal((n,) + shape)
    g = np.ones_like(x)
    w, b = np.ones(8), np.zeros(8)
    outs = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(100))

    old = sys.getswitchinterval()
    for spinning in (False, True):
        t = threading.Thread(target=spin) if spinning else None
        if t:
            sys.setswitchinterval(1e-6)
            t.start()
        try:
            y, dx = np.empty_like(x), np.empty_like(x)
            arrs = [np.empty((n, 8)) for _ in range(4)]
            status = np.full(n, -1, np.intc)
            t0 = time.perf_counter()
            downstream.steps(x, g, y, dx, w, b, *arrs, status, 2)
            outs.append((y, dx, time.perf_counter() - t0, status))
        finally:
            if t:
                stop.set()
                t.join()
                sys.setswitchinterval(old)
    (y0, dx0, _, s0), (y1, dx1, _, s1) = outs
    assert (s0 == 0).all() and (s1 == 0).all()
    _same(y0, y1)
    _same(dx0, dx1)


def test_numba_calls_the_abi_from_njit():
    numba = pytest.importorskip("numba")
    x = np.random.default_rng(0).standard_normal((64, 16))
    y, sm, si = np.empty_like(x), np.empty(16), np.empty(16)
    d = abi.desc(x.reshape(64, 16, 1))
    args = abi.ForwardArgs(training=1, act=abi.act(), momentum=0.1, eps=1e-5,
                           x=x.ctypes.data, y=y.ctypes.data, save_mean=sm.ctypes.data,
                           save_invstd=si.ctypes.data)
    # the structs as bytes that njit code can hand over by address
    dbuf = np.frombuffer(bytearray(bytes(d)), np.uint8)
    abuf = np.frombuffer(bytearray(bytes(args)), np.uint8)
    forward = abi.entry("forward")

    @numba.njit
    def call(dp, ap):
        return forward(dp.ctypes.data, ap.ctypes.data)

    assert call(dbuf, abuf) == 0
    ey, esm, esi = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    _same(y, ey)
    _same(sm, esm)
    _same(si, esi)
