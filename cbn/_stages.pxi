# ---------------------------------------------------------------------------- stages
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
# Scratch memory is allocated (and checked) with the GIL held, before any parallel region.

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void** p, size_t alignment, size_t size)

cdef enum:
    ALIGNED_MIN = 1024    # scratch of at least this many bytes is aligned to a line (the
                          # rows kernels' wide lanes: more than 512 bytes each)


cdef void* alloc(Py_ssize_t nbytes) except NULL:
    """Scratch memory aligned to a cache line (64 bytes), released with free(); raises
    MemoryError (called with the GIL, before any parallel region). The alignment matters:
    the rows kernels read their lane parameters (the scratch) with each 64-byte vector,
    and from malloc's 16-byte alignment every such load spans two lines (channels-last
    eval of 64x128x28x28 float64 took 1.43 copies of the array instead of 0.97). Below
    ALIGNED_MIN bytes, plain malloc (16-byte aligned): posix_memalign costs about 0.1 us
    more per call, a tenth of the smallest calls, whose lanes are short and read once per
    block."""
    cdef void* p = NULL
    if nbytes < ALIGNED_MIN:
        p = malloc(nbytes if nbytes > 0 else 1)
    elif posix_memalign(&p, 64, nbytes) != 0:
        p = NULL
    if p == NULL:
        raise MemoryError(f"cbn: could not allocate {nbytes} bytes of scratch memory")
    return p


cdef int stage_moments(const floating* x, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                       Moments* out, int nthreads, void* scratch=NULL) except -1:
    """out[c] = (count, mean, M2) of channel c of the (M, C, K) data x. scratch: NULL, or
    moments_scratch_bytes(...) bytes the caller allocated (one allocation per call)."""
    cdef void* mem = scratch
    if mem == NULL:
        mem = alloc(moments_scratch_bytes(M, C, K, sizeof(floating), nthreads))
    with nogil:
        channel_moments(x, M, C, K, mem, out, nthreads)
    if scratch == NULL:
        free(mem)
    return 0


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


cdef int stage_normalize(const floating* x, floating* y, const floating* mean,
                         const floating* scale, const floating* shift,
                         const floating* residual, bint relu, Py_ssize_t M, Py_ssize_t C,
                         Py_ssize_t K, int nthreads, void* scratch=NULL) except -1:
    """y = act((x - mean) * scale + shift + residual); y may be x. scratch: NULL, or
    apply_scratch_bytes(...) bytes the caller allocated."""
    cdef Py_ssize_t nbytes
    cdef void* lanes = scratch
    if lanes == NULL:           # (planes need none; rows need their lane parameters)
        nbytes = apply_scratch_bytes(M, C, K, sizeof(floating))
        if nbytes > 0:
            lanes = alloc(nbytes)
    with nogil:
        apply(OP_AFFINE | stream_flag(M * C * K * sizeof(floating)), x, NULL, residual, y,
              M, C, K, mean, scale, shift, NULL, <floating*>lanes, relu, nthreads)
    if lanes != scratch:
        free(lanes)
    return 0


cdef int stage_backward_reduce(const floating* g, const floating* x, const floating* ym,
                               floating* gr, floating* dx_eval, const floating* mean,
                               const floating* scale, Py_ssize_t M, Py_ssize_t C,
                               Py_ssize_t K, Sums* out, int nthreads,
                               void* scratch=NULL) except -1:
    """out[c] = (sum g, sum g * (x - mean)) over channel c, g = grad_output masked by
    ReLU's backward where ym (the forward's output) is given; the masked g is written to
    gr and, for the eval backward, dx_eval = g * scale, both in the same pass (if not
    NULL). scratch: NULL, or reduce_scratch_bytes(...) bytes the caller allocated."""
    cdef Planes PP
    cdef Rows PR
    cdef char* mem = <char*>scratch
    cdef floating* lmean
    if mem == NULL:
        mem = <char*>alloc(reduce_scratch_bytes(M, C, K, sizeof(floating), nthreads))
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        PP.pf = prefetch_flag(M * C * K * sizeof(floating) * (3 if ym != NULL else 2))
        with nogil:
            planes_sums(g, x, ym, dx_eval, gr, PP, mean, scale, <Sums*>mem, out, nthreads)
    else:
        PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, sizeof(floating))
        lmean = <floating*>(mem + lanes_bytes(PR.items * C * sizeof(Sums)))
        with nogil:
            expand_lanes(mean, lmean, PR.W, C, K)
            expand_lanes(scale, lmean + PR.W, PR.W, C, K)
            rows_sums(g, x, ym, dx_eval, gr, C, K, PR, lmean, lmean + PR.W, <Sums*>mem,
                      lmean + 2 * PR.W, out, nthreads)
    if scratch == NULL:
        free(mem)
    return 0


cdef Py_ssize_t reduce_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                     Py_ssize_t itemsize, int nthreads):
    """Bytes of scratch stage_backward_reduce needs: item partials (and, for rows, the
    lane parameters and per-thread lanes)."""
    cdef Rows PR
    if K >= PLANE_MIN_K:
        return planes_partition(M, C, K, BLOCK).items * C * sizeof(Sums)
    PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, itemsize)
    return lanes_bytes(PR.items * C * sizeof(Sums)) + (nthreads * 2 + 2) * PR.W * itemsize


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


cdef int stage_backward_elements(const floating* g, const floating* x, const floating* ym,
                                 floating* dx, const floating* mean, const floating* scale,
                                 const floating* k1, const floating* k2, Py_ssize_t M,
                                 Py_ssize_t C, Py_ssize_t K, int nthreads,
                                 void* scratch=NULL) except -1:
    """dx = (g - k1 - (x - mean) * k2) * scale, g masked by ReLU's backward where ym.
    scratch: NULL, or apply_scratch_bytes(...) bytes the caller allocated."""
    cdef Py_ssize_t nbytes
    cdef void* lanes = scratch
    if lanes == NULL:           # (planes need none; rows need their lane parameters)
        nbytes = apply_scratch_bytes(M, C, K, sizeof(floating))
        if nbytes > 0:
            lanes = alloc(nbytes)
    with nogil:
        apply(OP_BWD_TRAIN | stream_flag(M * C * K * sizeof(floating)), x, g, ym, dx, M,
              C, K, mean, scale, k1, k2, <floating*>lanes, False, nthreads)
    if lanes != scratch:
        free(lanes)
    return 0


# ------------------------------------------------------------------- one call record
#
# Both ways into the kernels, the general path of cbn.functional (which validated the call
# and built C-contiguous (M, C, K) arrays) and the plain-call fast path below (which
# recognised a call that needs nothing of the sort), end in the same record and the same
# run_* function. Pointers are NULL for arrays that are absent.

cdef struct Call:
    int dtype                 # NPY_FLOAT32 or NPY_FLOAT64: the dtype of every array
    Py_ssize_t M, C, K        # the (M, C, K) view
    int nthreads
    bint training
    bint relu                 # forward: ReLU on the output
    double momentum, eps
    void* x
    void* y
    void* residual
    void* weight
    void* bias
    void* running_mean
    void* running_var
    void* save_mean           # forward: written; backward: read (the forward's mean)
    void* save_invstd         # forward: written; backward: read
    void* scale               # normalize: the per-channel scale and shift
    void* shift
    void* grad_output
    void* output              # backward: the forward's ReLU output (masks grad_output)
    void* grad_input
    void* grad_weight
    void* grad_bias
    void* grad_residual


cdef inline void* data(object a):
    """Data pointer of an ndarray (the caller guarantees contiguity and dtype), or NULL."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline void init_call(Call* k, cnp.ndarray x, int nthreads):
    """Fill *k as the record for the (M, C, K) view x (or an (M, C, K) shape given by a
    plain call's caller, which then sets M, C, K), every pointer NULL. The thread count is
    what the adaptive team allows (cbn/src/cbn_team.h): 1 while the cores are contended."""
    memset(k, 0, sizeof(Call))
    k.dtype = cnp.PyArray_TYPE(x)
    k.x = cnp.PyArray_DATA(x)
    k.nthreads = cbn_team_size(nthreads)
    if cnp.PyArray_NDIM(x) == 3:
        k.M = cnp.PyArray_DIM(x, 0)
        k.C = cnp.PyArray_DIM(x, 1)
        k.K = cnp.PyArray_DIM(x, 2)


cdef int forward_impl(const floating* x, Call* k) except -1:
    # one allocation: the per-channel parameters, then the stages' scratch
    cdef Py_ssize_t C = k.C
    cdef Py_ssize_t pbytes = C * (sizeof(Moments) + 2 * sizeof(floating))
    cdef Py_ssize_t abytes = apply_scratch_bytes(k.M, C, k.K, sizeof(floating))
    cdef Py_ssize_t gsize = (block_channels(k.M, C, k.K, sizeof(floating), 1, k.nthreads,
                                            True) if k.training else 0)
    cdef Py_ssize_t mbytes = 0
    if gsize > 0:       # channel-blocked (see _blocked.pxi): per-channel partials, items
        mbytes = C * (sizeof(Moments) + sizeof(Py_ssize_t))
    elif k.training:
        mbytes = moments_scratch_bytes(k.M, C, k.K, sizeof(floating), k.nthreads)
    pbytes = (pbytes + 63) // 64 * 64
    abytes = (abytes + 63) // 64 * 64
    cdef char* mem = <char*>alloc(pbytes + abytes + mbytes)
    cdef Moments* mom = <Moments*>mem
    cdef floating* scale = <floating*>(mom + C)
    cdef floating* shift = scale + C
    cdef floating* save_mean = <floating*>k.save_mean
    cdef Moments* part = <Moments*>(mem + pbytes + abytes)
    try:
        if gsize > 0:
            with nogil:
                blocked_forward(x, k, gsize, mom, part, <Py_ssize_t*>(part + C), scale,
                                shift)
            return 0
        if k.training:
            stage_moments(x, k.M, C, k.K, mom, k.nthreads, mem + pbytes + abytes)
            stage_finish(mom, C, <double>k.M * k.K, <floating*>k.weight,
                         <floating*>k.bias, <floating*>k.running_mean,
                         <floating*>k.running_var, k.momentum, k.eps, save_mean,
                         <floating*>k.save_invstd, scale, shift)
        else:
            stage_eval_params(<floating*>k.weight, <floating*>k.bias,
                              <floating*>k.running_var, k.eps, <floating*>k.save_invstd,
                              scale, shift, C)
            memcpy(save_mean, k.running_mean, C * sizeof(floating))
        stage_normalize(x, <floating*>k.y, save_mean, scale, shift,
                        <floating*>k.residual, k.relu, k.M, C, k.K, k.nthreads,
                        mem + pbytes if abytes > 0 else NULL)
    finally:
        free(mem)
    return 0


cdef int run_forward(Call* k) except -1:
    """Training or eval forward (see forward_train and forward_eval)."""
    if k.dtype == cnp.NPY_FLOAT32:
        return forward_impl(<const float*>k.x, k)
    return forward_impl(<const double*>k.x, k)


cdef int normalize_impl(const floating* x, Call* k) except -1:
    return stage_normalize(x, <floating*>k.y, <floating*>k.save_mean, <floating*>k.scale,
                           <floating*>k.shift, <floating*>k.residual, k.relu, k.M, k.C,
                           k.K, k.nthreads)


cdef int run_normalize(Call* k) except -1:
    """y = act((x - save_mean) * scale + shift + residual)."""
    if k.dtype == cnp.NPY_FLOAT32:
        return normalize_impl(<const float*>k.x, k)
    return normalize_impl(<const double*>k.x, k)


cdef int backward_impl(const floating* x, Call* k) except -1:
    # one allocation: the per-channel sums and parameters, then the reduction's scratch
    cdef Py_ssize_t C = k.C, c
    cdef Py_ssize_t pbytes = (C * (sizeof(Sums) + 3 * sizeof(floating)) + 63) // 64 * 64
    cdef Py_ssize_t gsize = (block_channels(k.M, C, k.K, sizeof(floating),
                                            3 if k.output != NULL else 2, k.nthreads)
                             if k.training else 0)
    cdef Py_ssize_t rbytes = (C * (sizeof(Sums) + sizeof(Py_ssize_t)) if gsize > 0 else
                              reduce_scratch_bytes(k.M, C, k.K, sizeof(floating), k.nthreads))
    cdef Py_ssize_t abytes = (apply_scratch_bytes(k.M, C, k.K, sizeof(floating))
                              if k.training and gsize == 0 else 0)
    rbytes = (rbytes + 63) // 64 * 64
    cdef char* mem = <char*>alloc(pbytes + rbytes + abytes)
    cdef Sums* sums = <Sums*>mem
    cdef floating* scale = <floating*>(sums + C)
    cdef floating* k1 = scale + C
    cdef floating* k2 = k1 + C
    cdef const floating* weight = <floating*>k.weight
    cdef const floating* invstd = <floating*>k.save_invstd
    cdef const floating* g = <floating*>k.grad_output
    cdef const floating* ym = <floating*>k.output
    try:
        for c in range(C):
            scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * invstd[c])
        if gsize > 0:   # channel-blocked (see _blocked.pxi)
            with nogil:
                blocked_backward(x, k, gsize, scale, sums, <Sums*>(mem + pbytes),
                                 <Py_ssize_t*>(mem + pbytes + C * sizeof(Sums)), k1, k2)
            return 0
        stage_backward_reduce(g, x, ym, <floating*>k.grad_residual,
                              NULL if k.training else <floating*>k.grad_input,
                              <floating*>k.save_mean, scale, k.M, C, k.K, sums, k.nthreads,
                              mem + pbytes)
        stage_backward_finish(sums, invstd, <double>k.M * k.K, <floating*>k.grad_weight,
                              <floating*>k.grad_bias, k1 if k.training else NULL, k2, C)
        if k.training:
            stage_backward_elements(g, x, ym, <floating*>k.grad_input,
                                    <floating*>k.save_mean, scale, k1, k2, k.M, C, k.K,
                                    k.nthreads, mem + pbytes + rbytes if abytes > 0 else NULL)
    finally:
        free(mem)
    return 0


cdef int run_backward(Call* k) except -1:
    """Training backward: reduce, then the element pass; eval: one pass that reduces and
    writes dx = dy * scale."""
    if k.dtype == cnp.NPY_FLOAT32:
        return backward_impl(<const float*>k.x, k)
    return backward_impl(<const double*>k.x, k)


# ------------------------------------------------- the general path's entries (functional)

def forward_train(cnp.ndarray x, cnp.ndarray y, weight, bias, running_mean, running_var,
                  cnp.ndarray save_mean, cnp.ndarray save_invstd, double momentum,
                  double eps, int nthreads, residual=None, bint relu=False):
    """Training forward on (M, C, K) arrays: batch statistics, running-statistics update
    (arrays that are None are skipped), y = act(normalize(x) + residual). All arrays
    C-contiguous, of x's dtype (checked by the caller)."""
    cdef Call k
    init_call(&k, x, nthreads)
    k.training = True
    k.momentum = momentum
    k.eps = eps
    k.relu = relu
    k.y = data(y)
    k.residual = data(residual)
    k.weight = data(weight)
    k.bias = data(bias)
    k.running_mean = data(running_mean)
    k.running_var = data(running_var)
    k.save_mean = data(save_mean)
    k.save_invstd = data(save_invstd)
    run_forward(&k)


def forward_eval(cnp.ndarray x, cnp.ndarray y, weight, bias, cnp.ndarray running_mean,
                 cnp.ndarray running_var, cnp.ndarray save_mean, cnp.ndarray save_invstd,
                 double eps, int nthreads, residual=None, bint relu=False):
    """Eval forward on (M, C, K) arrays: invstd, scale and shift from the running
    statistics, then y = act((x - running_mean) * scale + shift + residual) in one pass;
    save_mean = running_mean."""
    cdef Call k
    init_call(&k, x, nthreads)
    k.eps = eps
    k.relu = relu
    k.y = data(y)
    k.residual = data(residual)
    k.weight = data(weight)
    k.bias = data(bias)
    k.running_mean = data(running_mean)
    k.running_var = data(running_var)
    k.save_mean = data(save_mean)
    k.save_invstd = data(save_invstd)
    run_forward(&k)


def affine(cnp.ndarray x, cnp.ndarray y, cnp.ndarray mean, cnp.ndarray scale,
           cnp.ndarray shift, residual, bint relu, int nthreads):
    """y = act((x - mean) * scale + shift + residual) on (M, C, K) arrays: the eval
    forward once scale = weight * invstd and shift = bias are known."""
    cdef Call k
    init_call(&k, x, nthreads)
    k.relu = relu
    k.y = data(y)
    k.residual = data(residual)
    k.save_mean = data(mean)
    k.scale = data(scale)
    k.shift = data(shift)
    run_normalize(&k)


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
    cdef Call k
    init_call(&k, x, nthreads)
    k.training = training
    k.grad_output = data(grad_output)
    k.grad_input = data(grad_input)
    k.weight = data(weight)
    k.save_mean = data(mean)
    k.save_invstd = data(invstd)
    k.grad_weight = data(grad_weight)
    k.grad_bias = data(grad_bias)
    k.output = data(output)
    k.grad_residual = data(grad_residual)
    run_backward(&k)


cdef void eval_params_typed(const floating* weight, Call* k) noexcept nogil:
    stage_eval_params(weight, <floating*>k.bias, <floating*>k.running_var, k.eps,
                      <floating*>k.save_invstd, <floating*>k.scale, <floating*>k.shift, k.C)


def eval_params(weight, bias, cnp.ndarray running_var, double eps, cnp.ndarray save_invstd,
                cnp.ndarray scale, cnp.ndarray shift):
    """Per-channel parameters of the eval forward: invstd = 1/sqrt(rv + eps) (0 where
    rv + eps == 0), scale = weight * invstd, shift = bias (weight/bias None: 1, 0).
    Contiguous (C,) arrays of one dtype (checked by the caller)."""
    cdef Call k
    init_call(&k, running_var, 1)
    k.C = cnp.PyArray_DIM(running_var, 0)
    k.eps = eps
    k.bias = data(bias)
    k.running_var = data(running_var)
    k.save_invstd = data(save_invstd)
    k.scale = data(scale)
    k.shift = data(shift)
    if k.dtype == cnp.NPY_FLOAT32:
        eval_params_typed(<const float*>data(weight), &k)
    else:
        eval_params_typed(<const double*>data(weight), &k)


def invstd(floating[::1] var, double eps, floating[::1] out):
    """out = 1/sqrt(var + eps), 0 where var + eps == 0."""
    cdef Py_ssize_t c
    for c in range(var.shape[0]):
        out[c] = <floating>inv_sqrt(<double>var[c] + eps)


# ------------------------------------------------------ the stages, one at a time (Python)
#
# cbn/_stages.py wraps these for SyncBatchNorm and PreciseBN. Per-channel statistics are
# float64 (C,) arrays; data arrays are C-contiguous (M, C, K) of one dtype.

cdef int moments_typed(const floating* x, Call* k, Moments* out) except -1:
    return stage_moments(x, k.M, k.C, k.K, out, k.nthreads)


def moments(cnp.ndarray x, int nthreads):
    """(count, mean, m2) of each channel of the (M, C, K) array x: count an int, mean and
    m2 (the sum of squared deviations from the mean) float64 (C,) arrays."""
    cdef Call k
    init_call(&k, x, nthreads)
    cdef Py_ssize_t c, n = k.M * k.K
    cdef Moments* mom = <Moments*>alloc(k.C * sizeof(Moments))
    cdef cnp.npy_intp nc = k.C
    cdef cnp.ndarray mean = cnp.PyArray_ZEROS(1, &nc, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray m2 = cnp.PyArray_ZEROS(1, &nc, cnp.NPY_FLOAT64, 0)
    cdef double* pm = <double*>cnp.PyArray_DATA(mean)
    cdef double* p2 = <double*>cnp.PyArray_DATA(m2)
    try:
        if n > 0 and k.C > 0:
            if k.dtype == cnp.NPY_FLOAT32:
                moments_typed(<const float*>k.x, &k, mom)
            else:
                moments_typed(<const double*>k.x, &k, mom)
            for c in range(k.C):
                pm[c] = mom[c].mean
                p2[c] = mom[c].m2
    finally:
        free(mom)
    return n, mean, m2


def merge_moments(list parts):
    """Chan et al.'s pairwise merge of (count, mean, m2) triples, left to right, in
    double; parts with count 0 are skipped, so merging [a] or [a, empty, ...] returns
    a's statistics bit for bit. Returns (count, mean, m2)."""
    cdef double na = 0.0, nb
    cdef Py_ssize_t C = -1, c
    cdef cnp.ndarray mean = None, m2 = None
    cdef Moments a, b
    cdef double[::1] pm, p2, qm, q2
    for part in parts:
        nb = <double>part[0]
        if nb == 0:
            continue
        if mean is None:
            mean = np_copy_f64(part[1])
            m2 = np_copy_f64(part[2])
            na = nb
            continue
        pm = mean
        p2 = m2
        qm = np_copy_f64(part[1])
        q2 = np_copy_f64(part[2])
        for c in range(pm.shape[0]):
            a.n = na
            a.mean = pm[c]
            a.m2 = p2[c]
            b.n = nb
            b.mean = qm[c]
            b.m2 = q2[c]
            merge(&a, b)
            pm[c] = a.mean
            p2[c] = a.m2
        na += nb
    if mean is None:
        if not parts:
            raise ValueError("merge_moments needs at least one part")
        return 0, np_copy_f64(parts[0][1]) * 0, np_copy_f64(parts[0][2]) * 0
    return int(na), mean, m2


cdef cnp.ndarray np_copy_f64(object a):
    return cnp.PyArray_FROMANY(a, cnp.NPY_FLOAT64, 1, 1,
                               cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ENSURECOPY)


cdef void finish_typed(const floating* weight, Call* k, const Moments* mom,
                       double n) noexcept nogil:
    stage_finish(mom, k.C, n, weight, <floating*>k.bias, <floating*>k.running_mean,
                 <floating*>k.running_var, k.momentum, k.eps, <floating*>k.save_mean,
                 <floating*>k.save_invstd, <floating*>k.scale, <floating*>k.shift)


def finish(Py_ssize_t count, mean, m2, double eps, weight, bias, running_mean, running_var,
           double momentum, cnp.ndarray save_mean, cnp.ndarray save_invstd,
           cnp.ndarray scale, cnp.ndarray shift):
    """The finish stage from merged moments (count values per channel; mean and m2
    float64 (C,) arrays): writes save_mean, save_invstd, scale and shift, and updates the
    running statistics that are not None, exactly as the fused training forward does.
    Per-channel arrays: C-contiguous, of one dtype (that of save_mean)."""
    cdef cnp.ndarray am = np_copy_f64(mean), a2 = np_copy_f64(m2)
    cdef Py_ssize_t C = cnp.PyArray_DIM(save_mean, 0), c
    cdef Moments* mom = <Moments*>alloc(C * sizeof(Moments))
    cdef double* pm = <double*>cnp.PyArray_DATA(am)
    cdef double* p2 = <double*>cnp.PyArray_DATA(a2)
    cdef Call k
    init_call(&k, save_mean, 1)
    k.C = C
    k.eps = eps
    k.momentum = momentum
    k.bias = data(bias)
    k.running_mean = data(running_mean)
    k.running_var = data(running_var)
    k.save_mean = data(save_mean)
    k.save_invstd = data(save_invstd)
    k.scale = data(scale)
    k.shift = data(shift)
    for c in range(C):
        mom[c].n = count
        mom[c].mean = pm[c]
        mom[c].m2 = p2[c]
    if k.dtype == cnp.NPY_FLOAT32:
        finish_typed(<const float*>data(weight), &k, mom, <double>count)
    else:
        finish_typed(<const double*>data(weight), &k, mom, <double>count)
    free(mom)


cdef int reduce_typed(const floating* g, Call* k, Sums* out) except -1:
    return stage_backward_reduce(g, <floating*>k.x, <floating*>k.output,
                                 <floating*>k.grad_residual, NULL, <floating*>k.save_mean,
                                 <floating*>k.scale, k.M, k.C, k.K, out, k.nthreads)


def backward_reduce(cnp.ndarray grad_output, cnp.ndarray x, cnp.ndarray mean, int nthreads,
                    output=None):
    """(sum_dy, sum_dy_xmu): float64 (C,) arrays of sum(dy) and sum(dy * (x - mean)) per
    channel of the (M, C, K) arrays, dy masked by ReLU's backward where `output` (the
    forward's ReLU output) is given."""
    cdef Call k
    init_call(&k, x, nthreads)
    cdef Py_ssize_t c
    cdef char* mem = <char*>alloc(k.C * (sizeof(Sums) + cnp.PyArray_ITEMSIZE(x)))
    cdef Sums* sums = <Sums*>mem
    cdef cnp.npy_intp nc = k.C
    cdef cnp.ndarray sg = cnp.PyArray_ZEROS(1, &nc, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray sgx = cnp.PyArray_ZEROS(1, &nc, cnp.NPY_FLOAT64, 0)
    cdef double* p1 = <double*>cnp.PyArray_DATA(sg)
    cdef double* p2 = <double*>cnp.PyArray_DATA(sgx)
    k.output = data(output)
    k.save_mean = data(mean)
    k.scale = mem + k.C * sizeof(Sums)     # unused by the reduction without dx; zeroed
    memset(k.scale, 0, k.C * cnp.PyArray_ITEMSIZE(x))
    try:
        if k.M * k.K > 0 and k.C > 0:
            if k.dtype == cnp.NPY_FLOAT32:
                reduce_typed(<const float*>data(grad_output), &k, sums)
            else:
                reduce_typed(<const double*>data(grad_output), &k, sums)
            for c in range(k.C):
                p1[c] = sums[c].g
                p2[c] = sums[c].gx
    finally:
        free(mem)
    return sg, sgx


cdef int elements_typed(const floating* g, Call* k, const double* sg, const double* sgx,
                        double n) except -1:
    cdef Py_ssize_t C = k.C, c
    cdef char* mem = <char*>alloc(C * (sizeof(Sums) + 3 * sizeof(floating)))
    cdef Sums* sums = <Sums*>mem
    cdef floating* scale = <floating*>(sums + C)
    cdef floating* k1 = scale + C
    cdef floating* k2 = k1 + C
    cdef const floating* weight = <floating*>k.weight
    cdef const floating* invstd = <floating*>k.save_invstd
    try:
        for c in range(C):
            scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * invstd[c])
            sums[c].g = sg[c]
            sums[c].gx = sgx[c]
        stage_backward_finish(sums, invstd, n, NULL, NULL, k1, k2, C)
        stage_backward_elements(g, <floating*>k.x, <floating*>k.output,
                                <floating*>k.grad_input, <floating*>k.save_mean, scale, k1,
                                k2, k.M, C, k.K, k.nthreads)
    finally:
        free(mem)
    return 0


def backward_elements(cnp.ndarray grad_output, cnp.ndarray x, weight, cnp.ndarray mean,
                      cnp.ndarray invstd, sum_dy, sum_dy_xmu, Py_ssize_t count,
                      cnp.ndarray grad_input, int nthreads, output=None):
    """The training backward's element pass with global sums: grad_input = (dy - k1 -
    (x - mean) * k2) * weight * invstd, k1 = sum_dy / count, k2 = invstd^2 * sum_dy_xmu /
    count, exactly as the fused backward computes it when count is the local count."""
    cdef Call k
    init_call(&k, x, nthreads)
    cdef cnp.ndarray s1 = np_copy_f64(sum_dy), s2 = np_copy_f64(sum_dy_xmu)
    k.weight = data(weight)
    k.save_mean = data(mean)
    k.save_invstd = data(invstd)
    k.grad_input = data(grad_input)
    k.output = data(output)
    if k.M * k.K == 0 or k.C == 0:
        return
    if k.dtype == cnp.NPY_FLOAT32:
        elements_typed(<const float*>data(grad_output), &k,
                       <double*>cnp.PyArray_DATA(s1), <double*>cnp.PyArray_DATA(s2), count)
    else:
        elements_typed(<const double*>data(grad_output), &k,
                       <double*>cnp.PyArray_DATA(s1), <double*>cnp.PyArray_DATA(s2), count)
