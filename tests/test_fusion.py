"""Fused activation and residual, their backward, folding into Linear/Conv, half precision.

Oracles: the float64 NumPy reference (cbn._reference) with the ReLU and residual applied
by hand, central finite differences, and PyTorch where it is installed (relu(bn(x) + r)
through autograd, fuse_conv_bn_weights, CPU float16 batch norm).
"""

import numpy as np
import pytest

import cbn
from cbn import _reference as ref

CASES = [((6, 4), 1), ((4, 5, 30), 1), ((3, 4, 9, 9), 1), ((3, 9, 9, 4), -1),
         ((2, 3, 4, 5, 6), 1), ((37, 11, 3), -1), ((2, 3, 20, 20), 1)]


def _tol(dtype):
    # A few hundred ulps of the data type: normalize, add and clip are each one rounding,
    # the statistics a few more; float64 values are O(1) here.
    return 300 * np.finfo(dtype).eps


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 1.5 + 0.3).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    g = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = (rng.random(C) + 0.5).astype(dtype)
    return x, r, g, w, b, rm, rv


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_relu_residual_forward_matches_reference(shape, axis, dtype, training, with_residual):
    x, r, _, w, b, rm, rv = _data(shape, axis, dtype)
    res = r if with_residual else None
    rm1, rv1, rm2, rv2 = rm.copy(), rv.copy(), rm.copy(), rv.copy()
    y, m, s = cbn.batch_norm_forward(x, w, b, rm1, rv1, training, 0.1, 1e-5, axis=axis,
                                     activation="relu", residual=res)
    y_bn, m_ref, s_ref = ref.batch_norm_forward(x, w, b, rm2, rv2, training, 0.1, 1e-5,
                                                axis=axis)
    pre = ref.batch_norm_forward(x.astype(np.float64), w, b, rm.astype(np.float64),
                                 rv.astype(np.float64), training, 0.1, 1e-5, axis=axis)[0]
    expected = np.maximum(pre + (0 if res is None else r.astype(np.float64)), 0.0)
    tol = _tol(dtype)
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)
    assert (y >= 0).all()
    np.testing.assert_allclose(m, m_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(s, s_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(rm1, rm2, rtol=tol, atol=tol)
    np.testing.assert_allclose(rv1, rv2, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_without_activation_is_added(shape, axis, dtype):
    x, r, _, w, b, rm, rv = _data(shape, axis, dtype)
    y = cbn.batch_norm(x, rm, rv, w, b, axis=axis, residual=r)
    y0 = cbn.batch_norm(x, rm, rv, w, b, axis=axis)
    np.testing.assert_allclose(y, y0.astype(np.float64) + r, rtol=_tol(dtype), atol=_tol(dtype))


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_masked_backward_matches_reference(shape, axis, dtype, training):
    x, r, g, w, b, rm, rv = _data(shape, axis, dtype, seed=1)
    y, m, s = cbn.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training, 0.1, 1e-5,
                                     axis=axis, activation="relu", residual=r)
    dx, gw, gb, gr = cbn.batch_norm_backward(g, x, w, m, s, training, axis=axis,
                                             activation="relu", output=y, residual=True)
    g_eff = np.where(y > 0, g, 0).astype(dtype)
    np.testing.assert_array_equal(gr, g_eff)
    dx_ref, gw_ref, gb_ref = ref.batch_norm_backward(g_eff, x, w, m, s, training, axis=axis)
    scale = max(1.0, float(np.abs(dx_ref).max()))
    tol = _tol(dtype) * np.sqrt(x.size)
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(gw, gw_ref, rtol=tol, atol=tol * np.sqrt(x.size))
    np.testing.assert_allclose(gb, gb_ref, rtol=tol, atol=tol * np.sqrt(x.size))
    # without an activation, the residual's gradient is grad_output itself
    *_, gr_plain = cbn.batch_norm_backward(g, x, w, m, s, training, axis=axis, residual=True)
    np.testing.assert_array_equal(gr_plain, g)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape,axis", [((5, 3, 4), 1), ((4, 3, 3, 2), -1)])
def test_relu_residual_gradients_by_finite_differences(training, shape, axis):
    x, r, g, w, b, rm, rv = _data(shape, axis, np.float64, seed=2)

    def loss(x_, w_, b_, r_):
        if training:
            y_ = cbn.batch_norm(x_, None, None, w_, b_, training=True, axis=axis,
                                activation="relu", residual=r_)
        else:
            y_ = cbn.batch_norm(x_, rm, rv, w_, b_, axis=axis, activation="relu", residual=r_)
        return float((y_ * g).sum())

    stats = (None, None) if training else (rm, rv)
    y, m, s = cbn.batch_norm_forward(x, w, b, *stats, training, 0.1, 1e-5, axis=axis,
                                     activation="relu", residual=r)
    # the loss is not smooth at the ReLU's kink: these seeds keep every pre-activation
    # much farther from 0 than the step
    pre = cbn.batch_norm(x, *stats, w, b, training=training, axis=axis, residual=r)
    assert np.abs(pre).min() > 1e-4
    dx, gw, gb, gr = cbn.batch_norm_backward(g, x, w, m, s, training, axis=axis,
                                             activation="relu", output=y, residual=True)
    h = 1e-6
    for name, arr, grad in (("x", x, dx), ("w", w, gw), ("b", b, gb), ("r", r, gr)):
        num = np.empty_like(arr)
        it = np.nditer(arr, flags=["multi_index"])
        for _ in it:
            i = it.multi_index
            args = {"x": x, "w": w, "b": b, "r": r}
            plus, minus = {k: v.copy() for k, v in args.items()}, {k: v.copy() for k, v in args.items()}
            plus[name][i] += h
            minus[name][i] -= h
            num[i] = (loss(plus["x"], plus["w"], plus["b"], plus["r"])
                      - loss(minus["x"], minus["w"], minus["b"], minus["r"])) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-6, err_msg=name)


def test_activation_errors_leave_state_untouched():
    x, r, g, w, b, rm, rv = _data((4, 3, 5), 1, np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    with pytest.raises(ValueError, match="activation"):
        cbn.batch_norm(x, rm, rv, w, b, training=True, activation="gelu")
    with pytest.raises(ValueError, match="residual has shape"):
        cbn.batch_norm(x, rm, rv, w, b, training=True, residual=r[:2])
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    y, m, s = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, activation="relu")
    with pytest.raises(ValueError, match="output="):
        cbn.batch_norm_backward(g, x, w, m, s, True, activation="relu")
    with pytest.raises(ValueError, match="output has shape"):
        cbn.batch_norm_backward(g, x, w, m, s, True, activation="relu", output=y[:1])


def test_fused_forward_is_bit_identical_across_threads():
    rng = np.random.default_rng(3)
    for shape, axis in (((8, 16, 32, 32), 1), ((8, 32, 32, 16), -1)):
        x = rng.standard_normal(shape).astype(np.float32)
        r = rng.standard_normal(shape).astype(np.float32)
        g = rng.standard_normal(shape).astype(np.float32)
        outs = []
        for n in (1, 2, 3):
            y, m, s = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5,
                                             axis=axis, activation="relu", residual=r,
                                             n_threads=n)
            grads = cbn.batch_norm_backward(g, x, None, m, s, True, axis=axis,
                                            activation="relu", output=y, residual=True,
                                            n_threads=n)
            outs.append((y, m, s) + grads)
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------- fold

def _module(C, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    bn = cbn.BatchNorm(C, eps=1e-3, dtype=dtype)
    bn.weight[:] = rng.standard_normal(C)
    bn.bias[:] = rng.standard_normal(C)
    bn.running_mean[:] = rng.standard_normal(C)
    bn.running_var[:] = rng.random(C) + 0.5
    return bn.eval()


def test_fold_linear_matches_bn_of_linear():
    rng = np.random.default_rng(4)
    bn = _module(6, dtype=np.float64)
    W, b = rng.standard_normal((6, 10)), rng.standard_normal(6)
    x = rng.standard_normal((7, 10))
    Wf, bf = cbn.fold(W, b, bn)
    np.testing.assert_allclose(x @ Wf.T + bf, bn(x @ W.T + b), rtol=1e-12, atol=1e-12)
    Wf0, bf0 = cbn.fold(W, None, bn)
    np.testing.assert_allclose(x @ Wf0.T + bf0, bn(x @ W.T), rtol=1e-12, atol=1e-12)


def test_fold_rejects_mismatches():
    bn = _module(4)
    with pytest.raises(ValueError, match="channels"):
        cbn.fold(np.ones((5, 3)), None, bn)
    with pytest.raises(ValueError, match="running statistics"):
        cbn.fold(np.ones((4, 3)), None, cbn.BatchNorm1d(4, track_running_stats=False))


def test_fold_matches_torch_fuse_conv_bn_weights():
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    rng = np.random.default_rng(5)
    for transpose, wshape in ((False, (6, 3, 3, 3)), (True, (3, 6, 2, 2)), (False, (6, 4))):
        bn = _module(6, seed=len(wshape))
        W = rng.standard_normal(wshape).astype(np.float32)
        b = rng.standard_normal(6).astype(np.float32)
        Wf, bf = cbn.fold(W, b, bn, transpose=transpose)
        t = lambda a: torch.from_numpy(np.asarray(a).copy())
        Wt, bt = fuse_conv_bn_weights(t(W), t(b), t(bn.running_mean), t(bn.running_var),
                                      bn.eps, t(bn.weight), t(bn.bias), transpose=transpose)
        np.testing.assert_allclose(Wf, Wt.detach().numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(bf, bt.detach().numpy(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- torch parity

@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (8, 6)])
def test_relu_residual_matches_torch_autograd(training, shape):
    torch = pytest.importorskip("torch")
    x, r, g, w, b, rm, rv = _data(shape, 1, np.float64, seed=6)
    y, m, s = cbn.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training, 0.1, 1e-5,
                                     activation="relu", residual=r)
    dx, gw, gb, gr = cbn.batch_norm_backward(g, x, w, m, s, training, activation="relu",
                                             output=y, residual=True)
    xt, rt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, r, w, b))
    yt = torch.relu(torch.nn.functional.batch_norm(
        xt, torch.tensor(rm), torch.tensor(rv), wt, bt, training=training, momentum=0.1,
        eps=1e-5) + rt)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-10)
    for mine, theirs in ((dx, xt.grad), (gw, wt.grad), (gb, bt.grad), (gr, rt.grad)):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("training", [True, False])
def test_float16_matches_torch_cpu_half(training):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, 3, 6, 6)) * 2 + 1).astype(np.float16)
    w, b = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm_t, rv_t = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    y = cbn.batch_norm(x, rm, rv, w, b, training=training)
    yt = torch.nn.functional.batch_norm(torch.from_numpy(x), rm_t, rv_t, torch.from_numpy(w),
                                        torch.from_numpy(b), training=training)
    assert y.dtype == np.float16
    # both compute in float32 and round once to half: at most an ulp of half apart
    np.testing.assert_allclose(y.astype(np.float32), yt.numpy().astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(rm, rm_t.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rv, rv_t.numpy(), rtol=1e-5, atol=1e-6)


def test_float16_matches_reference_and_backward_dtypes():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 4, 7)).astype(np.float16)
    g = rng.standard_normal((5, 4, 7)).astype(np.float16)
    y, m, s = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    y_ref, m_ref, s_ref = ref.batch_norm_forward(x.astype(np.float64), None, None, None, None,
                                                 True, 0.1, 1e-5)
    assert y.dtype == np.float16 and m.dtype == np.float32 and s.dtype == np.float32
    np.testing.assert_allclose(y.astype(np.float64), y_ref, rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(m, m_ref, rtol=1e-5, atol=1e-6)
    dx, gw, gb = cbn.batch_norm_backward(g, x, None, m, s, True)
    assert dx.dtype == np.float16 and gw.dtype == np.float32
    dx_ref, gw_ref, _ = ref.batch_norm_backward(g.astype(np.float64), x.astype(np.float64),
                                                None, m, s, True)
    np.testing.assert_allclose(dx.astype(np.float64), dx_ref, rtol=1e-2, atol=2e-3)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_bfloat16_through_ml_dtypes(training):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((4, 3, 6, 6)) * 2 + 1).astype(bf16)
    w, b = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    y = cbn.batch_norm(x, rm, rv, w, b, training=training)
    y_ref = ref.batch_norm(x.astype(np.float64), rm_ref, rv_ref, w, b, training=training)
    assert y.dtype == bf16
    # computed in float32, rounded once to bfloat16 (8 bits of mantissa)
    np.testing.assert_allclose(y.astype(np.float64), y_ref, rtol=2 ** -7, atol=2 ** -7)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-5, atol=1e-6)
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    yt = torch.nn.functional.batch_norm(xt, torch.zeros(3), torch.ones(3),
                                        torch.from_numpy(w), torch.from_numpy(b),
                                        training=training)
    np.testing.assert_allclose(y.astype(np.float32), yt.float().numpy(), rtol=2 ** -7,
                               atol=2 ** -7)
