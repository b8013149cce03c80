"""Worker processes: forked children complete their calls with the parent's bits.

libgomp's thread pool does not survive fork(): a child that enters a parallel region after
its parent ran one waits forever for workers that do not exist. cbn runs every call of such
a child on one thread (no OpenMP region at all). Every child here runs under a timeout and is
killed if it overruns, so a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback

import numpy as np
import pytest

import cbn

TIMEOUT = 120            # seconds; a healthy child takes well under one

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def _inputs():
    """NCHW and NHWC float32/float64 inputs of 2**17 values: parallel when asked."""
    rng = np.random.default_rng(0)
    out = []
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((4, 8, 64, 64)).astype(dtype)
        out.append((x, 1))
        out.append((np.ascontiguousarray(x.transpose(0, 2, 3, 1)), -1))
    return out


def _work(n_threads):
    """Every entry point on every input: a flat list of result arrays."""
    res = []
    for x, axis in _inputs():
        C = x.shape[axis]
        w = np.linspace(0.5, 1.5, C).astype(x.dtype)
        b = np.linspace(-1, 1, C).astype(x.dtype)
        rm, rv = np.zeros(C, x.dtype), np.ones(C, x.dtype)
        y, sm, si = cbn.batch_norm_forward(x, w, b, rm, rv, True, 0.1, 1e-5, axis=axis,
                                           n_threads=n_threads)
        ye = cbn.batch_norm(x, rm, rv, w, b, False, axis=axis, n_threads=n_threads)
        gx, gw, gb = cbn.batch_norm_backward(x, x, w, sm, si, True, axis=axis,
                                             n_threads=n_threads)
        xs = np.asfortranarray(x)                     # the general path
        yg = cbn.batch_norm(xs, None, None, w, b, True, axis=axis, n_threads=n_threads)
        res += [y, sm, si, rm, rv, ye, gx, gw, gb, yg]
    return res


def _wait(pid, timeout):
    """Exit code of child pid, killing its process group (and failing) if it runs past
    timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)                 # the child and any child of its own
    os.waitpid(pid, 0)
    pytest.fail(f"forked child still running after {timeout} s (killed): it hung")


def _fork_and_run(body, path, timeout=TIMEOUT):
    """Fork; the child, in a process group of its own, runs body() and saves what it
    returns (a list of arrays) to path."""
    pid = os.fork()
    if pid == 0:                                          # the child
        code = 1
        try:
            os.setpgid(0, 0)
            np.savez(path, *body())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        os.setpgid(pid, pid)                              # whichever of the two runs first
    except OSError:
        pass
    assert _wait(pid, timeout) == 0, "the forked child failed (its traceback is in stderr)"
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _assert_same(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"result {i} differs"


@pytest.fixture
def parent_ran_two_threads():
    """The parent's results on 2 threads: a parallel region has run in this process."""
    return _work(2)


def test_fork_after_parallel_call_completes_with_same_bits(parent_ran_two_threads, tmp_path):
    def child():
        assert cbn.get_num_threads() == 1                 # the truth in such a child
        cbn.set_num_threads(2)
        assert cbn.get_num_threads() == 1
        return _work(2) + _work(None)
    got = _fork_and_run(child, tmp_path / "r.npz")
    _assert_same(got, parent_ran_two_threads + parent_ran_two_threads)


def test_grandchild_of_fork_completes(parent_ran_two_threads, tmp_path):
    inner = tmp_path / "inner.npz"

    def child():
        return _fork_and_run(lambda: _work(3), inner, TIMEOUT / 2)
    _assert_same(_fork_and_run(child, tmp_path / "outer.npz"), parent_ran_two_threads)


def _mp_child(conn, n_threads):
    try:
        conn.send((cbn.get_num_threads(), _work(n_threads)))
    except BaseException:
        conn.send(traceback.format_exc())
    conn.close()


def _mp_run(method, n_threads=2, preload=None):
    """Run _mp_child in a multiprocessing child started with `method`, under a timeout."""
    ctx = multiprocessing.get_context(method)
    if preload is not None:
        ctx.set_forkserver_preload(preload)
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_mp_child, args=(send, n_threads))
    p.start()
    send.close()
    try:
        if not recv.poll(TIMEOUT):
            pytest.fail(f"{method} child sent nothing in {TIMEOUT} s (killed): it hung")
        msg = recv.recv()
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    assert not isinstance(msg, str), msg
    return msg


def test_multiprocessing_fork_child(parent_ran_two_threads):
    threads, got = _mp_run("fork")
    assert threads == 1
    _assert_same(got, parent_ran_two_threads)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawn_and_forkserver_children_still_get_threads(method, parent_ran_two_threads):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} here")
    if not cbn.openmp_enabled():
        pytest.skip("cbn built without OpenMP")
    # forkserver with cbn preloaded: the server imported cbn but never ran a team, so the
    # children it forks are not limited
    cbn.set_num_threads(3)     # not inherited: only n_threads=2 reaches the child
    threads, got = _mp_run(method, preload=["cbn"] if method == "forkserver" else None)
    assert threads == cbn._kernels.max_threads() or threads > 1 or os.cpu_count() == 1
    _assert_same(got, parent_ran_two_threads)


def test_fork_before_any_parallel_call_keeps_threads():
    # a process that never ran a team (a server that imported cbn, then forks workers):
    # its children are not limited to one thread
    if not cbn.openmp_enabled():
        pytest.skip("cbn built without OpenMP")
    root = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    code = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        import numpy as np, cbn
        cbn.batch_norm(np.ones((4, 3)), None, None, training=True, n_threads=2)  # small
        cbn.set_num_threads(2)
        pid = os.fork()
        if pid == 0:
            x = np.ones((64, 4, 512), np.float32)
            cbn.batch_norm(x, None, None, training=True)
            os._exit(0 if cbn.get_num_threads() == 2 else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


# ------------------------------------------------------- another library's OpenMP region

_FOREIGN = textwrap.dedent("""
    import ctypes, os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    if sys.argv[2] == "torch":
        import torch
    import cbn
    if sys.argv[2] == "torch":
        (torch.randn(1000, 1000) * 2 + 1).sum()       # torch's own parallel region
    else:
        # a parallel region of 2 threads run by the libgomp cbn is linked to, through
        # ctypes: cbn has run nothing
        path = next(line.split()[-1] for line in open("/proc/self/maps")
                    if "libgomp" in line)
        gomp = ctypes.CDLL(path)
        hits = []
        body = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(
            lambda _: hits.append(gomp.omp_get_thread_num()))
        gomp.GOMP_parallel(body, None, 2, 0)
        assert sorted(hits) == [0, 1], hits
    x = np.random.default_rng(0).standard_normal((64, 16, 32, 32)).astype(np.float32)
    want = cbn.batch_norm(x, None, None, training=True, n_threads=1)
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)                   # a hung child dies instead of waiting forever
        y = cbn.batch_norm(x, None, None, training=True, n_threads=2)
        os._exit(0 if y.tobytes() == want.tobytes() else 3)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status))
""")


@pytest.mark.parametrize("library", ["libgomp", "torch"])
def test_fork_after_another_librarys_openmp_region_completes(library):
    # The parent ran a parallel region in the libgomp cbn uses, but not through cbn: the
    # child's first multi-threaded call must still return, with the same bits.
    if not cbn.openmp_enabled():
        pytest.skip("cbn built without OpenMP")
    if library == "torch":
        pytest.importorskip("torch")
    elif not any("libgomp" in line for line in open("/proc/self/maps")):
        pytest.skip("cbn is not linked to libgomp here")
    root = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    out = subprocess.run([sys.executable, "-c", _FOREIGN, root, library],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["child", "0"], (out.stdout, out.stderr)


def test_multiprocessing_fork_pool_after_torch_region():
    torch = pytest.importorskip("torch")
    if not cbn.openmp_enabled():
        pytest.skip("cbn built without OpenMP")
    code = textwrap.dedent("""
        import multiprocessing, sys
        sys.path.insert(0, sys.argv[1])
        import torch, numpy as np, cbn
        x = np.random.default_rng(0).standard_normal((32, 16, 32, 32)).astype(np.float32)
        def work(n):
            return cbn.batch_norm(x, None, None, training=True, n_threads=n).tobytes()
        if __name__ == "__main__":
            (torch.randn(1000, 1000) * 2 + 1).sum()
            with multiprocessing.get_context("fork").Pool(2) as pool:
                got = pool.map_async(work, [2, 2]).get(60)
            print(all(g == work(1) for g in got))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_child_runs_on_one_thread_when_the_pool_cannot_be_released():
    # A libgomp without omp_pause_resource_all (or a fork inside a parallel region): the
    # pool may survive in the child, so a child of a process with foreign threads computes
    # serially; with nothing to fear it keeps its threads.
    if not cbn.openmp_enabled():
        pytest.skip("cbn built without OpenMP")
    code = textwrap.dedent("""
        import os, sys
        sys.path.insert(0, sys.argv[1])
        import cbn, cbn._threads as T
        T._loaded_libgomps = lambda: [lambda kind: -1]        # pausing fails
        T._foreign_threads = lambda: sys.argv[2] == "threads"
        cbn.set_num_threads(2)
        pid = os.fork()
        if pid == 0:
            os._exit(cbn.get_num_threads())
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    for threads, want in (("threads", "1"), ("none", "2")):
        out = subprocess.run([sys.executable, "-c", code, root, threads], capture_output=True,
                             text=True, timeout=TIMEOUT)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == want
