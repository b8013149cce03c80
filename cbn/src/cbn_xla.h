/* cbn_xla.h: cbn's training/eval forward and backward as XLA FFI handlers, so that JAX
 * calls them from compiled code (jax.ffi.ffi_call, cbn/jax.py) with no Python per call.
 *
 * XLA's typed FFI is a C ABI: a handler is `XLA_FFI_Error* handler(XLA_FFI_CallFrame*)`,
 * the call frame holds the argument and result buffers and the attributes, and errors are
 * made through the function table the frame points to. The declarations below are the
 * part of that ABI the handlers use, written for this file from the layout XLA documents
 * (xla/ffi/api/c_api.h, FFI API version 0.3; structs carry their size, fields are only
 * appended), so that cbn builds without jaxlib: the handlers are in the main extension
 * and cost nothing to users without JAX. The handlers call the checked C ABI entries
 * (cbn.h), so a bad call is an XLA error with the Python API's message.
 *
 * Calls (cbn/jax.py makes them; attributes are int64 or float64 scalars):
 *   cbn_forward   args  x, weight, bias, running_mean, running_var (the last two read only
 *                       when has_running; weight and bias always given, ones and zeros
 *                       when the caller had none)
 *                 rets  y, save_mean, save_invstd, new_running_mean, new_running_var
 *                 attrs training, momentum, eps, axis, act, negative_slope, has_running,
 *                       nthreads
 *   cbn_backward  args  grad_output, x, weight, bias, save_mean, save_invstd, output
 *                 rets  grad_input, grad_weight, grad_bias
 *                 attrs training, axis, act, negative_slope, nthreads
 * Every buffer is row-major (XLA's default for FFI calls), so an N-d array with channel
 * axis `axis` is the (M, C, K) view with M the product of the axes before it, K after it.
 */
#ifndef CBN_XLA_H
#define CBN_XLA_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cbn.h"

/* ---- XLA's FFI ABI, the part used here ---- */

typedef struct cbn_xla_ext {                 /* XLA_FFI_Extension_Base */
    size_t struct_size;
    int32_t type;                            /* 1: the metadata query */
    struct cbn_xla_ext* next;
} cbn_xla_ext;

typedef struct {                             /* XLA_FFI_Api_Version */
    size_t struct_size;
    cbn_xla_ext* extension_start;
    int major_version, minor_version;
} cbn_xla_version;

typedef struct {                             /* XLA_FFI_Buffer */
    size_t struct_size;
    cbn_xla_ext* extension_start;
    int32_t dtype;                           /* 11: F32, 12: F64 */
    void* data;
    int64_t rank;
    int64_t* dims;
} cbn_xla_buffer;

typedef struct {                             /* XLA_FFI_Args and XLA_FFI_Rets */
    size_t struct_size;
    cbn_xla_ext* extension_start;
    int64_t size;
    int32_t* types;                          /* 1: a buffer */
    void** items;
} cbn_xla_list;

typedef struct {                             /* XLA_FFI_ByteSpan */
    const char* ptr;
    size_t len;
} cbn_xla_span;

typedef struct {                             /* XLA_FFI_Scalar */
    int32_t dtype;                           /* 5: S64, 12: F64 */
    void* value;
} cbn_xla_scalar;

typedef struct {                             /* XLA_FFI_Attrs (sorted by name) */
    size_t struct_size;
    cbn_xla_ext* extension_start;
    int64_t size;
    int32_t* types;                          /* 3: a scalar */
    cbn_xla_span** names;
    void** attrs;
} cbn_xla_attrs;

typedef struct cbn_xla_error cbn_xla_error;  /* XLA_FFI_Error, opaque */

typedef struct {                             /* XLA_FFI_Error_Create_Args */
    size_t struct_size;
    cbn_xla_ext* extension_start;
    const char* message;
    int32_t errc;                            /* 3: INVALID_ARGUMENT */
} cbn_xla_error_args;

typedef struct {                             /* XLA_FFI_Api, up to Error_Create */
    size_t struct_size;
    cbn_xla_ext* extension_start;
    cbn_xla_version api_version;
    const void* internal_api;
    cbn_xla_error* (*error_create)(cbn_xla_error_args* args);
} cbn_xla_api;

typedef struct {                             /* XLA_FFI_CallFrame */
    size_t struct_size;
    cbn_xla_ext* extension_start;
    const cbn_xla_api* api;
    void* ctx;
    int32_t stage;                           /* 3: execute */
    cbn_xla_list args;
    cbn_xla_list rets;
    cbn_xla_attrs attrs;
    void* future;
} cbn_xla_frame;

typedef struct {                             /* XLA_FFI_Metadata */
    size_t struct_size;
    cbn_xla_version api_version;
    uint32_t traits;
    int64_t state_type_id;
} cbn_xla_metadata;

typedef struct {                             /* XLA_FFI_Metadata_Extension */
    cbn_xla_ext base;
    cbn_xla_metadata* metadata;
} cbn_xla_metadata_ext;

#define CBN_XLA_API_MAJOR 0
#define CBN_XLA_API_MINOR 3

/* ---- the handlers ---- */

static const cbn_api* cbn_xla_cbn = NULL;   /* set by cbn/_capi.pxi at import */

static cbn_xla_error* cbn_xla_fail(const cbn_xla_frame* f, const char* message) {
    cbn_xla_error_args a;
    a.struct_size = offsetof(cbn_xla_error_args, errc) + sizeof(int32_t);
    a.extension_start = NULL;
    a.message = message;
    a.errc = 3;
    return f->api->error_create(&a);
}

/* The metadata query (the frame carries the extension instead of a call): the FFI
   version these declarations follow, no traits. 1 if it was one. */
static int cbn_xla_metadata_query(cbn_xla_frame* f) {
    cbn_xla_metadata* m;
    if (f->extension_start == NULL || f->extension_start->type != 1) return 0;
    m = ((cbn_xla_metadata_ext*)f->extension_start)->metadata;
    m->api_version.struct_size = offsetof(cbn_xla_version, minor_version) + sizeof(int);
    m->api_version.extension_start = NULL;
    m->api_version.major_version = CBN_XLA_API_MAJOR;
    m->api_version.minor_version = CBN_XLA_API_MINOR;
    m->traits = 0;
    return 1;
}

/* The attribute `name` as a double (int64 and float64 scalars); 0 if it is missing. */
static int cbn_xla_attr(const cbn_xla_frame* f, const char* name, double* out) {
    int64_t i;
    size_t n = strlen(name);
    for (i = 0; i < f->attrs.size; i++) {
        const cbn_xla_span* s = f->attrs.names[i];
        const cbn_xla_scalar* v;
        if (f->attrs.types[i] != 3 || s->len != n || memcmp(s->ptr, name, n) != 0) continue;
        v = (const cbn_xla_scalar*)f->attrs.attrs[i];
        if (v->dtype == 12) *out = *(const double*)v->value;
        else if (v->dtype == 5) *out = (double)*(const int64_t*)v->value;
        else if (v->dtype == 4) *out = (double)*(const int32_t*)v->value;
        else if (v->dtype == 1) *out = (double)*(const uint8_t*)v->value;
        else return 0;
        return 1;
    }
    return 0;
}

static const cbn_xla_buffer* cbn_xla_buf(const cbn_xla_list* l, int64_t i) {
    if (i >= l->size || l->types[i] != 1) return NULL;
    return (const cbn_xla_buffer*)l->items[i];
}

/* desc for the row-major buffer b with channel axis `axis`; NULL message: ok. */
static const char* cbn_xla_desc(cbn_desc* d, const cbn_xla_buffer* b, int64_t axis,
                                int64_t nthreads, char* msg) {
    int64_t i, M = 1, K = 1;
    memset(d, 0, sizeof(*d));
    d->version = CBN_DESC_VERSION;
    /* XLA FFI data types: F16 10, F32 11, F64 12, BF16 16; half storage is computed in
       float32 (its per-channel buffers are float32) */
    if (b->dtype == 11) d->storage = CBN_FLOAT32;
    else if (b->dtype == 12) d->storage = CBN_FLOAT64;
    else if (b->dtype == 10) d->storage = CBN_FLOAT16;
    else if (b->dtype == 16) d->storage = CBN_BFLOAT16;
    else return "cbn.jax: x must be float32, float64, float16 or bfloat16";
    d->compute = d->storage == CBN_FLOAT64 ? CBN_FLOAT64 : CBN_FLOAT32;
    if (axis < 0) axis += b->rank;
    if (b->rank < 1 || axis < 0 || axis >= b->rank) return "cbn.jax: axis out of range";
    for (i = 0; i < axis; i++) M *= b->dims[i];
    for (i = axis + 1; i < b->rank; i++) K *= b->dims[i];
    d->M = M;
    d->C = b->dims[axis];
    d->K = K;
    d->stride_m = d->C * K;
    d->stride_c = K;
    d->stride_k = 1;
    d->nthreads = nthreads >= 1 ? (int32_t)nthreads : 1;
    d->msg = msg;
    d->msg_size = 256;
    return NULL;
}

static cbn_xla_error* cbn_xla_forward(cbn_xla_frame* f) {
    char msg[256];
    double training = 0, momentum = 0.1, eps = 1e-5, axis = 1, act = 0, slope = 0.01;
    double has_running = 0, nthreads = 1;
    const cbn_xla_buffer *x, *w, *b, *rm, *rv, *y, *sm, *si, *nrm, *nrv;
    const char* bad;
    size_t isz;
    cbn_desc d;
    cbn_forward_args a;
    int32_t r;
    if (cbn_xla_metadata_query(f)) return NULL;
    if (f->stage != 3) return NULL;
    x = cbn_xla_buf(&f->args, 0); w = cbn_xla_buf(&f->args, 1); b = cbn_xla_buf(&f->args, 2);
    rm = cbn_xla_buf(&f->args, 3); rv = cbn_xla_buf(&f->args, 4);
    y = cbn_xla_buf(&f->rets, 0); sm = cbn_xla_buf(&f->rets, 1); si = cbn_xla_buf(&f->rets, 2);
    nrm = cbn_xla_buf(&f->rets, 3); nrv = cbn_xla_buf(&f->rets, 4);
    if (!x || !w || !b || !rm || !rv || !y || !sm || !si || !nrm || !nrv)
        return cbn_xla_fail(f, "cbn_forward: expected 5 buffers in and 5 out");
    if (!cbn_xla_attr(f, "training", &training) || !cbn_xla_attr(f, "momentum", &momentum)
            || !cbn_xla_attr(f, "eps", &eps) || !cbn_xla_attr(f, "axis", &axis)
            || !cbn_xla_attr(f, "act", &act) || !cbn_xla_attr(f, "negative_slope", &slope)
            || !cbn_xla_attr(f, "has_running", &has_running)
            || !cbn_xla_attr(f, "nthreads", &nthreads))
        return cbn_xla_fail(f, "cbn_forward: missing attributes");
    bad = cbn_xla_desc(&d, x, (int64_t)axis, (int64_t)nthreads, msg);
    if (bad) return cbn_xla_fail(f, bad);
    isz = d.compute == CBN_FLOAT64 ? 8 : 4;
    /* the running statistics come in read-only: the update goes to their copies */
    memcpy(nrm->data, rm->data, (size_t)d.C * isz);
    memcpy(nrv->data, rv->data, (size_t)d.C * isz);
    memset(&a, 0, sizeof(a));
    a.training = training != 0;
    a.act.kind = (int32_t)act;
    a.act.negative_slope = slope;
    a.momentum = momentum;
    a.eps = eps;
    a.x = x->data;
    a.y = y->data;
    a.weight = w->data;
    a.bias = b->data;
    a.running_mean = has_running ? nrm->data : NULL;
    a.running_var = has_running ? nrv->data : NULL;
    a.save_mean = sm->data;
    a.save_invstd = si->data;
    msg[0] = 0;
    r = cbn_xla_cbn->forward(&d, &a);
    return r == CBN_OK ? NULL : cbn_xla_fail(f, msg[0] ? msg : "cbn_forward failed");
}

static cbn_xla_error* cbn_xla_backward(cbn_xla_frame* f) {
    char msg[256];
    double training = 1, axis = 1, act = 0, slope = 0.01, nthreads = 1;
    const cbn_xla_buffer *g, *x, *w, *b, *sm, *si, *y, *dx, *dw, *db;
    const char* bad;
    cbn_desc d;
    cbn_backward_args a;
    int32_t r;
    if (cbn_xla_metadata_query(f)) return NULL;
    if (f->stage != 3) return NULL;
    g = cbn_xla_buf(&f->args, 0); x = cbn_xla_buf(&f->args, 1); w = cbn_xla_buf(&f->args, 2);
    b = cbn_xla_buf(&f->args, 3); sm = cbn_xla_buf(&f->args, 4); si = cbn_xla_buf(&f->args, 5);
    y = cbn_xla_buf(&f->args, 6);
    dx = cbn_xla_buf(&f->rets, 0); dw = cbn_xla_buf(&f->rets, 1); db = cbn_xla_buf(&f->rets, 2);
    if (!g || !x || !w || !b || !sm || !si || !y || !dx || !dw || !db)
        return cbn_xla_fail(f, "cbn_backward: expected 7 buffers in and 3 out");
    if (!cbn_xla_attr(f, "training", &training) || !cbn_xla_attr(f, "axis", &axis)
            || !cbn_xla_attr(f, "act", &act) || !cbn_xla_attr(f, "negative_slope", &slope)
            || !cbn_xla_attr(f, "nthreads", &nthreads))
        return cbn_xla_fail(f, "cbn_backward: missing attributes");
    bad = cbn_xla_desc(&d, x, (int64_t)axis, (int64_t)nthreads, msg);
    if (bad) return cbn_xla_fail(f, bad);
    memset(&a, 0, sizeof(a));
    a.training = training != 0;
    a.act.kind = (int32_t)act;
    a.act.negative_slope = slope;
    a.grad_output = g->data;
    a.x = x->data;
    a.output = (act >= 1 && act <= 3) ? y->data : NULL;   /* relu, relu6, leaky_relu */
    a.weight = w->data;
    a.bias = b->data;
    a.save_mean = sm->data;
    a.save_invstd = si->data;
    a.grad_input = dx->data;
    a.grad_weight = dw->data;
    a.grad_bias = db->data;
    msg[0] = 0;
    r = cbn_xla_cbn->backward(&d, &a);
    return r == CBN_OK ? NULL : cbn_xla_fail(f, msg[0] ? msg : "cbn_backward failed");
}

#endif /* CBN_XLA_H */
