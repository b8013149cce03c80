# Included by _kernels.pyx: the stages, and the core's GIL-free entries over a descriptor.
#
# Every operation is a composition of five stages, each callable on its own (cbn/_stages.py
# exposes them to Python; SyncBatchNorm puts a collective between them, PreciseBN merges
# the first over many batches):
#
#   moments            per-channel (count, mean, M2) in double, mergeable (Chan et al.)
#   finish             save_mean, save_invstd, the output pass's scale and shift, and the
#                      running-statistics update, from merged moments
#   normalize          y = act((x - mean) * scale + shift + residual): the output pass
#   backward_reduce    per-channel sum(dy) and sum(dy * (x - mean)) in double (eval: with
#                      dx = dy * scale written in the same pass)
#   backward_elements  dx = (dy - k1 - (x - mean) * k2) * scale, the training backward
#
# The entries (cbn_forward, cbn_normalize, cbn_eval_params, cbn_backward, cbn_moments,
# cbn_finish, cbn_backward_reduce, cbn_backward_elements) take a cbn_desc and the
# operation's cbn_*_args (cbn/include/cbn_core.h), return a cbn_status and write a message on
# an error: no exception, no Python object, no GIL. All of them go through run(), the one
# dtype dispatch of a call; below it every function is typed (`floating`). The def layer
# (_defs.pxi) and the plain fast path (_plain.pxi) fill the structs and call the entries;
# so will the C ABI.

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** p, size_t alignment, size_t size)

cdef extern from "stdio.h" nogil:
    int snprintf(char* s, size_t n, const char* fmt, ...)

cdef enum:
    ALIGNED_MIN = 1024    # scratch of at least this many bytes is aligned to a line (the
                          # rows kernels' wide lanes: more than 512 bytes each)


# ------------------------------------------------------------------- scratch, errors

cdef void* alloc(Py_ssize_t nbytes) noexcept nogil:
    """Scratch memory aligned to a cache line (64 bytes), released with free(); NULL if
    there is none. The alignment matters: the rows kernels read their lane parameters (the
    scratch) with each 64-byte vector, and from malloc's 16-byte alignment every such load
    spans two lines (channels-last eval of 64x128x28x28 float64 took 1.43 copies of the
    array instead of 0.97). Below ALIGNED_MIN bytes, plain malloc (16-byte aligned):
    posix_memalign costs about 0.1 us more per call, a tenth of the smallest calls, whose
    lanes are short and read once per block."""
    cdef void* p = NULL
    if nbytes < ALIGNED_MIN:
        p = malloc(nbytes if nbytes > 0 else 1)
    elif posix_memalign(&p, 64, nbytes) != 0:
        p = NULL
    return p


cdef int fail(const cbn_desc* d, int status, const char* what) noexcept nogil:
    """Write `what` into the descriptor's message buffer (if any); returns status."""
    if d.msg != NULL and d.msg_size > 0:
        snprintf(d.msg, <size_t>d.msg_size, "%s", what)
    return status


cdef char* take(const cbn_desc* d, Py_ssize_t nbytes) noexcept nogil:
    """nbytes of scratch: the descriptor's own if it has that many, else allocated (NULL,
    with the message written, if that fails). Released with give()."""
    cdef char* p
    if d.scratch != NULL and d.scratch_bytes >= nbytes:
        return <char*>d.scratch
    p = <char*>alloc(nbytes)
    if p == NULL and d.msg != NULL and d.msg_size > 0:
        snprintf(d.msg, <size_t>d.msg_size,
                 "cbn: could not allocate %lld bytes of scratch memory", <long long>nbytes)
    return p


cdef inline void give(const cbn_desc* d, void* p) noexcept nogil:
    if p != d.scratch:
        free(p)


# ------------------------------------------------------------------------- the stages

cdef void channel_moments(const storage* x, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                          void* mem, Moments* out, int nthreads,
                          const floating* tag) noexcept nogil:
    """Per-channel moments of x (tag: the compute dtype)."""
    cdef Planes PP
    cdef Rows PR
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        PP.pf = prefetch_flag(M * C * K, sizeof(storage), False)
        planes_moments(x, PP, <Moments*>mem, out, nthreads)
    else:
        PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, sizeof(floating))
        rows_moments(x, C, K, PR, <double*>mem,
                     <floating*>(<char*>mem + rows_part_bytes(PR, C)),
                     <double*>(<char*>mem + rows_part_bytes(PR, C)
                               + lanes_bytes(nthreads * 3 * PR.W * sizeof(floating))),
                     out, nthreads)


cdef Py_ssize_t moments_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                      Py_ssize_t itemsize, int nthreads) noexcept nogil:
    """Bytes of scratch channel_moments needs: item partials, per-thread lanes."""
    cdef Planes PP
    cdef Rows PR
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        return PP.items * C * sizeof(Moments)
    PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, itemsize)
    return (rows_part_bytes(PR, C) + lanes_bytes(nthreads * 3 * PR.W * itemsize)
            + nthreads * 2 * C * sizeof(double))


cdef void stage_backward_reduce(const storage* g, const storage* x, const Dact* da,
                                storage* gr, storage* dx_eval, const floating* mean,
                                const floating* scale, Py_ssize_t M, Py_ssize_t C,
                                Py_ssize_t K, Sums* out, int nthreads,
                                char* mem) noexcept nogil:
    """out[c] = (sum g, sum g * (x - mean)) over channel c, g = grad_output times the
    activation's derivative (da: at the forward's output, or at the pre-activation
    (x - mean) * scale + shift (+ residual)); that g is written to gr and, for the eval
    backward, dx_eval = g * scale, both in the same pass (if not NULL). mem:
    reduce_scratch_bytes(...) bytes of scratch."""
    cdef Planes PP
    cdef Rows PR
    cdef floating* lanes
    cdef Py_ssize_t t
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        PP.pf = prefetch_flag(M * C * K * (3 if da.ym != NULL else 2), sizeof(storage),
                              False)
        planes_sums(g, x, da, dx_eval, gr, PP, mean, scale, <Sums*>mem, out, nthreads)
    else:
        PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, sizeof(floating))
        lanes = <floating*>(mem + lanes_bytes(PR.items * C * sizeof(Sums)))
        expand_lanes(mean, lanes, PR.W, C, K)
        expand_lanes(scale, lanes + PR.W, PR.W, C, K)
        if cbn_act_needs_z(da.act):
            if da.shift != NULL:
                expand_lanes(<const floating*>da.shift, lanes + 2 * PR.W, PR.W, C, K)
            else:
                for t in range(PR.W):
                    lanes[2 * PR.W + t] = 0
        rows_sums(g, x, da, dx_eval, gr, C, K, PR, lanes, <Sums*>mem, lanes + 3 * PR.W,
                  out, nthreads)


cdef Py_ssize_t reduce_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                     Py_ssize_t itemsize, int nthreads) noexcept nogil:
    """Bytes of scratch stage_backward_reduce needs: item partials (and, for rows, the
    lane parameters mean, scale, shift and per-thread lanes)."""
    cdef Rows PR
    if K >= PLANE_MIN_K:
        return planes_partition(M, C, K, BLOCK).items * C * sizeof(Sums)
    PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, itemsize)
    return lanes_bytes(PR.items * C * sizeof(Sums)) + (nthreads * 2 + 3) * PR.W * itemsize


cdef inline void backward_scale(const floating* weight, const floating* invstd,
                                floating* scale, Py_ssize_t C) noexcept nogil:
    """scale = weight * invstd (weight NULL: ones), the backward's per-channel factor."""
    cdef Py_ssize_t c
    for c in range(C):
        scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * invstd[c])


cdef inline int check_act(const cbn_desc* d, const cbn_act* act) noexcept nogil:
    """0, or CBN_ERR_ARG for an activation the loops do not have."""
    if 0 <= act.kind < CBN_NACTS:
        return CBN_OK
    return fail(d, CBN_ERR_ARG, "cbn: unknown activation")


# ------------------------------------------------------------- the operations, typed

cdef int forward_t(const cbn_desc* d, const cbn_forward_args* a, const storage* x,
                   const floating* tag) noexcept nogil:
    """Training or eval forward (cbn_forward_args; x: storage, tag: the compute dtype).
    One allocation: the per-channel parameters, then the stages' scratch."""
    cdef Py_ssize_t M = d.M, C = d.C, K = d.K
    cdef int nt = d.nthreads
    cdef Py_ssize_t pbytes = C * (sizeof(Moments) + 2 * sizeof(floating))
    cdef Py_ssize_t abytes = apply_scratch_bytes(M, C, K, sizeof(floating))
    cdef Py_ssize_t gsize = (block_channels(M, C, K, sizeof(storage), 1, nt, True)
                             if a.training else 0)
    cdef Py_ssize_t mbytes = 0
    cdef char* mem
    cdef Moments* mom
    cdef Moments* part
    cdef floating* scale
    cdef floating* shift
    cdef floating* save_mean = <floating*>a.save_mean
    cdef Pass out
    if check_act(d, &a.act):
        return CBN_ERR_ARG
    if gsize > 0:       # channel-blocked (see _blocked.pxi): per-channel partials, items
        mbytes = C * (sizeof(Moments) + sizeof(Py_ssize_t))
    elif a.training:
        mbytes = moments_scratch_bytes(M, C, K, sizeof(floating), nt)
    pbytes = (pbytes + 63) // 64 * 64
    abytes = (abytes + 63) // 64 * 64
    mem = take(d, pbytes + abytes + mbytes)
    if mem == NULL:
        return CBN_ERR_NOMEM
    mom = <Moments*>mem
    scale = <floating*>(mom + C)
    shift = scale + C
    part = <Moments*>(mem + pbytes + abytes)
    if gsize > 0:
        blocked_forward(x, d, a, gsize, mom, part, <Py_ssize_t*>(part + C), scale, shift)
    else:
        if a.training:
            channel_moments(x, M, C, K, part, mom, nt, tag)
            stage_finish(mom, C, <double>M * K, <const floating*>a.weight,
                         <const floating*>a.bias, <floating*>a.running_mean,
                         <floating*>a.running_var, a.momentum, a.eps, save_mean,
                         <floating*>a.save_invstd, scale, shift)
        else:
            stage_eval_params(<const floating*>a.weight, <const floating*>a.bias,
                              <const floating*>a.running_var, a.eps,
                              <floating*>a.save_invstd, scale, shift, C)
            memcpy(save_mean, a.running_mean, C * sizeof(floating))
        out = affine_pass(OP_AFFINE | stream_flag(M * C * K, sizeof(storage), False),
                          &a.act, x, a.residual, a.y, save_mean, scale, shift)
        apply(&out, M, C, K, <floating*>(mem + pbytes), nt, x)
    give(d, mem)
    return CBN_OK


cdef int normalize_t(const cbn_desc* d, const cbn_normalize_args* a, const storage* x,
                     const floating* tag) noexcept nogil:
    """y = act((x - mean) * scale + shift + residual)."""
    cdef Py_ssize_t M = d.M, C = d.C, K = d.K
    cdef Py_ssize_t abytes = apply_scratch_bytes(M, C, K, sizeof(floating))
    cdef char* lanes = NULL     # (planes need none; rows need their lane parameters)
    cdef Pass out = affine_pass(OP_AFFINE | stream_flag(M * C * K, sizeof(storage), False),
                                &a.act, x, a.residual, a.y, a.mean, a.scale, a.shift)
    if check_act(d, &a.act):
        return CBN_ERR_ARG
    if abytes > 0:
        lanes = take(d, abytes)
        if lanes == NULL:
            return CBN_ERR_NOMEM
    apply(&out, M, C, K, <floating*>lanes, d.nthreads, x)
    if lanes != NULL:
        give(d, lanes)
    return CBN_OK


cdef int eval_params_t(const cbn_desc* d, const cbn_eval_params_args* a,
                       const floating* weight) noexcept nogil:
    stage_eval_params(weight, <const floating*>a.bias, <const floating*>a.running_var,
                      a.eps, <floating*>a.invstd, <floating*>a.scale, <floating*>a.shift,
                      d.C)
    return CBN_OK


cdef int backward_t(const cbn_desc* d, const cbn_backward_args* a, const storage* x,
                    const floating* tag) noexcept nogil:
    """Training backward: reduce, then the element pass; eval: one pass that reduces and
    writes dx = dy * scale. One allocation: the per-channel sums and parameters, then the
    reduction's scratch."""
    cdef Py_ssize_t M = d.M, C = d.C, K = d.K
    cdef int nt = d.nthreads
    cdef Py_ssize_t pbytes = (C * (sizeof(Sums) + 3 * sizeof(floating)) + 63) // 64 * 64
    cdef Py_ssize_t gsize = (block_channels(M, C, K, sizeof(storage),
                                            3 if a.output != NULL else 2, nt)
                             if a.training else 0)
    cdef Py_ssize_t rbytes = (C * (sizeof(Sums) + sizeof(Py_ssize_t)) if gsize > 0 else
                              reduce_scratch_bytes(M, C, K, sizeof(floating), nt))
    cdef Py_ssize_t abytes = (apply_scratch_bytes(M, C, K, sizeof(floating))
                              if a.training and gsize == 0 else 0)
    cdef char* mem
    cdef Sums* sums
    cdef floating* scale
    cdef floating* k1
    cdef floating* k2
    cdef const storage* g = <const storage*>a.grad_output
    cdef Dact da = make_dact(&a.act, a.output, a.residual, a.bias)
    cdef Pass dx
    if check_act(d, &a.act):
        return CBN_ERR_ARG
    rbytes = (rbytes + 63) // 64 * 64
    mem = take(d, pbytes + rbytes + abytes)
    if mem == NULL:
        return CBN_ERR_NOMEM
    sums = <Sums*>mem
    scale = <floating*>(sums + C)
    k1 = scale + C
    k2 = k1 + C
    backward_scale(<const floating*>a.weight, <const floating*>a.save_invstd, scale, C)
    if gsize > 0:   # channel-blocked (see _blocked.pxi)
        blocked_backward(x, d, a, gsize, scale, sums, <Sums*>(mem + pbytes),
                         <Py_ssize_t*>(mem + pbytes + C * sizeof(Sums)), k1, k2)
    else:
        stage_backward_reduce(g, x, &da, <storage*>a.grad_residual,
                              NULL if a.training else <storage*>a.grad_input,
                              <const floating*>a.save_mean, scale, M, C, K, sums, nt,
                              mem + pbytes)
        stage_backward_finish(sums, <const floating*>a.save_invstd, <double>M * K,
                              <floating*>a.grad_weight, <floating*>a.grad_bias,
                              k1 if a.training else NULL, k2, C)
        if a.training:
            dx = bwd_pass(OP_BWD_TRAIN | stream_flag(M * C * K, sizeof(storage), False),
                          &a.act, x, g, a.output, a.residual, a.grad_input, a.save_mean,
                          scale, a.bias, k1, k2)
            apply(&dx, M, C, K, <floating*>(mem + pbytes + rbytes), nt, x)
    give(d, mem)
    return CBN_OK


cdef int moments_t(const cbn_desc* d, const cbn_moments_args* a, const storage* x,
                   const floating* tag) noexcept nogil:
    """mean and m2 per channel (zeros for an empty input)."""
    cdef Py_ssize_t C = d.C, c
    cdef Py_ssize_t mbytes = moments_scratch_bytes(d.M, C, d.K, sizeof(floating),
                                                   d.nthreads)
    cdef Py_ssize_t pbytes = (C * sizeof(Moments) + 63) // 64 * 64
    cdef char* mem
    cdef Moments* mom
    for c in range(C):
        a.mean[c] = 0.0
        a.m2[c] = 0.0
    if d.M * d.K == 0 or C == 0:
        return CBN_OK
    mem = take(d, pbytes + mbytes)
    if mem == NULL:
        return CBN_ERR_NOMEM
    mom = <Moments*>mem
    channel_moments(x, d.M, C, d.K, mem + pbytes, mom, d.nthreads, tag)
    for c in range(C):
        a.mean[c] = mom[c].mean
        a.m2[c] = mom[c].m2
    give(d, mem)
    return CBN_OK


cdef int finish_t(const cbn_desc* d, const cbn_finish_args* a,
                  const floating* weight) noexcept nogil:
    """The finish stage from merged moments, exactly as the fused training forward."""
    cdef Py_ssize_t C = d.C, c
    cdef Moments* mom = <Moments*>take(d, C * sizeof(Moments))
    if mom == NULL:
        return CBN_ERR_NOMEM
    for c in range(C):
        mom[c].n = a.count
        mom[c].mean = a.mean[c]
        mom[c].m2 = a.m2[c]
    stage_finish(mom, C, a.count, weight, <const floating*>a.bias,
                 <floating*>a.running_mean, <floating*>a.running_var, a.momentum, a.eps,
                 <floating*>a.save_mean, <floating*>a.save_invstd, <floating*>a.scale,
                 <floating*>a.shift)
    give(d, mom)
    return CBN_OK


cdef int reduce_t(const cbn_desc* d, const cbn_reduce_args* a, const storage* g,
                  const floating* tag) noexcept nogil:
    """sum_dy, sum_dy_xmu per channel (zeros for an empty input)."""
    cdef Py_ssize_t C = d.C, c
    cdef Py_ssize_t pbytes = (C * (sizeof(Sums) + sizeof(floating)) + 63) // 64 * 64
    cdef char* mem
    cdef Sums* sums
    cdef floating* zeros
    cdef Dact da = make_dact(&a.act, a.output, a.residual, a.shift)
    if check_act(d, &a.act):
        return CBN_ERR_ARG
    for c in range(C):
        a.sum_dy[c] = 0.0
        a.sum_dy_xmu[c] = 0.0
    if d.M * d.K == 0 or C == 0:
        return CBN_OK
    mem = take(d, pbytes + reduce_scratch_bytes(d.M, C, d.K, sizeof(floating), d.nthreads))
    if mem == NULL:
        return CBN_ERR_NOMEM
    sums = <Sums*>mem
    zeros = <floating*>(sums + C)       # the scale of an eval dx, which is not written
    for c in range(C):
        zeros[c] = 0
    stage_backward_reduce(g, <const storage*>a.x, &da, <storage*>NULL, <storage*>NULL,
                          <const floating*>a.mean,
                          <const floating*>a.scale if a.scale != NULL else zeros, d.M, C,
                          d.K, sums, d.nthreads, mem + pbytes)
    for c in range(C):
        a.sum_dy[c] = sums[c].g
        a.sum_dy_xmu[c] = sums[c].gx
    give(d, mem)
    return CBN_OK


cdef int elements_t(const cbn_desc* d, const cbn_elements_args* a, const storage* g,
                    const floating* tag) noexcept nogil:
    """The training backward's element pass with global sums."""
    cdef Py_ssize_t C = d.C, c
    cdef Py_ssize_t pbytes = (C * (sizeof(Sums) + 3 * sizeof(floating)) + 63) // 64 * 64
    cdef char* mem
    cdef Sums* sums
    cdef floating* scale
    cdef floating* k1
    cdef floating* k2
    cdef Pass dx
    if check_act(d, &a.act):
        return CBN_ERR_ARG
    if d.M * d.K == 0 or C == 0:
        return CBN_OK
    mem = take(d, pbytes + apply_scratch_bytes(d.M, C, d.K, sizeof(floating)))
    if mem == NULL:
        return CBN_ERR_NOMEM
    sums = <Sums*>mem
    scale = <floating*>(sums + C)
    k1 = scale + C
    k2 = k1 + C
    backward_scale(<const floating*>a.weight, <const floating*>a.invstd, scale, C)
    for c in range(C):
        sums[c].g = a.sum_dy[c]
        sums[c].gx = a.sum_dy_xmu[c]
    stage_backward_finish(sums, <const floating*>a.invstd, a.count, NULL, NULL, k1, k2, C)
    dx = bwd_pass(OP_BWD_TRAIN | stream_flag(d.M * C * d.K, sizeof(storage), False), &a.act,
                  a.x, g, a.output, a.residual, a.grad_input, a.mean, scale, a.bias, k1, k2)
    apply(&dx, d.M, C, d.K, <floating*>(mem + pbytes), d.nthreads, g)
    give(d, mem)
    return CBN_OK


# --------------------------------------------------------------- the one dispatch

cdef enum:
    CORE_FORWARD = 0
    CORE_NORMALIZE = 1
    CORE_EVAL_PARAMS = 2
    CORE_BACKWARD = 3
    CORE_MOMENTS = 4
    CORE_FINISH = 5
    CORE_REDUCE = 6
    CORE_ELEMENTS = 7


cdef int run_t(int op, const cbn_desc* d, const void* a, const storage* stag,
               const floating* tag) noexcept nogil:
    """The operation op on one (storage, compute) dtype pair (stag, tag: NULL, of those
    types)."""
    if op == CORE_FORWARD:
        return forward_t(d, <const cbn_forward_args*>a,
                         <const storage*>(<const cbn_forward_args*>a).x, tag)
    if op == CORE_NORMALIZE:
        return normalize_t(d, <const cbn_normalize_args*>a,
                           <const storage*>(<const cbn_normalize_args*>a).x, tag)
    if op == CORE_BACKWARD:
        return backward_t(d, <const cbn_backward_args*>a,
                          <const storage*>(<const cbn_backward_args*>a).x, tag)
    if op == CORE_EVAL_PARAMS:
        return eval_params_t(d, <const cbn_eval_params_args*>a,
                             <const floating*>(<const cbn_eval_params_args*>a).weight)
    if op == CORE_MOMENTS:
        return moments_t(d, <const cbn_moments_args*>a,
                         <const storage*>(<const cbn_moments_args*>a).x, tag)
    if op == CORE_FINISH:
        return finish_t(d, <const cbn_finish_args*>a,
                        <const floating*>(<const cbn_finish_args*>a).weight)
    if op == CORE_REDUCE:
        return reduce_t(d, <const cbn_reduce_args*>a,
                        <const storage*>(<const cbn_reduce_args*>a).grad_output, tag)
    if op == CORE_ELEMENTS:
        return elements_t(d, <const cbn_elements_args*>a,
                          <const storage*>(<const cbn_elements_args*>a).grad_output, tag)
    return fail(d, CBN_ERR_ARG, "cbn: unknown operation")


cdef int run(int op, const cbn_desc* d, const void* a) noexcept nogil:
    """Check what the core cannot run, apply the adaptive team's thread count
    (cbn/src/cbn_team.h) and dispatch on the dtype: once per call."""
    cdef cbn_desc k = d[0]
    if d.version != CBN_DESC_VERSION:
        return fail(d, CBN_ERR_ARG, "cbn: unknown descriptor version")
    if not (d.storage == d.compute == CBN_FLOAT32 or d.storage == d.compute == CBN_FLOAT64
            or (d.compute == CBN_FLOAT32
                and (d.storage == CBN_FLOAT16 or d.storage == CBN_BFLOAT16))):
        return fail(d, CBN_ERR_DTYPE, "cbn: no loops for this storage and compute dtype")
    if (d.M < 0 or d.C < 0 or d.K < 0 or d.stride_k != 1 or d.stride_c != d.K
            or d.stride_m != d.C * d.K):
        return fail(d, CBN_ERR_ARG, "cbn: the core runs C-contiguous (M, C, K) views")
    if d.nthreads < 1:
        return fail(d, CBN_ERR_ARG, "cbn: nthreads must be at least 1")
    k.nthreads = cbn_team_size(d.nthreads)
    if d.storage == CBN_FLOAT32:
        return run_t(op, &k, a, <const float*>NULL, <const float*>NULL)
    if d.storage == CBN_FLOAT64:
        return run_t(op, &k, a, <const double*>NULL, <const double*>NULL)
    if d.storage == CBN_FLOAT16:
        return run_t(op, &k, a, <const cbn_f16*>NULL, <const float*>NULL)
    return run_t(op, &k, a, <const cbn_bf16*>NULL, <const float*>NULL)


# ------------------------------------------------------------------------ the entries

cdef int cbn_forward(const cbn_desc* d, const cbn_forward_args* a) noexcept nogil:
    """Training or eval forward (see cbn_forward_args in cbn/include/cbn_core.h)."""
    return run(CORE_FORWARD, d, a)


cdef int cbn_normalize(const cbn_desc* d, const cbn_normalize_args* a) noexcept nogil:
    """y = act((x - mean) * scale + shift + residual)."""
    return run(CORE_NORMALIZE, d, a)


cdef int cbn_eval_params(const cbn_desc* d, const cbn_eval_params_args* a) noexcept nogil:
    """invstd, scale and shift of the eval forward (C values; M and K ignored)."""
    return run(CORE_EVAL_PARAMS, d, a)


cdef int cbn_backward(const cbn_desc* d, const cbn_backward_args* a) noexcept nogil:
    """Training or eval backward."""
    return run(CORE_BACKWARD, d, a)


cdef int cbn_moments(const cbn_desc* d, const cbn_moments_args* a) noexcept nogil:
    """The moments stage: M*K values per channel, mean and m2 in float64."""
    return run(CORE_MOMENTS, d, a)


cdef int cbn_finish(const cbn_desc* d, const cbn_finish_args* a) noexcept nogil:
    """The finish stage from merged moments (C values; M and K ignored)."""
    return run(CORE_FINISH, d, a)


cdef int cbn_backward_reduce(const cbn_desc* d, const cbn_reduce_args* a) noexcept nogil:
    """The backward reduce stage: sum_dy, sum_dy_xmu in float64."""
    return run(CORE_REDUCE, d, a)


cdef int cbn_backward_elements(const cbn_desc* d,
                               const cbn_elements_args* a) noexcept nogil:
    """The training backward's element pass from (global) sums."""
    return run(CORE_ELEMENTS, d, a)
