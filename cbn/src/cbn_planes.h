/* cbn_planes.h: loops over contiguous runs of one channel (the "planes" kernels).
 *
 * A template, included by cbn_kernels.h once per (dtype, CPU target), with:
 *   CBN_T       the element type (float or double)
 *   CBN_IT      the integer type of the same width (for lane masks)
 *   CBN_L       lanes per 32-byte vector (8 for float, 4 for double)
 *   CBN_SUF     f or d, and CBN_TARGET (base, avx2, avx512): the name suffixes (CBN_FN)
 *
 * A run is n contiguous values of one channel; a unit is nruns such runs, stride values
 * apart (the same channel in consecutive batch entries). The loops keep four independent
 * vector accumulators (one is 4x slower: every add would wait for the previous one) and
 * combine them in a fixed order, so results never depend on the instruction set.
 *
 * Operations, each named for what it computes:
 *   runs_moments  count, mean and M2 (sum of squared deviations) of a unit
 *   runs_sums     sum(g) and sum(g * (x - mean)) of a unit (the backward reduction)
 *   run_affine    y = (x - mean) * scale + shift (+ residual) (ReLU): the output pass
 *   run_bwd       dx = (g - gmean - (x - mean) * xcoef) * scale: the training backward
 *   run_affine_stream, run_bwd_stream
 *                 the same, storing whole vectors non-temporally (outputs larger than
 *                 the cache: no read of the output's lines, no eviction of the input's)
 */

typedef CBN_VEC(CBN_T, CBN_L) CBN_FN(v);
typedef CBN_VEC(CBN_IT, CBN_L) CBN_FN(m);

/* v = the first cnt (< CBN_L) values at p, the other lanes those of fill: the same
   vector either way. AVX-512VL targets use a masked load; elsewhere the vector is
   assembled in buf (a store-to-load forwarding stall, which cost a quarter of the
   statistics pass on short planes such as K = 196). */
#if defined(__AVX512VL__) && CBN_L == 8
#define CBN_PART(dst, fill, p, cnt, buf) ((void)(buf),                                  \
        (dst) = (CBN_FN(v))_mm256_mask_loadu_ps((__m256)(fill),                          \
                                              (__mmask8)((1u << (cnt)) - 1), (p)))
#elif defined(__AVX512VL__) && CBN_L == 4
#define CBN_PART(dst, fill, p, cnt, buf) ((void)(buf),                                  \
        (dst) = (CBN_FN(v))_mm256_mask_loadu_pd((__m256d)(fill),                         \
                                              (__mmask8)((1u << (cnt)) - 1), (p)))
#else
#define CBN_PART(dst, fill, p, cnt, buf) do {                                          \
        CBN_VSTORE(buf, fill); memcpy(buf, (p), (cnt) * sizeof((buf)[0]));             \
        CBN_VLOAD(dst, buf);                                                             \
    } while (0)
#endif

/* A unit of several short runs (planes of one channel, C*K apart) ends where the next
   channel's unit of the same batch entries begins, run by run: while a run is reduced,
   the same offset n values on (the next unit's run) is prefetched, 128 bytes (4 vectors)
   per step. A run that short is over before the hardware prefetcher has caught its
   stream; a prefetch changes no result. */
#define CBN_PREFETCH_NEXT(p) do {                                                     \
        __builtin_prefetch((p), 0, 3);                                                  \
        __builtin_prefetch((const char*)(p) + 64, 0, 3);                                \
    } while (0)

/* One vector of the backward sums at offset i: mask g by ReLU's backward (if ym), store
   it in gr (if gr), accumulate sum(g) in A and sum(g * (x - mean)) in B, and write
   dx = g * scale (if dx). */
#define CBN_SUMS_STEP(i, A, B) do {                                                     \
        V g_, x_, y_;                                                                   \
        CBN_VLOAD(g_, g + (i)); CBN_VLOAD(x_, x + (i));                                 \
        if (ym) { CBN_VLOAD(y_, ym + (i)); g_ = CBN_MASK(IV, V, g_, y_); }              \
        if (gr) CBN_VSTORE(gr + (i), g_);                                               \
        A += g_; B += g_ * (x_ - vm);                                                   \
        if (dx) { x_ = g_ * vk; CBN_VSTORE(dx + (i), x_); }                             \
    } while (0)


/* s1 = sum of d = x - shift and s2 = sum of d*d over nruns runs of n >= 1 values, run j
   at p + j*stride: four vector accumulators per sum, a run's last n % CBN_L values
   padded with the shift (d = 0 there), lanes combined in a fixed order. pf: prefetch
   the next unit (CBN_PREFETCH_NEXT). */
static CBN_INLINE void CBN_FN(runs_shifted_sums)(const CBN_T* p, Py_ssize_t nruns,
                                                 Py_ssize_t n, Py_ssize_t stride,
                                                 CBN_T shift, double* s1, double* s2,
                                                 int pf) {
    typedef CBN_FN(v) V;
    const Py_ssize_t B = 4 * CBN_L, nv = n - n % B, n1 = n - n % CBN_L;
    const V vm = CBN_SPLAT(V, shift);
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    V x0, x1, x2, x3;
    Py_ssize_t i, j, k;
    double s = 0.0, ss = 0.0;
    CBN_T pad[CBN_L];
    const CBN_T* q;
    for (k = 0, q = p; k < nruns; k++, q += stride) {
        for (i = 0; i < nv; i += B) {
            if (pf) CBN_PREFETCH_NEXT(q + n + i);
            CBN_VLOAD(x0, q + i); CBN_VLOAD(x1, q + i + CBN_L);
            CBN_VLOAD(x2, q + i + 2 * CBN_L); CBN_VLOAD(x3, q + i + 3 * CBN_L);
            x0 -= vm; x1 -= vm; x2 -= vm; x3 -= vm;
            a0 += x0; a1 += x1; a2 += x2; a3 += x3;
            b0 += x0 * x0; b1 += x1 * x1; b2 += x2 * x2; b3 += x3 * x3;
        }
        for (; i < n1; i += CBN_L) {
            CBN_VLOAD(x0, q + i); x0 -= vm; a0 += x0; b0 += x0 * x0;
        }
        if (i < n) {            /* the last values, padded with the shift */
            CBN_PART(x1, vm, q + i, n - i, pad);
            x1 -= vm; a1 += x1; b1 += x1 * x1;
        }
    }
    a0 = (a0 + a1) + (a2 + a3);
    b0 = (b0 + b1) + (b2 + b3);
    for (j = 0; j < CBN_L; j++) { s += a0[j]; ss += b0[j]; }
    *s1 = s;
    *s2 = ss;
}

/* Moments of nruns >= 1 runs of n >= 1 values, run j at p + j*stride. One pass sums
   d = x - shift and d*d, the shift being the mean of the first (up to) CBN_L values
   rounded to CBN_T: m2 = S2 - S1^2/n. Where S1^2/n > S2/2 (the shift was off by more than
   about a standard deviation, which costs accuracy) a second pass around the mean found,
   the corrected two-pass formula, gives the result. pf: prefetch the next unit's runs
   during the first pass (inputs larger than the cache). */
static inline void CBN_FN(runs_moments)(const CBN_T* p, Py_ssize_t nruns, Py_ssize_t n,
                                        Py_ssize_t stride, double* mean, double* m2,
                                        int pf) {
    const Py_ssize_t np = n < CBN_L ? n : CBN_L;
    const double cnt = (double)nruns * n;
    double s = 0.0, ss;
    Py_ssize_t i;
    CBN_T m;
    for (i = 1; i < np; i++) s += p[i] - p[0];
    m = (CBN_T)(p[0] + s / np);      /* p[0] exactly on a constant channel */
    if (pf && nruns > 1)        /* a constant in each inlined copy of the loop */
        CBN_FN(runs_shifted_sums)(p, nruns, n, stride, m, &s, &ss, 1);
    else
        CBN_FN(runs_shifted_sums)(p, nruns, n, stride, m, &s, &ss, 0);
    if (s * s / cnt > 0.5 * ss) {    /* far off: a second pass, around the mean */
        m = (CBN_T)(m + s / cnt);
        CBN_FN(runs_shifted_sums)(p, nruns, n, stride, m, &s, &ss, 0);
    }
    *mean = m + s / cnt;
    ss -= s * s / cnt;
    *m2 = ss < 0.0 ? 0.0 : ss;
}

/* sum(g) and sum(g * (x - mean)) over nruns runs of n values (run j at offset
   j*stride). If ym: g is first masked by ReLU's backward (g where ym > 0). If gr:
   the (masked) g is written there; if dx: dx = g * scale. All in one pass. pf: prefetch
   the next unit's runs of g and x. */
static CBN_INLINE void CBN_FN(runs_sums_body)(const CBN_T* g, const CBN_T* x, const CBN_T* ym,
                                                CBN_T* dx, CBN_T* gr, Py_ssize_t nruns,
                                                Py_ssize_t n, Py_ssize_t stride,
                                                CBN_T mean, CBN_T scale, double* sg,
                                                double* sgx, int pf) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    const Py_ssize_t n1 = n - n % CBN_L, n4 = n - n % (4 * CBN_L);
    const V vm = CBN_SPLAT(V, mean), vk = CBN_SPLAT(V, scale);
    V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    Py_ssize_t i, j, k, o;
    double s = 0.0, sx = 0.0;
    CBN_T gv, pg[CBN_L], px[CBN_L];
    V tg, tx;
    for (k = 0, o = 0; k < nruns; k++, o += stride) {
        for (i = 0; i < n4; i += 4 * CBN_L) {
            if (pf) { CBN_PREFETCH_NEXT(g + o + n + i); CBN_PREFETCH_NEXT(x + o + n + i); }
            CBN_SUMS_STEP(o + i, a0, b0); CBN_SUMS_STEP(o + i + CBN_L, a1, b1);
            CBN_SUMS_STEP(o + i + 2 * CBN_L, a2, b2);
            CBN_SUMS_STEP(o + i + 3 * CBN_L, a3, b3);
        }
        for (; i < n1; i += CBN_L) CBN_SUMS_STEP(o + i, a0, b0);
        if (i < n) {            /* the last values, padded with g = 0 */
            if (ym || gr || dx) {
                for (j = i; j < n; j++) {
                    gv = (ym && !(ym[o + j] > 0)) ? 0 : g[o + j];
                    if (gr) gr[o + j] = gv;
                    if (dx) dx[o + j] = gv * scale;
                    pg[j - i] = gv;
                }
                for (j = n - i; j < CBN_L; j++) pg[j] = 0;
                CBN_VLOAD(tg, pg);
            } else {
                CBN_PART(tg, (V){0}, g + o + i, n - i, pg);
            }
            CBN_PART(tx, vm, x + o + i, n - i, px);
            a1 += tg; b1 += tg * (tx - vm);
        }
    }
    a0 = (a0 + a1) + (a2 + a3); b0 = (b0 + b1) + (b2 + b3);
    for (j = 0; j < CBN_L; j++) { s += a0[j]; sx += b0[j]; }
    *sg = s; *sgx = sx;
}

/* One loop per combination of the optional arrays (and of pf): no tests inside the
   loop. */
static CBN_INLINE void CBN_FN(runs_sums_pf)(const CBN_T* g, const CBN_T* x, const CBN_T* ym,
                                             CBN_T* dx, CBN_T* gr, Py_ssize_t nruns,
                                             Py_ssize_t n, Py_ssize_t stride,
                                             CBN_T mean, CBN_T scale, double* sg,
                                             double* sgx, const int pf) {
    _Pragma("GCC diagnostic push")
    _Pragma("GCC diagnostic ignored \"-Wnonnull\"")
    if (ym) {
        if (gr) {
            if (dx) CBN_FN(runs_sums_body)(g, x, ym, dx, gr, nruns, n, stride,
                                             mean, scale, sg, sgx, pf);
            else CBN_FN(runs_sums_body)(g, x, ym, NULL, gr, nruns, n, stride,
                                          mean, scale, sg, sgx, pf);
        } else {
            if (dx) CBN_FN(runs_sums_body)(g, x, ym, dx, NULL, nruns, n, stride,
                                             mean, scale, sg, sgx, pf);
            else CBN_FN(runs_sums_body)(g, x, ym, NULL, NULL, nruns, n, stride,
                                          mean, scale, sg, sgx, pf);
        }
    } else {
        if (gr) {
            if (dx) CBN_FN(runs_sums_body)(g, x, NULL, dx, gr, nruns, n, stride,
                                             mean, scale, sg, sgx, pf);
            else CBN_FN(runs_sums_body)(g, x, NULL, NULL, gr, nruns, n, stride,
                                          mean, scale, sg, sgx, pf);
        } else {
            if (dx) CBN_FN(runs_sums_body)(g, x, NULL, dx, NULL, nruns, n, stride,
                                             mean, scale, sg, sgx, pf);
            else CBN_FN(runs_sums_body)(g, x, NULL, NULL, NULL, nruns, n, stride,
                                          mean, scale, sg, sgx, pf);
        }
    }
    _Pragma("GCC diagnostic pop")
}

static CBN_NOINLINE void CBN_FN(runs_sums)(const CBN_T* g, const CBN_T* x, const CBN_T* ym,
                                             CBN_T* dx, CBN_T* gr, Py_ssize_t nruns,
                                             Py_ssize_t n, Py_ssize_t stride,
                                             CBN_T mean, CBN_T scale, double* sg,
                                             double* sgx, int pf) {
    if (pf && nruns > 1)
        CBN_FN(runs_sums_pf)(g, x, ym, dx, gr, nruns, n, stride, mean, scale, sg, sgx, 1);
    else
        CBN_FN(runs_sums_pf)(g, x, ym, dx, gr, nruns, n, stride, mean, scale, sg, sgx, 0);
}

/* A whole vector stored at p (aligned to the vector's size) with a non-temporal store:
   the line goes to memory without being read first and without taking a place in the
   cache. The stored value is the same as CBN_VSTORE's. Such stores are weakly ordered:
   a pass that uses them ends with cbn_sfence() (cbn_kernels.h) before its results are
   read elsewhere. */
#if defined(__AVX__)
#if CBN_L == 8
#define CBN_VSTREAM(p, v) _mm256_stream_ps((float*)(p), (__m256)(v))
#else
#define CBN_VSTREAM(p, v) _mm256_stream_pd((double*)(p), (__m256d)(v))
#endif
#elif defined(__SSE2__)
#if CBN_L == 8
#define CBN_VSTREAM(p, v) do {                                                          \
        __m128 h_[2]; memcpy(h_, &(v), sizeof(h_));                                     \
        _mm_stream_ps((float*)(p), h_[0]); _mm_stream_ps((float*)(p) + 4, h_[1]);      \
    } while (0)
#else
#define CBN_VSTREAM(p, v) do {                                                          \
        __m128d h_[2]; memcpy(h_, &(v), sizeof(h_));                                    \
        _mm_stream_pd((double*)(p), h_[0]); _mm_stream_pd((double*)(p) + 2, h_[1]);    \
    } while (0)
#endif
#else
#define CBN_VSTREAM(p, v) CBN_VSTORE(p, v)
#endif

/* How many values before p + i reaches an address aligned to a vector (32 bytes): the
   streaming loops store those one by one (the same values: lane-wise arithmetic). */
#define CBN_TO_ALIGN(p) ((Py_ssize_t)(((32 - ((uintptr_t)(p) & 31)) & 31) / sizeof(CBN_T)))

/* y = (x - mean) * scale + shift (+ residual) (ReLU if relu). y may be x itself. stream
   (a constant in each caller): whole vectors are stored non-temporally from the first one
   aligned to 32 bytes (if y is aligned to its element size; else as without stream). */
static CBN_INLINE void CBN_FN(run_affine_body)(const CBN_T* x, const CBN_T* residual,
                                               CBN_T* y, Py_ssize_t n, CBN_T mean,
                                               CBN_T scale, CBN_T shift, int relu,
                                               int stream) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    const V vmean = CBN_SPLAT(V, mean), vscale = CBN_SPLAT(V, scale);
    const V vshift = CBN_SPLAT(V, shift);
    V x0, x1, r0, r1;
    Py_ssize_t i = 0, nv, head = 0;
    CBN_T v;
    if (stream && ((uintptr_t)y % sizeof(CBN_T)) != 0) stream = 0;   /* cannot align */
    if (stream) {
        head = CBN_TO_ALIGN(y);
        if (head > n) head = n;
        for (; i < head; i++) {
            v = (x[i] - mean) * scale + shift;
            if (residual) v += residual[i];
            y[i] = (relu && v < 0) ? 0 : v;
        }
    }
    nv = n - (n - head) % (2 * CBN_L);
    for (; i < nv; i += 2 * CBN_L) {
        CBN_VLOAD(x0, x + i); CBN_VLOAD(x1, x + i + CBN_L);
        x0 = (x0 - vmean) * vscale + vshift; x1 = (x1 - vmean) * vscale + vshift;
        if (residual) {
            CBN_VLOAD(r0, residual + i); CBN_VLOAD(r1, residual + i + CBN_L);
            x0 += r0; x1 += r1;
        }
        if (relu) { x0 = CBN_RELU(IV, V, x0); x1 = CBN_RELU(IV, V, x1); }
        if (stream) {
            CBN_VSTREAM(y + i, x0); CBN_VSTREAM(y + i + CBN_L, x1);
        } else {
            CBN_VSTORE(y + i, x0); CBN_VSTORE(y + i + CBN_L, x1);
        }
    }
    for (; i < n - (n - head) % CBN_L; i += CBN_L) {
        CBN_VLOAD(x0, x + i); x0 = (x0 - vmean) * vscale + vshift;
        if (residual) { CBN_VLOAD(r0, residual + i); x0 += r0; }
        if (relu) x0 = CBN_RELU(IV, V, x0);
        CBN_VSTORE(y + i, x0);
    }
    for (; i < n; i++) {
        v = (x[i] - mean) * scale + shift;
        if (residual) v += residual[i];
        y[i] = (relu && v < 0) ? 0 : v;
    }
}

static inline void CBN_FN(run_affine)(const CBN_T* x, const CBN_T* residual, CBN_T* y,
                                      Py_ssize_t n, CBN_T mean, CBN_T scale, CBN_T shift,
                                      int relu) {
    CBN_FN(run_affine_body)(x, residual, y, n, mean, scale, shift, relu, 0);
}

static inline void CBN_FN(run_affine_stream)(const CBN_T* x, const CBN_T* residual, CBN_T* y,
                                             Py_ssize_t n, CBN_T mean, CBN_T scale,
                                             CBN_T shift, int relu) {
    CBN_FN(run_affine_body)(x, residual, y, n, mean, scale, shift, relu, 1);
}

/* y = (g - gmean - (x - mean) * xcoef) * scale: the training backward's dx; g masked by
   ReLU's backward first if ym (the forward output). stream: as in run_affine_body. */
static CBN_INLINE void CBN_FN(run_bwd_body)(const CBN_T* x, const CBN_T* g, const CBN_T* ym,
                                            CBN_T* y, Py_ssize_t n, CBN_T mean, CBN_T scale,
                                            CBN_T gmean, CBN_T xcoef, int stream) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    const V vmean = CBN_SPLAT(V, mean), vscale = CBN_SPLAT(V, scale);
    const V vgmean = CBN_SPLAT(V, gmean);
    const V vxcoef = CBN_SPLAT(V, xcoef);
    V x0, g0, y0;
    Py_ssize_t i = 0, nv, head = 0;
    CBN_T gv;
    if (stream && ((uintptr_t)y % sizeof(CBN_T)) != 0) stream = 0;   /* cannot align */
    if (stream) {
        head = CBN_TO_ALIGN(y);
        if (head > n) head = n;
        for (; i < head; i++) {
            gv = (ym && !(ym[i] > 0)) ? 0 : g[i];
            y[i] = (gv - gmean - (x[i] - mean) * xcoef) * scale;
        }
    }
    nv = n - (n - head) % CBN_L;
    for (; i < nv; i += CBN_L) {
        CBN_VLOAD(x0, x + i); CBN_VLOAD(g0, g + i);
        if (ym) { CBN_VLOAD(y0, ym + i); g0 = CBN_MASK(IV, V, g0, y0); }
        x0 = (g0 - vgmean - (x0 - vmean) * vxcoef) * vscale;
        if (stream) CBN_VSTREAM(y + i, x0);
        else CBN_VSTORE(y + i, x0);
    }
    for (; i < n; i++) {
        gv = (ym && !(ym[i] > 0)) ? 0 : g[i];
        y[i] = (gv - gmean - (x[i] - mean) * xcoef) * scale;
    }
}

static inline void CBN_FN(run_bwd)(const CBN_T* x, const CBN_T* g, const CBN_T* ym, CBN_T* y,
                                   Py_ssize_t n, CBN_T mean, CBN_T scale, CBN_T gmean,
                                   CBN_T xcoef) {
    CBN_FN(run_bwd_body)(x, g, ym, y, n, mean, scale, gmean, xcoef, 0);
}

static inline void CBN_FN(run_bwd_stream)(const CBN_T* x, const CBN_T* g, const CBN_T* ym,
                                          CBN_T* y, Py_ssize_t n, CBN_T mean, CBN_T scale,
                                          CBN_T gmean, CBN_T xcoef) {
    CBN_FN(run_bwd_body)(x, g, ym, y, n, mean, scale, gmean, xcoef, 1);
}

#undef CBN_PART
#undef CBN_PREFETCH_NEXT
#undef CBN_VSTREAM
#undef CBN_TO_ALIGN
#undef CBN_SUMS_STEP
