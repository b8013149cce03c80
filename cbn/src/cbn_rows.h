/* cbn_rows.h: loops over blocks of rows (the "rows" kernels: channels-last and other
 * layouts where a channel's values are not contiguous).
 *
 * A template, included by cbn_kernels.h once per (dtype, CPU target); the parameters are
 * those of cbn_planes.h (CBN_T, CBN_IT, CBN_L, CBN_SUF, CBN_TARGET), whose vector types
 * this file uses.
 *
 * The data is a stream of rows of w values (k original rows of C*K values glued into one,
 * see rows_partition in _kernels.pyx); lane t of a row belongs to channel (t // K) % C, so
 * the per-lane "parameters" (mean, scale, ...) and accumulators are arrays of w values.
 * Two loop shapes, with identical lane-wise arithmetic in the same order:
 *
 *   fx_*    fixed-width rows, AVX-512 targets only (32 vector registers), rows whose width
 *           is a multiple of the 64-byte vector. A row of NV <= 8 vectors keeps its lane
 *           parameters and accumulators in registers for the whole block and the loop
 *           streams x and y only; a wider row is walked in memory order, the parameters
 *           and accumulators read from L1 (strips of registers walked down the rows
 *           measured up to 2x slower: the streams are no longer sequential). Each fx_*
 *           dispatcher returns 0, having done nothing, when the width does not qualify.
 *   cols_*  the general column loops, any width, any target: strips of vectors walk the
 *           rows with accumulators in L1; the last w % CBN_L columns go one at a time.
 *
 * Per-lane parameters of the element-wise passes are named as in cbn_planes.h: the
 * output pass (affine) takes mean, scale, shift and the residual; the training backward
 * (bwd) mean, scale (weight * invstd), shift (bias), gmean (sum(g)/n), xcoef
 * (invstd^2 sum(g*xmu)/n), the forward's output ym and residual res. The activation is
 * a constant ACT in each copy of a loop (cbn_act.h); the backward multiplies g by its
 * derivative at ym or at z = (x - mean) * scale + shift (+ res), recomputed in the pass.
 */

/* g times the activation's derivative for the vector of lanes t at offset o (ACT a
   constant; sh: the shift lanes; vx, the x vector there, vmn, vsc: mean and scale). */
#define CBN_ROWS_DACT(g_, vx, vmn, vsc, o, t) do {                                      \
        if (ACT != CBN_ACT_NONE) {                                                      \
            V s_, h_;                                                                   \
            if (cbn_act_needs_z(ACT)) {                                                 \
                CBN_VLOAD(h_, sh + (t));                                                \
                s_ = (vx - vmn) * vsc + h_;                                             \
                if (res) { V r_; CBN_SLOAD(r_, res + (o)); s_ += r_; }                  \
            } else {                                                                    \
                CBN_SLOAD(s_, ym + (o));                                                \
            }                                                                           \
            CBN_DACT_V(ACT, IV, V, g_, s_, slope);                                      \
        }                                                                               \
    } while (0)

/* The same for one value at offset o, lane t, as an expression of type CBN_T. */
#define CBN_ROWS_DACT_ONE(gv, o, t)                                                     \
    (ACT == CBN_ACT_NONE ? (gv)                                                         \
     : CBN_DACT_S(ACT, CBN_T, gv,                                                       \
                  (cbn_act_needs_z(ACT)                                                 \
                   ? (res ? (CBN_GET(x, o) - mn[t]) * sc[t] + sh[t] + CBN_GET(res, o)   \
                      : (CBN_GET(x, o) - mn[t]) * sc[t] + sh[t])                        \
                   : CBN_GET(ym, o)), slope))

#define CBN_WL ((int)(64 / sizeof(CBN_T)))   /* lanes of a 64-byte vector */

/* (The wide vector types CBN_FN(w), CBN_FN(wm), and CBN_WIDE, where the fixed-width row
   loops below are used: cbn_store.h.) */

/* One function per width NV (a constant inside it) and, for the element passes, per
   activation (and residual): separate functions keep every pointer in a register. */
#define CBN_X_FXA_(NAME, CODE, STR, FROM) case CBN_ACT_##NAME:                           \
    if (q) CBN_FN(fx_affine_nv)(NV_, 1, CBN_ACT_##NAME, x, q, y, R, mn, sc, sh, slope);   \
    else CBN_FN(fx_affine_nv)(NV_, 0, CBN_ACT_##NAME, x, NULL, y, R, mn, sc, sh, slope);  \
    break;
#define CBN_X_FXB_(NAME, CODE, STR, FROM) case CBN_ACT_##NAME:                           \
    CBN_FN(fx_bwd_nv)(NV_, CBN_ACT_##NAME, x, g, ym, res, y, R, mn, sc, sh, gm, xc,       \
                      slope);                                                            \
    break;
#define CBN_FX_INSTANCES(NV)                                                             \
static CBN_NOINLINE void CBN_FN(fx_affine##NV)(const CBN_S* x,                           \
        const CBN_S* q, CBN_S* y, Py_ssize_t R, const CBN_T* mn,                         \
        const CBN_T* sc, const CBN_T* sh, int act, CBN_T slope) {                        \
    enum { NV_ = NV };                                                                   \
    switch (act) { CBN_ACTIVATIONS(CBN_X_FXA_) default: break; }                         \
}                                                                                        \
static CBN_NOINLINE void CBN_FN(fx_bwd##NV)(const CBN_S* x,                              \
        const CBN_S* g, const CBN_S* ym, const CBN_S* res, CBN_S* y, Py_ssize_t R,       \
        const CBN_T* mn, const CBN_T* sc, const CBN_T* sh, const CBN_T* gm,              \
        const CBN_T* xc, int act, CBN_T slope) {                                         \
    enum { NV_ = NV };                                                                   \
    switch (act) { CBN_ACTIVATIONS(CBN_X_FXB_) default: break; }                         \
}                                                                                        \
static CBN_NOINLINE void CBN_FN(fx_shifted_sums##NV)(const CBN_S* p,                     \
        Py_ssize_t R, const CBN_T* sh, CBN_T* s1, CBN_T* s2) {                           \
    CBN_FN(fx_shifted_sums_nv)(NV, p, R, sh, s1, s2);                                    \
}                                                                                        \
static CBN_NOINLINE void CBN_FN(fx_sums##NV)(const CBN_S* g,                             \
        const CBN_S* x, Py_ssize_t R, const CBN_T* m, CBN_T* sg,                         \
        CBN_T* sgx) {                                                                    \
    CBN_FN(fx_sums_nv)(NV, g, x, R, m, sg, sgx);                                         \
}
#define CBN_FX_CASES(F, ARGS)                                                            \
    case 1: CBN_FN(F##1) ARGS; break; case 2: CBN_FN(F##2) ARGS; break;                  \
    case 3: CBN_FN(F##3) ARGS; break; case 4: CBN_FN(F##4) ARGS; break;                  \
    case 5: CBN_FN(F##5) ARGS; break; case 6: CBN_FN(F##6) ARGS; break;                  \
    case 7: CBN_FN(F##7) ARGS; break; case 8: CBN_FN(F##8) ARGS; break;




/* y = act((x - mean) * scale + shift (+ q)), rows of NV wide vectors */
static CBN_INLINE void CBN_FN(fx_affine_nv)(int NV, int HASQ, const int ACT, const CBN_S* x,
                                          const CBN_S* residual, CBN_S* y, Py_ssize_t R,
                                          const CBN_T* mean, const CBN_T* scale,
                                          const CBN_T* shift, CBN_T slope) {
    typedef CBN_FN(w) V;
    typedef CBN_FN(wm) IV;
    const int L = CBN_WL;
    V vmean[8], vscale[8], vshift[8], v, r0;
    Py_ssize_t i;
    int j;
    CBN_UNROLL for (j = 0; j < NV; j++) {
        CBN_VLOAD(vmean[j], mean + j * L); CBN_VLOAD(vscale[j], scale + j * L);
        CBN_VLOAD(vshift[j], shift + j * L);
    }
    for (i = 0; i < R; i++, x += NV * L, y += NV * L, residual += HASQ ? NV * L : 0) {
        CBN_UNROLL for (j = 0; j < NV; j++) {
            CBN_SLOAD(v, x + j * L);
            v = (v - vmean[j]) * vscale[j] + vshift[j];
            if (HASQ) { CBN_SLOAD(r0, residual + j * L); v += r0; }
            CBN_ACT_V(ACT, IV, V, v, slope);
            CBN_SSTORE(y + j * L, v);
        }
    }
}

/* The same over rows wider than 8 vectors, in memory order, the lane parameters
   loaded from L1 with each vector */
static CBN_INLINE void CBN_FN(fx_affine_wide_body)(const int ACT, const CBN_S* x,
                                                   const CBN_S* residual, CBN_S* y,
                                                   Py_ssize_t n, const CBN_T* mean,
                                                   const CBN_T* scale, const CBN_T* shift,
                                                   CBN_T slope, Py_ssize_t w) {
    typedef CBN_FN(w) V;
    typedef CBN_FN(wm) IV;
    const int L = CBN_WL;
    V v, vmean, vscale, vshift, r0;
    Py_ssize_t i, t;
    for (i = 0; i < n; i += w) {
        for (t = 0; t < w; t += L) {
            CBN_SLOAD(v, x + i + t); CBN_VLOAD(vmean, mean + t); CBN_VLOAD(vscale, scale + t);
            CBN_VLOAD(vshift, shift + t);
            v = (v - vmean) * vscale + vshift;
            if (residual) { CBN_SLOAD(r0, residual + i + t); v += r0; }
            CBN_ACT_V(ACT, IV, V, v, slope);
            CBN_SSTORE(y + i + t, v);
        }
    }
}
static CBN_NOINLINE void CBN_FN(fx_affine_wide)(const CBN_S* x, const CBN_S* residual,
                                                CBN_S* y, Py_ssize_t n, const CBN_T* mean,
                                                const CBN_T* scale, const CBN_T* shift,
                                                int act, CBN_T slope, Py_ssize_t w) {
#define CBN_ACT_STMT_ CBN_FN(fx_affine_wide_body)(ACT, x, residual, y, n, mean, scale,     \
                                                  shift, slope, w)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

/* y = (g - gmean - (x - mean) * xcoef) * scale over rows wider than 8 vectors, in memory
   order, g times the activation's derivative first */
static CBN_INLINE void CBN_FN(fx_bwd_wide_body)(const int ACT, const CBN_S* x,
                                                const CBN_S* g, const CBN_S* ym,
                                                const CBN_S* res, CBN_S* y, Py_ssize_t n,
                                                const CBN_T* mean, const CBN_T* scale,
                                                const CBN_T* sh, const CBN_T* gmean,
                                                const CBN_T* xcoef, CBN_T slope,
                                                Py_ssize_t w) {
    typedef CBN_FN(w) V;
    typedef CBN_FN(wm) IV;
    const int L = CBN_WL;
    V v, u, vmean, vscale, vgmean, vxcoef;
    Py_ssize_t i, t;
    for (i = 0; i < n; i += w) {
        for (t = 0; t < w; t += L) {
            CBN_SLOAD(v, x + i + t); CBN_SLOAD(u, g + i + t);
            CBN_VLOAD(vmean, mean + t); CBN_VLOAD(vscale, scale + t);
            CBN_ROWS_DACT(u, v, vmean, vscale, i + t, t);
            CBN_VLOAD(vgmean, gmean + t);
            CBN_VLOAD(vxcoef, xcoef + t);
            v = (u - vgmean - (v - vmean) * vxcoef) * vscale;
            CBN_SSTORE(y + i + t, v);
        }
    }
}
static CBN_NOINLINE void CBN_FN(fx_bwd_wide)(const CBN_S* x, const CBN_S* g, const CBN_S* ym,
                                             const CBN_S* res, CBN_S* y, Py_ssize_t n,
                                             const CBN_T* mean, const CBN_T* scale,
                                             const CBN_T* sh, const CBN_T* gmean,
                                             const CBN_T* xcoef, int act, CBN_T slope,
                                             Py_ssize_t w) {
#define CBN_ACT_STMT_ CBN_FN(fx_bwd_wide_body)(ACT, x, g, ym, res, y, n, mean, scale, sh,  \
                                               gmean, xcoef, slope, w)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

/* Sums over rows wider than 8 vectors, in memory order, the accumulators in L1:
   s1 = sum of d = x - sh, s2 = sum of d*d; or (SUMS) s1 = sum of g = p, s2 = sum
   of g * (x - sh). Each lane is summed in row order, as in the loops below. */
static CBN_INLINE void CBN_FN(fx_wide_red)(int SUMS, const CBN_S* p, const CBN_S* x,
                                             Py_ssize_t R, Py_ssize_t w,
                                             const CBN_T* sh, CBN_T* s1, CBN_T* s2) {
    typedef CBN_FN(w) V;
    const int L = CBN_WL;
    V v, u, vs, va, vb;
    Py_ssize_t r, t, o;
    for (t = 0; t < w; t++) { s1[t] = 0; s2[t] = 0; }
    for (r = 0, o = 0; r < R; r++, o += w) {
        for (t = 0; t < w; t += L) {
            CBN_SLOAD(v, p + o + t); CBN_VLOAD(vs, sh + t);
            CBN_VLOAD(va, s1 + t); CBN_VLOAD(vb, s2 + t);
            if (SUMS) { CBN_SLOAD(u, x + o + t); va += v; vb += v * (u - vs); }
            else { v -= vs; va += v; vb += v * v; }
            CBN_VSTORE(s1 + t, va); CBN_VSTORE(s2 + t, vb);
        }
    }
}
static CBN_NOINLINE void CBN_FN(fx_shifted_sums_wide)(const CBN_S* p, Py_ssize_t R,
                                                        Py_ssize_t w, const CBN_T* sh,
                                                        CBN_T* s1, CBN_T* s2) {
    CBN_FN(fx_wide_red)(0, p, NULL, R, w, sh, s1, s2);
}
static CBN_NOINLINE void CBN_FN(fx_sums_wide)(const CBN_S* g, const CBN_S* x, Py_ssize_t R,
                                                Py_ssize_t w, const CBN_T* m, CBN_T* sg,
                                                CBN_T* sgx) {
    CBN_FN(fx_wide_red)(1, g, x, R, w, m, sg, sgx);
}

/* y = (g - gmean - (x - mean) * xcoef) * scale, g times the activation's derivative
   first, rows of NV wide vectors */
static CBN_INLINE void CBN_FN(fx_bwd_nv)(int NV, const int ACT, const CBN_S* x,
                                         const CBN_S* g, const CBN_S* ym, const CBN_S* res,
                                         CBN_S* y, Py_ssize_t R, const CBN_T* mean,
                                         const CBN_T* scale, const CBN_T* sh,
                                         const CBN_T* gmean, const CBN_T* xcoef,
                                         CBN_T slope) {
    typedef CBN_FN(w) V;
    typedef CBN_FN(wm) IV;
    const int L = CBN_WL;
    const int OUT = ACT != CBN_ACT_NONE && !cbn_act_needs_z(ACT);
    const int Z = cbn_act_needs_z(ACT);
    V vmean[8], vscale[8], vgmean[8], vxcoef[8], v, u;
    Py_ssize_t i;
    int j;
    CBN_UNROLL for (j = 0; j < NV; j++) {
        CBN_VLOAD(vmean[j], mean + j * L); CBN_VLOAD(vscale[j], scale + j * L);
        CBN_VLOAD(vgmean[j], gmean + j * L); CBN_VLOAD(vxcoef[j], xcoef + j * L);
    }
    for (i = 0; i < R; i++, x += NV * L, g += NV * L, y += NV * L,
                           ym += OUT ? NV * L : 0, res += (Z && res) ? NV * L : 0) {
        CBN_UNROLL for (j = 0; j < NV; j++) {
            CBN_SLOAD(v, x + j * L); CBN_SLOAD(u, g + j * L);
            CBN_ROWS_DACT(u, v, vmean[j], vscale[j], j * L, j * L);
            v = (u - vgmean[j] - (v - vmean[j]) * vxcoef[j]) * vscale[j];
            CBN_SSTORE(y + j * L, v);
        }
    }
}

/* s1 = sum over rows of d = x - sh, s2 = sum of d*d (lane-wise, in row order) */
static CBN_INLINE void CBN_FN(fx_shifted_sums_nv)(int NV, const CBN_S* p, Py_ssize_t R,
                                                const CBN_T* sh, CBN_T* s1, CBN_T* s2) {
    typedef CBN_FN(w) V;
    const int L = CBN_WL;
    V vs[8], va[8], vb[8], v;
    Py_ssize_t i;
    int j;
    CBN_UNROLL for (j = 0; j < NV; j++) {
        CBN_VLOAD(vs[j], sh + j * L); va[j] = (V){0}; vb[j] = (V){0};
    }
    for (i = 0; i < R; i++, p += NV * L) {
        CBN_UNROLL for (j = 0; j < NV; j++) {
            CBN_SLOAD(v, p + j * L); v -= vs[j]; va[j] += v; vb[j] += v * v;
        }
    }
    CBN_UNROLL for (j = 0; j < NV; j++) {
        CBN_VSTORE(s1 + j * L, va[j]); CBN_VSTORE(s2 + j * L, vb[j]);
    }
}

/* sg = sum over rows of g, sgx = sum of g * (x - m) (lane-wise, in row order) */
static CBN_INLINE void CBN_FN(fx_sums_nv)(int NV, const CBN_S* g, const CBN_S* x, Py_ssize_t R,
                                        const CBN_T* m, CBN_T* sg, CBN_T* sgx) {
    typedef CBN_FN(w) V;
    const int L = CBN_WL;
    V vm[8], va[8], vb[8], v, w;
    Py_ssize_t i;
    int j;
    CBN_UNROLL for (j = 0; j < NV; j++) {
        CBN_VLOAD(vm[j], m + j * L); va[j] = (V){0}; vb[j] = (V){0};
    }
    for (i = 0; i < R; i++, g += NV * L, x += NV * L) {
        CBN_UNROLL for (j = 0; j < NV; j++) {
            CBN_SLOAD(v, g + j * L); CBN_SLOAD(w, x + j * L);
            va[j] += v; vb[j] += v * (w - vm[j]);
        }
    }
    CBN_UNROLL for (j = 0; j < NV; j++) {
        CBN_VSTORE(sg + j * L, va[j]); CBN_VSTORE(sgx + j * L, vb[j]);
    }
}

CBN_FX_INSTANCES(1) CBN_FX_INSTANCES(2) CBN_FX_INSTANCES(3)
CBN_FX_INSTANCES(4) CBN_FX_INSTANCES(5) CBN_FX_INSTANCES(6)
CBN_FX_INSTANCES(7) CBN_FX_INSTANCES(8)

static inline int CBN_FN(fx_nv)(Py_ssize_t w) {
    return (CBN_WIDE && w % CBN_WL == 0 && w <= 8 * CBN_WL)
           ? (int)(w / CBN_WL) : 0;
}
static inline int CBN_FN(fx_wide)(Py_ssize_t w) {
    return CBN_WIDE && w % CBN_WL == 0 && w > 8 * CBN_WL;
}
static int CBN_FN(fx_affine)(const CBN_S* x, const CBN_S* q, CBN_S* y, Py_ssize_t R,
                             Py_ssize_t w, const CBN_T* mn, const CBN_T* sc, const CBN_T* sh,
                             int act, CBN_T slope) {
    if (CBN_FN(fx_wide)(w)) {
        CBN_FN(fx_affine_wide)(x, q, y, R * w, mn, sc, sh, act, slope, w);
        return 1;
    }
    switch (CBN_FN(fx_nv)(w)) {
        CBN_FX_CASES(fx_affine, (x, q, y, R, mn, sc, sh, act, slope))
        default: return 0;
    }
    return 1;
}
static int CBN_FN(fx_bwd)(const CBN_S* x, const CBN_S* g, const CBN_S* ym, const CBN_S* res,
                          CBN_S* y, Py_ssize_t R, Py_ssize_t w, const CBN_T* mn,
                          const CBN_T* sc, const CBN_T* sh, const CBN_T* gm, const CBN_T* xc,
                          int act, CBN_T slope) {
    if (CBN_FN(fx_wide)(w)) {
        CBN_FN(fx_bwd_wide)(x, g, ym, res, y, R * w, mn, sc, sh, gm, xc, act, slope, w);
        return 1;
    }
    switch (CBN_FN(fx_nv)(w)) {
        CBN_FX_CASES(fx_bwd, (x, g, ym, res, y, R, mn, sc, sh, gm, xc, act, slope))
        default: return 0;
    }
    return 1;
}
static int CBN_FN(fx_shifted_sums)(const CBN_S* p, Py_ssize_t R, Py_ssize_t w,
                                     const CBN_T* sh, CBN_T* s1, CBN_T* s2) {
    if (CBN_FN(fx_wide)(w)) {
        CBN_FN(fx_shifted_sums_wide)(p, R, w, sh, s1, s2);
        return 1;
    }
    switch (CBN_FN(fx_nv)(w)) {
        CBN_FX_CASES(fx_shifted_sums, (p, R, sh, s1, s2))
        default: return 0;
    }
    return 1;
}
static int CBN_FN(fx_sums)(const CBN_S* g, const CBN_S* x, Py_ssize_t R, Py_ssize_t w,
                             const CBN_T* m, CBN_T* sg, CBN_T* sgx) {
    if (CBN_FN(fx_wide)(w)) {
        CBN_FN(fx_sums_wide)(g, x, R, w, m, sg, sgx);
        return 1;
    }
    switch (CBN_FN(fx_nv)(w)) {
        CBN_FX_CASES(fx_sums, (g, x, R, m, sg, sgx))
        default: return 0;
    }
    return 1;
}

/* Column loops over a block of R rows of w values (row r at p + r*w), any width:
   strips of vectors walk down the rows with register or L1 accumulators; the last
   w % CBN_L columns go one at a time. Each column is summed in row order. */

/* d = p[r*w + t] - sh[t]: s1[t] = sum_r d, s2[t] = sum_r d*d, row by row (streams
   from memory; the accumulators stay in L1). */
static inline void CBN_FN(cols_shifted_sums)(const CBN_S* p, Py_ssize_t R, Py_ssize_t w,
                                               const CBN_T* sh, CBN_T* s1, CBN_T* s2) {
    typedef CBN_FN(v) V;
    Py_ssize_t t, r, ws = w - w % CBN_L;
    V a, b, x, s;
    CBN_T d;
    if (CBN_FN(fx_shifted_sums)(p, R, w, sh, s1, s2)) return;
    for (t = 0; t < w; t++) { s1[t] = 0; s2[t] = 0; }
    for (r = 0; r + 4 <= R; r += 4, p += 4 * w) {   /* 4 rows per accumulator trip */
        for (t = 0; t < ws; t += CBN_L) {
            V x1, x2, x3;
            CBN_SLOAD(x, p + t); CBN_SLOAD(x1, p + w + t);
            CBN_SLOAD(x2, p + 2 * w + t); CBN_SLOAD(x3, p + 3 * w + t);
            CBN_VLOAD(s, sh + t); CBN_VLOAD(a, s1 + t); CBN_VLOAD(b, s2 + t);
            x -= s; x1 -= s; x2 -= s; x3 -= s;
            a += x; b += x * x; a += x1; b += x1 * x1;
            a += x2; b += x2 * x2; a += x3; b += x3 * x3;
            CBN_VSTORE(s1 + t, a); CBN_VSTORE(s2 + t, b);
        }
        for (; t < w; t++) {
            d = CBN_GET(p, t) - sh[t]; s1[t] += d; s2[t] += d * d;
            d = CBN_GET(p, w + t) - sh[t]; s1[t] += d; s2[t] += d * d;
            d = CBN_GET(p, 2 * w + t) - sh[t]; s1[t] += d; s2[t] += d * d;
            d = CBN_GET(p, 3 * w + t) - sh[t]; s1[t] += d; s2[t] += d * d;
        }
    }
    for (; r < R; r++, p += w) {
        for (t = 0; t < ws; t += CBN_L) {
            CBN_SLOAD(x, p + t); CBN_VLOAD(s, sh + t);
            CBN_VLOAD(a, s1 + t); CBN_VLOAD(b, s2 + t);
            x -= s; a += x; b += x * x;
            CBN_VSTORE(s1 + t, a); CBN_VSTORE(s2 + t, b);
        }
        for (; t < w; t++) { d = CBN_GET(p, t) - sh[t]; s1[t] += d; s2[t] += d * d; }
    }
}

/* d = p[r*w + t] - m[t]: s1[t] = sum_r d, s2[t] = sum_r d*d */
static inline void CBN_FN(cols_dev)(const CBN_S* p, Py_ssize_t R, Py_ssize_t w,
                                      const CBN_T* m, CBN_T* s1, CBN_T* s2) {
    typedef CBN_FN(v) V;
    Py_ssize_t t = 0, r, ws = w - w % (4 * CBN_L);
    for (; t < ws; t += 4 * CBN_L) {
        V m0, m1, m2, m3, x0, x1, x2, x3;
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        CBN_VLOAD(m0, m + t); CBN_VLOAD(m1, m + t + CBN_L);
        CBN_VLOAD(m2, m + t + 2 * CBN_L); CBN_VLOAD(m3, m + t + 3 * CBN_L);
        for (r = 0; r < R; r++) {
            const CBN_S* q = p + r * w + t;
            CBN_SLOAD(x0, q); CBN_SLOAD(x1, q + CBN_L);
            CBN_SLOAD(x2, q + 2 * CBN_L); CBN_SLOAD(x3, q + 3 * CBN_L);
            x0 -= m0; x1 -= m1; x2 -= m2; x3 -= m3;
            a0 += x0; a1 += x1; a2 += x2; a3 += x3;
            b0 += x0 * x0; b1 += x1 * x1; b2 += x2 * x2; b3 += x3 * x3;
        }
        CBN_VSTORE(s1 + t, a0); CBN_VSTORE(s1 + t + CBN_L, a1);
        CBN_VSTORE(s1 + t + 2 * CBN_L, a2); CBN_VSTORE(s1 + t + 3 * CBN_L, a3);
        CBN_VSTORE(s2 + t, b0); CBN_VSTORE(s2 + t + CBN_L, b1);
        CBN_VSTORE(s2 + t + 2 * CBN_L, b2); CBN_VSTORE(s2 + t + 3 * CBN_L, b3);
    }
    for (; t < w; t++) {
        CBN_T a = 0, b = 0, d;
        for (r = 0; r < R; r++) { d = CBN_GET(p, r * w + t) - m[t]; a += d; b += d * d; }
        s1[t] = a; s2[t] = b;
    }
}

/* sg[t] = sum_r g, sgx[t] = sum_r g * (x - mn[t]), g first multiplied by the
   activation's derivative (ACT: at ym, or at z = (x - mn[t]) * sc[t] + sh[t] (+ res));
   if gr: gr = that g; if dx: dx = g * sc[t]. Row by row (streams from memory; the
   accumulators stay in L1). */
static CBN_INLINE void CBN_FN(cols_sums_body)(const int ACT, const CBN_S* g, const CBN_S* x,
                                              const CBN_S* ym, const CBN_S* res, CBN_S* dx,
                                              CBN_S* gr, Py_ssize_t R, Py_ssize_t w,
                                              const CBN_T* mn, const CBN_T* sc,
                                              const CBN_T* sh, CBN_T slope, CBN_T* sg,
                                              CBN_T* sgx) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    Py_ssize_t t, r, o, i, ws = w - w % CBN_L;
    V a, b, vg, vx, vm, vk;
    CBN_T gv;
    if (ACT == CBN_ACT_NONE && !dx && !gr && CBN_FN(fx_sums)(g, x, R, w, mn, sg, sgx))
        return;
    for (t = 0; t < w; t++) { sg[t] = 0; sgx[t] = 0; }
    r = o = 0;
    if (ACT == CBN_ACT_NONE && !dx && !gr) {        /* 4 rows per accumulator trip */
        for (; r + 4 <= R; r += 4, o += 4 * w) {
            for (t = 0; t < ws; t += CBN_L) {
                V g1, x1;
                CBN_VLOAD(vm, mn + t); CBN_VLOAD(a, sg + t); CBN_VLOAD(b, sgx + t);
                CBN_SLOAD(vg, g + o + t); CBN_SLOAD(vx, x + o + t);
                CBN_SLOAD(g1, g + o + w + t); CBN_SLOAD(x1, x + o + w + t);
                a += vg; b += vg * (vx - vm); a += g1; b += g1 * (x1 - vm);
                CBN_SLOAD(vg, g + o + 2 * w + t); CBN_SLOAD(vx, x + o + 2 * w + t);
                CBN_SLOAD(g1, g + o + 3 * w + t); CBN_SLOAD(x1, x + o + 3 * w + t);
                a += vg; b += vg * (vx - vm); a += g1; b += g1 * (x1 - vm);
                CBN_VSTORE(sg + t, a); CBN_VSTORE(sgx + t, b);
            }
            for (; t < w; t++) {
                for (i = o + t; i < o + t + 4 * w; i += w) {
                    sg[t] += CBN_GET(g, i); sgx[t] += CBN_GET(g, i) * (CBN_GET(x, i) - mn[t]);
                }
            }
        }
    }
    for (; r < R; r++, o += w) {
        for (t = 0; t < ws; t += CBN_L) {
            CBN_SLOAD(vg, g + o + t); CBN_SLOAD(vx, x + o + t);
            CBN_VLOAD(vm, mn + t);
            if (ACT != CBN_ACT_NONE) { CBN_VLOAD(vk, sc + t); }
            CBN_ROWS_DACT(vg, vx, vm, vk, o + t, t);
            if (gr) CBN_SSTORE(gr + o + t, vg);
            CBN_VLOAD(a, sg + t); CBN_VLOAD(b, sgx + t);
            a += vg; b += vg * (vx - vm);
            CBN_VSTORE(sg + t, a); CBN_VSTORE(sgx + t, b);
            if (dx) { CBN_VLOAD(vk, sc + t); vx = vg * vk; CBN_SSTORE(dx + o + t, vx); }
        }
        for (; t < w; t++) {
            gv = CBN_ROWS_DACT_ONE(CBN_GET(g, o + t), o + t, t);
            if (gr) CBN_PUT(gr, o + t, gv);
            sg[t] += gv; sgx[t] += gv * (CBN_GET(x, o + t) - mn[t]);
            if (dx) CBN_PUT(dx, o + t, gv * sc[t]);
        }
    }
}

static CBN_NOINLINE void CBN_FN(cols_sums)(const CBN_S* g, const CBN_S* x, const CBN_S* ym,
                                           const CBN_S* res, CBN_S* dx, CBN_S* gr,
                                           Py_ssize_t R, Py_ssize_t w, const CBN_T* mn,
                                           const CBN_T* sc, const CBN_T* sh, int act,
                                           CBN_T slope, CBN_T* sg, CBN_T* sgx) {
#define CBN_ACT_STMT_ CBN_FN(cols_sums_body)(ACT, g, x, ym, res, dx, gr, R, w, mn, sc, sh, \
                                             slope, sg, sgx)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

/* The output pass over R rows with lane parameters, row by row (a streaming pass):
   y = act((x - mn) * sc + sh (+ q, the residual)); y may be x. */
static CBN_INLINE void CBN_FN(cols_affine_body)(const int ACT, const CBN_S* x,
                                                const CBN_S* q, CBN_S* y, Py_ssize_t R,
                                                Py_ssize_t w, const CBN_T* mn,
                                                const CBN_T* sc, const CBN_T* sh,
                                                CBN_T slope) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    Py_ssize_t t, r, o, i, n, ws = w - w % CBN_L;
    V va, vb, vc, vx, vq;
    CBN_T v;
    /* up to 4 rows per load of the lane parameters */
    for (r = 0, o = 0; r < R; r += n, o += n * w) {
        n = R - r < 4 ? R - r : 4;
        for (t = 0; t < ws; t += CBN_L) {
            CBN_VLOAD(va, mn + t); CBN_VLOAD(vb, sc + t); CBN_VLOAD(vc, sh + t);
            for (i = o + t; i < o + t + n * w; i += w) {
                CBN_SLOAD(vx, x + i);
                vx = (vx - va) * vb + vc;
                if (q) { CBN_SLOAD(vq, q + i); vx += vq; }
                CBN_ACT_V(ACT, IV, V, vx, slope);
                CBN_SSTORE(y + i, vx);
            }
        }
        for (; t < w; t++) {
            for (i = o + t; i < o + t + n * w; i += w) {
                v = (CBN_GET(x, i) - mn[t]) * sc[t] + sh[t];
                if (q) v += CBN_GET(q, i);
                CBN_PUT(y, i, CBN_ACT_S(ACT, CBN_T, v, slope));
            }
        }
    }
}

/* The training backward's element pass over R rows with lane parameters, row by row:
   y = (g - gm - (x - mn) * xc) * sc, g times the activation's derivative first. */
static CBN_INLINE void CBN_FN(cols_bwd_body)(const int ACT, const CBN_S* x, const CBN_S* g,
                                             const CBN_S* ym, const CBN_S* res, CBN_S* y,
                                             Py_ssize_t R, Py_ssize_t w, const CBN_T* mn,
                                             const CBN_T* sc, const CBN_T* sh,
                                             const CBN_T* gm, const CBN_T* xc,
                                             CBN_T slope) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    Py_ssize_t t, r, o, i, n, ws = w - w % CBN_L;
    V va, vb, vc, vd, vx, vg;
    CBN_T v;
    /* up to 4 rows per load of the lane parameters */
    for (r = 0, o = 0; r < R; r += n, o += n * w) {
        n = R - r < 4 ? R - r : 4;
        for (t = 0; t < ws; t += CBN_L) {
            CBN_VLOAD(va, mn + t); CBN_VLOAD(vb, sc + t); CBN_VLOAD(vc, gm + t);
            CBN_VLOAD(vd, xc + t);
            for (i = o + t; i < o + t + n * w; i += w) {
                CBN_SLOAD(vx, x + i);
                CBN_SLOAD(vg, g + i);
                CBN_ROWS_DACT(vg, vx, va, vb, i, t);
                vx = (vg - vc - (vx - va) * vd) * vb;
                CBN_SSTORE(y + i, vx);
            }
        }
        for (; t < w; t++) {
            for (i = o + t; i < o + t + n * w; i += w) {
                v = CBN_ROWS_DACT_ONE(CBN_GET(g, i), i, t);
                CBN_PUT(y, i, (v - gm[t] - (CBN_GET(x, i) - mn[t]) * xc[t]) * sc[t]);
            }
        }
    }
}

/* cols_affine_body with the activation and whether q is given made constants, one copy
   per case: a separate function whose loop keeps every pointer in a register. */
static CBN_NOINLINE void CBN_FN(cols_affine)(const CBN_S* x, const CBN_S* q, CBN_S* y,
                                             Py_ssize_t R, Py_ssize_t w, const CBN_T* mn,
                                             const CBN_T* sc, const CBN_T* sh, int act,
                                             CBN_T slope) {
    if (CBN_FN(fx_affine)(x, q, y, R, w, mn, sc, sh, act, slope)) return;
#define CBN_ACT_STMT_                                                                   \
    if (q) CBN_FN(cols_affine_body)(ACT, x, q, y, R, w, mn, sc, sh, slope);             \
    else CBN_FN(cols_affine_body)(ACT, x, NULL, y, R, w, mn, sc, sh, slope)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

/* cols_bwd_body, one copy per activation. */
static CBN_NOINLINE void CBN_FN(cols_bwd)(const CBN_S* x, const CBN_S* g, const CBN_S* ym,
                                          const CBN_S* res, CBN_S* y, Py_ssize_t R,
                                          Py_ssize_t w, const CBN_T* mn, const CBN_T* sc,
                                          const CBN_T* sh, const CBN_T* gm, const CBN_T* xc,
                                          int act, CBN_T slope) {
    if (CBN_FN(fx_bwd)(x, g, ym, res, y, R, w, mn, sc, sh, gm, xc, act, slope)) return;
#define CBN_ACT_STMT_ CBN_FN(cols_bwd_body)(ACT, x, g, ym, res, y, R, w, mn, sc, sh, gm, xc, \
                                            slope)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

/* The output pass in memory order, every line of y stored non-temporally (outputs larger
   than the cache: no read of y's lines first, and they do not evict the input): R rows
   of w values, w a multiple of a line's values (2 * CBN_L), y on a line; the lane
   parameters loaded with each vector (from L1). The same values as cols_affine. */
static CBN_INLINE void CBN_FN(rows_affine_stream_body)(const int ACT, const CBN_S* x,
                                                       const CBN_S* q, CBN_S* y,
                                                       Py_ssize_t R, Py_ssize_t w,
                                                       const CBN_T* mn, const CBN_T* sc,
                                                       const CBN_T* sh, CBN_T slope) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    Py_ssize_t r, t, o;
    V va, vb, vc, vx, vq;
    for (r = 0, o = 0; r < R; r++, o += w) {
        for (t = 0; t < w; t += CBN_L) {
            CBN_SLOAD(vx, x + o + t);
            CBN_VLOAD(va, mn + t); CBN_VLOAD(vb, sc + t); CBN_VLOAD(vc, sh + t);
            vx = (vx - va) * vb + vc;
            if (q) { CBN_SLOAD(vq, q + o + t); vx += vq; }
            CBN_ACT_V(ACT, IV, V, vx, slope);
            CBN_VSTREAM(y + o + t, vx);
        }
    }
}

/* The training backward's element pass the same way. The same values as cols_bwd. */
static CBN_INLINE void CBN_FN(rows_bwd_stream_body)(const int ACT, const CBN_S* x,
                                                    const CBN_S* g, const CBN_S* ym,
                                                    const CBN_S* res, CBN_S* y,
                                                    Py_ssize_t R, Py_ssize_t w,
                                                    const CBN_T* mn, const CBN_T* sc,
                                                    const CBN_T* sh, const CBN_T* gm,
                                                    const CBN_T* xc, CBN_T slope) {
    typedef CBN_FN(v) V;
    typedef CBN_FN(m) IV;
    Py_ssize_t r, t, o;
    V va, vb, vc, vd, vx, vg;
    for (r = 0, o = 0; r < R; r++, o += w) {
        for (t = 0; t < w; t += CBN_L) {
            CBN_SLOAD(vx, x + o + t);
            CBN_VLOAD(va, mn + t); CBN_VLOAD(vb, sc + t); CBN_VLOAD(vc, gm + t);
            CBN_VLOAD(vd, xc + t); CBN_SLOAD(vg, g + o + t);
            CBN_ROWS_DACT(vg, vx, va, vb, o + t, t);
            vx = (vg - vc - (vx - va) * vd) * vb;
            CBN_VSTREAM(y + o + t, vx);
        }
    }
}

/* Half storage: 1 where the streams could not be aligned (y off 16 bytes, or w not a
   multiple of 8 values), and the stream loops hand over to the column loops (the same
   values). The float and double loops rely on their callers (always 0). */
static inline int CBN_FN(rows_stream_off)(const CBN_S* y, Py_ssize_t w) {
    return sizeof(CBN_S) < sizeof(CBN_T) && ((uintptr_t)y % 16 != 0 || w % CBN_L != 0);
}

static CBN_NOINLINE void CBN_FN(rows_affine_stream)(const CBN_S* x, const CBN_S* q, CBN_S* y,
                                                    Py_ssize_t R, Py_ssize_t w,
                                                    const CBN_T* mn, const CBN_T* sc,
                                                    const CBN_T* sh, int act, CBN_T slope) {
    if (CBN_FN(rows_stream_off)(y, w)) {
        CBN_FN(cols_affine)(x, q, y, R, w, mn, sc, sh, act, slope);
        return;
    }
#define CBN_ACT_STMT_                                                                   \
    if (q) CBN_FN(rows_affine_stream_body)(ACT, x, q, y, R, w, mn, sc, sh, slope);      \
    else CBN_FN(rows_affine_stream_body)(ACT, x, NULL, y, R, w, mn, sc, sh, slope)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

static CBN_NOINLINE void CBN_FN(rows_bwd_stream)(const CBN_S* x, const CBN_S* g,
                                                 const CBN_S* ym, const CBN_S* res, CBN_S* y,
                                                 Py_ssize_t R, Py_ssize_t w, const CBN_T* mn,
                                                 const CBN_T* sc, const CBN_T* sh,
                                                 const CBN_T* gm, const CBN_T* xc, int act,
                                                 CBN_T slope) {
    if (CBN_FN(rows_stream_off)(y, w)) {
        CBN_FN(cols_bwd)(x, g, ym, res, y, R, w, mn, sc, sh, gm, xc, act, slope);
        return;
    }
#define CBN_ACT_STMT_ CBN_FN(rows_bwd_stream_body)(ACT, x, g, ym, res, y, R, w, mn, sc, sh, \
                                                   gm, xc, slope)
    CBN_ACT_SWITCH(act)
#undef CBN_ACT_STMT_
}

#undef CBN_ROWS_DACT
#undef CBN_ROWS_DACT_ONE
#undef CBN_X_FXA_
#undef CBN_X_FXB_
#undef CBN_VSTREAM
#undef CBN_WL
#undef CBN_FX_INSTANCES
#undef CBN_FX_CASES
