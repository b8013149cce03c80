"""The edge-numerics rescue of the training forward: its one home.

The kernels compute in the data's dtype and in double with no scaling, so a channel whose
values are huge (float64 |x| ~ 1e200: squared deviations overflow) or whose variance
underflows (eps = 0) can come back with NaN or 0 for invstd although the exact mean,
invstd and output are representable; and a channel holding +inf gets a NaN mean where the
exact formula gives +inf. Such channels always show in the statistics: invstd NaN, 0 or
inf. After every training forward the kernel's def layer (cbn/_defs.pxi, and the plain
fast path, cbn/_plain.pxi) looks at the top byte of each invstd (``any_suspect``, in C:
about 0.1 us) and, where one may be such, calls :func:`rescue` with the running
statistics as they were before the call. :func:`rescue` recomputes the suspect channels in
float64, scaled by a power of two so that nothing overflows, and rewrites their
statistics, running statistics and output. Calls whose output overwrote their input
(``out=input``) keep the kernel's result: the input is gone by then.
"""

from __future__ import annotations

import math

import numpy as np

from . import _activations

__all__ = ["rescue"]


def rescue(x3, y3, r3, act: int, negative_slope: float, w, b, rm, rv, rm0, rv0, save_mean,
           save_invstd, momentum: float, eps: float) -> None:
    """Recompute the channels whose statistics the kernel could not represent.

    ``x3``/``y3``/``r3``: (M, C, K) views of the input, the output and the residual (or
    None) in the compute dtype; ``act``, ``negative_slope``: the activation (its code, see
    :mod:`cbn._activations`); ``rm``/``rv``: the (C,) running statistics the kernel
    updated, ``rm0``/``rv0`` their bytes before the call. A channel of finite values gets its exact
    statistics computed on the values scaled by a power of two (max |x| in [0.5, 1)), and
    its output and running statistics from them, wherever they are representable. A channel
    holding inf or NaN gets what IEEE arithmetic on the exact formula gives: mean +inf or
    -inf (NaN if it holds NaN or both infinities), invstd, output and running var NaN.
    """
    dtype = save_invstd.dtype
    ok = np.isfinite(save_mean) & np.isfinite(save_invstd) & (save_invstd > 0)
    cand = np.flatnonzero(~ok)
    if cand.size == 0 or np.may_share_memory(x3, y3):
        return
    red = (0, 2)
    xc = x3[:, cand, :].astype(np.float64)
    n = xc.shape[0] * xc.shape[2]
    with np.errstate(all="ignore"):
        finite = np.isfinite(xc).all(axis=red)
        xz = np.where(finite[None, :, None], xc, 0.0)
        e = np.frexp(np.abs(xz).max(axis=red))[1]             # max|x| = f * 2**e
        xs = np.ldexp(xz, -e[None, :, None])                  # exact, |xs| < 1
        mean_s = xs.mean(axis=red)
        mean_s += (xs - mean_s[None, :, None]).mean(axis=red)
        d = xs - mean_s[None, :, None]
        var_s = (d * d).mean(axis=red)
        sd = np.sqrt(var_s)
        root_eps = math.sqrt(eps)
        # invstd = 1/sqrt(var + eps); k = invstd * 2**e multiplies the scaled deviations
        den = np.hypot(np.ldexp(sd, e), root_eps)
        invstd = np.where(den == 0.0, 0.0, 1.0 / den)
        den_s = np.hypot(sd, np.ldexp(root_eps, -e))
        k = np.where(den_s == 0.0, 0.0, 1.0 / den_s)
        mean = np.ldexp(mean_s, e)
        uvar_m = np.ldexp(momentum * (var_s * (n / (n - 1.0))), 2 * e)   # momentum * var_u

        pos = (xc == np.inf).any(axis=red)
        neg = (xc == -np.inf).any(axis=red)
        nan = np.isnan(xc).any(axis=red)
        mean = np.where(finite, mean,
                        np.where(nan | (pos & neg), np.nan, np.where(pos, np.inf, -np.inf)))
        invstd = np.where(finite, invstd, np.nan)
        uvar_m = np.where(finite, uvar_m, np.nan)

        # rewrite only what differs (a constant channel with eps = 0 is already exact)
        new_mean, new_invstd = mean.astype(dtype), invstd.astype(dtype)
        same = finite & (new_mean == save_mean[cand]) & (new_invstd == save_invstd[cand])
        sel = np.flatnonzero(~same)
        if sel.size == 0:
            return
        idx = cand[sel]
        save_mean[idx] = new_mean[sel]
        save_invstd[idx] = new_invstd[sel]
        if rm is not None:
            old = np.frombuffer(rm0, dtype)[idx].astype(np.float64)
            rm[idx] = (momentum * mean[sel] + (1.0 - momentum) * old).astype(dtype)
        if rv is not None:
            old = np.frombuffer(rv0, dtype)[idx].astype(np.float64)
            rv[idx] = (uvar_m[sel] + (1.0 - momentum) * old).astype(dtype)
        scale = k[sel] * (1.0 if w is None else np.asarray(w, np.float64)[idx])
        shift = 0.0 if b is None else np.asarray(b, np.float64)[idx]
        y = (d[:, sel, :] * scale[None, :, None] + np.asarray(shift)[..., None]).astype(dtype)
        y[:, ~finite[sel], :] = np.nan
        if r3 is not None:
            y += r3[:, idx, :]
        y = _activations.apply(y, act, negative_slope)
        y3[:, idx, :] = y
