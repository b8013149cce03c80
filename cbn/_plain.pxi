# ------------------------------------------------------------------- plain-call fast path
#
# Small inputs spend most of a call in Python: checking arguments, building views,
# allocating. The common call (a C-contiguous float32/float64/float16/bfloat16 ndarray in
# native byte order, per-channel vectors that are already C-contiguous (C,) arrays of its
# compute dtype (float32 for half inputs, torch's mixed mode); out, a residual or a ReLU
# output of the input's kind) is recognised here with a few C tests and run directly.
# Recognising is not validating: anything else, invalid calls included, returns None and
# cbn.functional takes its general path, which validates and raises its usual errors.

cdef inline bint plain_array(object a, int typenum):
    """A C-contiguous, aligned ndarray (not a subclass) of typenum in native byte order
    (the C loops read and write elements in place: a misaligned one is undefined
    behaviour in C, so such arrays take the general path, which copies them)."""
    return (cnp.PyArray_CheckExact(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a)
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)
            and cnp.PyArray_ISALIGNED(<cnp.ndarray>a))


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
    if dtype_code(typ) < 0:
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


cdef inline int vec_type(int typ) noexcept:
    """The type number of a plain call's per-channel vectors: the compute dtype's."""
    return cnp.NPY_FLOAT32 if typ != cnp.NPY_FLOAT64 and typ != cnp.NPY_FLOAT32 else typ


cdef object plain_out(object out, object x, int typ):
    """A new array like x if out is None; out itself if it is a plain, writeable array of
    x's shape that is x or does not overlap it; else None (not plain)."""
    cdef char* a
    cdef char* b
    cdef Py_ssize_t n
    if out is None:
        return pool_empty(cnp.PyArray_NDIM(<cnp.ndarray>x), cnp.PyArray_DIMS(<cnp.ndarray>x),
                          typ)
    if not (plain_array(out, typ) and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)
            and cnp.PyArray_SAMESHAPE(<cnp.ndarray>out, <cnp.ndarray>x)):
        return None
    a = <char*>cnp.PyArray_DATA(<cnp.ndarray>out)
    b = <char*>cnp.PyArray_DATA(<cnp.ndarray>x)
    n = cnp.PyArray_NBYTES(<cnp.ndarray>x)
    if a == b or a + n <= b or b + n <= a:
        return out
    return None


#: cbn._threads.call_threads, registered by cbn._threads at import: the one home of the
#: thread policy (set_num_threads, OMP_NUM_THREADS, forked children, the clip)
cdef object thread_resolver = None


def _set_thread_resolver(resolver):
    """Register the function that resolves a plain call's thread count (cbn._threads)."""
    global thread_resolver
    thread_resolver = resolver


cdef int plain_threads(object n_threads, object x, Py_ssize_t size,
                       Py_ssize_t min_parallel) except -2:
    """Threads for a plain call; -1 (not plain) unless n_threads is None or an int >= 1.
    Inputs under min_parallel values run on one thread, which is right whatever the policy
    says (so small calls do not pay for asking); larger ones ask cbn._threads."""
    cdef object n
    if n_threads is not None and not (type(n_threads) is int and n_threads >= 1):
        return -1
    if size < min_parallel:
        return 1
    n = thread_resolver(n_threads, x) if thread_resolver is not None else n_threads
    if n is None:
        return cbn_max_threads()
    if type(n) is not int or not 1 <= n <= 4096:
        return -1
    return n


cdef inline void plain_desc(cbn_desc* d, object x, Py_ssize_t M, Py_ssize_t C,
                            Py_ssize_t K, int nt, char* msg):
    """Fill *d as the descriptor of a plain call on x viewed as (M, C, K)."""
    init_desc(d, <cnp.ndarray>x, nt, msg)
    set_view(d, M, C, K)




def plain_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                  axis, n_threads, Py_ssize_t min_parallel, residual=None, int activation=0,
                  out=None, double negative_slope=0.01):
    """batch_norm_forward's plain call: (y, save_mean, save_invstd), or None when the call
    is not plain (then nothing was computed or written). n_threads None means
    omp_get_max_threads(); inputs under min_parallel values run on one thread. A residual
    must be a plain array of the input's shape and dtype; so must out, which may be x
    itself but must not otherwise overlap it. activation: a cbn_act_kind. A training
    call whose statistics need it gets the edge rescue (see after_forward)."""
    cdef Py_ssize_t M, C, K
    cdef int typ = plain_dims(x, axis, &M, &C, &K), nt
    cdef double e, mom = 0.0
    if typ < 0 or type(eps) is not float:
        return None
    cdef int vt = vec_type(typ)
    e = eps
    if not (0.0 <= e < float("inf")):
        return None
    if not plain_vec(weight, C, vt, False) or not plain_vec(bias, C, vt, False):
        return None
    if not plain_like(residual, x, typ):
        return None
    if training is True:
        if type(momentum) is not float or M * K == 1:
            return None
        if (not plain_vec(running_mean, C, vt, True)
                or not plain_vec(running_var, C, vt, True)):
            return None
        mom = momentum
    elif training is False:
        if (running_mean is None or running_var is None
                or not plain_vec(running_mean, C, vt, False)
                or not plain_vec(running_var, C, vt, False)):
            return None
    else:
        return None
    nt = plain_threads(n_threads, x, M * C * K, min_parallel)
    y = None if nt < 0 else plain_out(out, x, typ)
    if y is None:
        return None
    cdef cnp.npy_intp nc = C
    cdef cnp.ndarray sm = cnp.PyArray_EMPTY(1, &nc, vt, 0)
    cdef cnp.ndarray si = cnp.PyArray_EMPTY(1, &nc, vt, 0)
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_forward_args a
    cdef Kept kept
    cdef int st
    plain_desc(&d, x, M, C, K, nt, msg)
    a.training = training is True
    a.reserved = 0
    a.act = make_act(activation, negative_slope)
    a.momentum = mom
    a.eps = e
    a.x = data(x)
    a.y = <void*>data(y)
    a.residual = data(residual)
    a.weight = data(weight)
    a.bias = data(bias)
    a.running_mean = <void*>data(running_mean)
    a.running_var = <void*>data(running_var)
    a.save_mean = <void*>data(sm)
    a.save_invstd = <void*>data(si)
    keep_running(&d, &a, &kept)
    with nogil:
        st = cbn_forward(&d, &a)
    after_forward(st, &d, &a, &kept, x, y, residual, weight, bias, running_mean, running_var,
                  sm, si)
    return y, sm, si


cdef inline bint disjoint(object a, object b):
    """a and b (plain arrays of one size, or b None) share no memory."""
    cdef char* p
    cdef char* q
    cdef Py_ssize_t n
    if b is None:
        return True
    p = <char*>cnp.PyArray_DATA(<cnp.ndarray>a)
    q = <char*>cnp.PyArray_DATA(<cnp.ndarray>b)
    n = cnp.PyArray_NBYTES(<cnp.ndarray>a)
    return p + n <= q or q + n <= p


def plain_backward(grad_output, x, weight, save_mean, save_invstd, training, axis,
                   n_threads, Py_ssize_t min_parallel, output=None, bint residual=False,
                   out=None, int activation=-1, double negative_slope=0.01):
    """batch_norm_backward's plain call: (grad_input, grad_weight, grad_bias), plus
    grad_residual if residual, or None when the call is not plain. activation: a
    cbn_act_kind whose derivative is read off output (relu, relu6, leaky_relu), or -1:
    relu where output is given; output (the forward's output) must be a plain array of
    the input's shape. out
    (grad_input's destination) must be a plain writeable array of the input's shape that
    is grad_output itself or shares no memory with grad_output, x and output."""
    cdef Py_ssize_t M, C, K
    cdef int typ = plain_dims(x, axis, &M, &C, &K), nt
    if typ < 0 or (training is not True and training is not False):
        return None
    cdef int vt = vec_type(typ)
    if activation < 0:
        activation = CBN_ACT_NONE if output is None else CBN_ACT_RELU
    if (activation == CBN_ACT_NONE) != (output is None) or cbn_act_needs_z(activation):
        return None
    if grad_output is None or not plain_like(grad_output, x, typ):
        return None
    if not plain_like(output, x, typ):
        return None
    if (save_mean is None or save_invstd is None or not plain_vec(weight, C, vt, False)
            or not plain_vec(save_mean, C, vt, False)
            or not plain_vec(save_invstd, C, vt, False)):
        return None
    if out is not None:
        if not (plain_like(out, x, typ) and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)
                and disjoint(out, x) and disjoint(out, output)
                and (disjoint(out, grad_output)
                     or cnp.PyArray_DATA(<cnp.ndarray>out)
                     == cnp.PyArray_DATA(<cnp.ndarray>grad_output))):
            return None
    nt = plain_threads(n_threads, x, M * C * K, min_parallel)
    if nt < 0:
        return None
    cdef cnp.npy_intp nc = C
    cdef cnp.ndarray gx = (<cnp.ndarray>out if out is not None else
                           pool_empty(cnp.PyArray_NDIM(<cnp.ndarray>x),
                                      cnp.PyArray_DIMS(<cnp.ndarray>x), typ))
    cdef cnp.ndarray gw = cnp.PyArray_EMPTY(1, &nc, vt, 0)
    cdef cnp.ndarray gb = cnp.PyArray_EMPTY(1, &nc, vt, 0)
    cdef object gr = None
    if residual:
        gr = pool_empty(cnp.PyArray_NDIM(<cnp.ndarray>x), cnp.PyArray_DIMS(<cnp.ndarray>x),
                        typ)
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_backward_args a
    cdef int st
    plain_desc(&d, x, M, C, K, nt, msg)
    memset(&a, 0, sizeof(a))
    a.training = training is True
    a.act = make_act(activation, negative_slope)
    a.grad_output = data(grad_output)
    a.x = data(x)
    a.output = data(output)
    a.weight = data(weight)
    a.save_mean = data(save_mean)
    a.save_invstd = data(save_invstd)
    a.grad_input = <void*>data(gx)
    a.grad_weight = <void*>data(gw)
    a.grad_bias = <void*>data(gb)
    a.grad_residual = <void*>data(gr)
    with nogil:
        st = cbn_backward(&d, &a)
    check(st, msg)
    return (gx, gw, gb, gr) if residual else (gx, gw, gb)


def plain_affine(x, mean, scale, shift, axis, n_threads, Py_ssize_t min_parallel,
                 residual=None, int activation=0, out=None, double negative_slope=0.01):
    """normalize's plain call: y = act((x - mean) * scale + shift + residual), or None
    when the call is not plain (out as in plain_forward)."""
    cdef Py_ssize_t M, C, K
    cdef int typ = plain_dims(x, axis, &M, &C, &K), nt
    if typ < 0 or mean is None or scale is None or shift is None:
        return None
    cdef int vt = vec_type(typ)
    if (not plain_vec(mean, C, vt, False) or not plain_vec(scale, C, vt, False)
            or not plain_vec(shift, C, vt, False)):
        return None
    if not plain_like(residual, x, typ):
        return None
    nt = plain_threads(n_threads, x, M * C * K, min_parallel)
    y = None if nt < 0 else plain_out(out, x, typ)
    if y is None:
        return None
    cdef char msg[MSG_SIZE]
    cdef cbn_desc d
    cdef cbn_normalize_args a
    cdef int st
    plain_desc(&d, x, M, C, K, nt, msg)
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
    return y
