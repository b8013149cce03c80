# cython: language_level=3
"""cbn's compiled kernels: batch normalization over a C-contiguous (M, C, K) view.

Every input, whatever its ndim and channel axis, reaches these kernels as an (M, C, K) array
(see cbn.functional). Two kernel shapes cover all of them:

* planes (K >= PLANE_MIN_K): each (m, c) plane is K contiguous values of one channel; loops
  run along K with LANES independent accumulators.
* rows (K small, e.g. channels-last where K == 1): the data is a stream of "rows" of
  W = k*C*K values (k original m-rows glued so that a row has at least ROW_MIN_WIDTH
  values); loops run along the row with one accumulator per lane, lane t belonging to
  channel (t // K) % C.

Statistics: each block of values small enough to stay in L1/L2 is reduced with a two-pass
algorithm (a shifted sum gives the block mean, then the corrected sum of squared deviations
around it), and blocks are merged with Chan et al.'s pairwise formula in double. Work is cut
into a fixed number of items that depends on the shape only, never on the thread count; each
item's partial result goes to its own slot and the slots are merged in item order, so the
results are bit-identical for any number of threads.

Nothing here validates its arguments: cbn.functional does that before calling in. Scratch
memory is allocated (and checked) with the GIL held, before any parallel region.
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int cbn_openmp_enabled(void) { return 1; }
    static int cbn_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int cbn_openmp_enabled(void) { return 0; }
    static int cbn_max_threads(void) { return 1; }
    #endif
    """
    int cbn_openmp_enabled() noexcept nogil
    int cbn_max_threads() noexcept nogil


cdef enum:
    LANES = 16            # independent accumulators in contiguous reductions
    PLANE_MIN_K = 128     # K at or above this: planes kernels; below: rows kernels
    BLOCK = 4096          # values per two-pass block along a plane (L1-resident)
    ROW_BLOCK = 16384     # values per two-pass block of rows (L2-resident)
    ROW_MIN_WIDTH = 64    # rows kernels glue m-rows until a row has this many values
    TARGET_ITEMS = 128    # parallel work items per reduction (fixed: determinism)
    CHUNK = 16384         # values per parallel item in element-wise passes


def openmp_enabled():
    """True if the kernels were compiled with OpenMP (else they run on one thread)."""
    return bool(cbn_openmp_enabled())


def max_threads():
    """omp_get_max_threads(): follows OMP_NUM_THREADS and threadpoolctl's limits."""
    return cbn_max_threads()


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


cdef inline Moments run_moments(const floating* p, Py_ssize_t n) noexcept nogil:
    """Moments of n >= 1 contiguous values, two-pass.

    Pass 1 sums x - p[0] (the shift keeps the sum small when |mean| >> std), giving the
    block mean m rounded to the data type. Pass 2 sums d = x - m and d*d; the true mean is
    m + sum(d)/n and m2 = sum(d*d) - sum(d)^2/n (the corrected two-pass formula).
    """
    cdef floating acc[LANES]
    cdef floating acc2[LANES]
    cdef floating shift = p[0], m, d
    cdef Py_ssize_t i, j, nv = n - n % LANES
    cdef double s = 0.0, ss = 0.0
    cdef Moments r
    for j in range(LANES):
        acc[j] = 0
    for i from 0 <= i < nv by LANES:
        for j in range(LANES):
            acc[j] = acc[j] + (p[i + j] - shift)
    for j in range(LANES):
        s += acc[j]
    for i in range(nv, n):
        s += p[i] - shift
    m = <floating>(shift + s / n)
    for j in range(LANES):
        acc[j] = 0
        acc2[j] = 0
    for i from 0 <= i < nv by LANES:
        for j in range(LANES):
            d = p[i + j] - m
            acc[j] = acc[j] + d
            acc2[j] = acc2[j] + d * d
    s = 0.0
    for j in range(LANES):
        s += acc[j]
        ss += acc2[j]
    for i in range(nv, n):
        d = p[i] - m
        s += d
        ss += <double>d * d
    r.n = n
    r.mean = m + s / n
    r.m2 = ss - s * s / n
    if r.m2 < 0.0:
        r.m2 = 0.0
    return r


# --------------------------------------------------------------------- work partitions

cdef struct Planes:
    Py_ssize_t M, C, K
    Py_ssize_t nblk      # blocks per plane
    Py_ssize_t blen      # values per block (the last may be shorter)
    Py_ssize_t units     # blocks per channel: M * nblk
    Py_ssize_t groups    # items per channel
    Py_ssize_t items     # C * groups


cdef Planes planes_partition(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, Py_ssize_t block) noexcept nogil:
    """Cut each channel's M*K values into blocks, and the blocks of a channel into groups,
    so that there are about TARGET_ITEMS items in all; depends on the shape only."""
    cdef Planes P
    P.M = M
    P.C = C
    P.K = K
    P.nblk = (K + block - 1) // block
    P.blen = (K + P.nblk - 1) // P.nblk
    P.units = M * P.nblk
    P.groups = (TARGET_ITEMS + C - 1) // C
    if P.groups > P.units:
        P.groups = P.units
    if P.groups < 1:
        P.groups = 1
    P.items = C * P.groups
    return P


cdef struct Rows:
    Py_ssize_t S         # values per m-row: C * K
    Py_ssize_t W         # values per glued row: k * S
    Py_ssize_t k         # m-rows per glued row
    Py_ssize_t nrows     # full glued rows: M // k
    Py_ssize_t tail      # values after the full rows: (M % k) * S
    Py_ssize_t R         # glued rows per block
    Py_ssize_t nblocks
    Py_ssize_t items


cdef Rows rows_partition(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, Py_ssize_t block,
                         Py_ssize_t max_items) noexcept nogil:
    cdef Rows P
    P.S = C * K
    P.k = (ROW_MIN_WIDTH + P.S - 1) // P.S
    P.W = P.k * P.S
    P.nrows = M // P.k
    P.tail = (M % P.k) * P.S
    P.R = block // P.W
    if P.R < 1:
        P.R = 1
    P.nblocks = (P.nrows + P.R - 1) // P.R
    P.items = P.nblocks if P.nblocks < max_items else max_items
    return P


# ----------------------------------------------------------------- statistics: planes

cdef Moments planes_item_moments(const floating* x, Planes P, Py_ssize_t item) noexcept nogil:
    """Moments of the blocks of one item: channel item // groups, a range of its blocks."""
    cdef Py_ssize_t c = item // P.groups, g = item % P.groups
    cdef Py_ssize_t u0 = g * P.units // P.groups, u1 = (g + 1) * P.units // P.groups
    cdef Py_ssize_t u, m, start, n
    cdef Moments acc
    acc.n = 0
    acc.mean = 0
    acc.m2 = 0
    for u in range(u0, u1):
        m = u // P.nblk
        start = (u % P.nblk) * P.blen
        n = P.K - start
        if n > P.blen:
            n = P.blen
        merge(&acc, run_moments(x + (m * P.C + c) * P.K + start, n))
    return acc


cdef void planes_moments(const floating* x, Planes P, Moments* part, Moments* out,
                         int nthreads) noexcept nogil:
    cdef Py_ssize_t it, c, g
    for it in prange(P.items, num_threads=nthreads, schedule="static"):
        part[it] = planes_item_moments(x, P, it)
    for c in range(P.C):
        out[c] = part[c * P.groups]
        for g in range(1, P.groups):
            merge(&out[c], part[c * P.groups + g])


# ------------------------------------------------------------------- statistics: rows

cdef void rows_block_moments(const floating* p, Py_ssize_t R, Py_ssize_t w, Py_ssize_t C,
                             Py_ssize_t K, floating* acc, floating* acc2, floating* lane,
                             double* s1, double* s2, Moments* out) noexcept nogil:
    """Merge the per-channel moments of R rows of w values (row 0 at p) into out[0:C].

    Scratch: acc, acc2, lane hold w values; s1, s2 hold C doubles.
    """
    cdef Py_ssize_t r, t, c, q, kk, reps = w // (C * K)
    cdef const floating* row
    cdef floating d
    cdef double cnt = <double>R * reps * K, mean
    cdef Moments b
    # pass 1: shifted sums, the shift being the block's first row
    for t in range(w):
        acc[t] = 0
    for r in range(1, R):
        row = p + r * w
        for t in range(w):
            acc[t] = acc[t] + (row[t] - p[t])
    for c in range(C):
        s1[c] = 0.0
    t = 0
    for q in range(reps):
        for c in range(C):
            for kk in range(K):
                s1[c] += <double>acc[t] + <double>p[t] * R
                t += 1
    # pass 2: deviations around the block mean, rounded to the data type
    t = 0
    for q in range(reps):
        for c in range(C):
            d = <floating>(s1[c] / cnt)
            for kk in range(K):
                lane[t] = d
                t += 1
    for t in range(w):
        acc[t] = 0
        acc2[t] = 0
    for r in range(R):
        row = p + r * w
        for t in range(w):
            d = row[t] - lane[t]
            acc[t] = acc[t] + d
            acc2[t] = acc2[t] + d * d
    for c in range(C):
        s1[c] = 0.0
        s2[c] = 0.0
    t = 0
    for q in range(reps):
        for c in range(C):
            for kk in range(K):
                s1[c] += acc[t]
                s2[c] += acc2[t]
                t += 1
    t = 0
    for c in range(C):
        mean = lane[c * K]
        b.n = cnt
        b.mean = mean + s1[c] / cnt
        b.m2 = s2[c] - s1[c] * s1[c] / cnt
        if b.m2 < 0.0:
            b.m2 = 0.0
        merge(&out[c], b)


cdef void rows_moments(const floating* x, Py_ssize_t C, Py_ssize_t K, Rows P,
                       Moments* part, floating* scratch, double* dscratch, Moments* out,
                       int nthreads) noexcept nogil:
    """Per-channel moments over the rows partition. part: items*C slots; scratch:
    3*W floating and dscratch: 2*C doubles per thread."""
    cdef Py_ssize_t it, b0, b1, blk, r0, nr, c, tid
    cdef floating* sc
    cdef double* ds
    cdef Moments* acc
    for it in prange(P.items, num_threads=nthreads, schedule="static"):
        tid = threadid()
        sc = scratch + tid * 3 * P.W
        ds = dscratch + tid * 2 * C
        acc = part + it * C
        for c in range(C):
            acc[c].n = 0
            acc[c].mean = 0
            acc[c].m2 = 0
        b0 = it * P.nblocks // P.items
        b1 = (it + 1) * P.nblocks // P.items
        for blk in range(b0, b1):
            r0 = blk * P.R
            nr = P.nrows - r0
            if nr > P.R:
                nr = P.R
            rows_block_moments(x + r0 * P.W, nr, P.W, C, K, sc, sc + P.W, sc + 2 * P.W,
                               ds, ds + C, acc)
    for c in range(C):
        out[c].n = 0
        out[c].mean = 0
        out[c].m2 = 0
    for it in range(P.items):
        for c in range(C):
            merge(&out[c], part[it * C + c])
    if P.tail:
        rows_block_moments(x + P.nrows * P.W, 1, P.tail, C, K, scratch, scratch + P.W,
                           scratch + 2 * P.W, dscratch, dscratch + C, out)


# --------------------------------------------------------------- element-wise passes

cdef enum:
    OP_AFFINE = 0     # y = (x - a) * b + c
    OP_BWD_TRAIN = 1  # y = (g - c - (x - a) * d) * b     (g = grad_output)


cdef inline void run_apply(int op, const floating* x, const floating* g, floating* y,
                           Py_ssize_t n, floating a, floating b, floating c,
                           floating d) noexcept nogil:
    cdef Py_ssize_t i
    if op == OP_AFFINE:
        for i in range(n):
            y[i] = (x[i] - a) * b + c
    else:
        for i in range(n):
            y[i] = (g[i] - c - (x[i] - a) * d) * b


cdef void planes_apply(int op, const floating* x, const floating* g, floating* y,
                       Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, const floating* pa,
                       const floating* pb, const floating* pc, const floating* pd,
                       int nthreads) noexcept nogil:
    """Element-wise pass with per-channel parameters, over (plane, chunk) items."""
    cdef Py_ssize_t nch = (K + CHUNK - 1) // CHUNK
    cdef Py_ssize_t clen = (K + nch - 1) // nch
    cdef Py_ssize_t it, plane, ch, start, n, off
    for it in prange(M * C * nch, num_threads=nthreads, schedule="static"):
        plane = it // nch
        ch = plane % C
        start = (it % nch) * clen
        n = K - start
        if n > clen:
            n = clen
        off = plane * K + start
        run_apply(op, x + off, g + off if g != NULL else NULL, y + off, n,
                  pa[ch], pb[ch], pc[ch], pd[ch] if pd != NULL else 0)


cdef void expand_lanes(const floating* v, floating* lane, Py_ssize_t W, Py_ssize_t C,
                       Py_ssize_t K) noexcept nogil:
    """lane[t] = v[(t // K) % C] for t < W."""
    cdef Py_ssize_t t = 0, c, kk
    while t < W:
        for c in range(C):
            for kk in range(K):
                lane[t] = v[c]
                t += 1


cdef inline void row_apply(int op, const floating* x, const floating* g, floating* y,
                           Py_ssize_t w, const floating* la, const floating* lb,
                           const floating* lc, const floating* ld) noexcept nogil:
    cdef Py_ssize_t t
    if op == OP_AFFINE:
        for t in range(w):
            y[t] = (x[t] - la[t]) * lb[t] + lc[t]
    else:
        for t in range(w):
            y[t] = (g[t] - lc[t] - (x[t] - la[t]) * ld[t]) * lb[t]


cdef void rows_apply(int op, const floating* x, const floating* g, floating* y,
                     Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, const floating* lanes,
                     int nthreads) noexcept nogil:
    """Element-wise pass over the rows partition; lanes holds the 4 (or 3) parameter
    vectors expanded to W lanes each, back to back."""
    cdef Rows P = rows_partition(M, C, K, CHUNK, M)
    cdef Py_ssize_t W = P.W, blk, r, r1
    cdef const floating* la = lanes
    cdef const floating* lb = lanes + W
    cdef const floating* lc = lanes + 2 * W
    cdef const floating* ld = lanes + 3 * W
    for blk in prange(P.nblocks, num_threads=nthreads, schedule="static"):
        r1 = (blk + 1) * P.R
        if r1 > P.nrows:
            r1 = P.nrows
        for r in range(blk * P.R, r1):
            row_apply(op, x + r * W, g + r * W if g != NULL else NULL, y + r * W, W,
                      la, lb, lc, ld)
    if P.tail:
        r = P.nrows * W
        row_apply(op, x + r, g + r if g != NULL else NULL, y + r, P.tail, la, lb, lc, ld)


# ------------------------------------------------------------------- entry points

cdef class _Scratch:
    """Memory for one kernel call, allocated with the GIL held and freed on exit."""
    cdef void* ptr

    def __cinit__(self, Py_ssize_t nbytes):
        self.ptr = malloc(nbytes if nbytes > 0 else 1)
        if self.ptr == NULL:
            raise MemoryError(f"cbn: could not allocate {nbytes} bytes of scratch memory")

    def __dealloc__(self):
        free(self.ptr)


cdef void channel_moments(const floating* x, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                          void* mem, Moments* out, int nthreads) noexcept nogil:
    cdef Planes PP
    cdef Rows PR
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        planes_moments(x, PP, <Moments*>mem, out, nthreads)
    else:
        PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS)
        rows_moments(x, C, K, PR, <Moments*>mem,
                     <floating*>(<char*>mem + PR.items * C * sizeof(Moments)),
                     <double*>(<char*>mem + PR.items * C * sizeof(Moments)
                               + nthreads * 3 * PR.W * sizeof(floating)),
                     out, nthreads)


cdef Py_ssize_t moments_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                      Py_ssize_t itemsize, int nthreads):
    """Bytes of scratch channel_moments needs: item partials, per-thread lanes."""
    cdef Planes PP
    cdef Rows PR
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        return PP.items * sizeof(Moments)
    PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS)
    return (PR.items * C * sizeof(Moments) + nthreads * 3 * PR.W * itemsize
            + nthreads * 2 * C * sizeof(double))


cdef Py_ssize_t apply_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                    Py_ssize_t itemsize):
    if K >= PLANE_MIN_K:
        return 0
    return 4 * rows_partition(M, C, K, CHUNK, M).W * itemsize


cdef void apply(int op, const floating* x, const floating* g, floating* y, Py_ssize_t M,
                Py_ssize_t C, Py_ssize_t K, const floating* pa, const floating* pb,
                const floating* pc, const floating* pd, floating* lanes,
                int nthreads) noexcept nogil:
    """Dispatch an element-wise pass to the planes or rows kernel."""
    cdef Py_ssize_t W
    if K >= PLANE_MIN_K:
        planes_apply(op, x, g, y, M, C, K, pa, pb, pc, pd, nthreads)
        return
    W = rows_partition(M, C, K, CHUNK, M).W
    expand_lanes(pa, lanes, W, C, K)
    expand_lanes(pb, lanes + W, W, C, K)
    expand_lanes(pc, lanes + 2 * W, W, C, K)
    if pd != NULL:
        expand_lanes(pd, lanes + 3 * W, W, C, K)
    rows_apply(op, x, g, y, M, C, K, lanes, nthreads)


def forward_train(floating[:, :, ::1] x, floating[:, :, ::1] y, floating[::1] weight,
                  floating[::1] bias, floating[::1] running_mean, floating[::1] running_var,
                  floating[::1] save_mean, floating[::1] save_invstd, double momentum,
                  double eps, int nthreads):
    """Training forward: batch statistics, running-statistics update, normalize."""
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1], K = x.shape[2], c
    cdef Py_ssize_t isz = sizeof(floating)
    cdef _Scratch mem = _Scratch(moments_scratch_bytes(M, C, K, isz, nthreads)
                                 + apply_scratch_bytes(M, C, K, isz))
    cdef _Scratch vecs = _Scratch(C * (sizeof(Moments) + 3 * isz))
    cdef Moments* mom = <Moments*>vecs.ptr
    cdef floating* mu = <floating*>(mom + C)
    cdef floating* scale = mu + C
    cdef floating* shift = scale + C
    cdef char* lanes = <char*>mem.ptr + moments_scratch_bytes(M, C, K, isz, nthreads)
    cdef double n = <double>M * K, inv, var
    cdef bint has_w = weight is not None, has_b = bias is not None
    cdef bint has_rm = running_mean is not None, has_rv = running_var is not None
    with nogil:
        channel_moments(&x[0, 0, 0], M, C, K, mem.ptr, mom, nthreads)
        for c in range(C):
            var = mom[c].m2 / n
            inv = inv_sqrt(var + eps)
            save_mean[c] = <floating>mom[c].mean
            save_invstd[c] = <floating>inv
            mu[c] = <floating>mom[c].mean
            scale[c] = <floating>((weight[c] if has_w else 1.0) * inv)
            shift[c] = bias[c] if has_b else 0
            if has_rm:
                running_mean[c] = <floating>(momentum * mom[c].mean
                                             + (1.0 - momentum) * running_mean[c])
            if has_rv:
                running_var[c] = <floating>(momentum * (mom[c].m2 / (n - 1.0))
                                            + (1.0 - momentum) * running_var[c])
        apply(OP_AFFINE, &x[0, 0, 0], NULL, &y[0, 0, 0], M, C, K, mu, scale, shift, NULL,
              <floating*>lanes, nthreads)


def forward_eval(floating[:, :, ::1] x, floating[:, :, ::1] y, floating[::1] weight,
                 floating[::1] bias, floating[::1] running_mean, floating[::1] running_var,
                 floating[::1] save_mean, floating[::1] save_invstd, double eps,
                 int nthreads):
    """Eval forward: normalize with the running statistics (one pass)."""
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1], K = x.shape[2], c
    cdef Py_ssize_t isz = sizeof(floating)
    cdef _Scratch mem = _Scratch(apply_scratch_bytes(M, C, K, isz))
    cdef _Scratch vecs = _Scratch(C * 2 * isz)
    cdef floating* scale = <floating*>vecs.ptr
    cdef floating* shift = scale + C
    cdef double inv
    cdef bint has_w = weight is not None, has_b = bias is not None
    with nogil:
        for c in range(C):
            inv = inv_sqrt(<double>running_var[c] + eps)
            save_mean[c] = running_mean[c]
            save_invstd[c] = <floating>inv
            scale[c] = <floating>((weight[c] if has_w else 1.0) * inv)
            shift[c] = bias[c] if has_b else 0
        apply(OP_AFFINE, &x[0, 0, 0], NULL, &y[0, 0, 0], M, C, K, &running_mean[0], scale,
              shift, NULL, <floating*>mem.ptr, nthreads)


def invstd(floating[::1] var, double eps, floating[::1] out):
    """out = 1/sqrt(var + eps), 0 where var + eps == 0."""
    cdef Py_ssize_t c
    for c in range(var.shape[0]):
        out[c] = <floating>inv_sqrt(<double>var[c] + eps)


# ----------------------------------------------------------------- backward reductions

cdef struct Sums:
    double g      # sum of grad_output
    double gx     # sum of grad_output * (x - mean)


cdef inline Sums run_sums(const floating* g, const floating* x, floating* dx, Py_ssize_t n,
                          floating mean, floating scale) noexcept nogil:
    """Sums over n contiguous values; if dx is not NULL also writes dx = g * scale."""
    cdef floating ag[LANES]
    cdef floating agx[LANES]
    cdef floating gv
    cdef Py_ssize_t i, j, nv = n - n % LANES
    cdef Sums s
    for j in range(LANES):
        ag[j] = 0
        agx[j] = 0
    if dx == NULL:
        for i from 0 <= i < nv by LANES:
            for j in range(LANES):
                ag[j] = ag[j] + g[i + j]
                agx[j] = agx[j] + g[i + j] * (x[i + j] - mean)
    else:
        for i from 0 <= i < nv by LANES:
            for j in range(LANES):
                gv = g[i + j]
                ag[j] = ag[j] + gv
                agx[j] = agx[j] + gv * (x[i + j] - mean)
                dx[i + j] = gv * scale
    s.g = 0.0
    s.gx = 0.0
    for j in range(LANES):
        s.g += ag[j]
        s.gx += agx[j]
    for i in range(nv, n):
        gv = g[i]
        s.g += gv
        s.gx += gv * (x[i] - mean)
        if dx != NULL:
            dx[i] = gv * scale
    return s


cdef Sums planes_item_sums(const floating* g, const floating* x, floating* dx, Planes P,
                           Py_ssize_t item, const floating* mean,
                           const floating* scale) noexcept nogil:
    cdef Py_ssize_t c = item // P.groups, gi = item % P.groups
    cdef Py_ssize_t u0 = gi * P.units // P.groups, u1 = (gi + 1) * P.units // P.groups
    cdef Py_ssize_t u, start, n, off
    cdef Sums acc, s
    acc.g = 0.0
    acc.gx = 0.0
    for u in range(u0, u1):
        start = (u % P.nblk) * P.blen
        n = P.K - start
        if n > P.blen:
            n = P.blen
        off = ((u // P.nblk) * P.C + c) * P.K + start
        s = run_sums(g + off, x + off, dx + off if dx != NULL else NULL, n, mean[c],
                     scale[c] if scale != NULL else 0)
        acc.g += s.g
        acc.gx += s.gx
    return acc


cdef void planes_sums(const floating* g, const floating* x, floating* dx, Planes P,
                      const floating* mean, const floating* scale, Sums* part, Sums* out,
                      int nthreads) noexcept nogil:
    cdef Py_ssize_t it, c, gi
    for it in prange(P.items, num_threads=nthreads, schedule="static"):
        part[it] = planes_item_sums(g, x, dx, P, it, mean, scale)
    for c in range(P.C):
        out[c].g = 0.0
        out[c].gx = 0.0
        for gi in range(P.groups):
            out[c].g += part[c * P.groups + gi].g
            out[c].gx += part[c * P.groups + gi].gx


cdef void rows_block_sums(const floating* g, const floating* x, floating* dx, Py_ssize_t R,
                          Py_ssize_t w, Py_ssize_t C, Py_ssize_t K, const floating* lmean,
                          const floating* lscale, floating* ag, floating* agx,
                          Sums* out) noexcept nogil:
    """Add the per-channel sums of R rows of w values to out[0:C]; dx = g*scale if dx."""
    cdef Py_ssize_t r, t, c, q, kk, reps = w // (C * K)
    cdef const floating* gr
    cdef const floating* xr
    cdef floating* dr
    for t in range(w):
        ag[t] = 0
        agx[t] = 0
    for r in range(R):
        gr = g + r * w
        xr = x + r * w
        for t in range(w):
            ag[t] = ag[t] + gr[t]
            agx[t] = agx[t] + gr[t] * (xr[t] - lmean[t])
        if dx != NULL:
            dr = dx + r * w
            for t in range(w):
                dr[t] = gr[t] * lscale[t]
    t = 0
    for q in range(reps):
        for c in range(C):
            for kk in range(K):
                out[c].g += ag[t]
                out[c].gx += agx[t]
                t += 1


cdef void rows_sums(const floating* g, const floating* x, floating* dx, Py_ssize_t C,
                    Py_ssize_t K, Rows P, const floating* lmean, const floating* lscale,
                    Sums* part, floating* scratch, Sums* out, int nthreads) noexcept nogil:
    """part: items*C slots; scratch: 2*W floating per thread."""
    cdef Py_ssize_t it, b0, b1, blk, r0, nr, c, tid, off
    cdef floating* sc
    cdef Sums* acc
    for it in prange(P.items, num_threads=nthreads, schedule="static"):
        tid = threadid()
        sc = scratch + tid * 2 * P.W
        acc = part + it * C
        for c in range(C):
            acc[c].g = 0.0
            acc[c].gx = 0.0
        b0 = it * P.nblocks // P.items
        b1 = (it + 1) * P.nblocks // P.items
        for blk in range(b0, b1):
            r0 = blk * P.R
            nr = P.nrows - r0
            if nr > P.R:
                nr = P.R
            off = r0 * P.W
            rows_block_sums(g + off, x + off, dx + off if dx != NULL else NULL, nr, P.W,
                            C, K, lmean, lscale, sc, sc + P.W, acc)
    for c in range(C):
        out[c].g = 0.0
        out[c].gx = 0.0
    for it in range(P.items):
        for c in range(C):
            out[c].g += part[it * C + c].g
            out[c].gx += part[it * C + c].gx
    if P.tail:
        off = P.nrows * P.W
        rows_block_sums(g + off, x + off, dx + off if dx != NULL else NULL, 1, P.tail, C, K,
                        lmean, lscale, scratch, scratch + P.W, out)


def backward(floating[:, :, ::1] grad_output, floating[:, :, ::1] x,
             floating[:, :, ::1] grad_input, floating[::1] weight, floating[::1] mean,
             floating[::1] invstd, floating[::1] grad_weight, floating[::1] grad_bias,
             bint training, int nthreads):
    """Backward of batch normalization.

    Training: one pass of per-channel sums, then dx = (dy - k1 - (x - mean) * k2) * scale.
    Eval: one pass that both sums (for grad_weight, grad_bias) and writes dx = dy * scale.
    """
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1], K = x.shape[2], c
    cdef Py_ssize_t isz = sizeof(floating), part_bytes, W = 0
    cdef Planes PP
    cdef Rows PR
    cdef bint planes = K >= PLANE_MIN_K, has_w = weight is not None
    cdef double n = <double>M * K, inv
    if planes:
        PP = planes_partition(M, C, K, BLOCK)
        part_bytes = PP.items * sizeof(Sums)
    else:
        PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS)
        W = PR.W
        part_bytes = PR.items * C * sizeof(Sums) + (nthreads * 2 + 2) * W * isz
    cdef _Scratch mem = _Scratch(part_bytes + apply_scratch_bytes(M, C, K, isz))
    cdef _Scratch vecs = _Scratch(C * (sizeof(Sums) + 4 * isz))
    cdef Sums* sums = <Sums*>vecs.ptr
    cdef floating* scale = <floating*>(sums + C)
    cdef floating* k1 = scale + C
    cdef floating* k2 = k1 + C
    cdef floating* lanes = <floating*>(<char*>mem.ptr + part_bytes)
    cdef floating* lmean
    cdef floating* gx = &grad_input[0, 0, 0]
    cdef floating* dx_fused = NULL if training else gx
    with nogil:
        for c in range(C):
            scale[c] = <floating>((weight[c] if has_w else 1.0) * invstd[c])
        if planes:
            planes_sums(&grad_output[0, 0, 0], &x[0, 0, 0], dx_fused, PP, &mean[0], scale,
                        <Sums*>mem.ptr, sums, nthreads)
        else:
            lmean = <floating*>(<char*>mem.ptr + PR.items * C * sizeof(Sums))
            expand_lanes(&mean[0], lmean, W, C, K)
            expand_lanes(scale, lmean + W, W, C, K)
            rows_sums(&grad_output[0, 0, 0], &x[0, 0, 0], dx_fused, C, K, PR, lmean,
                      lmean + W, <Sums*>mem.ptr, lmean + 2 * W, sums, nthreads)
        for c in range(C):
            inv = invstd[c]
            grad_bias[c] = <floating>sums[c].g
            grad_weight[c] = <floating>(sums[c].gx * inv)
            k1[c] = <floating>(sums[c].g / n)
            k2[c] = <floating>(sums[c].gx / n * inv * inv)
        if training:
            apply(OP_BWD_TRAIN, &x[0, 0, 0], &grad_output[0, 0, 0], gx, M, C, K, &mean[0],
                  scale, k1, k2, lanes, nthreads)
