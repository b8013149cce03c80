/* half_loops.c: the float16 (h) and bfloat16 (b) loop tables of cbn/src against the
 * float (f) table, for every CPU target this machine runs (tests/test_half_loops.py
 * compiles and runs it).
 *
 * Each entry of a h/b table is called on half data and the f entry on the same data
 * converted exactly to float: reduction outputs (double scalars, float lane arrays)
 * must be bit-identical, element outputs must equal the float outputs rounded to the
 * storage type by the reference conversions below (written here, independently of the
 * kernels' code: double arithmetic and rint). NaNs compare equal to NaNs in the loops'
 * outputs; the conversions themselves must give every target the same NaN bits, those
 * of x86's F16C instructions for float16 (the payload's top bits kept, made quiet, both
 * ways) and of the integer rounding for bfloat16 (the top 16 bits, made quiet; loads
 * keep every bit). The scalar
 * conversions of cbn_simd.h are checked exhaustively (every float16 / bfloat16 value)
 * or on a large sample of float bit patterns, and so are each target's vector
 * conversions.
 *
 * Prints "ok" and exits 0, or prints the first failures and exits 1.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef ptrdiff_t Py_ssize_t;
#include "cbn_kernels.h"

/* ------------------------------------------------------------ reference conversions */

static float f_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t u_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static float ref_h2f(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    double v;
    if (e == 31 && m)
        return f_of((uint32_t)(h & 0x8000) << 16 | 0x7fc00000u | (uint32_t)m << 13);
    if (e == 31) v = INFINITY;
    else if (e == 0) v = ldexp((double)m, -24);
    else v = ldexp((double)(1024 + m), e - 25);
    return (float)((h & 0x8000) ? -v : v);
}

static float ref_bf2f(uint16_t h) {
    int e = (h >> 7) & 255, m = h & 127;
    double v;
    if (e == 255 && m) return f_of((uint32_t)h << 16);
    if (e == 255) v = INFINITY;
    else if (e == 0) v = ldexp((double)m, -133);
    else v = ldexp((double)(128 + m), e - 134);
    return (float)((h & 0x8000) ? -v : v);
}

/* Round |f| to a format with mbits stored mantissa bits, exponent bias `bias` and
   all-ones exponent emax (inf/NaN), to nearest even, with rint in double (exact: the
   scaled values have at most 24 significant bits). */
static uint16_t ref_round(float f, int mbits, int bias, int emax, uint16_t qnan) {
    uint16_t sign = (u_of(f) >> 31) ? 0x8000 : 0;
    double a = fabs((double)f), r;
    int ex, E, one = 1 << mbits;
    if (isnan(f))                         /* the payload's top mbits bits, quiet */
        return (uint16_t)(sign | qnan | ((u_of(f) >> (23 - mbits)) & (one - 1)));
    if (isinf(f)) return (uint16_t)(sign | (emax << mbits));
    if (a == 0) return sign;
    frexp(a, &ex);
    E = ex - 1;                           /* a in [2^E, 2^(E+1)) */
    if (E < 1 - bias) {                   /* subnormal range: quantum 2^(1-bias-mbits) */
        r = rint(ldexp(a, bias - 1 + mbits));
        return (uint16_t)(sign | (uint16_t)r);     /* r == one: the smallest normal */
    }
    r = rint(ldexp(a, mbits - E));        /* in [one, 2*one] */
    if (r == 2 * one) { r = one; E++; }
    if (E + bias >= emax) return (uint16_t)(sign | (emax << mbits));
    return (uint16_t)(sign | ((E + bias) << mbits) | ((int)r - one));
}
static uint16_t ref_f2h(float f) { return ref_round(f, 10, 15, 31, 0x7e00); }
static uint16_t ref_f2bf(float f) { return ref_round(f, 7, 127, 255, 0x7fc0); }

static int isnan_h(uint16_t h, int bf) {
    return bf ? ((h & 0x7f80) == 0x7f80 && (h & 0x7f)) : ((h & 0x7c00) == 0x7c00 && (h & 0x3ff));
}

/* ----------------------------------------------------------------------- reporting */

static long failures = 0;
static char ctx[512];
#define FAIL(...) do {                                                                  \
        if (failures++ < 25) { printf("FAIL [%s] ", ctx); printf(__VA_ARGS__); printf("\n"); } \
    } while (0)

static int same_f(float a, float b) { return (isnan(a) && isnan(b)) || u_of(a) == u_of(b); }
static int same_bits(float a, float b) { return u_of(a) == u_of(b); }
static int same_d(double a, double b) {
    uint64_t x, y;
    if (isnan(a) && isnan(b)) return 1;
    memcpy(&x, &a, 8); memcpy(&y, &b, 8);
    return x == y;
}

/* -------------------------------------------------------------------------- random */

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}
static int rint_(int n) { return (int)(rnd() % (uint64_t)n); }
static double unif(void) { return (rnd() >> 11) * (1.0 / 9007199254740992.0); }
static double normal(void) {
    double u = unif() + 1e-300, v = unif();
    return sqrt(-2 * log(u)) * cos(6.283185307179586 * v);
}

/* ------------------------------------------------------------ conversions (scalar) */

/* cbn_f32_to_f16 and cbn_f32_to_bf16 of x against the references (NaN bits too). */
static void check_one(float x) {
    uint16_t a = cbn_f32_to_f16(x), b = ref_f2h(x);
    if (a != b) FAIL("f16(%a) = 0x%04x, want 0x%04x", x, a, b);
    a = cbn_f32_to_bf16(x); b = ref_f2bf(x);
    if (a != b) FAIL("bf16(%a) = 0x%04x, want 0x%04x", x, a, b);
}

static void check_scalar_conversions(void) {
    uint32_t i;
    long k;
    snprintf(ctx, sizeof ctx, "scalar conversions");
    for (i = 0; i < 65536; i++) {
        float a = cbn_f16_to_f32((uint16_t)i), b = ref_h2f((uint16_t)i);
        if (!same_bits(a, b))
            FAIL("cbn_f16_to_f32(0x%04x) = %a, want %a", i, a, b);
        if (!isnan(b) && cbn_f32_to_f16(b) != i)
            FAIL("cbn_f32_to_f16(h2f(0x%04x)) = 0x%04x", i, cbn_f32_to_f16(b));
        a = cbn_bf16_to_f32((uint16_t)i); b = ref_bf2f((uint16_t)i);
        if (!same_bits(a, b)) FAIL("cbn_bf16_to_f32(0x%04x) = %a, want %a", i, a, b);
        if (!isnan(b) && cbn_f32_to_bf16(b) != i)
            FAIL("cbn_f32_to_bf16(bf2f(0x%04x)) = 0x%04x", i, cbn_f32_to_bf16(b));
        /* the float values around each half value's neighbourhood: the midpoints to
           the next value and one float ulp either side of them */
        if (!isnan(b)) {
            uint32_t hb[2] = {u_of(ref_h2f((uint16_t)i)), u_of(ref_bf2f((uint16_t)i))};
            int t, d;
            for (t = 0; t < 2; t++) {
                if (t == 0 && isnan(ref_h2f((uint16_t)i))) continue;
                for (d = -3; d <= 3; d++) {
                    /* i's value, and the midpoint to the next one up in magnitude */
                    uint32_t base = hb[t], mid = base + (t == 0 ? (1u << 12) : (1u << 15));
                    float x = f_of(base + d), y = f_of(mid + d);
                    check_one(x); check_one(y);
                }
            }
        }
    }
    for (k = 0; k < 4000000; k++) check_one(f_of((uint32_t)rnd()));
    for (k = 0; k < 512; k++) {             /* around 0, the subnormals and the top */
        check_one(f_of((uint32_t)k)); check_one(f_of(0x80000000u + (uint32_t)k));
        check_one(f_of(0x7f800000u - 256 + (uint32_t)k));
        check_one(f_of(0x477fe000u - 256 + (uint32_t)k));    /* 65504 .. 65520 .. */
        check_one(f_of(0x33000000u - 256 + (uint32_t)k));    /* 2^-25 */
        check_one(f_of(0x38800000u - 256 + (uint32_t)k));    /* 2^-14 */
    }
}

/* ------------------------------------------------ conversions (each target's vectors) */

/* cvt/pack of n values (a multiple of 16) through the 8- and 16-lane forms of one target. */
typedef void (*vconv_fn)(const uint16_t* in, float* out8, float* out16, long n);
typedef void (*vpack_fn)(const float* in, uint16_t* out8, uint16_t* out16, long n);

#define CBN_VTEST_FNS(SUF, TARGET)                                                       \
static void vconv_##SUF##_##TARGET(const uint16_t* in, float* o8, float* o16, long n) {  \
    long i;                                                                              \
    for (i = 0; i < n; i += 8) {                                                         \
        cbn_v_##SUF##_##TARGET v;                                                        \
        cbn_sld8_##SUF##_##TARGET(&v, (const CBN_S_##SUF*)(in + i));                     \
        memcpy(o8 + i, &v, sizeof v);                                                    \
    }                                                                                    \
    for (i = 0; i < n; i += 16) {                                                        \
        cbn_w_##SUF##_##TARGET v;                                                        \
        cbn_sld16_##SUF##_##TARGET(&v, (const CBN_S_##SUF*)(in + i));                    \
        memcpy(o16 + i, &v, sizeof v);                                                   \
    }                                                                                    \
}                                                                                        \
static void vpack_##SUF##_##TARGET(const float* in, uint16_t* o8, uint16_t* o16, long n) { \
    long i;                                                                              \
    for (i = 0; i < n; i += 8) {                                                         \
        cbn_v_##SUF##_##TARGET v;                                                        \
        memcpy(&v, in + i, sizeof v);                                                    \
        cbn_sst8_##SUF##_##TARGET((CBN_S_##SUF*)(o8 + i), &v);                           \
    }                                                                                    \
    for (i = 0; i < n; i += 16) {                                                        \
        cbn_w_##SUF##_##TARGET v;                                                        \
        memcpy(&v, in + i, sizeof v);                                                    \
        cbn_sst16_##SUF##_##TARGET((CBN_S_##SUF*)(o16 + i), &v);                         \
    }                                                                                    \
}
#define CBN_S_h cbn_f16
#define CBN_S_b cbn_bf16

CBN_VTEST_FNS(h, base)
CBN_VTEST_FNS(b, base)
#if defined(CBN_MULTI_TARGET)
#pragma GCC push_options
CBN_PRAGMA_TARGET(CBN_ISA_AVX2)
CBN_VTEST_FNS(h, avx2)
CBN_VTEST_FNS(b, avx2)
#pragma GCC pop_options
#pragma GCC push_options
CBN_PRAGMA_TARGET(CBN_ISA_AVX512)
CBN_VTEST_FNS(h, avx512)
CBN_VTEST_FNS(b, avx512)
#pragma GCC pop_options
#pragma GCC push_options
CBN_PRAGMA_TARGET(CBN_ISA_AVX512BF16)
CBN_VTEST_FNS(b, avx512bf16)       /* (its float16 loops are avx512's) */
#pragma GCC pop_options
#endif

static void check_vector_conversions(const char* target, vconv_fn conv, vpack_fn pack,
                                     int bf) {
    enum { N = 65536 };
    static uint16_t in[N], o8[N], o16[N];
    static float f[N], g8[N], g16[N];
    long i, k;
    snprintf(ctx, sizeof ctx, "%s vector conversions %s", target, bf ? "bf16" : "f16");
    for (i = 0; i < N; i++) in[i] = (uint16_t)i;
    conv(in, g8, g16, N);
    for (i = 0; i < N; i++) {
        float want = bf ? ref_bf2f((uint16_t)i) : ref_h2f((uint16_t)i);
        if (!same_bits(g8[i], want))
            FAIL("8-lane load of 0x%04lx: %a, want %a", i, g8[i], want);
        if (!same_bits(g16[i], want))
            FAIL("16-lane load of 0x%04lx: %a, want %a", i, g16[i], want);
    }
    for (k = 0; k < 40; k++) {
        for (i = 0; i < N; i++) {
            uint32_t u;
            if (k == 0) {           /* every stored value, and the midpoints above it */
                float b = bf ? ref_bf2f((uint16_t)(i >> 1)) : ref_h2f((uint16_t)(i >> 1));
                u = u_of(b) + ((i & 1) ? (bf ? (1u << 15) : (1u << 12)) : 0);
            } else if (k == 1) {    /* one ulp off those midpoints */
                float b = bf ? ref_bf2f((uint16_t)(i >> 1)) : ref_h2f((uint16_t)(i >> 1));
                u = u_of(b) + (bf ? (1u << 15) : (1u << 12)) + ((i & 1) ? 1 : -1);
            } else {
                u = (uint32_t)rnd();
            }
            f[i] = f_of(u);
        }
        pack(f, o8, o16, N);
        for (i = 0; i < N; i++) {
            uint16_t want = bf ? ref_f2bf(f[i]) : ref_f2h(f[i]);
            if (o8[i] != want || o16[i] != want)    /* NaN bits too */
                FAIL("store of %a (0x%08x): 0x%04x / 0x%04x, want 0x%04x", f[i], u_of(f[i]),
                     o8[i], o16[i], want);
        }
    }
}

/* --------------------------------------------------------------------- the tables */

enum { CAP = 1 << 16 };          /* values per buffer */

typedef struct buf {
    float* f;                    /* float data (exact conversions of the half data) */
    uint16_t* h;                 /* half data */
    char* fraw;
    char* hraw;
} buf;

static buf mkbuf(void) {
    buf b;
    b.fraw = aligned_alloc(64, CAP * sizeof(float) + 256);
    b.hraw = aligned_alloc(64, CAP * sizeof(uint16_t) + 256);
    b.f = (float*)b.fraw;
    b.h = (uint16_t*)b.hraw;
    return b;
}

static int BF;                   /* current storage: 0 float16, 1 bfloat16 */
static uint16_t to_s(float f) { return BF ? ref_f2bf(f) : ref_f2h(f); }
static float from_s(uint16_t h) { return BF ? ref_bf2f(h) : ref_h2f(h); }

/* Random data in b at element offset off (both views): normals times a scale, a few
   special values if specials. */
static void fill(buf* b, long n, int specials, double scale, double loc) {
    long i;
    for (i = 0; i < n; i++) {
        float v = (float)(loc + scale * normal());
        if (specials && rint_(16) == 0) {
            switch (rint_(10)) {
            case 0: v = 0.0f; break;
            case 1: v = -0.0f; break;
            case 2: v = BF ? ldexpf(1.0f, -130) : ldexpf((float)(1 + rint_(1023)), -24); break;
            case 3: v = BF ? -ldexpf(3.0f, -128) : -ldexpf((float)(1 + rint_(1023)), -24); break;
            case 4: v = BF ? 3e38f : 65504.0f; break;
            case 5: v = BF ? -3e38f : -60000.0f; break;
            case 6: v = INFINITY; break;
            case 7: v = -INFINITY; break;
            case 8: v = NAN; break;
            default: v = BF ? 1e30f : 30000.0f; break;
            }
        }
        b->h[i] = to_s(v);
        b->f[i] = from_s(b->h[i]);
    }
}
/* Output buffers: the same sentinel in both views. */
static void clear(buf* b, long n) {
    long i;
    for (i = 0; i < n; i++) { b->f[i] = 3.0f; b->h[i] = to_s(3.0f); }
}
/* Element outputs: h == the float output rounded. */
static void cmp_out(const char* what, const buf* b, long n) {
    long i;
    for (i = 0; i < n; i++) {
        uint16_t want = to_s(b->f[i]);
        if (isnan(b->f[i]) ? !isnan_h(b->h[i], BF) : b->h[i] != want) {
            FAIL("%s[%ld]: 0x%04x, want 0x%04x (%a)", what, i, b->h[i], want, b->f[i]);
            return;
        }
    }
}
static void cmp_lanes(const char* what, const float* a, const float* b, long n) {
    long i;
    for (i = 0; i < n; i++)
        if (!same_f(a[i], b[i])) { FAIL("%s[%ld]: %a, want %a", what, i, a[i], b[i]); return; }
}
static void cmp_d(const char* what, double a, double b) {
    if (!same_d(a, b)) FAIL("%s: %a, want %a", what, a, b);
}

static float rndf(double s, double loc) { return (float)(loc + s * normal()); }

/* Pointer at element offset o of a buffer, in each view. */
#define HP(b, o) ((void*)((b).h + (o)))
#define FP(b, o) ((void*)((b).f + (o)))

static buf X, G, YM, RS, Y, DX, GR;
static float lane[8][4096], lanef[4][4096], laneh[4][4096];

static void run_table(const char* target, const cbn_ops* oh, const cbn_ops* of, int trials) {
    int t;
    for (t = 0; t < trials; t++) {
        const int op = t % 13, act = rint_(6), hasres = rint_(2), specials = rint_(4) == 0;
        const int offs[6] = {0, 1, 3, 7, 8, 13};
        const long ox = offs[rint_(6)], oy = offs[rint_(6)], og = offs[rint_(6)];
        const long nruns = 1 + rint_(3), n = 1 + rint_(200);
        const long stride = n + rint_(3) * (rint_(2) ? 1 : 16);
        const long span = (nruns - 1) * stride + n;
        const double loc = rint_(3) == 0 ? 40.0 * normal() : 0.0;
        const double sc = rint_(4) == 0 ? 300.0 : 1.0;
        const float mean = rndf(1, loc), scale = rndf(1, 0), shift = rndf(1, 0);
        const float gmean = rndf(0.1, 0), xcoef = rndf(0.5, 0);
        const float slope = act == CBN_ACT_LEAKY_RELU ? 0.01f : 0.0f;
        double m1, m2, f1, f2;
        long R = 1 + rint_(9), w, i, j;
        const long widths[] = {1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 64, 100, 128,
                               144, 160, 200};
        w = widths[rint_((int)(sizeof(widths) / sizeof(widths[0])))];
        snprintf(ctx, sizeof ctx, "%s %s op %d act %d res %d n %ld nruns %ld stride %ld "
                 "R %ld w %ld offs %ld/%ld/%ld specials %d", target, BF ? "bf16" : "f16",
                 op, act, hasres, n, nruns, stride, R, w, ox, oy, og, specials);
        fill(&X, ox + 2 * span + R * w + 64, specials, sc, loc);
        fill(&G, og + span + R * w + 64, specials, 1, 0);
        fill(&YM, og + span + R * w + 64, specials, 1, 0);
        fill(&RS, oy + span + R * w + 64, specials, 1, 0);
        clear(&Y, 4 * 4096); clear(&DX, 4 * 4096); clear(&GR, 4 * 4096);
        for (j = 0; j < 6; j++)
            for (i = 0; i < (w > 4 ? w : 4); i++)     /* (runs_*: one per run, up to 3) */
                lane[j][i] = rndf(j == 1 ? 1 : 0.5, j == 0 ? loc : 0);
        switch (op) {
        case 0: {                                   /* runs_moments (with a carry) */
            const int pf = rint_(2), carried = rint_(2);
            cbn_carry ch = {HP(X, ox + span + 5), hasres ? HP(RS, oy) : NULL, HP(Y, oy),
                            mean, scale, shift, act, slope};
            cbn_carry cf = {FP(X, ox + span + 5), hasres ? FP(RS, oy) : NULL, FP(Y, oy),
                            mean, scale, shift, act, slope};
            oh->runs_moments(HP(X, ox), nruns, n, stride, &m1, &m2, pf, carried ? &ch : NULL);
            of->runs_moments(FP(X, ox), nruns, n, stride, &f1, &f2, pf, carried ? &cf : NULL);
            cbn_sfence();
            cmp_d("mean", m1, f1); cmp_d("m2", m2, f2);
            cmp_out("carried y", &Y, oy + span + 64);
            break;
        }
        case 1: {                                   /* runs_sums */
            const int pf = rint_(2), hasdx = rint_(2), hasgr = rint_(2);
            oh->runs_sums(HP(G, og), HP(X, ox), HP(YM, og), hasres ? HP(RS, oy) : NULL,
                          hasdx ? HP(DX, oy) : NULL, hasgr ? HP(GR, og) : NULL, nruns, n,
                          stride, mean, scale, shift, act, slope, &m1, &m2, pf);
            of->runs_sums(FP(G, og), FP(X, ox), FP(YM, og), hasres ? FP(RS, oy) : NULL,
                          hasdx ? FP(DX, oy) : NULL, hasgr ? FP(GR, og) : NULL, nruns, n,
                          stride, mean, scale, shift, act, slope, &f1, &f2, pf);
            cmp_d("sg", m1, f1); cmp_d("sgx", m2, f2);
            cmp_out("dx", &DX, oy + span + 64); cmp_out("gr", &GR, og + span + 64);
            break;
        }
        case 2: {       /* runs_affine: one long run, or consecutive runs with their
                           own parameters (lanes 0-2), the shift sometimes NULL */
            const long rr = rint_(2) ? 1 : nruns, nn = rr == 1 ? span : n;
            const float* sh = rint_(4) ? lane[2] : NULL;
            oh->runs_affine(HP(X, ox), hasres ? HP(RS, og) : NULL, HP(Y, oy), rr, nn,
                            lane[0], lane[1], sh, act, slope);
            of->runs_affine(FP(X, ox), hasres ? FP(RS, og) : NULL, FP(Y, oy), rr, nn,
                            lane[0], lane[1], sh, act, slope);
            cmp_out("y", &Y, oy + rr * nn + 64);
            break;
        }
        case 3: {                                   /* run_affine_stream */
            const long nn = span;
            oh->run_affine_stream(HP(X, ox), hasres ? HP(RS, og) : NULL, HP(Y, oy), nn, mean,
                                  scale, shift, act, slope);
            of->run_affine_stream(FP(X, ox), hasres ? FP(RS, og) : NULL, FP(Y, oy), nn, mean,
                                  scale, shift, act, slope);
            cbn_sfence();
            cmp_out("y", &Y, oy + nn + 64);
            break;
        }
        case 4: {       /* runs_bwd, as runs_affine (gmean and xcoef: lanes 3 and 4) */
            const long rr = rint_(2) ? 1 : nruns, nn = rr == 1 ? span : n;
            const float* sh = rint_(4) ? lane[2] : NULL;
            oh->runs_bwd(HP(X, ox), HP(G, og), HP(YM, og), hasres ? HP(RS, oy) : NULL,
                         HP(DX, oy), rr, nn, lane[0], lane[1], sh, lane[3], lane[4], act,
                         slope);
            of->runs_bwd(FP(X, ox), FP(G, og), FP(YM, og), hasres ? FP(RS, oy) : NULL,
                         FP(DX, oy), rr, nn, lane[0], lane[1], sh, lane[3], lane[4], act,
                         slope);
            cmp_out("dx", &DX, oy + rr * nn + 64);
            break;
        }
        case 5: {                                   /* run_bwd_stream */
            const long nn = span;
            oh->run_bwd_stream(HP(X, ox), HP(G, og), HP(YM, og), hasres ? HP(RS, oy) : NULL,
                               HP(DX, oy), nn, mean, scale, shift, gmean, xcoef, act, slope);
            of->run_bwd_stream(FP(X, ox), FP(G, og), FP(YM, og), hasres ? FP(RS, oy) : NULL,
                               FP(DX, oy), nn, mean, scale, shift, gmean, xcoef, act, slope);
            cbn_sfence();
            cmp_out("dx", &DX, oy + nn + 64);
            break;
        }
        case 6: case 7: {                           /* cols_shifted_sums, cols_dev */
            if (op == 6) {
                oh->cols_shifted_sums(HP(X, ox), R, w, lane[0], laneh[0], laneh[1]);
                of->cols_shifted_sums(FP(X, ox), R, w, lane[0], lanef[0], lanef[1]);
            } else {
                oh->cols_dev(HP(X, ox), R, w, lane[0], laneh[0], laneh[1]);
                of->cols_dev(FP(X, ox), R, w, lane[0], lanef[0], lanef[1]);
            }
            cmp_lanes("s1", laneh[0], lanef[0], w); cmp_lanes("s2", laneh[1], lanef[1], w);
            break;
        }
        case 8: {                                   /* cols_sums */
            const int hasdx = rint_(2), hasgr = rint_(2);
            oh->cols_sums(HP(G, og), HP(X, ox), HP(YM, og), hasres ? HP(RS, oy) : NULL,
                          hasdx ? HP(DX, oy) : NULL, hasgr ? HP(GR, og) : NULL, R, w,
                          lane[0], lane[1], lane[2], act, slope, laneh[0], laneh[1]);
            of->cols_sums(FP(G, og), FP(X, ox), FP(YM, og), hasres ? FP(RS, oy) : NULL,
                          hasdx ? FP(DX, oy) : NULL, hasgr ? FP(GR, og) : NULL, R, w,
                          lane[0], lane[1], lane[2], act, slope, lanef[0], lanef[1]);
            cmp_lanes("sg", laneh[0], lanef[0], w); cmp_lanes("sgx", laneh[1], lanef[1], w);
            cmp_out("dx", &DX, oy + R * w + 64); cmp_out("gr", &GR, og + R * w + 64);
            break;
        }
        case 9: case 11: {                          /* cols_affine, rows_affine_stream */
            long yo = oy;
            if (op == 11) {         /* its contract: w a multiple of 16, y on a line;
                                       the h/b loops also take anything else */
                if (rint_(3)) { w = 16 * (1 + rint_(10)); yo = 0; }
                oh->rows_affine_stream(HP(X, ox), hasres ? HP(RS, og) : NULL, HP(Y, yo), R,
                                       w, lane[0], lane[1], lane[2], act, slope);
            } else {
                oh->cols_affine(HP(X, ox), hasres ? HP(RS, og) : NULL, HP(Y, yo), R, w,
                                lane[0], lane[1], lane[2], act, slope);
            }
            of->cols_affine(FP(X, ox), hasres ? FP(RS, og) : NULL, FP(Y, yo), R, w,
                            lane[0], lane[1], lane[2], act, slope);
            cbn_sfence();
            cmp_out("y", &Y, yo + R * w + 64);
            break;
        }
        case 10: case 12: {                         /* cols_bwd, rows_bwd_stream */
            long yo = oy;
            if (op == 12) {
                if (rint_(3)) { w = 16 * (1 + rint_(10)); yo = 0; }
                oh->rows_bwd_stream(HP(X, ox), HP(G, og), HP(YM, og),
                                    hasres ? HP(RS, oy) : NULL, HP(DX, yo), R, w, lane[0],
                                    lane[1], lane[2], lane[3], lane[4], act, slope);
            } else {
                oh->cols_bwd(HP(X, ox), HP(G, og), HP(YM, og), hasres ? HP(RS, oy) : NULL,
                             HP(DX, yo), R, w, lane[0], lane[1], lane[2], lane[3], lane[4],
                             act, slope);
            }
            of->cols_bwd(FP(X, ox), FP(G, og), FP(YM, og), hasres ? FP(RS, oy) : NULL,
                         FP(DX, yo), R, w, lane[0], lane[1], lane[2], lane[3], lane[4], act,
                         slope);
            cbn_sfence();
            cmp_out("dx", &DX, yo + R * w + 64);
            break;
        }
        }
    }
}

int main(int argc, char** argv) {
    int i, trials = argc > 1 ? atoi(argv[1]) : 3000;
    X = mkbuf(); G = mkbuf(); YM = mkbuf(); RS = mkbuf(); Y = mkbuf(); DX = mkbuf();
    GR = mkbuf();
    check_scalar_conversions();
    for (i = 0; i < CBN_NTARGETS; i++) {
        const cbn_target_entry* e = &cbn_targets[i];
        vconv_fn conv[2] = {0, 0};
        vpack_fn pack[2] = {0, 0};
        if (!e->supported()) { printf("target %s: not supported here, skipped\n", e->name); continue; }
        if (strcmp(e->name, "base") == 0) {
            conv[0] = vconv_h_base; conv[1] = vconv_b_base;
            pack[0] = vpack_h_base; pack[1] = vpack_b_base;
        }
#if defined(CBN_MULTI_TARGET)
        else if (strcmp(e->name, "avx2") == 0) {
            conv[0] = vconv_h_avx2; conv[1] = vconv_b_avx2;
            pack[0] = vpack_h_avx2; pack[1] = vpack_b_avx2;
        } else if (strcmp(e->name, "avx512") == 0) {
            conv[0] = vconv_h_avx512; conv[1] = vconv_b_avx512;
            pack[0] = vpack_h_avx512; pack[1] = vpack_b_avx512;
        } else if (strcmp(e->name, "avx512bf16") == 0) {
            conv[0] = vconv_h_avx512; conv[1] = vconv_b_avx512bf16;
            pack[0] = vpack_h_avx512; pack[1] = vpack_b_avx512bf16;
        }
#endif
        for (BF = 0; BF < 2; BF++) {
            if (conv[BF]) check_vector_conversions(e->name, conv[BF], pack[BF], BF);
            run_table(e->name, BF ? e->ops_b : e->ops_h, e->ops_f, trials);
        }
        printf("target %s: checked\n", e->name);
    }
    if (failures) { printf("%ld failures\n", failures); return 1; }
    printf("ok\n");
    return 0;
}
