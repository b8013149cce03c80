# Included by _kernels.pyx: the def layer of cbn.functional's general path and of
# cbn/_stages.py. Each def fills a descriptor and its operation's arguments from ndarrays
# that the caller validated (C-contiguous, of one dtype, the (M, C, K) view), calls the
# core entry without the GIL, and turns a non-zero status into an exception.

cdef enum:
    MSG_SIZE = 160


cdef inline const void* data(object a):
    """Data pointer of an ndarray (the caller guarantees contiguity and dtype), or NULL."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef int bfloat16_typenum = -2     # ml_dtypes' bfloat16, once cbn._checks has seen it


def set_bfloat16_typenum(int typenum):
    """Make arrays of NumPy type number `typenum` (ml_dtypes' bfloat16, a type registered
    at run time) bfloat16 storage for the kernels (cbn._checks calls it)."""
    global bfloat16_typenum
    bfloat16_typenum = typenum


cdef inline int dtype_code(int typenum) noexcept:
    """The core's cbn_dtype of a NumPy type number (float32, float64, float16 or
    ml_dtypes' bfloat16; -1 otherwise)."""
    if typenum == cnp.NPY_FLOAT32:
        return CBN_FLOAT32
    if typenum == cnp.NPY_FLOAT64:
        return CBN_FLOAT64
    if typenum == cnp.NPY_FLOAT16:
        return CBN_FLOAT16
    if typenum == bfloat16_typenum:
        return CBN_BFLOAT16
    return -1


cdef inline void set_view(cbn_desc* d, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K) noexcept:
    """The C-contiguous (M, C, K) view."""
    d.M = M
    d.C = C
    d.K = K
    d.stride_m = C * K
    d.stride_c = K
    d.stride_k = 1


cdef inline void init_desc(cbn_desc* d, cnp.ndarray a, int nthreads, char* msg) noexcept:
    """A descriptor for arrays of a's dtype (a 3D: its (M, C, K) view; 1D: C values),
    every other field 0 or NULL; msg: a MSG_SIZE buffer for the error message. Half
    storage (float16, bfloat16) is computed in float32: its per-channel vectors are."""
    memset(d, 0, sizeof(cbn_desc))
    d.version = CBN_DESC_VERSION
    d.storage = d.compute = dtype_code(cnp.PyArray_TYPE(a))
    if d.storage == CBN_FLOAT16 or d.storage == CBN_BFLOAT16:
        d.compute = CBN_FLOAT32
    d.nthreads = nthreads
    if cnp.PyArray_NDIM(a) == 3:
        set_view(d, cnp.PyArray_DIM(a, 0), cnp.PyArray_DIM(a, 1), cnp.PyArray_DIM(a, 2))
    else:
        set_view(d, 1, cnp.PyArray_DIM(a, 0), 1)
    msg[0] = 0
    d.msg = msg
    d.msg_size = MSG_SIZE


cdef inline cbn_act make_act(int kind, double negative_slope) noexcept:
    cdef cbn_act act
    act.kind = kind
    act.reserved = 0
    act.negative_slope = negative_slope
    return act


cdef int raise_status(int status, const char* msg) except -1:
    """Raise what a core entry's non-zero status means (MemoryError, ValueError)."""
    text = msg.decode("utf-8", "replace")
    if status == CBN_ERR_NOMEM:
        raise MemoryError(text)
    raise ValueError(text)


cdef inline int check(int status, const char* msg) except -1:
    if status != CBN_OK:
        raise_status(status, msg)
    return 0


# ------------------------------------------------------------- the forward and its rescue

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint32_t, uint64_t

from ._rescue import rescue as _edge_rescue


cdef bint any_suspect(const void* invstd, Py_ssize_t C, int dtype) noexcept nogil:
    """Whether some channel's invstd may be 0, NaN or inf (the gate in front of the edge
    rescue, cbn/_rescue.py), on the most significant byte: sign and top exponent bits
    outside 0x01-0x7e. dtype: CBN_FLOAT32 or CBN_FLOAT64."""
    cdef Py_ssize_t c
    cdef unsigned int top
    for c in range(C):
        if dtype == CBN_FLOAT32:
            top = (<const uint32_t*>invstd)[c] >> 24
        else:
            top = <unsigned int>((<const uint64_t*>invstd)[c] >> 56)
        if top == 0 or top >= 0x7F:
            return True
    return False


def suspect(cnp.ndarray save_invstd):
    """Whether the edge rescue would look at a forward with these invstd (a contiguous
    float32 or float64 (C,) array): some value may be 0, NaN or inf."""
    return any_suspect(cnp.PyArray_DATA(save_invstd), cnp.PyArray_SIZE(save_invstd),
                       dtype_code(cnp.PyArray_TYPE(save_invstd)))


cdef struct Kept:
    # The running statistics as they were before a training forward (for the rescue).
    char* before            # 2 * nbytes, or NULL: nothing kept
    Py_ssize_t nbytes


cdef int keep_running(const cbn_desc* d, const cbn_forward_args* a, Kept* kept) except -1:
    """Before a training forward: copy the running statistics aside, in case a channel
    needs the edge rescue (which recomputes its running update from them)."""
    kept.before = NULL
    kept.nbytes = d.C * (4 if d.compute == CBN_FLOAT32 else 8)
    if not a.training or (a.running_mean == NULL and a.running_var == NULL):
        return 0
    kept.before = <char*>alloc(2 * kept.nbytes)
    if kept.before == NULL:
        raise MemoryError(f"cbn: could not allocate {2 * kept.nbytes} bytes of scratch "
                          "memory")
    if a.running_mean != NULL:
        memcpy(kept.before, a.running_mean, kept.nbytes)
    if a.running_var != NULL:
        memcpy(kept.before + kept.nbytes, a.running_var, kept.nbytes)
    return 0


cdef int after_forward(int status, const cbn_desc* d, const cbn_forward_args* a, Kept* kept,
                       object x, object y, object residual, object weight, object bias,
                       object running_mean, object running_var, object save_mean,
                       object save_invstd) except -1:
    """After cbn_forward: raise for its status; after a training forward where some
    channel's statistics may be 0, NaN or inf (any_suspect), the edge rescue
    (cbn/_rescue.py, its one caller) with the running statistics kept before. x, y,
    residual: arrays of M*C*K values (the (M, C, K) view or the caller's C-contiguous
    layout). Releases what keep_running kept."""
    cdef Py_ssize_t n = kept.nbytes
    cdef tuple shape3
    try:
        check(status, d.msg)
        if a.training and any_suspect(a.save_invstd, d.C, d.compute):
            shape3 = (d.M, d.C, d.K)
            _edge_rescue(x.reshape(shape3), y.reshape(shape3),
                         None if residual is None else residual.reshape(shape3),
                         a.act.kind, a.act.negative_slope, weight, bias, running_mean,
                         running_var,
                         PyBytes_FromStringAndSize(kept.before, n)
                         if a.running_mean != NULL else None,
                         PyBytes_FromStringAndSize(kept.before + n, n)
                         if a.running_var != NULL else None,
                         save_mean, save_invstd, a.momentum, a.eps)
    finally:
        free(kept.before)
        kept.before = NULL
    return 0


# ------------------------------------------------- the general path's entries (functional)

def forward_train(cnp.ndarray x, cnp.ndarray y, weight, bias, running_mean, running_var,
                  cnp.ndarray save_mean, cnp.ndarray save_invstd, double momentum,
                  double eps, int nthreads, residual=None, int activation=0,
                  double negative_slope=0.01):
    """Training forward on (M, C, K) arrays: batch statistics, running-statistics update
    (arrays that are None are skipped), y = act(normalize(x) + residual), and the edge
    rescue where the statistics need it (after_forward). All arrays C-contiguous, of x's
    dtype (checked by the caller); activation: a cbn_act_kind."""
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_forward_args a
    cdef Kept kept
    cdef int st
    init_desc(&d, x, nthreads, msg)
    memset(&a, 0, sizeof(a))
    a.training = 1
    a.act = make_act(activation, negative_slope)
    a.momentum = momentum
    a.eps = eps
    a.x = data(x)
    a.y = <void*>data(y)
    a.residual = data(residual)
    a.weight = data(weight)
    a.bias = data(bias)
    a.running_mean = <void*>data(running_mean)
    a.running_var = <void*>data(running_var)
    a.save_mean = <void*>data(save_mean)
    a.save_invstd = <void*>data(save_invstd)
    keep_running(&d, &a, &kept)
    with nogil:
        st = cbn_forward(&d, &a)
    after_forward(st, &d, &a, &kept, x, y, residual, weight, bias, running_mean,
                  running_var, save_mean, save_invstd)


def forward_eval(cnp.ndarray x, cnp.ndarray y, weight, bias, cnp.ndarray running_mean,
                 cnp.ndarray running_var, cnp.ndarray save_mean, cnp.ndarray save_invstd,
                 double eps, int nthreads, residual=None, int activation=0,
                 double negative_slope=0.01):
    """Eval forward on (M, C, K) arrays: invstd, scale and shift from the running
    statistics, then y = act((x - running_mean) * scale + shift + residual) in one pass;
    save_mean = running_mean."""
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_forward_args a
    cdef Kept kept
    cdef int st
    init_desc(&d, x, nthreads, msg)
    memset(&a, 0, sizeof(a))
    a.act = make_act(activation, negative_slope)
    a.eps = eps
    a.x = data(x)
    a.y = <void*>data(y)
    a.residual = data(residual)
    a.weight = data(weight)
    a.bias = data(bias)
    a.running_mean = <void*>data(running_mean)
    a.running_var = <void*>data(running_var)
    a.save_mean = <void*>data(save_mean)
    a.save_invstd = <void*>data(save_invstd)
    keep_running(&d, &a, &kept)
    with nogil:
        st = cbn_forward(&d, &a)
    after_forward(st, &d, &a, &kept, x, y, residual, weight, bias, running_mean,
                  running_var, save_mean, save_invstd)


def affine(cnp.ndarray x, cnp.ndarray y, cnp.ndarray mean, cnp.ndarray scale,
           cnp.ndarray shift, residual, int activation, int nthreads,
           double negative_slope=0.01):
    """y = act((x - mean) * scale + shift + residual) on (M, C, K) arrays: the eval
    forward once scale = weight * invstd and shift = bias are known."""
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_normalize_args a
    cdef int st
    init_desc(&d, x, nthreads, msg)
    a.act = make_act(activation, negative_slope)
    a.x = data(x)
    a.residual = data(residual)
    a.y = <void*>data(y)
    a.mean = data(mean)
    a.scale = data(scale)
    a.shift = data(shift)
    with nogil:
        st = cbn_normalize(&d, &a)
    check(st, msg)


def backward(cnp.ndarray grad_output, cnp.ndarray x, cnp.ndarray grad_input, weight,
             cnp.ndarray mean, cnp.ndarray invstd, cnp.ndarray grad_weight,
             cnp.ndarray grad_bias, bint training, int nthreads, output=None,
             grad_residual=None, int activation=-1, double negative_slope=0.01, bias=None,
             residual=None):
    """Backward of batch normalization on (M, C, K) arrays.

    Training: one pass of per-channel sums, then dx = (dy - k1 - (x - mean) * k2) * scale.
    Eval: one pass that both sums (for grad_weight, grad_bias) and writes dx = dy * scale.
    dy is multiplied by the activation's derivative inside those passes (read from
    `output`, the forward's output, or from the pre-activation recomputed from x, bias and
    `residual`: see cbn_backward_args); `grad_residual`, if given, receives that dy in the
    first pass. activation -1: relu where output is given, else none.
    """
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_backward_args a
    cdef int st
    init_desc(&d, x, nthreads, msg)
    memset(&a, 0, sizeof(a))
    a.training = training
    if activation < 0:
        activation = CBN_ACT_NONE if output is None else CBN_ACT_RELU
    a.act = make_act(activation, negative_slope)
    a.grad_output = data(grad_output)
    a.x = data(x)
    a.output = data(output)
    a.residual = data(residual)
    a.weight = data(weight)
    a.bias = data(bias)
    a.save_mean = data(mean)
    a.save_invstd = data(invstd)
    a.grad_input = <void*>data(grad_input)
    a.grad_weight = <void*>data(grad_weight)
    a.grad_bias = <void*>data(grad_bias)
    a.grad_residual = <void*>data(grad_residual)
    with nogil:
        st = cbn_backward(&d, &a)
    check(st, msg)


def eval_params(weight, bias, cnp.ndarray running_var, double eps, cnp.ndarray save_invstd,
                cnp.ndarray scale, cnp.ndarray shift):
    """Per-channel parameters of the eval forward: invstd = 1/sqrt(rv + eps) (0 where
    rv + eps == 0), scale = weight * invstd, shift = bias (weight/bias None: 1, 0).
    Contiguous (C,) arrays of one dtype (checked by the caller)."""
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_eval_params_args a
    init_desc(&d, running_var, 1, msg)
    a.eps = eps
    a.weight = data(weight)
    a.bias = data(bias)
    a.running_var = data(running_var)
    a.invstd = <void*>data(save_invstd)
    a.scale = <void*>data(scale)
    a.shift = <void*>data(shift)
    check(cbn_eval_params(&d, &a), msg)


def invstd(floating[::1] var, double eps, floating[::1] out):
    """out = 1/sqrt(var + eps), 0 where var + eps == 0."""
    cdef Py_ssize_t c
    for c in range(var.shape[0]):
        out[c] = <floating>inv_sqrt(<double>var[c] + eps)


# ------------------------------------------------------ the stages, one at a time (Python)
#
# cbn/_stages.py wraps these for SyncBatchNorm and PreciseBN. Per-channel statistics are
# float64 (C,) arrays; data arrays are C-contiguous (M, C, K) of one dtype.

cdef cnp.ndarray zeros_f64(Py_ssize_t n):
    cdef cnp.npy_intp nc = n
    return cnp.PyArray_ZEROS(1, &nc, cnp.NPY_FLOAT64, 0)


def moments(cnp.ndarray x, int nthreads):
    """(count, mean, m2) of each channel of the (M, C, K) array x: count an int, mean and
    m2 (the sum of squared deviations from the mean) float64 (C,) arrays."""
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_moments_args a
    cdef int st
    init_desc(&d, x, nthreads, msg)
    cdef cnp.ndarray mean = zeros_f64(d.C)
    cdef cnp.ndarray m2 = zeros_f64(d.C)
    a.x = data(x)
    a.mean = <double*>cnp.PyArray_DATA(mean)
    a.m2 = <double*>cnp.PyArray_DATA(m2)
    with nogil:
        st = cbn_moments(&d, &a)
    check(st, msg)
    return d.M * d.K, mean, m2


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


def finish(Py_ssize_t count, mean, m2, double eps, weight, bias, running_mean, running_var,
           double momentum, cnp.ndarray save_mean, cnp.ndarray save_invstd,
           cnp.ndarray scale, cnp.ndarray shift):
    """The finish stage from merged moments (count values per channel; mean and m2
    float64 (C,) arrays): writes save_mean, save_invstd, scale and shift, and updates the
    running statistics that are not None, exactly as the fused training forward does.
    Per-channel arrays: C-contiguous, of one dtype (that of save_mean)."""
    cdef cnp.ndarray am = np_copy_f64(mean), a2 = np_copy_f64(m2)
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_finish_args a
    init_desc(&d, save_mean, 1, msg)
    a.count = count
    a.momentum = momentum
    a.eps = eps
    a.mean = <double*>cnp.PyArray_DATA(am)
    a.m2 = <double*>cnp.PyArray_DATA(a2)
    a.weight = data(weight)
    a.bias = data(bias)
    a.running_mean = <void*>data(running_mean)
    a.running_var = <void*>data(running_var)
    a.save_mean = <void*>data(save_mean)
    a.save_invstd = <void*>data(save_invstd)
    a.scale = <void*>data(scale)
    a.shift = <void*>data(shift)
    check(cbn_finish(&d, &a), msg)


def backward_reduce(cnp.ndarray grad_output, cnp.ndarray x, cnp.ndarray mean, int nthreads,
                    output=None, int activation=-1, double negative_slope=0.01, scale=None,
                    shift=None, residual=None):
    """(sum_dy, sum_dy_xmu): float64 (C,) arrays of sum(dy) and sum(dy * (x - mean)) per
    channel of the (M, C, K) arrays, dy times the activation's derivative (from `output`,
    the forward's output, or the pre-activation (x - mean) * scale + shift + residual;
    activation -1: relu where output is given)."""
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_reduce_args a
    cdef int st
    init_desc(&d, x, nthreads, msg)
    cdef cnp.ndarray sg = zeros_f64(d.C)
    cdef cnp.ndarray sgx = zeros_f64(d.C)
    if activation < 0:
        activation = CBN_ACT_NONE if output is None else CBN_ACT_RELU
    a.act = make_act(activation, negative_slope)
    a.grad_output = data(grad_output)
    a.x = data(x)
    a.output = data(output)
    a.residual = data(residual)
    a.mean = data(mean)
    a.scale = data(scale)
    a.shift = data(shift)
    a.sum_dy = <double*>cnp.PyArray_DATA(sg)
    a.sum_dy_xmu = <double*>cnp.PyArray_DATA(sgx)
    with nogil:
        st = cbn_backward_reduce(&d, &a)
    check(st, msg)
    return sg, sgx


def backward_elements(cnp.ndarray grad_output, cnp.ndarray x, weight, cnp.ndarray mean,
                      cnp.ndarray invstd, sum_dy, sum_dy_xmu, Py_ssize_t count,
                      cnp.ndarray grad_input, int nthreads, output=None, int activation=-1,
                      double negative_slope=0.01, bias=None, residual=None):
    """The training backward's element pass with global sums: grad_input = (dy - k1 -
    (x - mean) * k2) * weight * invstd, k1 = sum_dy / count, k2 = invstd^2 * sum_dy_xmu /
    count, exactly as the fused backward computes it when count is the local count
    (activation -1: relu where output is given)."""
    cdef cnp.ndarray s1 = np_copy_f64(sum_dy), s2 = np_copy_f64(sum_dy_xmu)
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_elements_args a
    cdef int st
    init_desc(&d, x, nthreads, msg)
    if activation < 0:
        activation = CBN_ACT_NONE if output is None else CBN_ACT_RELU
    a.act = make_act(activation, negative_slope)
    a.count = count
    a.grad_output = data(grad_output)
    a.x = data(x)
    a.output = data(output)
    a.residual = data(residual)
    a.weight = data(weight)
    a.bias = data(bias)
    a.mean = data(mean)
    a.invstd = data(invstd)
    a.sum_dy = <double*>cnp.PyArray_DATA(s1)
    a.sum_dy_xmu = <double*>cnp.PyArray_DATA(s2)
    a.grad_input = <void*>data(grad_input)
    with nogil:
        st = cbn_backward_elements(&d, &a)
    check(st, msg)
