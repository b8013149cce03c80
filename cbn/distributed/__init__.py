"""Batch normalization across processes: SyncBatchNorm, PreciseBN, communicator adapters.

Data-parallel training splits each batch over several processes ("ranks"); BN's statistics
must then be those of the whole batch. :class:`SyncBatchNorm` computes each rank's local
moments (count, mean, M2) in float64 with the kernels' moments stage, exchanges them in one
collective, merges them in rank order with Chan's formula and normalizes with the result.
Every rank performs the same float64 operations on the same numbers, so every rank holds
bit-identical statistics and running statistics, and the result equals one process on the
concatenated batch up to rounding (no ``E[x^2] - E[x]^2`` anywhere). The backward exchanges
``sum(dy)`` and ``sum(dy * (x - mean))`` the same way.

:func:`precise_statistics` (PreciseBN) replaces the running statistics, an exponential
average over recent batches, by the exact population statistics of every value seen during
a number of training-mode forward calls, merged over all ranks.

Communicators
-------------
``comm`` is any of:

* an mpi4py communicator (duck-typed: an object with ``Allgather``, ``Get_rank`` and
  ``Get_size``; mpi4py is never imported unless ``comm`` is None), e.g. ``MPI.COMM_WORLD``;
* a ``torch.distributed`` process group (gloo works on the CPU), or
  :class:`TorchCommunicator` for the default group;
* :class:`ThreadCommunicator` ranks: threads of one process (for tests and experiments);
* any object with the protocol below;
* None: ``mpi4py.MPI.COMM_WORLD`` (``pip install "cbn[mpi]"``).

The protocol (:class:`Communicator`) is three members:

``rank`` (int), ``size`` (int)
    This process's index in the group and the number of processes.
``allgather(buf) -> array``
    ``buf`` is a 1-D float64 array of the same length on every rank; returns a float64
    array of shape ``(size, len(buf))`` (or a sequence of ``size`` 1-D arrays) whose row
    ``r`` is rank ``r``'s ``buf``. Collective: every rank calls it, in the same order.

Every exchange cbn makes starts with a fixed-size block (a header and up to
``FIRST_BLOCK`` = 512 payload values), so ranks whose calls disagree (different number of
channels, input dtype, eps, momentum, operation or position in the call sequence) exchange
buffers of equal length, see the disagreement in the headers and all raise
:class:`CollectiveError`: none is left waiting in a collective. A rank whose input fails
validation takes part in the exchange with an error flag before raising its own error, so
the others raise :class:`CollectiveError` instead of waiting. What no header can carry is a
rank that never calls at all (it crashed, skipped a step, or is in eval mode while the others
train): there the others wait until the communicator's timeout (``ThreadCommunicator``: 60 s;
:class:`MPICommunicator`: :data:`MPI_TIMEOUT` = 1800 s, or ``timeout=``) and then raise
:class:`CollectiveError`; an MPI communicator is spent after that (end the job). Run MPI
programs with ``python -m mpi4py script.py`` so that an uncaught exception aborts every rank.
Every setting that changes the shared statistics (channels, dtype, eps, momentum factor,
``unbiased``, ``track_running_stats``) is in the header, so ranks that differ raise at once.

The package's files hold one concern each: ``_adapters`` (communicators), ``_exchange``
(the protocol and the per-communicator bookkeeping, freed with the communicator), ``_sync``
(SyncBatchNorm), ``_reduce`` (all_reduce), ``_precise`` (PreciseBN), ``_overhead`` (the timing
CLI, ``python -m cbn.distributed``).

Payloads larger than ``FIRST_BLOCK`` values (more than 256 channels) take a second,
exact-size collective after the headers have been checked.
"""

from ._adapters import (MPI_TIMEOUT, CollectiveError, Communicator, MPICommunicator,  # noqa: F401
                        ThreadCommunicator, TorchCommunicator, as_communicator)
from ._exchange import FIRST_BLOCK, communication_time  # noqa: F401
from ._sync import SyncBatchNorm
from ._reduce import all_reduce, all_reduce_grads
from ._precise import precise_statistics
from ._overhead import measure_overhead

__all__ = ["Communicator", "CollectiveError", "MPICommunicator", "TorchCommunicator",
           "ThreadCommunicator", "SyncBatchNorm", "as_communicator", "all_reduce",
           "all_reduce_grads", "communication_time", "precise_statistics",
           "measure_overhead"]
