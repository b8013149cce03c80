# cbn's C ABI for Cython: `from cbn.capi cimport *`, `cdef const cbn_api* api =
# import_cbn()` once (with the GIL, e.g. at module level), then `api.forward(&desc, &args)`
# from anywhere, inside `prange` and `with nogil` included. The declarations are those of
# cbn/include/cbn.h and cbn_core.h (their comments document every field); build the
# extension with `include_dirs=[cbn.get_include()]`.

from libc.stdint cimport int32_t, int64_t

cdef extern from "cbn.h" nogil:
    enum: CBN_ABI_VERSION
    enum: CBN_DESC_VERSION

    ctypedef enum cbn_dtype:
        CBN_FLOAT32, CBN_FLOAT64, CBN_FLOAT16, CBN_BFLOAT16
    ctypedef enum cbn_act_kind:
        CBN_ACT_NONE, CBN_ACT_RELU, CBN_ACT_RELU6, CBN_ACT_LEAKY_RELU, CBN_ACT_SILU,
        CBN_ACT_HARDSWISH
    ctypedef enum cbn_status:
        CBN_OK, CBN_ERR_ARG, CBN_ERR_DTYPE, CBN_ERR_NOMEM

    ctypedef struct cbn_act:
        int32_t kind
        int32_t reserved
        double negative_slope

    ctypedef struct cbn_desc:
        int32_t version, storage, compute, nthreads
        int64_t M, C, K
        int64_t stride_m, stride_c, stride_k
        void* scratch
        int64_t scratch_bytes
        char* msg
        int64_t msg_size

    ctypedef struct cbn_forward_args:
        int32_t training, reserved
        cbn_act act
        double momentum, eps
        const void* x
        const void* residual
        void* y
        const void* weight
        const void* bias
        void* running_mean
        void* running_var
        void* save_mean
        void* save_invstd

    ctypedef struct cbn_normalize_args:
        cbn_act act
        const void* x
        const void* residual
        void* y
        const void* mean
        const void* scale
        const void* shift

    ctypedef struct cbn_eval_params_args:
        double eps
        const void* weight
        const void* bias
        const void* running_var
        void* invstd
        void* scale
        void* shift

    ctypedef struct cbn_backward_args:
        int32_t training, reserved
        cbn_act act
        const void* grad_output
        const void* x
        const void* output
        const void* residual
        const void* weight
        const void* bias
        const void* save_mean
        const void* save_invstd
        void* grad_input
        void* grad_weight
        void* grad_bias
        void* grad_residual

    ctypedef struct cbn_moments_args:
        const void* x
        double* mean
        double* m2

    ctypedef struct cbn_finish_args:
        double count, momentum, eps
        const double* mean
        const double* m2
        const void* weight
        const void* bias
        void* running_mean
        void* running_var
        void* save_mean
        void* save_invstd
        void* scale
        void* shift

    ctypedef struct cbn_reduce_args:
        cbn_act act
        const void* grad_output
        const void* x
        const void* output
        const void* residual
        const void* mean
        const void* scale
        const void* shift
        double* sum_dy
        double* sum_dy_xmu

    ctypedef struct cbn_elements_args:
        cbn_act act
        double count
        const void* grad_output
        const void* x
        const void* output
        const void* residual
        const void* weight
        const void* bias
        const void* mean
        const void* invstd
        const double* sum_dy
        const double* sum_dy_xmu
        void* grad_input

    ctypedef struct cbn_api:
        int32_t abi_version
        int32_t size
        const char* version
        int32_t (*view)(cbn_desc*, int32_t, const int64_t*, const int64_t*,
                        int32_t) noexcept nogil
        int32_t (*forward)(const cbn_desc*, const cbn_forward_args*) noexcept nogil
        int32_t (*normalize)(const cbn_desc*, const cbn_normalize_args*) noexcept nogil
        int32_t (*eval_params)(const cbn_desc*, const cbn_eval_params_args*) noexcept nogil
        int32_t (*backward)(const cbn_desc*, const cbn_backward_args*) noexcept nogil
        int32_t (*moments)(const cbn_desc*, const cbn_moments_args*) noexcept nogil
        int32_t (*finish)(const cbn_desc*, const cbn_finish_args*) noexcept nogil
        int32_t (*backward_reduce)(const cbn_desc*, const cbn_reduce_args*) noexcept nogil
        int32_t (*backward_elements)(const cbn_desc*,
                                     const cbn_elements_args*) noexcept nogil
        const char* (*status_name)(int32_t) noexcept nogil

    const cbn_api* cbn_import() except NULL     # with the GIL; raises ImportError


cdef inline const cbn_api* import_cbn() except NULL:
    """cbn's table of entries (with the GIL; ImportError if cbn is missing or implements
    another ABI version). Keep the pointer: it is valid for the life of the process."""
    return cbn_import()
