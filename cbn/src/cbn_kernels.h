/* cbn_kernels.h: cbn's C loops, compiled once per CPU target, one chosen at import.
 *
 * Included by the Cython module (after Python.h, which defines Py_ssize_t). For every
 * target the loop templates (cbn_planes.h, cbn_rows.h) are instantiated for float and
 * double, and for float16 and bfloat16 storage computed in float (cbn_store.h), and
 * gathered in an operation table each (cbn_ops.h); cbn_select_target() points the active
 * tables at one target's. Targets on x86-64 with GCC:
 *
 *   base     whatever the translation unit is compiled for (x86-64 by default)
 *   avx2     AVX2 (x86-64-v3 class CPUs)
 *   avx512   AVX-512 F/VL/BW/DQ/CD (x86-64-v4): masked tails, fixed-width row loops
 *
 * Elsewhere (other compilers or architectures, or a CBN_NATIVE build, whose base is
 * already -march=native) only "base" exists. Results are bit-identical across targets:
 * the loops are lane-wise IEEE arithmetic in a fixed order, FMA contraction is off
 * (-ffp-contract=off), and every target runs the same operations in the same order.
 */
#ifndef CBN_KERNELS_H
#define CBN_KERNELS_H

#include "cbn_loops.h"

/* The targets. CBN_MULTI_TARGET is defined by the build on x86-64 with GCC (setup.py);
   with it, CBN_TARGETS_APART: avx2, avx512 and avx512bf16 are compiled as translation
   units of their own (setup.py writes them, in parallel with this one), which define
   their tables; without it (a single translation unit: tests/capi/half_loops.c, a build
   by hand) they are compiled here. The same code either way (cbn_region.h). */
#define CBN_TARGET base
#include "cbn_target.h"
#undef CBN_TARGET

#if defined(CBN_MULTI_TARGET) && defined(CBN_TARGETS_APART)
extern CBN_HIDDEN const cbn_ops cbn_ops_f_avx2, cbn_ops_d_avx2, cbn_ops_h_avx2, cbn_ops_b_avx2;
extern CBN_HIDDEN const cbn_ops cbn_ops_f_avx512, cbn_ops_d_avx512, cbn_ops_h_avx512,
    cbn_ops_b_avx512;
extern CBN_HIDDEN const cbn_ops cbn_ops_b_avx512bf16;
#elif defined(CBN_MULTI_TARGET)
#define CBN_REGION 1
#include "cbn_region.h"
#define CBN_REGION 2
#include "cbn_region.h"
#define CBN_REGION 3
#include "cbn_region.h"
#endif

/* Orders the non-temporal stores of the *_stream loops before whatever follows (one
   per pass, not per run: a fence waits for the write-combining buffers to drain). */
static inline void cbn_sfence(void) {
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* ------------------------------------------------------------------ target choice */

#ifndef CBN_BUILD_FLAGS
#define CBN_BUILD_FLAGS "(not recorded)"
#endif
/* The compiler flags of this build (set by setup.py), for cbn.show_config(). */
static const char* cbn_build_flags(void) { return CBN_BUILD_FLAGS; }

typedef struct cbn_target_entry {
    const char* name;
    const cbn_ops* ops_f;
    const cbn_ops* ops_d;
    int (*supported)(void);
    const cbn_ops* ops_h;   /* float16 data, computed in float */
    const cbn_ops* ops_b;   /* bfloat16 data, computed in float */
} cbn_target_entry;

static int cbn_always(void) { return 1; }
#if defined(CBN_MULTI_TARGET)
static int cbn_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
           && __builtin_cpu_supports("bmi2");
}
static int cbn_has_avx512(void) {
    __builtin_cpu_init();
    return cbn_has_avx2() && __builtin_cpu_supports("avx512f")
           && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
           && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd");
}
static int cbn_has_avx512bf16(void) {
    __builtin_cpu_init();
    return cbn_has_avx512() && __builtin_cpu_supports("avx512bf16");
}
#endif

/* Best first. avx512bf16 differs from avx512 in its bfloat16 stores only (the same bits,
   in fewer instructions: cbn_store.h). */
static const cbn_target_entry cbn_targets[] = {
#if defined(CBN_MULTI_TARGET)
    {"avx512bf16", &cbn_ops_f_avx512, &cbn_ops_d_avx512, cbn_has_avx512bf16,
     &cbn_ops_h_avx512, &cbn_ops_b_avx512bf16},
    {"avx512", &cbn_ops_f_avx512, &cbn_ops_d_avx512, cbn_has_avx512,
     &cbn_ops_h_avx512, &cbn_ops_b_avx512},
    {"avx2", &cbn_ops_f_avx2, &cbn_ops_d_avx2, cbn_has_avx2,
     &cbn_ops_h_avx2, &cbn_ops_b_avx2},
#endif
    {"base", &cbn_ops_f_base, &cbn_ops_d_base, cbn_always, &cbn_ops_h_base, &cbn_ops_b_base},
};
enum { CBN_NTARGETS = sizeof(cbn_targets) / sizeof(cbn_targets[0]) };

/* The active target (the best supported one until cbn_select_target says otherwise). */
static const cbn_target_entry* cbn_active = &cbn_targets[CBN_NTARGETS - 1];

static inline const cbn_ops* cbn_ops_f(void) { return cbn_active->ops_f; }
static inline const cbn_ops* cbn_ops_d(void) { return cbn_active->ops_d; }
/* float16 and bfloat16 data (storage), computed in float: the same entries as the float
   table's, with data pointers to 2-byte values (offsets, strides, w in values) and
   lane parameter and accumulator arrays of float. */
static inline const cbn_ops* cbn_ops_h(void) { return cbn_active->ops_h; }
static inline const cbn_ops* cbn_ops_b(void) { return cbn_active->ops_b; }
static const char* cbn_target_name(void) { return cbn_active->name; }
static int cbn_target_count(void) { return CBN_NTARGETS; }
static const char* cbn_target_at(int i) { return cbn_targets[i].name; }
static int cbn_target_supported_at(int i) { return cbn_targets[i].supported(); }

/* Make `name` the active target; NULL, "" or "auto": the best one this CPU supports.
   Returns 0, or -1 for a name that was not compiled, -2 for one this CPU lacks (the
   active target is then unchanged). */
static int cbn_select_target(const char* name) {
    int i;
    for (i = 0; i < CBN_NTARGETS; i++) {
        if (name == NULL || name[0] == '\0' || strcmp(name, "auto") == 0) {
            if (cbn_targets[i].supported()) { cbn_active = &cbn_targets[i]; return 0; }
        } else if (strcmp(name, cbn_targets[i].name) == 0) {
            if (!cbn_targets[i].supported()) return -2;
            cbn_active = &cbn_targets[i];
            return 0;
        }
    }
    return -1;
}

#endif /* CBN_KERNELS_H */
