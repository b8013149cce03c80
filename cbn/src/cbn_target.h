/* cbn_target.h: every loop of one CPU target, for float and for double. A template,
 * included by cbn_kernels.h once per target with CBN_TARGET defined (and, for the
 * non-base targets, inside a `#pragma GCC target` region that enables the ISA). */

#define CBN_T float
#define CBN_IT int32_t
#define CBN_L 8
#define CBN_SUF f
#define CBN_EXP expf
#include "cbn_planes.h"
#include "cbn_rows.h"
#include "cbn_ops.h"
#undef CBN_T
#undef CBN_IT
#undef CBN_L
#undef CBN_SUF
#undef CBN_EXP

#define CBN_T double
#define CBN_IT int64_t
#define CBN_L 4
#define CBN_SUF d
#define CBN_EXP exp
#include "cbn_planes.h"
#include "cbn_rows.h"
#include "cbn_ops.h"
#undef CBN_T
#undef CBN_IT
#undef CBN_L
#undef CBN_SUF
#undef CBN_EXP
