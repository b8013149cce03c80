# Declarations of cbn's C loops (cbn/src/*.h) for cbn/_kernels.pyx.

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


cdef extern from "cbn_kernels.h" nogil:
    # One CPU target's C loops for one dtype; data pointers untyped, scalars widened to
    # double (see cbn/src/cbn_kernels.h and cbn_ops.h for each loop's contract).
    ctypedef struct cbn_carry:
        const void* x
        const void* residual
        void* y
        double mean, scale, shift
        int act
        double slope

    ctypedef struct cbn_ops:
        void (*runs_moments)(const void* p, Py_ssize_t nruns, Py_ssize_t n,
                             Py_ssize_t stride, double* mean, double* m2, int pf,
                             const cbn_carry* carry) noexcept nogil
        void (*runs_sums)(const void* g, const void* x, const void* ym, const void* res,
                          void* dx, void* gr, Py_ssize_t nruns, Py_ssize_t n,
                          Py_ssize_t stride, double mean, double scale, double shift,
                          int act, double slope, double* sg, double* sgx,
                          int pf) noexcept nogil
        void (*runs_affine)(const void* x, const void* residual, void* y,
                            Py_ssize_t nruns, Py_ssize_t n, const void* mean,
                            const void* scale, const void* shift, int act,
                            double slope) noexcept nogil
        void (*runs_bwd)(const void* x, const void* g, const void* ym, const void* res,
                         void* dx, Py_ssize_t nruns, Py_ssize_t n, const void* mean,
                         const void* scale, const void* shift, const void* gmean,
                         const void* xcoef, int act, double slope) noexcept nogil
        void (*cols_shifted_sums)(const void* p, Py_ssize_t R, Py_ssize_t w,
                                  const void* shift, void* s1, void* s2) noexcept nogil
        void (*cols_dev)(const void* p, Py_ssize_t R, Py_ssize_t w, const void* mean,
                         void* s1, void* s2) noexcept nogil
        void (*cols_sums)(const void* g, const void* x, const void* ym, const void* res,
                          void* dx, void* gr, Py_ssize_t R, Py_ssize_t w, const void* mean,
                          const void* scale, const void* shift, int act, double slope,
                          void* sg, void* sgx) noexcept nogil
        void (*cols_affine)(const void* x, const void* residual, void* y, Py_ssize_t R,
                            Py_ssize_t w, const void* mean, const void* scale,
                            const void* shift, int act, double slope) noexcept nogil
        void (*cols_bwd)(const void* x, const void* g, const void* ym, const void* res,
                         void* dx, Py_ssize_t R, Py_ssize_t w, const void* mean,
                         const void* scale, const void* shift, const void* gmean,
                         const void* xcoef, int act, double slope) noexcept nogil
        void (*run_affine_stream)(const void* x, const void* residual, void* y,
                                  Py_ssize_t n, double mean, double scale, double shift,
                                  int act, double slope) noexcept nogil
        void (*run_bwd_stream)(const void* x, const void* g, const void* ym,
                               const void* res, void* dx, Py_ssize_t n, double mean,
                               double scale, double shift, double gmean, double xcoef,
                               int act, double slope) noexcept nogil
        void (*rows_affine_stream)(const void* x, const void* residual, void* y,
                                   Py_ssize_t R, Py_ssize_t w, const void* mean,
                                   const void* scale, const void* shift, int act,
                                   double slope) noexcept nogil
        void (*rows_bwd_stream)(const void* x, const void* g, const void* ym,
                                const void* res, void* dx, Py_ssize_t R, Py_ssize_t w,
                                const void* mean, const void* scale, const void* shift,
                                const void* gmean, const void* xcoef, int act,
                                double slope) noexcept nogil

    int cbn_act_needs_z(int act) noexcept

    const cbn_ops* cbn_ops_f() noexcept
    const cbn_ops* cbn_ops_d() noexcept
    const cbn_ops* cbn_ops_h() noexcept
    const cbn_ops* cbn_ops_b() noexcept
    # half-precision storage (computed in float): 16 bits, no arithmetic on them
    ctypedef struct cbn_f16:
        unsigned short bits
    ctypedef struct cbn_bf16:
        unsigned short bits
    # their exact widening to float (cbn/src/cbn_simd.h), for the scalar reads of the core
    float cbn_f16_to_f32(unsigned short bits) noexcept
    float cbn_bf16_to_f32(unsigned short bits) noexcept
    const char* cbn_target_name() noexcept
    int cbn_target_count() noexcept
    const char* cbn_target_at(int i) noexcept
    int cbn_target_supported_at(int i) noexcept
    int cbn_select_target(const char* name) noexcept
    const char* cbn_build_flags() noexcept
    void cbn_sfence() noexcept


cdef extern from "cbn_team.h" nogil:
    # Adaptive team size under contention (see cbn/src/cbn_team.h).
    ctypedef long long int64_t
    int cbn_team_adaptive
    int64_t cbn_team_serial_until
    int64_t cbn_team_backoff
    int64_t cbn_team_stalls
    int cbn_team_started
    int64_t cbn_now_ns() noexcept
    int cbn_team_size(int requested) noexcept
    void cbn_team_report(int64_t wall, int64_t busy, int nthreads) noexcept


cdef extern from "cbn_cache.h" nogil:
    # The last-level cache, read once at import (see cbn/src/cbn_cache.h).
    long long cbn_cache_size
    long long cbn_l2_size
    int cbn_cache_level
    int cbn_cache_sharing
    const char* cbn_cache_source
    void cbn_cache_probe() noexcept


cdef extern from "cbn_core.h" nogil:
    # The core's descriptor and per-operation arguments (see cbn/include/cbn_core.h).
    ctypedef int int32_t
    enum: CBN_DESC_VERSION
    ctypedef enum cbn_dtype:
        CBN_FLOAT32, CBN_FLOAT64, CBN_FLOAT16, CBN_BFLOAT16, CBN_NDTYPES
    ctypedef enum cbn_act_kind:
        CBN_ACT_NONE, CBN_ACT_RELU, CBN_ACT_RELU6, CBN_ACT_LEAKY_RELU, CBN_ACT_SILU,
        CBN_ACT_HARDSWISH, CBN_NACTS
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
