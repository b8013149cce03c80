/* cbn_act.h: the fused activations' arithmetic, one definition each, for every loop.
 *
 * The list is CBN_ACTIVATIONS in cbn_core.h. Each loop that applies an activation takes
 * it as a constant (ACT) in each of its copies; the copies are generated from the list
 * by CBN_ACT_SWITCH, so a new activation is a row in the list and a case in each of the
 * four definitions below (vector and scalar, forward and derivative), nothing else.
 *
 * Vector forms work on any vector-extension type V (IV: the integer vector of its
 * shape), so the 32-byte lanes of the planes loops and the 64-byte lanes of the rows
 * loops share them; lanes are combined with masks, never with branches. silu's
 * exponential is the C library's, lane by lane (CBN_EXP: expf or exp), the same call in
 * every CPU target. The scalar forms do the same IEEE operations in the same order as
 * the vector forms' lanes, so a loop's vector body and its scalar tail agree to the bit,
 * and so do all CPU targets.
 */
#ifndef CBN_ACT_H
#define CBN_ACT_H

#include <math.h>
#include "cbn_core.h"

/* 1 if the activation's derivative is taken at the pre-activation z (which the backward
   recomputes), 0 if at the forward's output y (or there is none). */
#define CBN_ACT_FROM_NONE 0
#define CBN_ACT_FROM_OUT 0
#define CBN_ACT_FROM_Z 1
static inline int cbn_act_needs_z(int act) {
    switch (act) {
#define CBN_X_(NAME, CODE, STR, FROM) case CBN_ACT_##NAME: return CBN_ACT_FROM_##FROM;
    CBN_ACTIVATIONS(CBN_X_)
#undef CBN_X_
    default: return 0;
    }
}

/* Lanes chosen from a where the mask m is set, else from b. */
#define CBN_BLEND(IV, V, m, a, b) ((V)(((IV)(m) & (IV)(a)) | (~(IV)(m) & (IV)(b))))

/* v = act(v), v a vector of type V; slope: negative_slope (element type). */
#define CBN_ACT_V(ACT, IV, V, v, slope) do {                                            \
        if ((ACT) == CBN_ACT_RELU) {                                                    \
            (v) = CBN_RELU(IV, V, v);                                                   \
        } else if ((ACT) == CBN_ACT_RELU6) {                                            \
            const V six_ = CBN_SPLAT(V, 6);                                             \
            (v) = CBN_RELU(IV, V, v);                                                   \
            (v) = CBN_BLEND(IV, V, (v) > six_, six_, v);                                \
        } else if ((ACT) == CBN_ACT_LEAKY_RELU) {                                       \
            (v) = CBN_BLEND(IV, V, (v) > (V){0}, v, (v) * CBN_SPLAT(V, slope));         \
        } else if ((ACT) == CBN_ACT_SILU) {                                             \
            int l_;                                                                     \
            for (l_ = 0; l_ < (int)(sizeof(V) / sizeof((v)[0])); l_++)                  \
                (v)[l_] = (v)[l_] / (1 + CBN_EXP(-(v)[l_]));                            \
        } else if ((ACT) == CBN_ACT_HARDSWISH) {                                        \
            const V six_ = CBN_SPLAT(V, 6);                                             \
            V t_ = (v) + CBN_SPLAT(V, 3);                                               \
            t_ = CBN_RELU(IV, V, t_);                                                   \
            t_ = CBN_BLEND(IV, V, t_ > six_, six_, t_);                                 \
            (v) = (v) * t_ / six_;                                                      \
        }                                                                               \
    } while (0)

/* g = g * act'(.), g a vector of type V; s: the forward's output y (relu, relu6,
   leaky_relu, which needs slope >= 0) or the pre-activation z (silu, hardswish). */
#define CBN_DACT_V(ACT, IV, V, g, s, slope) do {                                        \
        if ((ACT) == CBN_ACT_RELU) {                                                    \
            (g) = CBN_MASK(IV, V, g, s);                                                \
        } else if ((ACT) == CBN_ACT_RELU6) {                                            \
            (g) = (V)((IV)(g) & (IV)((s) > (V){0}) & (IV)((s) < CBN_SPLAT(V, 6)));      \
        } else if ((ACT) == CBN_ACT_LEAKY_RELU) {                                       \
            (g) = CBN_BLEND(IV, V, (s) > (V){0}, g, (g) * CBN_SPLAT(V, slope));         \
        } else if ((ACT) == CBN_ACT_SILU) {                                             \
            int l_;                                                                     \
            for (l_ = 0; l_ < (int)(sizeof(V) / sizeof((g)[0])); l_++) {                \
                __typeof__((g)[0]) z_ = (s)[l_], e_ = 1 / (1 + CBN_EXP(-z_));           \
                (g)[l_] = (g)[l_] * (e_ * (1 + z_ * (1 - e_)));                         \
            }                                                                           \
        } else if ((ACT) == CBN_ACT_HARDSWISH) {                                        \
            V d_ = (g) * ((s) / CBN_SPLAT(V, 3) + CBN_SPLAT(V, 0.5));                   \
            d_ = CBN_BLEND(IV, V, (s) <= CBN_SPLAT(V, 3), d_, g);                       \
            (g) = (V)(~(IV)((s) < CBN_SPLAT(V, -3)) & (IV)d_);                          \
        }                                                                               \
    } while (0)

/* The same on one value v of type T (an expression). */
#define CBN_ACT_S(ACT, T, v, slope)                                                     \
    ((ACT) == CBN_ACT_RELU ? ((v) < 0 ? (T)0 : (v))                                     \
     : (ACT) == CBN_ACT_RELU6 ? ((v) < 0 ? (T)0 : (v) > 6 ? (T)6 : (v))                 \
     : (ACT) == CBN_ACT_LEAKY_RELU ? ((v) > 0 ? (v) : (v) * (T)(slope))                 \
     : (ACT) == CBN_ACT_SILU ? (T)((v) / (1 + CBN_EXP(-(v))))                           \
     : (ACT) == CBN_ACT_HARDSWISH                                                       \
         ? (T)((v) * ((v) + (T)3 < 0 ? (T)0 : (v) + (T)3 > 6 ? (T)6 : (v) + (T)3)       \
               / (T)6)                                                                  \
     : (v))

/* g * act'(.) at s (as CBN_DACT_V) for one value (an expression; s evaluated often). */
#define CBN_DACT_S(ACT, T, g, s, slope)                                                 \
    ((ACT) == CBN_ACT_RELU ? (!((s) > 0) ? (T)0 : (g))                                  \
     : (ACT) == CBN_ACT_RELU6 ? (((s) > 0 && (s) < 6) ? (g) : (T)0)                     \
     : (ACT) == CBN_ACT_LEAKY_RELU ? ((s) > 0 ? (g) : (g) * (T)(slope))                 \
     : (ACT) == CBN_ACT_SILU                                                            \
         ? (T)((g) * ((T)1 / (1 + CBN_EXP(-(s)))                                        \
                      * (1 + (s) * (1 - (T)1 / (1 + CBN_EXP(-(s)))))))                  \
     : (ACT) == CBN_ACT_HARDSWISH                                                       \
         ? ((s) < -3 ? (T)0 : (s) <= 3 ? (T)((g) * ((s) / (T)3 + (T)0.5)) : (g))        \
     : (g))

/* switch (act) { case each activation: CBN_ACT_STMT_ with ACT that activation, a
   constant }: the copies of a loop, one per row of the list. The caller defines
   CBN_ACT_STMT_ (a statement using ACT) around it. */
#define CBN_X_CASE_(NAME, CODE, STR, FROM)                                              \
    case CBN_ACT_##NAME: { enum { ACT = CBN_ACT_##NAME }; CBN_ACT_STMT_; } break;
#define CBN_ACT_SWITCH(act) switch (act) { CBN_ACTIVATIONS(CBN_X_CASE_) default: break; }

#endif /* CBN_ACT_H */
