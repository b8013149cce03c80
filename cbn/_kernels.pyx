# cython: language_level=3
"""cbn's compiled kernels: batch normalization over a C-contiguous (M, C, K) view.

Every input, whatever its ndim and channel axis, reaches these kernels as an (M, C, K) array
(see cbn.functional). Two kernel shapes cover all of them:

* planes (K >= PLANE_MIN_K): each (m, c) plane is K contiguous values of one channel; a
  unit is a block of a long plane or several short planes of one channel (runs C*K apart);
  loops run along the planes with four independent vector accumulators.
* rows (K small, e.g. channels-last where K == 1): the data is a stream of "rows" of
  W = k*C*K values (k original m-rows glued into a row of up to 8 vectors of 64 bytes
  when C*K allows, else of at least ROW_MIN_WIDTH values); loops run along the row with
  one accumulator per lane, lane t belonging to channel (t // K) % C. On AVX-512 builds
  rows of up to 8 vectors keep their lane parameters and accumulators in registers, and
  wider rows (a multiple of the vector) are walked in memory order with them in L1.

In the planes reductions, a run whose length is no multiple of the vector ends with one
vector padded with values that add exactly zero, not with a scalar loop (a latency chain).

Statistics: every block is reduced with a shift close to its mean, so nothing cancels
(never E[x^2] - E[x]^2): one streaming pass of d = x - shift and d*d around an estimate of
the mean (planes: the mean of the unit's first vector of values; rows: of the block's
first rows), and a second, corrected pass from cache wherever that estimate was far
enough off to cost accuracy (see cbn_runs_moments and rows_block_moments), so every
result is within a factor 2 of a two-pass's rounding error. Blocks are merged with Chan et
al.'s pairwise formula in double. Work is cut into items that depend on the shape only,
never on the thread count; each item's partial result goes to its own slot and the slots
are merged in item order, so the results are bit-identical for any number of threads.

The loops over contiguous data are written with GCC/Clang vector-extension lanes (see the
C block below): lane-wise IEEE arithmetic in a fixed order, no -ffast-math, no FMA
contraction, so results do not depend on the instruction set either.

Nothing here validates its arguments: cbn.functional does that before calling in. The one
exception is the plain-call fast path at the end (plain_forward, plain_backward,
plain_affine): it only recognises calls whose arrays are already what the kernels need,
and declines (returns None, having written nothing) everything else, which cbn.functional
then validates. Scratch memory is allocated (and checked) with the GIL held, before any
parallel region.
"""

cimport cython
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free

cnp.import_array()

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


# Loops over one contiguous run of a channel (the planes kernels), with explicit lanes.
#
# GCC's SLP vectorizer does not vectorize loop-carried accumulators without -ffast-math,
# so these few loops are written with vector-extension types (GCC, Clang): four
# independent vectors of 32 bytes, i.e. 32 float or 16 double lanes, combined in a fixed
# order at the end. Every operation is lane-wise IEEE arithmetic, so the result is the same
# whatever instruction set the compiler maps the vectors to (SSE2, AVX, AVX-512). Other
# compilers get the same lanes as plain arrays (same results, slower).
cdef extern from *:
    r"""
    #include <string.h>
    #include <stdint.h>
    #if defined(__GNUC__) || defined(__clang__)
    #define CBN_VEC(T, N) T __attribute__((vector_size(N * sizeof(T))))
    #define CBN_VLOAD(v, p) memcpy(&(v), (p), sizeof(v))
    #define CBN_VSTORE(p, v) memcpy((p), &(v), sizeof(v))
    #define CBN_SPLAT(V, s) ((V){0} + (s))
    #define CBN_NOINLINE __attribute__((noinline))
    #define CBN_UNROLL _Pragma("GCC unroll 8")
    #define CBN_INLINE inline __attribute__((always_inline))
    /* v = the first cnt (< L) values at p, the other lanes those of fill: the same
       vector either way. AVX-512VL builds use a masked load; elsewhere the vector is
       assembled in buf (a store-to-load forwarding stall, which cost a quarter of the
       statistics pass on short planes such as K = 196). */
    #if defined(__AVX512VL__)
    #include <immintrin.h>
    #define CBN_PART_f(v, fill, p, cnt, buf) ((void)(buf),                          \
            (v) = (cbn_v_f)_mm256_mask_loadu_ps((__m256)(fill),                       \
                                                (__mmask8)((1u << (cnt)) - 1), (p)))
    #define CBN_PART_d(v, fill, p, cnt, buf) ((void)(buf),                          \
            (v) = (cbn_v_d)_mm256_mask_loadu_pd((__m256d)(fill),                      \
                                                (__mmask8)((1u << (cnt)) - 1), (p)))
    #else
    #define CBN_PART_GENERIC(v, fill, p, cnt, buf) do {                                 \
            CBN_VSTORE(buf, fill); memcpy(buf, (p), (cnt) * sizeof((buf)[0]));           \
            CBN_VLOAD(v, buf);                                                          \
        } while (0)
    #define CBN_PART_f CBN_PART_GENERIC
    #define CBN_PART_d CBN_PART_GENERIC
    #endif
    #if defined(__AVX512F__)
    #define CBN_FX 1          /* 32 vector registers: fixed-width row loops pay off */
    #else
    #define CBN_FX 0
    #endif
    typedef float CBN_T_f;
    typedef double CBN_T_d;
    /* ReLU that keeps NaN (zero where x < 0), and ReLU's backward from the forward
       output y (g where y > 0, else 0), as lane masks. */
    #define CBN_RELU(IV, V, x) ((V)((IV)(x) & ~(IV)((x) < (V){0})))
    #define CBN_MASK(IV, V, g, y) ((V)((IV)(g) & (IV)((y) > (V){0})))
    /* One vector of the backward sums at offset i: mask, store gr, accumulate, dx. */
    #define CBN_SUMS_STEP(i, A, B) do {                                                 \
            V g_, x_, y_;                                                               \
            CBN_VLOAD(g_, g + (i)); CBN_VLOAD(x_, x + (i));                             \
            if (ym) { CBN_VLOAD(y_, ym + (i)); g_ = CBN_MASK(IV, V, g_, y_); }          \
            if (gr) CBN_VSTORE(gr + (i), g_);                                           \
            A += g_; B += g_ * (x_ - vm);                                               \
            if (dx) { x_ = g_ * vk; CBN_VSTORE(dx + (i), x_); }                         \
        } while (0)
    #else
    #error "cbn's kernels need GCC or Clang vector extensions"
    #endif

    #define CBN_DEFINE_RUNS(T, SUF, L, IT)                                                  \
    typedef CBN_VEC(T, L) cbn_v_##SUF;                                                 \
    typedef CBN_VEC(IT, L) cbn_m_##SUF;                                                \
                                                                                       \
    /* Moments of nruns >= 1 runs of n >= 1 values, run j at p + j*stride. One pass   \
       sums d = x - shift and d*d, the shift being the mean of the first (up to) L       \
       values rounded to T: m2 = S2 - S1^2/n. Where S1^2/n > S2/2 (the shift was off by  \
       more than about a standard deviation, which costs accuracy) a second pass         \
       around the mean found, the corrected two-pass formula, gives the result. */       \
    static inline void cbn_runs_moments_##SUF(const T* p, Py_ssize_t nruns, Py_ssize_t n,\
                                              Py_ssize_t stride, double* mean,          \
                                              double* m2) {                             \
        typedef cbn_v_##SUF V;                                                          \
        const Py_ssize_t B = 4 * L, nv = n - n % B, n1 = n - n % L;                     \
        const Py_ssize_t np = n < L ? n : L;                                            \
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0, b1, b2, b3, x0, x1, x2, x3;      \
        Py_ssize_t i, j, k;                                                             \
        double s = 0.0, ss = 0.0, cnt = (double)nruns * n;                              \
        T m, pad[L];                                                                    \
        const T* q;                                                                     \
        for (i = 1; i < np; i++) s += p[i] - p[0];                                      \
        m = (T)(p[0] + s / np);      /* p[0] exactly on a constant channel */           \
        s = 0.0;                                                                        \
        V vm = CBN_SPLAT(V, m);                                                         \
        b0 = b1 = b2 = b3 = (V){0};                                                     \
        for (k = 0, q = p; k < nruns; k++, q += stride) {                               \
            for (i = 0; i < nv; i += B) {                                               \
                CBN_VLOAD(x0, q + i); CBN_VLOAD(x1, q + i + L);                         \
                CBN_VLOAD(x2, q + i + 2 * L); CBN_VLOAD(x3, q + i + 3 * L);             \
                x0 -= vm; x1 -= vm; x2 -= vm; x3 -= vm;                                 \
                a0 += x0; a1 += x1; a2 += x2; a3 += x3;                                 \
                b0 += x0 * x0; b1 += x1 * x1; b2 += x2 * x2; b3 += x3 * x3;             \
            }                                                                           \
            for (; i < n1; i += L) {                                                    \
                CBN_VLOAD(x0, q + i); x0 -= vm; a0 += x0; b0 += x0 * x0;                \
            }                                                                           \
            if (i < n) {            /* the last values, padded with the shift */        \
                CBN_PART_##SUF(x1, vm, q + i, n - i, pad);                              \
                x1 -= vm; a1 += x1; b1 += x1 * x1;                                      \
            }                                                                           \
        }                                                                               \
        a0 = (a0 + a1) + (a2 + a3);                                                     \
        b0 = (b0 + b1) + (b2 + b3);                                                     \
        for (j = 0; j < L; j++) { s += a0[j]; ss += b0[j]; }                            \
        if (!(s * s / cnt > 0.5 * ss)) {                                                \
            *mean = m + s / cnt;                                                        \
            ss -= s * s / cnt;                                                          \
            *m2 = ss < 0.0 ? 0.0 : ss;                                                  \
            return;                                                                     \
        }                                                                               \
        m = (T)(m + s / cnt);        /* second pass, around the mean */                 \
        vm = CBN_SPLAT(V, m);                                                           \
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = (V){0};                                 \
        s = 0.0;                                                                        \
        ss = 0.0;                                                                       \
        for (k = 0, q = p; k < nruns; k++, q += stride) {                               \
            for (i = 0; i < nv; i += B) {                                               \
                CBN_VLOAD(x0, q + i); CBN_VLOAD(x1, q + i + L);                         \
                CBN_VLOAD(x2, q + i + 2 * L); CBN_VLOAD(x3, q + i + 3 * L);             \
                x0 -= vm; x1 -= vm; x2 -= vm; x3 -= vm;                                 \
                a0 += x0; a1 += x1; a2 += x2; a3 += x3;                                 \
                b0 += x0 * x0; b1 += x1 * x1; b2 += x2 * x2; b3 += x3 * x3;             \
            }                                                                           \
            for (; i < n1; i += L) {                                                    \
                CBN_VLOAD(x0, q + i); x0 -= vm; a0 += x0; b0 += x0 * x0;                \
            }                                                                           \
            if (i < n) {            /* the last values, padded with the shift */        \
                CBN_PART_##SUF(x1, vm, q + i, n - i, pad);                              \
                x1 -= vm; a1 += x1; b1 += x1 * x1;                                      \
            }                                                                           \
        }                                                                               \
        a0 = (a0 + a1) + (a2 + a3);                                                     \
        b0 = (b0 + b1) + (b2 + b3);                                                     \
        for (j = 0; j < L; j++) { s += a0[j]; ss += b0[j]; }                            \
        *mean = m + s / cnt;                                                            \
        ss -= s * s / cnt;                                                              \
        *m2 = ss < 0.0 ? 0.0 : ss;                                                      \
    }                                                                                   \
                                                                                        \
    /* sum(g) and sum(g * (x - mean)) over nruns runs of n values (run j at offset       \
       j*stride). If ym: g is first masked by ReLU's backward (g where ym > 0). If gr:   \
       the (masked) g is written there; if dx: dx = g * scale. All in one pass. */       \
    static CBN_INLINE void cbn_runs_sums_body_##SUF(const T* g, const T* x, const T* ym, \
                                                    T* dx, T* gr, Py_ssize_t nruns,     \
                                                    Py_ssize_t n, Py_ssize_t stride,    \
                                                    T mean, T scale, double* sg,        \
                                                    double* sgx) {                      \
        typedef cbn_v_##SUF V;                                                          \
        typedef cbn_m_##SUF IV;                                                         \
        const Py_ssize_t n1 = n - n % L, n4 = n - n % (4 * L);                          \
        const V vm = CBN_SPLAT(V, mean), vk = CBN_SPLAT(V, scale);                      \
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};\
        Py_ssize_t i, j, k, o;                                                          \
        double s = 0.0, sx = 0.0;                                                       \
        T gv, pg[L], px[L];                                                             \
        V tg, tx;                                                                       \
        for (k = 0, o = 0; k < nruns; k++, o += stride) {                               \
            for (i = 0; i < n4; i += 4 * L) {                                           \
                CBN_SUMS_STEP(o + i, a0, b0); CBN_SUMS_STEP(o + i + L, a1, b1);         \
                CBN_SUMS_STEP(o + i + 2 * L, a2, b2);                                   \
                CBN_SUMS_STEP(o + i + 3 * L, a3, b3);                                   \
            }                                                                           \
            for (; i < n1; i += L) CBN_SUMS_STEP(o + i, a0, b0);                        \
            if (i < n) {            /* the last values, padded with g = 0 */            \
                if (ym || gr || dx) {                                                   \
                    for (j = i; j < n; j++) {                                           \
                        gv = (ym && !(ym[o + j] > 0)) ? 0 : g[o + j];                   \
                        if (gr) gr[o + j] = gv;                                         \
                        if (dx) dx[o + j] = gv * scale;                                 \
                        pg[j - i] = gv;                                                 \
                    }                                                                   \
                    for (j = n - i; j < L; j++) pg[j] = 0;                              \
                    CBN_VLOAD(tg, pg);                                                  \
                } else {                                                                \
                    CBN_PART_##SUF(tg, (V){0}, g + o + i, n - i, pg);                   \
                }                                                                       \
                CBN_PART_##SUF(tx, vm, x + o + i, n - i, px);                           \
                a1 += tg; b1 += tg * (tx - vm);                                         \
            }                                                                           \
        }                                                                               \
        a0 = (a0 + a1) + (a2 + a3); b0 = (b0 + b1) + (b2 + b3);                         \
        for (j = 0; j < L; j++) { s += a0[j]; sx += b0[j]; }                            \
        *sg = s; *sgx = sx;                                                             \
    }                                                                                   \
                                                                                        \
    /* One loop per combination of the optional arrays: no tests inside the loop. */    \
    static CBN_NOINLINE void cbn_runs_sums_##SUF(const T* g, const T* x, const T* ym,   \
                                                 T* dx, T* gr, Py_ssize_t nruns,        \
                                                 Py_ssize_t n, Py_ssize_t stride,       \
                                                 T mean, T scale, double* sg,           \
                                                 double* sgx) {                         \
        _Pragma("GCC diagnostic push")                                                  \
        _Pragma("GCC diagnostic ignored \"-Wnonnull\"")                                 \
        if (ym) {                                                                       \
            if (gr) {                                                                   \
                if (dx) cbn_runs_sums_body_##SUF(g, x, ym, dx, gr, nruns, n, stride,    \
                                                 mean, scale, sg, sgx);                 \
                else cbn_runs_sums_body_##SUF(g, x, ym, NULL, gr, nruns, n, stride,     \
                                              mean, scale, sg, sgx);                    \
            } else {                                                                    \
                if (dx) cbn_runs_sums_body_##SUF(g, x, ym, dx, NULL, nruns, n, stride,  \
                                                 mean, scale, sg, sgx);                 \
                else cbn_runs_sums_body_##SUF(g, x, ym, NULL, NULL, nruns, n, stride,   \
                                              mean, scale, sg, sgx);                    \
            }                                                                           \
        } else {                                                                        \
            if (gr) {                                                                   \
                if (dx) cbn_runs_sums_body_##SUF(g, x, NULL, dx, gr, nruns, n, stride,  \
                                                 mean, scale, sg, sgx);                 \
                else cbn_runs_sums_body_##SUF(g, x, NULL, NULL, gr, nruns, n, stride,   \
                                              mean, scale, sg, sgx);                    \
            } else {                                                                    \
                if (dx) cbn_runs_sums_body_##SUF(g, x, NULL, dx, NULL, nruns, n, stride,\
                                                 mean, scale, sg, sgx);                 \
                else cbn_runs_sums_body_##SUF(g, x, NULL, NULL, NULL, nruns, n, stride, \
                                              mean, scale, sg, sgx);                    \
            }                                                                           \
        }                                                                               \
        _Pragma("GCC diagnostic pop")                                                   \
    }                                                                                   \
                                                                                        \
    /* y = (x - a) * b + c (+ r if r) (ReLU if relu). y may be x itself. */             \
    static inline void cbn_run_affine_##SUF(const T* x, const T* r, T* y, Py_ssize_t n,  \
                                            T a, T b, T c, int relu) {                   \
        typedef cbn_v_##SUF V;                                                           \
        typedef cbn_m_##SUF IV;                                                          \
        const V va = CBN_SPLAT(V, a), vb = CBN_SPLAT(V, b), vc = CBN_SPLAT(V, c);        \
        V x0, x1, r0, r1;                                                                \
        Py_ssize_t i = 0, nv = n - n % (2 * L);                                          \
        T v;                                                                             \
        for (; i < nv; i += 2 * L) {                                                     \
            CBN_VLOAD(x0, x + i); CBN_VLOAD(x1, x + i + L);                              \
            x0 = (x0 - va) * vb + vc; x1 = (x1 - va) * vb + vc;                          \
            if (r) {                                                                     \
                CBN_VLOAD(r0, r + i); CBN_VLOAD(r1, r + i + L); x0 += r0; x1 += r1;      \
            }                                                                            \
            if (relu) { x0 = CBN_RELU(IV, V, x0); x1 = CBN_RELU(IV, V, x1); }            \
            CBN_VSTORE(y + i, x0); CBN_VSTORE(y + i + L, x1);                            \
        }                                                                                \
        for (; i < n - n % L; i += L) {                                                  \
            CBN_VLOAD(x0, x + i); x0 = (x0 - va) * vb + vc;                              \
            if (r) { CBN_VLOAD(r0, r + i); x0 += r0; }                                   \
            if (relu) x0 = CBN_RELU(IV, V, x0);                                          \
            CBN_VSTORE(y + i, x0);                                                       \
        }                                                                                \
        for (; i < n; i++) {                                                             \
            v = (x[i] - a) * b + c;                                                      \
            if (r) v += r[i];                                                            \
            y[i] = (relu && v < 0) ? 0 : v;                                              \
        }                                                                                \
    }                                                                                    \
                                                                                         \
    /* y = (g - c - (x - a) * d) * b: the training backward's dx; g masked by ReLU's     \
       backward first if ym (the forward output). */                                     \
    static inline void cbn_run_bwd_##SUF(const T* x, const T* g, const T* ym, T* y,      \
                                         Py_ssize_t n, T a, T b, T c, T d) {             \
        typedef cbn_v_##SUF V;                                                           \
        typedef cbn_m_##SUF IV;                                                          \
        const V va = CBN_SPLAT(V, a), vb = CBN_SPLAT(V, b), vc = CBN_SPLAT(V, c);        \
        const V vd = CBN_SPLAT(V, d);                                                    \
        V x0, g0, y0;                                                                    \
        Py_ssize_t i = 0, nv = n - n % L;                                                \
        T gv;                                                                            \
        for (; i < nv; i += L) {                                                         \
            CBN_VLOAD(x0, x + i); CBN_VLOAD(g0, g + i);                                  \
            if (ym) { CBN_VLOAD(y0, ym + i); g0 = CBN_MASK(IV, V, g0, y0); }             \
            x0 = (g0 - vc - (x0 - va) * vd) * vb;                                        \
            CBN_VSTORE(y + i, x0);                                                       \
        }                                                                                \
        for (; i < n; i++) {                                                             \
            gv = (ym && !(ym[i] > 0)) ? 0 : g[i];                                        \
            y[i] = (gv - c - (x[i] - a) * d) * b;                                        \
        }                                                                                \
    }

    /* Fixed-width rows (AVX-512 builds), rows whose width is a multiple of the 64-byte   \
       vector. A row of NV <= 8 vectors keeps its lane parameters and accumulators in     \
       registers for the whole block, and the loop streams x and y only. A wider row is   \
       walked in memory order, the lane parameters and accumulators read from L1 (strips \
       of registers walked down the rows measured up to 2x slower: the streams are no    \
       longer sequential). Lane-wise the operations and their order are those of the     \
       general column loops below, so results are identical either way. Each cbn_fx_*    \
       returns 0 (and does nothing) when the width does not qualify. */                  \
    #define CBN_DEFINE_FIXED(T, SUF, IT)                                                    \
    typedef CBN_VEC(T, 64 / sizeof(T)) cbn_w_##SUF;                                       \
    typedef CBN_VEC(IT, 64 / sizeof(T)) cbn_wm_##SUF;                                     \
    enum { CBN_WL_##SUF = 64 / sizeof(T) };                                               \
                                                                                          \
    /* y = (x - a) * b + c (+ q) (ReLU if RELU), rows of NV wide vectors */              \
    static CBN_INLINE void cbn_fx_affine_nv_##SUF(int NV, int HASQ, int RELU, const T* x,    \
                                              const T* q, T* y, Py_ssize_t R,          \
                                              const T* a, const T* b, const T* c) {    \
        typedef cbn_w_##SUF V;                                                            \
        typedef cbn_wm_##SUF IV;                                                          \
        const int L = CBN_WL_##SUF;                                                       \
        V va[8], vb[8], vc[8], v, r0;                                                     \
        Py_ssize_t i;                                                                     \
        int j;                                                                            \
        CBN_UNROLL for (j = 0; j < NV; j++) {                                             \
            CBN_VLOAD(va[j], a + j * L); CBN_VLOAD(vb[j], b + j * L);                     \
            CBN_VLOAD(vc[j], c + j * L);                                                  \
        }                                                                                 \
        for (i = 0; i < R; i++, x += NV * L, y += NV * L, q += HASQ ? NV * L : 0) {       \
            CBN_UNROLL for (j = 0; j < NV; j++) {                                         \
                CBN_VLOAD(v, x + j * L);                                                  \
                v = (v - va[j]) * vb[j] + vc[j];                                          \
                if (HASQ) { CBN_VLOAD(r0, q + j * L); v += r0; }                          \
                if (RELU) v = CBN_RELU(IV, V, v);                                         \
                CBN_VSTORE(y + j * L, v);                                                 \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* The same over rows wider than 8 vectors, in memory order, the lane parameters    \
       loaded from L1 with each vector */                                                 \
    static CBN_NOINLINE void cbn_fx_affine_wide_##SUF(const T* x, const T* q, T* y,        \
                                                      Py_ssize_t n, const T* a,          \
                                                      const T* b, const T* c, int relu,  \
                                                      Py_ssize_t w) {                    \
        typedef cbn_w_##SUF V;                                                            \
        typedef cbn_wm_##SUF IV;                                                          \
        const int L = CBN_WL_##SUF;                                                       \
        V v, va, vb, vc, r0;                                                              \
        Py_ssize_t i, t;                                                                  \
        for (i = 0; i < n; i += w) {                                                      \
            for (t = 0; t < w; t += L) {                                                  \
                CBN_VLOAD(v, x + i + t); CBN_VLOAD(va, a + t); CBN_VLOAD(vb, b + t);      \
                CBN_VLOAD(vc, c + t);                                                     \
                v = (v - va) * vb + vc;                                                   \
                if (q) { CBN_VLOAD(r0, q + i + t); v += r0; }                             \
                if (relu) v = CBN_RELU(IV, V, v);                                         \
                CBN_VSTORE(y + i + t, v);                                                 \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* y = (g - c - (x - a) * d) * b over rows wider than 8 vectors, in memory order */  \
    static CBN_NOINLINE void cbn_fx_bwd_wide_##SUF(const T* x, const T* g, const T* q,     \
                                                   T* y, Py_ssize_t n, const T* a,       \
                                                   const T* b, const T* c, const T* d,   \
                                                   Py_ssize_t w) {                       \
        typedef cbn_w_##SUF V;                                                            \
        typedef cbn_wm_##SUF IV;                                                          \
        const int L = CBN_WL_##SUF;                                                       \
        V v, u, r0, va, vb, vc, vd;                                                       \
        Py_ssize_t i, t;                                                                  \
        for (i = 0; i < n; i += w) {                                                      \
            for (t = 0; t < w; t += L) {                                                  \
                CBN_VLOAD(v, x + i + t); CBN_VLOAD(u, g + i + t);                         \
                if (q) { CBN_VLOAD(r0, q + i + t); u = CBN_MASK(IV, V, u, r0); }          \
                CBN_VLOAD(va, a + t); CBN_VLOAD(vb, b + t); CBN_VLOAD(vc, c + t);         \
                CBN_VLOAD(vd, d + t);                                                     \
                v = (u - vc - (v - va) * vd) * vb;                                        \
                CBN_VSTORE(y + i + t, v);                                                 \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* Sums over rows wider than 8 vectors, in memory order, the accumulators in L1:     \
       s1 = sum of d = x - sh, s2 = sum of d*d; or (SUMS) s1 = sum of g = p, s2 = sum    \
       of g * (x - sh). Each lane is summed in row order, as in the loops below. */      \
    static CBN_INLINE void cbn_fx_wide_red_##SUF(int SUMS, const T* p, const T* x,       \
                                                 Py_ssize_t R, Py_ssize_t w,             \
                                                 const T* sh, T* s1, T* s2) {            \
        typedef cbn_w_##SUF V;                                                            \
        const int L = CBN_WL_##SUF;                                                       \
        V v, u, vs, va, vb;                                                               \
        Py_ssize_t r, t, o;                                                               \
        for (t = 0; t < w; t++) { s1[t] = 0; s2[t] = 0; }                                 \
        for (r = 0, o = 0; r < R; r++, o += w) {                                          \
            for (t = 0; t < w; t += L) {                                                  \
                CBN_VLOAD(v, p + o + t); CBN_VLOAD(vs, sh + t);                           \
                CBN_VLOAD(va, s1 + t); CBN_VLOAD(vb, s2 + t);                             \
                if (SUMS) { CBN_VLOAD(u, x + o + t); va += v; vb += v * (u - vs); }       \
                else { v -= vs; va += v; vb += v * v; }                                   \
                CBN_VSTORE(s1 + t, va); CBN_VSTORE(s2 + t, vb);                           \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
    static CBN_NOINLINE void cbn_fx_shifted_sums_wide_##SUF(const T* p, Py_ssize_t R,     \
                                                            Py_ssize_t w, const T* sh,   \
                                                            T* s1, T* s2) {              \
        cbn_fx_wide_red_##SUF(0, p, NULL, R, w, sh, s1, s2);                              \
    }                                                                                     \
    static CBN_NOINLINE void cbn_fx_sums_wide_##SUF(const T* g, const T* x, Py_ssize_t R, \
                                                    Py_ssize_t w, const T* m, T* sg,     \
                                                    T* sgx) {                            \
        cbn_fx_wide_red_##SUF(1, g, x, R, w, m, sg, sgx);                                 \
    }                                                                                     \
                                                                                          \
    /* y = (g - c - (x - a) * d) * b, g masked by ReLU's backward from q if HASQ */       \
    static CBN_INLINE void cbn_fx_bwd_nv_##SUF(int NV, int HASQ, const T* x, const T* g, \
                                               const T* q, T* y, Py_ssize_t R,         \
                                               const T* a, const T* b, const T* c,     \
                                               const T* d) {                            \
        typedef cbn_w_##SUF V;                                                            \
        typedef cbn_wm_##SUF IV;                                                          \
        const int L = CBN_WL_##SUF;                                                       \
        V va[8], vb[8], vc[8], vd[8], v, u, r0;                                           \
        Py_ssize_t i;                                                                     \
        int j;                                                                            \
        CBN_UNROLL for (j = 0; j < NV; j++) {                                             \
            CBN_VLOAD(va[j], a + j * L); CBN_VLOAD(vb[j], b + j * L);                     \
            CBN_VLOAD(vc[j], c + j * L); CBN_VLOAD(vd[j], d + j * L);                     \
        }                                                                                 \
        for (i = 0; i < R; i++, x += NV * L, g += NV * L, y += NV * L,                    \
                               q += HASQ ? NV * L : 0) {                                  \
            CBN_UNROLL for (j = 0; j < NV; j++) {                                         \
                CBN_VLOAD(v, x + j * L); CBN_VLOAD(u, g + j * L);                         \
                if (HASQ) { CBN_VLOAD(r0, q + j * L); u = CBN_MASK(IV, V, u, r0); }       \
                v = (u - vc[j] - (v - va[j]) * vd[j]) * vb[j];                            \
                CBN_VSTORE(y + j * L, v);                                                 \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* s1 = sum over rows of d = x - sh, s2 = sum of d*d (lane-wise, in row order) */     \
    static CBN_INLINE void cbn_fx_shifted_sums_nv_##SUF(int NV, const T* p, Py_ssize_t R,    \
                                                    const T* sh, T* s1, T* s2) {        \
        typedef cbn_w_##SUF V;                                                            \
        const int L = CBN_WL_##SUF;                                                       \
        V vs[8], va[8], vb[8], v;                                                         \
        Py_ssize_t i;                                                                     \
        int j;                                                                            \
        CBN_UNROLL for (j = 0; j < NV; j++) {                                             \
            CBN_VLOAD(vs[j], sh + j * L); va[j] = (V){0}; vb[j] = (V){0};                 \
        }                                                                                 \
        for (i = 0; i < R; i++, p += NV * L) {                                            \
            CBN_UNROLL for (j = 0; j < NV; j++) {                                         \
                CBN_VLOAD(v, p + j * L); v -= vs[j]; va[j] += v; vb[j] += v * v;          \
            }                                                                             \
        }                                                                                 \
        CBN_UNROLL for (j = 0; j < NV; j++) {                                             \
            CBN_VSTORE(s1 + j * L, va[j]); CBN_VSTORE(s2 + j * L, vb[j]);                 \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    /* sg = sum over rows of g, sgx = sum of g * (x - m) (lane-wise, in row order) */     \
    static CBN_INLINE void cbn_fx_sums_nv_##SUF(int NV, const T* g, const T* x, Py_ssize_t R,\
                                            const T* m, T* sg, T* sgx) {                \
        typedef cbn_w_##SUF V;                                                            \
        const int L = CBN_WL_##SUF;                                                       \
        V vm[8], va[8], vb[8], v, w;                                                      \
        Py_ssize_t i;                                                                     \
        int j;                                                                            \
        CBN_UNROLL for (j = 0; j < NV; j++) {                                             \
            CBN_VLOAD(vm[j], m + j * L); va[j] = (V){0}; vb[j] = (V){0};                  \
        }                                                                                 \
        for (i = 0; i < R; i++, g += NV * L, x += NV * L) {                               \
            CBN_UNROLL for (j = 0; j < NV; j++) {                                         \
                CBN_VLOAD(v, g + j * L); CBN_VLOAD(w, x + j * L);                         \
                va[j] += v; vb[j] += v * (w - vm[j]);                                     \
            }                                                                             \
        }                                                                                 \
        CBN_UNROLL for (j = 0; j < NV; j++) {                                             \
            CBN_VSTORE(sg + j * L, va[j]); CBN_VSTORE(sgx + j * L, vb[j]);                \
        }                                                                                 \
    }                                                                                     \
                                                                                          \
    CBN_FX_INSTANCES(SUF, 1) CBN_FX_INSTANCES(SUF, 2) CBN_FX_INSTANCES(SUF, 3)            \
    CBN_FX_INSTANCES(SUF, 4) CBN_FX_INSTANCES(SUF, 5) CBN_FX_INSTANCES(SUF, 6)            \
    CBN_FX_INSTANCES(SUF, 7) CBN_FX_INSTANCES(SUF, 8)                                     \
                                                                                          \
    static inline int cbn_fx_nv_##SUF(Py_ssize_t w) {                                     \
        return (CBN_FX && w % CBN_WL_##SUF == 0 && w <= 8 * CBN_WL_##SUF)                 \
               ? (int)(w / CBN_WL_##SUF) : 0;                                             \
    }                                                                                     \
    static inline int cbn_fx_wide_##SUF(Py_ssize_t w) {                                   \
        return CBN_FX && w % CBN_WL_##SUF == 0 && w > 8 * CBN_WL_##SUF;                   \
    }                                                                                     \
    static int cbn_fx_affine_##SUF(const T* x, const T* q, T* y, Py_ssize_t R,           \
                                   Py_ssize_t w, const T* a, const T* b, const T* c,     \
                                   int relu) {                                            \
        if (cbn_fx_wide_##SUF(w)) {                                                       \
            cbn_fx_affine_wide_##SUF(x, q, y, R * w, a, b, c, relu, w);                   \
            return 1;                                                                     \
        }                                                                                 \
        switch (cbn_fx_nv_##SUF(w)) {                                                     \
            CBN_FX_CASES(cbn_fx_affine_, SUF, (x, q, y, R, a, b, c, relu))                \
            default: return 0;                                                            \
        }                                                                                 \
        return 1;                                                                         \
    }                                                                                     \
    static int cbn_fx_bwd_##SUF(const T* x, const T* g, const T* q, T* y, Py_ssize_t R,  \
                                Py_ssize_t w, const T* a, const T* b, const T* c,        \
                                const T* d) {                                            \
        if (cbn_fx_wide_##SUF(w)) {                                                       \
            cbn_fx_bwd_wide_##SUF(x, g, q, y, R * w, a, b, c, d, w);                      \
            return 1;                                                                     \
        }                                                                                 \
        switch (cbn_fx_nv_##SUF(w)) {                                                     \
            CBN_FX_CASES(cbn_fx_bwd_, SUF, (x, g, q, y, R, a, b, c, d))                   \
            default: return 0;                                                            \
        }                                                                                 \
        return 1;                                                                         \
    }                                                                                     \
    static int cbn_fx_shifted_sums_##SUF(const T* p, Py_ssize_t R, Py_ssize_t w,         \
                                         const T* sh, T* s1, T* s2) {                    \
        if (cbn_fx_wide_##SUF(w)) {                                                       \
            cbn_fx_shifted_sums_wide_##SUF(p, R, w, sh, s1, s2);                          \
            return 1;                                                                     \
        }                                                                                 \
        switch (cbn_fx_nv_##SUF(w)) {                                                     \
            CBN_FX_CASES(cbn_fx_shifted_sums_, SUF, (p, R, sh, s1, s2))                   \
            default: return 0;                                                            \
        }                                                                                 \
        return 1;                                                                         \
    }                                                                                     \
    static int cbn_fx_sums_##SUF(const T* g, const T* x, Py_ssize_t R, Py_ssize_t w,     \
                                 const T* m, T* sg, T* sgx) {                            \
        if (cbn_fx_wide_##SUF(w)) {                                                       \
            cbn_fx_sums_wide_##SUF(g, x, R, w, m, sg, sgx);                               \
            return 1;                                                                     \
        }                                                                                 \
        switch (cbn_fx_nv_##SUF(w)) {                                                     \
            CBN_FX_CASES(cbn_fx_sums_, SUF, (g, x, R, m, sg, sgx))                        \
            default: return 0;                                                            \
        }                                                                                 \
        return 1;                                                                         \
    }

    /* One function per width NV (a constant inside it) and, for the affine loop, per    \
       residual/ReLU case: separate functions keep every pointer in a register. */        \
    #define CBN_FX_INSTANCES(SUF, NV)                                                     \
    static CBN_NOINLINE void cbn_fx_affine_##SUF##NV(const CBN_T_##SUF* x,                \
            const CBN_T_##SUF* q, CBN_T_##SUF* y, Py_ssize_t R, const CBN_T_##SUF* a,     \
            const CBN_T_##SUF* b, const CBN_T_##SUF* c, int relu) {                       \
        if (q) {                                                                          \
            if (relu) cbn_fx_affine_nv_##SUF(NV, 1, 1, x, q, y, R, a, b, c);              \
            else cbn_fx_affine_nv_##SUF(NV, 1, 0, x, q, y, R, a, b, c);                   \
        } else {                                                                          \
            if (relu) cbn_fx_affine_nv_##SUF(NV, 0, 1, x, NULL, y, R, a, b, c);           \
            else cbn_fx_affine_nv_##SUF(NV, 0, 0, x, NULL, y, R, a, b, c);                \
        }                                                                                 \
    }                                                                                     \
    static CBN_NOINLINE void cbn_fx_bwd_##SUF##NV(const CBN_T_##SUF* x,                   \
            const CBN_T_##SUF* g, const CBN_T_##SUF* q, CBN_T_##SUF* y, Py_ssize_t R,     \
            const CBN_T_##SUF* a, const CBN_T_##SUF* b, const CBN_T_##SUF* c,             \
            const CBN_T_##SUF* d) {                                                       \
        if (q) cbn_fx_bwd_nv_##SUF(NV, 1, x, g, q, y, R, a, b, c, d);                     \
        else cbn_fx_bwd_nv_##SUF(NV, 0, x, g, NULL, y, R, a, b, c, d);                    \
    }                                                                                     \
    static CBN_NOINLINE void cbn_fx_shifted_sums_##SUF##NV(const CBN_T_##SUF* p,          \
            Py_ssize_t R, const CBN_T_##SUF* sh, CBN_T_##SUF* s1, CBN_T_##SUF* s2) {      \
        cbn_fx_shifted_sums_nv_##SUF(NV, p, R, sh, s1, s2);                               \
    }                                                                                     \
    static CBN_NOINLINE void cbn_fx_sums_##SUF##NV(const CBN_T_##SUF* g,                  \
            const CBN_T_##SUF* x, Py_ssize_t R, const CBN_T_##SUF* m, CBN_T_##SUF* sg,    \
            CBN_T_##SUF* sgx) {                                                           \
        cbn_fx_sums_nv_##SUF(NV, g, x, R, m, sg, sgx);                                    \
    }
    #define CBN_FX_CASES(F, SUF, ARGS)                                                    \
        case 1: F##SUF##1 ARGS; break; case 2: F##SUF##2 ARGS; break;                     \
        case 3: F##SUF##3 ARGS; break; case 4: F##SUF##4 ARGS; break;                     \
        case 5: F##SUF##5 ARGS; break; case 6: F##SUF##6 ARGS; break;                     \
        case 7: F##SUF##7 ARGS; break; case 8: F##SUF##8 ARGS; break;

    /* Column loops over a block of R rows of w values (row r at p + r*w), for the rows   \
       kernels: strips of 4 vectors walk down the rows with register accumulators; the  \
       last w % (4L) columns go one at a time. Each column is summed in row order. */    \
    #define CBN_DEFINE_COLS(T, SUF, L)                                                  \
    /* d = p[r*w + t] - sh[t]: s1[t] = sum_r d, s2[t] = sum_r d*d, row by row (streams  \
       from memory; the accumulators stay in L1). */                                    \
    static inline void cbn_cols_shifted_sums_##SUF(const T* p, Py_ssize_t R, Py_ssize_t w,\
                                                   const T* sh, T* s1, T* s2) {         \
        typedef cbn_v_##SUF V;                                                          \
        Py_ssize_t t, r, ws = w - w % L;                                                \
        V a, b, x, s;                                                                   \
        T d;                                                                            \
        if (cbn_fx_shifted_sums_##SUF(p, R, w, sh, s1, s2)) return;                     \
        for (t = 0; t < w; t++) { s1[t] = 0; s2[t] = 0; }                               \
        for (r = 0; r + 4 <= R; r += 4, p += 4 * w) {   /* 4 rows per accumulator trip */\
            for (t = 0; t < ws; t += L) {                                               \
                V x1, x2, x3;                                                           \
                CBN_VLOAD(x, p + t); CBN_VLOAD(x1, p + w + t);                          \
                CBN_VLOAD(x2, p + 2 * w + t); CBN_VLOAD(x3, p + 3 * w + t);             \
                CBN_VLOAD(s, sh + t); CBN_VLOAD(a, s1 + t); CBN_VLOAD(b, s2 + t);       \
                x -= s; x1 -= s; x2 -= s; x3 -= s;                                      \
                a += x; b += x * x; a += x1; b += x1 * x1;                              \
                a += x2; b += x2 * x2; a += x3; b += x3 * x3;                           \
                CBN_VSTORE(s1 + t, a); CBN_VSTORE(s2 + t, b);                           \
            }                                                                           \
            for (; t < w; t++) {                                                        \
                d = p[t] - sh[t]; s1[t] += d; s2[t] += d * d;                           \
                d = p[w + t] - sh[t]; s1[t] += d; s2[t] += d * d;                       \
                d = p[2 * w + t] - sh[t]; s1[t] += d; s2[t] += d * d;                   \
                d = p[3 * w + t] - sh[t]; s1[t] += d; s2[t] += d * d;                   \
            }                                                                           \
        }                                                                               \
        for (; r < R; r++, p += w) {                                                    \
            for (t = 0; t < ws; t += L) {                                               \
                CBN_VLOAD(x, p + t); CBN_VLOAD(s, sh + t);                              \
                CBN_VLOAD(a, s1 + t); CBN_VLOAD(b, s2 + t);                             \
                x -= s; a += x; b += x * x;                                             \
                CBN_VSTORE(s1 + t, a); CBN_VSTORE(s2 + t, b);                           \
            }                                                                           \
            for (; t < w; t++) { d = p[t] - sh[t]; s1[t] += d; s2[t] += d * d; }        \
        }                                                                               \
    }                                                                                   \
                                                                                        \
    /* d = p[r*w + t] - m[t]: s1[t] = sum_r d, s2[t] = sum_r d*d */                     \
    static inline void cbn_cols_dev_##SUF(const T* p, Py_ssize_t R, Py_ssize_t w,       \
                                          const T* m, T* s1, T* s2) {                   \
        typedef cbn_v_##SUF V;                                                          \
        Py_ssize_t t = 0, r, ws = w - w % (4 * L);                                      \
        for (; t < ws; t += 4 * L) {                                                    \
            V m0, m1, m2, m3, x0, x1, x2, x3;                                           \
            V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};\
            CBN_VLOAD(m0, m + t); CBN_VLOAD(m1, m + t + L);                             \
            CBN_VLOAD(m2, m + t + 2 * L); CBN_VLOAD(m3, m + t + 3 * L);                 \
            for (r = 0; r < R; r++) {                                                   \
                const T* q = p + r * w + t;                                             \
                CBN_VLOAD(x0, q); CBN_VLOAD(x1, q + L);                                 \
                CBN_VLOAD(x2, q + 2 * L); CBN_VLOAD(x3, q + 3 * L);                     \
                x0 -= m0; x1 -= m1; x2 -= m2; x3 -= m3;                                 \
                a0 += x0; a1 += x1; a2 += x2; a3 += x3;                                 \
                b0 += x0 * x0; b1 += x1 * x1; b2 += x2 * x2; b3 += x3 * x3;             \
            }                                                                           \
            CBN_VSTORE(s1 + t, a0); CBN_VSTORE(s1 + t + L, a1);                         \
            CBN_VSTORE(s1 + t + 2 * L, a2); CBN_VSTORE(s1 + t + 3 * L, a3);             \
            CBN_VSTORE(s2 + t, b0); CBN_VSTORE(s2 + t + L, b1);                         \
            CBN_VSTORE(s2 + t + 2 * L, b2); CBN_VSTORE(s2 + t + 3 * L, b3);             \
        }                                                                               \
        for (; t < w; t++) {                                                            \
            T a = 0, b = 0, d;                                                          \
            for (r = 0; r < R; r++) { d = p[r * w + t] - m[t]; a += d; b += d * d; }    \
            s1[t] = a; s2[t] = b;                                                       \
        }                                                                               \
    }                                                                                   \
                                                                                        \
    /* sg[t] = sum_r g, sgx[t] = sum_r g * (x - m[t]), g masked by ReLU's backward if  \
       ym; if gr: gr = (masked) g; if dx: dx = g * k[t]. Row by row (streams from       \
       memory; the accumulators stay in L1). */                                         \
    static inline void cbn_cols_sums_##SUF(const T* g, const T* x, const T* ym, T* dx,  \
                                           T* gr, Py_ssize_t R, Py_ssize_t w,           \
                                           const T* m, const T* k, T* sg, T* sgx) {     \
        typedef cbn_v_##SUF V;                                                          \
        typedef cbn_m_##SUF IV;                                                         \
        Py_ssize_t t, r, o, i, ws = w - w % L;                                          \
        V a, b, vg, vx, vm, vk, vy;                                                     \
        T gv;                                                                           \
        if (!ym && !dx && !gr && cbn_fx_sums_##SUF(g, x, R, w, m, sg, sgx)) return;     \
        for (t = 0; t < w; t++) { sg[t] = 0; sgx[t] = 0; }                              \
        r = o = 0;                                                                      \
        if (!ym && !dx && !gr) {        /* 4 rows per accumulator trip */               \
            for (; r + 4 <= R; r += 4, o += 4 * w) {                                    \
                for (t = 0; t < ws; t += L) {                                           \
                    V g1, x1;                                                           \
                    CBN_VLOAD(vm, m + t); CBN_VLOAD(a, sg + t); CBN_VLOAD(b, sgx + t);  \
                    CBN_VLOAD(vg, g + o + t); CBN_VLOAD(vx, x + o + t);                 \
                    CBN_VLOAD(g1, g + o + w + t); CBN_VLOAD(x1, x + o + w + t);         \
                    a += vg; b += vg * (vx - vm); a += g1; b += g1 * (x1 - vm);         \
                    CBN_VLOAD(vg, g + o + 2 * w + t); CBN_VLOAD(vx, x + o + 2 * w + t); \
                    CBN_VLOAD(g1, g + o + 3 * w + t); CBN_VLOAD(x1, x + o + 3 * w + t); \
                    a += vg; b += vg * (vx - vm); a += g1; b += g1 * (x1 - vm);         \
                    CBN_VSTORE(sg + t, a); CBN_VSTORE(sgx + t, b);                      \
                }                                                                       \
                for (; t < w; t++) {                                                    \
                    for (i = o + t; i < o + t + 4 * w; i += w) {                        \
                        sg[t] += g[i]; sgx[t] += g[i] * (x[i] - m[t]);                  \
                    }                                                                   \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        for (; r < R; r++, o += w) {                                                    \
            for (t = 0; t < ws; t += L) {                                               \
                CBN_VLOAD(vg, g + o + t); CBN_VLOAD(vx, x + o + t);                     \
                if (ym) { CBN_VLOAD(vy, ym + o + t); vg = CBN_MASK(IV, V, vg, vy); }    \
                if (gr) CBN_VSTORE(gr + o + t, vg);                                     \
                CBN_VLOAD(vm, m + t); CBN_VLOAD(a, sg + t); CBN_VLOAD(b, sgx + t);      \
                a += vg; b += vg * (vx - vm);                                           \
                CBN_VSTORE(sg + t, a); CBN_VSTORE(sgx + t, b);                          \
                if (dx) { CBN_VLOAD(vk, k + t); vx = vg * vk; CBN_VSTORE(dx + o + t, vx); }\
            }                                                                           \
            for (; t < w; t++) {                                                        \
                gv = (ym && !(ym[o + t] > 0)) ? 0 : g[o + t];                           \
                if (gr) gr[o + t] = gv;                                                 \
                sg[t] += gv; sgx[t] += gv * (x[o + t] - m[t]);                          \
                if (dx) dx[o + t] = gv * k[t];                                          \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
                                                                                        \
    /* Element-wise over R rows with lane parameters, row by row (a streaming pass).    \
       op 0: y = (x - a) * b + c (+ q: a residual) (ReLU if relu); y may be x.         \
       op 1: y = (g - c - (x - a) * d) * b, g masked by ReLU's backward if q (the      \
       forward output). */                                                              \
    static inline void cbn_cols_apply_body_##SUF(int op, const T* x, const T* g,         \
                                                 const T* q, T* y, Py_ssize_t R,        \
                                                 Py_ssize_t w, const T* a, const T* b,  \
                                                 const T* c, const T* d, int relu) {    \
        typedef cbn_v_##SUF V;                                                          \
        typedef cbn_m_##SUF IV;                                                         \
        Py_ssize_t t, r, o, i, n, ws = w - w % L;                                       \
        V va, vb, vc, vd, vx, vg, vq;                                                   \
        T v;                                                                            \
        /* up to 4 rows per load of the lane parameters */                              \
        for (r = 0, o = 0; r < R; r += n, o += n * w) {                                 \
            n = R - r < 4 ? R - r : 4;                                                  \
            for (t = 0; t < ws; t += L) {                                               \
                CBN_VLOAD(va, a + t); CBN_VLOAD(vb, b + t); CBN_VLOAD(vc, c + t);       \
                if (op) CBN_VLOAD(vd, d + t);                                           \
                for (i = o + t; i < o + t + n * w; i += w) {                            \
                    CBN_VLOAD(vx, x + i);                                               \
                    if (op) {                                                           \
                        CBN_VLOAD(vg, g + i);                                           \
                        if (q) { CBN_VLOAD(vq, q + i); vg = CBN_MASK(IV, V, vg, vq); }  \
                        vx = (vg - vc - (vx - va) * vd) * vb;                           \
                    } else {                                                            \
                        vx = (vx - va) * vb + vc;                                       \
                        if (q) { CBN_VLOAD(vq, q + i); vx += vq; }                      \
                        if (relu) vx = CBN_RELU(IV, V, vx);                             \
                    }                                                                   \
                    CBN_VSTORE(y + i, vx);                                              \
                }                                                                       \
            }                                                                           \
            for (; t < w; t++) {                                                        \
                for (i = o + t; i < o + t + n * w; i += w) {                            \
                    if (op) {                                                           \
                        v = (q && !(q[i] > 0)) ? 0 : g[i];                              \
                        y[i] = (v - c[t] - (x[i] - a[t]) * d[t]) * b[t];                \
                    } else {                                                            \
                        v = (x[i] - a[t]) * b[t] + c[t];                                \
                        if (q) v += q[i];                                               \
                        y[i] = (relu && v < 0) ? 0 : v;                                 \
                    }                                                                   \
                }                                                                       \
            }                                                                           \
        }                                                                               \
    }                                                                                   \
                                                                                        \
    /* cbn_cols_apply_body with op, q and relu made constants, one copy per case: a     \
       separate function whose loop keeps every pointer in a register. */               \
    static CBN_NOINLINE void cbn_cols_apply_##SUF(int op, const T* x, const T* g,      \
                                                 const T* q, T* y, Py_ssize_t R,        \
                                                 Py_ssize_t w, const T* a, const T* b,  \
                                                 const T* c, const T* d, int relu) {    \
        if (!op && cbn_fx_affine_##SUF(x, q, y, R, w, a, b, c, relu)) return;          \
        if (op && cbn_fx_bwd_##SUF(x, g, q, y, R, w, a, b, c, d)) return;               \
        if (op) {                                                                       \
            if (q) cbn_cols_apply_body_##SUF(1, x, g, q, y, R, w, a, b, c, d, 0);       \
            else cbn_cols_apply_body_##SUF(1, x, g, NULL, y, R, w, a, b, c, d, 0);      \
        } else if (q) {                                                                 \
            if (relu) cbn_cols_apply_body_##SUF(0, x, NULL, q, y, R, w, a, b, c, d, 1); \
            else cbn_cols_apply_body_##SUF(0, x, NULL, q, y, R, w, a, b, c, d, 0);      \
        } else {                                                                        \
            if (relu) cbn_cols_apply_body_##SUF(0, x, NULL, NULL, y, R, w, a, b, c, d, 1);\
            else cbn_cols_apply_body_##SUF(0, x, NULL, NULL, y, R, w, a, b, c, d, 0);   \
        }                                                                               \
    }

    CBN_DEFINE_RUNS(float, f, 8, int32_t)
    CBN_DEFINE_RUNS(double, d, 4, int64_t)
    CBN_DEFINE_FIXED(float, f, int32_t)
    CBN_DEFINE_FIXED(double, d, int64_t)
    CBN_DEFINE_COLS(float, f, 8)
    CBN_DEFINE_COLS(double, d, 4)
    """
    void cbn_runs_moments_f(const float* p, Py_ssize_t nruns, Py_ssize_t n,
                            Py_ssize_t stride, double* mean, double* m2) noexcept nogil
    void cbn_runs_sums_f(const float* g, const float* x, const float* ym, float* dx,
                         float* gr, Py_ssize_t nruns, Py_ssize_t n, Py_ssize_t stride,
                         float mean, float scale, double* sg, double* sgx) noexcept nogil
    void cbn_run_affine_f(const float* x, const float* r, float* y, Py_ssize_t n, float a,
                          float b, float c, int relu) noexcept nogil
    void cbn_run_bwd_f(const float* x, const float* g, const float* ym, float* y,
                       Py_ssize_t n, float a, float b, float c, float d) noexcept nogil
    void cbn_cols_shifted_sums_f(const float* p, Py_ssize_t R, Py_ssize_t w,
                                 const float* sh, float* s1, float* s2) noexcept nogil
    void cbn_cols_dev_f(const float* p, Py_ssize_t R, Py_ssize_t w, const float* m,
                        float* s1, float* s2) noexcept nogil
    void cbn_cols_sums_f(const float* g, const float* x, const float* ym, float* dx,
                         float* gr, Py_ssize_t R, Py_ssize_t w, const float* m,
                         const float* k, float* sg, float* sgx) noexcept nogil
    void cbn_cols_apply_f(int op, const float* x, const float* g, const float* q, float* y,
                          Py_ssize_t R, Py_ssize_t w, const float* a, const float* b,
                          const float* c, const float* d, int relu) noexcept nogil
    void cbn_runs_moments_d(const double* p, Py_ssize_t nruns, Py_ssize_t n,
                            Py_ssize_t stride, double* mean, double* m2) noexcept nogil
    void cbn_runs_sums_d(const double* g, const double* x, const double* ym, double* dx,
                         double* gr, Py_ssize_t nruns, Py_ssize_t n, Py_ssize_t stride,
                         double mean, double scale, double* sg, double* sgx) noexcept nogil
    void cbn_run_affine_d(const double* x, const double* r, double* y, Py_ssize_t n, double a,
                          double b, double c, int relu) noexcept nogil
    void cbn_run_bwd_d(const double* x, const double* g, const double* ym, double* y,
                       Py_ssize_t n, double a, double b, double c, double d) noexcept nogil
    void cbn_cols_shifted_sums_d(const double* p, Py_ssize_t R, Py_ssize_t w,
                                 const double* sh, double* s1, double* s2) noexcept nogil
    void cbn_cols_dev_d(const double* p, Py_ssize_t R, Py_ssize_t w, const double* m,
                        double* s1, double* s2) noexcept nogil
    void cbn_cols_sums_d(const double* g, const double* x, const double* ym, double* dx,
                         double* gr, Py_ssize_t R, Py_ssize_t w, const double* m,
                         const double* k, double* sg, double* sgx) noexcept nogil
    void cbn_cols_apply_d(int op, const double* x, const double* g, const double* q, double* y,
                          Py_ssize_t R, Py_ssize_t w, const double* a, const double* b,
                          const double* c, const double* d, int relu) noexcept nogil


cdef enum:
    PLANE_MIN_K = 16      # K at or above this: planes kernels; below: rows kernels
    BLOCK = 4096          # values per statistics block along a plane (L1-resident)
    ROW_BLOCK = 65536     # values per statistics block of rows (L2-resident)
    ROW_ALIGN = 32        # glued rows are a multiple of this many values when cheap
    ROW_MIN_ROWS = 128    # rows per block at least (very wide rows: larger blocks)
    SHIFT_ROWS = 32       # at most this many rows' mean shifts an item's first block
    SHIFT_ROWS_MIN = 8    # ... and at least this many (rows kernels)
    ROW_MIN_WIDTH = 64    # rows kernels glue m-rows until a row has this many values
    ROW_FIXED_VECTORS = 8 # ... or, preferably, up to this many 64-byte vectors
    TARGET_ITEMS = 128    # parallel work items per reduction (fixed: determinism)
    CHUNK = 16384         # values per parallel item in element-wise passes


def openmp_enabled():
    """True if the kernels were compiled with OpenMP (else they run on one thread)."""
    return bool(cbn_openmp_enabled())


def max_threads():
    """omp_get_max_threads(): follows OMP_NUM_THREADS and threadpoolctl's limits."""
    return cbn_max_threads()


# ------------------------------------------------------------------------------ moments

cdef struct Moments:
    double n        # count
    double mean
    double m2       # sum of squared deviations from the mean


cdef inline void merge(Moments* a, Moments b) noexcept nogil:
    """Chan et al.'s pairwise update: a <- a (+) b."""
    cdef double n, delta
    if b.n == 0:
        return
    if a.n == 0:
        a[0] = b
        return
    n = a.n + b.n
    delta = b.mean - a.mean
    a.mean = a.mean + delta * (b.n / n)
    a.m2 = a.m2 + b.m2 + delta * delta * (a.n * (b.n / n))
    a.n = n


cdef inline double inv_sqrt(double v) noexcept nogil:
    """1/sqrt(v), except 0 for v == 0 (eps = 0 on a constant channel); NaN stays NaN."""
    return 0.0 if v == 0.0 else 1.0 / sqrt(v)


cdef inline Moments runs_moments(const floating* p, Py_ssize_t nruns, Py_ssize_t n,
                                Py_ssize_t stride) noexcept nogil:
    """Moments of nruns runs of n contiguous values, stride apart (see cbn_runs_moments
    above)."""
    cdef Moments r
    r.n = <double>nruns * n
    if floating is float:
        cbn_runs_moments_f(p, nruns, n, stride, &r.mean, &r.m2)
    else:
        cbn_runs_moments_d(p, nruns, n, stride, &r.mean, &r.m2)
    return r


# --------------------------------------------------------------------- work partitions

cdef struct Planes:
    Py_ssize_t M, C, K
    Py_ssize_t mb        # planes of one channel per unit (when planes are short)
    Py_ssize_t nmb       # m-blocks: ceil(M / mb)
    Py_ssize_t nblk      # blocks per plane (when planes are long)
    Py_ssize_t blen      # values per block (the last may be shorter)
    Py_ssize_t units     # nmb * C * nblk, in memory order (m-block, channel, block)
    Py_ssize_t items     # parallel items: contiguous ranges of units


cdef Planes planes_partition(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                             Py_ssize_t block) noexcept nogil:
    """Units of about `block` values of one channel: a long plane is cut into blocks, short
    planes of one channel are taken mb at a time (runs C*K apart, reduced as one block).
    Units, in memory order, are cut into at most TARGET_ITEMS items. Depends on the shape
    only, never on the thread count."""
    cdef Planes P
    P.M = M
    P.C = C
    P.K = K
    P.nblk = (K + block - 1) // block
    P.blen = (K + P.nblk - 1) // P.nblk
    P.mb = block // K if K < block else 1
    if P.mb > M:
        P.mb = M
    if P.mb < 1:
        P.mb = 1
    P.nmb = (M + P.mb - 1) // P.mb
    P.units = P.nmb * C * P.nblk
    P.items = P.units if P.units < TARGET_ITEMS else TARGET_ITEMS
    return P


cdef inline Py_ssize_t planes_unit(Planes P, Py_ssize_t u, Py_ssize_t* c, Py_ssize_t* nruns,
                                   Py_ssize_t* n) noexcept nogil:
    """Where unit u starts (offset into the (M, C, K) data); sets its channel, its number
    of runs (planes) and the values per run."""
    cdef Py_ssize_t b = u % P.nblk, mblk = u // (P.nblk * P.C), m0, start
    c[0] = (u // P.nblk) % P.C
    m0 = mblk * P.mb
    nruns[0] = P.M - m0 if P.M - m0 < P.mb else P.mb
    start = b * P.blen
    n[0] = P.K - start if P.K - start < P.blen else P.blen
    return (m0 * P.C + c[0]) * P.K + start


cdef struct Rows:
    Py_ssize_t S         # values per m-row: C * K
    Py_ssize_t W         # values per glued row: k * S
    Py_ssize_t k         # m-rows per glued row
    Py_ssize_t nrows     # full glued rows: M // k
    Py_ssize_t tail      # values after the full rows: (M % k) * S
    Py_ssize_t R         # glued rows per block
    Py_ssize_t nblocks
    Py_ssize_t items


cdef inline Py_ssize_t gcd(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    cdef Py_ssize_t r
    while b:
        r = a % b
        a = b
        b = r
    return a


cdef Rows rows_partition(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, Py_ssize_t block,
                         Py_ssize_t max_items, Py_ssize_t itemsize) noexcept nogil:
    cdef Rows P
    cdef Py_ssize_t wl = 64 // itemsize, g
    P.S = C * K
    # Glue k m-rows. Preferred: the widest row of at most ROW_FIXED_VECTORS vectors of 64
    # bytes (the fixed-width loops keep such a row's parameters and accumulators in
    # registers). Else a multiple of ROW_ALIGN values when that stays small (no scalar
    # column tails), and at least ROW_MIN_WIDTH values. The choice depends on the shape
    # and the itemsize only, never on the instruction set, so results do not either.
    g = P.S // gcd(P.S, wl) * wl                  # lcm(S, wl)
    if g <= ROW_FIXED_VECTORS * wl:
        P.k = (ROW_FIXED_VECTORS * wl // g) * g // P.S
    else:
        P.k = ROW_ALIGN // gcd(P.S, ROW_ALIGN)
        if P.k * P.S > 16 * ROW_MIN_WIDTH:
            P.k = 1
        P.k = P.k * ((ROW_MIN_WIDTH + P.k * P.S - 1) // (P.k * P.S))
    P.W = P.k * P.S
    P.nrows = M // P.k
    P.tail = (M % P.k) * P.S
    P.R = block // P.W
    if P.R < ROW_MIN_ROWS:
        P.R = ROW_MIN_ROWS          # per-lane work per block must stay small per value
    P.nblocks = (P.nrows + P.R - 1) // P.R
    P.items = P.nblocks if P.nblocks < max_items else max_items
    return P


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


cdef void planes_item_moments(const floating* x, Planes P, Py_ssize_t item,
                              Moments* acc) noexcept nogil:
    """Merge the moments of one item's units into its slots of acc[0:C], per channel."""
    cdef Py_ssize_t u0 = item * P.units // P.items, u1 = (item + 1) * P.units // P.items
    cdef Py_ssize_t u, off, c, nruns, n, c0, nc, j
    planes_item_span(P, item, &c0, &nc)
    for j in range(nc):
        zero_moments(&acc[(c0 + j) % P.C], 1)
    for u in range(u0, u1):
        off = planes_unit(P, u, &c, &nruns, &n)
        merge(&acc[c], runs_moments(x + off, nruns, n, P.C * P.K))


cdef void planes_moments(const floating* x, Planes P, Moments* part, Moments* out,
                         int nthreads) noexcept nogil:
    """part: items*C slots (each item writes those of its channels only)."""
    cdef Py_ssize_t it, c, c0, nc, j
    if nthreads == 1:           # no OpenMP region at all: it costs more than tiny inputs
        for it in range(P.items):
            planes_item_moments(x, P, it, part + it * P.C)
    else:
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            planes_item_moments(x, P, it, part + it * P.C)
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


cdef void rows_channel_dev(const floating* p, Py_ssize_t R, Py_ssize_t w, Py_ssize_t C,
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
                d = p[r * w + t] - m
                a += d
                b += d * d
            s1[0] += a
            s2[0] += b


cdef double rows_block_moments(const floating* p, Py_ssize_t R, Py_ssize_t w, Py_ssize_t C,
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
        if floating is float:
            cbn_cols_shifted_sums_f(p, r0, w, p, acc, acc2)
        else:
            cbn_cols_shifted_sums_d(p, r0, w, p, acc, acc2)
        zero(bmean, C)
        zero(bm2, C)
        fold_lanes(acc, bmean, reps, C, K)
        fold_lanes(p, bm2, reps, C, K)
        for c in range(C):
            bmean[c] = (bmean[c] + bm2[c] * r0) / (<double>r0 * reps * K)
        expand_lanes_d(bmean, lane, w, C, K)
    if floating is float:
        cbn_cols_shifted_sums_f(p, R, w, lane, acc, acc2)
    else:
        cbn_cols_shifted_sums_d(p, R, w, lane, acc, acc2)
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
    if floating is float:
        cbn_cols_dev_f(p, R, w, lane, acc, acc2)
    else:
        cbn_cols_dev_d(p, R, w, lane, acc, acc2)
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


cdef void rows_item_moments(const floating* x, Py_ssize_t C, Py_ssize_t K, Rows P,
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


cdef void rows_moments(const floating* x, Py_ssize_t C, Py_ssize_t K, Rows P,
                       double* part, floating* scratch, double* dscratch, Moments* out,
                       int nthreads) noexcept nogil:
    """Per-channel moments over the rows partition. part: items*(2C+1) doubles (count,
    means, m2s of each item); scratch: 3*W floating and dscratch: 2*C doubles per thread."""
    cdef Py_ssize_t it, c, tid, stride = 2 * C + 1
    cdef double* acc
    cdef double cnt, n
    if nthreads == 1:
        for it in range(P.items):
            rows_item_moments(x, C, K, P, it, part + it * stride, scratch, dscratch)
    else:
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            tid = threadid()
            rows_item_moments(x, C, K, P, it, part + it * stride,
                              scratch + tid * 3 * P.W, dscratch + tid * 2 * C)
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


# --------------------------------------------------------------- element-wise passes

cdef enum:
    OP_AFFINE = 0     # y = (x - a) * b + c  (+ q, a residual) (ReLU if relu)
    OP_BWD_TRAIN = 1  # y = (g - c - (x - a) * d) * b, g = grad_output masked by ReLU's
                      # backward where q (the forward output) is given


cdef inline void run_apply(int op, const floating* x, const floating* g, const floating* q,
                           floating* y, Py_ssize_t n, floating a, floating b, floating c,
                           floating d, bint relu) noexcept nogil:
    if op == OP_AFFINE:
        if floating is float:
            cbn_run_affine_f(x, q, y, n, a, b, c, relu)
        else:
            cbn_run_affine_d(x, q, y, n, a, b, c, relu)
    else:
        if floating is float:
            cbn_run_bwd_f(x, g, q, y, n, a, b, c, d)
        else:
            cbn_run_bwd_d(x, g, q, y, n, a, b, c, d)


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
    cdef Py_ssize_t nch = (K + CHUNK - 1) // CHUNK
    cdef Py_ssize_t clen = (K + nch - 1) // nch
    cdef Py_ssize_t units = M * C * nch
    cdef Py_ssize_t per_item = CHUNK // clen if clen < CHUNK else 1
    cdef Py_ssize_t items = (units + per_item - 1) // per_item
    cdef Py_ssize_t it, u0, u1
    if nthreads == 1:
        planes_apply_units(op, x, g, q, y, C, K, nch, clen, 0, units, pa, pb, pc, pd, relu)
        return
    for it in prange(items, num_threads=nthreads, schedule="dynamic"):
        u0 = it * per_item
        u1 = u0 + per_item
        if u1 > units:
            u1 = units
        planes_apply_units(op, x, g, q, y, C, K, nch, clen, u0, u1, pa, pb, pc, pd, relu)


cdef void expand_lanes(const floating* v, floating* lane, Py_ssize_t W, Py_ssize_t C,
                       Py_ssize_t K) noexcept nogil:
    """lane[t] = v[(t // K) % C] for t < W (W a multiple of C*K)."""
    cdef Py_ssize_t t = 0, c, kk
    while t < W:
        for c in range(C):
            for kk in range(K):
                lane[t + kk] = v[c]
            t += K


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
    if floating is float:
        cbn_cols_apply_f(op, x, g, q, y, R, w, la, lb, lc, ld, relu)
    else:
        cbn_cols_apply_d(op, x, g, q, y, R, w, la, lb, lc, ld, relu)


cdef void rows_apply(int op, const floating* x, const floating* g, const floating* q,
                     floating* y, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                     const floating* lanes, bint relu, int nthreads) noexcept nogil:
    """Element-wise pass over the rows partition; lanes holds the 4 (or 3) parameter
    vectors expanded to W lanes each, back to back."""
    cdef Rows P = rows_partition(M, C, K, CHUNK, M, sizeof(floating))
    cdef Py_ssize_t W = P.W, blk, r0, nr, off
    cdef const floating* la = lanes
    cdef const floating* lb = lanes + W
    cdef const floating* lc = lanes + 2 * W
    cdef const floating* ld = lanes + 3 * W
    if nthreads == 1:
        row_apply(op, x, g, q, y, P.nrows, W, la, lb, lc, ld, relu)
    else:
        for blk in prange(P.nblocks, num_threads=nthreads, schedule="dynamic"):
            r0 = blk * P.R
            nr = P.nrows - r0
            if nr > P.R:
                nr = P.R
            off = r0 * W
            row_apply(op, x + off, g + off if g != NULL else NULL,
                      q + off if q != NULL else NULL, y + off, nr, W, la, lb, lc, ld, relu)
    if P.tail:
        off = P.nrows * W
        row_apply(op, x + off, g + off if g != NULL else NULL,
                  q + off if q != NULL else NULL, y + off, 1, P.tail, la, lb, lc, ld, relu)


# ------------------------------------------------------------------- entry points

cdef void channel_moments(const floating* x, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                          void* mem, Moments* out, int nthreads) noexcept nogil:
    cdef Planes PP
    cdef Rows PR
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        planes_moments(x, PP, <Moments*>mem, out, nthreads)
    else:
        PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, sizeof(floating))
        rows_moments(x, C, K, PR, <double*>mem,
                     <floating*>(<char*>mem + rows_part_bytes(PR, C)),
                     <double*>(<char*>mem + rows_part_bytes(PR, C)
                               + nthreads * 3 * PR.W * sizeof(floating)),
                     out, nthreads)


cdef Py_ssize_t moments_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                      Py_ssize_t itemsize, int nthreads):
    """Bytes of scratch channel_moments needs: item partials, per-thread lanes."""
    cdef Planes PP
    cdef Rows PR
    if K >= PLANE_MIN_K:
        PP = planes_partition(M, C, K, BLOCK)
        return PP.items * C * sizeof(Moments)
    PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, itemsize)
    return (rows_part_bytes(PR, C) + nthreads * 3 * PR.W * itemsize
            + nthreads * 2 * C * sizeof(double))


cdef inline Py_ssize_t rows_part_bytes(Rows P, Py_ssize_t C) noexcept nogil:
    """Item partials of rows_moments: (count, C means, C m2s) per item, at least one."""
    return (P.items if P.items > 0 else 1) * (2 * C + 1) * sizeof(double)


cdef Py_ssize_t apply_scratch_bytes(Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                                    Py_ssize_t itemsize):
    if K >= PLANE_MIN_K:
        return 0
    return 4 * rows_partition(M, C, K, CHUNK, M, itemsize).W * itemsize


cdef void apply(int op, const floating* x, const floating* g, const floating* q,
                floating* y, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, const floating* pa,
                const floating* pb, const floating* pc, const floating* pd, floating* lanes,
                bint relu, int nthreads) noexcept nogil:
    """Dispatch an element-wise pass to the planes or rows kernel."""
    cdef Py_ssize_t W
    if K >= PLANE_MIN_K:
        planes_apply(op, x, g, q, y, M, C, K, pa, pb, pc, pd, relu, nthreads)
        return
    W = rows_partition(M, C, K, CHUNK, M, sizeof(floating)).W
    expand_lanes(pa, lanes, W, C, K)
    expand_lanes(pb, lanes + W, W, C, K)
    expand_lanes(pc, lanes + 2 * W, W, C, K)
    if pd != NULL:
        expand_lanes(pd, lanes + 3 * W, W, C, K)
    rows_apply(op, x, g, q, y, M, C, K, lanes, relu, nthreads)


cdef void* alloc(Py_ssize_t nbytes) except NULL:
    """malloc that raises MemoryError (called with the GIL, before any parallel region)."""
    cdef void* p = malloc(nbytes if nbytes > 0 else 1)
    if p == NULL:
        raise MemoryError(f"cbn: could not allocate {nbytes} bytes of scratch memory")
    return p


cdef inline void* data(object a):
    """Data pointer of an ndarray (the caller guarantees contiguity and dtype), or NULL."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline bint is_float32(cnp.ndarray a):
    return cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32


cdef int forward_train_impl(const floating* x, floating* y, const floating* weight,
                            const floating* bias, floating* running_mean,
                            floating* running_var, floating* save_mean,
                            floating* save_invstd, const floating* residual, bint relu,
                            Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, double momentum,
                            double eps, int nthreads) except -1:
    cdef Py_ssize_t isz = sizeof(floating), c
    cdef Py_ssize_t mbytes = moments_scratch_bytes(M, C, K, isz, nthreads)
    cdef Py_ssize_t abytes = apply_scratch_bytes(M, C, K, isz)
    cdef char* mem = <char*>alloc(mbytes + abytes + C * (sizeof(Moments) + 3 * isz))
    cdef floating* lanes = <floating*>(mem + mbytes)
    cdef Moments* mom = <Moments*>(mem + mbytes + abytes)
    cdef floating* mu = <floating*>(mom + C)
    cdef floating* scale = mu + C
    cdef floating* shift = scale + C
    cdef double n = <double>M * K, inv
    with nogil:
        channel_moments(x, M, C, K, mem, mom, nthreads)
        for c in range(C):
            inv = inv_sqrt(mom[c].m2 / n + eps)
            save_mean[c] = <floating>mom[c].mean
            save_invstd[c] = <floating>inv
            mu[c] = <floating>mom[c].mean
            scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * inv)
            shift[c] = bias[c] if bias != NULL else 0
            if running_mean != NULL:
                running_mean[c] = <floating>(momentum * mom[c].mean
                                             + (1.0 - momentum) * running_mean[c])
            if running_var != NULL:
                running_var[c] = <floating>(momentum * (mom[c].m2 / (n - 1.0))
                                            + (1.0 - momentum) * running_var[c])
        apply(OP_AFFINE, x, NULL, residual, y, M, C, K, mu, scale, shift, NULL, lanes, relu,
              nthreads)
    free(mem)
    return 0


cdef int affine_impl(const floating* x, floating* y, const floating* mean,
                     const floating* scale, const floating* shift, const floating* residual,
                     bint relu, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                     int nthreads) except -1:
    cdef char* mem = <char*>alloc(apply_scratch_bytes(M, C, K, sizeof(floating)))
    with nogil:
        apply(OP_AFFINE, x, NULL, residual, y, M, C, K, mean, scale, shift, NULL,
              <floating*>mem, relu, nthreads)
    free(mem)
    return 0


def forward_train(cnp.ndarray x, cnp.ndarray y, weight, bias, running_mean, running_var,
                  cnp.ndarray save_mean, cnp.ndarray save_invstd, double momentum,
                  double eps, int nthreads, residual=None, bint relu=False):
    """Training forward on (M, C, K) arrays: batch statistics, running-statistics update
    (arrays that are None are skipped), y = act(normalize(x) + residual). All arrays
    C-contiguous, of x's dtype (checked by the caller)."""
    cdef Py_ssize_t M = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t K = cnp.PyArray_DIM(x, 2)
    if is_float32(x):
        forward_train_impl(<float*>data(x), <float*>data(y), <float*>data(weight),
                           <float*>data(bias), <float*>data(running_mean),
                           <float*>data(running_var), <float*>data(save_mean),
                           <float*>data(save_invstd), <float*>data(residual), relu,
                           M, C, K, momentum, eps, nthreads)
    else:
        forward_train_impl(<double*>data(x), <double*>data(y), <double*>data(weight),
                           <double*>data(bias), <double*>data(running_mean),
                           <double*>data(running_var), <double*>data(save_mean),
                           <double*>data(save_invstd), <double*>data(residual), relu,
                           M, C, K, momentum, eps, nthreads)


def affine(cnp.ndarray x, cnp.ndarray y, cnp.ndarray mean, cnp.ndarray scale,
           cnp.ndarray shift, residual, bint relu, int nthreads):
    """y = act((x - mean) * scale + shift + residual) on (M, C, K) arrays: the eval
    forward once scale = weight * invstd and shift = bias are known."""
    cdef Py_ssize_t M = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t K = cnp.PyArray_DIM(x, 2)
    if is_float32(x):
        affine_impl(<float*>data(x), <float*>data(y), <float*>data(mean), <float*>data(scale),
                    <float*>data(shift), <float*>data(residual), relu, M, C, K, nthreads)
    else:
        affine_impl(<double*>data(x), <double*>data(y), <double*>data(mean),
                    <double*>data(scale), <double*>data(shift), <double*>data(residual), relu,
                    M, C, K, nthreads)


cdef void eval_params_impl(const floating* weight, const floating* bias,
                           const floating* running_var, double eps, floating* save_invstd,
                           floating* scale, floating* shift, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t c
    cdef double inv
    for c in range(C):
        inv = inv_sqrt(<double>running_var[c] + eps)
        save_invstd[c] = <floating>inv
        scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * inv)
        shift[c] = bias[c] if bias != NULL else 0


def eval_params(weight, bias, cnp.ndarray running_var, double eps, cnp.ndarray save_invstd,
                cnp.ndarray scale, cnp.ndarray shift):
    """Per-channel parameters of the eval forward: invstd = 1/sqrt(rv + eps) (0 where
    rv + eps == 0), scale = weight * invstd, shift = bias (weight/bias None: 1, 0).
    Contiguous (C,) arrays of one dtype (checked by the caller)."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(running_var, 0)
    if is_float32(running_var):
        eval_params_impl(<float*>data(weight), <float*>data(bias), <float*>data(running_var),
                         eps, <float*>data(save_invstd), <float*>data(scale),
                         <float*>data(shift), C)
    else:
        eval_params_impl(<double*>data(weight), <double*>data(bias),
                         <double*>data(running_var), eps, <double*>data(save_invstd),
                         <double*>data(scale), <double*>data(shift), C)


cdef int forward_eval_impl(const floating* x, floating* y, const floating* weight,
                           const floating* bias, const floating* running_mean,
                           const floating* running_var, floating* save_mean,
                           floating* save_invstd, const floating* residual, bint relu,
                           Py_ssize_t M, Py_ssize_t C, Py_ssize_t K, double eps,
                           int nthreads) except -1:
    cdef Py_ssize_t abytes = apply_scratch_bytes(M, C, K, sizeof(floating)), c
    cdef char* mem = <char*>alloc(abytes + 2 * C * sizeof(floating))
    cdef floating* scale = <floating*>(mem + abytes)
    cdef floating* shift = scale + C
    with nogil:
        eval_params_impl(weight, bias, running_var, eps, save_invstd, scale, shift, C)
        for c in range(C):
            save_mean[c] = running_mean[c]
        apply(OP_AFFINE, x, NULL, residual, y, M, C, K, running_mean, scale, shift, NULL,
              <floating*>mem, relu, nthreads)
    free(mem)
    return 0


def forward_eval(cnp.ndarray x, cnp.ndarray y, weight, bias, cnp.ndarray running_mean,
                 cnp.ndarray running_var, cnp.ndarray save_mean, cnp.ndarray save_invstd,
                 double eps, int nthreads, residual=None, bint relu=False):
    """Eval forward on (M, C, K) arrays: eval_params, then y = act((x - running_mean) *
    scale + shift + residual) in one pass; save_mean = running_mean."""
    cdef Py_ssize_t M = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t K = cnp.PyArray_DIM(x, 2)
    if is_float32(x):
        forward_eval_impl(<float*>data(x), <float*>data(y), <float*>data(weight),
                          <float*>data(bias), <float*>data(running_mean),
                          <float*>data(running_var), <float*>data(save_mean),
                          <float*>data(save_invstd), <float*>data(residual), relu, M, C, K,
                          eps, nthreads)
    else:
        forward_eval_impl(<double*>data(x), <double*>data(y), <double*>data(weight),
                          <double*>data(bias), <double*>data(running_mean),
                          <double*>data(running_var), <double*>data(save_mean),
                          <double*>data(save_invstd), <double*>data(residual), relu, M, C, K,
                          eps, nthreads)


def invstd(floating[::1] var, double eps, floating[::1] out):
    """out = 1/sqrt(var + eps), 0 where var + eps == 0."""
    cdef Py_ssize_t c
    for c in range(var.shape[0]):
        out[c] = <floating>inv_sqrt(<double>var[c] + eps)


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
        if floating is float:
            cbn_runs_sums_f(g + off, x + off, shifted(ym, off), <float*>shifted(dx, off),
                            <float*>shifted(gr, off), nruns, n, P.C * P.K, mean[c],
                            scale[c], &sg, &sgx)
        else:
            cbn_runs_sums_d(g + off, x + off, shifted(ym, off), <double*>shifted(dx, off),
                            <double*>shifted(gr, off), nruns, n, P.C * P.K, mean[c],
                            scale[c], &sg, &sgx)
        acc[c].g += sg
        acc[c].gx += sgx


cdef void planes_sums(const floating* g, const floating* x, const floating* ym, floating* dx,
                      floating* gr, Planes P, const floating* mean, const floating* scale,
                      Sums* part, Sums* out, int nthreads) noexcept nogil:
    """part: items*C slots (each item writes those of its channels only)."""
    cdef Py_ssize_t it, c, c0, nc, j
    if nthreads == 1:
        for it in range(P.items):
            planes_item_sums(g, x, ym, dx, gr, P, it, mean, scale, part + it * P.C)
    else:
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            planes_item_sums(g, x, ym, dx, gr, P, it, mean, scale, part + it * P.C)
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
    if floating is float:
        cbn_cols_sums_f(g, x, ym, dx, gr, R, w, lmean, lscale, ag, agx)
    else:
        cbn_cols_sums_d(g, x, ym, dx, gr, R, w, lmean, lscale, ag, agx)
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
    cdef Py_ssize_t it, c, tid, off
    if nthreads == 1:
        for it in range(P.items):
            rows_item_sums(g, x, ym, dx, gr, C, K, P, it, lmean, lscale, part + it * C,
                           scratch)
    else:
        for it in prange(P.items, num_threads=nthreads, schedule="dynamic"):
            tid = threadid()
            rows_item_sums(g, x, ym, dx, gr, C, K, P, it, lmean, lscale, part + it * C,
                           scratch + tid * 2 * P.W)
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


cdef int backward_impl(const floating* g, const floating* x, floating* gx,
                       const floating* weight, const floating* mean, const floating* invstd,
                       floating* grad_weight, floating* grad_bias, const floating* output,
                       floating* grad_residual, Py_ssize_t M, Py_ssize_t C, Py_ssize_t K,
                       bint training, int nthreads) except -1:
    cdef Py_ssize_t isz = sizeof(floating), c, part_bytes, W = 0
    cdef Planes PP
    cdef Rows PR
    cdef bint planes = K >= PLANE_MIN_K
    cdef double n = <double>M * K, inv
    if planes:
        PP = planes_partition(M, C, K, BLOCK)
        part_bytes = PP.items * C * sizeof(Sums)
    else:
        PR = rows_partition(M, C, K, ROW_BLOCK, TARGET_ITEMS, sizeof(floating))
        W = PR.W
        part_bytes = PR.items * C * sizeof(Sums) + (nthreads * 2 + 2) * W * isz
    cdef Py_ssize_t abytes = apply_scratch_bytes(M, C, K, isz)
    cdef char* mem = <char*>alloc(part_bytes + abytes + C * (sizeof(Sums) + 4 * isz))
    cdef floating* lanes = <floating*>(mem + part_bytes)
    cdef Sums* sums = <Sums*>(mem + part_bytes + abytes)
    cdef floating* scale = <floating*>(sums + C)
    cdef floating* k1 = scale + C
    cdef floating* k2 = k1 + C
    cdef floating* lmean
    cdef floating* dx_fused = NULL if training else gx
    with nogil:
        for c in range(C):
            scale[c] = <floating>((weight[c] if weight != NULL else 1.0) * invstd[c])
        if planes:
            planes_sums(g, x, output, dx_fused, grad_residual, PP, mean, scale,
                        <Sums*>mem, sums, nthreads)
        else:
            lmean = <floating*>(mem + PR.items * C * sizeof(Sums))
            expand_lanes(mean, lmean, W, C, K)
            expand_lanes(scale, lmean + W, W, C, K)
            rows_sums(g, x, output, dx_fused, grad_residual, C, K, PR, lmean, lmean + W,
                      <Sums*>mem, lmean + 2 * W, sums, nthreads)
        for c in range(C):
            inv = invstd[c]
            grad_bias[c] = <floating>sums[c].g
            grad_weight[c] = <floating>(sums[c].gx * inv)
            k1[c] = <floating>(sums[c].g / n)
            k2[c] = <floating>(sums[c].gx / n * inv * inv)
        if training:
            apply(OP_BWD_TRAIN, x, g, output, gx, M, C, K, mean, scale, k1, k2, lanes,
                  False, nthreads)
    free(mem)
    return 0


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
    cdef Py_ssize_t M = cnp.PyArray_DIM(x, 0), C = cnp.PyArray_DIM(x, 1)
    cdef Py_ssize_t K = cnp.PyArray_DIM(x, 2)
    if is_float32(x):
        backward_impl(<float*>data(grad_output), <float*>data(x), <float*>data(grad_input),
                      <float*>data(weight), <float*>data(mean), <float*>data(invstd),
                      <float*>data(grad_weight), <float*>data(grad_bias),
                      <float*>data(output), <float*>data(grad_residual), M, C, K,
                      training, nthreads)
    else:
        backward_impl(<double*>data(grad_output), <double*>data(x),
                      <double*>data(grad_input), <double*>data(weight), <double*>data(mean),
                      <double*>data(invstd), <double*>data(grad_weight),
                      <double*>data(grad_bias), <double*>data(output),
                      <double*>data(grad_residual), M, C, K, training, nthreads)


# ------------------------------------------------------------------- plain-call fast path
#
# Small inputs spend most of a call in Python: checking arguments, building views,
# allocating. The common call (a C-contiguous float32/float64 ndarray in native byte order,
# per-channel vectors that are already C-contiguous (C,) arrays of its dtype; out, a
# residual or a ReLU output of the same kind) is recognised here with a few C tests and
# run directly.
# Recognising is not validating: anything else, invalid calls included, returns None and
# cbn.functional takes its general path, which validates and raises its usual errors.

cdef inline bint plain_array(object a, int typenum):
    """A C-contiguous ndarray (not a subclass) of typenum in native byte order."""
    return (cnp.PyArray_CheckExact(a) and cnp.PyArray_TYPE(<cnp.ndarray>a) == typenum
            and cnp.PyArray_ISNOTSWAPPED(<cnp.ndarray>a)
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a))


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
    if typ != cnp.NPY_FLOAT32 and typ != cnp.NPY_FLOAT64:
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


cdef object plain_out(object out, object x, int typ):
    """A new array like x if out is None; out itself if it is a plain, writeable array of
    x's shape that is x or does not overlap it; else None (not plain)."""
    cdef char* a
    cdef char* b
    cdef Py_ssize_t n
    if out is None:
        return cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>x),
                                 cnp.PyArray_DIMS(<cnp.ndarray>x), typ, 0)
    if not (plain_array(out, typ) and cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out)
            and cnp.PyArray_SAMESHAPE(<cnp.ndarray>out, <cnp.ndarray>x)):
        return None
    a = <char*>cnp.PyArray_DATA(<cnp.ndarray>out)
    b = <char*>cnp.PyArray_DATA(<cnp.ndarray>x)
    n = cnp.PyArray_NBYTES(<cnp.ndarray>x)
    if a == b or a + n <= b or b + n <= a:
        return out
    return None


cdef int plain_threads(object n_threads, Py_ssize_t size, Py_ssize_t min_parallel) except -2:
    """Threads for a call (n_threads None: omp_get_max_threads()); -1 (not plain) unless
    n_threads is an int from 1 to 4096, so that an odd count reaches the general path
    exactly as before rather than being clipped here."""
    cdef int n
    if n_threads is None:
        n = cbn_max_threads()
    elif type(n_threads) is int and 1 <= n_threads <= 4096:
        n = n_threads
    else:
        return -1
    return 1 if size < min_parallel else n


def plain_forward(x, weight, bias, running_mean, running_var, training, momentum, eps,
                  axis, n_threads, Py_ssize_t min_parallel, residual=None, bint relu=False,
                  out=None):
    """batch_norm_forward's plain call: (y, save_mean, save_invstd), or None when the call
    is not plain (then nothing was computed or written). n_threads None means
    omp_get_max_threads(); inputs under min_parallel values run on one thread. A residual
    must be a plain array of the input's shape and dtype; so must out, which may be x
    itself but must not otherwise overlap it."""
    cdef Py_ssize_t M, C, K
    cdef int typ = plain_dims(x, axis, &M, &C, &K), nt
    cdef double e, mom = 0.0
    if typ < 0 or type(eps) is not float:
        return None
    e = eps
    if not (0.0 <= e < float("inf")):
        return None
    if not plain_vec(weight, C, typ, False) or not plain_vec(bias, C, typ, False):
        return None
    if not plain_like(residual, x, typ):
        return None
    if training is True:
        if type(momentum) is not float or M * K == 1:
            return None
        if (not plain_vec(running_mean, C, typ, True)
                or not plain_vec(running_var, C, typ, True)):
            return None
        mom = momentum
    elif training is False:
        if (running_mean is None or running_var is None
                or not plain_vec(running_mean, C, typ, False)
                or not plain_vec(running_var, C, typ, False)):
            return None
    else:
        return None
    nt = plain_threads(n_threads, M * C * K, min_parallel)
    y = None if nt < 0 else plain_out(out, x, typ)
    if y is None:
        return None
    cdef cnp.npy_intp nc = C
    cdef cnp.ndarray sm = cnp.PyArray_EMPTY(1, &nc, typ, 0)
    cdef cnp.ndarray si = cnp.PyArray_EMPTY(1, &nc, typ, 0)
    if training:
        if typ == cnp.NPY_FLOAT32:
            forward_train_impl(<float*>data(x), <float*>data(y), <float*>data(weight),
                               <float*>data(bias), <float*>data(running_mean),
                               <float*>data(running_var), <float*>data(sm),
                               <float*>data(si), <float*>data(residual), relu, M, C, K,
                               mom, e, nt)
        else:
            forward_train_impl(<double*>data(x), <double*>data(y), <double*>data(weight),
                               <double*>data(bias), <double*>data(running_mean),
                               <double*>data(running_var), <double*>data(sm),
                               <double*>data(si), <double*>data(residual), relu, M, C, K,
                               mom, e, nt)
    elif typ == cnp.NPY_FLOAT32:
        forward_eval_impl(<float*>data(x), <float*>data(y), <float*>data(weight),
                          <float*>data(bias), <float*>data(running_mean),
                          <float*>data(running_var), <float*>data(sm), <float*>data(si),
                          <float*>data(residual), relu, M, C, K, e, nt)
    else:
        forward_eval_impl(<double*>data(x), <double*>data(y), <double*>data(weight),
                          <double*>data(bias), <double*>data(running_mean),
                          <double*>data(running_var), <double*>data(sm), <double*>data(si),
                          <double*>data(residual), relu, M, C, K, e, nt)
    return y, sm, si


def plain_backward(grad_output, x, weight, save_mean, save_invstd, training, axis,
                   n_threads, Py_ssize_t min_parallel, output=None, bint residual=False):
    """batch_norm_backward's plain call: (grad_input, grad_weight, grad_bias), plus
    grad_residual if residual, or None when the call is not plain. output (the forward's
    ReLU output, masking grad_output) must be a plain array of the input's shape."""
    cdef Py_ssize_t M, C, K
    cdef int typ = plain_dims(x, axis, &M, &C, &K), nt
    if typ < 0 or (training is not True and training is not False):
        return None
    if grad_output is None or not plain_like(grad_output, x, typ):
        return None
    if not plain_like(output, x, typ):
        return None
    if (save_mean is None or save_invstd is None or not plain_vec(weight, C, typ, False)
            or not plain_vec(save_mean, C, typ, False)
            or not plain_vec(save_invstd, C, typ, False)):
        return None
    nt = plain_threads(n_threads, M * C * K, min_parallel)
    if nt < 0:
        return None
    cdef cnp.npy_intp nc = C
    cdef cnp.ndarray gx = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>x),
                                            cnp.PyArray_DIMS(<cnp.ndarray>x), typ, 0)
    cdef cnp.ndarray gw = cnp.PyArray_EMPTY(1, &nc, typ, 0)
    cdef cnp.ndarray gb = cnp.PyArray_EMPTY(1, &nc, typ, 0)
    cdef object gr = None
    if residual:
        gr = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(<cnp.ndarray>x),
                               cnp.PyArray_DIMS(<cnp.ndarray>x), typ, 0)
    if typ == cnp.NPY_FLOAT32:
        backward_impl(<float*>data(grad_output), <float*>data(x), <float*>data(gx),
                      <float*>data(weight), <float*>data(save_mean), <float*>data(save_invstd),
                      <float*>data(gw), <float*>data(gb), <float*>data(output),
                      <float*>data(gr), M, C, K, training is True, nt)
    else:
        backward_impl(<double*>data(grad_output), <double*>data(x), <double*>data(gx),
                      <double*>data(weight), <double*>data(save_mean),
                      <double*>data(save_invstd), <double*>data(gw), <double*>data(gb),
                      <double*>data(output), <double*>data(gr), M, C, K, training is True,
                      nt)
    return (gx, gw, gb, gr) if residual else (gx, gw, gb)


def plain_affine(x, mean, scale, shift, axis, n_threads, Py_ssize_t min_parallel,
                 residual=None, bint relu=False, out=None):
    """normalize's plain call: y = act((x - mean) * scale + shift + residual), or None
    when the call is not plain (out as in plain_forward)."""
    cdef Py_ssize_t M, C, K
    cdef int typ = plain_dims(x, axis, &M, &C, &K), nt
    if typ < 0 or mean is None or scale is None or shift is None:
        return None
    if (not plain_vec(mean, C, typ, False) or not plain_vec(scale, C, typ, False)
            or not plain_vec(shift, C, typ, False)):
        return None
    if not plain_like(residual, x, typ):
        return None
    nt = plain_threads(n_threads, M * C * K, min_parallel)
    y = None if nt < 0 else plain_out(out, x, typ)
    if y is None:
        return None
    if typ == cnp.NPY_FLOAT32:
        affine_impl(<float*>data(x), <float*>data(y), <float*>data(mean), <float*>data(scale),
                    <float*>data(shift), <float*>data(residual), relu, M, C, K, nt)
    else:
        affine_impl(<double*>data(x), <double*>data(y), <double*>data(mean),
                    <double*>data(scale), <double*>data(shift), <double*>data(residual), relu,
                    M, C, K, nt)
    return y
