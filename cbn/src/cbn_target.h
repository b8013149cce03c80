/* cbn_target.h: every loop of one CPU target, for float, double, float16 and bfloat16
 * storage. A template, included by cbn_kernels.h once per target with CBN_TARGET
 * defined (and, for the non-base targets, inside a `#pragma GCC target` region that
 * enables the ISA). float16 (h) and bfloat16 (b) data are computed in float: the f loops
 * with converting loads and stores (cbn_store.h). */

#define CBN_T float
#define CBN_S float
#define CBN_STORE 0
#define CBN_IT int32_t
#define CBN_L 8
#define CBN_SUF f
#define CBN_EXP expf
#include "cbn_store.h"
#include "cbn_planes.h"
#include "cbn_rows.h"
#include "cbn_ops.h"
#undef CBN_T
#undef CBN_S
#undef CBN_STORE
#undef CBN_IT
#undef CBN_L
#undef CBN_SUF
#undef CBN_EXP

#define CBN_T double
#define CBN_S double
#define CBN_STORE 0
#define CBN_IT int64_t
#define CBN_L 4
#define CBN_SUF d
#define CBN_EXP exp
#include "cbn_store.h"
#include "cbn_planes.h"
#include "cbn_rows.h"
#include "cbn_ops.h"
#undef CBN_T
#undef CBN_S
#undef CBN_STORE
#undef CBN_IT
#undef CBN_L
#undef CBN_SUF
#undef CBN_EXP

#define CBN_T float
#define CBN_S cbn_f16
#define CBN_STORE 1
#define CBN_IT int32_t
#define CBN_L 8
#define CBN_SUF h
#define CBN_EXP expf
#include "cbn_store.h"
#include "cbn_planes.h"
#include "cbn_rows.h"
#include "cbn_ops.h"
#undef CBN_T
#undef CBN_S
#undef CBN_STORE
#undef CBN_IT
#undef CBN_L
#undef CBN_SUF
#undef CBN_EXP

#define CBN_T float
#define CBN_S cbn_bf16
#define CBN_STORE 2
#define CBN_IT int32_t
#define CBN_L 8
#define CBN_SUF b
#define CBN_EXP expf
#include "cbn_store.h"
#include "cbn_planes.h"
#include "cbn_rows.h"
#include "cbn_ops.h"
#undef CBN_T
#undef CBN_S
#undef CBN_STORE
#undef CBN_IT
#undef CBN_L
#undef CBN_SUF
#undef CBN_EXP
