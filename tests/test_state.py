"""Module state without optional peers: the running-variance convention (``unbiased=``),
``bias=False``, state dicts without ``num_batches_tracked``, half-precision state, pickles of
older modules, and ``cbn.load`` on malformed files (every one a ValueError naming the file,
raised before anything big is allocated).

Expected values are computed here in float64 NumPy from the definitions."""

from __future__ import annotations

import io
import json
import pickle
import tracemalloc
import zipfile

import numpy as np
import pytest

import cbn


def _data(shape, seed, dtype=np.float32, axis=1):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    return (rng.standard_normal(shape) * rng.uniform(0.5, 2, C).reshape(bshape)
            + rng.uniform(-3, 3, C).reshape(bshape)).astype(dtype)


def _biased_var(x, axis=1):
    """(mean, biased variance, n) per channel, in float64."""
    v = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, x.shape[axis])
    return v.mean(0), v.var(0), v.shape[0]


# ------------------------------------------------------------ running-variance convention


@pytest.mark.parametrize("dtype, maxulp", [(np.float32, 2), (np.float64, 16)])
@pytest.mark.parametrize("momentum", [0.1, 0.01, None])
def test_biased_convention_updates_with_the_biased_variance(dtype, maxulp, momentum):
    # Each step: rv = (1 - m) * rv + m * var (biased), computed here in float64 from the data
    # and the module's previous running_var, rounded once to the module's dtype (float64:
    # the kernel's variance and NumPy's are summed differently, a few ulps apart).
    m = cbn.BatchNorm2d(3, momentum=momentum, unbiased=False, dtype=dtype)
    for step in range(5):
        x = _data((4, 3, 5, 6), step, dtype)
        rv_before = m.running_var.astype(np.float64)
        m(x)
        _, var, n = _biased_var(x)
        f = 1.0 / (step + 1) if momentum is None else momentum
        expected = ((1.0 - f) * rv_before + f * var).astype(dtype)
        np.testing.assert_array_max_ulp(m.running_var, expected, maxulp=maxulp)
        # and clearly not the unbiased update (n / (n - 1) = 120 / 119)
        unbiased = ((1.0 - f) * rv_before + f * var * n / (n - 1)).astype(dtype)
        assert np.all(np.abs(m.running_var - expected) < np.abs(unbiased - expected))


def test_biased_convention_changes_only_the_running_variance():
    a = cbn.BatchNorm(4, momentum=0.3, axis=-1)
    b = cbn.BatchNorm(4, momentum=0.3, axis=-1, unbiased=False)
    for step in range(3):
        x = _data((6, 5, 4), 10 + step, axis=-1)
        np.testing.assert_array_equal(a(x), b(x))
        np.testing.assert_array_equal(a.backward(x), b.backward(x))
        np.testing.assert_array_equal(a.running_mean, b.running_mean)
        assert a.num_batches_tracked == b.num_batches_tracked == step + 1
    a.eval()
    b.eval()
    x = _data((6, 5, 4), 20, axis=-1)
    assert not np.array_equal(a(x), b(x))       # different running variances now


def test_biased_convention_leaves_state_alone_on_error_and_in_eval():
    m = cbn.BatchNorm1d(3, unbiased=False)
    m(_data((5, 3), 0))
    snap = m.state_dict()
    with pytest.raises(ValueError, match="more than 1 value"):
        m(np.ones((1, 3), np.float32))
    m.eval()
    m(_data((5, 3), 1))
    m.train()
    m(np.empty((0, 3), np.float32))              # nothing to update
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(v, snap[k] if k != "num_batches_tracked" else 2)


def test_unbiased_flag_checks_repr_and_save(tmp_path):
    with pytest.raises(TypeError, match="unbiased"):
        cbn.BatchNorm1d(3, unbiased="no")
    m = cbn.BatchNorm1d(3, unbiased=False)
    assert repr(m).endswith(", unbiased=False)")
    m(_data((5, 3), 2))
    back = cbn.load(m.save(tmp_path / "m"))
    assert back.unbiased is False and repr(back) == repr(m)
    np.testing.assert_array_equal(back.running_var, m.running_var)


# ------------------------------------------------------------------------- bias=False


def test_bias_false_has_a_weight_and_no_bias(tmp_path):
    m = cbn.BatchNorm2d(3, bias=False)
    assert m.weight is not None and m.bias is None
    assert list(m.state_dict()) == ["weight", "running_mean", "running_var",
                                    "num_batches_tracked"]
    assert "affine=True, bias=False, track_running_stats=True" in repr(m)
    m.weight[:] = [2.0, -1.0, 0.5]
    x = _data((2, 3, 4, 4), 3)
    y = m(x)
    mean, var, _ = _biased_var(x)
    s = (1, 3, 1, 1)
    expected = (x - mean.reshape(s)) / np.sqrt(var.reshape(s) + 1e-5) * m.weight.reshape(s)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    m.backward(np.ones_like(x))
    assert m.grad_weight is not None and m.grad_bias is None
    m.reset_parameters()
    np.testing.assert_array_equal(m.weight, 1)
    back = cbn.load(m.save(tmp_path / "nobias"))
    assert back.bias is None and repr(back) == repr(m)
    np.testing.assert_array_equal(m.freeze()(x), m.unfreeze()(x))
    with pytest.raises(ValueError, match="unexpected key"):
        m.load_state_dict(cbn.BatchNorm2d(3).state_dict())


# ------------------------------------------------------------------ num_batches_tracked


def test_state_dict_without_counter_loads_strictly():
    src = cbn.BatchNorm1d(3)
    src(_data((5, 3), 4))
    d = src.state_dict()
    del d["num_batches_tracked"]
    fresh = cbn.BatchNorm1d(3)
    assert fresh.load_state_dict(d, strict=True) == ([], [])
    assert fresh.num_batches_tracked == 0
    np.testing.assert_array_equal(fresh.running_var, src.running_var)
    used = cbn.BatchNorm1d(3)
    for s in range(3):
        used(_data((5, 3), s))
    used.load_state_dict(d)
    assert used.num_batches_tracked == 3          # kept, as PyTorch does


# -------------------------------------------------------------------- half precision


def test_bfloat16_state_like_float16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    src = cbn.BatchNorm1d(3)
    src(_data((5, 3), 5))
    for half in (np.float16, bf16):
        d = {k: (v.astype(half) if k != "num_batches_tracked" else v)
             for k, v in src.state_dict().items()}
        m = cbn.BatchNorm1d(3, dtype=np.float64)
        m.load_state_dict(d)
        # half -> float is exact: the module holds exactly the half values
        np.testing.assert_array_equal(m.running_var, d["running_var"].astype(np.float64))


def test_functional_takes_bfloat16_vectors_like_float16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(6)
    x = _data((4, 3, 5), 6)
    w, b = rng.uniform(0.5, 2, 3), rng.uniform(-1, 1, 3)
    rm, rv = rng.uniform(-1, 1, 3), rng.uniform(0.5, 2, 3)
    for half in (np.float16, bf16):
        vecs = [v.astype(half) for v in (rm, rv, w, b)]
        exact = [v.astype(np.float32) for v in vecs]
        np.testing.assert_array_equal(cbn.batch_norm(x, *vecs, training=False),
                                      cbn.batch_norm(x, *exact, training=False))
        # in training the running statistics are updated in float32 and rounded back
        rm_h, rv_h = vecs[0].copy(), vecs[1].copy()
        rm_f, rv_f = exact[0].copy(), exact[1].copy()
        np.testing.assert_array_equal(
            cbn.batch_norm(x, rm_h, rv_h, vecs[2], vecs[3], training=True),
            cbn.batch_norm(x, rm_f, rv_f, exact[2], exact[3], training=True))
        np.testing.assert_array_equal(rm_h, rm_f.astype(half))
        np.testing.assert_array_equal(rv_h, rv_f.astype(half))
    with pytest.raises(TypeError, match="running_mean"):      # float64: not a half type
        cbn.batch_norm(x.astype(np.float64), np.zeros(3, bf16), np.ones(3), training=True)


# ---------------------------------------------------------------------------- pickles


def test_pickle_of_a_module_from_before_the_convention_option():
    m = cbn.BatchNorm1d(3)
    state = m.__getstate__()
    del state["unbiased"]
    old = cbn.BatchNorm1d.__new__(cbn.BatchNorm1d)
    old.__setstate__(state)
    assert old.unbiased is True
    clone = pickle.loads(pickle.dumps(old))
    clone(_data((4, 3), 7))
    assert clone.num_batches_tracked == 1


# ------------------------------------------------------------------ cbn.load hardening


def _npz(path, arrays):
    np.savez(path, **arrays)
    return path


def _saved(tmp_path, **kwargs):
    """The arrays of a saved module (a dict to tamper with) and its config."""
    m = cbn.BatchNorm2d(4, **kwargs)
    with np.load(m.save(tmp_path / "good")) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(str(arrays["__config__"]))


def _raises_naming(path, match):
    with pytest.raises(ValueError, match=match) as info:
        cbn.load(path)
    assert repr(str(path)) in str(info.value)


def test_load_round_trip_and_format_versions(tmp_path):
    m = cbn.BatchNorm2d(4)
    p = m.save(tmp_path / "v1")
    with np.load(p) as f:
        assert int(f["__cbn_format__"]) == 1          # default modules: readable by old cbn
    assert repr(cbn.load(p)) == repr(m)
    p2 = cbn.BatchNorm2d(4, bias=False).save(tmp_path / "v2")
    with np.load(p2) as f:
        assert int(f["__cbn_format__"]) == 2


def test_load_truncated_file(tmp_path):
    good = cbn.BatchNorm2d(4).save(tmp_path / "good")
    data = open(good, "rb").read()
    for cut in (len(data) // 2, len(data) - 10, 30):
        p = tmp_path / f"cut{cut}.npz"
        p.write_bytes(data[:cut])
        _raises_naming(p, "not a readable .npz")


def test_load_not_a_zip(tmp_path):
    p = tmp_path / "text.npz"
    p.write_text("hello")
    _raises_naming(p, "not a readable .npz")
    q = tmp_path / "array.npy"
    np.save(q, np.ones(3))
    _raises_naming(q, "not a readable .npz")
    r = tmp_path / "other.zip"
    with zipfile.ZipFile(r, "w") as z:
        z.writestr("readme.txt", "not an array")
    _raises_naming(r, "not NumPy arrays")


def test_load_damaged_member(tmp_path):
    good = cbn.BatchNorm2d(4).save(tmp_path / "good")
    data = bytearray(open(good, "rb").read())
    i = data.index(b"running_var.npy") + len("running_var.npy") + 130   # inside its data
    data[i] ^= 0xFF
    p = tmp_path / "flipped.npz"
    p.write_bytes(bytes(data))
    _raises_naming(p, "damaged archive|running_var")


def test_load_missing_and_extra_arrays(tmp_path):
    arrays, _ = _saved(tmp_path)
    for key in ("running_var", "weight", "num_batches_tracked", "__config__"):
        bad = {k: v for k, v in arrays.items() if k != key}
        match = "not a module saved by cbn" if key.startswith("__") else "missing array"
        _raises_naming(_npz(tmp_path / f"no_{key}.npz", bad), match)
    _raises_naming(_npz(tmp_path / "extra.npz", dict(arrays, extra=np.zeros(4))),
                   "unexpected array")


@pytest.mark.parametrize("key, value, match", [
    ("running_mean", np.zeros(5, np.float32), "shape"),
    ("weight", np.ones((4, 1), np.float32), "shape"),
    ("bias", np.zeros(4, np.float64), "dtype"),
    ("running_var", np.ones(4, np.int32), "dtype"),
    ("running_var", np.array(["a", "b", "c", "d"]), "dtype"),
    ("num_batches_tracked", np.array(1.0), "dtype"),
    ("num_batches_tracked", np.array([1, 2]), "shape"),
    ("__cbn_format__", np.array(99), "format version"),
    ("__cbn_format__", np.array("1"), "dtype"),
    ("__class__", np.array("Linear"), "unknown module class"),
    ("__class__", np.array(3), "dtype"),
    ("__config__", np.array("{not json"), "JSON"),
    ("__config__", np.array("[4]"), "JSON object"),
])
def test_load_wrong_shapes_and_dtypes(tmp_path, key, value, match):
    arrays, _ = _saved(tmp_path)
    arrays[key] = value
    _raises_naming(_npz(tmp_path / "bad.npz", arrays), match)


@pytest.mark.parametrize("change, match", [
    ({"num_features": 10 ** 12}, "shape"),
    ({"num_features": 10 ** 40}, "shape"),
    ({"num_features": -4}, "num_features"),
    ({"num_features": 4.0}, "num_features"),
    ({"num_features": True}, "num_features"),
    ({"dtype": "int8"}, "dtype"),
    ({"dtype": "float64"}, "dtype"),
    ({"affine": "yes"}, "affine"),
    ({"eps": -1.0}, "eps"),
    ({"momentum": "fast"}, "momentum"),
    ({"axis": 7}, "axis"),
    ({"activation": "gelu"}, "activation"),
    ({"colour": "red"}, "unknown key"),
    ({"bias": False}, "version"),
    ({"track_running_stats": False}, "unexpected array"),
])
def test_load_bad_config(tmp_path, change, match):
    arrays, config = _saved(tmp_path)
    config.update(change)
    arrays["__config__"] = np.array(json.dumps(config))
    _raises_naming(_npz(tmp_path / "bad.npz", arrays), match)


def _npy_bytes(header_shape, dtype, payload):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": header_shape})
    return buf.getvalue() + payload


def test_load_allocates_nothing_big_for_absurd_sizes(tmp_path):
    # A config announcing 10**12 channels, and an array header announcing as many values
    # with 16 bytes of data: both refused from the headers, with no large allocation.
    arrays, config = _saved(tmp_path)
    config["num_features"] = 10 ** 12
    arrays["__config__"] = np.array(json.dumps(config))
    p = _npz(tmp_path / "absurd.npz", arrays)
    q = tmp_path / "lying_header.npz"
    arrays, config = _saved(tmp_path, affine=False)
    config["num_features"] = 10 ** 10
    arrays["__config__"] = np.array(json.dumps(config))
    with zipfile.ZipFile(q, "w") as z:
        for k, v in arrays.items():
            if k in ("running_mean", "running_var"):
                z.writestr(k + ".npy", _npy_bytes((10 ** 10,), np.float32, bytes(16)))
            else:
                buf = io.BytesIO()
                np.save(buf, v)
                z.writestr(k + ".npy", buf.getvalue())
    tracemalloc.start()
    try:
        _raises_naming(p, "shape")
        _raises_naming(q, "header announces")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak


def test_load_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        cbn.load(tmp_path / "nothing.npz")


def test_load_from_a_file_object(tmp_path):
    m = cbn.BatchNorm1d(3, bias=False)
    data = open(m.save(tmp_path / "m"), "rb").read()
    assert repr(cbn.load(io.BytesIO(data))) == repr(m)
    with pytest.raises(ValueError, match="<BytesIO>.*not a readable .npz"):
        cbn.load(io.BytesIO(data[:100]))
