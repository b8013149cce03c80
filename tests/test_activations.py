"""The fused activations: act(bn(x) + residual), forward and backward, every loop shape.

Oracles: the activations and their derivatives written here in float64 NumPy (torch's
definitions), batch normalization in float64 from its formulas, central finite
differences, and torch autograd of ``act(batch_norm(x) + residual)`` where torch is
installed. Bits: the same results on 1 and 2 threads, on every CPU target, and with the
channel-blocked, chained and streaming passes forced.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

import cbn
from cbn import _kernels

ACTS = ["relu", "relu6", "leaky_relu", "silu", "hardswish"]
FROM_OUTPUT = {"relu", "relu6", "leaky_relu"}

# (shape, axis): planes (K >= 16, vector tails), rows of 8 vectors, rows of 4 or 8 vectors,
# wide rows (memory order), rows that are no multiple of the vector (column loops), and a
# tail of m-rows
LAYOUTS = [((4, 6, 14, 14), 1), ((6, 5, 17), 1), ((96, 16), 1), ((7, 5, 5, 64), -1),
           ((50, 144), 1), ((33, 1001), 1), ((37, 7), 1)]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in LAYOUTS]


# ------------------------------------------------------------------ float64 oracles

def act64(z, name, slope):
    z = np.asarray(z, np.float64)
    if name is None:
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "relu6":
        return np.minimum(np.maximum(z, 0.0), 6.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, slope * z)
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "hardswish":
        return z * np.minimum(np.maximum(z + 3.0, 0.0), 6.0) / 6.0
    raise AssertionError(name)


def dact64(z, name, slope):
    z = np.asarray(z, np.float64)
    if name is None:
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "relu6":
        return ((z > 0) & (z < 6)).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, slope)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if name == "hardswish":
        return np.where(z < -3, 0.0, np.where(z <= 3, z / 3.0 + 0.5, 1.0))
    raise AssertionError(name)


def cshape(ndim, axis):
    s = [1] * ndim
    s[axis % ndim] = -1
    return tuple(s)


def bn64(x, w, b, axis, training, rm=None, rv=None, eps=1e-5):
    """(z without residual, mean, invstd, xhat) in float64."""
    x = x.astype(np.float64)
    ax = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != ax)
    cs = cshape(x.ndim, axis)
    if training:
        mean = x.mean(axis=red)
        var = ((x - mean.reshape(cs)) ** 2).mean(axis=red)
    else:
        mean, var = rm.astype(np.float64), rv.astype(np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean.reshape(cs)) * invstd.reshape(cs)
    return xhat * w.astype(np.float64).reshape(cs) + b.astype(np.float64).reshape(cs), \
        mean, invstd, xhat


def backward64(dy, xhat, w, invstd, axis, training):
    """(grad_input, grad_weight, grad_bias) of bn for the upstream gradient dy."""
    ax = axis % dy.ndim
    red = tuple(i for i in range(dy.ndim) if i != ax)
    cs = cshape(dy.ndim, axis)
    gb = dy.sum(axis=red)
    gw = (dy * xhat).sum(axis=red)
    k = (w.astype(np.float64) * invstd).reshape(cs)
    if not training:
        return dy * k, gw, gb
    n = dy.size // dy.shape[ax]
    dx = k * (dy - gb.reshape(cs) / n - xhat * gw.reshape(cs) / n)
    return dx, gw, gb


def data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    cs = cshape(len(shape), axis)
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 2, C).reshape(cs)
         + rng.uniform(-3, 3, C).reshape(cs)).astype(dtype)
    w = rng.uniform(0.5, 4.0, C).astype(dtype)       # spreads z over the kinks (0, +-3, 6)
    b = rng.uniform(-2, 2, C).astype(dtype)
    rm = rng.uniform(-1, 1, C).astype(dtype)
    rv = rng.uniform(0.5, 2, C).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    return x, w, b, rm, rv, r, g


def tol(dtype):
    return dict(rtol=2e-4, atol=2e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-9)


def kw_for(act, slope=0.1):
    return dict(activation=act, negative_slope=slope)


def run_backward(g, x, w, b, sm, si, training, axis, act, slope, y, r, nt=None):
    """cbn's backward for a forward with `act` and residual r (or None)."""
    kw = dict(axis=axis, activation=act, negative_slope=slope, n_threads=nt)
    if act in FROM_OUTPUT:
        kw["output"] = y
        kw["residual"] = r is not None
    else:
        kw["bias"] = b
        kw["residual"] = r if r is not None else False
    return cbn.batch_norm_backward(g, x, w, sm, si, training, **kw)


# ------------------------------------------------------------ against the oracle

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_and_backward_match_the_float64_formulas(act, shape, axis, residual, dtype,
                                                         training):
    x, w, b, rm, rv, r, g = data(shape, axis, dtype)
    r = r if residual else None
    slope = 0.1
    rm1, rv1 = rm.copy(), rv.copy()
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm1, rv1, training, 0.1, 1e-5, axis=axis,
                                       residual=r, **kw_for(act, slope))
    z, mean, invstd, xhat = bn64(x, w, b, axis, training, rm, rv)
    if r is not None:
        z = z + r
    np.testing.assert_allclose(y, act64(z, act, slope), **tol(dtype), err_msg="forward")

    got = run_backward(g, x, w, b, sm, si, training, axis, act, slope, y, r)
    # the derivative at the kernel's own z (its kinks are where its z is, to the ulp)
    gz = g.astype(np.float64) * dact64(z, act, slope)
    edx, egw, egb = backward64(gz, xhat, w, invstd, axis, training)
    t = tol(dtype)
    scale = np.abs(gz).max() * (np.abs(w).max() * invstd.max()) * 4
    np.testing.assert_allclose(got[0], edx, rtol=t["rtol"], atol=t["atol"] * scale,
                               err_msg="grad_input")
    n = gz.size // shape[axis]
    np.testing.assert_allclose(got[1], egw, rtol=t["rtol"], atol=t["atol"] * n,
                               err_msg="grad_weight")
    np.testing.assert_allclose(got[2], egb, rtol=t["rtol"], atol=t["atol"] * n,
                               err_msg="grad_bias")
    if r is not None:
        assert len(got) == 4
        np.testing.assert_allclose(got[3], gz, **t, err_msg="grad_residual")
    else:
        assert len(got) == 3


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,axis", [((3, 2, 20), 1), ((5, 2, 3), -1)],
                         ids=["planes", "rows"])
def test_gradients_match_finite_differences(act, shape, axis):
    x, w, b, _, _, r, g = data(shape, axis, np.float64, seed=3)
    slope = 0.2

    def loss(x_, b_, r_):
        y_ = cbn.batch_norm(x_, None, None, w, b_, training=True, axis=axis, residual=r_,
                            activation=act, negative_slope=slope)
        return float((y_ * g).sum())

    y, sm, si = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5, axis=axis,
                                       residual=r, activation=act, negative_slope=slope)
    gx, gw, gb, gr = run_backward(g, x, w, b, sm, si, True, axis, act, slope, y, r)
    h = 1e-6
    rng = np.random.default_rng(1)
    for _ in range(6):
        i = tuple(rng.integers(0, s) for s in shape)
        for name, arr, grad in (("x", x, gx), ("r", r, gr)):
            p, m = arr.copy(), arr.copy()
            p[i] += h
            m[i] -= h
            args_p = (p, b, r) if name == "x" else (x, b, p)
            args_m = (m, b, r) if name == "x" else (x, b, m)
            fd = (loss(*args_p) - loss(*args_m)) / (2 * h)
            assert abs(fd - grad[i]) <= 1e-5 * (1 + abs(fd)), (name, i, fd, grad[i])
    c = 1
    p, m = b.copy(), b.copy()
    p[c] += h
    m[c] -= h
    fd = (loss(x, p, r) - loss(x, m, r)) / (2 * h)
    assert abs(fd - gb[c]) <= 1e-5 * (1 + abs(fd))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_against_torch_autograd(act, residual, channels_last):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    shape = (4, 6, 5, 5)
    x, w, b, _, _, r, g = data(shape, 1, np.float64, seed=5)
    slope = 0.1
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    tr = torch.tensor(r, requires_grad=True)
    z = F.batch_norm(tx, None, None, tw, tb, training=True, eps=1e-5)
    if residual:
        z = z + tr
    fn = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish,
          "leaky_relu": lambda t: F.leaky_relu(t, slope)}[act]
    ty = fn(z)
    ty.backward(torch.tensor(g))

    axis = -1 if channels_last else 1
    perm = (0, 2, 3, 1) if channels_last else (0, 1, 2, 3)
    xc, rc, gc = (np.ascontiguousarray(a.transpose(perm)) for a in (x, r, g))
    rr = rc if residual else None
    y, sm, si = cbn.batch_norm_forward(xc, w, b, None, None, True, 0.1, 1e-5, axis=axis,
                                       residual=rr, activation=act, negative_slope=slope)
    inv = tuple(np.argsort(perm))
    np.testing.assert_allclose(y.transpose(inv), ty.detach().numpy(), rtol=1e-10,
                               atol=1e-10)
    got = run_backward(gc, xc, w, b, sm, si, True, axis, act, slope, y, rr)
    np.testing.assert_allclose(got[0].transpose(inv), tx.grad.numpy(), rtol=1e-9,
                               atol=1e-9)
    np.testing.assert_allclose(got[1], tw.grad.numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got[2], tb.grad.numpy(), rtol=1e-9, atol=1e-9)
    if residual:
        np.testing.assert_allclose(got[3].transpose(inv), tr.grad.numpy(), rtol=1e-9,
                                   atol=1e-9)


# ------------------------------------------------------------------------- bits

def everything(x, w, b, rm, rv, r, g, axis, act, nt):
    """Every fused result for one input and activation, on nt threads."""
    out = {}
    for res in (None, r):
        tag = "r" if res is not None else "-"
        rm1, rv1 = rm.copy(), rv.copy()
        y, sm, si = cbn.batch_norm_forward(x, w, b, rm1, rv1, True, 0.1, 1e-5, axis=axis,
                                           residual=res, n_threads=nt, **kw_for(act))
        ye = cbn.batch_norm(x, rm, rv, w, b, axis=axis, residual=res, n_threads=nt,
                            **kw_for(act))
        out.update({f"y{tag}": y, f"sm{tag}": sm, f"si{tag}": si, f"ye{tag}": ye,
                    f"rm{tag}": rm1, f"rv{tag}": rv1})
        for training in (True, False):
            m, i = (sm, si) if training else (rm, (1.0 / np.sqrt(rv + 1e-5)).astype(x.dtype))
            yy = y if training else ye
            got = run_backward(g, x, w, b, m, i, training, axis, act, 0.1, yy, res, nt)
            for k, a in enumerate(got):
                out[f"g{tag}{training:d}{k}"] = a
    return out


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_bit_identical_on_two_threads(act, shape, axis):
    reps = -(-(1 << 16) // int(np.prod(shape)))
    big = (shape[0] * reps,) + tuple(shape[1:])
    args = data(big, axis, np.float32)
    one = everything(*args, axis, act, 1)
    two = everything(*args, axis, act, 2)
    for k in one:
        assert one[k].tobytes() == two[k].tobytes(), k


@pytest.fixture
def restore_target():
    before = _kernels.cpu_target()
    yield
    _kernels.select_cpu_target(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_every_cpu_target_gives_the_same_bits(act, shape, axis, dtype, restore_target):
    args = data(shape, axis, dtype)
    _kernels.select_cpu_target("base")
    want = everything(*args, axis, act, 2)
    for target in [n for n, ok in _kernels.cpu_targets() if ok]:
        _kernels.select_cpu_target(target)
        got = everything(*args, axis, act, 2)
        for k in want:
            assert got[k].tobytes() == want[k].tobytes(), (target, k)


@contextlib.contextmanager
def forced_blocking(stream, chain):
    old = _kernels._blocking("force", 0, stream, chain)
    try:
        yield
    finally:
        _kernels._blocking(*old)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("stream,chain", [(False, False), (True, False), (True, True)],
                         ids=["blocked", "streamed", "chained"])
@pytest.mark.parametrize("shape", [(3, 7, 30000), (4, 6, 14, 14)], ids=["long", "short"])
def test_blocked_chained_and_streamed_passes_give_the_same_bits(act, stream, chain, shape):
    args = data(shape, 1, np.float32)
    want = everything(*args, 1, act, 1)
    with forced_blocking(stream, chain):
        for nt in (1, 2):
            got = everything(*args, 1, act, nt)
            for k in want:
                assert got[k].tobytes() == want[k].tobytes(), (nt, k)


def test_rows_streamed_passes_give_the_same_bits():
    # channels-last outputs stored non-temporally (forced) against ordinary stores
    for act in ACTS:
        args = data((64, 6, 6, 32), -1, np.float32)
        want = everything(*args, -1, act, 1)
        with forced_blocking(True, True):
            got = everything(*args, -1, act, 1)
        for k in want:
            assert got[k].tobytes() == want[k].tobytes(), (act, k)


# --------------------------------------------------------------- public contract

@pytest.mark.parametrize("act", ACTS)
def test_module_matches_the_functional_calls(act):
    x, w, b, _, _, _, g = data((4, 3, 5, 5), 1, np.float64)
    bn = cbn.BatchNorm2d(3, dtype=np.float64, activation=act, negative_slope=0.05)
    bn.weight[...] = w
    bn.bias[...] = b
    y = bn(x)
    gx = bn.backward(g)
    ey, sm, si = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5,
                                        activation=act, negative_slope=0.05)
    assert y.tobytes() == ey.tobytes()
    egx = run_backward(g, x, w, b, sm, si, True, 1, act, 0.05, ey, None)[0]
    assert gx.tobytes() == egx.tobytes()


def test_normalize_takes_every_activation():
    x, w, b, rm, rv, r, _ = data((4, 3, 5, 5), 1, np.float64)
    invstd, scale, shift = cbn.functional.eval_parameters(w, b, rv, 1e-5, np.float64)
    for act in ACTS:
        y = cbn.functional.normalize(x, rm, scale, shift, activation=act, residual=r,
                                     negative_slope=0.3)
        e = cbn.batch_norm(x, rm, rv, w, b, activation=act, residual=r, negative_slope=0.3)
        assert y.tobytes() == e.tobytes()


def test_bad_activation_arguments_are_refused():
    x, w, b, rm, rv, _, g = data((4, 3), 1, np.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        cbn.batch_norm(x, rm, rv, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        cbn.BatchNorm1d(3, activation="tanh")
    with pytest.raises(TypeError, match="negative_slope"):
        cbn.batch_norm(x, rm, rv, activation="leaky_relu", negative_slope="0.1")
    with pytest.raises(ValueError, match="negative_slope"):
        cbn.batch_norm(x, rm, rv, activation="leaky_relu", negative_slope=float("nan"))
    y, sm, si = cbn.batch_norm_forward(x, w, b, None, None, True, 0.1, 1e-5,
                                       activation="relu6")
    with pytest.raises(ValueError, match="needs output"):
        cbn.batch_norm_backward(g, x, w, sm, si, activation="relu6")
    with pytest.raises(ValueError, match="negative_slope must be >= 0"):
        cbn.batch_norm_backward(g, x, w, sm, si, activation="leaky_relu", output=y,
                                negative_slope=-0.5)
    with pytest.raises(ValueError, match="output= is only used"):
        cbn.batch_norm_backward(g, x, w, sm, si, activation="silu", output=y)


def test_leaky_relu_negative_slope_forward_and_default():
    x = np.array([[-2.0, 1.0], [3.0, -4.0]])
    y = cbn.batch_norm(x, None, None, training=True, eps=0.0, activation="leaky_relu")
    z = bn64(x, np.ones(2), np.zeros(2), 1, True, eps=0.0)[0]
    np.testing.assert_allclose(y, np.where(z > 0, z, 0.01 * z), rtol=1e-12)
    y = cbn.batch_norm(x, None, None, training=True, eps=0.0, activation="leaky_relu",
                       negative_slope=-0.5)
    np.testing.assert_allclose(y, np.where(z > 0, z, -0.5 * z), rtol=1e-12)
