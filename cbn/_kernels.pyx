# cython: language_level=3
"""cbn's compiled kernels: batch normalization over a C-contiguous (M, C, K) view.

Every input, whatever its ndim and channel axis, reaches these kernels as an (M, C, K) array
(see cbn.functional). Two kernel shapes cover all of them:

* planes (K >= PLANE_MIN_K): each (m, c) plane is K contiguous values of one channel; a
  unit is a block of a long plane or several short planes of one channel (runs C*K apart);
  loops run along the planes with four independent vector accumulators.
* rows (K small, e.g. channels-last where K == 1): the data is a stream of "rows" of
  W = k*C*K values (k original m-rows glued into a row of up to 8 vectors of 64 bytes
  when C*K allows, else of at least ROW_MIN_WIDTH values); loops run along the row with
  one accumulator per lane, lane t belonging to channel (t // K) % C. On AVX-512 builds
  rows of up to 8 vectors keep their lane parameters and accumulators in registers, and
  wider rows (a multiple of the vector) are walked in memory order with them in L1.

In the planes reductions, a run whose length is no multiple of the vector ends with one
vector padded with values that add exactly zero, not with a scalar loop (a latency chain).

Statistics: every block is reduced with a shift close to its mean, so nothing cancels
(never E[x^2] - E[x]^2): one streaming pass of d = x - shift and d*d around an estimate of
the mean (planes: the mean of the unit's first vector of values; rows: of the block's
first rows), and a second, corrected pass from cache wherever that estimate was far
enough off to cost accuracy (see cbn_runs_moments and rows_block_moments), so every
result is within a factor 2 of a two-pass's rounding error. Blocks are merged with Chan et
al.'s pairwise formula in double. Work is cut into items that depend on the shape only,
never on the thread count; each item's partial result goes to its own slot and the slots
are merged in item order, so the results are bit-identical for any number of threads.

The loops over contiguous data are written with GCC/Clang vector-extension lanes (see the
C block below): lane-wise IEEE arithmetic in a fixed order, no -ffast-math, no FMA
contraction, so results do not depend on the instruction set either.

Nothing here validates its arguments: cbn.functional does that before calling in. The one
exception is the plain-call fast path at the end (plain_forward, plain_backward,
plain_affine): it only recognises calls whose arrays are already what the kernels need,
and declines (returns None, having written nothing) everything else, which cbn.functional
then validates. Scratch memory is allocated (and checked) with the GIL held, before any
parallel region.
"""

cimport cython
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free

cnp.import_array()



cdef inline const cbn_ops* ops(const floating* tag) noexcept nogil:
    """The active CPU target's table of C loops for floating's dtype (see cbn/src)."""
    if floating is float:
        return cbn_ops_f()
    else:
        return cbn_ops_d()


cdef enum:
    PLANE_MIN_K = 16      # K at or above this: planes kernels; below: rows kernels
    BLOCK = 4096          # values per statistics block along a plane (L1-resident)
    ROW_BLOCK = 65536     # values per statistics block of rows (L2-resident)
    ROW_ALIGN = 32        # glued rows are a multiple of this many values when cheap
    ROW_MIN_ROWS = 128    # rows per block at least (very wide rows: larger blocks)
    SHIFT_ROWS = 32       # at most this many rows' mean shifts an item's first block
    SHIFT_ROWS_MIN = 8    # ... and at least this many (rows kernels)
    ROW_MIN_WIDTH = 64    # rows kernels glue m-rows until a row has this many values
    ROW_FIXED_VECTORS = 8 # ... or, preferably, up to this many 64-byte vectors
    TARGET_ITEMS = 128    # parallel work items per reduction (fixed: determinism)
    CHUNK = 16384         # values per parallel item in element-wise passes


def openmp_enabled():
    """True if the kernels were compiled with OpenMP (else they run on one thread)."""
    return bool(cbn_openmp_enabled())


def max_threads():
    """omp_get_max_threads(): follows OMP_NUM_THREADS and threadpoolctl's limits."""
    return cbn_max_threads()


def cpu_targets():
    """The CPU targets the C loops were compiled for, best first, as (name, supported)
    pairs; supported tells whether this CPU can run that target."""
    return [(cbn_target_at(i).decode(), bool(cbn_target_supported_at(i)))
            for i in range(cbn_target_count())]


def cpu_target():
    """The name of the CPU target whose C loops run now ("avx512", "avx2" or "base")."""
    return cbn_target_name().decode()


def select_cpu_target(name=None):
    """Run the C loops of target `name` from now on (None or "auto": the best one this
    CPU supports). Results are bit-identical whatever the target; this exists to prove
    it, and to rule a target out. Not thread-safe against calls running meanwhile."""
    if name is None:
        name = "auto"
    if not isinstance(name, str):
        raise TypeError(f"CPU target must be a str or None, got {type(name).__name__}")
    cdef bytes b = name.encode()
    cdef int r = cbn_select_target(b)
    if r == -1:
        known = ", ".join(n for n, _ in cpu_targets())
        raise ValueError(f"unknown CPU target {name!r} (this build has: {known}, auto)")
    if r == -2:
        raise ValueError(f"this CPU cannot run the {name!r} target")
    return cpu_target()


def _select_initial_target():
    import os
    import warnings
    name = os.environ.get("CBN_CPU_TARGET", "").strip()
    try:
        select_cpu_target(name or None)
    except ValueError as e:
        warnings.warn(f"CBN_CPU_TARGET ignored: {e}", RuntimeWarning, stacklevel=2)
        select_cpu_target(None)


_select_initial_target()


# ------------------------------------------------------------------------------ moments

cdef struct Moments:
    double n        # count
    double mean
    double m2       # sum of squared deviations from the mean


cdef inline void merge(Moments* a, Moments b) noexcept nogil:
    """Chan et al.'s pairwise update: a <- a (+) b."""
    cdef double n, delta
    if b.n == 0:
        return
    if a.n == 0:
        a[0] = b
        return
    n = a.n + b.n
    delta = b.mean - a.mean
    a.mean = a.mean + delta * (b.n / n)
    a.m2 = a.m2 + b.m2 + delta * delta * (a.n * (b.n / n))
    a.n = n


cdef inline double inv_sqrt(double v) noexcept nogil:
    """1/sqrt(v), except 0 for v == 0 (eps = 0 on a constant channel); NaN stays NaN."""
    return 0.0 if v == 0.0 else 1.0 / sqrt(v)


cdef inline Moments runs_moments(const floating* p, Py_ssize_t nruns, Py_ssize_t n,
                                Py_ssize_t stride) noexcept nogil:
    """Moments of nruns runs of n contiguous values, stride apart (see cbn_runs_moments
    above)."""
    cdef Moments r
    r.n = <double>nruns * n
    ops(p).runs_moments(p, nruns, n, stride, &r.mean, &r.m2)
    return r


# --------------------------------------------------------------------- work partitions

cdef struct Planes:
    Py_ssize_t M, C, K
    Py_ssize_t mb        # planes of one channel per unit (when planes are short)
    Py_ssize_t nmb       # m-blocks: ceil(M / mb)
    Py_ssize_t nblk      # blocks per plane (when planes are long)
    Py_ssize_t blen      # values per block (the last may be shorter)
    Py_ssize_t units     # nmb * C * nblk, in memory order (m-block, channel, block)
    Py_ssize_t items     # parallel items: contiguous ranges of units


cdef Planes planes_partition(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                             Py_ssize_t block) noexcept nogil:
    """Units of about `block` values of one channel: a long plane is cut into blocks, short
    planes of one channel are taken mb at a time (runs C*K apart, reduced as one block).
    Units, in memory order, are cut into at most TARGET_ITEMS items. Depends on the shape
    only, never on the thread count."""
    cdef Planes P
    P.M = M
    P.C = C
    P.K = K
    P.nblk = (K + block - 1) // block
    P.blen = (K + P.nblk - 1) // P.nblk
    P.mb = block // K if K < block else 1
    if P.mb > M:
        P.mb = M
    if P.mb < 1:
        P.mb = 1
    P.nmb = (M + P.mb - 1) // P.mb
    P.units = P.nmb * C * P.nblk
    P.items = P.units if P.units < TARGET_ITEMS else TARGET_ITEMS
    return P


cdef inline Py_ssize_t planes_unit(Planes P, Py_ssize_t u, Py_ssize_t* c, Py_ssize_t* nruns,
                                   Py_ssize_t* n) noexcept nogil:
    """Where unit u starts (offset into the (M, C, K) data); sets its channel, its number
    of runs (planes) and the values per run."""
    cdef Py_ssize_t b = u % P.nblk, mblk = u // (P.nblk * P.C), m0, start
    c[0] = (u // P.nblk) % P.C
    m0 = mblk * P.mb
    nruns[0] = P.M - m0 if P.M - m0 < P.mb else P.mb
    start = b * P.blen
    n[0] = P.K - start if P.K - start < P.blen else P.blen
    return (m0 * P.C + c[0]) * P.K + start


cdef struct Rows:
    Py_ssize_t S         # values per m-row: C * K
    Py_ssize_t W         # values per glued row: k * S
    Py_ssize_t k         # m-rows per glued row
    Py_ssize_t nrows     # full glued rows: M // k
    Py_ssize_t tail      # values after the full rows: (M % k) * S
    Py_ssize_t R         # glued rows per block
    Py_ssize_t nblocks
    Py_ssize_t items


cdef inline Py_ssize_t gcd(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    cdef Py_ssize_t r
    while b:
        r = a % b
        a = b
        b = r
    return a


cdef Rows rows_partition(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, Py_ssize_t block,
                         Py_ssize_t max_items, Py_ssize_t itemsize) noexcept nogil:
    cdef Rows P
    cdef Py_ssize_t wl = 64 // itemsize, g
    P.S = C * K
    # Glue k m-rows. Preferred: the widest row of at most ROW_FIXED_VECTORS vectors of 64
    # bytes (the fixed-width loops keep such a row's parameters and accumulators in
    # registers). Else a multiple of ROW_ALIGN values when that stays small (no scalar
    # column tails), and at least ROW_MIN_WIDTH values. The choice depends on the shape
    # and the itemsize only, never on the instruction set, so results do not either.
    g = P.S // gcd(P.S, wl) * wl                  # lcm(S, wl)
    if g <= ROW_FIXED_VECTORS * wl:
        P.k = (ROW_FIXED_VECTORS * wl // g) * g // P.S
    else:
        P.k = ROW_ALIGN // gcd(P.S, ROW_ALIGN)
        if P.k * P.S > 16 * ROW_MIN_WIDTH:
            P.k = 1
        P.k = P.k * ((ROW_MIN_WIDTH + P.k * P.S - 1) // (P.k * P.S))
    P.W = P.k * P.S
    P.nrows = M // P.k
    P.tail = (M % P.k) * P.S
    P.R = block // P.W
    if P.R < ROW_MIN_ROWS:
        P.R = ROW_MIN_ROWS          # per-lane work per block must stay small per value
    P.nblocks = (P.nrows + P.R - 1) // P.R
    P.items = P.nblocks if P.nblocks < max_items else max_items
    return P


# ----------------------------------------------------------------- statistics: planes

cdef inline void zero_moments(Moments* m, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        m[i].n = 0
        m[i].mean = 0
        m[i].m2 = 0


cdef inline void planes_item_span(Planes P, Py_ssize_t item, Py_ssize_t* c0,
                                  Py_ssize_t* nc) noexcept nogil:
    """The channels that item's units belong to: c0, c0 + 1, ... (mod C), nc of them.
    Only their slots of the item's partials are written and merged (with many channels,
    zeroing and merging all C slots of every item cost a tenth of the pass)."""
    cdef Py_ssize_t u0 = item * P.units // P.items, u1 = (item + 1) * P.units // P.items
    c0[0] = (u0 // P.nblk) % P.C
    nc[0] = 0 if u1 <= u0 else (u1 - 1) // P.nblk - u0 // P.nblk + 1
    if nc[0] > P.C:
        nc[0] = P.C


cdef void planes_item_moments(const floating* x, Planes P, Py_ssize_t item,
                              Moments* acc) noexcept nogil:
    """Merge the moments of one item's units into its slots of acc[0:C], per channel."""
    cdef Py_ssize_t u0 = item * P.units // P.items, u1 = (item + 1) * P.units // P.items
    cdef Py_ssize_t u, off, c, nruns, n, c0, nc, j
    planes_item_span(P, item, &c0, &nc)
    for j in range(nc):
        zero_moments(&acc[(c0 + j) % P.C], 1)
    for u in range(u0, u1):
        off = planes_unit(P, u, &c, &nruns, &n)
        merge(&acc[c], runs_moments(x + off, nruns, n, P.C * P.K))


cdef void planes_moments(const floating* x, Planes P, Moments* part, Moments* out,
                         int nthreads) noexcept nogil:
    """part: items*C slots (each item writes those of its channels only)."""
    cdef Py_ssize_t it, c, c0, nc, j
    if nthreads == 1:           # no OpenMP region at all: it costs more than tiny inputs
        for it in range(P.items):
            planes_item_moments(x, P, it, part + it * P.C)
    else:
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            planes_item_moments(x, P, it, part + it * P.C)
    zero_moments(out, P.C)
    for it in range(P.items):
        planes_item_span(P, it, &c0, &nc)
        for j in range(nc):
            c = (c0 + j) % P.C
            merge(&out[c], part[it * P.C + c])


# ------------------------------------------------------------------- statistics: rows

cdef void merge_channels(double* na, double* mean, double* m2, double nb,
                         const double* bmean, const double* bm2, Py_ssize_t C) noexcept nogil:
    """Chan's update for C channels that share their counts: (na, mean, m2) (+) (nb, ...).
    The same arithmetic as merge(), with the count ratios computed once."""
    cdef Py_ssize_t c
    cdef double n, r, f, d
    if nb == 0:
        return
    if na[0] == 0:
        for c in range(C):
            mean[c] = bmean[c]
            m2[c] = bm2[c]
        na[0] = nb
        return
    n = na[0] + nb
    r = nb / n
    f = na[0] * r
    for c in range(C):
        d = bmean[c] - mean[c]
        mean[c] = mean[c] + d * r
        m2[c] = m2[c] + bm2[c] + d * d * f
    na[0] = n


cdef inline void fold_lanes(const floating* v, double* out, Py_ssize_t reps, Py_ssize_t C,
                            Py_ssize_t K) noexcept nogil:
    """out[c] += sum of v[t] over the lanes t of channel c ((t // K) % C == c)."""
    cdef Py_ssize_t q, c, kk, t = 0
    if K == 1:
        for q in range(reps):
            for c in range(C):
                out[c] += v[t + c]
            t += C
        return
    for q in range(reps):
        for c in range(C):
            for kk in range(K):
                out[c] += v[t]
                t += 1


cdef inline void zero(double* v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        v[i] = 0.0


cdef void rows_channel_dev(const floating* p, Py_ssize_t R, Py_ssize_t w, Py_ssize_t C,
                           Py_ssize_t K, Py_ssize_t c, floating m, double* s1,
                           double* s2) noexcept nogil:
    """s1, s2: sums of d = x - m and d*d over channel c's values in R rows of w values.
    The arithmetic and its order are those of cbn_cols_dev and fold_lanes for one
    channel's lanes (sums down each lane in the data type, lanes added in double)."""
    cdef Py_ssize_t q, kk, r, t
    cdef floating a, b, d
    s1[0] = 0.0
    s2[0] = 0.0
    for q in range(w // (C * K)):
        for kk in range(K):
            t = (q * C + c) * K + kk
            a = 0
            b = 0
            for r in range(R):
                d = p[r * w + t] - m
                a += d
                b += d * d
            s1[0] += a
            s2[0] += b


cdef double rows_block_moments(const floating* p, Py_ssize_t R, Py_ssize_t w, Py_ssize_t C,
                               Py_ssize_t K, const double* hint, floating* acc,
                               floating* acc2, floating* lane, double* bmean,
                               double* bm2) noexcept nogil:
    """Per-channel moments of R rows of w values (row 0 at p) into bmean, bm2; returns the
    count per channel. Scratch: acc, acc2, lane hold w values.

    Pass 1 streams the block once, summing d = x - shift and d*d: m2 = S2 - S1^2/n. The
    shift is an estimate of each channel's mean: `hint` (the mean of the blocks before,
    when there are some), else the mean of the block's first rows (R/8 of them, 8 to 32).
    That loses accuracy only when the shift is far from the mean:
    S2 / m2 = 1 + n (mean - shift)^2 / m2. A channel where S1^2/n > S2/2 (the factor could
    exceed 2) gets a second pass from cache around its block mean, the corrected two-pass
    formula; with the first rows' mean as the shift that is about one channel in 200 for
    8 rows, practically none for 16 or more. When more than one channel in 8 needs it, the
    whole block takes the second pass, vectorized. Either way every channel's result is
    within a factor 2 of a two-pass's rounding error.
    """
    cdef Py_ssize_t c, nflag = 0, reps = w // (C * K)
    cdef double cnt = <double>R * reps * K, inv = 1.0 / cnt, s, v
    cdef Py_ssize_t r0 = R // 8
    if r0 < SHIFT_ROWS_MIN:
        r0 = SHIFT_ROWS_MIN
    if r0 > SHIFT_ROWS:
        r0 = SHIFT_ROWS
    if r0 > R:
        r0 = R
    if hint != NULL:
        expand_lanes_d(hint, lane, w, C, K)
    else:                       # mean of the first rows, around the first row
        ops(p).cols_shifted_sums(p, r0, w, p, acc, acc2)
        zero(bmean, C)
        zero(bm2, C)
        fold_lanes(acc, bmean, reps, C, K)
        fold_lanes(p, bm2, reps, C, K)
        for c in range(C):
            bmean[c] = (bmean[c] + bm2[c] * r0) / (<double>r0 * reps * K)
        expand_lanes_d(bmean, lane, w, C, K)
    ops(p).cols_shifted_sums(p, R, w, lane, acc, acc2)
    zero(bmean, C)
    zero(bm2, C)
    fold_lanes(acc, bmean, reps, C, K)
    fold_lanes(acc2, bm2, reps, C, K)
    for c in range(C):          # acc[c] (free after the fold): 1 where c needs pass 2
        s = bmean[c]
        v = s * s * inv
        acc[c] = 0
        if v > 0.5 * bm2[c]:
            acc[c] = 1
            nflag += 1
        bmean[c] = lane[c * K] + s * inv
        v = bm2[c] - v
        bm2[c] = 0.0 if v < 0.0 else v    # NaN stays NaN
    if nflag == 0:
        return cnt
    if 8 * nflag <= C:          # pass 2 for the flagged channels only
        for c in range(C):
            if acc[c] != 0:
                rows_channel_dev(p, R, w, C, K, c, <floating>bmean[c], &s, &v)
                bmean[c] = <floating>bmean[c] + s * inv
                v = v - s * s * inv
                bm2[c] = 0.0 if v < 0.0 else v
        return cnt
    # pass 2 for the whole block: deviations around the block mean (rounded to the data
    # type), from cache
    expand_lanes_d(bmean, lane, w, C, K)
    ops(p).cols_dev(p, R, w, lane, acc, acc2)
    zero(bmean, C)
    zero(bm2, C)
    fold_lanes(acc, bmean, reps, C, K)
    fold_lanes(acc2, bm2, reps, C, K)
    for c in range(C):
        s = bmean[c]
        bmean[c] = lane[c * K] + s * inv
        v = bm2[c] - s * s * inv
        bm2[c] = 0.0 if v < 0.0 else v    # NaN stays NaN
    return cnt


cdef void rows_item_moments(const floating* x, Py_ssize_t C, Py_ssize_t K, Rows P,
                            Py_ssize_t it, double* acc, floating* sc,
                            double* ds) noexcept nogil:
    """(count, C means, C m2s) of one item's blocks into acc; scratch sc: 3*W, ds: 2*C."""
    cdef Py_ssize_t blk, r0, nr
    cdef double cnt
    acc[0] = 0.0
    for blk in range(it * P.nblocks // P.items, (it + 1) * P.nblocks // P.items):
        r0 = blk * P.R
        nr = P.nrows - r0
        if nr > P.R:
            nr = P.R
        cnt = rows_block_moments(x + r0 * P.W, nr, P.W, C, K,
                                 acc + 1 if acc[0] > 0 else NULL, sc, sc + P.W,
                                 sc + 2 * P.W, ds, ds + C)
        merge_channels(acc, acc + 1, acc + 1 + C, cnt, ds, ds + C, C)


cdef void rows_moments(const floating* x, Py_ssize_t C, Py_ssize_t K, Rows P,
                       double* part, floating* scratch, double* dscratch, Moments* out,
                       int nthreads) noexcept nogil:
    """Per-channel moments over the rows partition. part: items*(2C+1) doubles (count,
    means, m2s of each item); scratch: 3*W floating and dscratch: 2*C doubles per thread."""
    cdef Py_ssize_t it, c, tid, stride = 2 * C + 1
    cdef double* acc
    cdef double cnt, n
    if nthreads == 1:
        for it in range(P.items):
            rows_item_moments(x, C, K, P, it, part + it * stride, scratch, dscratch)
    else:
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            tid = threadid()
            rows_item_moments(x, C, K, P, it, part + it * stride,
                              scratch + tid * 3 * P.W, dscratch + tid * 2 * C)
    # merge the items in order into the first one's slot (sized for one even if no items)
    acc = part
    if P.items == 0:
        acc[0] = 0.0
    for it in range(1, P.items):
        merge_channels(acc, acc + 1, acc + 1 + C, part[it * stride],
                       part + it * stride + 1, part + it * stride + 1 + C, C)
    if P.tail:
        cnt = rows_block_moments(x + P.nrows * P.W, 1, P.tail, C, K,
                                 acc + 1 if acc[0] > 0 else NULL, scratch, scratch + P.W,
                                 scratch + 2 * P.W, dscratch, dscratch + C)
        merge_channels(acc, acc + 1, acc + 1 + C, cnt, dscratch, dscratch + C, C)
    n = acc[0]
    for c in range(C):
        out[c].n = n
        out[c].mean = acc[1 + c]
        out[c].m2 = acc[1 + C + c]


# --------------------------------------------------------------- element-wise passes

cdef enum:
    OP_AFFINE = 0     # y = (x - a) * b + c  (+ q, a residual) (ReLU if relu)
    OP_BWD_TRAIN = 1  # y = (g - c - (x - a) * d) * b, g = grad_output masked by ReLU's
                      # backward where q (the forward output) is given


cdef inline void run_apply(int op, const floating* x, const floating* g, const floating* q,
                           floating* y, Py_ssize_t n, floating a, floating b, floating c,
                           floating d, bint relu) noexcept nogil:
    if op == OP_AFFINE:
        ops(x).run_affine(x, q, y, n, a, b, c, relu)
    else:
        ops(x).run_bwd(x, g, q, y, n, a, b, c, d)


cdef void planes_apply_units(int op, const floating* x, const floating* g,
                             const floating* q, floating* y, Py_ssize_t C, Py_ssize_t K,
                             Py_ssize_t nch, Py_ssize_t clen, Py_ssize_t u0, Py_ssize_t u1,
                             const floating* pa, const floating* pb, const floating* pc,
                             const floating* pd, bint relu) noexcept nogil:
    """Units u0..u1 of planes_apply: unit u is chunk u % nch of plane u // nch."""
    cdef Py_ssize_t u, plane, ch, start, n, off
    for u in range(u0, u1):
        plane = u // nch
        ch = plane % C
        start = (u % nch) * clen
        n = K - start
        if n > clen:
            n = clen
        off = plane * K + start
        run_apply(op, x + off, g + off if g != NULL else NULL,
                  q + off if q != NULL else NULL, y + off, n,
                  pa[ch], pb[ch], pc[ch], pd[ch] if pd != NULL else 0, relu)


cdef void planes_apply(int op, const floating* x, const floating* g, const floating* q,
                       floating* y, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                       const floating* pa, const floating* pb, const floating* pc,
                       const floating* pd, bint relu, int nthreads) noexcept nogil:
    """Element-wise pass with per-channel parameters. Units are planes, or chunks of long
    planes; items are runs of units holding about CHUNK values."""
    cdef Py_ssize_t nch = (K + CHUNK - 1) // CHUNK
    cdef Py_ssize_t clen = (K + nch - 1) // nch
    cdef Py_ssize_t units = M * C * nch
    cdef Py_ssize_t per_item = CHUNK // clen if clen < CHUNK else 1
    cdef Py_ssize_t items = (units + per_item - 1) // per_item
    cdef Py_ssize_t it, u0, u1
    if nthreads == 1:
        planes_apply_units(op, x, g, q, y, C, K, nch, clen, 0, units, pa, pb, pc, pd, relu)
        return
    for it in prange(items, num_threads=nthreads, schedule="dynamic"):
        u0 = it * per_item
        u1 = u0 + per_item
        if u1 > units:
            u1 = units
        planes_apply_units(op, x, g, q, y, C, K, nch, clen, u0, u1, pa, pb, pc, pd, relu)


cdef void expand_lanes(const floating* v, floating* lane, Py_ssize_t W, Py_ssize_t C,
                       Py_ssize_t K) noexcept nogil:
    """lane[t] = v[(t // K) % C] for t < W (W a multiple of C*K)."""
    cdef Py_ssize_t t = 0, c, kk
    while t < W:
        for c in range(C):
            for kk in range(K):
                lane[t + kk] = v[c]
            t += K


cdef void expand_lanes_d(const double* v, floating* lane, Py_ssize_t W, Py_ssize_t C,
                         Py_ssize_t K) noexcept nogil:
    """lane[t] = v[(t // K) % C] rounded to the data type, for t < W."""
    cdef Py_ssize_t t, c, kk
    for c in range(C):
        for kk in range(K):
            lane[c * K + kk] = <floating>v[c]
    for t in range(C * K, W):
        lane[t] = lane[t - C * K]


cdef inline void row_apply(int op, const floating* x, const floating* g, const floating* q,
                           floating* y, Py_ssize_t R, Py_ssize_t w, const floating* la,
                           const floating* lb, const floating* lc, const floating* ld,
                           bint relu) noexcept nogil:
    ops(x).cols_apply(op, x, g, q, y, R, w, la, lb, lc, ld, relu)


cdef void rows_apply(int op, const floating* x, const floating* g, const floating* q,
                     floating* y, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                     const floating* lanes, bint relu, int nthreads) noexcept nogil:
    """Element-wise pass over the rows partition; lanes holds the 4 (or 3) parameter
    vectors expanded to W lanes each, back to back."""
    cdef Rows P = rows_partition(M, C, K, CHUNK, M, sizeof(floating))
    cdef Py_ssize_t W = P.W, blk, r0, nr, off
    cdef const floating* la = lanes
    cdef const floating* lb = lanes + W
    cdef const floating* lc = lanes + 2 * W
    cdef const floating* ld = lanes + 3 * W
    if nthreads == 1:
        row_apply(op, x, g, q, y, P.nrows, W, la, lb, lc, ld, relu)
    else:
        for blk in prange(P.nblocks, num_threads=nthreads, schedule="dynamic"):
            r0 = blk * P.R
            nr = P.nrows - r0
            if nr > P.R:
                nr = P.R
            off = r0 * W
            row_apply(op, x + off, g + off if g != NULL else NULL,
                      q + off if q != NULL else NULL, y + off, nr, W, la, lb, lc, ld, relu)
    if P.tail:
        off = P.nrows * W
        row_apply(op, x + off, g + off if g != NULL else NULL,
                  q + off if q != NULL else NULL, y + off, 1, P.tail, la, lb, lc, ld, relu)


# ------------------------------------------------------------------- entry points

cdef void channel_moments(const floating* x, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                          void* mem, Moments* out, int nthreads) noexcept nogil:
    cdef Planes PP
    cdef Rows PR
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        planes_moments(x, PP, <Moments*>mem, out, nthreads)
    else:
        PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, sizeof(floating))
        rows_moments(x, C, K, PR, <double*>mem,
                     <floating*>(<char*>mem + rows_part_bytes(PR, C)),
                     <double*>(<char*>mem + rows_part_bytes(PR, C)
                               + nthreads * 3 * PR.W * sizeof(floating)),
                     out, nthreads)


cdef Py_ssize_t moments_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                      Py_ssize_t itemsize, int nthreads):
    """Bytes of scratch channel_moments needs: item partials, per-thread lanes."""
    cdef Planes PP
    cdef Rows PR
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        return PP.items * C * sizeof(Moments)
    PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, itemsize)
    return (rows_part_bytes(PR, C) + nthreads * 3 * PR.W * itemsize
            + nthreads * 2 * C * sizeof(double))


cdef inline Py_ssize_t rows_part_bytes(Rows P, Py_ssize_t C) noexcept nogil:
    """Item partials of rows_moments: (count, C means, C m2s) per item, at least one."""
    return (P.items if P.items > 0 else 1) * (2 * C + 1) * sizeof(double)


cdef Py_ssize_t apply_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                    Py_ssize_t itemsize):
    if K >= PLANE_MIN_K:
        return 0
    return 4 * rows_partition(M, C, K, CHUNK, M, itemsize).W * itemsize


cdef void apply(int op, const floating* x, const floating* g, const floating* q,
                floating* y, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, const floating* pa,
                const floating* pb, const floating* pc, const floating* pd, floating* lanes,
                bint relu, int nthreads) noexcept nogil:
    """Dispatch an element-wise pass to the planes or rows kernel."""
    cdef Py_ssize_t W
    if K >= PLANE_MIN_K:
        planes_apply(op, x, g, q, y, M, C, K, pa, pb, pc, pd, relu, nthreads)
        return
    W = rows_partition(M, C, K, CHUNK, M, sizeof(floating)).W
    expand_lanes(pa, lanes, W, C, K)
    expand_lanes(pb, lanes + W, W, C, K)
    expand_lanes(pc, lanes + 2 * W, W, C, K)
    if pd != NULL:
        expand_lanes(pd, lanes + 3 * W, W, C, K)
    rows_apply(op, x, g, q, y, M, C, K, lanes, relu, nthreads)


cdef void* alloc(Py_ssize_t nbytes) except NULL:
    """malloc that raises MemoryError (called with the GIL, before any parallel region)."""
    cdef void* p = malloc(nbytes if nbytes > 0 else 1)
    if p == NULL:
        raise MemoryError(f"cbn: could not allocate {nbytes} bytes of scratch memory")
    return p


cdef inline void* data(object a):
    """Data pointer of an ndarray (the caller guarantees contiguity and dtype), or NULL."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline bint is_float32(cnp.ndarray a):
    return cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32


cdef int forward_train_impl(const floating* x, floating* y, const floating* weight,
                            const floating* bias, floating* running_mean,
                            floating* running_var, floating* save_mean,
                            floating* save_invstd, const floating* residual, bint relu,
                            Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, double momentum,
                            double eps, int nthreads) except -1:
    cdef Py_ssize_t isz = sizeof(floating), c
    cdef Py_ssize_t mbytes = moments_scratch_bytes(M, C, K, isz, nthreads)
    cdef Py_ssize_t abytes = apply_scratch_bytes(M, C, K, isz)
    cdef char* mem = <char*>alloc(mbytes + abytes + C * (sizeof(Moments) + 3 * isz))
    cdef floating* lanes = <floating*>(mem + mbytes)
    cdef Moments* mom = <Moments*>(mem + mbytes + abytes)
    cdef floating* mu = <floating*>(mom + C)
    cdef floating* scale = mu + C
    cdef floating* shift = scale + C
    cdef double n = <double>M * K, inv
    with nogil:
        channel_moments(x, M, C, K, mem, mom, nthreads)
        for c in range(C):
            inv = inv_sqrt(mom[c].m2 / n + eps)
            save_mean[c] = <floating>mom[c].mean
            save_invstd[c] = <floating>inv
            mu[c] = <floating>mom[c].mean
            scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * inv)
            shift[c] = bias[c] if bias != NULL else 0
            if running_mean != NULL:
                running_mean[c] = <floating>(momentum * mom[c].mean
                                             + (1.0 - momentum) * running_mean[c])
            if running_var != NULL:
                running_var[c] = <floating>(momentum * (mom[c].m2 / (n - 1.0))
                                            + (1.0 - momentum) * running_var[c])
        apply(OP_AFFINE, x, NULL, residual, y, M, C, K, mu, scale, shift, NULL, lanes, relu,
              nthreads)
    free(mem)
    return 0


cdef int affine_impl(const floating* x, floating* y, const floating* mean,
                     const floating* scale, const floating* shift, const floating* residual,
                     bint relu, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                     int nthreads) except -1:
    cdef char* mem = <char*>alloc(apply_scratch_bytes(M, C, K, sizeof(floating)))
    with nogil:
        apply(OP_AFFINE, x, NULL, residual, y, M, C, K, mean, scale, shift, NULL,
              <floating*>mem, relu, nthreads)
    free(mem)
    return 0


def forward_train(cnp.ndarray x, cnp.ndarray y, weight, bias, running_mean, running_var,
                  cnp.ndarray save_mean, cnp.ndarray save_invstd, double momentum,
                  double eps, int nthreads, residual=None, bint relu=False):
    """Training forward on (M, C, K) arrays: batch statistics, running-statistics update
    (arrays that are None are skipped), y = act(normalize(x) + residual). All arrays
    C-contiguous, of x's dtype (checked by the caller)."""
    cdef Py_ssize_t M = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t K = cnp.PyArray_DIM(x, 2)
    if is_float32(x):
        forward_train_impl(<float*>data(x), <float*>data(y), <float*>data(weight),
                           <float*>data(bias), <float*>data(running_mean),
                           <float*>data(running_var), <float*>data(save_mean),
                           <float*>data(save_invstd), <float*>data(residual), relu,
                           M, C, K, momentum, eps, nthreads)
    else:
        forward_train_impl(<double*>data(x), <double*>data(y), <double*>data(weight),
                           <double*>data(bias), <double*>data(running_mean),
                           <double*>data(running_var), <double*>data(save_mean),
                           <double*>data(save_invstd), <double*>data(residual), relu,
                           M, C, K, momentum, eps, nthreads)


def affine(cnp.ndarray x, cnp.ndarray y, cnp.ndarray mean, cnp.ndarray scale,
           cnp.ndarray shift, residual, bint relu, int nthreads):
    """y = act((x - mean) * scale + shift + residual) on (M, C, K) arrays: the eval
    forward once scale = weight * invstd and shift = bias are known."""
    cdef Py_ssize_t M = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t K = cnp.PyArray_DIM(x, 2)
    if is_float32(x):
        affine_impl(<float*>data(x), <float*>data(y), <float*>data(mean), <float*>data(scale),
                    <float*>data(shift), <float*>data(residual), relu, M, C, K, nthreads)
    else:
        affine_impl(<double*>data(x), <double*>data(y), <double*>data(mean),
                    <double*>data(scale), <double*>data(shift), <double*>data(residual), relu,
                    M, C, K, nthreads)


cdef void eval_params_impl(const floating* weight, const floating* bias,
                           const floating* running_var, double eps, floating* save_invstd,
                           floating* scale, floating* shift, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t c
    cdef double inv
    for c in range(C):
        inv = inv_sqrt(<double>running_var[c] + eps)
        save_invstd[c] = <floating>inv
        scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * inv)
        shift[c] = bias[c] if bias != NULL else 0


def eval_params(weight, bias, cnp.ndarray running_var, double eps, cnp.ndarray save_invstd,
                cnp.ndarray scale, cnp.ndarray shift):
    """Per-channel parameters of the eval forward: invstd = 1/sqrt(rv + eps) (0 where
    rv + eps == 0), scale = weight * invstd, shift = bias (weight/bias None: 1, 0).
    Contiguous (C,) arrays of one dtype (checked by the caller)."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(running_var, 0)
    if is_float32(running_var):
        eval_params_impl(<float*>data(weight), <float*>data(bias), <float*>data(running_var),
                         eps, <float*>data(save_invstd), <float*>data(scale),
                         <float*>data(shift), C)
    else:
        eval_params_impl(<double*>data(weight), <double*>data(bias),
                         <double*>data(running_var), eps, <double*>data(save_invstd),
                         <double*>data(scale), <double*>data(shift), C)


cdef int forward_eval_impl(const floating* x, floating* y, const floating* weight,
                           const floating* bias, const floating* running_mean,
                           const floating* running_var, floating* save_mean,
                           floating* save_invstd, const floating* residual, bint relu,
                           Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, double eps,
                           int nthreads) except -1:
    cdef Py_ssize_t abytes = apply_scratch_bytes(M, C, K, sizeof(floating)), c
    cdef char* mem = <char*>alloc(abytes + 2 * C * sizeof(floating))
    cdef floating* scale = <floating*>(mem + abytes)
    cdef floating* shift = scale + C
    with nogil:
        eval_params_impl(weight, bias, running_var, eps, save_invstd, scale, shift, C)
        for c in range(C):
            save_mean[c] = running_mean[c]
        apply(OP_AFFINE, x, NULL, residual, y, M, C, K, running_mean, scale, shift, NULL,
              <floating*>mem, relu, nthreads)
    free(mem)
    return 0


def forward_eval(cnp.ndarray x, cnp.ndarray y, weight, bias, cnp.ndarray running_mean,
                 cnp.ndarray running_var, cnp.ndarray save_mean, cnp.ndarray save_invstd,
                 double eps, int nthreads, residual=None, bint relu=False):
    """Eval forward on (M, C, K) arrays: eval_params, then y = act((x - running_mean) *
    scale + shift + residual) in one pass; save_mean = running_mean."""
    cdef Py_ssize_t M = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t K = cnp.PyArray_DIM(x, 2)
    if is_float32(x):
        forward_eval_impl(<float*>data(x), <float*>data(y), <float*>data(weight),
                          <float*>data(bias), <float*>data(running_mean),
                          <float*>data(running_var), <float*>data(save_mean),
                          <float*>data(save_invstd), <float*>data(residual), relu, M, C, K,
                          eps, nthreads)
    else:
        forward_eval_impl(<double*>data(x), <double*>data(y), <double*>data(weight),
                          <double*>data(bias), <double*>data(running_mean),
                          <double*>data(running_var), <double*>data(save_mean),
                          <double*>data(save_invstd), <double*>data(residual), relu, M, C, K,
                          eps, nthreads)


def invstd(floating[::1] var, double eps, floating[::1] out):
    """out = 1/sqrt(var + eps), 0 where var + eps == 0."""
    cdef Py_ssize_t c
    for c in range(var.shape[0]):
        out[c] = <floating>inv_sqrt(<double>var[c] + eps)


# ----------------------------------------------------------------- backward reductions

cdef struct Sums:
    double g      # sum of grad_output
    double gx     # sum of grad_output * (x - mean)


cdef inline void zero_sums(Sums* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        s[i].g = 0.0
        s[i].gx = 0.0


cdef inline const floating* shifted(const floating* p, Py_ssize_t off) noexcept nogil:
    return p + off if p != NULL else NULL


cdef void planes_item_sums(const floating* g, const floating* x, const floating* ym,
                           floating* dx, floating* gr, Planes P, Py_ssize_t item,
                           const floating* mean, const floating* scale,
                           Sums* acc) noexcept nogil:
    """Per-channel sums of one item's units into its slots of acc[0:C] (see
    cbn_runs_sums)."""
    cdef Py_ssize_t u0 = item * P.units // P.items, u1 = (item + 1) * P.units // P.items
    cdef Py_ssize_t u, off, c, nruns, n, c0, nc, j
    cdef double sg, sgx
    planes_item_span(P, item, &c0, &nc)
    for j in range(nc):
        zero_sums(&acc[(c0 + j) % P.C], 1)
    for u in range(u0, u1):
        off = planes_unit(P, u, &c, &nruns, &n)
        ops(g).runs_sums(g + off, x + off, shifted(ym, off), <floating*>shifted(dx, off),
                         <floating*>shifted(gr, off), nruns, n, P.C * P.K, mean[c],
                         scale[c], &sg, &sgx)
        acc[c].g += sg
        acc[c].gx += sgx


cdef void planes_sums(const floating* g, const floating* x, const floating* ym, floating* dx,
                      floating* gr, Planes P, const floating* mean, const floating* scale,
                      Sums* part, Sums* out, int nthreads) noexcept nogil:
    """part: items*C slots (each item writes those of its channels only)."""
    cdef Py_ssize_t it, c, c0, nc, j
    if nthreads == 1:
        for it in range(P.items):
            planes_item_sums(g, x, ym, dx, gr, P, it, mean, scale, part + it * P.C)
    else:
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            planes_item_sums(g, x, ym, dx, gr, P, it, mean, scale, part + it * P.C)
    zero_sums(out, P.C)
    for it in range(P.items):
        planes_item_span(P, it, &c0, &nc)
        for j in range(nc):
            c = (c0 + j) % P.C
            out[c].g += part[it * P.C + c].g
            out[c].gx += part[it * P.C + c].gx


cdef void rows_block_sums(const floating* g, const floating* x, const floating* ym,
                          floating* dx, floating* gr, Py_ssize_t R, Py_ssize_t w,
                          Py_ssize_t C, Py_ssize_t K, const floating* lmean,
                          const floating* lscale, floating* ag, floating* agx,
                          Sums* out) noexcept nogil:
    """Add the per-channel sums of R rows of w values to out[0:C] (see cbn_cols_sums)."""
    cdef Py_ssize_t t, c, q, kk, reps = w // (C * K)
    ops(g).cols_sums(g, x, ym, dx, gr, R, w, lmean, lscale, ag, agx)
    t = 0
    for q in range(reps):
        for c in range(C):
            for kk in range(K):
                out[c].g += ag[t]
                out[c].gx += agx[t]
                t += 1


cdef void rows_item_sums(const floating* g, const floating* x, const floating* ym,
                         floating* dx, floating* gr, Py_ssize_t C, Py_ssize_t K, Rows P,
                         Py_ssize_t it, const floating* lmean, const floating* lscale,
                         Sums* acc, floating* sc) noexcept nogil:
    """Sums of one item's blocks into acc[0:C]; scratch sc: 2*W."""
    cdef Py_ssize_t blk, r0, nr, off
    zero_sums(acc, C)
    for blk in range(it * P.nblocks // P.items, (it + 1) * P.nblocks // P.items):
        r0 = blk * P.R
        nr = P.nrows - r0
        if nr > P.R:
            nr = P.R
        off = r0 * P.W
        rows_block_sums(g + off, x + off, shifted(ym, off), <floating*>shifted(dx, off),
                        <floating*>shifted(gr, off), nr, P.W, C, K, lmean, lscale, sc,
                        sc + P.W, acc)


cdef void rows_sums(const floating* g, const floating* x, const floating* ym, floating* dx,
                    floating* gr, Py_ssize_t C, Py_ssize_t K, Rows P, const floating* lmean,
                    const floating* lscale, Sums* part, floating* scratch, Sums* out,
                    int nthreads) noexcept nogil:
    """part: items*C slots; scratch: 2*W floating per thread."""
    cdef Py_ssize_t it, c, tid, off
    if nthreads == 1:
        for it in range(P.items):
            rows_item_sums(g, x, ym, dx, gr, C, K, P, it, lmean, lscale, part + it * C,
                           scratch)
    else:
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            tid = threadid()
            rows_item_sums(g, x, ym, dx, gr, C, K, P, it, lmean, lscale, part + it * C,
                           scratch + tid * 2 * P.W)
    zero_sums(out, C)
    for it in range(P.items):
        for c in range(C):
            out[c].g += part[it * C + c].g
            out[c].gx += part[it * C + c].gx
    if P.tail:
        off = P.nrows * P.W
        rows_block_sums(g + off, x + off, shifted(ym, off), <floating*>shifted(dx, off),
                        <floating*>shifted(gr, off), 1, P.tail, C, K, lmean, lscale,
                        scratch, scratch + P.W, out)


cdef int backward_impl(const floating* g, const floating* x, floating* gx,
                       const floating* weight, const floating* mean, const floating* invstd,
                       floating* grad_weight, floating* grad_bias, const floating* output,
                       floating* grad_residual, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                       bint training, int nthreads) except -1:
    cdef Py_ssize_t isz = sizeof(floating), c, part_bytes, W = 0
    cdef Planes PP
    cdef Rows PR
    cdef bint planes = K >= PLANE_MIN_K
    cdef double n = <double>M * K, inv
    if planes:
        PP = planes_partition(M, C, K, BLOCK)
        part_bytes = PP.items * C * sizeof(Sums)
    else:
        PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, sizeof(floating))
        W = PR.W
        part_bytes = PR.items * C * sizeof(Sums) + (nthreads * 2 + 2) * W * isz
    cdef Py_ssize_t abytes = apply_scratch_bytes(M, C, K, isz)
    cdef char* mem = <char*>alloc(part_bytes + abytes + C * (sizeof(Sums) + 4 * isz))
    cdef floating* lanes = <floating*>(mem + part_bytes)
    cdef Sums* sums = <Sums*>(mem + part_bytes + abytes)
    cdef floating* scale = <floating*>(sums + C)
    cdef floating* k1 = scale + C
    cdef floating* k2 = k1 + C
    cdef floating* lmean
    cdef floating* dx_fused = NULL if training else gx
    with nogil:
        for c in range(C):
            scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * invstd[c])
        if planes:
            planes_sums(g, x, output, dx_fused, grad_residual, PP, mean, scale,
                        <Sums*>mem, sums, nthreads)
        else:
            lmean = <floating*>(mem + PR.items * C * sizeof(Sums))
            expand_lanes(mean, lmean, W, C, K)
            expand_lanes(scale, lmean + W, W, C, K)
            rows_sums(g, x, output, dx_fused, grad_residual, C, K, PR, lmean, lmean + W,
                      <Sums*>mem, lmean + 2 * W, sums, nthreads)
        for c in range(C):
            inv = invstd[c]
            grad_bias[c] = <floating>sums[c].g
            grad_weight[c] = <floating>(sums[c].gx * inv)
            k1[c] = <floating>(sums[c].g / n)
            k2[c] = <floating>(sums[c].gx / n * inv * inv)
        if training:
            apply(OP_BWD_TRAIN, x, g, output, gx, M, C, K, mean, scale, k1, k2, lanes,
                  False, nthreads)
    free(mem)
    return 0


def backward(cnp.ndarray grad_output, cnp.ndarray x, cnp.ndarray grad_input, weight,
             cnp.ndarray mean, cnp.ndarray invstd, cnp.ndarray grad_weight,
             cnp.ndarray grad_bias, bint training, int nthreads, output=None,
             grad_residual=None):
    """Backward of batch normalization on (M, C, K) arrays.

    Training: one pass of per-channel sums, then dx = (dy - k1 - (x - mean) * k2) * scale.
    Eval: one pass that both sums (for grad_weight, grad_bias) and writes dx = dy * scale.
    With `output` (the forward's ReLU output), dy is masked where output <= 0 inside those
    passes; `grad_residual`, if given, receives the (masked) dy in the first pass.
    """
    cdef Py_ssize_t M = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t K = cnp.PyArray_DIM(x, 2)
    if is_float32(x):
        backward_impl(<float*>data(grad_output), <float*>data(x), <float*>data(grad_input),
                      <float*>data(weight), <float*>data(mean), <float*>data(invstd),
                      <float*>data(grad_weight), <float*>data(grad_bias),
                      <float*>data(output), <float*>data(grad_residual), M, C, K,
                      training, nthreads)
    else:
        backward_impl(<double*>data(grad_output), <double*>data(x),
                      <double*>data(grad_input), <double*>data(weight), <double*>data(mean),
                      <double*>data(invstd), <double*>data(grad_weight),
                      <double*>data(grad_bias), <double*>data(output),
                      <double*>data(grad_residual), M, C, K, training, nthreads)


# ------------------------------------------------------------------- plain-call fast path
#
# Small inputs spend most of a call in Python: checking arguments, building views,
# allocating. The common call (a C-contiguous float32/float64 ndarray in native byte order,
# per-channel vectors that are already C-contiguous (C,) arrays of its dtype; out, a
# residual or a ReLU output of the same kind) is recognised here with a few C tests and
# run directly.
# Recognising is not validating: anything else, invalid calls included, returns None and
# cbn.functional takes its general path, which validates and raises its usual errors.

cdef inline bint plain_array(object a, int typenum):
    """A C-contiguous ndarray (not a subclass) of typenum in native byte order."""
    return (cnp.PyArray_CheckExact(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a)
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a))


cdef inline bint plain_vec(object a, Py_ssize_t C, int typenum, bint writeable):
    """None, or a plain (C,) array (writeable if asked)."""
    if a is None:
        return True
    return (plain_array(a, typenum) and cnp.PyArray_NDIM(<cnp.ndarray>a) == 1
            and cnp.PyArray_DIM(<cnp.ndarray>a, 0) == C
            and (not writeable or cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a)))


cdef inline bint plain_like(object a, object x, int typenum):
    """None, or a plain array of x's shape (a residual, a ReLU output)."""
    return a is None or (plain_array(a, typenum)
                         and cnp.PyArray_SAMESHAPE(<cnp.ndarray>a, <cnp.ndarray>x))


cdef int plain_dims(object x, object axis, Py_ssize_t* M, Py_ssize_t* C,
                    Py_ssize_t* K) except -2:
    """Type number of a plain, non-empty 2D-5D float input with an int axis in range,
    setting (M, C, K); -1 if the input is not plain."""
    cdef int typ, nd, ax, i
    cdef cnp.npy_intp* shape
    if not cnp.PyArray_CheckExact(x) or type(axis) is not int:
        return -1
    typ = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if typ != cnp.NPY_FLOAT32 and typ != cnp.NPY_FLOAT64:
        return -1
    if not plain_array(x, typ) or cnp.PyArray_SIZE(<cnp.ndarray>x) == 0:
        return -1
    nd = cnp.PyArray_NDIM(<cnp.ndarray>x)
    if nd < 2 or nd > 5 or not -nd <= axis < nd:
        return -1
    ax = axis
    if ax < 0:
        ax += nd
    shape = cnp.PyArray_DIMS(<cnp.ndarray>x)
    M[0] = 1
    K[0] = 1
    for i in range(ax):
        M[0] *= shape[i]
    C[0] = shape[ax]
    for i in range(ax + 1, nd):
        K[0] *= shape[i]
    return typ


cdef object plain_out(object out, object x, int typ):
    """A new array like x if out is None; out itself if it is a plain, writeable array of
    x's shape that is x or does not overlap it; else None (not plain)."""
    cdef char* a
    cdef char* b
    cdef Py_ssize_t n
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>x),
                                 cnp.PyArray_DIMS(<cnp.ndarray>x), typ, 0)
    if not (plain_array(out, typ) and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)
            and cnp.PyArray_SAMESHAPE(<cnp.ndarray>out, <cnp.ndarray>x)):
        return None
    a = <char*>cnp.PyArray_DATA(<cnp.ndarray>out)
    b = <char*>cnp.PyArray_DATA(<cnp.ndarray>x)
    n = cnp.PyArray_NBYTES(<cnp.ndarray>x)
    if a == b or a + n <= b or b + n <= a:
        return out
    return None


cdef int plain_threads(object n_threads, Py_ssize_t size, Py_ssize_t min_parallel) except -2:
    """Threads for a call (n_threads None: omp_get_max_threads()); -1 (not plain) unless
    n_threads is an int from 1 to 4096, so that an odd count reaches the general path
    exactly as before rather than being clipped here."""
    cdef int n
    if n_threads is None:
        n = cbn_max_threads()
    elif type(n_threads) is int and 1 <= n_threads <= 4096:
        n = n_threads
    else:
        return -1
    return 1 if size < min_parallel else n


def plain_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                  axis, n_threads, Py_ssize_t min_parallel, residual=None, bint relu=False,
                  out=None):
    """batch_norm_forward's plain call: (y, save_mean, save_invstd), or None when the call
    is not plain (then nothing was computed or written). n_threads None means
    omp_get_max_threads(); inputs under min_parallel values run on one thread. A residual
    must be a plain array of the input's shape and dtype; so must out, which may be x
    itself but must not otherwise overlap it."""
    cdef Py_ssize_t M, C, K
    cdef int typ = plain_dims(x, axis, &M, &C, &K), nt
    cdef double e, mom = 0.0
    if typ < 0 or type(eps) is not float:
        return None
    e = eps
    if not (0.0 <= e < float("inf")):
        return None
    if not plain_vec(weight, C, typ, False) or not plain_vec(bias, C, typ, False):
        return None
    if not plain_like(residual, x, typ):
        return None
    if training is True:
        if type(momentum) is not float or M * K == 1:
            return None
        if (not plain_vec(running_mean, C, typ, True)
                or not plain_vec(running_var, C, typ, True)):
            return None
        mom = momentum
    elif training is False:
        if (running_mean is None or running_var is None
                or not plain_vec(running_mean, C, typ, False)
                or not plain_vec(running_var, C, typ, False)):
            return None
    else:
        return None
    nt = plain_threads(n_threads, M * C * K, min_parallel)
    y = None if nt < 0 else plain_out(out, x, typ)
    if y is None:
        return None
    cdef cnp.npy_intp nc = C
    cdef cnp.ndarray sm = cnp.PyArray_EMPTY(1, &nc, typ, 0)
    cdef cnp.ndarray si = cnp.PyArray_EMPTY(1, &nc, typ, 0)
    if training:
        if typ == cnp.NPY_FLOAT32:
            forward_train_impl(<float*>data(x), <float*>data(y), <float*>data(weight),
                               <float*>data(bias), <float*>data(running_mean),
                               <float*>data(running_var), <float*>data(sm),
                               <float*>data(si), <float*>data(residual), relu, M, C, K,
                               mom, e, nt)
        else:
            forward_train_impl(<double*>data(x), <double*>data(y), <double*>data(weight),
                               <double*>data(bias), <double*>data(running_mean),
                               <double*>data(running_var), <double*>data(sm),
                               <double*>data(si), <double*>data(residual), relu, M, C, K,
                               mom, e, nt)
    elif typ == cnp.NPY_FLOAT32:
        forward_eval_impl(<float*>data(x), <float*>data(y), <float*>data(weight),
                          <float*>data(bias), <float*>data(running_mean),
                          <float*>data(running_var), <float*>data(sm), <float*>data(si),
                          <float*>data(residual), relu, M, C, K, e, nt)
    else:
        forward_eval_impl(<double*>data(x), <double*>data(y), <double*>data(weight),
                          <double*>data(bias), <double*>data(running_mean),
                          <double*>data(running_var), <double*>data(sm), <double*>data(si),
                          <double*>data(residual), relu, M, C, K, e, nt)
    return y, sm, si


def plain_backward(grad_output, x, weight, save_mean, save_invstd, training, axis,
                   n_threads, Py_ssize_t min_parallel, output=None, bint residual=False):
    """batch_norm_backward's plain call: (grad_input, grad_weight, grad_bias), plus
    grad_residual if residual, or None when the call is not plain. output (the forward's
    ReLU output, masking grad_output) must be a plain array of the input's shape."""
    cdef Py_ssize_t M, C, K
    cdef int typ = plain_dims(x, axis, &M, &C, &K), nt
    if typ < 0 or (training is not True and training is not False):
        return None
    if grad_output is None or not plain_like(grad_output, x, typ):
        return None
    if not plain_like(output, x, typ):
        return None
    if (save_mean is None or save_invstd is None or not plain_vec(weight, C, typ, False)
            or not plain_vec(save_mean, C, typ, False)
            or not plain_vec(save_invstd, C, typ, False)):
        return None
    nt = plain_threads(n_threads, M * C * K, min_parallel)
    if nt < 0:
        return None
    cdef cnp.npy_intp nc = C
    cdef cnp.ndarray gx = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>x),
                                            cnp.PyArray_DIMS(<cnp.ndarray>x), typ, 0)
    cdef cnp.ndarray gw = cnp.PyArray_EMPTY(1, &nc, typ, 0)
    cdef cnp.ndarray gb = cnp.PyArray_EMPTY(1, &nc, typ, 0)
    cdef object gr = None
    if residual:
        gr = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>x),
                               cnp.PyArray_DIMS(<cnp.ndarray>x), typ, 0)
    if typ == cnp.NPY_FLOAT32:
        backward_impl(<float*>data(grad_output), <float*>data(x), <float*>data(gx),
                      <float*>data(weight), <float*>data(save_mean), <float*>data(save_invstd),
                      <float*>data(gw), <float*>data(gb), <float*>data(output),
                      <float*>data(gr), M, C, K, training is True, nt)
    else:
        backward_impl(<double*>data(grad_output), <double*>data(x), <double*>data(gx),
                      <double*>data(weight), <double*>data(save_mean),
                      <double*>data(save_invstd), <double*>data(gw), <double*>data(gb),
                      <double*>data(output), <double*>data(gr), M, C, K, training is True,
                      nt)
    return (gx, gw, gb, gr) if residual else (gx, gw, gb)


def plain_affine(x, mean, scale, shift, axis, n_threads, Py_ssize_t min_parallel,
                 residual=None, bint relu=False, out=None):
    """normalize's plain call: y = act((x - mean) * scale + shift + residual), or None
    when the call is not plain (out as in plain_forward)."""
    cdef Py_ssize_t M, C, K
    cdef int typ = plain_dims(x, axis, &M, &C, &K), nt
    if typ < 0 or mean is None or scale is None or shift is None:
        return None
    if (not plain_vec(mean, C, typ, False) or not plain_vec(scale, C, typ, False)
            or not plain_vec(shift, C, typ, False)):
        return None
    if not plain_like(residual, x, typ):
        return None
    nt = plain_threads(n_threads, M * C * K, min_parallel)
    y = None if nt < 0 else plain_out(out, x, typ)
    if y is None:
        return None
    if typ == cnp.NPY_FLOAT32:
        affine_impl(<float*>data(x), <float*>data(y), <float*>data(mean), <float*>data(scale),
                    <float*>data(shift), <float*>data(residual), relu, M, C, K, nt)
    else:
        affine_impl(<double*>data(x), <double*>data(y), <double*>data(mean),
                    <double*>data(scale), <double*>data(shift), <double*>data(residual), relu,
                    M, C, K, nt)
    return y
