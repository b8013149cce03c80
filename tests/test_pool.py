"""The output pool (cbn/src/cbn_pool.h, cbn.output_pool): large fresh outputs reuse the
blocks earlier outputs were freed to, and nothing about them differs from any NumPy array.

The oracle for values is the same call writing into a preallocated ``out=`` (bit-identical:
the pool changes where the output lives, never what is written), and NumPy itself for the
arrays' behaviour (ownership, resize, pickling, freeing).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

import cbn

BIG = (8, 16, 64, 128)        # 4 MB in float32: the smallest pooled size
MIN = cbn.output_pool()["min_size"]


@pytest.fixture(autouse=True)
def fresh_pool():
    """Each test starts with an empty pool at the default limit, and leaves it so."""
    limit = cbn.output_pool()["max_bytes"]
    cbn.output_pool(limit)
    yield
    cbn.output_pool(limit)


def _data(shape=BIG, dtype=np.float32, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    C = shape[1]
    return x, np.ones(C, dtype), np.zeros(C, dtype)


def test_a_freed_output_is_reused_by_the_next_call_of_its_size():
    x, w, b = _data()
    assert x.nbytes >= MIN
    y1 = cbn.batch_norm(x, None, None, w, b, training=True)
    ptr = y1.ctypes.data
    del y1
    before = cbn.output_pool()
    assert before["held_bytes"] >= x.nbytes
    y2 = cbn.batch_norm(x, None, None, w, b, training=True)
    after = cbn.output_pool()
    assert y2.ctypes.data == ptr
    assert after["hits"] == before["hits"] + 1
    want = np.empty_like(x)
    cbn.batch_norm(x, None, None, w, b, training=True, out=want)
    assert want.tobytes() == y2.tobytes()


@pytest.mark.parametrize("call", ["train", "eval", "backward", "backward_residual",
                                  "general_path"])
def test_pooled_outputs_hold_the_values_of_out(call):
    x, w, b = _data(dtype=np.float64 if call == "eval" else np.float32)
    rm, rv = np.zeros_like(w), np.ones_like(w)
    g = np.random.default_rng(1).standard_normal(x.shape).astype(x.dtype)
    for _ in range(3):                  # the second and third calls get pooled blocks
        if call == "train":
            got = [cbn.batch_norm(x, None, None, w, b, training=True)]
            want = [np.empty_like(x)]
            cbn.batch_norm(x, None, None, w, b, training=True, out=want[0])
        elif call == "eval":
            got = [cbn.batch_norm(x, rm, rv, w, b)]
            want = [np.empty_like(x)]
            cbn.batch_norm(x, rm, rv, w, b, out=want[0])
        elif call in ("backward", "backward_residual"):
            res = call == "backward_residual"
            got = cbn.batch_norm_backward(g, x, w, rm, rv, residual=res)
            want = list(cbn.batch_norm_backward(g, x, w, rm, rv, residual=res,
                                                out=np.empty_like(x)))
        else:                           # a Fortran-ordered input: cbn.functional's path
            xf = np.asfortranarray(x)
            got = [cbn.batch_norm(xf, rm, rv, w, b)]
            want = [np.empty_like(xf)]
            cbn.batch_norm(xf, rm, rv, w, b, out=want[0])
        for a, e in zip(got, want):
            assert a.dtype == e.dtype and a.shape == e.shape
            assert a.tobytes(order="A") == e.tobytes(order="A")
        del got
    assert cbn.output_pool()["hits"] >= 2


def test_pooled_outputs_are_ordinary_arrays():
    x, w, b = _data()
    y = cbn.batch_norm(x, None, None, w, b, training=True)
    assert y.flags.owndata and y.base is None and y.flags.writeable
    assert y.ctypes.data % 64 == 0          # on a cache line
    copy = y.copy()
    assert pickle.loads(pickle.dumps(y)).tobytes() == copy.tobytes()
    # resize goes through the pool's realloc: values kept, new part zeroed (NumPy's rule)
    y.resize(x.size * 2, refcheck=False)
    assert y.reshape(-1)[:x.size].tobytes() == copy.reshape(-1).tobytes()
    assert not y.reshape(-1)[x.size:].any()
    y.resize(10, refcheck=False)
    assert y.tobytes() == copy.reshape(-1)[:10].tobytes()
    del y


def test_small_outputs_are_not_pooled():
    x, w, b = _data((8, 16, 4, 4))
    before = cbn.output_pool()
    for _ in range(5):
        cbn.batch_norm(x, None, None, w, b, training=True)
    after = cbn.output_pool()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])


def test_limits_are_kept():
    limit = 3 * (8 << 20)
    cbn.output_pool(limit)
    arrays = [cbn.batch_norm(*_data((2 + i, 16, 256, 256)), training=True)
              for i in range(12)]                         # 8 MB to 27 MB each
    del arrays
    state = cbn.output_pool()
    assert 0 < state["held_bytes"] <= limit
    cbn.output_pool(0)
    assert cbn.output_pool()["held_bytes"] == 0
    x, w, b = _data()
    hits = cbn.output_pool()["hits"]
    for _ in range(3):
        cbn.batch_norm(x, None, None, w, b, training=True)
    assert cbn.output_pool()["hits"] == hits                # off: nothing reused
    assert cbn.output_pool()["held_bytes"] == 0


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (1.5, TypeError), ("1G", TypeError),
                                     (True, TypeError)])
def test_bad_limits_are_refused(bad, exc):
    before = cbn.output_pool()
    with pytest.raises(exc, match="max_bytes"):
        cbn.output_pool(bad)
    assert cbn.output_pool()["max_bytes"] == before["max_bytes"]


def _child(code, env=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("value,limit", [("0", 0), ("64M", 64 << 20), ("1g", 1 << 30),
                                         ("12345", 12345)])
def test_the_environment_sets_the_limit(value, limit):
    r = _child("import cbn; print(cbn.output_pool()['max_bytes'])", {"CBN_OUTPUT_POOL": value})
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == limit


def test_a_junk_environment_value_warns_and_keeps_the_default():
    r = _child("import warnings; warnings.simplefilter('always')\n"
               "import cbn; print(cbn.output_pool()['max_bytes'])",
               {"CBN_OUTPUT_POOL": "lots"})
    assert r.returncode == 0, r.stderr
    assert "CBN_OUTPUT_POOL='lots'" in r.stderr
    assert int(r.stdout) == cbn.output_pool()["max_bytes"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_and_frees_pooled_blocks():
    code = """
import os, numpy as np, cbn
x = np.random.default_rng(0).standard_normal((8, 16, 64, 128)).astype(np.float32)
want = np.empty_like(x)
cbn.batch_norm(x, None, None, training=True, out=want)
held = [cbn.batch_norm(x, None, None, training=True) for _ in range(3)]
del held                                     # the parent's pool holds blocks at fork
pid = os.fork()
if pid == 0:
    ok = all(cbn.batch_norm(x, None, None, training=True).tobytes() == want.tobytes()
             for _ in range(4))
    os._exit(0 if ok and cbn.output_pool()['hits'] > 0 else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
print("ok")
"""
    r = _child(code)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_threads_allocating_and_freeing_at_once():
    shapes = [(8, 16, 64, 128), (16, 16, 64, 128), (8, 16, 64, 192)]
    data = [_data(s, seed=i) for i, s in enumerate(shapes)]
    wants = []
    for x, w, b in data:
        want = np.empty_like(x)
        cbn.batch_norm(x, None, None, w, b, training=True, out=want, n_threads=1)
        wants.append(want.tobytes())
    errors = []

    def work(k):
        try:
            for i in range(12):
                j = (k + i) % len(data)
                x, w, b = data[j]
                y = cbn.batch_norm(x, None, None, w, b, training=True, n_threads=1)
                if y.tobytes() != wants[j]:
                    errors.append((k, i))
        except Exception as e:          # pragma: no cover: reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    state = cbn.output_pool()
    assert state["held_bytes"] <= state["max_bytes"]
