# Included by _kernels.pyx after _moments.pxi: the element-wise passes, the backward
# reductions and the backward's per-channel finish.

# --------------------------------------------------------------- element-wise passes

cdef enum:
    OP_AFFINE = 0     # y = act((x - mean) * scale + shift (+ res))
    OP_BWD_TRAIN = 1  # y = (g - gmean - (x - mean) * xcoef) * scale, g = grad_output
                      # times the activation's derivative (at ym, or at the pre-activation
                      # (x - mean) * scale + shift (+ res))
    OP_STREAM = 2     # flag: store y with non-temporal stores where it can, same values


cdef struct Pass:
    # One element-wise pass: its arrays (the (M, C, K) data, NULL where absent) and its
    # per-channel parameters (C values of the data's dtype each), named for what they are.
    int op                  # OP_AFFINE or OP_BWD_TRAIN, | OP_STREAM
    int act                 # cbn_act_kind
    double slope            # negative_slope
    const void* x
    const void* g           # OP_BWD_TRAIN: grad_output
    const void* ym          # OP_BWD_TRAIN: the forward's output (relu, relu6, leaky_relu)
    const void* res         # the residual (the forward's, for the backward's silu and
                            # hardswish)
    void* y
    const void* mean
    const void* scale       # OP_BWD_TRAIN: weight * invstd
    const void* shift       # the bias (OP_BWD_TRAIN: silu and hardswish only; NULL: 0)
    const void* gmean       # OP_BWD_TRAIN: sum(g) / n
    const void* xcoef       # OP_BWD_TRAIN: invstd^2 * sum(g * (x - mean)) / n


cdef struct Dact:
    # What the backward reductions need to multiply dy by the activation's derivative.
    int act                 # cbn_act_kind
    double slope
    const void* ym          # the forward's output (relu, relu6, leaky_relu), or NULL
    const void* res         # the forward's residual (silu, hardswish), or NULL
    const void* shift       # C values: the bias (silu, hardswish), or NULL (zeros)


cdef inline const storage* shifted(const storage* p, Py_ssize_t off) noexcept nogil:
    return p + off if p != NULL else NULL


cdef inline double cparam(const void* v, Py_ssize_t c, const storage* tag) noexcept nogil:
    """Value c of a per-channel vector of the compute dtype of storage's arrays."""
    if storage is double:
        return (<const double*>v)[c]
    else:
        return (<const float*>v)[c]


cdef inline Pass affine_pass(int op, const cbn_act* act, const void* x, const void* res,
                             void* y, const void* mean, const void* scale,
                             const void* shift) noexcept nogil:
    """The output pass y = act((x - mean) * scale + shift (+ res)) (op: OP_AFFINE, or
    with OP_STREAM)."""
    cdef Pass p
    memset(&p, 0, sizeof(Pass))
    p.op = op
    p.act = act.kind
    p.slope = act.negative_slope
    p.x = x
    p.res = res
    p.y = y
    p.mean = mean
    p.scale = scale
    p.shift = shift
    return p


cdef inline Pass bwd_pass(int op, const cbn_act* act, const void* x, const void* g,
                          const void* ym, const void* res, void* y, const void* mean,
                          const void* scale, const void* shift, const void* gmean,
                          const void* xcoef) noexcept nogil:
    """The training backward's element pass (op: OP_BWD_TRAIN, or with OP_STREAM)."""
    cdef Pass p
    p.op = op
    p.act = act.kind
    p.slope = act.negative_slope
    p.x = x
    p.g = g
    p.ym = ym
    p.res = res
    p.y = y
    p.mean = mean
    p.scale = scale
    p.shift = shift
    p.gmean = gmean
    p.xcoef = xcoef
    return p


cdef inline Dact make_dact(const cbn_act* act, const void* ym, const void* res,
                           const void* shift) noexcept nogil:
    cdef Dact da
    da.act = act.kind
    da.slope = act.negative_slope
    da.ym = ym
    da.res = res
    da.shift = shift
    return da


cdef inline void run_pass(const Pass* p, Py_ssize_t off, Py_ssize_t n, Py_ssize_t c,
                          const storage* tag) noexcept nogil:
    """The pass over n values of channel c from offset off (planes; tag: the storage
    dtype). Without streaming, runs_affine / runs_bwd over one run (the parameters read
    from the per-channel arrays there)."""
    cdef const storage* x = <const storage*>p.x + off
    cdef storage* y = <storage*>p.y + off
    cdef const storage* res = shifted(<const storage*>p.res, off)
    cdef size_t at = c * compute_size(tag)
    cdef const void* shp = <const char*>p.shift + at if p.shift != NULL else NULL
    cdef double mean, scale, shift
    if p.op == OP_AFFINE:
        ops(x).runs_affine(x, res, y, 1, n, <const char*>p.mean + at,
                           <const char*>p.scale + at, shp, p.act, p.slope)
        return
    if p.op == OP_BWD_TRAIN:
        ops(x).runs_bwd(x, <const storage*>p.g + off, shifted(<const storage*>p.ym, off),
                        res, y, 1, n, <const char*>p.mean + at, <const char*>p.scale + at,
                        shp, <const char*>p.gmean + at, <const char*>p.xcoef + at, p.act,
                        p.slope)
        return
    mean = cparam(p.mean, c, x)
    scale = cparam(p.scale, c, x)
    shift = cparam(p.shift, c, x) if p.shift != NULL else 0.0
    if p.op == OP_AFFINE | OP_STREAM:
        ops(x).run_affine_stream(x, res, y, n, mean, scale, shift, p.act, p.slope)
    else:
        ops(x).run_bwd_stream(x, <const storage*>p.g + off,
                              shifted(<const storage*>p.ym, off), res, y, n, mean, scale,
                              shift, cparam(p.gmean, c, x), cparam(p.xcoef, c, x), p.act,
                              p.slope)


cdef void planes_apply_units(const Pass* p, Py_ssize_t C, Py_ssize_t K, Py_ssize_t nch,
                             Py_ssize_t clen, Py_ssize_t u0, Py_ssize_t u1,
                             const storage* tag) noexcept nogil:
    """Units u0..u1 of planes_apply: unit u is chunk u % nch of plane u // nch. Whole
    planes of the passes without streaming go to runs_affine and runs_bwd, a batch
    entry's consecutive channels at a time (one call, not one a plane)."""
    cdef Py_ssize_t u, plane, start, n, c
    cdef size_t sz = compute_size(tag)
    cdef const storage* x
    cdef const void* shift
    if nch == 1 and (p.op == OP_AFFINE or p.op == OP_BWD_TRAIN):
        u = u0
        while u < u1:
            c = u % C
            n = C - c                   # the planes up to the batch entry's last channel
            if n > u1 - u:
                n = u1 - u
            x = <const storage*>p.x + u * K
            shift = <const char*>p.shift + c * sz if p.shift != NULL else NULL
            if p.op == OP_AFFINE:
                ops(x).runs_affine(x, shifted(<const storage*>p.res, u * K),
                                   <storage*>p.y + u * K, n, K, <const char*>p.mean + c * sz,
                                   <const char*>p.scale + c * sz, shift, p.act, p.slope)
            else:
                ops(x).runs_bwd(x, <const storage*>p.g + u * K,
                                shifted(<const storage*>p.ym, u * K),
                                shifted(<const storage*>p.res, u * K), <storage*>p.y + u * K,
                                n, K, <const char*>p.mean + c * sz,
                                <const char*>p.scale + c * sz, shift,
                                <const char*>p.gmean + c * sz, <const char*>p.xcoef + c * sz,
                                p.act, p.slope)
            u += n
        return
    for u in range(u0, u1):
        plane = u // nch
        start = (u % nch) * clen
        n = K - start
        if n > clen:
            n = clen
        run_pass(p, plane * K + start, n, plane % C, tag)


# The element-wise passes (planes_apply, rows_apply, rows_apply_stream) split their items
# statically: each thread takes the same contiguous share on every call, so data that a
# thread read and wrote in the previous call is still in its own core's cache (a dynamic
# schedule hands the items out anew each time and moves the lines between cores: 2
# threads on 64x1024 float16 eval cost 17 us against 10 us on one; static: 11 us). Each
# element's result does not depend on the thread that computes it. A contended core is
# the adaptive team's business (cbn_team.h), which sends such calls to one thread.
cdef void planes_apply(const Pass* p, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                       int nthreads, const storage* tag) noexcept nogil:
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
        planes_apply_units(p, C, K, nch, clen, 0, units, tag)
        if p.op & OP_STREAM:
            cbn_sfence()
        return
    team_begin(&T, nthreads)
    for it in prange(items, num_threads=nthreads, schedule="static"):
        t_item = cbn_now_ns()
        u0 = it * per_item
        u1 = u0 + per_item
        if u1 > units:
            u1 = units
        planes_apply_units(p, C, K, nch, clen, u0, u1, tag)
        if p.op & OP_STREAM:    # each thread orders its own non-temporal stores
            cbn_sfence()
        team_add(&T, threadid(), t_item)
    team_end(&T)


cdef enum:
    LANE_ARRAYS = 5       # the rows passes' lane parameters: mean, scale, shift, gmean,
                          # xcoef, W values each, back to back


cdef inline void row_pass(const Pass* p, int op, Py_ssize_t off, Py_ssize_t R, Py_ssize_t w,
                          const floating* lanes, Py_ssize_t W,
                          const storage* tag) noexcept nogil:
    """The pass over R rows of w values from offset off (rows; lanes: the LANE_ARRAYS lane
    parameters, W apart; op: p.op, or without OP_STREAM; tag: the storage dtype)."""
    cdef const storage* x = <const storage*>p.x + off
    cdef storage* y = <storage*>p.y + off
    cdef const storage* res = shifted(<const storage*>p.res, off)
    if op == OP_AFFINE:
        ops(x).cols_affine(x, res, y, R, w, lanes, lanes + W, lanes + 2 * W, p.act,
                           p.slope)
    elif op == OP_AFFINE | OP_STREAM:
        ops(x).rows_affine_stream(x, res, y, R, w, lanes, lanes + W, lanes + 2 * W, p.act,
                                  p.slope)
    elif op == OP_BWD_TRAIN:
        ops(x).cols_bwd(x, <const storage*>p.g + off, shifted(<const storage*>p.ym, off),
                        res, y, R, w, lanes, lanes + W, lanes + 2 * W, lanes + 3 * W,
                        lanes + 4 * W, p.act, p.slope)
    else:
        ops(x).rows_bwd_stream(x, <const storage*>p.g + off,
                               shifted(<const storage*>p.ym, off), res, y, R, w, lanes,
                               lanes + W, lanes + 2 * W, lanes + 3 * W, lanes + 4 * W,
                               p.act, p.slope)


cdef void rows_apply(const Pass* p, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                     const floating* lanes, int nthreads, const storage* tag) noexcept nogil:
    """Element-wise pass over the rows partition; lanes holds the lane parameters expanded
    to W lanes each, back to back (see expand_pass_lanes)."""
    cdef Team T
    cdef int64_t t_item
    cdef Rows P = rows_partition(M, C, K, CHUNK, M, sizeof(floating))
    cdef Py_ssize_t W = P.W, blk, r0, nr
    if nthreads == 1:
        row_pass(p, p.op, 0, P.nrows, W, lanes, W, tag)
    else:
        team_begin(&T, nthreads)
        for blk in prange(P.nblocks, num_threads=nthreads, schedule="static"):
            t_item = cbn_now_ns()
            r0 = blk * P.R
            nr = P.nrows - r0
            if nr > P.R:
                nr = P.R
            row_pass(p, p.op, r0 * W, nr, W, lanes, W, tag)
            team_add(&T, threadid(), t_item)
        team_end(&T)
    if P.tail:
        row_pass(p, p.op, P.nrows * W, 1, P.tail, lanes, W, tag)


cdef inline Py_ssize_t line_head(const storage* y, Py_ssize_t W) noexcept nogil:
    """Values of y before its first cache line where a rows pass over rows of W values
    can store whole lines non-temporally from there (rows_apply_stream), or -1: y not
    aligned to its element size, or rows that are not whole lines."""
    if <size_t>y % sizeof(storage) != 0 or (W * sizeof(storage)) % 64 != 0:
        return -1
    return ((64 - <Py_ssize_t>(<size_t>y % 64)) % 64) // sizeof(storage)


cdef void rows_apply_stream(const Pass* p, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                            Py_ssize_t W, Py_ssize_t h, const floating* lanes,
                            int nthreads, const storage* tag) noexcept nogil:
    """rows_apply with non-temporal stores (outputs larger than the cache): the h values
    before y's first line with ordinary stores, then rows of W values from there (lanes:
    expanded from h on, see expand_lanes), whole lines streamed, then the rest with
    ordinary stores. The same values as rows_apply."""
    cdef Team T
    cdef int64_t t_item
    cdef floating hl[5 * 32]        # the head's lanes: LANE_ARRAYS x at most 32 values
                                    # (a line of float16 values)
    cdef Py_ssize_t total = M * C * K, n, nrows, tail, R, nblocks, blk, r0, nr
    cdef int op = p.op & ~OP_STREAM
    if h > total:
        h = total
    if h > 0:
        expand_pass_lanes(p, hl, 32, h, C, K, 0, lanes)
        row_pass(p, op, 0, 1, h, hl, 32, tag)
    n = total - h
    nrows = n // W
    tail = n % W
    R = CHUNK // W if CHUNK // W > ROW_MIN_ROWS else ROW_MIN_ROWS
    nblocks = (nrows + R - 1) // R
    if nthreads == 1:
        row_pass(p, op | OP_STREAM, h, nrows, W, lanes, W, tag)
    else:
        team_begin(&T, nthreads)
        for blk in prange(nblocks, num_threads=nthreads, schedule="static"):
            t_item = cbn_now_ns()
            r0 = blk * R
            nr = nrows - r0
            if nr > R:
                nr = R
            row_pass(p, op | OP_STREAM, h + r0 * W, nr, W, lanes, W, tag)
            cbn_sfence()        # each thread orders its own non-temporal stores
            team_add(&T, threadid(), t_item)
        team_end(&T)
    if tail:
        row_pass(p, op, h + nrows * W, 1, tail, lanes, W, tag)
    cbn_sfence()


cdef Py_ssize_t apply_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                    Py_ssize_t itemsize) noexcept nogil:
    if K >= PLANE_MIN_K:
        return 0
    return LANE_ARRAYS * rows_partition(M, C, K, CHUNK, M, itemsize).W * itemsize


cdef void expand_pass_lanes(const Pass* p, floating* lanes, Py_ssize_t stride,
                            Py_ssize_t W, Py_ssize_t C, Py_ssize_t K, Py_ssize_t h,
                            const floating* tag) noexcept nogil:
    """The pass's lane parameters (those it reads) expanded to W lanes from h on, stride
    apart: mean, scale, shift (zeros where NULL), gmean, xcoef."""
    cdef Py_ssize_t t
    expand_lanes(<const floating*>p.mean, lanes, W, C, K, h)
    expand_lanes(<const floating*>p.scale, lanes + stride, W, C, K, h)
    if p.op & ~OP_STREAM == OP_AFFINE or cbn_act_needs_z(p.act):
        if p.shift != NULL:
            expand_lanes(<const floating*>p.shift, lanes + 2 * stride, W, C, K, h)
        else:
            for t in range(W):
                lanes[2 * stride + t] = 0
    if p.op & ~OP_STREAM == OP_BWD_TRAIN:
        expand_lanes(<const floating*>p.gmean, lanes + 3 * stride, W, C, K, h)
        expand_lanes(<const floating*>p.xcoef, lanes + 4 * stride, W, C, K, h)


cdef void apply(const Pass* p, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, floating* lanes,
                int nthreads, const storage* tag) noexcept nogil:
    """Run an element-wise pass on the planes or rows kernel (OP_STREAM: stored
    non-temporally where the rows allow it, see line_head); lanes: apply_scratch_bytes of
    scratch (rows)."""
    cdef Py_ssize_t W, h
    if K >= PLANE_MIN_K:
        planes_apply(p, M, C, K, nthreads, tag)
        return
    W = rows_partition(M, C, K, CHUNK, M, sizeof(floating)).W
    h = line_head(<storage*>p.y, W) if p.op & OP_STREAM else -1    # -1: ordinary stores
    expand_pass_lanes(p, lanes, W, W, C, K, h if h > 0 else 0, lanes)
    if h >= 0:
        rows_apply_stream(p, M, C, K, W, h, lanes, nthreads, tag)
    else:
        rows_apply(p, M, C, K, lanes, nthreads, tag)


# ----------------------------------------------------------------- backward reductions

cdef struct Sums:
    double g      # sum of grad_output
    double gx     # sum of grad_output * (x - mean)


cdef inline void zero_sums(Sums* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        s[i].g = 0.0
        s[i].gx = 0.0


cdef void planes_item_sums(const storage* g, const storage* x, const Dact* da,
                           storage* dx, storage* gr, Planes P, Py_ssize_t item,
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
        ops(g).runs_sums(g + off, x + off, shifted(<const storage*>da.ym, off),
                         shifted(<const storage*>da.res, off), <storage*>shifted(dx, off),
                         <storage*>shifted(gr, off), nruns, n, P.C * P.K, mean[c],
                         scale[c], (<const floating*>da.shift)[c] if da.shift != NULL else 0,
                         da.act, da.slope, &sg, &sgx, P.pf)
        acc[c].g += sg
        acc[c].gx += sgx


cdef void planes_sums(const storage* g, const storage* x, const Dact* da, storage* dx,
                      storage* gr, Planes P, const floating* mean, const floating* scale,
                      Sums* part, Sums* out, int nthreads) noexcept nogil:
    """part: items*C slots (each item writes those of its channels only)."""
    cdef Team T
    cdef int64_t t_item
    cdef Py_ssize_t it, c, c0, nc, j
    if nthreads == 1:
        for it in range(P.items):
            planes_item_sums(g, x, da, dx, gr, P, it, mean, scale, part + it * P.C)
    else:
        team_begin(&T, nthreads)
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            planes_item_sums(g, x, da, dx, gr, P, it, mean, scale, part + it * P.C)
            team_add(&T, threadid(), t_item)
        team_end(&T)
    zero_sums(out, P.C)
    for it in range(P.items):
        planes_item_span(P, it, &c0, &nc)
        for j in range(nc):
            c = (c0 + j) % P.C
            out[c].g += part[it * P.C + c].g
            out[c].gx += part[it * P.C + c].gx


cdef void rows_block_sums(const storage* g, const storage* x, const Dact* da,
                          Py_ssize_t off, storage* dx, storage* gr, Py_ssize_t R,
                          Py_ssize_t w, Py_ssize_t C, Py_ssize_t K, const floating* lmean,
                          const floating* lscale, const floating* lshift, floating* ag,
                          floating* agx, Sums* out) noexcept nogil:
    """Add the per-channel sums of R rows of w values from offset off to out[0:C] (see
    cbn_cols_sums)."""
    cdef Py_ssize_t t, c, q, kk, reps = w // (C * K)
    ops(g).cols_sums(g + off, x + off, shifted(<const storage*>da.ym, off),
                     shifted(<const storage*>da.res, off), <storage*>shifted(dx, off),
                     <storage*>shifted(gr, off), R, w, lmean, lscale, lshift, da.act,
                     da.slope, ag, agx)
    t = 0
    for q in range(reps):
        for c in range(C):
            for kk in range(K):
                out[c].g += ag[t]
                out[c].gx += agx[t]
                t += 1


cdef void rows_item_sums(const storage* g, const storage* x, const Dact* da, storage* dx,
                         storage* gr, Py_ssize_t C, Py_ssize_t K, Rows P, Py_ssize_t it,
                         const floating* lanes, Sums* acc, floating* sc) noexcept nogil:
    """Sums of one item's blocks into acc[0:C]; lanes: mean, scale, shift (W each);
    scratch sc: 2*W."""
    cdef Py_ssize_t blk, r0, nr
    zero_sums(acc, C)
    for blk in range(it * P.nblocks // P.items, (it + 1) * P.nblocks // P.items):
        r0 = blk * P.R
        nr = P.nrows - r0
        if nr > P.R:
            nr = P.R
        rows_block_sums(g, x, da, r0 * P.W, dx, gr, nr, P.W, C, K, lanes, lanes + P.W,
                        lanes + 2 * P.W, sc, sc + P.W, acc)


cdef void rows_sums(const storage* g, const storage* x, const Dact* da, storage* dx,
                    storage* gr, Py_ssize_t C, Py_ssize_t K, Rows P, const floating* lanes,
                    Sums* part, floating* scratch, Sums* out, int nthreads) noexcept nogil:
    """part: items*C slots; lanes: mean, scale, shift (W each); scratch: 2*W floating per
    thread."""
    cdef Team T
    cdef int64_t t_item
    cdef Py_ssize_t it, c, tid
    if nthreads == 1:
        for it in range(P.items):
            rows_item_sums(g, x, da, dx, gr, C, K, P, it, lanes, part + it * C, scratch)
    else:
        team_begin(&T, nthreads)
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            t_item = cbn_now_ns()
            tid = threadid()
            rows_item_sums(g, x, da, dx, gr, C, K, P, it, lanes, part + it * C,
                           scratch + tid * 2 * P.W)
            team_add(&T, threadid(), t_item)
        team_end(&T)
    zero_sums(out, C)
    for it in range(P.items):
        for c in range(C):
            out[c].g += part[it * C + c].g
            out[c].gx += part[it * C + c].gx
    if P.tail:
        rows_block_sums(g, x, da, P.nrows * P.W, dx, gr, 1, P.tail, C, K, lanes,
                        lanes + P.W, lanes + 2 * P.W, scratch, scratch + P.W, out)


cdef void stage_backward_finish(const Sums* sums, const floating* invstd, double n,
                                floating* grad_weight, floating* grad_bias, floating* k1,
                                floating* k2, Py_ssize_t C) noexcept nogil:
    """grad_bias = sum g, grad_weight = sum g * (x - mean) * invstd (either may be NULL);
    the training backward's k1 = sum g / n and k2 = invstd^2 * sum g * (x - mean) / n
    (if not NULL), with n values per channel."""
    cdef Py_ssize_t c
    cdef double inv
    for c in range(C):
        inv = invstd[c]
        if grad_bias != NULL:
            grad_bias[c] = <floating>sums[c].g
        if grad_weight != NULL:
            grad_weight[c] = <floating>(sums[c].gx * inv)
        if k1 != NULL:
            k1[c] = <floating>(sums[c].g / n)
            k2[c] = <floating>(sums[c].gx / n * inv * inv)
