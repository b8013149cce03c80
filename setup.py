"""Build cbn._kernels: Cython, -O3, OpenMP where the compiler has it.

Environment variables:
  CBN_DEBUG=1       bounds checking, wraparound and initialized checks on, -O1 -g
                    (otherwise the binary carries no debug information: see debug_info_flags)
  CBN_NO_OPENMP=1   build serial kernels even if the compiler supports OpenMP
  CBN_NATIVE=1      opt-in: compile everything for the building machine's CPU
                    (-march=native) and nothing else; the binary may not run elsewhere
  CBN_SANITIZE=address,undefined
                    compile and link the kernels with these sanitizers (any -fsanitize=
                    list), keeping OpenMP and the other flags; see .ci/sanitize for running
                    the tests under them

By default the build is portable: the module is compiled for the architecture's baseline
(plain x86-64 on x86-64), and on x86-64 with GCC the C loops in cbn/src are compiled a
second and third time for AVX2 and AVX-512 (`#pragma GCC target` regions), and the
bfloat16 loops a fourth time for AVX-512 with AVX512-BF16; one target is chosen at import
for the CPU it runs on (CBN_CPU_TARGET=base|avx2|avx512|avx512bf16 forces one; see
cbn/src/cbn_kernels.h). Results do not depend on the target: every reduction has a
fixed order and FMA contraction is off. CBN_PORTABLE=1 is accepted for compatibility and
means the default.

Build time: in that multi-target build the AVX2 and AVX-512 loops are translation units of
their own (-DCBN_TARGETS_APART: setup.py writes one per target, cbn/src/cbn_region.h; the same code
as in one unit, their tables hidden), and the extension's C sources are compiled in
parallel, one compiler per source, every source with the same flags (CBN_DEBUG,
CBN_SANITIZE, CBN_NO_OPENMP apply to all). Otherwise (CBN_NATIVE, Clang, other
architectures) the module is one translation unit, as it always was.
  CBN_BUILD_JOBS=N  compilers run at once (default: the CPU count, at most 8; 1: one source
                    after the other)
"""

import concurrent.futures
import glob
import os
import shutil
import sys
import tempfile
import textwrap
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("CBN_DEBUG", "") not in ("", "0")
NO_OPENMP = os.environ.get("CBN_NO_OPENMP", "") not in ("", "0")
NATIVE = os.environ.get("CBN_NATIVE", "") not in ("", "0")

PLAIN_PROBE = "int main(void) { return 0; }\n"

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return n > 0 ? 0 : 1;
    }
    """
)


# ------------------------------------------------------------- CBN_SANITIZE and probes
# CBN_SANITIZE=address,undefined adds -fsanitize=address,undefined (and frame pointers,
# debug info, no recovery from UBSan reports) to the kernels' compile and link flags, and
# to every probe, so that the OpenMP probe still links and the sanitized build keeps
# OpenMP. (Setting CFLAGS=-fsanitize=... instead compiles the probes with the sanitizer
# but links them without its runtime: every probe fails and the build goes serial.)
# A probe that fails reports the compiler's own output.

SANITIZE = [s for s in os.environ.get("CBN_SANITIZE", "").replace(" ", "").split(",") if s]


def sanitize_flags():
    """Compile and link flags of the CBN_SANITIZE build (none when it is not set)."""
    if not SANITIZE:
        return []
    flags = ["-fsanitize=" + ",".join(SANITIZE), "-fno-omit-frame-pointer", "-g"]
    if "undefined" in SANITIZE:
        flags.append("-fno-sanitize-recover=undefined")
    return flags


def probe(compiler, flags, source=PLAIN_PROBE):
    """Compile and link ``source`` with ``flags`` (and the sanitizer flags).

    Returns (True, "") if that works, else (False, what the compiler printed)."""
    flags = list(flags) + sanitize_flags()
    tmp = tempfile.mkdtemp(prefix="cbn-probe-")
    log = os.path.join(tmp, "log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        with open(log, "w") as f:                   # the compiler writes to fds 1 and 2
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
                compiler.link_executable(objs, os.path.join(tmp, "probe"),
                                         extra_postargs=flags)
                ok, err = True, ""
            except Exception as e:
                ok, err = False, str(e)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        with open(log) as f:
            output = f.read()
        return ok, "" if ok else (output + "\n" + err).strip()
    finally:
        os.close(saved[0])
        os.close(saved[1])
        shutil.rmtree(tmp, ignore_errors=True)


def compiler_accepts(compiler, flag, source=PLAIN_PROBE):
    """Compile and link ``source`` with ``flag``; True if that works."""
    return probe(compiler, [flag], source)[0]

# ------------------------------------------------------- end of CBN_SANITIZE and probes


MULTI_TARGET_PROBE = textwrap.dedent(
    """
    #pragma GCC push_options
    #pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512cd,avx512bf16,avx2,fma,bmi,bmi2")
    static int f(void) { return 1; }
    #pragma GCC pop_options
    int main(void) {
        __builtin_cpu_init();
        return f() && __builtin_cpu_supports("avx2") >= 0
               && __builtin_cpu_supports("avx512bf16") >= 0 ? 0 : 1;
    }
    """
)


def multi_target_ok(compiler):
    """True on x86-64 with a GCC that takes AVX-512 target pragmas (Clang does not
    honour `#pragma GCC target`; it gets the baseline loops only)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    cc = os.path.basename(str(compiler.compiler[0] if compiler.compiler else "")).lower()
    if "clang" in cc:
        return False
    return compiler_accepts(compiler, "-O0", MULTI_TARGET_PROBE)


# The targets compiled apart (multi-target builds): cbn/src/cbn_region.h's regions, each in
# a translation unit of its own that defines its tables (hidden), written into the build
# folder by target_sources (generated, like Cython's C: nothing of it is tracked).
TARGET_REGIONS = {"avx2": 1, "avx512": 2, "avx512bf16": 3}


def target_sources(folder):
    """Write the translation units of the targets compiled apart into ``folder``; return
    their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, region in TARGET_REGIONS.items():
        path = os.path.join(folder, f"cbn_{name}.c")
        text = (f"/* generated by setup.py: the {name} target's loops and tables */\n"
                "#include <Python.h>\n#include \"cbn_loops.h\"\n"
                "#define CBN_OPS_LINKAGE CBN_HIDDEN\n"
                f"#define CBN_REGION {region}\n#include \"cbn_region.h\"\n")
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        paths.append(path)
    return paths


def build_jobs():
    """How many sources to compile at once: CBN_BUILD_JOBS, else the CPU count (at most 8)."""
    value = os.environ.get("CBN_BUILD_JOBS", "").strip()
    if value:
        try:
            jobs = int(value)
        except ValueError:
            raise SystemExit(f"cbn: CBN_BUILD_JOBS must be a whole number, not {value!r}")
        return max(1, jobs)
    return max(1, min(os.cpu_count() or 1, 8))


def compile_in_parallel(compile, jobs):
    """``compile`` (a CCompiler's bound compile method) run on one source per call, ``jobs``
    calls at once; the object files come back in the sources' order. The first source
    that fails raises its CompileError (the compiler's message), after the others end."""
    def parallel_compile(sources, *args, **kwargs):
        if jobs <= 1 or len(sources) <= 1:
            return compile(sources, *args, **kwargs)
        with concurrent.futures.ThreadPoolExecutor(min(jobs, len(sources))) as pool:
            futures = [pool.submit(compile, [src], *args, **kwargs) for src in sources]
            concurrent.futures.wait(futures)
        objects = []
        for future in futures:
            objects.extend(future.result())
        return objects
    return parallel_compile


def debug_info_flags(compiler):
    """(compile, link) flags for debug information, each only if the compiler accepts it.

    CBN_DEBUG=1 keeps ``-g``. Otherwise the extension carries none: ``-g0`` comes after
    (and so overrides) the ``-g`` in Python's own CFLAGS, and ``-Wl,-S`` has the linker drop
    any debug sections left (GNU ld, gold, lld and Apple's ld all read -S as "strip debug
    information"). The symbol table stays, so profilers still name the kernels' functions.
    """
    if DEBUG:
        return ["-g"], []
    compile_args = [f for f in ("-g0",) if compiler_accepts(compiler, f)]
    link_args = [f for f in ("-Wl,-S",) if compiler_accepts(compiler, f)]
    return compile_args, link_args


class BuildExt(build_ext):
    """Adds the optimisation and OpenMP flags the compiler accepts."""

    def build_extensions(self):
        # The kernels need GCC or Clang (vector extensions; see cbn/src/cbn_simd.h).
        # -ffp-contract=off: no FMA contraction, so results do not depend on the
        # instruction set; never -ffast-math (reductions keep their written order).
        opt = ["-O1"] if DEBUG else ["-O3"]
        debug_compile, debug_link = debug_info_flags(self.compiler)
        compile_args = opt + debug_compile + ["-ffp-contract=off", "-fno-math-errno"]
        if NATIVE and compiler_accepts(self.compiler, "-march=native"):
            compile_args.append("-march=native")
        elif multi_target_ok(self.compiler):
            # avx2 and avx512 compiled apart, in parallel with the module (see above)
            compile_args += ["-DCBN_MULTI_TARGET", "-DCBN_TARGETS_APART"]
            units = target_sources(os.path.join(self.build_temp, "cbn_targets"))
            for ext in self.extensions:
                ext.sources += [src for src in units if src not in ext.sources]
        omp_compile, omp_link = ["-fopenmp"], ["-fopenmp"]
        use_omp, why = (False, "") if NO_OPENMP else probe(self.compiler, omp_compile[:1],
                                                             OPENMP_PROBE)
        if not use_omp:
            reason = ("CBN_NO_OPENMP is set" if NO_OPENMP else
                      "the compiler has no OpenMP; its probe printed:\n" + why)
            warnings.warn(f"cbn: building serial kernels ({reason}); "
                          "cbn.openmp_enabled() will return False")
            omp_compile, omp_link = [], []
        flags = " ".join(compile_args + omp_compile + sanitize_flags()).replace('"', "")
        for ext in self.extensions:
            ext.extra_compile_args = compile_args + omp_compile + sanitize_flags()
            ext.extra_link_args = omp_link + debug_link + sanitize_flags()
            # what cbn.show_config() reports
            ext.define_macros.append(("CBN_BUILD_FLAGS", f'"{flags}"'))
        self.compiler.compile = compile_in_parallel(self.compiler.compile, build_jobs())
        super().build_extensions()


directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}

extensions = [
    Extension(
        "cbn._kernels",
        ["cbn/_kernels.pyx"],
        include_dirs=[numpy.get_include(), "cbn/src", "cbn/include"],
        depends=(sorted(glob.glob("cbn/src/*.h") + glob.glob("cbn/include/*.h"))
                 + ["cbn/_kernels.pxd"]),
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
    cmdclass={"build_ext": BuildExt},
)
