"""PreciseBN: running statistics replaced by the exact population statistics of the
batches seen in a block, merged over the ranks. (Part of :mod:`cbn.distributed`.)"""

from __future__ import annotations

import zlib
from typing import Any, List, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike

from .. import _stages
from .._stages import Moments
from ..modules import BatchNorm
from ._adapters import CollectiveError
from ._exchange import _OP_PRECISE, _channel, _exchange, _send_failure
from ._reduce import _common_comm, _modules

__all__ = ["precise_statistics"]

# ----------------------------------------------------------------------------- PreciseBN


class precise_statistics:
    """Context manager: set the running statistics to the exact population statistics.

    ::

        with cbn.precise_statistics([bn1, bn2]):
            for x in batches:
                model.forward(x)          # training mode

    Inside the block, every successful training-mode call of each module also adds the
    input's (count, mean, M2) in float64 to that module's accumulator (Chan's merge, so
    batches of any size combine exactly). At the end of the block the accumulators are
    merged over the ranks (in rank order: every rank gets the same result) and each
    module's ``running_mean`` and ``running_var`` (unbiased, or biased for a module with
    ``unbiased=False``) are set to the statistics of all values seen, on every rank;
    modules that saw no training call keep theirs. ``num_batches_tracked`` counts the calls
    as usual; the running-statistic updates made by the calls themselves are overwritten.
    Eval-mode calls are not counted.

    ``comm``: the communicator to merge over. None: the communicator of the SyncBatchNorm
    modules among ``modules`` (they must share one), or, when there are none, no
    communication (this process's statistics). The exit is collective when there is a
    communicator of more than one rank. If the block raises, the population statistics are
    not written (the running statistics stay as the calls left them), and a rank whose
    block raised tells the others, which raise :class:`CollectiveError` at their exit.

    The instance (``as stats``) has ``moments``, the merged :class:`~cbn._stages.Moments`
    of each module, after the block. The modules' ``forward`` is wrapped (an instance
    attribute) inside the block and restored afterwards, whatever happens.

    Examples
    --------
    >>> import numpy as np
    >>> import cbn
    >>> rng = np.random.default_rng(0)
    >>> batches = [rng.normal(3.0, 2.0, (n, 4)).astype(np.float32) for n in (5, 17, 9)]
    >>> bn = cbn.BatchNorm1d(4)
    >>> with cbn.precise_statistics([bn]) as stats:
    ...     for b in batches:
    ...         _ = bn(b)
    >>> allx = np.concatenate(batches).astype(np.float64)
    >>> np.allclose(bn.running_mean, allx.mean(axis=0)), stats.moments[0].count
    (True, 31)
    >>> np.allclose(bn.running_var, allx.var(axis=0, ddof=1))
    True
    """

    def __init__(self, modules: Any, comm: Any = None) -> None:
        mods = _modules(modules, "precise_statistics")
        for i, m in enumerate(mods):
            if m.running_mean is None or m.running_var is None:
                raise ValueError(f"precise_statistics: modules[{i}] has no running "
                                 "statistics (track_running_stats=False)")
        self._mods = mods
        self._comm = _common_comm(mods, comm, "precise_statistics")
        self._acc: List[Moments] = []
        self._saved: List[Tuple[bool, Any]] = []
        self.moments: Optional[List[Moments]] = None

    def __enter__(self) -> "precise_statistics":
        if self._saved:
            raise RuntimeError("precise_statistics is not reentrant")
        for m in self._mods:
            if getattr(m.forward, "_cbn_precise", False):
                raise ValueError("precise_statistics: a module is already inside another "
                                 "precise_statistics block")
        self._acc = [Moments(0, np.zeros(m.num_features), np.zeros(m.num_features))
                     for m in self._mods]
        self._saved = []
        try:
            for i, m in enumerate(self._mods):
                had = "forward" in vars(m)
                self._saved.append((had, vars(m).get("forward")))
                m.forward = self._wrap(m, i)
        except BaseException:
            self._restore()
            raise
        return self

    def _wrap(self, module: BatchNorm, i: int):
        inner = module.forward

        def forward(input: ArrayLike) -> np.ndarray:
            y = inner(input)
            if module.training:
                x = input if isinstance(input, np.ndarray) else np.asarray(input)
                if x.size:
                    mom = _stages.moments(x, axis=module.axis % x.ndim)
                    self._acc[i] = _stages.merge_moments([self._acc[i], mom])
            return y

        forward._cbn_precise = True  # type: ignore[attr-defined]
        forward.__doc__ = inner.__doc__
        return forward

    def _restore(self) -> None:
        for m, (had, old) in zip(self._mods, self._saved):
            if had:
                m.forward = old
            else:
                vars(m).pop("forward", None)
        self._saved = []

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()
        ch = None
        if self._comm is not None:
            ch = _channel(self._comm)
            if ch.size == 1:
                ch = None
        if exc_type is not None:
            # Tell the others, unless this is a CollectiveError: then they know already
            # (they raised it in the same exchange, or this rank raised it because another
            # rank's failure reached it there).
            if ch is not None and not issubclass(exc_type, CollectiveError):
                _send_failure(ch, _OP_PRECISE)
            return None
        merged = list(self._acc)
        if ch is not None:
            Cs = [m.num_features for m in self._mods]
            payload = np.concatenate([np.concatenate([[float(a.count)], a.mean, a.m2])
                                      for a in self._acc]) if self._acc else np.zeros(0)
            # (the unbiased flags change the result: every rank must agree on them too)
            _, pay = _exchange(ch, _OP_PRECISE, payload, c=sum(Cs), aux=len(Cs),
                               key=zlib.crc32(repr([(m.num_features, m.unbiased)
                                                    for m in self._mods]).encode()))
            merged, off = [], 0
            for C in Cs:
                parts = [Moments(int(pay[r, off]), pay[r, off + 1:off + 1 + C],
                                 pay[r, off + 1 + C:off + 1 + 2 * C]) for r in range(ch.size)]
                merged.append(_stages.merge_moments(parts))
                off += 1 + 2 * C
        for i, (m, mom) in enumerate(zip(self._mods, merged)):
            if mom.count == 1 and m.unbiased:
                raise ValueError(f"precise_statistics: modules[{i}] saw 1 value per channel; "
                                 "the unbiased variance needs more")
        for m, mom in zip(self._mods, merged):
            if mom.count == 0:
                continue
            m.running_mean[...] = mom.mean.astype(m.dtype)
            n = mom.count - 1 if m.unbiased else mom.count
            m.running_var[...] = (mom.m2 / n).astype(m.dtype)
            if m.frozen:
                m.freeze()
        self.moments = merged
        return None
