"""``import cbn`` imports no optional package, and bfloat16 still works once ml_dtypes is
imported (before or after cbn).

Import time itself is measured, not asserted (docs/performance.md): these tests check the
cause of a slow import, the optional packages being loaded eagerly.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

OPTIONAL = ("ml_dtypes", "torch", "mpi4py", "jax", "onnx", "onnxruntime", "matplotlib",
            "threadpoolctl", "sklearn")


def _run(code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_cbn_loads_no_optional_package():
    code = ("import sys, json, cbn, cbn.modules, cbn.functional, cbn.distributed\n"
            f"print(json.dumps([m for m in {list(OPTIONAL)!r} if m in sys.modules]))")
    assert json.loads(_run(code)) == []


@pytest.mark.skipif(importlib.util.find_spec("ml_dtypes") is None,
                    reason="ml_dtypes is not installed")
@pytest.mark.parametrize("order", ["ml_dtypes first", "cbn first"])
def test_bfloat16_is_accepted_whichever_is_imported_first(order):
    first, second = ("ml_dtypes", "cbn") if order == "ml_dtypes first" else ("cbn", "ml_dtypes")
    code = f"""
import {first}, {second}
import numpy as np
from cbn import _reference
x = (np.arange(24, dtype=np.float32).reshape(4, 3, 2) / 7).astype(ml_dtypes.bfloat16)
y = cbn.batch_norm(x, None, None, training=True)
ref = _reference.batch_norm_forward(x.astype(np.float64), None, None, None, None, True,
                                    0.1, 1e-5)[0]
print(y.dtype.name, float(np.max(np.abs(y.astype(np.float64) - ref))))
"""
    name, err = _run(code).split()
    assert name == "bfloat16"
    assert float(err) < 2e-2          # one bfloat16 rounding of values of size ~1.7


@pytest.mark.skipif(importlib.util.find_spec("ml_dtypes") is None,
                    reason="ml_dtypes is not installed")
def test_the_ml_dtypes_finder_leaves_after_ml_dtypes_and_answers_nothing_else():
    code = """
import sys, cbn
count = lambda: sum(type(f).__name__ == "_MlDtypesHook" for f in sys.meta_path)
before = count()
import json, decimal, email.parser          # other imports go on as before
middle = count()
import ml_dtypes
print(before, middle, count())
"""
    assert _run(code).split() == ["1", "1", "0"]
