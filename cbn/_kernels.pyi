"""Type stub for the compiled kernels (``cbn/_kernels.pyx``).

Only the entries that the Python layer calls. The kernels never validate: every array is
C-contiguous and of the input's dtype (float32 or float64), checked by :mod:`cbn.functional`
(the ``plain_*`` entries excepted, which test their arguments and return None to decline).
Data arrays are the (M, C, K) view, per-channel vectors are (C,); a per-channel vector that
is None means ones (weight) or zeros (bias), a running statistic that is None is skipped.
"""

from typing import Any, List, Optional, Tuple

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

# The general path's entries.
def forward_train(x: _A, y: _A, weight: Optional[_A], bias: Optional[_A],
                  running_mean: Optional[_A], running_var: Optional[_A], save_mean: _A,
                  save_invstd: _A, momentum: float, eps: float, nthreads: int,
                  residual: Optional[_A] = None, relu: bool = False) -> None: ...
def affine(x: _A, y: _A, mean: _A, scale: _A, shift: _A, residual: Optional[_A], relu: bool,
           nthreads: int) -> None: ...
def eval_params(weight: Optional[_A], bias: Optional[_A], running_var: _A, eps: float,
                save_invstd: _A, scale: _A, shift: _A) -> None: ...
def forward_eval(x: _A, y: _A, weight: Optional[_A], bias: Optional[_A], running_mean: _A,
                 running_var: _A, save_mean: _A, save_invstd: _A, eps: float, nthreads: int,
                 residual: Optional[_A] = None, relu: bool = False) -> None: ...
def invstd(var: _A, eps: float, out: _A) -> None: ...
def backward(grad_output: _A, x: _A, grad_input: _A, weight: Optional[_A], mean: _A,
             invstd: _A, grad_weight: _A, grad_bias: _A, training: bool, nthreads: int,
             output: Optional[_A] = None, grad_residual: Optional[_A] = None) -> None: ...

# The plain-call fast path: the arguments are the public function's, unchecked (anything
# that is not a plain call returns None, and nothing is computed or written).
def plain_forward(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any,
                  training: Any, momentum: Any, eps: Any, axis: Any, n_threads: Any,
                  min_parallel: int, residual: Any = None, relu: bool = False,
                  out: Any = None) -> Optional[Tuple[_A, _A, _A]]: ...
def plain_backward(grad_output: Any, x: Any, weight: Any, save_mean: Any, save_invstd: Any,
                   training: Any, axis: Any, n_threads: Any, min_parallel: int,
                   output: Any = None, residual: bool = False) -> Optional[Tuple[_A, ...]]: ...
def plain_affine(x: Any, mean: Any, scale: Any, shift: Any, axis: Any, n_threads: Any,
                 min_parallel: int, residual: Any = None, relu: bool = False,
                 out: Any = None) -> Optional[_A]: ...

# The stages one at a time (cbn/_stages.py): statistics are float64 (C,) arrays.
def moments(x: _A, nthreads: int) -> Tuple[int, _A, _A]: ...
def merge_moments(parts: List[Tuple[int, Any, Any]]) -> Tuple[int, _A, _A]: ...
def finish(count: int, mean: Any, m2: Any, eps: float, weight: Optional[_A],
           bias: Optional[_A], running_mean: Optional[_A], running_var: Optional[_A],
           momentum: float, save_mean: _A, save_invstd: _A, scale: _A,
           shift: _A) -> None: ...
def backward_reduce(grad_output: _A, x: _A, mean: _A, nthreads: int,
                    output: Optional[_A] = None) -> Tuple[_A, _A]: ...
def backward_elements(grad_output: _A, x: _A, weight: Optional[_A], mean: _A, invstd: _A,
                      sum_dy: Any, sum_dy_xmu: Any, count: int, grad_input: _A,
                      nthreads: int, output: Optional[_A] = None) -> None: ...
