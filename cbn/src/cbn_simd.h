/* cbn_simd.h: portable explicit-lane vectors for cbn's loops.
 *
 * GCC's vectorizer does not vectorize loop-carried accumulators without -ffast-math, so
 * the hot loops are written with GCC/Clang vector-extension types: a few independent
 * vectors of lanes, combined in a fixed order at the end. Every operation is lane-wise
 * IEEE arithmetic (no FMA contraction: the build passes -ffp-contract=off), so a result
 * is the same whatever instruction set the compiler maps the vectors to (SSE, AVX2,
 * AVX-512). That is what lets cbn compile the loops once per CPU target and pick one at
 * import (cbn_kernels.h) without changing a single bit of any result.
 *
 * This header holds the dtype-independent pieces. The loops themselves are in
 * cbn_planes.h and cbn_rows.h, which are templates: included once per (dtype, target).
 */
#ifndef CBN_SIMD_H
#define CBN_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if !(defined(__GNUC__) || defined(__clang__))
#error "cbn's kernels need the vector extensions of GCC or Clang"
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* A vector of N lanes of type T. */
#define CBN_VEC(T, N) T __attribute__((vector_size((N) * sizeof(T))))
/* p itself if it points to T (const or not), else a compile error (_Generic without a
   matching association): the loops' loads and stores check what they are given. */
#define CBN_PTR_OF(T, p) _Generic((p), const T*: (p), T*: (p))
#define CBN_WPTR_OF(T, p) _Generic((p), T*: (p))
/* Unaligned load and store of a whole vector (memcpy compiles to one instruction), from
   and to arrays of the compute type CBN_T (the lane parameters and accumulators; the
   data arrays, of the storage type, go through cbn_store.h's CBN_SLOAD and company). */
#define CBN_VLOAD(v, p) memcpy(&(v), CBN_PTR_OF(CBN_T, p), sizeof(v))
#define CBN_VSTORE(p, v) memcpy(CBN_WPTR_OF(CBN_T, p), &(v), sizeof(v))
/* Every lane set to the scalar s. */
#define CBN_SPLAT(V, s) ((V){0} + (s))

/* Half-precision storage types (the h and b instantiations: data stored as float16 or
   bfloat16, computed in float). Structs, so that arithmetic on a stored value without a
   conversion does not compile. */
typedef struct cbn_f16 { uint16_t bits; } cbn_f16;
typedef struct cbn_bf16 { uint16_t bits; } cbn_bf16;

/* Scalar conversions, exact integer code (any target; the vector forms are in
   cbn_store.h). float16 -> float: exact, subnormals, inf and NaN included. */
static inline float cbn_f16_to_f32(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, u;
    float f;
    if (e == 0x1f) {                /* inf; NaN made quiet, as F16C's vcvtph2ps does */
        u = s | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0);
    } else if (e != 0) {
        u = s | ((e + 112u) << 23) | (m << 13);
    } else if (m == 0) {
        u = s;
    } else {                        /* subnormal: normalize */
        int sh = __builtin_clz(m) - 21;
        m <<= sh;
        u = s | ((uint32_t)(113 - sh) << 23) | ((m & 0x3ffu) << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}
/* float -> float16, round to nearest even (whatever the FP environment), overflow to
   inf, NaN to a quiet NaN with the top 10 bits of its payload (F16C's vcvtps2ph). */
static inline uint16_t cbn_f32_to_f16(float f) {
    uint32_t u, sign, o;
    memcpy(&u, &f, 4);
    sign = u & 0x80000000u;
    u ^= sign;
    if (u >= 0x47800000u) {                     /* >= 65536 (rounds to inf), inf, NaN */
        o = u > 0x7f800000u ? 0x7e00u | ((u >> 13) & 0x3ffu) : 0x7c00u;
    } else if (u < 0x38800000u) {               /* < 2^-14: subnormal or zero */
        uint32_t e = u >> 23, m = (u & 0x7fffffu) | 0x800000u;
        uint32_t sh = 126 - e;                  /* to units of 2^-24 (e >= 1 here) */
        if (e == 0 || sh > 31) {
            o = 0;                              /* < 2^-25: rounds to zero */
        } else {
            o = (m + ((1u << (sh - 1)) - 1) + ((m >> sh) & 1)) >> sh;
        }
    } else {
        o = (u - (112u << 23) + 0xfffu + ((u >> 13) & 1)) >> 13;
    }
    return (uint16_t)(o | (sign >> 16));
}
static inline float cbn_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
/* float -> bfloat16, round to nearest even, no flushing of subnormals, NaN kept NaN. */
static inline uint16_t cbn_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#define CBN_NOINLINE __attribute__((noinline))
#define CBN_INLINE inline __attribute__((always_inline))
#define CBN_UNROLL _Pragma("GCC unroll 8")

/* ReLU that keeps NaN (zero where x < 0, x itself elsewhere), and ReLU's backward from
   the forward output y (g where y > 0, else 0), both as lane masks; IV is the integer
   vector type of V's shape. */
#define CBN_RELU(IV, V, x) ((V)((IV)(x) & ~(IV)((x) < (V){0})))
#define CBN_MASK(IV, V, g, y) ((V)((IV)(g) & (IV)((y) > (V){0})))

/* Function names of the templates: cbn_<name>_<dtype>_<target>, e.g.
   cbn_runs_moments_f_avx512. */
#define CBN_CAT4_(a, b, c, d) a##_##b##_##c##_##d
#define CBN_CAT4(a, b, c, d) CBN_CAT4_(a, b, c, d)
#define CBN_FN(name) CBN_CAT4(cbn, name, CBN_SUF, CBN_TARGET)

#endif /* CBN_SIMD_H */
