"""The channel-blocked training passes (cbn/_blocked.pxi) and the non-temporal stores of
large output passes: the same bits as the two-pass path, whatever the grouping.

The automatic choice blocks only inputs larger than the last-level cache, which the rest
of the suite never builds, so these tests force blocking (``_kernels._blocking("force",
budget)``: every planes training pass blocked, every planes output pass streamed) on
small inputs, with group budgets from one channel per group to all channels in one. The
oracles are the saved corpus (tests/data/kernel_corpus.json, computed by the two-pass
kernels of a reference tree) and the two-pass path of this build on the same call.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

import cbn
from cbn import _kernels, _reference

import _corpus


@contextlib.contextmanager
def blocking(mode, budget=0, stream=True, chain=True):
    old = _kernels._blocking(mode, budget, stream, chain)
    try:
        yield
    finally:
        _kernels._blocking(*old)


def _planes(case) -> bool:
    axis = case.axis % len(case.shape)
    return math.prod(case.shape[axis + 1:]) >= 16 and math.prod(case.shape) < 2_000_000


PLANES_CASES = [c for c in _corpus.cases() if _planes(c)]
SAVED = _corpus.load()["cases"]


@pytest.mark.parametrize("budget", [1, 1 << 16], ids=["one-channel-groups", "64KB-groups"])
@pytest.mark.parametrize("case", PLANES_CASES, ids=[c.id for c in PLANES_CASES])
def test_blocked_results_are_those_of_the_saved_corpus(case, budget):
    inp = _corpus.make_inputs(case)
    with blocking("force", budget):
        for nt in _corpus.THREAD_COUNTS:
            bad = _corpus.compare(SAVED[case.id]["outputs"], _corpus.digests(case, inp, nt))
            assert not bad, f"{case.id}, {nt} thread(s), budget {budget}: {bad} differ"


def _train_step(x, nt, relu=False, residual=False, out=None, grad_out=None):
    """Forward and backward of one training step; every output array."""
    C = x.shape[1]
    dt = x.dtype
    w = np.linspace(0.5, 2.0, C).astype(dt)
    b = np.linspace(-1.0, 1.0, C).astype(dt)
    rm = np.linspace(-0.1, 0.1, C).astype(dt)
    rv = np.linspace(0.9, 1.1, C).astype(dt)
    r = np.sin(np.arange(x.size)).reshape(x.shape).astype(dt) if residual else None
    act = "relu" if relu else None
    y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, n_threads=nt,
                                       activation=act, residual=r, out=out)
    g = np.cos(np.arange(x.size) * 0.7).reshape(x.shape).astype(dt)
    res = cbn.batch_norm_backward(g if grad_out is None else grad_out, x, w, sm, si, True,
                                  n_threads=nt, activation=act,
                                  output=y if relu else None, residual=residual)
    return [y, sm, si, rm, rv, *res]


SHAPES = [
    (3, 5, 4096 * 3 + 7),     # long planes: several blocks per plane, items across them
    (400, 20, 100),           # short planes taken several at a time, more units than items
    (7, 9, 300),
    (300, 3, 16),             # the smallest planes
    (2, 1, 5000),             # one channel
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_blocked_equals_two_pass_bit_for_bit(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3.0 + 2.0).astype(dtype)
    x[0, 0, :8] += np.linspace(0, 50, 8).astype(dtype)      # a far-off first estimate
    for relu, residual in [(False, False), (True, True)]:
        with blocking("off", 0, False):
            want = _train_step(x, 1, relu, residual)
        for budget in (1, 1 << 14, 1 << 30):
            for nt in (1, 2, 3):
                with blocking("force", budget):
                    got = _train_step(x, nt, relu, residual)
                for i, (a, e) in enumerate(zip(got, want)):
                    assert a.tobytes() == e.tobytes(), (shape, relu, budget, nt, i)


def test_blocked_in_place_forward_and_backward():
    # out=x (forward) and out=grad_output (backward) while blocked: each group reads its
    # channels before writing them, and no other group touches them.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 10, 777)).astype(np.float32)
    with blocking("off", 0, False):
        want = _train_step(x.copy(), 1)
    with blocking("force", 1):
        xi = x.copy()
        C = x.shape[1]
        w = np.linspace(0.5, 2.0, C).astype(np.float32)
        b = np.linspace(-1.0, 1.0, C).astype(np.float32)
        y, sm, si = cbn.batch_norm_forward(xi, w, b, None, None, True, 0.1, 1e-5, out=xi,
                                           n_threads=2)
        assert y is xi
        assert y.tobytes() == want[0].tobytes()
        g = np.cos(np.arange(x.size) * 0.7).reshape(x.shape).astype(np.float32)
        dx, gw, gb = cbn.batch_norm_backward(g, x, w, sm, si, True, out=g, n_threads=2)
        assert dx is g
        assert dx.tobytes() == want[5].tobytes()
        assert gw.tobytes() == want[6].tobytes() and gb.tobytes() == want[7].tobytes()


# Long planes (K > 2048: one unit per batch entry), where the training forward runs as
# chains: each group reduced in the loop that writes the previous group's output; on
# several threads, chains of groups are the parallel items.
CHAIN_SHAPES = [
    (4, 7, 2100),             # groups of g and a shorter last one
    (3, 5, 4096 + 100),       # two blocks per plane
    (2, 4, 3001),             # an odd plane length: each run's lines start elsewhere
]


def _chain_groups(shape, itemsize, channels):
    """The force-mode budget that gives a chain `channels` channels per group, and the
    group size block_channels then picks (the channels spread evenly over the groups)."""
    M, C, K = shape
    budget = 2 * channels * M * K * itemsize
    ngroups = -(-C // min(channels, C))
    return budget, -(-C // ngroups)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", CHAIN_SHAPES, ids=["x".join(map(str, s)) for s in CHAIN_SHAPES])
def test_chained_forward_equals_two_pass_bit_for_bit(shape, dtype):
    rng = np.random.default_rng(sum(shape) + 1)
    x = (rng.standard_normal(shape) * 3.0 - 1.0).astype(dtype)
    x[1, 2, :8] += np.linspace(0, 80, 8).astype(dtype)      # a far-off first estimate
    item = np.dtype(dtype).itemsize
    M, C, K = shape
    for relu, residual in [(False, False), (True, False), (False, True), (True, True)]:
        with blocking("off", 0, False):
            want = _train_step(x, 1, relu, residual)
        for channels in range(1, C + 1):
            budget, g = _chain_groups(shape, item, channels)
            for nt in (1, 2, 3):        # one chain, or chains of groups as parallel items
                with blocking("force", budget):
                    if nt == 1:
                        assert _kernels._block_channels(M, C, K, item, 1, 1, True) == g
                    got = _train_step(x, nt, relu, residual)
                with blocking("force", budget, chain=False):
                    unchained = _train_step(x, nt, relu, residual)
                for i, (a, u, e) in enumerate(zip(got, unchained, want)):
                    assert a.tobytes() == e.tobytes(), (relu, residual, channels, nt, i)
                    assert u.tobytes() == e.tobytes(), (relu, residual, channels, nt, i)


def test_chained_forward_in_place_and_into_offset_outputs():
    # out=x: a group's output is written while the next group is reduced, never over a
    # channel not yet reduced. Outputs at any element-aligned offset: the non-temporal
    # stores take whole lines only, the values around them ordinary stores; an output not
    # aligned to its element size is not chained.
    rng = np.random.default_rng(21)
    shape = (3, 6, 2600)
    for dtype, shift in [(np.float32, 0), (np.float32, 4), (np.float32, 36),
                         (np.float64, 8), (np.float64, 40), (np.float64, 3)]:
        item = np.dtype(dtype).itemsize
        x = rng.standard_normal(shape).astype(dtype)
        with blocking("off", 0, False):
            want = _train_step(x, 1, True, True)
        budget, _ = _chain_groups(shape, item, 2)
        n = math.prod(shape)
        buf = np.zeros(n * item + 64, np.uint8)
        out = np.frombuffer(buf.data, dtype=dtype, count=n, offset=shift).reshape(shape)
        with blocking("force", budget):
            got = _train_step(x, 1, True, True, out=out)
            xi = x.copy()
            inplace = _train_step(xi, 1, True, True, out=xi)
        assert got[0] is out and inplace[0] is xi
        assert out.tobytes() == want[0].tobytes(), (dtype, shift)
        assert xi.tobytes() == want[0].tobytes(), dtype


# Rows layouts (K < 16, channels-last among them): outputs larger than the cache are
# stored non-temporally from y's first cache line on, the glued rows' lanes rotated to
# start there (rows_apply_stream).
ROWS_SHAPES = [(300, 7, 3), (200, 64, 1), (97, 16, 2), (64, 128, 1), (5, 3, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", ROWS_SHAPES, ids=["x".join(map(str, s)) for s in ROWS_SHAPES])
def test_streamed_rows_passes_equal_ordinary_stores(shape, dtype):
    rng = np.random.default_rng(sum(shape) + 7)
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    item = np.dtype(dtype).itemsize
    n = math.prod(shape)
    for relu, residual in [(False, False), (True, True)]:
        with blocking("off", 0, False):
            want = _train_step(x, 1, relu, residual)
            want_eval = cbn.batch_norm_forward(x, None, None, want[3], want[4], False, 0.1,
                                               1e-5)[0]
        for shift in (0, item, 5 * item, 64 - item):
            for nt in (1, 2):
                buf = np.zeros(n * item + 64, np.uint8)
                out = np.frombuffer(buf.data, dtype=dtype, count=n,
                                    offset=shift).reshape(shape)
                with blocking("force", 0):
                    got = _train_step(x, nt, relu, residual, out=out)
                    ev = cbn.batch_norm_forward(x, None, None, want[3], want[4], False,
                                                0.1, 1e-5, n_threads=nt)[0]
                assert got[0] is out
                for i, (a, e) in enumerate(zip(got, want)):
                    assert a.tobytes() == e.tobytes(), (relu, residual, shift, nt, i)
                assert ev.tobytes() == want_eval.tobytes(), (shift, nt)


def test_streamed_output_of_unaligned_and_misaligned_views():
    # Non-temporal stores start at the first 32-byte boundary; outputs that start
    # anywhere (and a float64 array not aligned to 8 bytes) get the same values.
    rng = np.random.default_rng(11)
    for dtype, shift in [(np.float32, 4), (np.float32, 12), (np.float64, 8), (np.float64, 3)]:
        item = np.dtype(dtype).itemsize
        shape = (4, 3, 1001)
        n = math.prod(shape)
        buf = np.zeros(n * item + 64, np.uint8)
        out = np.frombuffer(buf.data, dtype=dtype, count=n, offset=shift).reshape(shape)
        x = rng.standard_normal(shape).astype(dtype)
        with blocking("off", 0, False):
            want = _train_step(x, 1)
        with blocking("force", 1):
            got = _train_step(x, 2, out=out)
        assert got[0] is out
        assert out.tobytes() == want[0].tobytes()


def test_blocked_results_within_the_reference_bounds():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 6, 1500)) * 2 + 1000).astype(np.float32)
    with blocking("force", 1 << 15):
        y, sm, si = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    ref = _reference.batch_norm(x.astype(np.float64), None, None, None, None, True, 0.1,
                                1e-5)
    assert np.max(np.abs(y - ref)) < 1e-3


def test_cache_info():
    info = _kernels.cache_info()
    assert info["source"] in ("sysfs", "sysconf", "default")
    assert info["size"] > 0 and info["sharing"] >= 1 and info["level"] >= 0
    assert info["l2_size"] >= 0
    if info["source"] == "default":
        assert info["size"] == 8 << 20


def _budget_and_held():
    """What cbn/_blocked.pxi sizes groups by (one thread): half of the last level, at
    most half of the level-2 cache; and what a second read finds in cache."""
    info = _kernels.cache_info()
    if info["l2_size"]:
        return (min(info["size"] // 2, info["l2_size"] // 2),
                min(info["size"], info["l2_size"]))
    return info["size"] // 2, info["size"]


def test_block_channels_decides_by_size():
    info = _kernels.cache_info()
    with blocking("auto", 0):
        # rows layouts and small inputs: the two-pass path
        assert _kernels._block_channels(1 << 20, 64, 1, 4, 1, 1) == 0
        assert _kernels._block_channels(8, 16, 64, 4, 1, 1) == 0
        # an input several times the cache, channels much smaller than it: blocked, in
        # groups that hold at most the budget and at least one channel
        budget, held = _budget_and_held()
        C = 64
        M, K = 8, max(128, int(4 * held // (C * 4 * 8)))
        g = _kernels._block_channels(M, C, K, 4, 1, 1)
        assert 1 <= g <= C
        assert g * M * K * 4 <= max(budget, M * K * 4)
        # half storage by the same rule: the same bytes (twice the values), the same groups
        assert _kernels._block_channels(M, C, 2 * K, 2, 1, 1) == g
        # short planes (K < 128) take the two passes, however large the input
        assert _kernels._block_channels(M * K, C, 64, 4, 1, 1) == 0
        assert _kernels._block_channels(M * K // 49, C, 49, 4, 3, 2) == 0
        for nt in (2, 3, 4):
            g = _kernels._block_channels(M, C, K, 4, 1, nt)
            if g:
                assert -(-C // g) >= nt          # every thread gets a group
        # one channel larger than a group's budget: two passes
        assert _kernels._block_channels(2, 2, info["size"], 4, 2, 1) == 0
        # a one-thread forward over long planes is chained: two groups in the cache at
        # once, so half the budget per group, or one channel that fits the budget
        M, K = 8, max(4096, int(4 * held // (C * 4 * 8)))
        g = _kernels._block_channels(M, C, K, 4, 1, 1, True)
        assert 1 <= g <= C
        assert g * M * K * 4 <= max(budget // 2, M * K * 4)
        assert g <= _kernels._block_channels(M, C, K, 4, 1, 1, False)


def test_blocking_setting_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        _kernels._blocking("sometimes")
    with pytest.raises(ValueError, match="budget"):
        _kernels._blocking(None, -1)


def test_blocked_and_streamed_bits_on_every_cpu_target():
    # The non-temporal stores and prefetches are per-target code (AVX stream stores, SSE2
    # pairs): every target this CPU runs gives the two-pass bits of the default target.
    targets = [name for name, ok in _kernels.cpu_targets() if ok]
    # Long planes on one thread run the chained forward, rows layouts the streamed rows
    # pass (per-target code too).
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((40, 6, 203)) * 2 + 3).astype(np.float32)
    xl = (rng.standard_normal((3, 5, 2333)) * 2 - 3).astype(np.float32)
    xr = (rng.standard_normal((301, 24, 1)) * 2 - 3).astype(np.float32)     # rows
    arrays = [(x, 2), (x.astype(np.float64), 2), (xl, 1), (xl.astype(np.float64), 1),
              (xr, 2), (xr.astype(np.float64), 1)]
    before = _kernels.cpu_target()
    try:
        with blocking("off", 0, False):
            want = [_train_step(a, 1, True, True) for a, _ in arrays]
        for name in targets:
            _kernels.select_cpu_target(name)
            for budget in (1, 1 << 16, 1 << 30):
                with blocking("force", budget):
                    for (a, nt), w in zip(arrays, want):
                        got = _train_step(a, nt, True, True)
                        for i, (u, v) in enumerate(zip(got, w)):
                            assert u.tobytes() == v.tobytes(), (name, budget, a.shape,
                                                                a.dtype, i)
    finally:
        _kernels.select_cpu_target(before)
