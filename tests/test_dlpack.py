"""Arrays of other libraries in, the caller's array type out (issue 20, item 4).

Parametrised over NumPy, torch, JAX, array-api-strict and a wrapper with only
``__dlpack__``/``__dlpack_device__`` (each optional library skips without it). The oracle
for values is the same call on NumPy arrays (the foreign call must be bit-identical to it:
it runs the same kernels on views of the same memory) and, for the zero-copy claim, the
exporter's own data pointer, compared with the pointer of the NumPy array the kernel layer
receives (recorded by wrapping the module-level functions of ``cbn.functional``).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import cbn
from cbn import functional as F


class DLPackOnly:
    """An exporter with nothing but the DLPack protocol (over a NumPy array)."""

    def __init__(self, a: np.ndarray):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class OnDevice(DLPackOnly):
    """An exporter claiming to live on a CUDA device (DLPack device type 2)."""

    def __dlpack_device__(self):
        return (2, 1)


def _kind(name):
    """(make: ndarray -> library array, pointer: array -> data address, type check)."""
    if name == "numpy":
        return (lambda a: a), (lambda a: a.ctypes.data), (lambda r: type(r) is np.ndarray)
    if name == "torch":
        torch = pytest.importorskip("torch")
        return ((lambda a: torch.from_numpy(a.copy())), (lambda t: t.data_ptr()),
                (lambda r: isinstance(r, torch.Tensor)))
    if name == "jax":
        jnp = pytest.importorskip("jax.numpy")
        import jax
        return ((lambda a: jnp.asarray(a)), (lambda j: j.unsafe_buffer_pointer()),
                (lambda r: isinstance(r, jax.Array)))
    if name == "array_api_strict":
        xp = pytest.importorskip("array_api_strict")
        return ((lambda a: xp.asarray(a.copy())), (lambda s: s._array.ctypes.data),
                (lambda r: type(r) is type(xp.asarray(1.0))))
    if name == "dlpack_only":
        # cbn cannot build an object of an unknown class: the results are NumPy arrays
        return ((lambda a: DLPackOnly(a.copy())), (lambda w: w._a.ctypes.data),
                (lambda r: type(r) is np.ndarray))
    raise AssertionError(name)


KINDS = ["numpy", "torch", "jax", "array_api_strict", "dlpack_only"]


@pytest.fixture
def seen(monkeypatch):
    """Records the calls of cbn.functional's module-level functions (call them as F.name):
    the public functions call themselves again on the NumPy views of foreign arrays."""
    calls = []
    for name in ("batch_norm_forward", "batch_norm_backward", "normalize"):
        real = getattr(F, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return _real(*args, **kwargs)
        monkeypatch.setattr(F, name, spy)
    # batch_norm makes the plain call into the kernel itself for a NumPy input
    real_plain = F._kernels.plain_forward

    def plain_spy(*args, **kwargs):
        calls.append(("plain_forward", args, kwargs))
        return real_plain(*args, **kwargs)
    monkeypatch.setattr(F._kernels, "plain_forward", plain_spy)
    return calls


def _numpy_args(calls, name):
    """Positional args of the calls of ``name`` whose first argument is an ndarray."""
    return [a for n, a, _ in calls if n == name and isinstance(a[0], np.ndarray)]


def _data(shape=(8, 6, 5), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (rng.normal(1.0, 2.0, shape)).astype(dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_type_values_no_copy(kind, seen):
    make, ptr, is_type = _kind(kind)
    x = _data()
    w, b = np.linspace(0.5, 2.0, 6).astype(np.float32), np.linspace(-1, 1, 6).astype(np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    expected = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5)
    xf = make(x)
    seen.clear()
    res = F.batch_norm_forward(xf, make(w), make(b), None, None, True, 0.1, 1e-5)
    assert len(res) == 3
    for r, e in zip(res, expected):
        assert is_type(r), type(r)
        np.testing.assert_array_equal(np.asarray(r), e)
    # the kernel layer got a view of the caller's memory, not a copy
    (args,) = _numpy_args(seen, "batch_norm_forward")
    assert args[0].ctypes.data == ptr(xf)
    # eval, through batch_norm: only y, of the input's type
    y_expected = cbn.batch_norm(x, rm, rv, w, b)
    seen.clear()
    y = cbn.batch_norm(xf, make(rm), make(rv), make(w), make(b))
    assert is_type(y)
    np.testing.assert_array_equal(np.asarray(y), y_expected)
    # the NumPy view reached batch_norm_forward, or the plain call into the kernel
    args = (_numpy_args(seen, "batch_norm_forward") or _numpy_args(seen, "plain_forward"))[0]
    assert args[0].ctypes.data == ptr(xf)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_and_normalize_type_values_no_copy(kind, seen):
    make, ptr, is_type = _kind(kind)
    x = _data(seed=1)
    dy = _data(seed=2)
    y, sm, si = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    expected = cbn.batch_norm_backward(dy, x, None, sm, si, residual=True)
    xf, dyf = make(x), make(dy)
    seen.clear()
    res = F.batch_norm_backward(dyf, xf, None, make(sm), make(si), residual=True)
    assert len(res) == 4
    for r, e in zip(res, expected):
        assert is_type(r), type(r)
        np.testing.assert_array_equal(np.asarray(r), e)
    (args,) = _numpy_args(seen, "batch_norm_backward")
    assert args[0].ctypes.data == ptr(dyf) and args[1].ctypes.data == ptr(xf)

    scale, shift = (si * 2).astype(np.float32), np.full(6, 0.5, np.float32)
    y_expected = F.normalize(x, sm, scale, shift, activation="relu")
    seen.clear()
    y = F.normalize(xf, make(sm), make(scale), make(shift), activation="relu")
    assert is_type(y)
    np.testing.assert_array_equal(np.asarray(y), y_expected)
    (args,) = _numpy_args(seen, "normalize")
    assert args[0].ctypes.data == ptr(xf)


@pytest.mark.parametrize("kind", ["array_api_strict", "jax", "torch"])
def test_eval_parameters_type(kind):
    make, _, is_type = _kind(kind)
    w, b, rv = (np.array([1.0, 2.0, 3.0], np.float32), np.array([0.0, 1.0, -1.0], np.float32),
                np.array([0.5, 1.0, 4.0], np.float32))
    expected = F.eval_parameters(w, b, rv, 1e-5)
    got = F.eval_parameters(make(w), make(b), make(rv), 1e-5)
    for g, e in zip(got, expected):
        assert is_type(g)
        np.testing.assert_array_equal(np.asarray(g), e)


def test_buffer_protocol_and_array_interface_read_without_copy():
    from cbn import _arrays
    x = _data(seed=3)
    mv = memoryview(x)

    class HasArray:
        def __array__(self, dtype=None, copy=None):
            return x
    assert _arrays.as_input(mv, "input").ctypes.data == x.ctypes.data
    assert _arrays.as_input(HasArray(), "input") is x
    expected = cbn.batch_norm(x, None, None, training=True)
    for a in (mv, HasArray()):
        y = cbn.batch_norm(a, None, None, training=True)
        assert type(y) is np.ndarray                 # read through NumPy: NumPy out
        np.testing.assert_array_equal(y, expected)


# ------------------------------------------------------------------------------ torch


def test_torch_running_stats_updated_in_place_and_out():
    torch = pytest.importorskip("torch")
    x = _data(seed=4)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    y = cbn.batch_norm(x, rm, rv, training=True, momentum=0.3)
    trm, trv = torch.zeros(6), torch.ones(6)
    tx = torch.from_numpy(x.copy())
    out = torch.empty(x.shape)
    got = cbn.batch_norm(tx, trm, trv, training=True, momentum=0.3, out=out)
    assert got is out
    np.testing.assert_array_equal(out.numpy(), y)
    np.testing.assert_array_equal(trm.numpy(), rm)
    np.testing.assert_array_equal(trv.numpy(), rv)
    # in place: out is the input tensor itself
    got = cbn.batch_norm(tx, None, None, training=True, out=tx)
    assert got is tx
    np.testing.assert_array_equal(tx.numpy(), cbn.batch_norm(x, None, None, training=True))
    # NumPy input, torch running stats: NumPy out, the tensors updated
    trm, trv = torch.zeros(6), torch.ones(6)
    y2 = cbn.batch_norm(x, trm, trv, training=True, momentum=0.3)
    assert type(y2) is np.ndarray
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(trv.numpy(), rv)


def test_torch_bfloat16_in_and_out():
    torch = pytest.importorskip("torch")
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x32 = _data(seed=5)
    xb = torch.from_numpy(x32).to(torch.bfloat16)
    xn = xb.float().numpy().astype(ml_dtypes.bfloat16)          # the same values in NumPy
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    y_np, sm_np, si_np = cbn.batch_norm_forward(xn, None, None, rm, rv, True, 0.1, 1e-5)
    trm, trv = torch.zeros(6), torch.ones(6)
    y, sm, si = cbn.batch_norm_forward(xb, None, None, trm, trv, True, 0.1, 1e-5)
    assert y.dtype == torch.bfloat16 and sm.dtype == torch.float32
    np.testing.assert_array_equal(y.float().numpy(), y_np.astype(np.float32))
    np.testing.assert_array_equal(sm.numpy(), sm_np)
    np.testing.assert_array_equal(trv.numpy(), rv)
    # float32 compute, one rounding per output: the float64 formula rounded to bfloat16
    xd = xb.double().numpy()
    ref = (xd - xd.mean(axis=(0, 2), keepdims=True)) / np.sqrt(
        xd.var(axis=(0, 2), keepdims=True) + 1e-5)
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=2 ** -7, atol=2 ** -7)
    out = torch.empty(xb.shape, dtype=torch.bfloat16)
    assert cbn.batch_norm(xb, None, None, training=True, out=out) is out
    np.testing.assert_array_equal(out.float().numpy(), y_np.astype(np.float32))


def test_torch_bfloat16_without_ml_dtypes(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)         # import ml_dtypes fails
    xb = torch.ones(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="input is bfloat16.*ml_dtypes"):
        cbn.batch_norm(xb, None, None, training=True)


def test_torch_requires_grad_and_device_errors():
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 3)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match=r"input is a torch tensor that requires grad.*detach"):
        cbn.batch_norm(x.clone().requires_grad_(), rm, rv, training=True)
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"weight is a torch tensor that requires grad"):
        cbn.batch_norm(x, rm, rv, w, training=True)
    assert rm.abs().sum() == 0                                   # nothing written
    meta = torch.empty(8, 3, device="meta")
    with pytest.raises(TypeError, match=r"input is a torch tensor on device meta"):
        cbn.batch_norm(meta, None, None, training=True)
    with pytest.raises(TypeError, match=r"grad_output is a torch tensor on device meta"):
        cbn.batch_norm_backward(meta, x, None, rm, rv)


def test_dlpack_device_error_names_device():
    x = _data(seed=6)
    with pytest.raises(TypeError, match=r"input is on device cuda:1"):
        cbn.batch_norm(OnDevice(x), None, None, training=True)
    rm = np.zeros(6, np.float32)
    with pytest.raises(TypeError, match=r"running_mean is on device cuda:1"):
        cbn.batch_norm(x, OnDevice(rm), np.ones(6, np.float32), training=True)


def test_jax_arrays_are_immutable():
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.asarray(_data(seed=7))
    rm, rv = jnp.zeros(6, jnp.float32), jnp.ones(6, jnp.float32)
    with pytest.raises(TypeError, match=r"running_mean is written in place.*immutable"):
        cbn.batch_norm(x, rm, rv, training=True)
    with pytest.raises(TypeError, match=r"out is written in place.*immutable"):
        cbn.batch_norm(x, None, None, training=True, out=jnp.zeros(x.shape, jnp.float32))
    np.testing.assert_array_equal(np.asarray(rm), 0)
    # eval only reads them
    y = cbn.batch_norm(x, rm, rv)
    np.testing.assert_array_equal(np.asarray(y),
                                  cbn.batch_norm(np.asarray(x), np.zeros(6, np.float32),
                                                 np.ones(6, np.float32)))


def test_jax_bfloat16_input():
    jnp = pytest.importorskip("jax.numpy")
    pytest.importorskip("ml_dtypes")
    x = jnp.asarray(_data(seed=8)).astype(jnp.bfloat16)
    y = cbn.batch_norm(x, None, None, training=True)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y),
                                  cbn.batch_norm(np.asarray(x), None, None, training=True))


def test_torch_expanded_tensor_is_not_written():
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 3)
    rv = torch.ones(1).expand(3)                 # three elements, one memory location
    with pytest.raises(TypeError, match="running_var is written in place, but several"):
        cbn.batch_norm(x, torch.zeros(3), rv, training=True)
    with pytest.raises(TypeError, match="out is written in place, but several"):
        cbn.batch_norm(x, None, None, training=True, out=torch.zeros(1, 3).expand(8, 3))
    assert rv[0].item() == 1.0
    # only read (eval): an expanded tensor is fine
    y = cbn.batch_norm(x, torch.zeros(3), rv)
    np.testing.assert_array_equal(y.numpy(), cbn.batch_norm(x.numpy(), np.zeros(3, np.float32),
                                                            np.ones(3, np.float32)))
