# Included by _kernels.pyx after _partitions.pxi: the moments loops (per-channel
# statistics) on planes and rows, and the finish of the per-channel parameters.

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


cdef void planes_item_moments(const storage* x, Planes P, Py_ssize_t item,
                              Moments* acc) noexcept nogil:
    """Merge the moments of one item's units into its slots of acc[0:C], per channel."""
    cdef Py_ssize_t u0 = item * P.units // P.items, u1 = (item + 1) * P.units // P.items
    cdef Py_ssize_t u, off, c, nruns, n, c0, nc, j
    cdef Moments m
    planes_item_span(P, item, &c0, &nc)
    for j in range(nc):
        zero_moments(&acc[(c0 + j) % P.C], 1)
    for u in range(u0, u1):
        off = planes_unit(P, u, &c, &nruns, &n)
        m.n = <double>nruns * n
        ops(x).runs_moments(x + off, nruns, n, P.C * P.K, &m.mean, &m.m2, P.pf, NULL)
        merge(&acc[c], m)


cdef void planes_moments(const storage* x, Planes P, Moments* part, Moments* out,
                         int nthreads) noexcept nogil:
    """part: items*C slots (each item writes those of its channels only)."""
    cdef Team T
    cdef int64_t t_item
    cdef Py_ssize_t it, c, c0, nc, j
    if nthreads == 1:           # no OpenMP region at all: it costs more than tiny inputs
        for it in range(P.items):
            planes_item_moments(x, P, it, part + it * P.C)
    else:
        team_begin(&T, nthreads)
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            planes_item_moments(x, P, it, part + it * P.C)
            team_add(&T, threadid(), t_item)
        team_end(&T)
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


cdef void rows_channel_dev(const storage* p, Py_ssize_t R, Py_ssize_t w, Py_ssize_t C,
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
                d = <floating>load1(p + r * w + t) - m
                a += d
                b += d * d
            s1[0] += a
            s2[0] += b


cdef double rows_block_moments(const storage* p, Py_ssize_t R, Py_ssize_t w, Py_ssize_t C,
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
    cdef floating* lane0 = lane
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
        if storage is cbn_f16 or storage is cbn_bf16:
            for c in range(w):  # the first row in the compute dtype (lane: free here)
                lane[c] = <floating>load1(p + c)
            ops(p).cols_shifted_sums(p, r0, w, lane, acc, acc2)
        else:
            ops(p).cols_shifted_sums(p, r0, w, p, acc, acc2)
            lane = <floating*><const void*>p
        zero(bmean, C)
        zero(bm2, C)
        fold_lanes(acc, bmean, reps, C, K)
        fold_lanes(lane, bm2, reps, C, K)
        lane = lane0
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


cdef void rows_item_moments(const storage* x, Py_ssize_t C, Py_ssize_t K, Rows P,
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


cdef void rows_moments(const storage* x, Py_ssize_t C, Py_ssize_t K, Rows P,
                       double* part, floating* scratch, double* dscratch, Moments* out,
                       int nthreads) noexcept nogil:
    """Per-channel moments over the rows partition. part: items*(2C+1) doubles (count,
    means, m2s of each item); scratch: 3*W floating and dscratch: 2*C doubles per thread."""
    cdef Team T
    cdef int64_t t_item
    cdef Py_ssize_t it, c, tid, stride = 2 * C + 1
    cdef double* acc
    cdef double cnt, n
    if nthreads == 1:
        for it in range(P.items):
            rows_item_moments(x, C, K, P, it, part + it * stride, scratch, dscratch)
    else:
        team_begin(&T, nthreads)
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            tid = threadid()
            rows_item_moments(x, C, K, P, it, part + it * stride,
                              scratch + tid * 3 * P.W, dscratch + tid * 2 * C)
            team_add(&T, threadid(), t_item)
        team_end(&T)
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


cdef inline Py_ssize_t lanes_bytes(Py_ssize_t n) noexcept nogil:
    """n rounded up to a multiple of a cache line (64 bytes): what follows in the scratch
    (itself aligned to a line unless small, see alloc) starts on a line. The doubles that follow must
    be aligned (float32 lanes of an odd width would leave them misaligned; UBSan saw it),
    and lane arrays off a line split every 64-byte vector load in two."""
    return (n + 63) // 64 * 64


cdef inline Py_ssize_t rows_part_bytes(Rows P, Py_ssize_t C) noexcept nogil:
    """Item partials of rows_moments: (count, C means, C m2s) per item, at least one;
    rounded up to a cache line (the lanes that follow start on one)."""
    return lanes_bytes((P.items if P.items > 0 else 1) * (2 * C + 1) * sizeof(double))


# ------------------------------------------------- finish: per-channel parameters

cdef void stage_finish(const Moments* mom, Py_ssize_t C, double n, const floating* weight,
                       const floating* bias, floating* running_mean, floating* running_var,
                       double momentum, double eps, floating* save_mean,
                       floating* save_invstd, floating* scale,
                       floating* shift) noexcept nogil:
    """From n values per channel: save_mean = mean, save_invstd = 1/sqrt(M2/n + eps),
    scale = weight * invstd (from the double invstd), shift = bias; running statistics
    (if not NULL) <- momentum * batch + (1 - momentum) * running, with the unbiased
    variance M2/(n - 1)."""
    cdef Py_ssize_t c
    cdef double inv
    for c in range(C):
        inv = inv_sqrt(mom[c].m2 / n + eps)
        save_mean[c] = <floating>mom[c].mean
        save_invstd[c] = <floating>inv
        scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * inv)
        shift[c] = bias[c] if bias != NULL else 0
        if running_mean != NULL:
            running_mean[c] = <floating>(momentum * mom[c].mean
                                         + (1.0 - momentum) * running_mean[c])
        if running_var != NULL:
            running_var[c] = <floating>(momentum * (mom[c].m2 / (n - 1.0))
                                        + (1.0 - momentum) * running_var[c])


cdef void stage_eval_params(const floating* weight, const floating* bias,
                            const floating* running_var, double eps, floating* save_invstd,
                            floating* scale, floating* shift, Py_ssize_t C) noexcept nogil:
    """finish for the eval forward: invstd = 1/sqrt(running_var + eps) (0 where that is
    0), scale = weight * invstd, shift = bias."""
    cdef Py_ssize_t c
    cdef double inv
    for c in range(C):
        inv = inv_sqrt(<double>running_var[c] + eps)
        save_invstd[c] = <floating>inv
        scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * inv)
        shift[c] = bias[c] if bias != NULL else 0
