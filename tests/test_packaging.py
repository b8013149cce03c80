"""What users get: the ``python -m cbn`` command line, the demo outside the source tree, and
the contents of the sdist and of wheels.

The sdist and wheel-layout tests build from a copy of the source tree (``python -m build
--sdist`` and ``setup.py build_py``, no compiler run) and skip where the build tools are
not installed. ``test_built_wheel_*`` inspect a real wheel: set ``CBN_TEST_WHEEL`` to its
path (.ci/run does, with the auditwheel-repaired wheel it builds).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import List

import pytest

import cbn
from cbn import _bench, _demo

ROOT = Path(__file__).resolve().parent.parent
#: The folder that holds the ``cbn`` package the tests import (the tree, or site-packages).
CBN_HOME = Path(cbn.__file__).resolve().parent.parent
EXAMPLE_NAMES = ("deep_mlp", "bad_init_regression", "digits")
#: Sources the build reads: in the sdist, never in a wheel ...
SOURCE_SUFFIXES = (".c", ".h", ".pyx", ".pxd")
#: ... but for the C ABI, which wheels ship for code built against cbn
PUBLIC_ABI = ("cbn/include/cbn.h", "cbn/include/cbn_core.h", "cbn/capi.pxd")


def kernel_sources(names):
    """The kernels' own sources among ``names`` (the public ABI files excepted)."""
    return [n for n in names if n.endswith(SOURCE_SUFFIXES) and n not in PUBLIC_ABI]


def run_cbn(args: List[str], cwd: Path, pythonpath: Path = CBN_HOME,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m cbn ARGS`` in a fresh interpreter, in ``cwd``, importing cbn from
    ``pythonpath`` only (one BLAS thread: the examples multiply small matrices)."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath), OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cbn", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------- command line


def test_help_lists_the_commands(tmp_path):
    proc = run_cbn(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m cbn")
    for command in ("check", "bench", "demo"):
        assert f"\n    {command} " in proc.stdout, proc.stdout
    assert "(the default)" in proc.stdout


@pytest.mark.parametrize("command", ["check", "bench", "demo"])
def test_each_command_has_its_own_help(tmp_path, command):
    proc = run_cbn([command, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m cbn {command}"), proc.stdout[:200]


def test_bench_help_states_the_real_defaults(tmp_path):
    """Every default ``bench`` runs is named in its help (the help once said 'all three'
    operations while five ran)."""
    text = " ".join(run_cbn(["bench", "--help"], tmp_path).stdout.split())
    assert "all five" in text
    for op in _bench.OPS:
        assert op in text, op
    for case in _bench.CASES + _bench.QUICK_CASES:
        assert _bench.case_name(case) in text


def test_unknown_command_is_refused(tmp_path):
    proc = run_cbn(["frobnicate"], tmp_path)
    assert proc.returncode == 2
    assert "invalid choice: 'frobnicate'" in proc.stderr


def test_version(tmp_path):
    proc = run_cbn(["--version"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"cbn {cbn.__version__}"


@pytest.mark.parametrize("argv, expected", [
    ([], (0, True)),
    (["check"], (0, True)),
    (["check", "--seed", "3", "--no-speed"], (3, False)),
])
def test_no_command_means_check(monkeypatch, argv, expected):
    from cbn import __main__ as cli
    calls = []
    monkeypatch.setattr(cli, "check", lambda seed, speed: calls.append((seed, speed)) or 0)
    assert cli.main(argv) == 0
    assert calls == [expected]


def test_check_without_speed_table(tmp_path):
    proc = run_cbn(["check", "--no-speed"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "self-check against the NumPy reference" in proc.stdout
    assert ": ok" in proc.stdout and "speed" not in proc.stdout.lower()


# ------------------------------------------------------------------------------------ demo


def test_demo_runs_from_any_directory(tmp_path):
    proc = run_cbn(["demo", "deep_mlp", "bad_init_regression"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "=== deep_mlp --quick" in out and "layers:99, std:" in out
    assert "=== bad_init_regression --quick" in out and "final test loss" in out


def test_demo_refuses_an_unknown_example(tmp_path):
    proc = run_cbn(["demo", "mnist"], tmp_path)
    assert proc.returncode == 2
    assert "unknown example 'mnist'" in proc.stderr and "deep_mlp" in proc.stderr


def test_demo_without_sklearn_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)       # import sklearn fails
    assert _demo.main(["digits"]) == 2
    assert "pip install scikit-learn" in capsys.readouterr().err


def test_demo_default_run_skips_digits_without_sklearn(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    helper = sys.modules.get("_mlp")          # tests/test_examples.py may have loaded one
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        code = _demo.main([])
    else:
        with threadpool_limits(limits=1, user_api="blas"):
            code = _demo.main([])
    out = capsys.readouterr().out
    assert code == 0
    assert "=== digits: skipped" in out and "pip install scikit-learn" in out
    assert "layers:99, std:" in out and "final test loss" in out
    assert sys.modules.get("_mlp") is helper  # the examples' helper module is put back


# ------------------------------------------------------------------------ sdist and wheels


def _need_build_tools(*extra: str) -> None:
    """Skip unless setup.py can run here (it imports Cython and NumPy, and pyproject's
    SPDX license needs setuptools >= 77) with ``extra``."""
    for name in ("Cython", "numpy", *extra):
        pytest.importorskip(name)
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} < 77 cannot build cbn")
    if not (ROOT / "setup.py").is_file():
        pytest.skip("no source tree next to the tests")


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """A copy of the source tree without build outputs; the generated ``cbn/*.c`` is kept
    with its time stamp, so that setup.py's cythonize() has nothing to redo. Holds one
    stand-in for each kind of kernel source (``cbn/*.pxd``, ``cbn/src/*.h``,
    ``cbn/src/*.c``) so the sdist's rules are tested before such files exist."""
    _need_build_tools()
    dest = tmp_path_factory.mktemp("tree") / "cbn-src"
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.pyd", ".asv",
        ".hypothesis", ".pytest_cache", ".venv", "venv", "wheelhouse"))
    (dest / "cbn" / "src").mkdir(exist_ok=True)
    for stub in ("cbn/_probe_stub.pxd", "cbn/src/probe_stub.h", "cbn/src/probe_stub.c"):
        (dest / stub).write_text("/* a stand-in kernel source for tests/test_packaging.py */\n")
    return dest


def _setup_py(tree: Path, *args: str) -> None:
    proc = subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=tree,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.fixture(scope="module")
def sdist_names(tree_copy) -> List[str]:
    """The paths in the sdist built from the tree copy, relative to its top folder."""
    _need_build_tools("build")
    out = tree_copy.parent / "sdist"
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation",
                           "--outdir", str(out), str(tree_copy)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "Missing dependencies" in proc.stdout + proc.stderr:
        pytest.skip("the build requirements are not all installed here:\n" + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (archive,) = out.glob("cbn-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = [m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name]
    return names


def test_sdist_holds_what_building_and_testing_need(sdist_names):
    names = set(sdist_names)
    for required in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
                     "tests/conftest.py", "cbn/_kernels.pyx", "cbn/__main__.py",
                     "cbn/_demo.py", "asv.conf.json",
                     # the CPU targets' regions, compiled apart or not
                     "cbn/src/cbn_region.h"):
        assert required in names, required
    # Every file git tracks in these folders, whatever it is called (in a git checkout).
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return
    tracked = subprocess.run([git, "ls-files", "cbn", "tests", "examples", "benchmarks",
                              "docs"], cwd=ROOT, capture_output=True, text=True, check=True)
    missing = [f for f in tracked.stdout.split() if f not in names]
    assert not missing, f"tracked but not in the sdist (MANIFEST.in): {missing}"


def test_sdist_holds_kernel_sources_but_no_generated_c(sdist_names):
    names = set(sdist_names)
    for stub in ("cbn/_probe_stub.pxd", "cbn/src/probe_stub.h", "cbn/src/probe_stub.c"):
        assert stub in names, stub
    assert not [n for n in names if n.startswith("cbn/") and n.count("/") == 1
                and n.endswith(".c")]
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_wheel_layout_holds_no_sources_and_runs_the_demo(tree_copy, tmp_path):
    """What a wheel holds besides the compiled module is build_py's output: the Python
    files, cbn/examples, no C, no Cython sources. With the compiled module this test
    imports copied in, that layout runs the demo from a directory far from any tree."""
    lib = tmp_path / "lib"
    _setup_py(tree_copy, "build_py", "--build-lib", str(lib))
    files = sorted(p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file())
    assert "cbn/__main__.py" in files and "cbn/_demo.py" in files
    for name in EXAMPLE_NAMES + ("_mlp",):
        assert f"cbn/examples/{name}.py" in files
    assert not kernel_sources(files), files
    assert set(PUBLIC_ABI) <= set(files), files

    from cbn import _kernels
    shutil.copy2(_kernels.__file__, lib / "cbn")
    away = tmp_path / "elsewhere"
    away.mkdir()
    proc = run_cbn(["demo", "deep_mlp"], away, pythonpath=lib)
    assert proc.returncode == 0, proc.stderr
    assert "layers:99, std:" in proc.stdout


def test_build_py_warns_of_nothing_and_ships_the_public_c_headers(tree_copy, tmp_path):
    """setuptools >= 77 warned that the header folder cbn/src was "absent from the
    `packages` configuration" and "would be ignored" (a later setuptools drops such files).
    The build prints no warning now; a public C header (cbn/include/*.h) goes into wheels,
    the kernels' own headers (cbn/src/*.h) do not."""
    tree = tmp_path / "tree"
    shutil.copytree(tree_copy, tree)
    (tree / "cbn" / "include").mkdir(exist_ok=True)
    (tree / "cbn" / "include" / "stub_abi.h").write_text("/* a stand-in C ABI header */\n")
    lib = tmp_path / "lib"
    proc = subprocess.run([sys.executable, "-W", "always", "setup.py", "build_py",
                           "--build-lib", str(lib)], cwd=tree, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "Warning" not in text and "absent from the" not in text, text[-3000:]
    files = sorted(p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file())
    assert "cbn/include/stub_abi.h" in files
    assert not [f for f in files if f.startswith("cbn/src/")], files


# ---------------------------------------------------------------- a wheel built elsewhere


def elf_section_names(blob: bytes) -> List[str]:
    """Names of the sections of an ELF file (32 or 64 bit, either byte order)."""
    if blob[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    end = "<" if blob[5] == 1 else ">"
    if blob[4] == 2:           # ELF64: e_shoff at 0x28; a section header is 64 bytes
        (shoff,) = struct.unpack_from(end + "Q", blob, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", blob, 0x3A)
        name_at, span = 0, (end + "QQ", 0x18)       # sh_offset, sh_size
    else:                      # ELF32: e_shoff at 0x20; a section header is 40 bytes
        (shoff,) = struct.unpack_from(end + "I", blob, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", blob, 0x2E)
        name_at, span = 0, (end + "II", 0x10)

    def header(i):
        base = shoff + i * shentsize
        (name,) = struct.unpack_from(end + "I", blob, base + name_at)
        offset, size = struct.unpack_from(span[0], blob, base + span[1])
        return name, offset, size

    _, str_offset, str_size = header(shstrndx)
    strings = blob[str_offset:str_offset + str_size]
    names = []
    for i in range(shnum):
        name = header(i)[0]
        names.append(strings[name:strings.index(b"\0", name)].decode())
    return names


def test_elf_section_names_reads_this_build():
    """The reader above against binutils' readelf on the compiled module in use."""
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("no readelf")
    from cbn import _kernels
    path = Path(_kernels.__file__)
    out = subprocess.run([readelf, "-S", "-W", str(path)], capture_output=True, text=True,
                         check=True).stdout
    expected = [line.split("]", 1)[1].split()[0] for line in out.splitlines()
                if line.strip().startswith("[") and "]" in line and "Nr]" not in line]
    got = [n for n in elf_section_names(path.read_bytes()) if n]
    assert got == [n for n in expected if n != "NULL"]


@pytest.fixture
def built_wheel() -> Path:
    path = os.environ.get("CBN_TEST_WHEEL")
    if not path:
        pytest.skip("set CBN_TEST_WHEEL to a built wheel (.ci/run does)")
    return Path(path)


def test_built_wheel_holds_no_sources_nor_debug_info(built_wheel):
    with zipfile.ZipFile(built_wheel) as whl:
        names = whl.namelist()
        assert not kernel_sources(names), names
        assert set(PUBLIC_ABI) <= set(names), names
        assert any(n.endswith("dist-info/licenses/LICENSE") for n in names), names
        modules = [n for n in names if n.startswith("cbn/_kernels") and n.endswith(".so")]
        assert len(modules) == 1, names
        sections = elf_section_names(whl.read(modules[0]))
    assert ".text" in sections
    assert not [s for s in sections if s.startswith((".debug", ".zdebug"))], sections
    if "manylinux" in built_wheel.name:          # repaired: libgomp travels with it
        assert [n for n in names if n.startswith("cbn.libs/libgomp")], names


def test_built_wheel_runs_the_demo_away_from_the_tree(built_wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(built_wheel) as whl:
        whl.extractall(site)
    for lib in site.rglob("*.so*"):                # zipfile drops the permission bits
        lib.chmod(0o755)
    proc = run_cbn(["demo", "deep_mlp"], tmp_path, pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    assert "layers:99, std:" in proc.stdout
    where = subprocess.run([sys.executable, "-c", "import cbn; print(cbn.__file__)"],
                           cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)),
                           capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(site)
