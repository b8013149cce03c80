"""The README's "Embedding" snippets in C and Cython, built and run as a user would.

Each ```c and ```cython block of README.md is compiled into a small extension against the
installed cbn (``cbn.get_include()``, ``cbn/capi.pxd``) with a test harness around it, and
its results are compared with cbn's Python API bit for bit. (The numba and JAX snippets are
```python blocks: tests/test_readme.py runs them.) Skips without Cython or a C compiler.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cbn

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang):
    text = README.read_text(encoding="utf-8")
    return [m.group(1) for m in re.finditer(rf"^```{lang}[ \t]*\n(.*?)^```[ \t]*$", text,
                                            re.M | re.S)]


C_HARNESS = r"""

static PyObject* run(PyObject* self, PyObject* args) {
    unsigned long long x, y, mean, invstd;
    long long N, C, L;
    char msg[256] = {0};
    int r;
    if (!PyArg_ParseTuple(args, "KKKKLLL", &x, &y, &mean, &invstd, &N, &C, &L)) return NULL;
    r = forward_ncl((const float*)(uintptr_t)x, (float*)(uintptr_t)y, (float*)(uintptr_t)mean,
                    (float*)(uintptr_t)invstd, N, C, L, msg);
    if (r < 0) return NULL;
    return Py_BuildValue("is", r, msg);
}

static PyMethodDef methods[] = {{"run", run, METH_VARARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "snippet_c", NULL, -1, methods};
PyMODINIT_FUNC PyInit_snippet_c(void) { return PyModule_Create(&module); }
"""


def _build(tmp_path, name, filename, source, language_level=True):
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("needs a C compiler")
    (tmp_path / filename).write_text(source)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    ext = (f"cythonize([Extension({name!r}, [{filename!r}], include_dirs=[cbn.get_include()],"
           " extra_compile_args=['-fopenmp'], extra_link_args=['-fopenmp'])],"
           f" include_path=[{pkg_parent!r}], compiler_directives={{'language_level': 3}})"
           if filename.endswith(".pyx") else
           f"[Extension({name!r}, [{filename!r}], include_dirs=[cbn.get_include()])]")
    (tmp_path / "setup.py").write_text(
        "from setuptools import setup, Extension\n"
        + ("from Cython.Build import cythonize\n" if filename.endswith(".pyx") else "")
        + f"import cbn\nsetup(ext_modules={ext})\n")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sys.path.insert(0, str(tmp_path))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(tmp_path))


def test_the_readme_has_the_snippets():
    assert len(_blocks("c")) == 1 and len(_blocks("cython")) == 1


def test_the_c_snippet(tmp_path):
    pytest.importorskip("setuptools")
    mod = _build(tmp_path, "snippet_c", "snippet_c.c", _blocks("c")[0] + C_HARNESS)
    x = np.random.default_rng(0).standard_normal((8, 5, 12)).astype(np.float32)
    y, mean, invstd = np.empty_like(x), np.empty(5, np.float32), np.empty(5, np.float32)
    status, msg = mod.run(x.ctypes.data, y.ctypes.data, mean.ctypes.data, invstd.ctypes.data,
                          8, 5, 12)
    assert status == 0, msg
    ey, em, ei = cbn.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    assert y.tobytes() == ey.tobytes()
    assert mean.tobytes() == em.tobytes() and invstd.tobytes() == ei.tobytes()
    # an error comes back as a status and the Python API's message
    one = np.ones((1, 5, 1), np.float32)
    status, msg = mod.run(one.ctypes.data, y.ctypes.data, mean.ctypes.data, invstd.ctypes.data,
                          1, 5, 1)
    assert status == 1 and msg.startswith("Expected more than 1 value per channel")


def test_the_cython_snippet(tmp_path):
    pytest.importorskip("Cython")
    mod = _build(tmp_path, "snippet_cy", "snippet_cy.pyx", _blocks("cython")[0])
    xs = np.random.default_rng(1).standard_normal((16, 40, 6))
    ys, mean, invstd = np.empty_like(xs), np.empty((16, 6)), np.empty((16, 6))
    status = np.full(16, -1, np.intc)
    mod.forward_each(xs, ys, mean, invstd, status)
    assert (status == 0).all()
    for i in range(16):
        ey, em, ei = cbn.batch_norm_forward(xs[i], None, None, None, None, True, 0.1, 1e-5)
        assert ys[i].tobytes() == ey.tobytes()
        assert mean[i].tobytes() == em.tobytes() and invstd[i].tobytes() == ei.tobytes()
