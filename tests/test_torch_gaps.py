"""PyTorch parity for what PyTorch's own batch-norm tests exercise and cbn once lacked: state
dicts without ``num_batches_tracked``, ``bias=False``, bfloat16 modules and bfloat16
per-channel vectors in the functional API. PyTorch is the oracle; skipped without it."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import cbn

torch = pytest.importorskip("torch")

SHAPES = {"BatchNorm1d": (6, 3, 5), "BatchNorm2d": (4, 3, 5, 2), "BatchNorm3d": (2, 3, 4, 3, 2)}
TOL = dict(rtol=3e-5, atol=3e-5)


def _x(rng, shape, dtype=np.float32):
    C = shape[1]
    s = (1, C) + (1,) * (len(shape) - 2)
    return (rng.standard_normal(shape) * rng.uniform(0.5, 2, C).reshape(s)
            + rng.uniform(-2, 2, C).reshape(s)).astype(dtype)


# ------------------------------------------------------------------ num_batches_tracked


def _trained_torch(steps):
    t = torch.nn.BatchNorm1d(3)
    rng = np.random.default_rng(steps)
    for _ in range(steps):
        t(torch.from_numpy(_x(rng, (5, 3))))
    return t


@pytest.mark.parametrize("trained_target", [False, True])
def test_state_dict_without_counter_like_torch(trained_target):
    src = _trained_torch(2)
    plain = {k: v for k, v in src.state_dict().items() if k != "num_batches_tracked"}
    t = _trained_torch(3 if trained_target else 0)
    m = cbn.BatchNorm1d(3)
    if trained_target:
        m.load_state_dict(_trained_torch(3).state_dict())
    theirs = t.load_state_dict(plain, strict=True)
    ours = m.load_state_dict({k: v.numpy() for k, v in plain.items()}, strict=True)
    assert (ours.missing_keys, ours.unexpected_keys) == (theirs.missing_keys,
                                                          theirs.unexpected_keys)
    assert m.num_batches_tracked == int(t.num_batches_tracked) == (3 if trained_target else 0)
    np.testing.assert_array_equal(m.running_var, t.running_var.numpy())


@pytest.mark.parametrize("version, loads", [(2, False), (1, True)])
def test_counter_required_when_the_metadata_says_it_existed(version, loads):
    sd = _trained_torch(2).state_dict()           # an OrderedDict with _metadata
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = version
    t, m = torch.nn.BatchNorm1d(3), cbn.BatchNorm1d(3)
    if loads:
        t.load_state_dict(sd)
        m.load_state_dict(sd)
        assert m.num_batches_tracked == int(t.num_batches_tracked) == 0
    else:
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            t.load_state_dict(sd)
        with pytest.raises(ValueError, match="missing key\\(s\\): 'num_batches_tracked'"):
            m.load_state_dict(sd)


# ---------------------------------------------------------------------------- bias=False


def test_bias_argument_like_torch_signature():
    theirs = inspect.signature(torch.nn.BatchNorm2d).parameters["bias"]
    ours = inspect.signature(cbn.BatchNorm2d).parameters["bias"]
    assert ours.kind == theirs.kind == inspect.Parameter.KEYWORD_ONLY
    assert ours.default is theirs.default is True


@pytest.mark.parametrize("name", list(SHAPES))
def test_bias_false_like_torch(name):
    rng = np.random.default_rng(1)
    t = getattr(torch.nn, name)(3, bias=False, momentum=0.3)
    m = getattr(cbn, name)(3, bias=False, momentum=0.3)
    assert repr(m) == repr(t)
    assert list(m.state_dict()) == list(t.state_dict())
    w = rng.uniform(0.5, 2, 3).astype(np.float32)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(w))
    m.load_state_dict({k: v.numpy() for k, v in t.state_dict().items()})
    for mode in ("train", "train", "eval"):
        t.train(mode == "train")
        m.train(mode == "train")
        x = _x(rng, SHAPES[name])
        g = rng.standard_normal(x.shape).astype(np.float32)
        xt = torch.from_numpy(x).requires_grad_()
        yt = t(xt)
        yt.backward(torch.from_numpy(g))
        np.testing.assert_allclose(m(x), yt.detach().numpy(), **TOL)
        np.testing.assert_allclose(m.backward(g), xt.grad.numpy(), **TOL)
        np.testing.assert_allclose(m.grad_weight, t.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
        assert m.grad_bias is None and t.bias is None
        np.testing.assert_allclose(m.running_var, t.running_var.numpy(), **TOL)
    back = getattr(torch.nn, name)(3, bias=False)
    back.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in
                          m.state_dict().items()})
    np.testing.assert_array_equal(back.running_mean.numpy(), m.running_mean)


# ------------------------------------------------------------------------------ bfloat16


def test_load_state_dict_of_a_bfloat16_torch_module():
    rng = np.random.default_rng(2)
    t = torch.nn.BatchNorm2d(3).to(torch.bfloat16)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 3)))
        t.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, 3)))
    for _ in range(2):
        t(torch.from_numpy(_x(rng, (4, 3, 5, 2))).to(torch.bfloat16))
    m = cbn.BatchNorm2d(3)
    m.load_state_dict(t.state_dict())
    for k, v in t.state_dict().items():
        np.testing.assert_array_equal(np.asarray(getattr(m, k)), v.float().numpy())
    # the module then computes what the torch module does (bfloat16 input, float32 math)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    t.eval()
    m.eval()
    x = _x(rng, (4, 3, 5, 2)).astype(ml_dtypes.bfloat16)
    with torch.no_grad():
        yt = t(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)).float().numpy()
    np.testing.assert_allclose(m(x).astype(np.float32), yt, rtol=2 ** -7, atol=2 ** -7)


@pytest.mark.parametrize("training", [True, False])
def test_functional_bfloat16_vectors_like_torch(training):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(3)
    x = _x(rng, (4, 3, 6, 5)).astype(bf16)
    vecs = [rng.uniform(-1, 1, 3), rng.uniform(0.5, 2, 3), rng.uniform(0.5, 2, 3),
            rng.uniform(-1, 1, 3)]
    rm, rv, w, b = (v.astype(bf16) for v in vecs)
    rm_t, rv_t, w_t, b_t = (torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
                            for v in (rm, rv, w, b))
    y = cbn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.2)
    yt = torch.nn.functional.batch_norm(
        torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16), rm_t, rv_t, w_t, b_t,
        training=training, momentum=0.2)
    assert y.dtype == bf16 and rm.dtype == bf16
    # both compute in float32 and round to bfloat16 (8 bits): at most an ulp apart
    bf = dict(rtol=2 ** -7, atol=2 ** -7)
    np.testing.assert_allclose(y.astype(np.float32), yt.float().numpy(), **bf)
    np.testing.assert_allclose(rm.astype(np.float32), rm_t.float().numpy(), **bf)
    np.testing.assert_allclose(rv.astype(np.float32), rv_t.float().numpy(), **bf)
    if training:
        assert not np.array_equal(rv.astype(np.float32), vecs[1].astype(bf16).astype(np.float32))
