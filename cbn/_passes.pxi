# Included by _kernels.pyx: the element-wise passes and the backward reductions.

# --------------------------------------------------------------- element-wise passes

cdef enum:
    OP_AFFINE = 0     # y = (x - a) * b + c  (+ q, a residual) (ReLU if relu)
    OP_BWD_TRAIN = 1  # y = (g - c - (x - a) * d) * b, g = grad_output masked by ReLU's
                      # backward where q (the forward output) is given
    OP_STREAM = 2     # flag: store y with non-temporal stores where it can, same values


cdef inline void run_apply(int op, const floating* x, const floating* g, const floating* q,
                           floating* y, Py_ssize_t n, floating a, floating b, floating c,
                           floating d, bint relu) noexcept nogil:
    if op == OP_AFFINE:
        ops(x).run_affine(x, q, y, n, a, b, c, relu)
    elif op == OP_BWD_TRAIN:
        ops(x).run_bwd(x, g, q, y, n, a, b, c, d)
    elif op == OP_AFFINE | OP_STREAM:
        ops(x).run_affine_stream(x, q, y, n, a, b, c, relu)
    else:
        ops(x).run_bwd_stream(x, g, q, y, n, a, b, c, d)


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
    cdef Team T
    cdef int64_t t_item
    cdef Py_ssize_t nch = (K + CHUNK - 1) // CHUNK
    cdef Py_ssize_t clen = (K + nch - 1) // nch
    cdef Py_ssize_t units = M * C * nch
    cdef Py_ssize_t per_item = CHUNK // clen if clen < CHUNK else 1
    cdef Py_ssize_t items = (units + per_item - 1) // per_item
    cdef Py_ssize_t it, u0, u1
    if nthreads == 1:
        planes_apply_units(op, x, g, q, y, C, K, nch, clen, 0, units, pa, pb, pc, pd, relu)
        if op & OP_STREAM:
            cbn_sfence()
        return
    team_begin(&T, nthreads)
    for it in prange(items, num_threads=nthreads, schedule="dynamic"):
        t_item = cbn_now_ns()
        u0 = it * per_item
        u1 = u0 + per_item
        if u1 > units:
            u1 = units
        planes_apply_units(op, x, g, q, y, C, K, nch, clen, u0, u1, pa, pb, pc, pd, relu)
        if op & OP_STREAM:      # each thread orders its own non-temporal stores
            cbn_sfence()
        team_add(&T, threadid(), t_item)
    team_end(&T)


cdef void expand_lanes(const floating* v, floating* lane, Py_ssize_t W, Py_ssize_t C,
                       Py_ssize_t K, Py_ssize_t h=0) noexcept nogil:
    """lane[t] = v[((t + h) // K) % C] for t < W: the lanes of rows that start h values
    into the data (h = 0: at its start). One period (C*K lanes) is filled, the rest
    copied from it."""
    cdef Py_ssize_t t, c = (h // K) % C, kk = h % K, period = C * K
    cdef Py_ssize_t n = W if W < period else period
    for t in range(n):
        lane[t] = v[c]
        kk += 1
        if kk == K:
            kk = 0
            c += 1
            if c == C:
                c = 0
    t = n
    while t < W:
        memcpy(lane + t, lane, (n if W - t > n else W - t) * sizeof(floating))
        t += n


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
    cdef Team T
    cdef int64_t t_item
    cdef Rows P = rows_partition(M, C, K, CHUNK, M, sizeof(floating))
    cdef Py_ssize_t W = P.W, blk, r0, nr, off
    cdef const floating* la = lanes
    cdef const floating* lb = lanes + W
    cdef const floating* lc = lanes + 2 * W
    cdef const floating* ld = lanes + 3 * W
    if nthreads == 1:
        row_apply(op, x, g, q, y, P.nrows, W, la, lb, lc, ld, relu)
    else:
        team_begin(&T, nthreads)
        for blk in prange(P.nblocks, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            r0 = blk * P.R
            nr = P.nrows - r0
            if nr > P.R:
                nr = P.R
            off = r0 * W
            row_apply(op, x + off, g + off if g != NULL else NULL,
                      q + off if q != NULL else NULL, y + off, nr, W, la, lb, lc, ld, relu)
            team_add(&T, threadid(), t_item)
        team_end(&T)
    if P.tail:
        off = P.nrows * W
        row_apply(op, x + off, g + off if g != NULL else NULL,
                  q + off if q != NULL else NULL, y + off, 1, P.tail, la, lb, lc, ld, relu)


cdef inline Py_ssize_t line_head(const floating* y, Py_ssize_t W) noexcept nogil:
    """Values of y before its first cache line where a rows pass over rows of W values
    can store whole lines non-temporally from there (rows_apply_stream), or -1: y not
    aligned to its element size, or rows that are not whole lines."""
    if <size_t>y % sizeof(floating) != 0 or (W * sizeof(floating)) % 64 != 0:
        return -1
    return ((64 - <Py_ssize_t>(<size_t>y % 64)) % 64) // sizeof(floating)


cdef void rows_apply_stream(int op, const floating* x, const floating* g,
                            const floating* q, floating* y, Py_ssize_t M, Py_ssize_t C,
                            Py_ssize_t K, Py_ssize_t W, Py_ssize_t h, const floating* pa,
                            const floating* pb, const floating* pc, const floating* pd,
                            const floating* lanes, bint relu, int nthreads) noexcept nogil:
    """rows_apply with non-temporal stores (outputs larger than the cache): the h values
    before y's first line with ordinary stores, then rows of W values from there (lanes:
    expanded from h on, see expand_lanes), whole lines streamed, then the rest with
    ordinary stores. The same values as rows_apply."""
    cdef Team T
    cdef int64_t t_item
    cdef floating hl[64]            # the head's lanes: 4 x at most 16 values
    cdef Py_ssize_t total = M * C * K, n, nrows, tail, R, nblocks, blk, r0, nr, off
    cdef const floating* la = lanes
    cdef const floating* lb = lanes + W
    cdef const floating* lc = lanes + 2 * W
    cdef const floating* ld = lanes + 3 * W
    op = op & ~OP_STREAM
    if h > total:
        h = total
    if h > 0:
        expand_lanes(pa, hl, h, C, K)
        expand_lanes(pb, hl + 16, h, C, K)
        expand_lanes(pc, hl + 32, h, C, K)
        if pd != NULL:
            expand_lanes(pd, hl + 48, h, C, K)
        row_apply(op, x, g, q, y, 1, h, hl, hl + 16, hl + 32, hl + 48, relu)
    x = x + h
    g = g + h if g != NULL else NULL
    q = q + h if q != NULL else NULL
    y = y + h
    n = total - h
    nrows = n // W
    tail = n % W
    R = CHUNK // W if CHUNK // W > ROW_MIN_ROWS else ROW_MIN_ROWS
    nblocks = (nrows + R - 1) // R
    if nthreads == 1:
        ops(x).rows_stream(op, x, g, q, y, nrows, W, la, lb, lc, ld, relu)
    else:
        team_begin(&T, nthreads)
        for blk in prange(nblocks, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            r0 = blk * R
            nr = nrows - r0
            if nr > R:
                nr = R
            off = r0 * W
            ops(x).rows_stream(op, x + off, g + off if g != NULL else NULL,
                               q + off if q != NULL else NULL, y + off, nr, W, la, lb,
                               lc, ld, relu)
            cbn_sfence()        # each thread orders its own non-temporal stores
            team_add(&T, threadid(), t_item)
        team_end(&T)
    if tail:
        off = nrows * W
        row_apply(op, x + off, g + off if g != NULL else NULL,
                  q + off if q != NULL else NULL, y + off, 1, tail, la, lb, lc, ld, relu)
    cbn_sfence()


cdef Py_ssize_t apply_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                    Py_ssize_t itemsize) noexcept nogil:
    if K >= PLANE_MIN_K:
        return 0
    return 4 * rows_partition(M, C, K, CHUNK, M, itemsize).W * itemsize


cdef void apply(int op, const floating* x, const floating* g, const floating* q,
                floating* y, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, const floating* pa,
                const floating* pb, const floating* pc, const floating* pd, floating* lanes,
                bint relu, int nthreads) noexcept nogil:
    """Dispatch an element-wise pass to the planes or rows kernel (OP_STREAM: stored
    non-temporally where the rows allow it, see line_head)."""
    cdef Py_ssize_t W, h
    if K >= PLANE_MIN_K:
        planes_apply(op, x, g, q, y, M, C, K, pa, pb, pc, pd, relu, nthreads)
        return
    W = rows_partition(M, C, K, CHUNK, M, sizeof(floating)).W
    h = line_head(y, W) if op & OP_STREAM else -1      # -1: ordinary stores
    expand_lanes(pa, lanes, W, C, K, h if h > 0 else 0)
    expand_lanes(pb, lanes + W, W, C, K, h if h > 0 else 0)
    expand_lanes(pc, lanes + 2 * W, W, C, K, h if h > 0 else 0)
    if pd != NULL:
        expand_lanes(pd, lanes + 3 * W, W, C, K, h if h > 0 else 0)
    if h >= 0:
        rows_apply_stream(op, x, g, q, y, M, C, K, W, h, pa, pb, pc, pd, lanes, relu,
                          nthreads)
    else:
        rows_apply(op & ~OP_STREAM, x, g, q, y, M, C, K, lanes, relu, nthreads)


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
                         scale[c], &sg, &sgx, P.pf)
        acc[c].g += sg
        acc[c].gx += sgx


cdef void planes_sums(const floating* g, const floating* x, const floating* ym, floating* dx,
                      floating* gr, Planes P, const floating* mean, const floating* scale,
                      Sums* part, Sums* out, int nthreads) noexcept nogil:
    """part: items*C slots (each item writes those of its channels only)."""
    cdef Team T
    cdef int64_t t_item
    cdef Py_ssize_t it, c, c0, nc, j
    if nthreads == 1:
        for it in range(P.items):
            planes_item_sums(g, x, ym, dx, gr, P, it, mean, scale, part + it * P.C)
    else:
        team_begin(&T, nthreads)
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            planes_item_sums(g, x, ym, dx, gr, P, it, mean, scale, part + it * P.C)
            team_add(&T, threadid(), t_item)
        team_end(&T)
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
    cdef Team T
    cdef int64_t t_item
    cdef Py_ssize_t it, c, tid, off
    if nthreads == 1:
        for it in range(P.items):
            rows_item_sums(g, x, ym, dx, gr, C, K, P, it, lmean, lscale, part + it * C,
                           scratch)
    else:
        team_begin(&T, nthreads)
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            tid = threadid()
            rows_item_sums(g, x, ym, dx, gr, C, K, P, it, lmean, lscale, part + it * C,
                           scratch + tid * 2 * P.W)
            team_add(&T, threadid(), t_item)
        team_end(&T)
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
