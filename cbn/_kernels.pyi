"""Type stub for the compiled kernels (``cbn/_kernels.pyx``).

Only the entries that the Python layer calls. The kernels never validate: every array is
C-contiguous and of the input's dtype (float32 or float64), checked by :mod:`cbn.functional`
(the ``plain_*`` entries excepted, which test their arguments and return None to decline).
Data arrays are the (M, C, K) view, per-channel vectors are (C,); a per-channel vector that
is None means ones (weight) or zeros (bias), a running statistic that is None is skipped.
"""

from typing import Any, Dict, List, Optional, Tuple

from numpy.typing import NDArray

#: any ndarray (the kernels take float32 and float64 alike)
_A = NDArray[Any]

def openmp_enabled() -> bool: ...
def max_threads() -> int: ...

# CPU targets of the C loops (cbn/src/cbn_kernels.h) and the build.
def cpu_targets() -> List[Tuple[str, bool]]: ...
def cpu_target() -> str: ...
def select_cpu_target(name: Optional[str] = None) -> str: ...
def build_flags() -> str: ...

# The general path's entries (cbn/_defs.pxi): each fills a cbn_desc and its operation's
# cbn_*_args (cbn/include/cbn_core.h) and calls the GIL-free core entry. activation: a
# cbn_act_kind (cbn._activations.KINDS); -1 in the backward: relu where output is given.
def forward_train(x: _A, y: _A, weight: Optional[_A], bias: Optional[_A],
                  running_mean: Optional[_A], running_var: Optional[_A], save_mean: _A,
                  save_invstd: _A, momentum: float, eps: float, nthreads: int,
                  residual: Optional[_A] = None, activation: int = 0,
                  negative_slope: float = 0.01) -> None: ...
def affine(x: _A, y: _A, mean: _A, scale: _A, shift: _A, residual: Optional[_A],
           activation: int, nthreads: int, negative_slope: float = 0.01) -> None: ...
def eval_params(weight: Optional[_A], bias: Optional[_A], running_var: _A, eps: float,
                save_invstd: _A, scale: _A, shift: _A) -> None: ...
def forward_eval(x: _A, y: _A, weight: Optional[_A], bias: Optional[_A], running_mean: _A,
                 running_var: _A, save_mean: _A, save_invstd: _A, eps: float, nthreads: int,
                 residual: Optional[_A] = None, activation: int = 0,
                 negative_slope: float = 0.01) -> None: ...
def invstd(var: _A, eps: float, out: _A) -> None: ...
def backward(grad_output: _A, x: _A, grad_input: _A, weight: Optional[_A], mean: _A,
             invstd: _A, grad_weight: _A, grad_bias: _A, training: bool, nthreads: int,
             output: Optional[_A] = None, grad_residual: Optional[_A] = None,
             activation: int = -1, negative_slope: float = 0.01, bias: Optional[_A] = None,
             residual: Optional[_A] = None) -> None: ...
def suspect(save_invstd: _A) -> bool: ...

# The plain-call fast path: the arguments are the public function's, unchecked (anything
# that is not a plain call returns None, and nothing is computed or written).
def plain_forward(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any,
                  training: Any, momentum: Any, eps: Any, axis: Any, n_threads: Any,
                  min_parallel: int, residual: Any = None, activation: int = 0,
                  out: Any = None,
                  negative_slope: float = 0.01) -> Optional[Tuple[_A, _A, _A]]: ...
def plain_backward(grad_output: Any, x: Any, weight: Any, save_mean: Any, save_invstd: Any,
                   training: Any, axis: Any, n_threads: Any, min_parallel: int,
                   output: Any = None, residual: bool = False, out: Any = None,
                   activation: int = -1,
                   negative_slope: float = 0.01) -> Optional[Tuple[_A, ...]]: ...
def plain_affine(x: Any, mean: Any, scale: Any, shift: Any, axis: Any, n_threads: Any,
                 min_parallel: int, residual: Any = None, activation: int = 0,
                 out: Any = None, negative_slope: float = 0.01) -> Optional[_A]: ...

# Channel-blocked training passes (cbn/_blocked.pxi): the cache they size groups for, and
# settings for tests and measurements.
def cache_info() -> Dict[str, Any]: ...
def _blocking(mode: Optional[str] = None, budget: Optional[int] = None,
              stream: Optional[bool] = None) -> Tuple[str, int, bool]: ...
def _block_channels(M: int, C: int, K: int, itemsize: int, narrays: int,
                    nthreads: int) -> int: ...

# The stages one at a time (cbn/_stages.py): statistics are float64 (C,) arrays.
def moments(x: _A, nthreads: int) -> Tuple[int, _A, _A]: ...
def merge_moments(parts: List[Tuple[int, Any, Any]]) -> Tuple[int, _A, _A]: ...
def finish(count: int, mean: Any, m2: Any, eps: float, weight: Optional[_A],
           bias: Optional[_A], running_mean: Optional[_A], running_var: Optional[_A],
           momentum: float, save_mean: _A, save_invstd: _A, scale: _A,
           shift: _A) -> None: ...
def backward_reduce(grad_output: _A, x: _A, mean: _A, nthreads: int,
                    output: Optional[_A] = None, activation: int = -1,
                    negative_slope: float = 0.01, scale: Optional[_A] = None,
                    shift: Optional[_A] = None,
                    residual: Optional[_A] = None) -> Tuple[_A, _A]: ...
def backward_elements(grad_output: _A, x: _A, weight: Optional[_A], mean: _A, invstd: _A,
                      sum_dy: Any, sum_dy_xmu: Any, count: int, grad_input: _A,
                      nthreads: int, output: Optional[_A] = None, activation: int = -1,
                      negative_slope: float = 0.01, bias: Optional[_A] = None,
                      residual: Optional[_A] = None) -> None: ...

# the output pool (_pool.pxi)
def empty(shape: Tuple[int, ...], dtype: Any) -> _A: ...
def set_bfloat16_typenum(typenum: int) -> None: ...
def output_pool(max_bytes: Optional[int] = None) -> Dict[str, int]: ...
