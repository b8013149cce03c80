# cython: language_level=3
"""cbn's compiled kernels: batch normalization over a C-contiguous (M, C, K) view.

Every input, whatever its ndim and channel axis, reaches these kernels as an (M, C, K) array
(see cbn.functional). Two kernel shapes cover all of them:

* planes (K >= PLANE_MIN_K): each (m, c) plane is K contiguous values of one channel; a
  unit is a block of a long plane or several short planes of one channel (runs C*K apart);
  loops run along the planes with four independent vector accumulators.
* rows (K small, e.g. channels-last where K == 1): the data is a stream of "rows" of
  W = k*C*K values (k original m-rows glued into a row of up to 8 vectors of 64 bytes
  when C*K allows, else of at least ROW_MIN_WIDTH values); loops run along the row with
  one accumulator per lane, lane t belonging to channel (t // K) % C. On AVX-512 builds
  rows of up to 8 vectors keep their lane parameters and accumulators in registers, and
  wider rows (a multiple of the vector) are walked in memory order with them in L1.

In the planes reductions, a run whose length is no multiple of the vector ends with one
vector padded with values that add exactly zero, not with a scalar loop (a latency chain).

Statistics: every block is reduced with a shift close to its mean, so nothing cancels
(never E[x^2] - E[x]^2): one streaming pass of d = x - shift and d*d around an estimate of
the mean (planes: the mean of the unit's first vector of values; rows: of the block's
first rows), and a second, corrected pass from cache wherever that estimate was far
enough off to cost accuracy (see runs_moments in cbn_planes.h and rows_block_moments), so every
result is within a factor 2 of a two-pass's rounding error. Blocks are merged with Chan et
al.'s pairwise formula in double. Work is cut into items that depend on the shape only,
never on the thread count; each item's partial result goes to its own slot and the slots
are merged in item order, so the results are bit-identical for any number of threads.

Where things live (the C is in real files; this module keeps partitions, merges, stages,
the core entries and the def layer). The includes come in dependency order, each using
only what the ones before it define:

  cbn/include/cbn_core.h      the core's plain interface: the descriptor (cbn_desc), each
                          operation's typed arguments (cbn_*_args), status codes, and the
                          lists of dtypes and activations
  cbn/src/cbn_simd.h      vector-extension lanes, shared by every loop
  cbn/src/cbn_act.h       the fused activations' arithmetic (vector and scalar, forward
                          and derivative) and CBN_ACT_SWITCH, which generates each loop's
                          copies from the list in cbn_core.h
  cbn/src/cbn_planes.h    C loops along runs of one channel (dtype/target template)
  cbn/src/cbn_rows.h      C loops over blocks of rows with per-lane parameters (template)
  cbn/src/cbn_ops.h       one (dtype, target)'s loops as a table, cbn_ops
  cbn/src/cbn_loops.h     what every target's loops need: cbn_simd.h, cbn_act.h, the
                          table's type (cbn_ops), the targets' ISA strings
  cbn/src/cbn_target.h    one target's instances (cbn_instance.h: store, planes, rows,
                          ops), for float, double, float16, bfloat16
  cbn/src/cbn_kernels.h   the tables for each CPU target, and the choice among them
  cbn/src/cbn_region.h    the avx2 and avx512 targets (and avx512bf16's bfloat16 loops,
                          the rest of it being avx512's), each in a translation unit of its
                          own that setup.py writes and compiles in parallel with this
                          module's (CBN_TARGETS_APART; cbn_kernels.h then declares their
                          tables), or all in this module's unit
  cbn/src/cbn_team.h      the adaptive thread count (contended cores)
  cbn/src/cbn_cache.h     the last-level cache's size, read at import
  _partitions.pxi         Moments and Chan's merge; the planes and rows partitions and the
                          rows' lane parameters; timed teams
  _moments.pxi            the moments loops on both shapes; the forward's finish
  _passes.pxi             the element-wise passes (Pass), the backward reductions (Dact)
                          and the backward's finish
  _blocked.pxi            channel-blocked training passes, streaming stores and
                          prefetch for inputs larger than the cache
  _core.pxi               the stages on both shapes, the operations typed, the one dtype
                          dispatch (run) and the GIL-free entries (cbn_forward, ...)
  _defs.pxi               the def layer: the general path's entries and the stages one
                          at a time, each filling a descriptor and calling an entry
  _plain.pxi              the plain-call fast path (recognise, fill, call an entry)

A call from Python: cbn.batch_norm -> functional.batch_norm_forward -> plain_forward (or
the general path's forward_train) -> cbn_forward (entry) -> run (the dtype dispatch) ->
forward_t (typed) -> the stages' loops.

The operation x loop-shape table (ops(x) is the active target's cbn_ops for x's dtype):

  operation            stage               planes                rows
  moments              moments             runs_moments          cols_shifted_sums,
                                                                 cols_dev (2nd pass)
  sum dy, sum dy*xmu   backward_reduce     runs_sums             cols_sums
  output pass          normalize           runs_affine           cols_affine
  training dx          backward_elements   runs_bwd              cols_bwd

In cbn_rows.h each rows operation has two loop shapes with the same lane-wise arithmetic
in the same order (so the same bits): fixed-width (fx_*, AVX-512 targets, the lane
parameters in registers) and the general column loops (cols_*). Both stay: on AVX-512 the
fixed-width loops took channels-last eval from 2-2.6 copies of the array to about 1.0 when
they were added, and other targets have too few vector registers for them.

Large inputs (see _blocked.pxi): a planes training forward or backward whose arrays do
not fit the last-level cache runs channel group by channel group: a group's statistics
(the same units, merged in the same tree), its finish, then its output while its input is
still in cache, groups as parallel items. The forward over long planes runs as chains:
each group's statistics are taken in the loop that writes the previous group's output
(runs_moments with a cbn_carry), so that a core reads and writes memory at once; on
several threads chains of consecutive groups are the parallel items.
Output passes larger than the cache store non-temporally, whole lines
(run_affine_stream, run_bwd_stream), and reductions larger than half of it prefetch the
next unit's runs. None of this changes a bit of any result.

Half precision: float16 and bfloat16 arrays are storage only. The C loops are instantiated
for them too (tables ops_h, ops_b): each load converts in registers (F16C/AVX-512
vcvtph2ps; bfloat16 by a shift), the arithmetic is the float32 loops', lane for lane, and
each store rounds once to nearest even (vcvtps2ph; bfloat16 by exact integer rounding).
Above the C, a data pointer is typed by its storage (the fused type `storage`) and the
per-channel vectors, lanes and partitions by the compute dtype (`floating`, float32), so a
half array is reduced in exactly the float32 array's order: its results are those of
converting it to float32, running the float32 loops and rounding the outputs.

The loops over contiguous data are written with GCC/Clang vector-extension lanes:
lane-wise IEEE arithmetic in a fixed order, no -ffast-math, no FMA contraction, so results
do not depend on the instruction set either. That is what lets cbn/src/cbn_kernels.h
compile them once per CPU target (baseline, AVX2, AVX-512) and pick one at import.

Threads: each parallel loop has a serial twin taken when nthreads == 1, which enters no
OpenMP region at all. That is not only cheaper for small inputs: a forked child, whose
OpenMP pool did not survive the fork, runs every call that way (cbn._threads), and so does
a process whose cores were found contended (cbn/src/cbn_team.h).
"""

cimport cython
cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.math cimport sqrt
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

cnp.import_array()


# The element type of the (M, C, K) data arrays: float and double are computed in their
# own type; float16 and bfloat16 storage (cbn_f16, cbn_bf16: 16 bits, no arithmetic) is
# converted in registers by the C loops and computed in float. Per-channel vectors, lane
# parameters and scratch are of the compute type, `floating`. A function specialized on
# both gets the four combinations run() calls, (float, float), (double, double),
# (cbn_f16, float), (cbn_bf16, float), and others that are never called.
ctypedef fused storage:
    float
    double
    cbn_f16
    cbn_bf16


cdef inline const cbn_ops* ops(const storage* tag) noexcept nogil:
    """The active CPU target's table of C loops for the storage dtype (see cbn/src)."""
    if storage is float:
        return cbn_ops_f()
    elif storage is double:
        return cbn_ops_d()
    elif storage is cbn_f16:
        return cbn_ops_h()
    else:
        return cbn_ops_b()


cdef inline double load1(const storage* p) noexcept nogil:
    """The value at p, widened to double (exact)."""
    if storage is float or storage is double:
        return p[0]
    elif storage is cbn_f16:
        return cbn_f16_to_f32(p[0].bits)
    else:
        return cbn_bf16_to_f32(p[0].bits)


cdef inline size_t compute_size(const storage* tag) noexcept nogil:
    """Bytes of one value of the compute dtype (partitions depend on it, not on the
    storage: a half array is reduced in exactly the float32 array's order)."""
    return sizeof(double) if storage is double else sizeof(float)


cdef enum:
    PLANE_MIN_K = 16      # K at or above this: planes kernels; below: rows kernels
    BLOCK = 4096          # values per statistics block along a plane (L1-resident)
    ROW_BLOCK = 65536     # values per statistics block of rows (L2-resident)
    ROW_ALIGN = 32        # glued rows are a multiple of this many values when cheap
    ROW_MIN_ROWS = 128    # rows per block at least (very wide rows: larger blocks)
    SHIFT_ROWS = 32       # at most this many rows' mean shifts an item's first block
    SHIFT_ROWS_MIN = 8    # ... and at least this many (rows kernels)
    ROW_MIN_WIDTH = 64    # rows kernels glue m-rows until a row has this many values
    ROW_FIXED_VECTORS = 8 # ... or, preferably, up to this many 64-byte vectors
    TARGET_ITEMS = 128    # parallel work items per reduction (fixed: determinism)
    CHUNK = 16384         # values per parallel item in element-wise passes


def openmp_enabled():
    """True if the kernels were compiled with OpenMP (else they run on one thread)."""
    return bool(cbn_openmp_enabled())


def max_threads():
    """omp_get_max_threads(): follows OMP_NUM_THREADS and threadpoolctl's limits."""
    return cbn_max_threads()


def cpu_targets():
    """The CPU targets the C loops were compiled for, best first, as (name, supported)
    pairs; supported tells whether this CPU can run that target."""
    return [(cbn_target_at(i).decode(), bool(cbn_target_supported_at(i)))
            for i in range(cbn_target_count())]


def build_flags():
    """The compiler flags this module was built with (as setup.py recorded them)."""
    return cbn_build_flags().decode()


def cpu_target():
    """The name of the CPU target whose C loops run now ("avx512bf16", "avx512", "avx2" or "base")."""
    return cbn_target_name().decode()


def select_cpu_target(name=None):
    """Run the C loops of target `name` from now on (None or "auto": the best one this
    CPU supports). Results are bit-identical whatever the target; this exists to prove
    it, and to rule a target out. Not thread-safe against calls running meanwhile."""
    if name is None:
        name = "auto"
    if not isinstance(name, str):
        raise TypeError(f"CPU target must be a str or None, got {type(name).__name__}")
    cdef bytes b = name.encode()
    cdef int r = cbn_select_target(b)
    if r == -1:
        known = ", ".join(n for n, _ in cpu_targets())
        raise ValueError(f"unknown CPU target {name!r} (this build has: {known}, auto)")
    if r == -2:
        raise ValueError(f"this CPU cannot run the {name!r} target")
    return cpu_target()


def _select_initial_target():
    import os
    import warnings
    name = os.environ.get("CBN_CPU_TARGET", "").strip()
    try:
        select_cpu_target(name or None)
    except ValueError as e:
        warnings.warn(f"CBN_CPU_TARGET ignored: {e}", RuntimeWarning, stacklevel=2)
        select_cpu_target(None)


_select_initial_target()


def team_state():
    """The adaptive team's state (see cbn/src/cbn_team.h): whether it is on, how long calls
    still run on one thread (s), the current back-off period (s), how many parallel
    regions were found stalled since import, and the largest team a region has had
    (its first region, which starts the threads, is not judged)."""
    cdef int64_t left = cbn_team_serial_until - cbn_now_ns()
    return {"adaptive": bool(cbn_team_adaptive), "serial_for": max(left, 0) * 1e-9,
            "backoff": cbn_team_backoff * 1e-9, "stalls": cbn_team_stalls,
            "started": cbn_team_started}


def _team_report(long long wall_ns, long long busy_ns, int nthreads):
    """Report a region's timing as a parallel loop would (for tests of the policy)."""
    cbn_team_report(wall_ns, busy_ns, nthreads)


def _team_reset(adaptive=None, started=None):
    """Forget any back-off; adaptive: turn the policy on or off; started: the largest
    team taken as started (its threads created), so that only a larger team's first
    region goes unjudged (None: keep either)."""
    global cbn_team_serial_until, cbn_team_backoff, cbn_team_adaptive, cbn_team_started
    cbn_team_serial_until = 0
    cbn_team_backoff = 10000000
    if adaptive is not None:
        cbn_team_adaptive = 1 if adaptive else 0
    if started is not None:
        cbn_team_started = max(1, int(started))


def _team_size(int requested):
    """The thread count a call asking for `requested` threads gets now."""
    return cbn_team_size(requested)


import os as _os
if _os.environ.get("CBN_ADAPTIVE_THREADS", "").strip() in ("0", "false", "no", "off"):
    _team_reset(False)
del _os


include "_partitions.pxi"
include "_moments.pxi"
include "_passes.pxi"
include "_blocked.pxi"
include "_core.pxi"
include "_defs.pxi"
include "_plain.pxi"
include "_pool.pxi"
include "_capi.pxi"
