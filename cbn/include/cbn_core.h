/* cbn_core.h: the kernel core's plain interface, with no Python in it.
 *
 * Every operation and stage of cbn has one entry (cbn/_kernels.pyx, `cdef ... noexcept
 * nogil`) that takes a descriptor (cbn_desc: dtypes, the (M, C, K) view, the thread
 * count, optional scratch, a message buffer) and the operation's own typed arguments
 * (cbn_*_args: pointers and scalars), returns a cbn_status and, on an error, writes a
 * message into the descriptor's buffer. An entry never raises, never touches a Python
 * object and can run without the GIL from any thread. Arguments are not validated
 * beyond what the core cannot run (an unsupported dtype or activation, a view that is
 * not C-contiguous, memory): validation is the caller's (cbn.functional).
 *
 * Layout: every field has a fixed width, pointers excepted; the structs hold no
 * compiler-specific types, so the C ABI (cbn/include/cbn.h) can expose them as they are.
 *
 * The two tables below (dtypes, activations) are the lists the rest of the core is
 * generated from: a new row here, and its loops, is a new dtype or activation.
 */
#ifndef CBN_CORE_H
#define CBN_CORE_H

#include <stdint.h>

#define CBN_DESC_VERSION 1

/* X(NAME, code, name string, bytes): storage and compute dtypes. The loops exist for
   storage == compute in {FLOAT32, FLOAT64}, and for FLOAT16 and BFLOAT16 storage
   computed in FLOAT32 (converted in registers: exactly the FLOAT32 loops' arithmetic on
   the exactly converted values, each output rounded once, to nearest even). */
#define CBN_DTYPES(X)                                                                   \
    X(FLOAT32, 0, "float32", 4)                                                         \
    X(FLOAT64, 1, "float64", 8)                                                         \
    X(FLOAT16, 2, "float16", 2)                                                         \
    X(BFLOAT16, 3, "bfloat16", 2)

typedef enum cbn_dtype {
#define CBN_X_(NAME, CODE, STR, SIZE) CBN_##NAME = CODE,
    CBN_DTYPES(CBN_X_)
#undef CBN_X_
    CBN_NDTYPES
} cbn_dtype;

/* X(NAME, code, name string, derivative from): the fused activations, torch's
   definitions, applied to z = bn(x) + residual:
     NONE        z
     RELU        z < 0 ? 0 : z                       (NaN stays NaN)
     RELU6       min(max(z, 0), 6)
     LEAKY_RELU  z > 0 ? z : z * negative_slope
     SILU        z / (1 + exp(-z))  (z * sigmoid(z))
     HARDSWISH   z * min(max(z + 3, 0), 6) / 6
   "derivative from" says what the backward reads to apply the derivative: OUT, the
   forward's output y (relu: y > 0; relu6: 0 < y < 6; leaky_relu: y > 0 ? 1 :
   negative_slope, which needs negative_slope >= 0), or Z, the pre-activation that the
   backward recomputes in its own pass from x, the mean, weight * invstd, the bias and the
   residual (silu: s (1 + z (1 - s)), s = sigmoid(z); hardswish: 0 below -3, z/3 + 1/2 up
   to 3, 1 above). */
#define CBN_ACTIVATIONS(X)                                                              \
    X(NONE, 0, "none", NONE)                                                            \
    X(RELU, 1, "relu", OUT)                                                             \
    X(RELU6, 2, "relu6", OUT)                                                           \
    X(LEAKY_RELU, 3, "leaky_relu", OUT)                                                 \
    X(SILU, 4, "silu", Z)                                                               \
    X(HARDSWISH, 5, "hardswish", Z)

typedef enum cbn_act_kind {
#define CBN_X_(NAME, CODE, STR, FROM) CBN_ACT_##NAME = CODE,
    CBN_ACTIVATIONS(CBN_X_)
#undef CBN_X_
    CBN_NACTS
} cbn_act_kind;

typedef enum cbn_status {
    CBN_OK = 0,
    CBN_ERR_ARG = 1,        /* an argument the core cannot run (view, activation, op) */
    CBN_ERR_DTYPE = 2,      /* a storage/compute dtype pair without loops */
    CBN_ERR_NOMEM = 3       /* scratch memory could not be allocated */
} cbn_status;

/* The fused activation and its parameter. */
typedef struct cbn_act {
    int32_t kind;               /* cbn_act_kind */
    int32_t reserved;           /* 0 */
    double negative_slope;      /* LEAKY_RELU only */
} cbn_act;

/* What every call shares. The data arrays are the (M, C, K) view of the input, strides
   in elements (the loops run C-contiguous views: stride_m = C*K, stride_c = K,
   stride_k = 1; anything else is CBN_ERR_ARG); per-channel vectors are C contiguous
   values of the compute dtype. */
typedef struct cbn_desc {
    int32_t version;            /* CBN_DESC_VERSION */
    int32_t storage;            /* cbn_dtype of the (M, C, K) arrays */
    int32_t compute;            /* cbn_dtype of per-channel vectors and the arithmetic */
    int32_t nthreads;           /* threads asked for (>= 1; the adaptive team may use 1) */
    int64_t M, C, K;
    int64_t stride_m, stride_c, stride_k;
    void* scratch;              /* optional: scratch_bytes of memory aligned to 64 bytes */
    int64_t scratch_bytes;      /* (too small or NULL: the entry allocates its own) */
    char* msg;                  /* optional: an error's message, NUL-terminated */
    int64_t msg_size;
} cbn_desc;

/* Training or eval forward: y = act((x - mean) * weight * invstd + bias + residual).
   Training: the batch statistics into save_mean, save_invstd (1/sqrt(biased var + eps),
   0 where that is 0) and, where not NULL, running <- (1 - momentum) * running +
   momentum * batch (unbiased variance). Eval: running_mean, running_var normalize,
   save_mean = running_mean, save_invstd from running_var. */
typedef struct cbn_forward_args {
    int32_t training;
    int32_t reserved;
    cbn_act act;
    double momentum, eps;
    const void* x;              /* storage dtype, the view */
    const void* residual;       /* or NULL; the view */
    void* y;                    /* the view; may be x */
    const void* weight;         /* compute dtype, C values; NULL: ones */
    const void* bias;           /* NULL: zeros */
    void* running_mean;         /* NULL: no update (training); required in eval */
    void* running_var;
    void* save_mean;            /* C values, written */
    void* save_invstd;
} cbn_forward_args;

/* normalize: y = act((x - mean) * scale + shift + residual). */
typedef struct cbn_normalize_args {
    cbn_act act;
    const void* x;
    const void* residual;       /* or NULL */
    void* y;                    /* may be x */
    const void* mean;
    const void* scale;
    const void* shift;
} cbn_normalize_args;

/* eval parameters (C values only; the view's M and K are ignored): invstd =
   1/sqrt(running_var + eps) (0 where that is 0), scale = weight * invstd, shift = bias. */
typedef struct cbn_eval_params_args {
    double eps;
    const void* weight;         /* NULL: ones */
    const void* bias;           /* NULL: zeros */
    const void* running_var;
    void* invstd;
    void* scale;
    void* shift;
} cbn_eval_params_args;

/* Training backward: dx = (g - sum(g)/n - (x - mean) * invstd^2 * sum(g (x - mean))/n) *
   weight * invstd, with g = grad_output times the activation's derivative; eval: dx =
   g * weight * invstd. grad_weight = sum(g (x - mean)) * invstd, grad_bias = sum(g);
   grad_residual (if not NULL) = g. The activation's derivative reads output (the
   forward's y: relu, relu6, leaky_relu) or recomputes z from x, save_mean, weight *
   invstd, bias and residual (silu, hardswish), in the passes that read x anyway. */
typedef struct cbn_backward_args {
    int32_t training;
    int32_t reserved;
    cbn_act act;
    const void* grad_output;    /* the view */
    const void* x;
    const void* output;         /* the forward's y (OUT activations), else NULL */
    const void* residual;       /* the forward's residual (Z activations) or NULL */
    const void* weight;         /* NULL: ones */
    const void* bias;           /* the forward's bias (Z activations); NULL: zeros */
    const void* save_mean;
    const void* save_invstd;
    void* grad_input;           /* the view; may be grad_output */
    void* grad_weight;          /* C values, or NULL */
    void* grad_bias;            /* C values, or NULL */
    void* grad_residual;        /* the view, or NULL */
} cbn_backward_args;

/* moments stage: per channel, count (the same for all: M*K), mean and m2 (the sum of
   squared deviations), float64. */
typedef struct cbn_moments_args {
    const void* x;
    double* mean;               /* C values, written */
    double* m2;
} cbn_moments_args;

/* finish stage from merged moments (count values per channel): save_mean, save_invstd,
   scale = weight * invstd, shift = bias, and the running update where not NULL. */
typedef struct cbn_finish_args {
    double count, momentum, eps;
    const double* mean;         /* C float64 values */
    const double* m2;
    const void* weight;
    const void* bias;
    void* running_mean;
    void* running_var;
    void* save_mean;
    void* save_invstd;
    void* scale;
    void* shift;
} cbn_finish_args;

/* backward reduce stage: sum(g) and sum(g (x - mean)) per channel, float64, g as in
   cbn_backward_args (scale: weight * invstd, needed by Z activations only). */
typedef struct cbn_reduce_args {
    cbn_act act;
    const void* grad_output;
    const void* x;
    const void* output;
    const void* residual;
    const void* mean;
    const void* scale;          /* NULL unless a Z activation */
    const void* shift;          /* NULL: zeros */
    double* sum_dy;             /* C values, written */
    double* sum_dy_xmu;
} cbn_reduce_args;

/* backward element stage: dx = (g - k1 - (x - mean) * k2) * weight * invstd with
   k1 = sum_dy / count, k2 = invstd^2 * sum_dy_xmu / count. */
typedef struct cbn_elements_args {
    cbn_act act;
    double count;
    const void* grad_output;
    const void* x;
    const void* output;
    const void* residual;
    const void* weight;
    const void* bias;
    const void* mean;
    const void* invstd;
    const double* sum_dy;
    const double* sum_dy_xmu;
    void* grad_input;
} cbn_elements_args;

#endif /* CBN_CORE_H */
